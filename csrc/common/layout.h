#pragma once
// The memory layout the kernels work in; the C++ mirror of spark_kernels/_layout.py (keep them in step).
// A 4-D (N, C, H, W) tensor that is channels_last-contiguous but not plain-contiguous is processed as
// "rows" (C contiguous values per site); anything else as plain-contiguous NCHW "planes".
#include <cstdint>

namespace spark_kernels {

// True if the tensor is dense with its dimensions nested in `order` (innermost first). Size-1
// dimensions may have any stride, as in torch's own contiguity checks.
inline bool dense_in_order(const int64_t* sizes, const int64_t* strides, const int (&order)[4]) {
  for (int d = 0; d < 4; ++d)
    if (sizes[d] == 0) return true;
  int64_t expected = 1;
  for (int d : order) {
    if (sizes[d] == 1) continue;
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

inline bool is_contiguous_nchw(const int64_t* sizes, const int64_t* strides) {
  return dense_in_order(sizes, strides, {3, 2, 1, 0});
}

inline bool is_channels_last_nchw(const int64_t* sizes, const int64_t* strides) {
  return dense_in_order(sizes, strides, {1, 3, 2, 0});
}

// sizes/strides of a 4-D (N, C, H, W) tensor.
inline bool uses_rows(const int64_t* sizes, const int64_t* strides) {
  return !is_contiguous_nchw(sizes, strides) && is_channels_last_nchw(sizes, strides);
}

}  // namespace spark_kernels
