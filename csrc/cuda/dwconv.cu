// CUDA kernels of the submanifold depthwise conv (schemas in csrc/ops.cpp): dwconv_forward, dwconv_backward.
// float32, float16 and bfloat16 with float32 accumulation; the per-site math is csrc/common/dwconv_site.h,
// the same code the CPU kernels run (and the CPU tests exercise).
//
// One thread block per tile of kTileSites active sites x kChannelLanes channels; each thread owns one
// channel and every kSiteLanes-th site of the tile. Threads are laid out so a warp reads contiguous memory:
// along channels in the channels_last "rows" layout, along sites in the NCHW "planes" layout.
// grad_x is a gather over grad_out too (no atomics): with mirrored taps over the forward table at stride 1,
// through the transposed table (ActiveSites.transposed_taps) over x's active sites at stride 2; a gather's
// sources and destinations may live in different grids (a stride-2 conv's input and output). grad_weight/grad_bias are
// summed per block in a fixed order into per-tile partials, which a second kernel reduces as a fixed tree
// (cuda/reduce_columns.cuh), so every result is deterministic. (The input- and weight-gradient loops are separate kernels: fused, the
// 7x7 kernel needs 220 registers per thread.)
// Table entries that are not readable sites are skipped (never read); the CPU backend reports them, here
// that would cost a device synchronization per call.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "common/dwconv_site.h"
#include "cuda/reduce_columns.cuh"
#include "dwconv_ops.h"

namespace spark_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kTileSites = 128;
// Lanes along the contiguous dimension (one warp) and along the other one.
constexpr int kWarp = 32;
constexpr int kOtherLanes = kThreads / kWarp;

template <bool kRows>
struct Lanes {
  static constexpr int channels = kRows ? kWarp : kOtherLanes;
  static constexpr int sites = kRows ? kOtherLanes : kWarp;
  __device__ static int channel() { return kRows ? threadIdx.x : threadIdx.y; }
  __device__ static int site() { return kRows ? threadIdx.y : threadIdx.x; }
};

// The image of `site` in a grid of hw sites per image; only the planes layout needs it (32-bit division:
// site numbers are int32).
template <bool kRows>
__device__ inline int64_t image_of(int32_t site, int64_t hw) {
  return kRows ? 0 : site / static_cast<int32_t>(hw);
}

// Where channel ch of `site` (of image n) lives in a tensor of hw sites per image.
template <bool kRows>
__device__ inline int64_t site_at(int32_t site, int64_t n, int64_t ch, int64_t c, int64_t hw) {
  return kRows ? static_cast<int64_t>(site) * c + ch : (n * c + ch) * hw + site - n * hw;
}

// The sites a tap of a site of image n may read, channel ch, in a tensor of hw sites per image (`sites` in all).
template <bool kRows, typename T>
__device__ inline SiteView<T> image_view(const T* data, int64_t n, int64_t ch, int64_t c, int64_t hw, int64_t sites) {
  if (kRows) return SiteView<T>{data + ch, 0, sites, c};
  return SiteView<T>{data + (n * c + ch) * hw, n * hw, hw, 1};
}

// Weights are (k*k, C) in the rows layout (a warp reads one tap of 32 channels) and (C, k*k) in planes.
template <bool kRows>
__device__ inline int64_t weight_offset(int64_t ch, int64_t c, int taps) {
  return kRows ? ch : ch * taps;
}
template <bool kRows>
__device__ inline int64_t weight_tap_stride(int64_t c, int taps) {
  return kRows ? c : 1;
}

// The sites of the two tensors of a pass: `hw` per image, `sites` in all (both int32: check_dwconv_args
// refuses more sites than int32 site numbers address; 32-bit fields keep the 7x7 gather from spilling).
struct Grid {
  int32_t hw, sites;
};

// y = the gather at every site of the tile (numbered in y's grid; taps in x's): the conv (kMirrored =
// false, x = input) or its input gradient (x = grad_out, no bias; kMirrored at stride 1).
template <int K, bool kMirrored, bool kRows, typename T>
__global__ void __launch_bounds__(kThreads) gather_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                          const T* __restrict__ bias, const int32_t* __restrict__ index,
                                                          const int32_t* __restrict__ nbr, T* __restrict__ y, int64_t m,
                                                          int32_t c, Grid x_grid, Grid y_grid) {
  using L = Lanes<kRows>;
  // 32-bit channel numbers (C < 2^31): one register less each, which keeps the 7x7 gather from spilling.
  const int32_t ch = static_cast<int32_t>(blockIdx.y) * L::channels + L::channel();
  if (ch >= c) return;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kTileSites;
  const int64_t end = min(m, begin + kTileSites);
  const T* wc = w + weight_offset<kRows>(ch, c, K * K);
  const float b = bias ? static_cast<float>(bias[ch]) : 0.f;
  for (int64_t i = begin + L::site(); i < end; i += L::sites) {
    const int32_t site = index[i];
    if (site < 0 || site >= y_grid.sites) continue;
    const int64_t n = image_of<kRows>(site, y_grid.hw);
    const int64_t at = site_at<kRows>(site, n, ch, c, y_grid.hw);
    const SiteView<T> xv = image_view<kRows>(x, n, ch, c, x_grid.hw, x_grid.sites);
    float acc[1] = {b};
    dwconv_site_gather<K, kMirrored, 1>(nbr + i * K * K, xv, wc, weight_tap_stride<kRows>(c, K * K), acc);
    y[at] = static_cast<T>(acc[0]);
  }
}

// The tile's partial sums of grad_weight (taps 0..k*k-1) and grad_bias (slot k*k) into partials
// (tiles, k*k + 1, C), summed over the block's site lanes in lane order. The tile's sites are output
// sites (gy's grid), their taps x's.
template <int K, bool kRows, typename T>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(const T* __restrict__ gy, const T* __restrict__ x,
                                                              const int32_t* __restrict__ index,
                                                              const int32_t* __restrict__ nbr,
                                                              float* __restrict__ partials, int64_t m, int64_t c,
                                                              Grid x_grid, Grid gy_grid) {
  using L = Lanes<kRows>;
  constexpr int kSlots = K * K + 1;
  __shared__ float lanes[L::sites][L::channels];
  const int64_t ch = static_cast<int64_t>(blockIdx.y) * L::channels + L::channel();
  const bool has_channel = ch < c;  // no early return: every thread takes part in the block reduction
  float gw[K * K] = {};
  float gb = 0.f;
  if (has_channel) {
    const int64_t begin = static_cast<int64_t>(blockIdx.x) * kTileSites;
    const int64_t end = min(m, begin + kTileSites);
    for (int64_t i = begin + L::site(); i < end; i += L::sites) {
      const int32_t site = index[i];
      if (site < 0 || site >= gy_grid.sites) continue;
      const int64_t n = image_of<kRows>(site, gy_grid.hw);
      const SiteView<T> xv = image_view<kRows>(x, n, ch, c, x_grid.hw, x_grid.sites);
      const float g[1] = {static_cast<float>(gy[site_at<kRows>(site, n, ch, c, gy_grid.hw)])};
      dwconv_site_weight_grad<K, 1>(nbr + i * K * K, g, xv, gw, 1);
      gb += g[0];
    }
  }
  float* tile_partials = partials + static_cast<int64_t>(blockIdx.x) * kSlots * c;
  SK_UNROLL
  for (int slot = 0; slot < kSlots; ++slot) {
    lanes[L::site()][L::channel()] = slot < K * K ? gw[slot] : gb;
    __syncthreads();
    if (L::site() == 0 && has_channel) {
      float sum = 0.f;
      for (int s = 0; s < L::sites; ++s) sum += lanes[s][L::channel()];
      tile_partials[slot * c + ch] = sum;
    }
    __syncthreads();
  }
}

// Second stage of the weight gradient: column j = slot * C + ch of the (tiles, k*k + 1, C) partials.
struct SlotLoad {
  const float* partials;
  int64_t width;
  __device__ cuda::Sum operator()(int64_t tile, int64_t j) const { return {double(partials[tile * width + j])}; }
};

// grad_weight (C, k*k) from slots < k*k, grad_bias (C,) from slot k*k.
template <typename T>
struct SlotStore {
  T* gw;
  T* gb;
  int64_t c;
  int taps;
  __device__ void operator()(int64_t j, cuda::Sum total) const {
    const int64_t slot = j / c, ch = j % c;
    (slot < taps ? gw[ch * taps + slot] : gb[ch]) = static_cast<T>(total.value);
  }
};

// Tiles of m sites x the channels.
template <bool kRows>
dim3 grid(int64_t m, int64_t c) {
  return dim3(static_cast<unsigned>((m + kTileSites - 1) / kTileSites),
              static_cast<unsigned>((c + Lanes<kRows>::channels - 1) / Lanes<kRows>::channels));
}

at::Tensor kernel_weight(const at::Tensor& weight, const DwconvGeometry& g) {
  const at::Tensor flat = weight.reshape({g.c, g.k * g.k});
  return g.rows ? flat.t().contiguous() : flat.contiguous();
}

void check_grid(int64_t m, int64_t c) {
  TORCH_CHECK((m + kTileSites - 1) / kTileSites <= std::numeric_limits<int32_t>::max() &&
                  (c + kOtherLanes - 1) / kOtherLanes <= 65535,
              "dwconv (cuda backend): too many active sites or channels for one launch");
}

Grid input_grid(const DwconvGeometry& g) {
  return Grid{static_cast<int32_t>(g.plane()), static_cast<int32_t>(g.sites())};
}
Grid output_grid(const DwconvGeometry& g) {
  return Grid{static_cast<int32_t>(g.out_plane()), static_cast<int32_t>(g.out_sites())};
}

// y (x_grid -> y_grid) = the gather at the m sites of index.
template <typename T, int K, bool kMirrored, bool kRows>
void launch_gather(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& index,
                   const at::Tensor& nbr, at::Tensor& y, int64_t c, Grid x_grid, Grid y_grid) {
  const int64_t m = index.size(0);
  check_grid(m, c);
  gather_kernel<K, kMirrored, kRows, T><<<grid<kRows>(m, c), dim3(kWarp, kOtherLanes), 0,
                                          at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<T>(), w.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr,
      index.const_data_ptr<int32_t>(), nbr.const_data_ptr<int32_t>(), y.mutable_data_ptr<T>(), m,
      static_cast<int32_t>(c), x_grid, y_grid);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int K, bool kRows>
void launch_weight_grad(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& index, const at::Tensor& nbr,
                        at::Tensor& partials, const DwconvGeometry& g) {
  weight_grad_kernel<K, kRows, T><<<grid<kRows>(g.m, g.c), dim3(kWarp, kOtherLanes), 0,
                                    at::cuda::getCurrentCUDAStream()>>>(
      gy.const_data_ptr<T>(), x.const_data_ptr<T>(), index.const_data_ptr<int32_t>(), nbr.const_data_ptr<int32_t>(),
      partials.mutable_data_ptr<float>(), g.m, g.c, input_grid(g), output_grid(g));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int K>
at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& index, const at::Tensor& neighbors, const DwconvGeometry& g) {
  at::Tensor y = at::zeros(g.out_shape(), x.options().memory_format(g.memory_format()));
  if (g.m == 0 || g.c == 0) return y;
  const at::Tensor xk = x.contiguous(g.memory_format()), w = kernel_weight(weight, g);
  const at::Tensor idx = index.contiguous(), nbr = neighbors.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (g.rows)
    launch_gather<T, K, false, true>(xk, w, b, idx, nbr, y, g.c, input_grid(g), output_grid(g));
  else
    launch_gather<T, K, false, false>(xk, w, b, idx, nbr, y, g.c, input_grid(g), output_grid(g));
  return y;
}

// grad_x: at stride 1 the mirrored gather over the forward table; at stride 2 the plain gather over x's
// active sites through the transposed table.
template <typename T, int K, bool kRows>
void launch_input_grad(const at::Tensor& gy, const at::Tensor& w, const at::Tensor& idx, const at::Tensor& nbr,
                       const c10::optional<at::Tensor>& input_index, const c10::optional<at::Tensor>& input_taps,
                       at::Tensor& gx, const DwconvGeometry& g) {
  if (g.stride == 1) {
    launch_gather<T, K, true, kRows>(gy, w, at::Tensor(), idx, nbr, gx, g.c, output_grid(g), input_grid(g));
  } else {
    launch_gather<T, K, false, kRows>(gy, w, at::Tensor(), input_index->contiguous(), input_taps->contiguous(), gx,
                                      g.c, output_grid(g), input_grid(g));
  }
}

template <typename T, int K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& weight, const at::Tensor& index,
                                                            const at::Tensor& neighbors,
                                                            const c10::optional<at::Tensor>& input_index,
                                                            const c10::optional<at::Tensor>& input_taps,
                                                            const DwconvGeometry& g) {
  at::Tensor gx = at::empty(x.sizes(), x.options(), g.memory_format()).zero_();
  at::Tensor gw = at::zeros(weight.sizes(), weight.options());
  at::Tensor gb = at::zeros({g.c}, weight.options());
  if (g.m == 0 || g.c == 0) return {gx, gw, gb};
  check_grid(g.m, g.c);
  const at::Tensor xk = x.contiguous(g.memory_format()), gy = grad_out.contiguous(g.memory_format());
  const at::Tensor w = kernel_weight(weight, g), idx = index.contiguous(), nbr = neighbors.contiguous();
  const int64_t tiles = (g.m + kTileSites - 1) / kTileSites;
  at::Tensor partials = at::empty({tiles, K * K + 1, g.c}, x.options().dtype(at::kFloat));
  if (g.rows) {
    launch_input_grad<T, K, true>(gy, w, idx, nbr, input_index, input_taps, gx, g);
    launch_weight_grad<T, K, true>(gy, xk, idx, nbr, partials, g);
  } else {
    launch_input_grad<T, K, false>(gy, w, idx, nbr, input_index, input_taps, gx, g);
    launch_weight_grad<T, K, false>(gy, xk, idx, nbr, partials, g);
  }
  const int64_t width = (K * K + 1) * g.c;
  cuda::reduce_columns<cuda::Sum>(tiles, width, SlotLoad{partials.const_data_ptr<float>(), width},
                                  SlotStore<T>{gw.mutable_data_ptr<T>(), gb.mutable_data_ptr<T>(), g.c, K * K});
  return {gx, gw, gb};
}

}  // namespace

SK_REGISTER_DWCONV(CUDA, CudaBackend)

}  // namespace spark_kernels
