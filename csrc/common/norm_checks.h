// Argument checks and layout preparation shared by the CPU and CUDA masked-norm ops (host code).
// Every failure names the op and the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>

#include "common/dispatch.h"
#include "common/host_device.h"
#include "common/layout.h"

namespace spark_kernels {

// The layout rule of common/layout.h applied to a tensor, and the memory format it implies.
inline bool uses_rows(const at::Tensor& x) {
  return uses_rows(x.sizes().data(), x.strides().data());
}

inline at::MemoryFormat kernel_memory_format(const at::Tensor& x) {
  return uses_rows(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// t (same shape as like) in the layout the kernels use for like.
inline at::Tensor to_kernel_layout(const at::Tensor& t, const at::Tensor& like) {
  return t.contiguous(kernel_memory_format(like));
}

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// x: a 4-D (N, C, H, W) tensor of one of the backend's dtypes on its device type.
template <typename Backend>
void check_norm_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().type() == Backend::device, op, ": x must be a ", c10::DeviceTypeName(Backend::device),
              " tensor, got one on ", x.device());
  TORCH_CHECK(Backend::Dtypes::contains(x.scalar_type()), op, ": x has unsupported dtype ", x.scalar_type(),
              " for the ", Backend::name, " kernels (expected ", Backend::Dtypes::names(), ")");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
}

// index: (M,) int32 site numbers on x's device, at most one per site of x.
inline void check_index(const at::Tensor& index, const at::Tensor& x, const char* op) {
  TORCH_CHECK(index.scalar_type() == at::kInt, op, ": index must be int32, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 1, op, ": index must be 1-D (M,), got shape ", index.sizes());
  TORCH_CHECK(index.device() == x.device(), op, ": index is on ", index.device(), " but x is on ", x.device());
  TORCH_CHECK(index.numel() <= x.size(0) * x.size(2) * x.size(3), op, ": index has ", index.numel(),
              " entries but x has only ", x.size(0) * x.size(2) * x.size(3), " sites");
}

// Index values (sites in range, strictly ascending), read on the host before any kernel dereferences them.
inline void check_index_values(const int32_t* index, int64_t count, int64_t sites, const char* op) {
  bool ok = true;
  for (int64_t j = 0; j < count; ++j) {
    ok &= index[j] >= 0 && index[j] < sites && (j == 0 || index[j] > index[j - 1]);
  }
  TORCH_CHECK(ok, op, ": index must hold strictly ascending site numbers in [0, ", sites, ")");
}

// Every stride 0 and at least one element: one value stands for the whole tensor.
inline bool is_broadcast_scalar(const at::Tensor& t) {
  if (t.numel() == 0) return false;
  for (const int64_t s : t.strides()) {
    if (s != 0) return false;
  }
  return true;
}

// How grad_out (x's shape) lies in memory relative to x's kernel layout (rows: channels_last; else NCHW planes):
// in it, in the other one of the two (e.g. an NCHW grad_out for a channels_last x), as one value (every stride 0),
// or none of these.
enum class GradLayout { kSame, kOther, kBroadcast, kNeither };

inline GradLayout grad_layout(const at::Tensor& grad_out, bool rows) {
  if (is_broadcast_scalar(grad_out)) return GradLayout::kBroadcast;
  const auto* sizes = grad_out.sizes().data();
  const auto* strides = grad_out.strides().data();
  const bool as_rows = is_channels_last_nchw(sizes, strides), as_planes = is_contiguous_nchw(sizes, strides);
  if (rows ? as_rows : as_planes) return GradLayout::kSame;
  if (rows ? as_planes : as_rows) return GradLayout::kOther;
  return GradLayout::kNeither;
}

// t must match x in shape, dtype and device (e.g. grad_out).
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// A per-channel or per-site vector of length `length` in x's accumulation dtype on x's device.
inline void check_vector(const at::Tensor& t, const char* name, int64_t length, const at::Tensor& x,
                         const char* op) {
  const auto acc = accumulation_type(x.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, op, ": ", name, " must have shape (", length, "), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have dtype ", acc, " (the accumulation dtype of ",
              x.scalar_type(), " inputs), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

// Geometry of x as the kernels see it: element (site, c) is at base(site) + c * channel_stride.
struct NormGeometry {
  int64_t batch, channels, plane;  // plane = H * W
  bool rows;

  static NormGeometry of(const at::Tensor& x_kernel_layout) {
    const auto& x = x_kernel_layout;
    return {x.size(0), x.size(1), x.size(2) * x.size(3), uses_rows(x)};
  }
  SK_HOST_DEVICE int64_t sites() const { return batch * plane; }
  SK_HOST_DEVICE int64_t channel_stride() const { return rows ? 1 : plane; }
  SK_HOST_DEVICE int64_t base(int64_t site) const {
    return rows ? site * channels : (site / plane) * channels * plane + site % plane;
  }
};

// x in the kernel layout, the contiguous index, and x's geometry: what every norm kernel starts from.
// compact: x holds only the rows of the active sites, (M, C) in index order, of a channels_last tensor of
// shape sizes (the backward ops take the rows that forward kept, csrc/norm_ops.h); else x is that tensor.
struct NormArgs {
  at::Tensor x, index;
  NormGeometry g;
  bool compact = false;
  std::array<int64_t, 4> sizes{};
};

template <typename Backend>
NormArgs prepare_norm(const at::Tensor& x, const at::Tensor& index, const char* op) {
  check_norm_input<Backend>(x, op);
  check_index(index, x, op);
  NormArgs p{to_kernel_layout(x, x), index.contiguous(), {}};
  p.g = NormGeometry::of(p.x);
  for (int d = 0; d < 4; ++d) p.sizes[d] = x.size(d);
  if constexpr (Backend::validates_index) {
    check_index_values(p.index.const_data_ptr<int32_t>(), p.index.numel(), p.g.sites(), op);
  }
  return p;
}

}  // namespace spark_kernels
