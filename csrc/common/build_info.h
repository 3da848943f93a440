#pragma once
namespace spark_kernels {
#ifdef SPARK_KERNELS_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif
}  // namespace spark_kernels
