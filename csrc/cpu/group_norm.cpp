// Masked GroupNorm kernels on the CPU (host code: csrc/norm_ops.h). The autograd function in
// spark_kernels/group_norm.py composes them; it merges a group's channels and computes the per-(image,
// channel) coefficients between them. The reductions are those of masked BatchNorm (cpu/norm_cpu.h) over
// fixed chunks that never straddle two images (one parallel region for the whole batch), merged per image in
// chunk order, so the results do not depend on the thread count.
#include <algorithm>
#include <vector>

#include "cpu/dtypes.h"
#include "cpu/norm_cpu.h"
#include "norm_ops.h"

namespace spark_kernels::cpu {
namespace {

// The reductions' chunks: each image's run of active sites (the index is ascending) cut into fixed chunks,
// image n's being chunks [first_chunk[n], first_chunk[n + 1]) of bounds.
struct ImageChunks {
  std::vector<int64_t> bounds, first_chunk;

  explicit ImageChunks(const NormArgs& p) : first_chunk(p.g.batch + 1) {
    const int32_t* sites = p.index.const_data_ptr<int32_t>();
    const int64_t count = p.index.numel();
    const int64_t per_chunk = norm::sites_per_chunk(p.g.channels);
    int64_t first = 0;
    for (int64_t n = 0; n < p.g.batch; ++n) {
      const int64_t end = std::lower_bound(sites, sites + count, (n + 1) * p.g.plane) - sites;
      first_chunk[n] = chunk_count(bounds);
      append_chunks(first, end, per_chunk, bounds);
      first = end;
    }
    first_chunk[p.g.batch] = chunk_count(bounds);
  }
};

struct Kernels {
  using Backend = CpuBackend;
  static constexpr bool reads_compact_x = true;
  static constexpr bool reads_any_grad_layout = true;

  template <typename scalar_t>
  static void gn_stats(const NormArgs& p, at::Tensor& out) {
    const ImageChunks chunks(p);
    const auto* x = data_as<storage_t<scalar_t>>(p.x);
    auto value = [=](int64_t off) { return static_cast<double>(x[off]); };
    const int32_t* index = p.index.const_data_ptr<int32_t>();
    const ChunkMoments moments = p.g.rows ? chunk_moments<true>(p.g, index, chunks.bounds, value)
                                          : chunk_moments<false>(p.g, index, chunks.bounds, value);
    double* result = out.data_ptr<double>();
    for (int64_t n = 0; n < p.g.batch; ++n) {
      merge_chunk_moments(moments, chunks.bounds, chunks.first_chunk[n], chunks.first_chunk[n + 1], p.g.channels,
                          result + n * 2 * p.g.channels);
    }
  }

  template <typename scalar_t>
  static void gn_backward_stats(const NormArgs& p, const at::Tensor& grad_out, const at::Tensor& center_t,
                                at::Tensor& out) {
    const ImageChunks chunks(p);
    const acc_t<scalar_t>* center = center_t.const_data_ptr<acc_t<scalar_t>>();
    const int32_t* index = p.index.const_data_ptr<int32_t>();
    const int64_t channels = p.g.channels, plane = p.g.plane;
    const std::vector<double> partials =
        with_backward_readers<storage_t<scalar_t>>(p, grad_out, [&](auto x, auto dy) {
          const norm::BnBackwardTerms<double> terms;
          auto term = [=](int64_t j, int64_t off, int64_t c, double& a, double& b) {
            const int64_t image = index[j] / plane;
            terms(static_cast<double>(dy(j, off, c)), static_cast<double>(x(j, off, c)),
                  static_cast<double>(center[image * channels + c]), a, b);
          };
          return p.g.rows ? chunk_sums<true>(p.g, index, chunks.bounds, term)
                          : chunk_sums<false>(p.g, index, chunks.bounds, term);
        });
    double* result = out.data_ptr<double>();
    for (int64_t n = 0; n < p.g.batch; ++n) {
      combine_chunk_sums(partials, chunks.first_chunk[n], chunks.first_chunk[n + 1], channels,
                         result + n * 2 * channels);
    }
  }

  template <typename scalar_t>
  static at::Tensor gn_elemt(const NormArgs& p, const at::Tensor& center_t, const at::Tensor& scale_t,
                             const at::Tensor& shift_t) {
    using T = storage_t<scalar_t>;
    using Acc = acc_t<scalar_t>;
    const T* x = data_as<T>(p.x);
    const Acc* center = center_t.const_data_ptr<Acc>();
    const Acc* scale = scale_t.const_data_ptr<Acc>();
    const Acc* shift = shift_t.const_data_ptr<Acc>();
    const int64_t channels = p.g.channels;
    return dense_map<T>(p, [=](int64_t, int64_t off, int64_t c, int64_t n) {
      const int64_t v = n * channels + c;
      return static_cast<T>(norm::gn_affine<Acc>(x[off], center[v], scale[v], shift[v]));
    });
  }

  template <typename scalar_t>
  static at::Tensor gn_backward_elemt(const NormArgs& p, const at::Tensor& grad_out, const at::Tensor& center_t,
                                      const at::Tensor& a_t, const at::Tensor& b_t, const at::Tensor& d_t) {
    using T = storage_t<scalar_t>;
    using Acc = acc_t<scalar_t>;
    const Acc* center = center_t.const_data_ptr<Acc>();
    const Acc* a = a_t.const_data_ptr<Acc>();
    const Acc* b = b_t.const_data_ptr<Acc>();
    const Acc* d = d_t.const_data_ptr<Acc>();
    const int64_t channels = p.g.channels;
    return with_backward_readers<T>(p, grad_out, [&](auto x, auto dy) {
      return dense_map<T>(p, [=](int64_t j, int64_t off, int64_t c, int64_t n) {
        const int64_t v = n * channels + c;
        return static_cast<T>(norm::gn_backward_elem<Acc>(dy(j, off, c), x(j, off, c), center[v], a[v], b[v], d[v]));
      });
    });
  }
};

}  // namespace

SK_REGISTER_GROUP_NORM(CPU, Kernels)

}  // namespace spark_kernels::cpu
