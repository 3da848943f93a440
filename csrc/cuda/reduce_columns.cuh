// Deterministic second stage of the CUDA reductions: each column of a (parts, width) table of per-block
// partials is reduced by kReduceRows threads (thread y merges rows y, y + kReduceRows, ... in order) whose
// results are merged as a fixed binary tree in shared memory. The order is the same on every run (no
// atomics), and the serial depth is parts / kReduceRows + log2(kReduceRows) instead of parts.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace spark_kernels::cuda {

constexpr int kReduceColumns = 32;  // one warp along the columns: coalesced reads of each partial row
constexpr int kReduceRows = 16;

// The Value of a plain column sum, in double.
struct Sum {
  double value;
  __device__ void merge(const Sum& other) { value += other.value; }
};

// load(part, col) -> Value; store(col, Value). Value is trivially constructible, empty when
// value-initialized ({}), and has merge(const Value&).
template <typename Value, typename Load, typename Store>
__global__ void __launch_bounds__(kReduceColumns * kReduceRows)
reduce_columns_kernel(int64_t parts, int64_t width, Load load, Store store) {
  __shared__ Value partial[kReduceRows][kReduceColumns];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * kReduceColumns + tx;
  Value value{};
  if (col < width) {
    for (int64_t k = ty; k < parts; k += kReduceRows) value.merge(load(k, col));
  }
  partial[ty][tx] = value;
  for (int half = kReduceRows / 2; half > 0; half /= 2) {
    __syncthreads();
    if (ty < half) partial[ty][tx].merge(partial[ty + half][tx]);
  }
  if (ty == 0 && col < width) store(col, partial[0][tx]);
}

template <typename Value, typename Load, typename Store>
void reduce_columns(int64_t parts, int64_t width, const Load& load, const Store& store) {
  if (width == 0) return;
  const auto blocks = static_cast<unsigned>((width + kReduceColumns - 1) / kReduceColumns);
  reduce_columns_kernel<Value><<<blocks, dim3(kReduceColumns, kReduceRows), 0, at::cuda::getCurrentCUDAStream()>>>(
      parts, width, load, store);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace spark_kernels::cuda
