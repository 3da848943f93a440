// Masked GroupNorm kernels on CUDA (host code: csrc/norm_ops.h), float32 / float16 / bfloat16,
// accumulating in float32. The autograd function in spark_kernels/group_norm.py composes them; it merges a
// group's channels and computes the per-(image, channel) coefficients between them.
//
// The reductions are those of masked BatchNorm (cuda/norm_cuda.cuh) with chunks that never cross an image
// (ImageChunks): image n's active sites are the run index[starts[n] .. starts[n + 1]) of the ascending index,
// found by a searchsorted on the device (no host sync), cut into the same fixed chunks for every image; the
// second stage then reduces each (image, channel) column over its image's chunks in a fixed order.
#include <ATen/ops/arange.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/norm_cuda.cuh"
#include "norm_ops.h"

namespace spark_kernels::cuda {
namespace {

// The image of a flat site number (sites are int32, so 32-bit division suffices).
__device__ __forceinline__ int64_t image_of(int64_t site, int64_t plane) {
  return static_cast<int32_t>(site) / static_cast<int32_t>(plane);
}

template <typename T, typename Acc>
struct BackwardStatsTerm {
  const T* dy;
  const T* x;
  const int32_t* index;
  const Acc* center;  // (N, C)
  int64_t channels, plane;
  __device__ void operator()(int64_t j, int64_t offset, int64_t c, Acc& a, Acc& b) const {
    const Acc mean = center[image_of(index[j], plane) * channels + c];
    norm::BnBackwardTerms<Acc>()(static_cast<Acc>(dy[offset]), static_cast<Acc>(x[offset]), mean, a, b);
  }
};

template <typename T, typename Acc>
struct AffineElem {
  const T* x;
  const Acc *center, *scale, *shift;  // (N, C)
  int64_t channels, plane;
  __device__ T operator()(int64_t offset, int64_t c, int64_t site) const {
    const int64_t v = image_of(site, plane) * channels + c;
    return static_cast<T>(norm::gn_affine<Acc>(static_cast<Acc>(x[offset]), center[v], scale[v], shift[v]));
  }
};

template <typename T, typename Acc>
struct BackwardElem {
  const T* dy;
  const T* x;
  const Acc *center, *a, *b, *d;  // (N, C)
  int64_t channels, plane;
  __device__ T operator()(int64_t offset, int64_t c, int64_t site) const {
    const int64_t v = image_of(site, plane) * channels + c;
    return static_cast<T>(norm::gn_backward_elem<Acc>(static_cast<Acc>(dy[offset]), static_cast<Acc>(x[offset]),
                                                      center[v], a[v], b[v], d[v]));
  }
};

// Stage 2 of the moments: column n * C + c over image n's `parts` blocks, in double, relative to the
// reference of the image's first block.
struct ImageMomentsLoad {
  const float* partials;  // (N * parts, 3, C): [r, mean - r, M2]
  const int64_t* starts;
  int64_t channels, parts;
  __device__ norm::Moments<double> operator()(int64_t part, int64_t col) const {
    const int64_t image = col / channels, c = col % channels;
    const float* row = partials + (image * parts + part) * 3 * channels + c;
    const float reference = partials[image * parts * 3 * channels + c];
    const int64_t left = starts[image + 1] - starts[image] - part * kSitesPerSumBlock;
    const double sites = double(left < 0 ? 0 : (left < kSitesPerSumBlock ? left : kSitesPerSumBlock));
    return {sites, (double(row[0]) - double(reference)) + double(row[channels]), double(row[2 * channels])};
  }
};

struct ImageMomentsStore {
  const float* partials;
  double* out;  // (N, 2, C): mean, M2
  int64_t channels, parts;
  __device__ void operator()(int64_t col, norm::Moments<double> total) const {
    const int64_t image = col / channels, c = col % channels;
    out[image * 2 * channels + c] = double(partials[image * parts * 3 * channels + c]) + total.offset;
    out[image * 2 * channels + channels + c] = total.m2;
  }
};

// Stage 2 of the sums: column n * 2C + k over image n's blocks; the (N, 2, C) output has the same order.
template <typename Acc>
struct ImageSumLoad {
  const Acc* partials;  // (N * parts, 2C)
  int64_t width, parts;  // width = 2C
  __device__ Sum operator()(int64_t part, int64_t col) const {
    const int64_t image = col / width;
    return {double(partials[(image * parts + part) * width + col % width])};
  }
};

struct ImageSumStore {
  double* out;
  __device__ void operator()(int64_t col, Sum total) const { out[col] = total.value; }
};

// Stage-1 blocks per image: enough chunks for an image whose every site is active.
int64_t parts_per_image(const NormGeometry& g) {
  return std::max<int64_t>(1, norm::num_chunks(g.plane, kSitesPerSumBlock));
}

// (N + 1) int64: image n's active sites are index[starts[n] .. starts[n + 1]) (on the device, no host sync).
at::Tensor image_starts(const NormArgs& p) {
  const auto options = p.index.options().dtype(at::kInt);
  if (p.g.plane == 0) return at::zeros({p.g.batch + 1}, options.dtype(at::kLong));  // no sites, none active
  // Image boundaries n * H * W for n = 0 .. N (below 2^31: ActiveSites refuses more sites).
  const at::Tensor bounds = at::arange(0, (p.g.batch + 1) * p.g.plane, p.g.plane, options);
  return at::searchsorted(p.index, bounds);
}

struct Kernels {
  using Backend = CudaBackend;

  template <typename scalar_t>
  static void gn_stats(const NormArgs& p, at::Tensor& out) {
    const int64_t parts = parts_per_image(p.g);
    const at::Tensor starts = image_starts(p);
    at::Tensor partials = at::empty({p.g.batch * parts, 3, p.g.channels}, p.x.options().dtype(at::kFloat));
    channel_moments_kernel<scalar_t>
        <<<sum_grid(p.g, p.g.batch * parts), dim3(kWarp, kTileRows), 0, at::cuda::getCurrentCUDAStream()>>>(
            p.g, p.index.const_data_ptr<int32_t>(), ImageChunks{starts.const_data_ptr<int64_t>(), parts},
            p.x.const_data_ptr<scalar_t>(), partials.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const float* table = partials.const_data_ptr<float>();
    reduce_columns<norm::Moments<double>>(
        parts, p.g.batch * p.g.channels, ImageMomentsLoad{table, starts.const_data_ptr<int64_t>(), p.g.channels, parts},
        ImageMomentsStore{table, out.data_ptr<double>(), p.g.channels, parts});
  }

  template <typename scalar_t>
  static void gn_backward_stats(const NormArgs& p, const at::Tensor& grad_out, const at::Tensor& center,
                                at::Tensor& out) {
    const int64_t parts = parts_per_image(p.g);
    const at::Tensor starts = image_starts(p);
    const int64_t width = 2 * p.g.channels;
    at::Tensor partials = at::empty({p.g.batch * parts, width}, p.x.options().dtype(at::kFloat));
    const BackwardStatsTerm<scalar_t, float> term{grad_out.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
                                                  p.index.const_data_ptr<int32_t>(), center.const_data_ptr<float>(),
                                                  p.g.channels, p.g.plane};
    channel_partials_kernel<float>
        <<<sum_grid(p.g, p.g.batch * parts), dim3(kWarp, kTileRows), 0, at::cuda::getCurrentCUDAStream()>>>(
            p.g, p.index.const_data_ptr<int32_t>(), ImageChunks{starts.const_data_ptr<int64_t>(), parts}, term,
            partials.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_columns<Sum>(parts, p.g.batch * width, ImageSumLoad<float>{partials.const_data_ptr<float>(), width, parts},
                        ImageSumStore{out.data_ptr<double>()});
  }

  template <typename scalar_t>
  static at::Tensor gn_elemt(const NormArgs& p, const at::Tensor& center, const at::Tensor& scale,
                             const at::Tensor& shift) {
    const AffineElem<scalar_t, float> elem{p.x.const_data_ptr<scalar_t>(), center.const_data_ptr<float>(),
                                           scale.const_data_ptr<float>(), shift.const_data_ptr<float>(),
                                           p.g.channels, p.g.plane};
    return dense_from_active<scalar_t>(p.x, p.g, p.index, elem);
  }

  template <typename scalar_t>
  static at::Tensor gn_backward_elemt(const NormArgs& p, const at::Tensor& grad_out, const at::Tensor& center,
                                      const at::Tensor& a, const at::Tensor& b, const at::Tensor& d) {
    const BackwardElem<scalar_t, float> elem{grad_out.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
                                             center.const_data_ptr<float>(), a.const_data_ptr<float>(),
                                             b.const_data_ptr<float>(), d.const_data_ptr<float>(), p.g.channels,
                                             p.g.plane};
    return dense_from_active<scalar_t>(p.x, p.g, p.index, elem);
  }
};

}  // namespace

SK_REGISTER_GROUP_NORM(CUDA, Kernels)

}  // namespace spark_kernels::cuda
