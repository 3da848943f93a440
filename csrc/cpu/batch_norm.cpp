// Masked BatchNorm primitives on the CPU (schemas and conventions: csrc/ops.cpp). The autograd function
// in spark_kernels/batch_norm.py composes them; per-channel arithmetic between them happens there.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/dtypes.h"
#include "cpu/norm_cpu.h"

namespace spark_kernels::cpu {
namespace {

// x (and grad_out) in the kernel layout, the geometry, and the validated index.
struct Prepared {
  at::Tensor x, index;
  NormGeometry g;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& index, const char* op) {
  check_norm_input(x, op, c10::DeviceType::CPU, {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16});
  check_index(index, x, op);
  Prepared p{to_kernel_layout(x, x), index.contiguous(), {}};
  p.g = NormGeometry::of(p.x);
  check_index_values(p.index.data_ptr<int32_t>(), p.index.numel(), p.g.sites(), op);
  return p;
}

at::Tensor stats_output(const Prepared& p) {
  return at::empty({2, p.g.channels}, p.x.options().dtype(at::kDouble));
}

at::Tensor masked_bn_stats(const at::Tensor& x_in, const at::Tensor& index_in) {
  constexpr const char* op = "masked_bn_stats";
  const Prepared p = prepare(x_in, index_in, op);
  at::Tensor out = stats_output(p);
  SK_CPU_DISPATCH(p.x.scalar_type(), op, [&] {
    const auto* x = data_as<storage_t<scalar_t>>(p.x);
    auto value = [=](int64_t off) { return static_cast<double>(x[off]); };
    if (p.g.rows) {
      channel_moments<true>(p.g, p.index.const_data_ptr<int32_t>(), p.index.numel(), value, out.data_ptr<double>());
    } else {
      channel_moments<false>(p.g, p.index.const_data_ptr<int32_t>(), p.index.numel(), value, out.data_ptr<double>());
    }
  });
  return out;
}

at::Tensor masked_bn_backward_stats(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& mean_in) {
  constexpr const char* op = "masked_bn_backward_stats";
  const Prepared p = prepare(x_in, index_in, op);
  check_like_x(grad_out_in, "grad_out", x_in, op);
  check_vector(mean_in, "mean", p.g.channels, x_in, op);
  const at::Tensor grad_out = to_kernel_layout(grad_out_in, p.x);
  const at::Tensor mean_t = mean_in.contiguous();
  at::Tensor out = stats_output(p);
  SK_CPU_DISPATCH(p.x.scalar_type(), op, [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const auto* x = data_as<storage_t<scalar_t>>(p.x);
    const auto* dy = data_as<storage_t<scalar_t>>(grad_out);
    const acc_t* mean = mean_t.const_data_ptr<acc_t>();
    const norm::BnBackwardTerms<double> terms;
    auto term = [=](int64_t, int64_t off, int64_t c, double& a, double& b) {
      terms(static_cast<double>(dy[off]), static_cast<double>(x[off]), static_cast<double>(mean[c]), a, b);
    };
    if (p.g.rows) {
      channel_sums<true>(p.g, p.index.const_data_ptr<int32_t>(), p.index.numel(), term, out.data_ptr<double>());
    } else {
      channel_sums<false>(p.g, p.index.const_data_ptr<int32_t>(), p.index.numel(), term, out.data_ptr<double>());
    }
  });
  return out;
}

// out = elem(offset, c) at active sites, 0 elsewhere, in x's kernel layout; T: the storage type.
template <typename T, typename Elem>
at::Tensor dense_map(const Prepared& p, const Elem& elem) {
  return cpu::dense_map<T>(p.x, p.g, p.index.const_data_ptr<int32_t>(), p.index.numel(),
                           [&](int64_t off, int64_t c, int64_t) { return elem(off, c); });
}

at::Tensor masked_bn_elemt(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& scale_in,
                           const at::Tensor& shift_in) {
  constexpr const char* op = "masked_bn_elemt";
  const Prepared p = prepare(x_in, index_in, op);
  check_vector(scale_in, "scale", p.g.channels, x_in, op);
  check_vector(shift_in, "shift", p.g.channels, x_in, op);
  const at::Tensor scale_t = scale_in.contiguous(), shift_t = shift_in.contiguous();
  at::Tensor out;
  SK_CPU_DISPATCH(p.x.scalar_type(), op, [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const auto* x = data_as<storage_t<scalar_t>>(p.x);
    const acc_t* scale = scale_t.const_data_ptr<acc_t>();
    const acc_t* shift = shift_t.const_data_ptr<acc_t>();
    out = dense_map<storage_t<scalar_t>>(p, [=](int64_t off, int64_t c) {
      return static_cast<storage_t<scalar_t>>(norm::bn_affine<acc_t>(x[off], scale[c], shift[c]));
    });
  });
  return out;
}

at::Tensor masked_bn_backward_elemt(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& d_in) {
  constexpr const char* op = "masked_bn_backward_elemt";
  const Prepared p = prepare(x_in, index_in, op);
  check_like_x(grad_out_in, "grad_out", x_in, op);
  check_vector(a_in, "a", p.g.channels, x_in, op);
  check_vector(b_in, "b", p.g.channels, x_in, op);
  check_vector(d_in, "d", p.g.channels, x_in, op);
  const at::Tensor grad_out = to_kernel_layout(grad_out_in, p.x);
  const at::Tensor a_t = a_in.contiguous(), b_t = b_in.contiguous(), d_t = d_in.contiguous();
  at::Tensor out;
  SK_CPU_DISPATCH(p.x.scalar_type(), op, [&] {
    using acc_t = cpu::acc_t<scalar_t>;
    const auto* x = data_as<storage_t<scalar_t>>(p.x);
    const auto* dy = data_as<storage_t<scalar_t>>(grad_out);
    const acc_t* a = a_t.const_data_ptr<acc_t>();
    const acc_t* b = b_t.const_data_ptr<acc_t>();
    const acc_t* d = d_t.const_data_ptr<acc_t>();
    out = dense_map<storage_t<scalar_t>>(p, [=](int64_t off, int64_t c) {
      return static_cast<storage_t<scalar_t>>(norm::bn_backward_elem<acc_t>(dy[off], x[off], a[c], b[c], d[c]));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spark_kernels, CPU, m) {
  m.impl("masked_bn_stats", &masked_bn_stats);
  m.impl("masked_bn_backward_stats", &masked_bn_backward_stats);
  m.impl("masked_bn_elemt", &masked_bn_elemt);
  m.impl("masked_bn_backward_elemt", &masked_bn_backward_elemt);
}

}  // namespace spark_kernels::cpu
