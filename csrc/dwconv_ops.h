#pragma once
// Host code of the dwconv ops, shared by the CPU (csrc/cpu/dwconv.cpp) and CUDA (csrc/cuda/dwconv.cu)
// registrations: argument checks, geometry, device guard, dtype and kernel-size dispatch, registration.
// The per-key files hold the kernels, forward_impl<scalar_t, K> and backward_impl<scalar_t, K> in their
// anonymous namespace (signatures: csrc/cpu/dwconv.cpp), and SK_REGISTER_DWCONV(key, backend) after it.
// The Python wrapper validates first; these checks keep the ops safe when called directly
// (torch.ops.spark_kernels.*).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/dispatch.h"
#include "common/layout.h"

namespace spark_kernels {

struct DwconvGeometry {
  int64_t n, c, h, w, m;
  int k;
  bool rows;  // channels_last "rows" layout, else NCHW "planes" (common/layout.h)
  int64_t sites() const { return n * h * w; }
  int64_t plane() const { return h * w; }
  at::MemoryFormat memory_format() const { return rows ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }
};

template <typename Backend>
DwconvGeometry check_dwconv_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& index,
                                 const at::Tensor& neighbors) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D tensor (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(Backend::Dtypes::contains(x.scalar_type()), op, ": x must be ", Backend::Dtypes::names(), " on the ",
              Backend::name, " backend, got ", x.scalar_type());
  TORCH_CHECK(x.device().type() == Backend::device, op, ": x must be a ", c10::DeviceTypeName(Backend::device),
              " tensor on the ", Backend::name, " backend, got device ", x.device());
  const at::Device device = x.device();
  const int64_t c = x.size(1);
  TORCH_CHECK(weight.device() == device, op, ": weight must be on x's device ", device, ", got ", weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              op, ": weight must have shape (C, 1, k, k) with C = ", c, ", got ", weight.sizes());
  const int64_t k = weight.size(2);
  TORCH_CHECK(DwconvKernelSizes::contains(k), op, ": weight: kernel size must be ", DwconvKernelSizes::names(),
              ", got ", k);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == device, op, ": bias must be on x's device ", device, ", got ", bias->device());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(), ", got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c, op, ": bias must have shape (", c, ",), got ", bias->sizes());
  }
  TORCH_CHECK(index.device() == device && neighbors.device() == device, op,
              ": index and neighbors must be on x's device ", device, ", got ", index.device(), " and ",
              neighbors.device());
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1, op, ": index must be a 1-D int32 tensor, got ",
              index.scalar_type(), " of shape ", index.sizes());
  TORCH_CHECK(neighbors.scalar_type() == at::kInt && neighbors.dim() == 2, op,
              ": neighbors must be a 2-D int32 tensor, got ", neighbors.scalar_type(), " of shape ", neighbors.sizes());
  TORCH_CHECK(neighbors.size(0) == index.size(0) && neighbors.size(1) == k * k, op,
              ": neighbors must have shape (M, k*k) = (", index.size(0), ", ", k * k, ") for index of length ",
              index.size(0), " and kernel size ", k, ", got ", neighbors.sizes());
  const int64_t sites = x.size(0) * x.size(2) * x.size(3);
  TORCH_CHECK(sites <= std::numeric_limits<int32_t>::max(), op, ": x has ", sites,
              " sites (N*H*W), more than int32 site numbers can address");
  TORCH_CHECK(index.size(0) <= sites, op, ": index has ", index.size(0), " entries but x has only ", sites, " sites");
  return DwconvGeometry{x.size(0), c, x.size(2), x.size(3), index.size(0), static_cast<int>(k),
                        uses_rows(x.sizes().data(), x.strides().data())};
}

inline void check_dwconv_grad_out(const char* backend, const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.device() == x.device(), "dwconv_backward: grad_out must be on x's device ", x.device(),
              ", got ", grad_out.device(), " (", backend, " backend)");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "dwconv_backward: grad_out must have x's dtype ",
              x.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "dwconv_backward: grad_out must have x's shape ", x.sizes(), ", got ",
              grad_out.sizes());
}

// The ops, for the per-key Kernels of SK_REGISTER_DWCONV: checks, then the kernels of x's dtype and the
// weight's kernel size.
template <typename Kernels>
at::Tensor dwconv_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& index, const at::Tensor& neighbors) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "dwconv_forward";
  const DwconvGeometry g = check_dwconv_args<Backend>(op, x, weight, bias, index, neighbors);
  const c10::DeviceGuard guard(x.device());
  return Backend::Dtypes::dispatch(x.scalar_type(), op, [&](auto dtype) {
    return DwconvKernelSizes::dispatch(g.k, op, [&](auto k) {
      return Kernels::template forward<decltype(dtype), decltype(k)::value>(x, weight, bias, index, neighbors, g);
    });
  });
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                               const at::Tensor& weight, const at::Tensor& index,
                                                               const at::Tensor& neighbors) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "dwconv_backward";
  const DwconvGeometry g = check_dwconv_args<Backend>(op, x, weight, c10::nullopt, index, neighbors);
  check_dwconv_grad_out(Backend::name, grad_out, x);
  const c10::DeviceGuard guard(x.device());
  return Backend::Dtypes::dispatch(x.scalar_type(), op, [&](auto dtype) {
    return DwconvKernelSizes::dispatch(g.k, op, [&](auto k) {
      return Kernels::template backward<decltype(dtype), decltype(k)::value>(grad_out, x, weight, index, neighbors,
                                                                             g);
    });
  });
}

}  // namespace spark_kernels

// Registers the per-key file's forward_impl / backward_impl (found in its anonymous namespace) as the dwconv
// ops of BACKEND (common/dispatch.h) under dispatch key KEY (CPU or CUDA).
#define SK_REGISTER_DWCONV(KEY, BACKEND)                                                                     \
  namespace {                                                                                                \
  struct DwconvKernels {                                                                                     \
    using Backend = BACKEND;                                                                                 \
    template <typename scalar_t, int K>                                                                      \
    static constexpr auto forward = &forward_impl<scalar_t, K>;                                              \
    template <typename scalar_t, int K>                                                                      \
    static constexpr auto backward = &backward_impl<scalar_t, K>;                                            \
  };                                                                                                         \
  }                                                                                                          \
  TORCH_LIBRARY_IMPL(spark_kernels, KEY, m) {                                                                \
    m.impl("dwconv_forward", &::spark_kernels::dwconv_forward<DwconvKernels>);                               \
    m.impl("dwconv_backward", &::spark_kernels::dwconv_backward<DwconvKernels>);                             \
  }
