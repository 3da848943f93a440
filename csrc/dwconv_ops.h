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
#include <vector>

#include "common/dispatch.h"
#include "common/layout.h"

namespace spark_kernels {

// Input sites (n, h, w) and output sites (n, out_h, out_w) of a stride-`stride` conv with padding k//2.
struct DwconvGeometry {
  int64_t n, c, h, w, out_h, out_w;
  int64_t m;  // active output sites (entries of index)
  int k;
  int64_t stride;
  bool rows;  // channels_last "rows" layout, else NCHW "planes" (common/layout.h)
  int64_t sites() const { return n * h * w; }
  int64_t plane() const { return h * w; }
  int64_t out_sites() const { return n * out_h * out_w; }
  int64_t out_plane() const { return out_h * out_w; }
  at::MemoryFormat memory_format() const { return rows ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }
  // The dense output (and grad_out) shape.
  std::vector<int64_t> out_shape() const { return {n, c, out_h, out_w}; }
};

// nn.Conv2d's output size for padding k//2: (size + 2*(k//2) - k) / stride + 1 = ceil(size / stride).
inline int64_t dwconv_out_size(int64_t size, int64_t stride) { return size == 0 ? 0 : (size - 1) / stride + 1; }

// An index of sites and its (M, k*k) table of tap sites, on `device`, with at most max_entries entries.
inline void check_site_table(const char* op, const char* index_name, const char* table_name, const at::Tensor& index,
                             const at::Tensor& table, const at::Device device, int64_t k, int64_t max_entries,
                             const char* sites_name) {
  TORCH_CHECK(index.device() == device && table.device() == device, op, ": ", index_name, " and ", table_name,
              " must be on x's device ", device, ", got ", index.device(), " and ", table.device());
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1, op, ": ", index_name,
              " must be a 1-D int32 tensor, got ", index.scalar_type(), " of shape ", index.sizes());
  TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2, op, ": ", table_name,
              " must be a 2-D int32 tensor, got ", table.scalar_type(), " of shape ", table.sizes());
  TORCH_CHECK(table.size(0) == index.size(0) && table.size(1) == k * k, op, ": ", table_name,
              " must have shape (M, k*k) = (", index.size(0), ", ", k * k, ") for ", index_name, " of length ",
              index.size(0), " and kernel size ", k, ", got ", table.sizes());
  TORCH_CHECK(index.size(0) <= max_entries, op, ": ", index_name, " has ", index.size(0), " entries but there are only ",
              max_entries, " ", sites_name);
}

template <typename Backend>
DwconvGeometry check_dwconv_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& index,
                                 const at::Tensor& neighbors, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D tensor (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(Backend::Dtypes::contains(x.scalar_type()), op, ": x must be ", Backend::Dtypes::names(), " on the ",
              Backend::name, " backend, got ", x.scalar_type());
  TORCH_CHECK(x.device().type() == Backend::device, op, ": x must be a ", c10::DeviceTypeName(Backend::device),
              " tensor on the ", Backend::name, " backend, got device ", x.device());
  TORCH_CHECK(DwconvStrides::contains(stride), op, ": stride must be ", DwconvStrides::names(), ", got ", stride);
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
  const int64_t sites = x.size(0) * x.size(2) * x.size(3);
  TORCH_CHECK(sites <= std::numeric_limits<int32_t>::max(), op, ": x has ", sites,
              " sites (N*H*W), more than int32 site numbers can address");
  const DwconvGeometry g{x.size(0), c, x.size(2), x.size(3), dwconv_out_size(x.size(2), stride),
                         dwconv_out_size(x.size(3), stride), index.size(0), static_cast<int>(k), stride,
                         uses_rows(x.sizes().data(), x.strides().data())};
  check_site_table(op, "index", "neighbors", index, neighbors, device, k, g.out_sites(), "output sites");
  return g;
}

// grad_out has the output's shape; at stride > 1 the input gradient gathers over input_index (x's active
// sites) through input_taps (for each, the output site whose tap t reads it, or -1); at stride 1 the
// kernels use the mirrored forward table and both must be absent.
inline void check_dwconv_backward_args(const char* backend, const DwconvGeometry& g, const at::Tensor& grad_out,
                                       const at::Tensor& x, const c10::optional<at::Tensor>& input_index,
                                       const c10::optional<at::Tensor>& input_taps) {
  const char* op = "dwconv_backward";
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out must be on x's device ", x.device(), ", got ",
              grad_out.device(), " (", backend, " backend)");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have x's dtype ", x.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(g.out_shape()), op, ": grad_out must have the output's shape ",
              at::IntArrayRef(g.out_shape()), " (x ", x.sizes(), ", stride ", g.stride, "), got ", grad_out.sizes());
  if (g.stride == 1) {
    TORCH_CHECK(!input_index.has_value() && !input_taps.has_value(), op,
                ": input_index and input_taps must be None at stride 1 (the input gradient uses the mirrored "
                "neighbors)");
    return;
  }
  TORCH_CHECK(input_index.has_value() && input_taps.has_value(), op, ": input_index and input_taps are required at "
              "stride ", g.stride, " (build them with spark_kernels.ActiveSites: index and transposed_taps)");
  check_site_table(op, "input_index", "input_taps", *input_index, *input_taps, x.device(), g.k, g.sites(),
                   "input sites");
}

// The ops, for the per-key Kernels of SK_REGISTER_DWCONV: checks, then the kernels of x's dtype and the
// weight's kernel size.
template <typename Kernels>
at::Tensor dwconv_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& index, const at::Tensor& neighbors, int64_t stride) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "dwconv_forward";
  const DwconvGeometry g = check_dwconv_args<Backend>(op, x, weight, bias, index, neighbors, stride);
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
                                                               const at::Tensor& neighbors, int64_t stride,
                                                               const c10::optional<at::Tensor>& input_index,
                                                               const c10::optional<at::Tensor>& input_taps) {
  using Backend = typename Kernels::Backend;
  constexpr const char* op = "dwconv_backward";
  const DwconvGeometry g = check_dwconv_args<Backend>(op, x, weight, c10::nullopt, index, neighbors, stride);
  check_dwconv_backward_args(Backend::name, g, grad_out, x, input_index, input_taps);
  const c10::DeviceGuard guard(x.device());
  return Backend::Dtypes::dispatch(x.scalar_type(), op, [&](auto dtype) {
    return DwconvKernelSizes::dispatch(g.k, op, [&](auto k) {
      return Kernels::template backward<decltype(dtype), decltype(k)::value>(grad_out, x, weight, index, neighbors,
                                                                             input_index, input_taps, g);
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
