// Masked GroupNorm primitives on CUDA (schemas and conventions: csrc/ops.cpp), float32 / float16 / bfloat16,
// accumulating in float32. The autograd function in spark_kernels/group_norm.py composes them; it merges a
// group's channels and computes the per-(image, channel) coefficients between them.
//
// The reductions are those of masked BatchNorm (cuda/norm_cuda.cuh) with chunks that never cross an image
// (ImageChunks): image n's active sites are the run index[starts[n] .. starts[n + 1]) of the ascending index,
// found by a searchsorted on the device (no host sync), cut into the same fixed chunks for every image; the
// second stage then reduces each (image, channel) column over its image's chunks in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cuda/norm_cuda.cuh"

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

struct Prepared {
  at::Tensor x, index;
  NormGeometry g;
  int64_t parts;  // stage-1 blocks per image: enough chunks for an image whose every site is active
};

Prepared prepare(const at::Tensor& x, const at::Tensor& index, const char* op) {
  check_norm_input(x, op, c10::DeviceType::CUDA, {at::kFloat, at::kHalf, at::kBFloat16});
  check_index(index, x, op);
  Prepared p{to_kernel_layout(x, x), index.contiguous(), {}, 0};
  p.g = NormGeometry::of(p.x);
  p.parts = std::max<int64_t>(1, norm::num_chunks(p.g.plane, kSitesPerSumBlock));
  return p;
}

// (N + 1) int64: image n's active sites are index[starts[n] .. starts[n + 1]). Call under the device guard.
at::Tensor image_starts(const Prepared& p) {
  const auto options = p.index.options().dtype(at::kInt);
  if (p.g.plane == 0) return at::zeros({p.g.batch + 1}, options.dtype(at::kLong));  // no sites, none active
  // Image boundaries n * H * W for n = 0 .. N (below 2^31: ActiveSites refuses more sites).
  const at::Tensor bounds = at::arange(0, (p.g.batch + 1) * p.g.plane, p.g.plane, options);
  return at::searchsorted(p.index, bounds);
}

// A (N, C) per-(image, channel) table in x's accumulation dtype.
at::Tensor checked_image_table(const at::Tensor& t, const char* name, const Prepared& p, const at::Tensor& x,
                               const char* op) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == p.g.batch && t.size(1) == p.g.channels, op, ": ", name,
              " must have shape (", p.g.batch, ", ", p.g.channels, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must have dtype Float (the accumulation dtype of ",
              x.scalar_type(), " inputs), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  return t.contiguous();
}

dim3 stage1_grid(const Prepared& p) {
  const int64_t tile = p.g.rows ? kWarp : kTileRows;
  return dim3(static_cast<unsigned>(p.g.batch * p.parts), static_cast<unsigned>((p.g.channels + tile - 1) / tile));
}

at::Tensor masked_gn_stats(const at::Tensor& x_in, const at::Tensor& index_in) {
  constexpr const char* op = "masked_gn_stats";
  const Prepared p = prepare(x_in, index_in, op);
  const c10::cuda::CUDAGuard guard(p.x.device());
  at::Tensor out = at::empty({p.g.batch, 2, p.g.channels}, p.x.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  const at::Tensor starts = image_starts(p);
  at::Tensor partials = at::empty({p.g.batch * p.parts, 3, p.g.channels}, p.x.options().dtype(at::kFloat));
  SK_DISPATCH_CUDA_FLOATS(p.x.scalar_type(), op, [&] {
    channel_moments_kernel<scalar_t><<<stage1_grid(p), dim3(kWarp, kTileRows), 0, at::cuda::getCurrentCUDAStream()>>>(
        p.g, p.index.const_data_ptr<int32_t>(), ImageChunks{starts.const_data_ptr<int64_t>(), p.parts},
        p.x.const_data_ptr<scalar_t>(), partials.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const float* table = partials.const_data_ptr<float>();
  reduce_columns<norm::Moments<double>>(
      p.parts, p.g.batch * p.g.channels,
      ImageMomentsLoad{table, starts.const_data_ptr<int64_t>(), p.g.channels, p.parts},
      ImageMomentsStore{table, out.data_ptr<double>(), p.g.channels, p.parts});
  return out;
}

at::Tensor masked_gn_backward_stats(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& center_in) {
  constexpr const char* op = "masked_gn_backward_stats";
  const Prepared p = prepare(x_in, index_in, op);
  check_like_x(grad_out_in, "grad_out", x_in, op);
  const at::Tensor center = checked_image_table(center_in, "center", p, x_in, op);
  const c10::cuda::CUDAGuard guard(p.x.device());
  const at::Tensor grad_out = to_kernel_layout(grad_out_in, p.x);
  at::Tensor out = at::empty({p.g.batch, 2, p.g.channels}, p.x.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  const at::Tensor starts = image_starts(p);
  const int64_t width = 2 * p.g.channels;
  at::Tensor partials = at::empty({p.g.batch * p.parts, width}, p.x.options().dtype(at::kFloat));
  SK_DISPATCH_CUDA_FLOATS(p.x.scalar_type(), op, [&] {
    const BackwardStatsTerm<scalar_t, float> term{grad_out.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
                                                  p.index.const_data_ptr<int32_t>(), center.const_data_ptr<float>(),
                                                  p.g.channels, p.g.plane};
    channel_partials_kernel<float><<<stage1_grid(p), dim3(kWarp, kTileRows), 0, at::cuda::getCurrentCUDAStream()>>>(
        p.g, p.index.const_data_ptr<int32_t>(), ImageChunks{starts.const_data_ptr<int64_t>(), p.parts}, term,
        partials.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  reduce_columns<Sum>(p.parts, p.g.batch * width, ImageSumLoad<float>{partials.const_data_ptr<float>(), width, p.parts},
                      ImageSumStore{out.data_ptr<double>()});
  return out;
}

at::Tensor masked_gn_elemt(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& center_in,
                           const at::Tensor& scale_in, const at::Tensor& shift_in) {
  constexpr const char* op = "masked_gn_elemt";
  const Prepared p = prepare(x_in, index_in, op);
  const at::Tensor center = checked_image_table(center_in, "center", p, x_in, op);
  const at::Tensor scale = checked_image_table(scale_in, "scale", p, x_in, op);
  const at::Tensor shift = checked_image_table(shift_in, "shift", p, x_in, op);
  const c10::cuda::CUDAGuard guard(p.x.device());
  at::Tensor out;
  SK_DISPATCH_CUDA_FLOATS(p.x.scalar_type(), op, [&] {
    const AffineElem<scalar_t, float> elem{p.x.const_data_ptr<scalar_t>(), center.const_data_ptr<float>(),
                                           scale.const_data_ptr<float>(), shift.const_data_ptr<float>(),
                                           p.g.channels, p.g.plane};
    out = dense_from_active<scalar_t>(p.x, p.g, p.index, elem);
  });
  return out;
}

at::Tensor masked_gn_backward_elemt(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& center_in, const at::Tensor& a_in, const at::Tensor& b_in,
                                    const at::Tensor& d_in) {
  constexpr const char* op = "masked_gn_backward_elemt";
  const Prepared p = prepare(x_in, index_in, op);
  check_like_x(grad_out_in, "grad_out", x_in, op);
  const at::Tensor center = checked_image_table(center_in, "center", p, x_in, op);
  const at::Tensor a = checked_image_table(a_in, "a", p, x_in, op);
  const at::Tensor b = checked_image_table(b_in, "b", p, x_in, op);
  const at::Tensor d = checked_image_table(d_in, "d", p, x_in, op);
  const c10::cuda::CUDAGuard guard(p.x.device());
  const at::Tensor grad_out = to_kernel_layout(grad_out_in, p.x);
  at::Tensor out;
  SK_DISPATCH_CUDA_FLOATS(p.x.scalar_type(), op, [&] {
    const BackwardElem<scalar_t, float> elem{grad_out.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
                                             center.const_data_ptr<float>(), a.const_data_ptr<float>(),
                                             b.const_data_ptr<float>(), d.const_data_ptr<float>(),
                                             p.g.channels, p.g.plane};
    out = dense_from_active<scalar_t>(p.x, p.g, p.index, elem);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spark_kernels, CUDA, m) {
  m.impl("masked_gn_stats", &masked_gn_stats);
  m.impl("masked_gn_backward_stats", &masked_gn_backward_stats);
  m.impl("masked_gn_elemt", &masked_gn_elemt);
  m.impl("masked_gn_backward_elemt", &masked_gn_backward_elemt);
}

}  // namespace spark_kernels::cuda
