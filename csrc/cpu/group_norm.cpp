// Masked GroupNorm primitives on the CPU (schemas and conventions: csrc/ops.cpp). The autograd function in
// spark_kernels/group_norm.py composes them; it merges a group's channels and computes the per-(image,
// channel) coefficients between them. The reductions are those of masked BatchNorm (cpu/norm_cpu.h) over
// fixed chunks that never straddle two images (one parallel region for the whole batch), merged per image in
// chunk order, so the results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/dtypes.h"
#include "cpu/norm_cpu.h"

namespace spark_kernels::cpu {
namespace {

// x in the kernel layout, the geometry, the validated index, and the reductions' chunks: each image's run of
// active sites index[starts[n] .. starts[n + 1]) cut into fixed chunks, image n's being chunks
// [first_chunk[n], first_chunk[n + 1]).
struct Prepared {
  at::Tensor x, index;
  NormGeometry g;
  std::vector<int64_t> bounds, first_chunk;

  const int32_t* index_data() const { return index.const_data_ptr<int32_t>(); }
  int64_t count() const { return index.numel(); }
};

Prepared prepare(const at::Tensor& x, const at::Tensor& index, const char* op) {
  check_norm_input(x, op, c10::DeviceType::CPU, {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16});
  check_index(index, x, op);
  Prepared p{to_kernel_layout(x, x), index.contiguous(), {}, {}, {}};
  p.g = NormGeometry::of(p.x);
  const int32_t* sites = p.index_data();
  check_index_values(sites, p.count(), p.g.sites(), op);
  const int64_t per_chunk = norm::sites_per_chunk(p.g.channels);
  p.first_chunk.resize(p.g.batch + 1);
  int64_t first = 0;
  for (int64_t n = 0; n < p.g.batch; ++n) {
    const int64_t end = std::lower_bound(sites, sites + p.count(), (n + 1) * p.g.plane) - sites;
    p.first_chunk[n] = chunk_count(p.bounds);
    append_chunks(first, end, per_chunk, p.bounds);
    first = end;
  }
  p.first_chunk[p.g.batch] = chunk_count(p.bounds);
  return p;
}

// A (N, C) per-(image, channel) vector in x's accumulation dtype.
at::Tensor checked_image_vector(const at::Tensor& t, const char* name, const Prepared& p, const at::Tensor& x,
                                const char* op) {
  const auto acc = accumulation_type(x.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == p.g.batch && t.size(1) == p.g.channels, op, ": ", name,
              " must have shape (", p.g.batch, ", ", p.g.channels, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have dtype ", acc, " (the accumulation dtype of ",
              x.scalar_type(), " inputs), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  return t.contiguous();
}

at::Tensor stats_output(const Prepared& p) {
  return at::empty({p.g.batch, 2, p.g.channels}, p.x.options().dtype(at::kDouble));
}

at::Tensor masked_gn_stats(const at::Tensor& x_in, const at::Tensor& index_in) {
  constexpr const char* op = "masked_gn_stats";
  const Prepared p = prepare(x_in, index_in, op);
  at::Tensor out = stats_output(p);
  double* result = out.data_ptr<double>();
  SK_CPU_DISPATCH(p.x.scalar_type(), op, [&] {
    const auto* x = data_as<storage_t<scalar_t>>(p.x);
    auto value = [=](int64_t off) { return static_cast<double>(x[off]); };
    const ChunkMoments moments = p.g.rows ? chunk_moments<true>(p.g, p.index_data(), p.bounds, value)
                                          : chunk_moments<false>(p.g, p.index_data(), p.bounds, value);
    for (int64_t n = 0; n < p.g.batch; ++n) {
      merge_chunk_moments(moments, p.bounds, p.first_chunk[n], p.first_chunk[n + 1], p.g.channels,
                          result + n * 2 * p.g.channels);
    }
  });
  return out;
}

at::Tensor masked_gn_backward_stats(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& center_in) {
  constexpr const char* op = "masked_gn_backward_stats";
  const Prepared p = prepare(x_in, index_in, op);
  check_like_x(grad_out_in, "grad_out", x_in, op);
  const at::Tensor center_t = checked_image_vector(center_in, "center", p, x_in, op);
  const at::Tensor grad_out = to_kernel_layout(grad_out_in, p.x);
  at::Tensor out = stats_output(p);
  double* result = out.data_ptr<double>();
  SK_CPU_DISPATCH(p.x.scalar_type(), op, [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const auto* x = data_as<storage_t<scalar_t>>(p.x);
    const auto* dy = data_as<storage_t<scalar_t>>(grad_out);
    const acc_t* center = center_t.const_data_ptr<acc_t>();
    const int32_t* index = p.index_data();
    const int64_t channels = p.g.channels, plane = p.g.plane;
    const norm::BnBackwardTerms<double> terms;
    auto term = [=](int64_t j, int64_t off, int64_t c, double& a, double& b) {
      const int64_t image = index[j] / plane;
      terms(static_cast<double>(dy[off]), static_cast<double>(x[off]), static_cast<double>(center[image * channels + c]),
            a, b);
    };
    const std::vector<double> partials = p.g.rows ? chunk_sums<true>(p.g, index, p.bounds, term)
                                                  : chunk_sums<false>(p.g, index, p.bounds, term);
    for (int64_t n = 0; n < p.g.batch; ++n) {
      combine_chunk_sums(partials, p.first_chunk[n], p.first_chunk[n + 1], channels, result + n * 2 * channels);
    }
  });
  return out;
}

at::Tensor masked_gn_elemt(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& center_in,
                           const at::Tensor& scale_in, const at::Tensor& shift_in) {
  constexpr const char* op = "masked_gn_elemt";
  const Prepared p = prepare(x_in, index_in, op);
  const at::Tensor center_t = checked_image_vector(center_in, "center", p, x_in, op);
  const at::Tensor scale_t = checked_image_vector(scale_in, "scale", p, x_in, op);
  const at::Tensor shift_t = checked_image_vector(shift_in, "shift", p, x_in, op);
  at::Tensor out;
  SK_CPU_DISPATCH(p.x.scalar_type(), op, [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    using T = storage_t<scalar_t>;
    const T* x = data_as<T>(p.x);
    const acc_t* center = center_t.const_data_ptr<acc_t>();
    const acc_t* scale = scale_t.const_data_ptr<acc_t>();
    const acc_t* shift = shift_t.const_data_ptr<acc_t>();
    const int64_t channels = p.g.channels;
    out = dense_map<T>(p.x, p.g, p.index_data(), p.count(), [=](int64_t off, int64_t c, int64_t n) {
      const int64_t v = n * channels + c;
      return static_cast<T>(norm::gn_affine<acc_t>(x[off], center[v], scale[v], shift[v]));
    });
  });
  return out;
}

at::Tensor masked_gn_backward_elemt(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& center_in, const at::Tensor& a_in, const at::Tensor& b_in,
                                    const at::Tensor& d_in) {
  constexpr const char* op = "masked_gn_backward_elemt";
  const Prepared p = prepare(x_in, index_in, op);
  check_like_x(grad_out_in, "grad_out", x_in, op);
  const at::Tensor center_t = checked_image_vector(center_in, "center", p, x_in, op);
  const at::Tensor a_t = checked_image_vector(a_in, "a", p, x_in, op);
  const at::Tensor b_t = checked_image_vector(b_in, "b", p, x_in, op);
  const at::Tensor d_t = checked_image_vector(d_in, "d", p, x_in, op);
  const at::Tensor grad_out = to_kernel_layout(grad_out_in, p.x);
  at::Tensor out;
  SK_CPU_DISPATCH(p.x.scalar_type(), op, [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    using T = storage_t<scalar_t>;
    const T* x = data_as<T>(p.x);
    const T* dy = data_as<T>(grad_out);
    const acc_t* center = center_t.const_data_ptr<acc_t>();
    const acc_t* a = a_t.const_data_ptr<acc_t>();
    const acc_t* b = b_t.const_data_ptr<acc_t>();
    const acc_t* d = d_t.const_data_ptr<acc_t>();
    const int64_t channels = p.g.channels;
    out = dense_map<T>(p.x, p.g, p.index_data(), p.count(), [=](int64_t off, int64_t c, int64_t n) {
      const int64_t v = n * channels + c;
      return static_cast<T>(norm::gn_backward_elem<acc_t>(dy[off], x[off], center[v], a[v], b[v], d[v]));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spark_kernels, CPU, m) {
  m.impl("masked_gn_stats", &masked_gn_stats);
  m.impl("masked_gn_backward_stats", &masked_gn_backward_stats);
  m.impl("masked_gn_elemt", &masked_gn_elemt);
  m.impl("masked_gn_backward_elemt", &masked_gn_backward_elemt);
}

}  // namespace spark_kernels::cpu
