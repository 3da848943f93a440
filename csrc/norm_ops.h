#pragma once
// Host code of the masked-norm ops (schemas: spark_kernels/_registry.py), shared by the CPU
// (csrc/cpu/{batch_norm,layer_norm,group_norm}.cpp) and CUDA (csrc/cuda/{batch_norm,layer_norm,group_norm}.cu)
// registrations:
// argument checks, layout preparation, output allocation, device guard and dtype dispatch. The per-key
// files hold the kernels and a struct naming them (Backend plus the primitives below, templated on
// scalar_t), as ATen's DispatchStub separates host code from per-device kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/dispatch.h"
#include "common/norm_checks.h"

namespace spark_kernels {

// -- Backward inputs. Two forms avoid a dense pass before the kernels where the Kernels struct says it reads them
// (static constexpr bool reads_compact_x / reads_any_grad_layout; absent = false, and the host builds the dense
// form itself):
// - x as the compact (M, C) rows of the active sites of a channels_last input, in index order (what the autograd
//   functions keep for backward, at the active fraction of x's memory), with grad_out giving the dense shape;
// - grad_out with every stride 0 (an expanded scalar: what y.sum().backward() passes), read as its one value, or
//   dense in the other layout than x's (common/norm_checks.h, GradLayout), read in place.

template <typename K, typename = void>
struct ReadsCompactX : std::false_type {};
template <typename K>
struct ReadsCompactX<K, std::void_t<decltype(K::reads_compact_x)>> : std::bool_constant<K::reads_compact_x> {};

template <typename K, typename = void>
struct ReadsAnyGradLayout : std::false_type {};
template <typename K>
struct ReadsAnyGradLayout<K, std::void_t<decltype(K::reads_any_grad_layout)>>
    : std::bool_constant<K::reads_any_grad_layout> {};

// The backward ops' x and grad_out: x dense (N, C, H, W), or compact rows (M, C) (see above) when allow_compact.
template <typename Kernels>
std::pair<NormArgs, at::Tensor> prepare_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                 const at::Tensor& index_in, const char* op,
                                                 bool allow_compact = true) {
  using Backend = typename Kernels::Backend;
  at::Tensor x_dense = x_in;
  bool compact = false;
  if (allow_compact && x_in.dim() == 2) {
    check_norm_input<Backend>(grad_out_in, op);  // the dense shape comes from grad_out
    TORCH_CHECK(x_in.scalar_type() == grad_out_in.scalar_type(), op, ": x must have grad_out's dtype ",
                grad_out_in.scalar_type(), ", got ", x_in.scalar_type());
    TORCH_CHECK(x_in.device() == grad_out_in.device(), op, ": x is on ", x_in.device(), " but grad_out is on ",
                grad_out_in.device());
    check_index(index_in, grad_out_in, op);
    TORCH_CHECK(x_in.size(0) == index_in.numel() && x_in.size(1) == grad_out_in.size(1), op,
                ": x given as the rows of the active sites must have shape (", index_in.numel(), ", ",
                grad_out_in.size(1), ") (index entries, grad_out's channels), got ", x_in.sizes());
    if constexpr (ReadsCompactX<Kernels>::value) {
      compact = true;
    } else {  // rebuild the channels_last tensor; the kernels never read its inactive sites
      x_dense = at::empty(grad_out_in.sizes(), x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
      x_dense.permute({0, 2, 3, 1}).reshape({-1, x_in.size(1)}).index_copy_(0, index_in.to(at::kLong), x_in);
    }
  }
  NormArgs p;
  if (compact) {
    p.x = x_in.contiguous();
    p.index = index_in.contiguous();
    for (int d = 0; d < 4; ++d) p.sizes[d] = grad_out_in.size(d);
    p.g = {p.sizes[0], p.sizes[1], p.sizes[2] * p.sizes[3], true};
    p.compact = true;
    if constexpr (Backend::validates_index) {
      check_index_values(p.index.const_data_ptr<int32_t>(), p.index.numel(), p.g.sites(), op);
    }
  } else {
    p = prepare_norm<Backend>(x_dense, index_in, op);
    check_like_x(grad_out_in, "grad_out", x_dense, op);
  }
  const GradLayout layout = grad_layout(grad_out_in, p.g.rows);
  const bool keep = layout == GradLayout::kSame ||
                    (ReadsAnyGradLayout<Kernels>::value && layout != GradLayout::kNeither);
  at::Tensor grad_out = keep ? grad_out_in
                             : grad_out_in.contiguous(p.g.rows ? at::MemoryFormat::ChannelsLast
                                                               : at::MemoryFormat::Contiguous);
  return {std::move(p), std::move(grad_out)};
}

// -- BatchNorm: Kernels::bn_stats<scalar_t>(p, out), bn_backward_stats<scalar_t>(p, grad_out, mean, out)
// write (2, C) float64 sums into out; bn_elemt<scalar_t>(p, scale, shift) and
// bn_backward_elemt<scalar_t>(p, grad_out, a, b, d) return the dense output in x's kernel layout.

template <typename Kernels>
at::Tensor masked_bn_stats(const at::Tensor& x_in, const at::Tensor& index_in) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_bn_stats";
  const NormArgs p = prepare_norm<Backend>(x_in, index_in, op);
  const c10::DeviceGuard guard(p.x.device());
  at::Tensor out = at::empty({2, p.g.channels}, p.x.options().dtype(at::kDouble));
  Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    Kernels::template bn_stats<decltype(dtype)>(p, out);
  });
  return out;
}

template <typename Kernels>
at::Tensor masked_bn_backward_stats(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& mean_in) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_bn_backward_stats";
  const auto prepared = prepare_backward<Kernels>(grad_out_in, x_in, index_in, op);
  const NormArgs& p = prepared.first;
  const at::Tensor& grad_out = prepared.second;
  check_vector(mean_in, "mean", p.g.channels, x_in, op);
  const c10::DeviceGuard guard(p.x.device());
  const at::Tensor mean = mean_in.contiguous();
  at::Tensor out = at::empty({2, p.g.channels}, p.x.options().dtype(at::kDouble));
  Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    Kernels::template bn_backward_stats<decltype(dtype)>(p, grad_out, mean, out);
  });
  return out;
}

template <typename Kernels>
at::Tensor masked_bn_elemt(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& scale_in,
                           const at::Tensor& shift_in) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_bn_elemt";
  const NormArgs p = prepare_norm<Backend>(x_in, index_in, op);
  check_vector(scale_in, "scale", p.g.channels, x_in, op);
  check_vector(shift_in, "shift", p.g.channels, x_in, op);
  const c10::DeviceGuard guard(p.x.device());
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  return Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    return Kernels::template bn_elemt<decltype(dtype)>(p, scale, shift);
  });
}

template <typename Kernels>
at::Tensor masked_bn_backward_elemt(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& d_in) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_bn_backward_elemt";
  const auto prepared = prepare_backward<Kernels>(grad_out_in, x_in, index_in, op);
  const NormArgs& p = prepared.first;
  const at::Tensor& grad_out = prepared.second;
  check_vector(a_in, "a", p.g.channels, x_in, op);
  check_vector(b_in, "b", p.g.channels, x_in, op);
  check_vector(d_in, "d", p.g.channels, x_in, op);
  const c10::DeviceGuard guard(p.x.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), d = d_in.contiguous();
  return Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    return Kernels::template bn_backward_elemt<decltype(dtype)>(p, grad_out, a, b, d);
  });
}

// -- LayerNorm: Kernels::ln_forward<scalar_t>(p, weight, bias, eps, mean, rstd) returns y and fills the
// per-site mean and rstd; ln_backward<scalar_t>(p, grad_out, weight, mean, rstd, grad_weight, grad_bias)
// returns grad_x and fills the parameter gradients. Both see at least one active site; weight and bias
// are contiguous in the accumulation dtype, or absent.

// An optional (C,) parameter, checked and made contiguous.
inline std::optional<at::Tensor> checked_param(const std::optional<at::Tensor>& t, const char* name,
                                               const at::Tensor& x, const char* op) {
  if (!t.has_value()) return std::nullopt;
  check_vector(*t, name, x.size(1), x, op);
  return t->contiguous();
}

template <typename Backend>
NormArgs prepare_layer_norm(const at::Tensor& x, const at::Tensor& index, const char* op) {
  TORCH_CHECK(x.dim() != 4 || x.size(1) > 0, op, ": x must have at least one channel");
  return prepare_norm<Backend>(x, index, op);
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_ln_forward(const at::Tensor& x_in, const at::Tensor& index_in,
                                                                 const std::optional<at::Tensor>& weight_in,
                                                                 const std::optional<at::Tensor>& bias_in,
                                                                 double eps) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_ln_forward";
  const NormArgs p = prepare_layer_norm<Backend>(x_in, index_in, op);
  const auto weight = checked_param(weight_in, "weight", x_in, op);
  const auto bias = checked_param(bias_in, "bias", x_in, op);
  const c10::DeviceGuard guard(p.x.device());
  const int64_t count = p.index.numel();
  const auto acc_options = p.x.options().dtype(accumulation_type(p.x.scalar_type()));
  at::Tensor mean = at::empty({count}, acc_options), rstd = at::empty({count}, acc_options);
  if (count == 0) return {at::zeros_like(p.x, kernel_memory_format(p.x)), mean, rstd};
  at::Tensor y = Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    return Kernels::template ln_forward<decltype(dtype)>(p, weight, bias, eps, mean, rstd);
  });
  return {y, mean, rstd};
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_ln_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                                  const at::Tensor& index_in,
                                                                  const std::optional<at::Tensor>& weight_in,
                                                                  const at::Tensor& mean_in, const at::Tensor& rstd_in) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_ln_backward";
  TORCH_CHECK(x_in.dim() != 4 || x_in.size(1) > 0, op, ": x must have at least one channel");
  const auto prepared = prepare_backward<Kernels>(grad_out_in, x_in, index_in, op, /*allow_compact=*/false);
  const NormArgs& p = prepared.first;
  const at::Tensor& grad_out = prepared.second;
  const auto weight = checked_param(weight_in, "weight", x_in, op);
  check_vector(mean_in, "mean", index_in.numel(), x_in, op);
  check_vector(rstd_in, "rstd", index_in.numel(), x_in, op);
  const c10::DeviceGuard guard(p.x.device());
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const auto acc_options = p.x.options().dtype(accumulation_type(p.x.scalar_type()));
  if (p.index.numel() == 0) {
    return {at::zeros_like(p.x, kernel_memory_format(p.x)), at::zeros({p.g.channels}, acc_options),
            at::zeros({p.g.channels}, acc_options)};
  }
  at::Tensor grad_weight = at::empty({p.g.channels}, acc_options), grad_bias = at::empty({p.g.channels}, acc_options);
  at::Tensor grad_x = Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    return Kernels::template ln_backward<decltype(dtype)>(p, grad_out, weight, mean, rstd, grad_weight, grad_bias);
  });
  return {grad_x, grad_weight, grad_bias};
}

// -- GroupNorm: per-(image, channel) statistics and affine maps. Kernels::gn_stats<scalar_t>(p, out) and
// gn_backward_stats<scalar_t>(p, grad_out, center, out) write (N, 2, C) float64 into out (sums over each
// image's active sites); gn_elemt<scalar_t>(p, center, scale, shift) and
// gn_backward_elemt<scalar_t>(p, grad_out, center, a, b, d) return the dense output in x's kernel layout.
// Every coefficient table is (N, C), contiguous, in the accumulation dtype.

// A (N, C) per-(image, channel) table in x's accumulation dtype on x's device, made contiguous.
inline at::Tensor checked_image_table(const at::Tensor& t, const char* name, const NormArgs& p, const at::Tensor& x,
                                      const char* op) {
  const auto acc = accumulation_type(x.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == p.g.batch && t.size(1) == p.g.channels, op, ": ", name,
              " must have shape (", p.g.batch, ", ", p.g.channels, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have dtype ", acc, " (the accumulation dtype of ",
              x.scalar_type(), " inputs), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  return t.contiguous();
}

template <typename Kernels>
at::Tensor masked_gn_stats(const at::Tensor& x_in, const at::Tensor& index_in) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_gn_stats";
  const NormArgs p = prepare_norm<Backend>(x_in, index_in, op);
  const c10::DeviceGuard guard(p.x.device());
  at::Tensor out = at::empty({p.g.batch, 2, p.g.channels}, p.x.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    Kernels::template gn_stats<decltype(dtype)>(p, out);
  });
  return out;
}

template <typename Kernels>
at::Tensor masked_gn_backward_stats(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& center_in) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_gn_backward_stats";
  const auto prepared = prepare_backward<Kernels>(grad_out_in, x_in, index_in, op);
  const NormArgs& p = prepared.first;
  const at::Tensor& grad_out = prepared.second;
  const at::Tensor center = checked_image_table(center_in, "center", p, x_in, op);
  const c10::DeviceGuard guard(p.x.device());
  at::Tensor out = at::empty({p.g.batch, 2, p.g.channels}, p.x.options().dtype(at::kDouble));
  if (out.numel() == 0) return out;
  Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    Kernels::template gn_backward_stats<decltype(dtype)>(p, grad_out, center, out);
  });
  return out;
}

template <typename Kernels>
at::Tensor masked_gn_elemt(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& center_in,
                           const at::Tensor& scale_in, const at::Tensor& shift_in) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_gn_elemt";
  const NormArgs p = prepare_norm<Backend>(x_in, index_in, op);
  const at::Tensor center = checked_image_table(center_in, "center", p, x_in, op);
  const at::Tensor scale = checked_image_table(scale_in, "scale", p, x_in, op);
  const at::Tensor shift = checked_image_table(shift_in, "shift", p, x_in, op);
  const c10::DeviceGuard guard(p.x.device());
  return Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    return Kernels::template gn_elemt<decltype(dtype)>(p, center, scale, shift);
  });
}

template <typename Kernels>
at::Tensor masked_gn_backward_elemt(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& center_in, const at::Tensor& a_in, const at::Tensor& b_in,
                                    const at::Tensor& d_in) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "masked_gn_backward_elemt";
  const auto prepared = prepare_backward<Kernels>(grad_out_in, x_in, index_in, op);
  const NormArgs& p = prepared.first;
  const at::Tensor& grad_out = prepared.second;
  const at::Tensor center = checked_image_table(center_in, "center", p, x_in, op);
  const at::Tensor a = checked_image_table(a_in, "a", p, x_in, op);
  const at::Tensor b = checked_image_table(b_in, "b", p, x_in, op);
  const at::Tensor d = checked_image_table(d_in, "d", p, x_in, op);
  const c10::DeviceGuard guard(p.x.device());
  return Backend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    return Kernels::template gn_backward_elemt<decltype(dtype)>(p, grad_out, center, a, b, d);
  });
}

}  // namespace spark_kernels

// Register the BatchNorm / LayerNorm ops of a per-key Kernels struct under dispatch key KEY (CPU or CUDA).
#define SK_REGISTER_BATCH_NORM(KEY, KERNELS)                                                         \
  TORCH_LIBRARY_IMPL(spark_kernels, KEY, m) {                                                        \
    m.impl("masked_bn_stats", &::spark_kernels::masked_bn_stats<KERNELS>);                           \
    m.impl("masked_bn_backward_stats", &::spark_kernels::masked_bn_backward_stats<KERNELS>);         \
    m.impl("masked_bn_elemt", &::spark_kernels::masked_bn_elemt<KERNELS>);                           \
    m.impl("masked_bn_backward_elemt", &::spark_kernels::masked_bn_backward_elemt<KERNELS>);         \
  }

#define SK_REGISTER_LAYER_NORM(KEY, KERNELS)                                                         \
  TORCH_LIBRARY_IMPL(spark_kernels, KEY, m) {                                                        \
    m.impl("masked_ln_forward", &::spark_kernels::masked_ln_forward<KERNELS>);                       \
    m.impl("masked_ln_backward", &::spark_kernels::masked_ln_backward<KERNELS>);                     \
  }

#define SK_REGISTER_GROUP_NORM(KEY, KERNELS)                                                         \
  TORCH_LIBRARY_IMPL(spark_kernels, KEY, m) {                                                        \
    m.impl("masked_gn_stats", &::spark_kernels::masked_gn_stats<KERNELS>);                           \
    m.impl("masked_gn_backward_stats", &::spark_kernels::masked_gn_backward_stats<KERNELS>);         \
    m.impl("masked_gn_elemt", &::spark_kernels::masked_gn_elemt<KERNELS>);                           \
    m.impl("masked_gn_backward_elemt", &::spark_kernels::masked_gn_backward_elemt<KERNELS>);         \
  }
