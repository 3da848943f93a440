#pragma once
// Argument checks, geometry and kernel-size dispatch of the dwconv ops, shared by the CPU
// (csrc/cpu/dwconv.cpp) and CUDA (csrc/cuda/dwconv.cu) kernels. The Python wrapper validates first;
// these checks keep the ops safe when called directly (torch.ops.spark_kernels.*).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/layout.h"

namespace spark_kernels {

// The strides the ops take (the tables carry the stride: kernels never branch on it); the kernel sizes
// are those of dispatch_kernel_size below. spark_kernels/depthwise_conv.py lists the same sets.
constexpr int64_t kDwconvStrides[] = {1, 2};

// f(std::integral_constant<int, K>{}) for the kernel size k: the one place where a runtime k becomes a
// template argument, so an unsupported k never reaches a template.
template <typename F>
auto dispatch_kernel_size(const char* op, int64_t k, F&& f) {
  if (k == 3) return f(std::integral_constant<int, 3>{});
  if (k == 5) return f(std::integral_constant<int, 5>{});
  TORCH_CHECK(k == 7, op, ": weight: kernel size must be 3, 5 or 7, got ", k);
  return f(std::integral_constant<int, 7>{});
}

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
  // The dense output (or grad_out) shape.
  std::vector<int64_t> out_shape() const { return {n, c, out_h, out_w}; }
};

// nn.Conv2d's output size for padding k//2: (size + 2*(k//2) - k) / stride + 1 = ceil(size / stride).
inline int64_t dwconv_out_size(int64_t size, int64_t stride) { return size == 0 ? 0 : (size - 1) / stride + 1; }

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

// dtypes: the dtypes this backend takes, named in `dtype_names` for the message.
inline DwconvGeometry check_dwconv_args(const char* op, const char* backend, std::initializer_list<at::ScalarType> dtypes,
                                        const char* dtype_names, at::DeviceType device_type, const at::Tensor& x,
                                        const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                        const at::Tensor& index, const at::Tensor& neighbors, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D tensor (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(std::find(dtypes.begin(), dtypes.end(), x.scalar_type()) != dtypes.end(), op, ": x must be ",
              dtype_names, " on the ", backend, " backend, got ", x.scalar_type());
  TORCH_CHECK(x.device().type() == device_type, op, ": x must be a ", c10::DeviceTypeName(device_type),
              " tensor on the ", backend, " backend, got device ", x.device());
  TORCH_CHECK(std::find(std::begin(kDwconvStrides), std::end(kDwconvStrides), stride) != std::end(kDwconvStrides), op,
              ": stride must be 1 or 2, got ", stride);
  const at::Device device = x.device();
  const int64_t c = x.size(1);
  TORCH_CHECK(weight.device() == device, op, ": weight must be on x's device ", device, ", got ", weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == c && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              op, ": weight must have shape (C, 1, k, k) with C = ", c, ", got ", weight.sizes());
  const int64_t k = weight.size(2);
  dispatch_kernel_size(op, k, [](auto) {});  // refuses an unsupported k here, before any table check names k
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

}  // namespace spark_kernels
