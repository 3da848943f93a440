// CUDA building blocks of the masked-norm kernels: deterministic two-stage per-channel sums over the
// active sites, and elementwise maps into a zeroed dense output. Per-site math: common/norm_row.h.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/norm_checks.h"
#include "common/norm_row.h"

// The dtypes of the CUDA kernels (those the "cuda" backend declares); statistics in float32.
#define SK_DISPATCH_CUDA_FLOATS(TYPE, NAME, ...)                                                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                       \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                    \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace spark_kernels::cuda {

constexpr int kWarp = 32;
constexpr int kTileRows = 8;                // blockDim.y of the channel-sum kernel
constexpr int kSitesPerSumBlock = 256;      // fixed site chunk of one block of partial sums
constexpr int kThreads = 256;

// Flat site of active site j. An index entry out of range (index tables come validated from
// ActiveSites) aborts the kernel with a trap instead of reading out of bounds; unlike an assert it
// makes no call, which would cost register spills around it.
__device__ __forceinline__ int64_t site_of(const int32_t* index, int64_t j, int64_t sites) {
  const int64_t site = index[j];
  if (site < 0 || site >= sites) __trap();
  return site;
}

// Stage 1: partials[block][0 or 1][c] = sum over the block's sites of term(j, offset, c) (two terms).
// Rows: threadIdx.x runs over 32 channels (coalesced), threadIdx.y over sites.
// Planes: threadIdx.y runs over 8 channels, threadIdx.x over sites (coalesced within a plane).
// The block then adds its 256 threads' sums in a fixed order, so the result does not depend on timing.
template <typename Acc, typename Term>
__global__ void __launch_bounds__(kWarp * kTileRows)
channel_partials_kernel(NormGeometry g, const int32_t* __restrict__ index, int64_t count, Term term,
                        Acc* __restrict__ partials) {
  __shared__ Acc first_sums[kTileRows][kWarp];
  __shared__ Acc second_sums[kTileRows][kWarp];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = g.rows ? int64_t(blockIdx.y) * kWarp + tx : int64_t(blockIdx.y) * kTileRows + ty;
  const int lane = g.rows ? ty : tx;
  const int lanes = g.rows ? kTileRows : kWarp;
  const int64_t j0 = int64_t(blockIdx.x) * kSitesPerSumBlock;
  const int64_t j1 = min(count, j0 + kSitesPerSumBlock);
  Acc first = 0, second = 0;
  if (c < g.channels) {
    for (int64_t j = j0 + lane; j < j1; j += lanes) {
      Acc a, b;
      term(j, g.base(site_of(index, j, g.sites())) + c * g.channel_stride(), c, a, b);
      first += a;
      second += b;
    }
  }
  first_sums[ty][tx] = first;
  second_sums[ty][tx] = second;
  __syncthreads();
  const bool leader = g.rows ? ty == 0 : tx == 0;
  if (leader && c < g.channels) {
    Acc a = 0, b = 0;
    for (int k = 0; k < lanes; ++k) {
      a += g.rows ? first_sums[k][tx] : first_sums[ty][k];
      b += g.rows ? second_sums[k][tx] : second_sums[ty][k];
    }
    Acc* out = partials + int64_t(blockIdx.x) * 2 * g.channels;
    out[c] = a;
    out[g.channels + c] = b;
  }
}

// Stage 2: the sum of the blocks' partials of each column, in block order, in double; the first
// C columns go to first[c], the next C to second[c].
template <typename Acc, typename Out>
__global__ void combine_partials_kernel(const Acc* __restrict__ partials, int64_t blocks, int64_t channels,
                                        Out* __restrict__ first, Out* __restrict__ second) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= 2 * channels) return;
  const Out total = static_cast<Out>(norm::combine_column(partials, blocks, 2 * channels, col));
  if (col < channels) {
    first[col] = total;
  } else {
    second[col - channels] = total;
  }
}

// Per-channel sums of term's two terms over the active sites, into first[c] and second[c] (dtype Out).
template <typename Acc, typename Out, typename Term>
void channel_sums(const NormGeometry& g, const at::Tensor& index, const Term& term, Out* first, Out* second,
                  const at::TensorOptions& options) {
  const int64_t count = index.numel();
  const int64_t width = 2 * g.channels;
  const int64_t blocks = norm::num_chunks(count, kSitesPerSumBlock);
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partials = at::empty({std::max<int64_t>(blocks, 1), width},
                                  options.dtype(c10::CppTypeToScalarType<Acc>::value));
  if (blocks > 0) {
    const int64_t tile = g.rows ? kWarp : kTileRows;
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((g.channels + tile - 1) / tile));
    channel_partials_kernel<Acc><<<grid, dim3(kWarp, kTileRows), 0, stream>>>(
        g, index.const_data_ptr<int32_t>(), count, term, partials.data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const unsigned combine_blocks = static_cast<unsigned>((width + kThreads - 1) / kThreads);
  combine_partials_kernel<<<combine_blocks, kThreads, 0, stream>>>(partials.const_data_ptr<Acc>(), blocks,
                                                                   g.channels, first, second);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[offset] = elem(offset, c) for every (active site, channel). Rows: consecutive threads take
// consecutive channels of a site; planes: consecutive active sites of a channel.
template <typename T, typename Elem>
__global__ void active_map_kernel(NormGeometry g, const int32_t* __restrict__ index, int64_t count, Elem elem,
                                  T* __restrict__ out) {
  const int64_t total = count * g.channels;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = g.rows ? i / g.channels : i % count;
    const int64_t c = g.rows ? i % g.channels : i / count;
    const int64_t offset = g.base(site_of(index, j, g.sites())) + c * g.channel_stride();
    out[offset] = elem(offset, c);
  }
}

inline unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t max_blocks = 65535;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(max_blocks, (work + per_block - 1) / per_block)));
}

// A zeroed dense tensor in x's kernel layout, with elem written at the active sites.
template <typename T, typename Elem>
at::Tensor dense_from_active(const at::Tensor& x_kernel_layout, const NormGeometry& g, const at::Tensor& index,
                             const Elem& elem) {
  at::Tensor out = at::zeros_like(x_kernel_layout, kernel_memory_format(x_kernel_layout));
  const int64_t work = index.numel() * g.channels;
  if (work > 0) {
    active_map_kernel<<<grid_for(work, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g, index.const_data_ptr<int32_t>(), index.numel(), elem, out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace spark_kernels::cuda
