// How a CPU kernel sees each of its dtypes (the list: CpuBackend in common/dispatch.h): its storage type
// T (what it reads and writes) and its accumulation type (what it computes in: float for the 16-bit
// types and float32, double for float64).
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <type_traits>

#include "cpu/half_types.h"

namespace spark_kernels::cpu {

template <typename scalar_t>
struct StorageOf {
  using type = scalar_t;
};
template <>
struct StorageOf<c10::BFloat16> {
  using type = BFloat16Bits;
};
template <>
struct StorageOf<c10::Half> {
  using type = Float16Bits;
};

// The type a kernel reads and writes for ATen's scalar_t (vectorizable conversions for the 16-bit types).
template <typename scalar_t>
using storage_t = typename StorageOf<scalar_t>::type;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

template <typename T>
const T* data_as(const at::Tensor& t) {
  static_assert(std::is_trivially_copyable_v<T>);
  TORCH_INTERNAL_ASSERT(t.element_size() == sizeof(T));
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data_as(at::Tensor& t) {
  static_assert(std::is_trivially_copyable_v<T>);
  TORCH_INTERNAL_ASSERT(t.element_size() == sizeof(T));
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

}  // namespace spark_kernels::cpu
