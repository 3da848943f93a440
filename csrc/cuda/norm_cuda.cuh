// CUDA building blocks of the masked-norm kernels: deterministic two-stage per-channel sums and BN
// moments over the active sites, and elementwise maps into a zeroed dense output. Per-site math and the
// BN statistics algorithm: common/norm_row.h.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>

#include "common/norm_checks.h"
#include "common/norm_row.h"
#include "cuda/reduce_columns.cuh"

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

// The active sites [j0, j1) of reduction block `block` (a fixed chunk of the index, so results never depend on
// timing). ContiguousChunks: the index cut into kSitesPerSumBlock-site chunks. ImageChunks: each image's run of
// sites index[starts[n] .. starts[n + 1]) cut the same way, `parts` blocks per image (trailing ones may be
// empty), so that no block mixes two images (GroupNorm's per-image statistics).
struct ContiguousChunks {
  int64_t count;
  __device__ void operator()(int64_t block, int64_t& j0, int64_t& j1) const {
    j0 = block * kSitesPerSumBlock;
    j1 = min(count, j0 + kSitesPerSumBlock);
  }
};

struct ImageChunks {
  const int64_t* starts;  // (N + 1)
  int64_t parts;
  __device__ void operator()(int64_t block, int64_t& j0, int64_t& j1) const {
    const int64_t image = block / parts;
    j0 = starts[image] + (block % parts) * kSitesPerSumBlock;
    j1 = min(starts[image + 1], j0 + kSitesPerSumBlock);
  }
};

// How a block of the per-channel reduction kernels covers its chunk of at most kSitesPerSumBlock active sites.
// Rows: threadIdx.x runs over 32 channels (coalesced), threadIdx.y over sites.
// Planes: threadIdx.y runs over 8 channels, threadIdx.x over sites (coalesced within a plane).
// Each thread takes every lanes-th site from j0 + lane; the lane-0 thread of each channel (the leader)
// then combines the channel's lanes from shared memory in lane order, so results do not depend on timing.
struct SumLanes {
  int64_t channel, j0, j1;
  int lane, lanes;
  bool rows, leader;

  template <typename Chunks>
  __device__ SumLanes(const NormGeometry& g, const Chunks& chunks)
      : channel(g.rows ? int64_t(blockIdx.y) * kWarp + threadIdx.x : int64_t(blockIdx.y) * kTileRows + threadIdx.y),
        lane(g.rows ? threadIdx.y : threadIdx.x),
        lanes(g.rows ? kTileRows : kWarp),
        rows(g.rows),
        leader(lane == 0) {
    chunks(blockIdx.x, j0, j1);
  }

  // This thread's slot of a per-thread shared table, and lane k's slot for this thread's channel.
  template <typename S>
  __device__ S& own(S (&table)[kTileRows][kWarp]) const { return table[threadIdx.y][threadIdx.x]; }
  template <typename S>
  __device__ const S& of_lane(const S (&table)[kTileRows][kWarp], int k) const {
    return rows ? table[k][threadIdx.x] : table[threadIdx.y][k];
  }
};

// The grid of a per-channel reduction over `blocks` chunks of sites.
inline dim3 sum_grid(const NormGeometry& g, int64_t blocks) {
  const int64_t tile = g.rows ? kWarp : kTileRows;
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>((g.channels + tile - 1) / tile));
}

// Stage 1: partials[block][0 or 1][c] = sum over the block's sites of term(j, offset, c) (two terms).
template <typename Acc, typename Term, typename Chunks>
__global__ void __launch_bounds__(kWarp * kTileRows)
channel_partials_kernel(NormGeometry g, const int32_t* __restrict__ index, Chunks chunks, Term term,
                        Acc* __restrict__ partials) {
  __shared__ Acc first_sums[kTileRows][kWarp];
  __shared__ Acc second_sums[kTileRows][kWarp];
  const SumLanes l(g, chunks);
  const int64_t c = l.channel;
  Acc first = 0, second = 0;
  if (c < g.channels) {
    for (int64_t j = l.j0 + l.lane; j < l.j1; j += l.lanes) {
      Acc a, b;
      term(j, g.base(site_of(index, j, g.sites())) + c * g.channel_stride(), c, a, b);
      first += a;
      second += b;
    }
  }
  l.own(first_sums) = first;
  l.own(second_sums) = second;
  __syncthreads();
  if (l.leader && c < g.channels) {
    Acc a = 0, b = 0;
    for (int k = 0; k < l.lanes; ++k) {
      a += l.of_lane(first_sums, k);
      b += l.of_lane(second_sums, k);
    }
    Acc* out = partials + int64_t(blockIdx.x) * 2 * g.channels;
    out[c] = a;
    out[g.channels + c] = b;
  }
}

// Stage 2 of channel_sums: column col of the (blocks, 2C) partials, the first C columns into first[c], the
// next C into second[c].
template <typename Acc, typename Out>
struct SumLoad {
  const Acc* partials;
  int64_t width;
  __device__ Sum operator()(int64_t block, int64_t col) const { return {double(partials[block * width + col])}; }
};

template <typename Out>
struct PairStore {
  Out* first;
  Out* second;
  int64_t channels;
  __device__ void operator()(int64_t col, Sum total) const {
    (col < channels ? first[col] : second[col - channels]) = static_cast<Out>(total.value);
  }
};

// Per-channel sums of term's two terms over the active sites, into first[c] and second[c] (dtype Out).
template <typename Acc, typename Out, typename Term>
void channel_sums(const NormGeometry& g, const at::Tensor& index, const Term& term, Out* first, Out* second,
                  const at::TensorOptions& options) {
  const int64_t count = index.numel();
  const int64_t width = 2 * g.channels;
  const int64_t blocks = norm::num_chunks(count, kSitesPerSumBlock);
  at::Tensor partials = at::empty({std::max<int64_t>(blocks, 1), width},
                                  options.dtype(c10::CppTypeToScalarType<Acc>::value));
  if (blocks > 0) {
    channel_partials_kernel<Acc><<<sum_grid(g, blocks), dim3(kWarp, kTileRows), 0, at::cuda::getCurrentCUDAStream()>>>(
        g, index.const_data_ptr<int32_t>(), ContiguousChunks{count}, term, partials.data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  reduce_columns<Sum>(blocks, width, SumLoad<Acc, Out>{partials.const_data_ptr<Acc>(), width},
                      PairStore<Out>{first, second, g.channels});
}

// BN statistics, stage 1 (common/norm_row.h): each thread sums shifted values around its first value over
// its sites of the block's chunk; the block's lanes are merged (Chan) in lane order relative to lane 0's
// pivot r. partials (blocks, 3, C) float: [r, mean - r, M2].
template <typename T, typename Chunks>
__global__ void __launch_bounds__(kWarp * kTileRows)
channel_moments_kernel(NormGeometry g, const int32_t* __restrict__ index, Chunks chunks, const T* __restrict__ x,
                       float* __restrict__ partials) {
  __shared__ norm::ShiftedSums<float> lane_sums[kTileRows][kWarp];
  const SumLanes l(g, chunks);
  const int64_t c = l.channel;
  norm::ShiftedSums<float> sums{};
  if (c < g.channels) {
    for (int64_t j = l.j0 + l.lane; j < l.j1; j += l.lanes) {
      sums.add(static_cast<float>(x[g.base(site_of(index, j, g.sites())) + c * g.channel_stride()]));
    }
  }
  l.own(lane_sums) = sums;
  __syncthreads();
  if (l.leader && c < g.channels) {
    const float reference = sums.pivot;  // the leader is lane 0, whose first site is the chunk's first
    norm::Moments<float> merged{};
    for (int k = 0; k < l.lanes; ++k) merged.merge(norm::moments_of(l.of_lane(lane_sums, k), reference));
    float* out = partials + int64_t(blockIdx.x) * 3 * g.channels + c;
    out[0] = reference;
    out[g.channels] = merged.offset;
    out[2 * g.channels] = merged.m2;
  }
}

// BN statistics, stage 2: the blocks' moments of channel c, in double, relative to block 0's reference.
struct MomentsLoad {
  const float* partials;
  int64_t channels, count;
  __device__ norm::Moments<double> operator()(int64_t block, int64_t c) const {
    const float* row = partials + block * 3 * channels + c;
    const int64_t left = count - block * kSitesPerSumBlock;
    const double sites = double(left < kSitesPerSumBlock ? left : kSitesPerSumBlock);
    return {sites, (double(row[0]) - double(partials[c])) + double(row[channels]), double(row[2 * channels])};
  }
};

struct MomentsStore {
  const float* partials;
  double* out;  // (2, C): mean, M2
  int64_t channels;
  __device__ void operator()(int64_t c, norm::Moments<double> total) const {
    out[c] = double(partials[c]) + total.offset;
    out[channels + c] = total.m2;
  }
};

// out (2, C) double: per-channel [mean, M2] of x over the active sites ([0, 0] with none).
template <typename T>
void channel_moments(const NormGeometry& g, const at::Tensor& index, const T* x, double* out,
                     const at::TensorOptions& options) {
  const int64_t count = index.numel();
  const int64_t blocks = norm::num_chunks(count, kSitesPerSumBlock);
  at::Tensor partials = at::empty({std::max<int64_t>(blocks, 1), 3, g.channels}, options.dtype(at::kFloat));
  if (blocks > 0) {
    channel_moments_kernel<T><<<sum_grid(g, blocks), dim3(kWarp, kTileRows), 0, at::cuda::getCurrentCUDAStream()>>>(
        g, index.const_data_ptr<int32_t>(), ContiguousChunks{count}, x, partials.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const float* table = partials.const_data_ptr<float>();
  reduce_columns<norm::Moments<double>>(blocks, g.channels, MomentsLoad{table, g.channels, count},
                                        MomentsStore{table, out, g.channels});
}

// out[offset] = elem(offset, c, site) for every (active site, channel). Rows: consecutive threads take
// consecutive channels of a site; planes: consecutive active sites of a channel.
template <typename T, typename Elem>
__global__ void active_map_kernel(NormGeometry g, const int32_t* __restrict__ index, int64_t count, Elem elem,
                                  T* __restrict__ out) {
  const int64_t total = count * g.channels;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = g.rows ? i / g.channels : i % count;
    const int64_t c = g.rows ? i % g.channels : i / count;
    const int64_t site = site_of(index, j, g.sites());
    const int64_t offset = g.base(site) + c * g.channel_stride();
    out[offset] = elem(offset, c, site);
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
