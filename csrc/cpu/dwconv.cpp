// CPU kernels of the submanifold depthwise conv (schemas in csrc/ops.cpp): dwconv_forward, dwconv_backward.
//
// Work is proportional to the active sites (plus the zeros of the dense outputs, written in the same
// pass). The per-site math is csrc/common/dwconv_site.h. Two layouts (csrc/common/layout.h):
//  * rows (channels_last): sites in parallel; weights transposed to (k*k, C) so each tap's channels are
//    contiguous. At stride 1 the path follows the mean run of adjacent active sites (rows_path): where runs
//    are short, site by site through lists of each site's active taps (the "lists" section below); else, for
//    kernels of 5x5 and up (kTiled), register-blocked tiles of adjacent active sites over channel vectors
//    (cpu/vec.h; the "tiles" section). Otherwise site by site, channels in blocks of kBlock values the
//    compiler vectorizes. A grad_out that is not channels_last (NCHW, or expanded from y.sum()) is copied
//    at its active rows only (rows_grad_out).
//  * planes (NCHW): one (image, channel) plane per task, one channel per site.
// The forward pass and the input gradient are one "gather" pass: each destination site of an index sums
// weight x source over its table's taps. Forward: destinations are the active output sites, sources x.
// Input gradient: at stride 1, fused into the weight-gradient pass as the gather with mirrored taps over
// the same table; at stride 2, a separate gather over x's active sites through the transposed table
// (ActiveSites.transposed_taps), sources grad_out. No pass scatters, so none needs atomics.
// Weight/bias gradients are summed per chunk of a FIXED partition of the output sites (rows_chunk_sites(C, m)
// active sites per chunk in rows, one image per chunk in planes) and the chunk partials reduced in chunk
// order, so every result is bit-identical from run to run and for any number of threads.
// Storage types T (csrc/cpu/dtypes.h): float64, float32, float16, bfloat16; the sums, weights and weight
// gradient partials are in the accumulation type Acc (double for float64, float otherwise).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "common/dwconv_site.h"
#include "common/layout.h"
#include "cpu/dtypes.h"
#include "cpu/vec.h"
#include "dwconv_ops.h"

namespace spark_kernels {
namespace {

using cpu::acc_t;
using cpu::storage_t;

// Channels per vector in the rows layout: 128 bytes of accumulators (two AVX-512 or four AVX2 registers).
template <typename Acc>
constexpr int kBlock = 128 / sizeof(Acc);

using Geometry = DwconvGeometry;

// One gather pass: the `m` destination sites of an index, numbered in a grid of dst_plane sites per
// image, read their taps from a grid of src_plane sites per image.
struct GatherGrids {
  int64_t n, c, src_plane, dst_plane, m;
  int64_t src_sites() const { return n * src_plane; }
  int64_t dst_sites() const { return n * dst_plane; }
};

void check_tables(const char* op, bool valid) {
  TORCH_CHECK(valid, op, ": index/neighbors hold site numbers outside x (or taps across images); "
              "build them with spark_kernels.ActiveSites for x's (N, H, W)");
}

// First position in the (ascending) index of m sites, `plane` per image, of each image's sites: image n
// owns [start[n], start[n+1]).
std::vector<int64_t> image_starts(const int32_t* index, int64_t m, int64_t images, int64_t plane) {
  std::vector<int64_t> start(images + 1);
  for (int64_t n = 0; n <= images; ++n)
    start[n] = std::lower_bound(index, index + m, static_cast<int64_t>(n) * plane,
                                [](int32_t a, int64_t b) { return a < b; }) - index;
  return start;
}

// Writes a dense output in one pass along ascending active sites: the rows of the inactive sites before
// each active site are zeroed when the pass reaches it (by streaming stores where cpu::streams_zero_rows
// says), so no separate memset touches the output first. Its scope is one thread's part of a pass: it ends
// with the fence that streamed zeros need before other threads read them.
template <typename T>
struct GapFiller {
  T* out;
  int64_t row_len;
  int64_t next;   // first row not written yet
  int64_t limit;  // rows in the output

  // Zero the rows [next, site) before writing row `site`; false (nothing written) if the site is not
  // after the previous one or is past the end: an unsorted or corrupt index.
  bool advance_to(int64_t site) {
    if (site < next || site >= limit) return false;
    zero_rows(next, site);
    next = site + 1;
    return true;
  }
  void finish() {
    zero_rows(next, limit);
    next = limit;
  }
  ~GapFiller() { cpu::stream_fence(); }

 private:
  void zero_rows(int64_t from, int64_t to) {
    const int64_t bytes = (to - from) * row_len * static_cast<int64_t>(sizeof(T));
    if (bytes <= 0) return;
    if (cpu::streams_zero_rows(limit * row_len * static_cast<int64_t>(sizeof(T))))
      cpu::stream_zero(out + from * row_len, bytes);
    else
      std::fill(out + from * row_len, out + to * row_len, T(0));
  }
};

// The least row stride >= c values of type E that is an odd number of 64-byte lines: rows that far apart spread
// over all of L1's sets (a stride of an even number of lines uses half of them or fewer).
template <typename E>
int64_t odd_lines_stride(int64_t c) {
  constexpr int64_t kLine = 64 / sizeof(E);
  return ((c + kLine - 1) / kLine | 1) * kLine;
}

// The first row a run of active sites starting at position `begin` of the index owns.
inline int64_t first_row(const int32_t* index, int64_t begin, int64_t limit) {
  return begin == 0 ? 0 : std::clamp<int64_t>(static_cast<int64_t>(index[begin - 1]) + 1, 0, limit);
}

// ---------------------------------------------------------------------------------------------------
// rows layout

template <int K, bool kMirrored, int V, typename T, typename Acc>
inline bool gather_site_rows(const int32_t* taps, const T* src, const Acc* wt, const Acc* bias, T* dst, int64_t c0,
                             const GatherGrids& gr) {
  Acc acc[V];
  for (int v = 0; v < V; ++v) acc[v] = bias ? bias[c0 + v] : Acc(0);
  const SiteView<T> sv{src + c0, 0, gr.src_sites(), gr.c};
  const bool valid = dwconv_site_gather<K, kMirrored, V>(taps, sv, wt + c0, gr.c, acc);
  for (int v = 0; v < V; ++v) dst[c0 + v] = static_cast<T>(acc[v]);
  return valid;
}

// dst (every site of its grid: computed at the index's sites, zero elsewhere) = the gather over src.
template <int K, bool kMirrored, typename T, typename Acc>
void gather_rows(const T* src, const Acc* wt, const Acc* bias, const int32_t* index, const int32_t* nbr, T* dst,
                 const GatherGrids& gr, std::atomic<bool>& valid) {
  constexpr int B = kBlock<Acc>;
  const int64_t full = gr.c / B * B;
  at::parallel_for(0, gr.m, 64, [&](int64_t begin, int64_t end) {
    bool ok = true;
    GapFiller<T> fill{dst, gr.c, first_row(index, begin, gr.dst_sites()), gr.dst_sites()};
    for (int64_t i = begin; i < end; ++i) {
      const int32_t site = index[i];
      if (!fill.advance_to(site)) {
        ok = false;
        continue;
      }
      const int32_t* taps = nbr + i * K * K;
      T* row = dst + static_cast<int64_t>(site) * gr.c;
      for (int64_t c0 = 0; c0 < full; c0 += B)
        ok &= gather_site_rows<K, kMirrored, B>(taps, src, wt, bias, row, c0, gr);
      for (int64_t c = full; c < gr.c; ++c) ok &= gather_site_rows<K, kMirrored, 1>(taps, src, wt, bias, row, c, gr);
    }
    if (end == gr.m) fill.finish();
    if (!ok) valid = false;
  });
}

// The contribution of a block of V channels of one output site to its chunk's weight/bias gradient
// partials gw_part (k*k, C) and gb_part (C,), and (kInputGrad, stride 1 only: output and input grids are
// one) grad_x of the site by the mirrored gather.
template <int K, bool kInputGrad, int V, typename T, typename Acc>
inline bool backward_site_rows(const int32_t* taps, int64_t row, const T* gy, const T* x, const Acc* wt, T* gx,
                               Acc* gw_part, Acc* gb_part, int64_t c0, const Geometry& g) {
  Acc gs[V];
  for (int v = 0; v < V; ++v) gs[v] = static_cast<Acc>(gy[row + c0 + v]);
  const SiteView<T> xv{x + c0, 0, g.sites(), g.c};
  bool valid = true;
  if constexpr (kInputGrad) {
    Acc acc[V] = {};
    const SiteView<T> gv{gy + c0, 0, g.out_sites(), g.c};
    valid &= dwconv_site_gather<K, true, V>(taps, gv, wt + c0, g.c, acc);
    for (int v = 0; v < V; ++v) gx[row + c0 + v] = static_cast<T>(acc[v]);
  }
  valid &= dwconv_site_weight_grad<K, V>(taps, gs, xv, gw_part + c0, g.c);
  for (int v = 0; v < V; ++v) gb_part[c0 + v] += gs[v];
  return valid;
}

// Active sites per weight-gradient chunk in the rows layout, for m active sites: a function of C and m only (never
// of the thread count), at most a size at which a chunk's partials (k*k x C) stay small next to its work
// (chunk x k*k x C). The m sites go in as many chunks as that size needs, all of one size but the last (a little
// smaller): threads get whole chunks (at::parallel_for splits statically), and a short last chunk left a thread
// idle for most of a chunk's time (2 threads at 768@7 with 85-site chunks: 340 vs 300 sites).
int64_t rows_chunk_sites(int64_t c, int64_t m) {
  const int64_t most = std::clamp<int64_t>(65536 / std::max<int64_t>(c, 1), 32, 512);
  const int64_t chunks = std::max<int64_t>(1, (m + most - 1) / most);
  return (m + chunks - 1) / chunks;
}

// One chunk of the backward's fixed partition: its weight and bias gradient partials, zeroed, and its active
// sites [begin, end).
template <typename Acc>
struct BackwardChunk {
  Acc* gw_part;
  Acc* gb_part;
  int64_t begin, end;
};

// weight_stride: the partials' row stride (C, or listed_weight_stride in the listed path).
template <int K, typename Acc>
BackwardChunk<Acc> open_backward_chunk(Acc* gw_parts, Acc* gb_parts, int64_t chunk, int64_t chunk_sites,
                                       const Geometry& g, int64_t weight_stride) {
  Acc* gw_part = gw_parts + chunk * K * K * weight_stride;
  Acc* gb_part = gb_parts + chunk * g.c;
  std::fill(gw_part, gw_part + K * K * weight_stride, Acc(0));
  std::fill(gb_part, gb_part + g.c, Acc(0));
  const int64_t begin = chunk * chunk_sites;
  return {gw_part, gb_part, begin, std::min(g.m, begin + chunk_sites)};
}

// The weight and bias gradient partials per chunk of the fixed partition, site by site, and (kInputGrad, stride
// 1 only) grad_x by the mirrored gather; at stride 2 the input gradient is a separate gather. (The tiled
// backward_rows_tiled below is the stride-1 path where tiles pay, kTiled.)
template <int K, bool kInputGrad, typename T, typename Acc>
void backward_rows(const T* gy, const T* x, const Acc* wt, const int32_t* index, const int32_t* nbr, T* gx,
                   Acc* gw_parts, Acc* gb_parts, int64_t chunk_sites, int64_t chunks, const Geometry& g,
                   std::atomic<bool>& valid) {
  constexpr int B = kBlock<Acc>;
  const int64_t full = g.c / B * B;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    bool ok = true;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const auto [gw_part, gb_part, begin, end] =
          open_backward_chunk<K>(gw_parts, gb_parts, chunk, chunk_sites, g, g.c);
      // Without the input gradient the filler only checks that the index ascends (it writes no rows).
      GapFiller<T> fill{gx, kInputGrad ? g.c : 0, first_row(index, begin, g.out_sites()), g.out_sites()};
      for (int64_t i = begin; i < end; ++i) {
        const int32_t site = index[i];
        if (!fill.advance_to(site)) {
          ok = false;
          continue;
        }
        const int32_t* taps = nbr + i * K * K;
        const int64_t row = static_cast<int64_t>(site) * g.c;
        for (int64_t c0 = 0; c0 < full; c0 += B)
          ok &= backward_site_rows<K, kInputGrad, B>(taps, row, gy, x, wt, gx, gw_part, gb_part, c0, g);
        for (int64_t c = full; c < g.c; ++c)
          ok &= backward_site_rows<K, kInputGrad, 1>(taps, row, gy, x, wt, gx, gw_part, gb_part, c, g);
      }
      if (end == g.m) fill.finish();
    }
    if (!ok) valid = false;
  });
}

// Sites per block of a pass that goes over its sites once per channel panel (the listed and tiled paths): a block's
// sites are prepared (listed, tiled), then walked panel by panel, so the rows the walks read (their own and their
// taps' sources) stay in L2 from one panel to the next rather than coming from L3 for each (the tiled forward, one
// thread, fp32, 3 alternating rounds: 5.7-5.9 -> 4.5-5.1 ms at 192@28, unchanged at 96@56; the listed path below).
constexpr int64_t kBlockBytes = int64_t(128) << 10;  // of a block's own rows

int64_t block_sites(int64_t c, size_t element) {
  return std::max<int64_t>(16, kBlockBytes / (c * static_cast<int64_t>(element)));
}

// fn(b0, b1) for consecutive blocks [b0, b1) of `block` sites covering [begin, end).
template <typename Fn>
void for_each_site_block(int64_t begin, int64_t end, int64_t block, Fn&& fn) {
  for (int64_t b0 = begin; b0 < end; b0 += block) fn(b0, std::min(end, b0 + block));
}

// ---------------------------------------------------------------------------------------------------
// rows layout at stride 1: tiles of adjacent active sites, register-blocked.
//
// SparK's active sites come in horizontal runs (patches). A tile is 1, 2, 4 or kMaxTile consecutive entries
// of the index that are adjacent sites of one image row. For one channel vector (cpu/vec.h) a tile keeps
// its outputs' accumulators in registers, with one kernel row's K weights, and streams each input vector
// of its K x (tile + K - 1) window once into every accumulator that uses it, instead of loading a weight
// and an input vector per FMA. The weight gradient keeps one kernel row's K tap sums in registers across
// all tiles of a chunk. Inactive and out-of-image window sites are skipped, never read, by tests that give
// the same answer for every channel vector of a tile (the branch predictor learns them). Channels go in
// blocks of kBlockVectors vectors, all tiles of a range per block, so the block's weights (and weight
// gradient partials) stay in L1 while the tiles stream through. Each output sums its active taps in
// row-major order, as the per-site path does, so results do not depend on the tiling.

constexpr int kMaxTile = 8;
constexpr int kBlockVectors = 4;
// Tiles pay for kernels of 5x5 and up; for 3x3 the per-site path was as fast or faster at every ConvNeXt-T
// stage (bench.ops A/B on this AVX2 machine, 2026-12-01: 2.1x vs 2.8x the reference at 768@7, 2.3x vs 2.9x
// at 96@56), its 9 taps leaving little weight reuse to win against the tiling's bookkeeping.
template <int K>
constexpr bool kTiled = K >= 5;

// A tile: `size` output sites from s0 (entries pos .. of the index); bit j of live[dy] is set if window
// column j of kernel row dy, the site at offset (dy - K/2, j - K/2) from s0, is active.
template <int K>
struct TileSpan {
  int64_t pos;
  int32_t s0;
  int size;
  uint32_t live[K];
};

// The tile for a run of `run` (>= 1) adjacent sites: the largest power of two <= min(run, kMaxTile).
inline int tile_for_run(int64_t run) { return run >= 8 ? 8 : run >= 4 ? 4 : run >= 2 ? 2 : 1; }

// fn(std::integral_constant<int, size>{}) for a tile size of tile_for_run.
template <typename Fn>
inline void with_tile_size(int size, Fn&& fn) {
  static_assert(kMaxTile == 8);
  switch (size) {
    case 8: return fn(std::integral_constant<int, 8>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    default: return fn(std::integral_constant<int, 1>{});
  }
}

// Entries [i, i + run) of the index, run <= kMaxTile, that are adjacent sites of one image row, below `end`.
inline int64_t run_length(const int32_t* index, int64_t i, int64_t end, int64_t row_len) {
  const int64_t s0 = index[i], room = row_len - s0 % row_len;
  int64_t run = 1;
  while (run < kMaxTile && run < room && i + run < end && index[i + run] == s0 + run) ++run;
  return run;
}

// The tiles of index entries [begin, end), which must be valid ascending sites (the caller's GapFiller
// checks them); the live masks come from the tiles' taps: window column j of row dy is tap (dy, j - t) of
// output t = min(j, size - 1). Those taps must be -1 or exactly the site at their offset, in the image;
// false otherwise (a corrupt table), and such a tap counts as inactive, never read.
template <int K>
bool make_tile(const int32_t* index, const int32_t* nbr, int64_t i, int64_t end, const Geometry& g,
               TileSpan<K>& tile) {
  constexpr int r = K / 2;
  const int32_t s0 = index[i];
  const int size = tile_for_run(run_length(index, i, end, g.w));
  const int32_t* taps = nbr + i * K * K;
  const int64_t h = s0 / g.w % g.h, w0 = s0 % g.w;
  bool valid = true;
  tile = TileSpan<K>{i, s0, size, {}};
  for (int dy = 0; dy < K; ++dy) {
    const bool row_inside = h + dy - r >= 0 && h + dy - r < g.h;
    for (int j = 0; j < size + K - 1; ++j) {
      const int t = std::min(j, size - 1);
      const int32_t site = taps[t * K * K + dy * K + (j - t)];
      const bool inside = row_inside && w0 + j - r >= 0 && w0 + j - r < g.w;
      const bool active = site != -1 && inside && site == s0 + (dy - r) * g.w + (j - r);
      valid &= site == -1 || active;
      tile.live[dy] |= static_cast<uint32_t>(active) << j;
    }
  }
  return valid;
}

// Offset in a rows tensor of channel c0 of window column 0 of kernel row dy.
template <int K>
inline int64_t window_row(const TileSpan<K>& tile, int dy, const Geometry& g, int64_t c0) {
  return (static_cast<int64_t>(tile.s0) + (dy - K / 2) * g.w - K / 2) * g.c + c0;
}

// The walk the tile gather and the tile weight gradient share: for each active window column j of one kernel
// row of a tile (bit j of `live`), its input vector x (`row` + j sites of `site_stride` values), and every
// (output t, tap column dx) of the tile that reads it (t + dx = j): fn(t, dx, x). Dead columns are skipped,
// never read.
template <int K, int Size, typename T, typename Fn>
__attribute__((always_inline)) inline void for_each_live_tap(uint32_t live, const T* row, int64_t site_stride,
                                                             Fn&& fn) {
#pragma GCC unroll 16
  for (int j = 0; j < Size + K - 1; ++j) {
    if (!((live >> j) & 1u)) continue;
    const auto x = cpu::load_vec(row + j * site_stride);
#pragma GCC unroll 7
    for (int dx = 0; dx < K; ++dx)
      if (j - dx >= 0 && j - dx < Size) fn(j - dx, dx, x);
  }
}

// One channel vector (channels c0 ..) of the gather of a group of `Group` tiles of `Size` sites each:
// dst(t) = init + sum over active taps of wt[tap] x src(tap's site), for the tiles' output sites t. Tiles of
// 1 or 2 sites are gathered in groups so that a kernel row's K weight vectors are loaded once for up to
// kMaxTile accumulators, as for one tile of kMaxTile sites.
template <int K, int Size, int Group, typename T, typename Acc>
inline void group_gather(const TileSpan<K>* tiles, const T* __restrict src, const Acc* __restrict wt,
                         cpu::Vec<Acc> init, T* __restrict dst, const Geometry& g, int64_t c0) {
  using V = cpu::Vec<Acc>;
  V acc[Group][Size];
#pragma GCC unroll 8
  for (int q = 0; q < Group; ++q)
#pragma GCC unroll 8
    for (int t = 0; t < Size; ++t) acc[q][t] = init;
  for (int dy = 0; dy < K; ++dy) {
    uint32_t any = 0;
#pragma GCC unroll 8
    for (int q = 0; q < Group; ++q) any |= tiles[q].live[dy];
    if (!any) continue;
    V w[K];
#pragma GCC unroll 7
    for (int dx = 0; dx < K; ++dx) w[dx] = cpu::load_vec(wt + (dy * K + dx) * g.c + c0);
#pragma GCC unroll 8
    for (int q = 0; q < Group; ++q)
      for_each_live_tap<K, Size>(tiles[q].live[dy], src + window_row(tiles[q], dy, g, c0), g.c,
                                 [&](int t, int dx, V x) { acc[q][t] += w[dx] * x; });
  }
#pragma GCC unroll 8
  for (int q = 0; q < Group; ++q) {
    T* out = dst + static_cast<int64_t>(tiles[q].s0) * g.c + c0;
#pragma GCC unroll 8
    for (int t = 0; t < Size; ++t) cpu::store_vec(out + t * g.c, acc[q][t]);
  }
}

// Calls fn(first tile, size constant, group constant) for the tiles in groups of consecutive tiles of one
// size, at most kMaxTile sites and a power of two tiles per group.
template <int K, typename Fn>
void for_each_group(const std::vector<TileSpan<K>>& tiles, Fn&& fn) {
  using std::integral_constant;
  for (size_t i = 0; i < tiles.size();) {
    const int size = tiles[i].size;
    size_t n = 1;
    while (n < static_cast<size_t>(kMaxTile / size) && i + n < tiles.size() && tiles[i + n].size == size) ++n;
    const int group = n >= 8 ? 8 : n >= 4 ? 4 : n >= 2 ? 2 : 1;
    const TileSpan<K>* first = &tiles[i];
    switch (size * 16 + group) {
      case 8 * 16 + 1: fn(first, integral_constant<int, 8>{}, integral_constant<int, 1>{}); break;
      case 4 * 16 + 2: fn(first, integral_constant<int, 4>{}, integral_constant<int, 2>{}); break;
      case 4 * 16 + 1: fn(first, integral_constant<int, 4>{}, integral_constant<int, 1>{}); break;
      case 2 * 16 + 4: fn(first, integral_constant<int, 2>{}, integral_constant<int, 4>{}); break;
      case 2 * 16 + 2: fn(first, integral_constant<int, 2>{}, integral_constant<int, 2>{}); break;
      case 2 * 16 + 1: fn(first, integral_constant<int, 2>{}, integral_constant<int, 1>{}); break;
      case 1 * 16 + 8: fn(first, integral_constant<int, 1>{}, integral_constant<int, 8>{}); break;
      case 1 * 16 + 4: fn(first, integral_constant<int, 1>{}, integral_constant<int, 4>{}); break;
      case 1 * 16 + 2: fn(first, integral_constant<int, 1>{}, integral_constant<int, 2>{}); break;
      default: fn(first, integral_constant<int, 1>{}, integral_constant<int, 1>{}); break;
    }
    i += group;
  }
}

// One kernel row dy of a tile's weight gradient for one channel vector: gw[dx] += sum over the tile's
// outputs t of gy(t) x x(tap (dy, dx) of t), active taps only.
template <int K, int Size, typename T, typename Acc>
inline void tile_weight_grad_row(const TileSpan<K>& tile, int dy, const T* __restrict x, const T* __restrict gy,
                                 const Geometry& g, int64_t c0, cpu::Vec<Acc> (&gw)[K]) {
  using V = cpu::Vec<Acc>;
  const uint32_t live = tile.live[dy];
  if (!live) return;
  V go[Size];
  const T* gy0 = gy + static_cast<int64_t>(tile.s0) * g.c + c0;
#pragma GCC unroll 8
  for (int t = 0; t < Size; ++t) go[t] = cpu::load_vec(gy0 + t * g.c);
  for_each_live_tap<K, Size>(live, x + window_row(tile, dy, g, c0), g.c,
                             [&](int t, int dx, V xv) { gw[dx] += go[t] * xv; });
}

// The tiles of index entries [begin, end), largest first, zeroing the rows of the inactive sites of dst before each
// (the GapFiller, which also checks that the index ascends); false in `ok` for a corrupt index or table.
template <int K, typename T>
void collect_tiles(const int32_t* index, const int32_t* nbr, int64_t begin, int64_t end, GapFiller<T>& fill,
                   const Geometry& g, std::vector<TileSpan<K>>& tiles, bool& ok) {
  tiles.clear();
  for (int64_t i = begin; i < end;) {
    if (!fill.advance_to(index[i])) {
      ok = false;
      ++i;
      continue;
    }
    TileSpan<K> tile;
    ok &= make_tile<K>(index, nbr, i, end, g, tile);
    for (int t = 1; t < tile.size; ++t) fill.advance_to(tile.s0 + t);
    tiles.push_back(tile);
    i += tile.size;
  }
  // Largest tiles first: equal sizes adjacent make the longest groups (for_each_group) and let the weight
  // gradient loop over each size without a dispatch per tile. The order is a function of the index and the
  // range alone, so the sums stay deterministic.
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const TileSpan<K>& a, const TileSpan<K>& b) { return a.size > b.size; });
}

// dst = the stride-1 forward gather over src (x), bias at the active sites. Channels past the last full
// vector go through the per-site path.
template <int K, typename T, typename Acc>
void gather_rows_tiled(const T* src, const Acc* wt, const Acc* bias, const int32_t* index, const int32_t* nbr,
                       T* dst, const Geometry& g, std::atomic<bool>& valid) {
  constexpr int L = cpu::kLanes<Acc>;
  const int64_t full = g.c / L * L;
  const GatherGrids gr{g.n, g.c, g.plane(), g.plane(), g.m};
  at::parallel_for(0, g.m, 256, [&](int64_t begin, int64_t end) {
    bool ok = true;
    GapFiller<T> fill{dst, g.c, first_row(index, begin, g.sites()), g.sites()};
    std::vector<TileSpan<K>> tiles;
    for_each_site_block(begin, end, block_sites(g.c, sizeof(T)), [&](int64_t b0, int64_t b1) {
      collect_tiles<K>(index, nbr, b0, b1, fill, g, tiles, ok);
      for (int64_t block = 0; block < full; block += kBlockVectors * L) {
        const int64_t block_end = std::min(full, block + kBlockVectors * L);
        for_each_group(tiles, [&](const TileSpan<K>* first, auto size, auto group) {
          for (int64_t c0 = block; c0 < block_end; c0 += L)
            group_gather<K, decltype(size)::value, decltype(group)::value>(
                first, src, wt, bias ? cpu::load_vec(bias + c0) : cpu::Vec<Acc>{}, dst, g, c0);
        });
      }
      for (const TileSpan<K>& tile : tiles)
        for (int t = 0; t < tile.size; ++t)
          for (int64_t c = full; c < g.c; ++c)
            ok &= gather_site_rows<K, false, 1>(nbr + (tile.pos + t) * K * K, src, wt, bias,
                                                dst + static_cast<int64_t>(tile.s0 + t) * g.c, c, gr);
    });
    if (end == g.m) fill.finish();
    if (!ok) valid = false;
  });
}

// The stride-1 backward, tiled: per chunk of the fixed partition (rows_chunk_sites), grad_x of its sites
// (the gather over grad_out with the mirrored weights wt_mirrored, see dwconv_site.h) and its weight and
// bias gradient partials gw_parts (chunks, k*k, C) and gb_parts (chunks, C). Tiles never cross a chunk.
template <int K, typename T, typename Acc>
void backward_rows_tiled(const T* gy, const T* x, const Acc* wt, const Acc* wt_mirrored, const int32_t* index,
                         const int32_t* nbr, T* gx, Acc* gw_parts, Acc* gb_parts, int64_t chunk_sites,
                         int64_t chunks, const Geometry& g, std::atomic<bool>& valid) {
  using V = cpu::Vec<Acc>;
  constexpr int L = cpu::kLanes<Acc>;
  const int64_t full = g.c / L * L;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    bool ok = true;
    std::vector<TileSpan<K>> tiles;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const auto [gw_part, gb_part, begin, end] =
          open_backward_chunk<K>(gw_parts, gb_parts, chunk, chunk_sites, g, g.c);
      GapFiller<T> fill{gx, g.c, first_row(index, begin, g.sites()), g.sites()};
      collect_tiles<K>(index, nbr, begin, end, fill, g, tiles, ok);
      if (end == g.m) fill.finish();
      for (int64_t block = 0; block < full; block += kBlockVectors * L) {
        const int64_t block_end = std::min(full, block + kBlockVectors * L);
        for_each_group(tiles, [&](const TileSpan<K>* first, auto size, auto group) {
          for (int64_t c0 = block; c0 < block_end; c0 += L)
            group_gather<K, decltype(size)::value, decltype(group)::value>(first, gy, wt_mirrored, V{}, gx, g, c0);
        });
        for (int64_t c0 = block; c0 < block_end; c0 += L) {
          V gb{};
          for (const TileSpan<K>& tile : tiles)
            for (int t = 0; t < tile.size; ++t) gb += cpu::load_vec(gy + static_cast<int64_t>(tile.s0 + t) * g.c + c0);
          cpu::store_vec(gb_part + c0, gb);
          for (int dy = 0; dy < K; ++dy) {
            V gw[K] = {};
            for (size_t first = 0, last; first < tiles.size(); first = last) {
              for (last = first + 1; last < tiles.size() && tiles[last].size == tiles[first].size;) ++last;
              with_tile_size(tiles[first].size, [&](auto size) {
                for (size_t i = first; i < last; ++i)
                  tile_weight_grad_row<K, decltype(size)::value, T, Acc>(tiles[i], dy, x, gy, g, c0, gw);
              });
            }
#pragma GCC unroll 7
            for (int dx = 0; dx < K; ++dx) cpu::store_vec(gw_part + (dy * K + dx) * g.c + c0, gw[dx]);
          }
        }
      }
      for (const TileSpan<K>& tile : tiles)
        for (int t = 0; t < tile.size; ++t)
          for (int64_t c = full; c < g.c; ++c)
            ok &= backward_site_rows<K, true, 1>(nbr + (tile.pos + t) * K * K,
                                                 static_cast<int64_t>(tile.s0 + t) * g.c, gy, x, wt, gx, gw_part,
                                                 gb_part, c, g);
    }
    if (!ok) valid = false;
  });
}

// ---------------------------------------------------------------------------------------------------
// rows layout at stride 1 where runs are short: site by site, through lists of active taps.
//
// Where active sites come in short runs (the small late-stage maps, where a SparK patch is a site or two), tiles
// hardly form, and a walk over all k*k taps per channel vector pays a mispredicted branch per inactive tap. So
// each range of sites first lists its sites' active taps (weight row and source row), checking the table once;
// then channels go in panels of kPanelVectors vectors (the panel's weights and weight-gradient partials stay in
// L1), and for each site of the range and each block of vectors the kernel walks the site's list with the
// block's accumulators in registers: no branch but the loop's. Each output sums its active taps in row-major
// order, as every other path does.
//
// The walks are cheap per tap (two list loads, then two loads per vector), so their cost is in the loads: a
// panel's walk is compiled as its own function (noinline), where the walk's pointers stay in registers (inlined
// into the pass's loop nest, GCC kept them on the stack: 15 loads per 4 FMAs of the forward walk), and each walk
// goes 8 vectors wide per site, amortizing the list loads. The backward walks each site twice, grad_x (the
// forward's gather over grad_out) then the weight gradient, rather than once for both 4 vectors wide: A/B of the
// op call, one thread, median over 6-10 alternating runs of CPU time relative to the forward's in the same process
// (this AVX2 machine under load, 2026-12-02), the fp32 backward went from 2.2x to 2.05x the forward at 384@14 and
// from 2.15-2.5x to 1.9-2.1x at 768@7; bf16 from 2.1x to 1.9x at 384@14, unchanged within the noise at 768@7.
// (Weight-gradient walks 4 vectors wide measured the same, within the noise.)
//
// Two things keep a walk's rows in cache. The pass goes in blocks of sites (block_sites), each listed and then
// walked panel by panel, so a block's rows stay in L2 from one panel to the next; and the weights and weight-gradient
// partials, the kernel's own buffers, get a row stride of an odd number of cache lines (listed_weight_stride), so
// their panels spread over all of L1's sets. Both together, A/B of the op call, one thread, fp32, batch 32, third
// best of 40 calls, 3 alternating rounds on the idle machine (2026-12-02): forward + backward of the 7x7 conv 9.9-10.5
// -> 8.0-9.0 ms at 384@14 and 3.6-4.5 -> 2.6-3.3 ms at 768@7, of the 3x3 conv 4.9-6.0 -> 4.0-4.8 ms and 1.4-1.7 ->
// 1.2-1.4 ms; two threads, 7x7 at 384@14, 5.1-5.4 -> 4.4 ms; bf16 7x7 7.2-7.9 -> 6.6 ms at 384@14. Blocks of 48,
// 128 or 256 KB measured alike; the padding alone gave the forward a third of the gain.

constexpr int kPanelVectors = 8;
constexpr int kGatherVectors = 8;      // forward and grad_x: 8 accumulators
constexpr int kWeightGradVectors = 8;  // weight gradient: 8 grad_out vectors

// The active taps of the sites of a range, each site's in row-major tap order.
struct TapLists {
  std::vector<int64_t> row;     // site q's own row offset (site x C) in dst / grad_out
  std::vector<int32_t> first;   // site q's taps are entries [first[q], first[q + 1])
  std::vector<int64_t> weight;  // the tap's weight row offset (tap number x weight row stride, listed_weight_stride)
  std::vector<int64_t> source;  // the tap's source row offset (source site x C)
  std::vector<int32_t> fresh;   // site q's entries [fresh[q], first[q + 1]) read rows no earlier site reads
  int64_t reach = -1;           // the largest source row offset listed so far

  int64_t sites() const { return static_cast<int64_t>(row.size()); }
  void clear() {
    row.clear();
    weight.clear();
    source.clear();
    fresh.clear();
    first.assign(1, 0);
    reach = -1;
  }
  // Lists a site's taps; false if a tap is neither -1 nor a site below src_sites (such taps are left out).
  template <int K>
  bool add(int64_t site, const int32_t* taps, int64_t src_sites, int64_t c, int64_t weight_stride) {
    bool valid = true;
    row.push_back(site * c);
    int32_t fresh_from = -1;
    for (int t = 0; t < K * K; ++t) {
      const int32_t s = taps[t];
      if (s == -1) continue;
      if (s < 0 || s >= src_sites) {
        valid = false;
        continue;
      }
      const int64_t offset = static_cast<int64_t>(s) * c;
      if (fresh_from < 0 && offset > reach) fresh_from = static_cast<int32_t>(source.size());
      weight.push_back(t * weight_stride);
      source.push_back(offset);
    }
    const int32_t end = static_cast<int32_t>(source.size());
    fresh.push_back(fresh_from < 0 ? end : fresh_from);
    if (end > first.back()) reach = std::max(reach, source.back());
    first.push_back(end);
    return valid;
  }
};

// Lists the index entries [begin, end) (destination sites), zeroing the rows of the inactive sites of the
// destination before each (fill, which also checks that the index ascends); false in ok for a corrupt index or
// table.
template <int K, typename T>
void list_sites(const int32_t* index, const int32_t* nbr, int64_t begin, int64_t end, int64_t src_sites,
                int64_t c, int64_t weight_stride, GapFiller<T>& fill, TapLists& lists, bool& ok) {
  lists.clear();
  for (int64_t i = begin; i < end; ++i) {
    if (!fill.advance_to(index[i])) {
      ok = false;
      continue;
    }
    ok &= lists.add<K>(index[i], nbr + i * K * K, src_sites, c, weight_stride);
  }
}

// Channels [c0, c1) of the rows that site q reads first in its range (its fresh taps), in the sources a and b (b
// null: a only). The walks go site by site, so a source row misses in cache at a site's fresh taps, mostly those of
// its last kernel row, and hits at every later tap that reads it; those rows lie KBs apart and scattered, which the
// hardware prefetchers do not follow, so the walks prefetch them kListAhead sites ahead.
constexpr int64_t kListAhead = 4;

template <typename T>
inline void prefetch_fresh_rows(const TapLists& l, int64_t q, const T* a, const T* b, int64_t c0, int64_t c1) {
  constexpr int64_t kLine = 64;
  const auto lines = [](const T* from, const T* to) {
    const char* line = reinterpret_cast<const char*>(from);
    line -= reinterpret_cast<uintptr_t>(line) % kLine;
    for (; line < reinterpret_cast<const char*>(to); line += kLine) __builtin_prefetch(line);
  };
  for (int32_t e = l.fresh[q]; e < l.first[q + 1]; ++e) {
    lines(a + l.source[e] + c0, a + l.source[e] + c1);
    if (b) lines(b + l.source[e] + c0, b + l.source[e] + c1);
  }
}

// walk(q) for every listed site q in order, channels [c0, c1) of the fresh rows of sources a and b (b null: a only)
// prefetched kListAhead sites ahead.
template <typename T, typename Walk>
__attribute__((always_inline)) inline void walk_listed_sites(const TapLists& l, const T* a, const T* b, int64_t c0,
                                                             int64_t c1, Walk&& walk) {
  const int64_t sites = l.sites();
  for (int64_t q = 0; q < std::min(sites, kListAhead); ++q) prefetch_fresh_rows(l, q, a, b, c0, c1);
  for (int64_t q = 0; q < sites; ++q) {
    if (q + kListAhead < sites) prefetch_fresh_rows(l, q + kListAhead, a, b, c0, c1);
    walk(q);
  }
}

// The blocks of a panel [p0, p1) of whole vectors: fn(c0, vectors constant) in blocks of kMax vectors, then of 4,
// then single vectors.
template <int kMax, typename Acc, typename Fn>
__attribute__((always_inline)) inline void for_each_panel_block(int64_t p0, int64_t p1, Fn&& fn) {
  constexpr int L = cpu::kLanes<Acc>;
  int64_t c0 = p0;
  for (; c0 + kMax * L <= p1; c0 += kMax * L) fn(c0, std::integral_constant<int, kMax>{});
  if constexpr (kMax > 4)
    for (; c0 + 4 * L <= p1; c0 += 4 * L) fn(c0, std::integral_constant<int, 4>{});
  for (; c0 + L <= p1; c0 += L) fn(c0, std::integral_constant<int, 1>{});
}

// Every panel [p0, p1) of the whole vectors of C, then every channel past the last full vector: panel(p0, p1),
// channel(ch).
template <typename Acc, typename Panel, typename Channel>
inline void for_each_panel(int64_t c, Panel&& panel, Channel&& channel) {
  constexpr int L = cpu::kLanes<Acc>;
  const int64_t full = c / L * L;
  for (int64_t p0 = 0; p0 < full; p0 += kPanelVectors * L) panel(p0, std::min(full, p0 + kPanelVectors * L));
  for (int64_t ch = full; ch < c; ++ch) channel(ch);
}

// Row stride (in values) of the listed path's own (k*k, C) buffers: the weights and the weight-gradient partials.
// A walk reads a panel of each tap's weight row; rows a multiple of 128 bytes long (every ConvNeXt width) would put
// all those panels into a half or a quarter of L1's 64 sets, where they evict each other and the panels of the
// source rows, whose stride (x's) the kernel cannot choose. (With C = 768 the forward took 1.2x the time per FMA
// that C = 784 took.)
template <typename Acc>
int64_t listed_weight_stride(int64_t c) {
  return odd_lines_stride<Acc>(c);
}

// Channels [c0, c0 + NV vectors) of site q: dst = init + sum over its listed taps of wt[tap] x src(tap's row).
template <int NV, typename T, typename Acc>
__attribute__((always_inline)) inline void listed_gather(const TapLists& l, int64_t q, const T* __restrict src,
                                                         const Acc* __restrict wt, const Acc* bias,
                                                         T* __restrict dst, int64_t c0) {
  using V = cpu::Vec<Acc>;
  constexpr int L = cpu::kLanes<Acc>;
  const int64_t* __restrict weight = l.weight.data();
  const int64_t* __restrict source = l.source.data();
  const Acc* w0 = wt + c0;
  const T* x0 = src + c0;
  V acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) acc[v] = bias ? cpu::load_vec(bias + c0 + v * L) : V{};
  for (int32_t e = l.first[q], end = l.first[q + 1]; e < end; ++e) {
    const Acc* w = w0 + weight[e];
    const T* x = x0 + source[e];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] += cpu::load_vec(w + v * L) * cpu::load_vec(x + v * L);
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) cpu::store_vec(dst + l.row[q] + c0 + v * L, acc[v]);
}

// The forward gather of channel panel [p0, p1) of every listed site (see the section's comment for the noinline).
template <typename T, typename Acc>
__attribute__((noinline)) void gather_listed_panel(const TapLists& l, const T* src, const Acc* wt, const Acc* bias,
                                                   T* dst, int64_t p0, int64_t p1) {
  walk_listed_sites(l, src, static_cast<const T*>(nullptr), p0, p1, [&](int64_t q) {
    for_each_panel_block<kGatherVectors, Acc>(
        p0, p1, [&](int64_t c0, auto nv) { listed_gather<decltype(nv)::value>(l, q, src, wt, bias, dst, c0); });
  });
}

// The same for the single channel ch (past the last full vector), every listed site.
template <typename T, typename Acc>
void gather_listed_channel(const TapLists& l, const T* src, const Acc* wt, const Acc* bias, T* dst, int64_t ch) {
  for (int64_t q = 0; q < l.sites(); ++q) {
    Acc acc = bias ? bias[ch] : Acc(0);
    for (int32_t e = l.first[q]; e < l.first[q + 1]; ++e)
      acc += wt[l.weight[e] + ch] * static_cast<Acc>(src[l.source[e] + ch]);
    dst[l.row[q] + ch] = static_cast<T>(acc);
  }
}

// dst (every site: computed at the index's sites, zero elsewhere) = the stride-1 forward gather over src (x), bias
// at the active sites, by lists.
template <int K, typename T, typename Acc>
void gather_rows_listed(const T* src, const Acc* wt, const Acc* bias, const int32_t* index, const int32_t* nbr,
                        T* dst, const Geometry& g, std::atomic<bool>& valid) {
  const int64_t ws = listed_weight_stride<Acc>(g.c);
  at::parallel_for(0, g.m, 64, [&](int64_t begin, int64_t end) {
    bool ok = true;
    GapFiller<T> fill{dst, g.c, first_row(index, begin, g.sites()), g.sites()};
    TapLists lists;
    for_each_site_block(begin, end, block_sites(g.c, sizeof(T)), [&](int64_t b0, int64_t b1) {
      list_sites<K>(index, nbr, b0, b1, g.sites(), g.c, ws, fill, lists, ok);
      if (b1 == g.m) fill.finish();
      for_each_panel<Acc>(
          g.c, [&](int64_t p0, int64_t p1) { gather_listed_panel(lists, src, wt, bias, dst, p0, p1); },
          [&](int64_t ch) { gather_listed_channel(lists, src, wt, bias, dst, ch); });
    });
    if (!ok) valid = false;
  });
}

// Channels [c0, c0 + NV vectors) of site q of a backward chunk: the site's weight and bias gradient contributions to
// the chunk's partials gw_part (k*k, C) and gb_part (C,), grad_out of the site held in registers.
template <int NV, typename T, typename Acc>
__attribute__((always_inline)) inline void listed_weight_grad(const TapLists& l, int64_t q, const T* __restrict gy,
                                                              const T* __restrict x, Acc* __restrict gw_part,
                                                              Acc* __restrict gb_part, int64_t c0) {
  using V = cpu::Vec<Acc>;
  constexpr int L = cpu::kLanes<Acc>;
  const int64_t* __restrict weight = l.weight.data();
  const int64_t* __restrict source = l.source.data();
  Acc* gw0 = gw_part + c0;
  const T* x0 = x + c0;
  V go[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    go[v] = cpu::load_vec(gy + l.row[q] + c0 + v * L);
    cpu::store_vec(gb_part + c0 + v * L, cpu::load_vec(gb_part + c0 + v * L) + go[v]);
  }
  for (int32_t e = l.first[q], end = l.first[q + 1]; e < end; ++e) {
    Acc* gw = gw0 + weight[e];
    const T* xs = x0 + source[e];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      cpu::store_vec(gw + v * L, cpu::load_vec(gw + v * L) + go[v] * cpu::load_vec(xs + v * L));
  }
}

// The backward of channel panel [p0, p1) of every listed site of a chunk (see the section's comment for the
// noinline): per site, grad_x by the forward's walk over grad_out with the mirrored weights wt_mirrored
// (dwconv_site.h), then the weight and bias gradient walk over the same rows, while they are in cache.
template <typename T, typename Acc>
__attribute__((noinline)) void backward_listed_panel(const TapLists& l, const T* gy, const T* x,
                                                     const Acc* wt_mirrored, T* gx, Acc* gw_part, Acc* gb_part,
                                                     int64_t p0, int64_t p1) {
  walk_listed_sites(l, gy, x, p0, p1, [&](int64_t q) {
    for_each_panel_block<kGatherVectors, Acc>(p0, p1, [&](int64_t c0, auto nv) {
      listed_gather<decltype(nv)::value>(l, q, gy, wt_mirrored, static_cast<const Acc*>(nullptr), gx, c0);
    });
    for_each_panel_block<kWeightGradVectors, Acc>(p0, p1, [&](int64_t c0, auto nv) {
      listed_weight_grad<decltype(nv)::value>(l, q, gy, x, gw_part, gb_part, c0);
    });
  });
}

// The same for the single channel ch (past the last full vector), every listed site of a chunk.
template <typename T, typename Acc>
void backward_listed_channel(const TapLists& l, const T* gy, const T* x, const Acc* wt_mirrored, T* gx, Acc* gw_part,
                             Acc* gb_part, int64_t ch) {
  for (int64_t q = 0; q < l.sites(); ++q) {
    const Acc go = static_cast<Acc>(gy[l.row[q] + ch]);
    Acc acc = 0;
    gb_part[ch] += go;
    for (int32_t e = l.first[q]; e < l.first[q + 1]; ++e) {
      const int64_t source = l.source[e] + ch;
      acc += wt_mirrored[l.weight[e] + ch] * static_cast<Acc>(gy[source]);
      gw_part[l.weight[e] + ch] += go * static_cast<Acc>(x[source]);
    }
    gx[l.row[q] + ch] = static_cast<T>(acc);
  }
}

// The stride-1 backward by lists: per chunk of the fixed partition (rows_chunk_sites), grad_x of its sites and its
// weight and bias gradient partials gw_parts (chunks, k*k, C) and gb_parts (chunks, C).
template <int K, typename T, typename Acc>
void backward_rows_listed(const T* gy, const T* x, const Acc* wt_mirrored, const int32_t* index, const int32_t* nbr,
                          T* gx, Acc* gw_parts, Acc* gb_parts, int64_t chunk_sites, int64_t chunks, const Geometry& g,
                          std::atomic<bool>& valid) {
  const int64_t ws = listed_weight_stride<Acc>(g.c);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    bool ok = true;
    TapLists lists;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const auto [gw_part, gb_part, begin, end] = open_backward_chunk<K>(gw_parts, gb_parts, chunk, chunk_sites, g, ws);
      GapFiller<T> fill{gx, g.c, first_row(index, begin, g.sites()), g.sites()};
      for_each_site_block(begin, end, block_sites(g.c, sizeof(T)), [&](int64_t b0, int64_t b1) {
        list_sites<K>(index, nbr, b0, b1, g.sites(), g.c, ws, fill, lists, ok);
        if (b1 == g.m) fill.finish();
        for_each_panel<Acc>(
            g.c,
            [&](int64_t p0, int64_t p1) {
              backward_listed_panel(lists, gy, x, wt_mirrored, gx, gw_part, gb_part, p0, p1);
            },
            [&](int64_t ch) { backward_listed_channel(lists, gy, x, wt_mirrored, gx, gw_part, gb_part, ch); });
      });
    }
    if (!ok) valid = false;
  });
}

// The kernels of a pass: at stride 1 in the rows layout, by the mean run of adjacent active sites of the index
// (SparK's patch at this scale: 12, 6, 3 and 1.5 sites at ConvNeXt-T's four stages at ratio 0.6), listed below
// kListedBelowRun sites, else tiled (kTiled kernel sizes) or site by site; site by site at stride 2 and in the
// planes layout. A/B of the op calls at bench.ops' ConvNeXt-T shapes, one thread, minimum CPU time, on this
// AVX2 machine under load (2026-12-01): at 768@7 the listed forward took 0.8 ms vs 2.3 (7x7) and 0.4 vs 0.6
// (3x3); at 384@14 3.0 vs 4.0 (7x7) and 1.6 vs 2.0 ms (3x3), the backward 0-15% less; at 192@28 and 96@56 the
// tiles (7x7: forward 5.5 vs 8.5 ms at 192@28) and the per-site path (3x3) were faster. The path is a
// function of the index alone, so results stay bit-identical for any thread count.
enum class RowsPath { listed, tiled, sites };
constexpr double kListedBelowRun = 4;

// Whether the mean run of adjacent active sites (along an image row of w sites) of the m-site index is below `run`.
// A run ends at the end of its row (row_end), found by one division per run rather than per site (40960 sites at
// 96@56, batch 32, where rows_grad_out counts the runs of a copy that takes 2 ms in bf16).
bool runs_below(const int32_t* index, int64_t m, int64_t w, double run) {
  int64_t runs = 0, row_end = 0;
  for (int64_t i = 0; i < m; ++i)
    if (i == 0 || index[i] != index[i - 1] + 1 || index[i] == row_end) {
      ++runs;
      row_end = (index[i] / w + 1) * w;
    }
  return static_cast<double>(m) < run * static_cast<double>(runs);
}

template <int K>
RowsPath rows_path(const int32_t* index, const Geometry& g) {
  if (!g.rows || g.stride != 1) return RowsPath::sites;
  if (runs_below(index, g.m, g.w, kListedBelowRun)) return RowsPath::listed;
  return kTiled<K> ? RowsPath::tiled : RowsPath::sites;
}

// The (C, P) planes at src, sc apart, as P rows of C values ld apart at dst, by 8 x 8 register transposes
// (cpu::transpose8x8) along the planes; where P or C is not a multiple of 8 the last block overlaps the one before.
// P, C >= 8. Each block prefetches the next 8 planes at its sites: planes of a few lines are too short for the
// hardware prefetcher (without it, 1.4x the time at 384@14 fp32 and 1.9x at 192@28 bf16).
template <typename Bits>
void transpose_planes(const Bits* src, int64_t sc, int64_t p, int64_t c, Bits* dst, int64_t ld) {
  for (int64_t c0 = 0; c0 < c; c0 += 8) {
    const int64_t cb = std::min(c0, c - 8);
    for (int64_t s0 = 0; s0 < p; s0 += 8) {
      const int64_t sb = std::min(s0, p - 8);
      if (cb + 16 <= c)
        for (int64_t ch = cb + 8; ch < cb + 16; ++ch) __builtin_prefetch(src + ch * sc + sb);
      cpu::transpose8x8(src + cb * sc + sb, sc, dst + sb * ld + cb, ld);
    }
  }
}

// grad_out in the rows layout. The backward reads it at the active output sites only (the tables name no
// other site, as a channels_last grad_out with garbage at its inactive sites shows), so an NCHW or expanded
// (stride-0, what y.sum().backward() gives) grad_out becomes a channels_last tensor of its active rows, the
// other rows left unwritten (writing them cost more memory traffic than the copy itself), instead of a
// transposing copy of all of it; a channels_last one is used in place. A row whose
// channels are contiguous or all one value (stride 1 or 0) is one copy or fill. Otherwise (NCHW) the copy goes
// image by image, for 4- and 2-byte types with contiguous planes either
//  * by_image, where the mean run of adjacent active sites is below kByImageBelowRun: the whole image (up to
//    kByImageBytes) transposed plane block by plane block (transpose_planes) into a per-thread scratch that stays in
//    L2, then the active rows copied from it. Rows in the scratch are an odd number of cache lines apart, so a
//    transpose's 8 rows fall in different cache sets (C = 768 fp32: 0.69 vs 0.48 ms at 768@7 before padding).
//  * or by runs of adjacent active sites of one image row; within a run (at unit site stride), 8 sites x 8
//    channels at a time by a register transpose (cpu::transpose8x8).
// This copy alone (a C++ loop over rows_grad_out), one thread, batch 32, ratio 0.6, this 2-core AVX2 EPYC (512 KB
// L2) under load, best of 6-12 alternating rounds, ms fp32 / bf16, by_image vs by runs (both with the unrolled
// transpose8x8): 384@14 (runs of 3 sites) 0.7-0.8 / 0.37 vs 1.4-2.2 / 0.7-1.1; 768@7 (1.5) 0.23-0.29 / 0.18-0.19 vs
// 0.47-0.51 / 0.40-0.42; 192@28 (6) 2.2-2.7 / 1.2-1.4 vs 2.9-3.6 / 1.7-2.2; 96@56 (12) 5.3-7.0 / 3.2-3.6 vs 3.8-5.7 /
// 1.9-3.3. kByImageBytes bounds the scratch of an image at twice the L2 (192@28 fp32: 650 KB).
constexpr double kByImageBelowRun = 8;
constexpr int64_t kByImageBytes = int64_t(1) << 20;

template <typename T>
at::Tensor rows_grad_out(const at::Tensor& grad_out, const int32_t* index, const Geometry& g) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  constexpr bool kTransposable = sizeof(T) == 4 || sizeof(T) == 2;
  if (grad_out.is_contiguous(at::MemoryFormat::ChannelsLast)) return grad_out;
  at::Tensor gy = at::empty(g.out_shape(), grad_out.options().memory_format(at::MemoryFormat::ChannelsLast));
  const T* src = cpu::data_as<T>(grad_out);
  T* dst = cpu::mutable_data_as<T>(gy);
  const int64_t sn = grad_out.stride(0), sc = grad_out.stride(1), sh = grad_out.stride(2), sw = grad_out.stride(3);
  const int64_t plane = g.out_plane(), ld = odd_lines_stride<T>(g.c);  // scratch row stride
  const bool by_image = kTransposable && sw == 1 && sh == g.out_w && sc > 1 && g.c >= 8 && plane >= 8 &&
                        plane * ld * static_cast<int64_t>(sizeof(T)) <= kByImageBytes &&
                        runs_below(index, g.m, g.out_w, kByImageBelowRun);
  // Image by image: the image's entries of the (ascending) index.
  const std::vector<int64_t> start = image_starts(index, g.m, g.n, plane);
  at::parallel_for(0, g.n, 1, [&](int64_t image_begin, int64_t image_end) {
    struct Run {
      int64_t in, out, sites;  // source offset, destination row offset, adjacent sites (one if not sw == 1)
    };
    std::vector<Run> runs;
    std::vector<T> scratch(by_image ? plane * ld : 0);
    for (int64_t image = image_begin; image < image_end; ++image) {
      if constexpr (kTransposable) {
        if (by_image) {
          transpose_planes(reinterpret_cast<const Bits*>(src + image * sn), sc, plane, g.c,
                           reinterpret_cast<Bits*>(scratch.data()), ld);
          for (int64_t i = start[image]; i < start[image + 1]; ++i) {
            const int64_t site = index[i];
            if (site < 0 || site >= g.out_sites()) continue;  // a corrupt index: the kernel that reads gy reports it
            const int64_t n = site / plane, hw = site % plane;
            if (n == image)
              std::copy(scratch.data() + hw * ld, scratch.data() + hw * ld + g.c, dst + site * g.c);
            else  // a corrupt index too, copied as it is
              for (int64_t ch = 0; ch < g.c; ++ch) dst[site * g.c + ch] = src[n * sn + hw + ch * sc];
          }
          continue;
        }
      }
      runs.clear();
      for (int64_t i = start[image]; i < start[image + 1]; ++i) {
        const int64_t site = index[i];
        if (site < 0 || site >= g.out_sites()) continue;  // a corrupt index: the kernel that reads gy reports it
        const int64_t n = site / plane, hw = site % plane;
        const int64_t in = n * sn + hw / g.out_w * sh + hw % g.out_w * sw;
        if (sc == 0)
          std::fill(dst + site * g.c, dst + (site + 1) * g.c, src[in]);
        else if (sc == 1)
          std::copy(src + in, src + in + g.c, dst + site * g.c);
        else if (sw == 1 && !runs.empty() && hw % g.out_w != 0 &&
                 runs.back().out + runs.back().sites * g.c == site * g.c)
          ++runs.back().sites;
        else
          runs.push_back({in, site * g.c, 1});
      }
      // kCopyChannels channels (a 64-byte line of floats) at a time over all the image's runs: a pass reads that
      // many planes forward, which the hardware prefetches (a walk site by site would miss in cache at every
      // new line of every plane), and writes a whole line of each active row. Planes of a few KB are too short
      // for the hardware to catch on: each pass prefetches the next pass's planes.
      constexpr int64_t kCopyChannels = 16, kShortPlaneBytes = 4096, kLine = 64 / sizeof(T);
      const int64_t plane_span = (g.out_h - 1) * sh + (g.out_w - 1) * sw + 1;
      const bool prefetch = plane_span * static_cast<int64_t>(sizeof(T)) <= kShortPlaneBytes;
      const int64_t plane_lines = (plane_span + kLine - 1) / kLine, image_runs = static_cast<int64_t>(runs.size());
      for (int64_t c0 = 0; c0 < g.c; c0 += kCopyChannels) {
        const int64_t c1 = std::min(g.c, c0 + kCopyChannels);
        // The next pass's lines, spread over this pass's runs: a burst of them at the pass's start filled the
        // queue of outstanding misses and stalled the copy (this copy alone, one thread, caches flushed, this AVX2
        // machine under load: 384@14 in 1.3-1.5 ms vs 1.7-1.9 ms, best of 40; 192@28 and 768@7 within the noise).
        const int64_t next_lines = prefetch ? (std::min(g.c, c1 + kCopyChannels) - c1) * plane_lines : 0;
        int64_t prefetched = 0;
        const auto prefetch_until = [&](int64_t line) {
          for (; prefetched < line; ++prefetched) {
            const int64_t ch = c1 + prefetched / plane_lines;
            __builtin_prefetch(src + image * sn + ch * sc + prefetched % plane_lines * kLine);
          }
        };
        for (int64_t r = 0; r < image_runs; ++r) {
          prefetch_until(next_lines * (r + 1) / image_runs);
          const Run& run = runs[r];
          int64_t j = 0;
          if constexpr (kTransposable)
            if (c1 - c0 == kCopyChannels)
              for (; j + 8 <= run.sites; j += 8)
                for (int64_t c8 = c0; c8 < c1; c8 += 8)
                  cpu::transpose8x8(reinterpret_cast<const Bits*>(src + run.in + j + c8 * sc), sc,
                                    reinterpret_cast<Bits*>(dst + run.out + j * g.c + c8), g.c);
          for (; j < run.sites; ++j)
            for (int64_t ch = c0; ch < c1; ++ch) dst[run.out + j * g.c + ch] = src[run.in + j * sw + ch * sc];
        }
      }
    }
  });
  return gy;
}

// ---------------------------------------------------------------------------------------------------
// planes layout: task (n, c) covers the active sites of image n in channel c.

template <int K, bool kMirrored, typename T, typename Acc>
void gather_planes(const T* src, const Acc* w, const Acc* bias, const int32_t* index, const int32_t* nbr, T* dst,
                   const GatherGrids& gr, const std::vector<int64_t>& start, std::atomic<bool>& valid) {
  const int64_t src_hw = gr.src_plane, dst_hw = gr.dst_plane;
  at::parallel_for(0, gr.n * gr.c, 1, [&](int64_t task_begin, int64_t task_end) {
    bool ok = true;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t n = task / gr.c, c = task % gr.c;
      const SiteView<T> sv{src + task * src_hw, n * src_hw, src_hw, 1};
      T* dp = dst + task * dst_hw;
      GapFiller<T> fill{dp, 1, 0, dst_hw};
      for (int64_t i = start[n]; i < start[n + 1]; ++i) {
        const int64_t s = index[i] - n * dst_hw;
        if (!fill.advance_to(s)) {
          ok = false;
          continue;
        }
        Acc acc[1] = {bias ? bias[c] : Acc(0)};
        ok &= dwconv_site_gather<K, kMirrored, 1>(nbr + i * K * K, sv, w + c * K * K, 1, acc);
        dp[s] = static_cast<T>(acc[0]);
      }
      fill.finish();
    }
    if (!ok) valid = false;
  });
}

template <int K, bool kInputGrad, typename T, typename Acc>
void backward_planes(const T* gy, const T* x, const Acc* w, const int32_t* index, const int32_t* nbr, T* gx,
                     Acc* gw_parts, Acc* gb_parts, const Geometry& g, const std::vector<int64_t>& start,
                     std::atomic<bool>& valid) {
  const int64_t hw = g.plane(), out_hw = g.out_plane();
  at::parallel_for(0, g.n * g.c, 1, [&](int64_t task_begin, int64_t task_end) {
    bool ok = true;
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t n = task / g.c, c = task % g.c;
      const SiteView<T> gv{gy + task * out_hw, n * out_hw, out_hw, 1};
      const SiteView<T> xv{x + task * hw, n * hw, hw, 1};
      T* gxp = kInputGrad ? gx + task * hw : nullptr;  // kInputGrad: stride 1, hw == out_hw
      Acc gw[K * K] = {};
      Acc gb = 0;
      GapFiller<T> fill{gxp, kInputGrad ? 1 : 0, 0, out_hw};
      for (int64_t i = start[n]; i < start[n + 1]; ++i) {
        const int32_t* taps = nbr + i * K * K;
        const int64_t s = index[i] - n * out_hw;
        if (!fill.advance_to(s)) {
          ok = false;
          continue;
        }
        const Acc gs[1] = {static_cast<Acc>(gy[task * out_hw + s])};
        if constexpr (kInputGrad) {
          Acc acc[1] = {0};
          ok &= dwconv_site_gather<K, true, 1>(taps, gv, w + c * K * K, 1, acc);
          gxp[s] = static_cast<T>(acc[0]);
        }
        ok &= dwconv_site_weight_grad<K, 1>(taps, gs, xv, gw, 1);
        gb += gs[0];
      }
      fill.finish();
      // Partials of image n, in (n, C, k*k) and (n, C).
      std::copy(gw, gw + K * K, gw_parts + task * K * K);
      gb_parts[task] = gb;
    }
    if (!ok) valid = false;
  });
}

// Sum the chunk partials in chunk order: out[i] = sum over the chunks of parts[chunk][i], for parts (chunks, n).
// The order is fixed (bit-identical for any thread count); positions run innermost, so the sums vectorize.
template <typename T>
void reduce_chunks(const T* parts, int64_t chunks, int64_t n, T* out) {
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    std::fill(out + begin, out + end, T(0));
    for (int64_t k = 0; k < chunks; ++k) {
      const T* part = parts + k * n;
      for (int64_t i = begin; i < end; ++i) out[i] += part[i];
    }
  });
}

// ---------------------------------------------------------------------------------------------------

// x's (C, 1, k, k) weight (or (C,) bias) in the accumulation dtype, as the kernels read it: transposed to
// (k*k, C) for the rows layout.
at::Tensor kernel_weight(const at::Tensor& weight, const Geometry& g, at::ScalarType acc) {
  const at::Tensor w = weight.to(acc);
  return g.rows ? w.reshape({g.c, g.k * g.k}).t().contiguous() : w.contiguous();
}

// The (k*k, C) weight w in rows of `stride` >= C values, zero past C.
at::Tensor with_row_stride(const at::Tensor& w, int64_t stride) {
  if (stride == w.size(1)) return w;
  at::Tensor out = at::zeros({w.size(0), stride}, w.options());
  out.narrow(1, 0, w.size(1)).copy_(w);
  return out;
}

// dst = the gather over src of the index's sites (either layout); false in `valid` for a corrupt table.
template <int K, bool kMirrored, typename T, typename Acc>
void gather(const T* src, const Acc* w, const Acc* bias, const at::Tensor& index, const at::Tensor& nbr, T* dst,
            const GatherGrids& gr, bool rows, std::atomic<bool>& valid) {
  const int32_t* idx = index.const_data_ptr<int32_t>();
  if (rows) {
    gather_rows<K, kMirrored>(src, w, bias, idx, nbr.const_data_ptr<int32_t>(), dst, gr, valid);
  } else {
    const auto start = image_starts(idx, gr.m, gr.n, gr.dst_plane);
    valid = valid && start[gr.n] == gr.m;
    gather_planes<K, kMirrored>(src, w, bias, idx, nbr.const_data_ptr<int32_t>(), dst, gr, start, valid);
  }
}

template <typename scalar_t, int K>
at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& index, const at::Tensor& neighbors, const Geometry& g) {
  using T = storage_t<scalar_t>;
  using Acc = acc_t<scalar_t>;
  const at::Tensor xk = x.contiguous(g.memory_format());
  const auto out_options = xk.options().memory_format(g.memory_format());
  if (g.m == 0 || g.c == 0) return at::zeros(g.out_shape(), out_options);
  at::Tensor y = at::empty(g.out_shape(), out_options);  // every element is written: computed or zero
  const at::Tensor idx = index.contiguous(), nbr = neighbors.contiguous();
  const auto acc = c10::CppTypeToScalarType<Acc>::value;
  const at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor w = kernel_weight(weight, g, acc);
  std::atomic<bool> valid{true};
  const Acc* bp = b.defined() ? b.const_data_ptr<Acc>() : nullptr;
  const int32_t* ip = idx.const_data_ptr<int32_t>();
  switch (rows_path<K>(ip, g)) {
    case RowsPath::listed: {
      const at::Tensor w_listed = with_row_stride(w, listed_weight_stride<Acc>(g.c));
      gather_rows_listed<K>(cpu::data_as<T>(xk), w_listed.const_data_ptr<Acc>(), bp, ip,
                            nbr.const_data_ptr<int32_t>(), cpu::mutable_data_as<T>(y), g, valid);
      break;
    }
    case RowsPath::tiled:
      gather_rows_tiled<K>(cpu::data_as<T>(xk), w.const_data_ptr<Acc>(), bp, ip, nbr.const_data_ptr<int32_t>(),
                           cpu::mutable_data_as<T>(y), g, valid);
      break;
    case RowsPath::sites:
      gather<K, false>(cpu::data_as<T>(xk), w.const_data_ptr<Acc>(), bp, idx, nbr, cpu::mutable_data_as<T>(y),
                       GatherGrids{g.n, g.c, g.plane(), g.out_plane(), g.m}, g.rows, valid);
  }
  check_tables("dwconv_forward", valid);
  return y;
}

template <typename scalar_t, int K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& weight, const at::Tensor& index,
                                                            const at::Tensor& neighbors,
                                                            const c10::optional<at::Tensor>& input_index,
                                                            const c10::optional<at::Tensor>& input_taps,
                                                            const Geometry& g) {
  using T = storage_t<scalar_t>;
  using Acc = acc_t<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<Acc>::value;
  const at::Tensor xk = x.contiguous(g.memory_format());
  at::Tensor gw = at::zeros(weight.sizes(), weight.options().dtype(acc));
  at::Tensor gb = at::zeros({g.c}, weight.options().dtype(acc));
  if (g.m == 0 || g.c == 0) return {at::zeros_like(xk), gw.to(weight.scalar_type()), gb.to(weight.scalar_type())};
  at::Tensor gx = at::empty_like(xk);  // every element is written: computed or zero
  const at::Tensor idx = index.contiguous(), nbr = neighbors.contiguous();
  const int32_t* ip = idx.const_data_ptr<int32_t>();
  const at::Tensor gy = g.rows ? rows_grad_out<T>(grad_out, ip, g) : grad_out.contiguous(g.memory_format());
  const at::Tensor w = kernel_weight(weight, g, acc);
  const T* gyp = cpu::data_as<T>(gy);
  const T* xp = cpu::data_as<T>(xk);
  T* gxp = cpu::mutable_data_as<T>(gx);
  std::atomic<bool> valid{true};
  const bool fused = g.stride == 1;  // input gradient in the weight-gradient pass, by the mirrored gather
  if (!fused) {
    const at::Tensor in_idx = input_index->contiguous(), in_taps = input_taps->contiguous();
    gather<K, false>(gyp, w.const_data_ptr<Acc>(), static_cast<const Acc*>(nullptr), in_idx, in_taps, gxp,
                     GatherGrids{g.n, g.c, g.out_plane(), g.plane(), in_idx.size(0)}, g.rows, valid);
  }
  int64_t chunks, weight_stride = g.c;  // the row stride of the rows layout's weight-gradient partials
  at::Tensor gw_parts, gb_parts;
  const int32_t* np = nbr.const_data_ptr<int32_t>();
  if (g.rows) {
    const int64_t chunk_sites = rows_chunk_sites(g.c, g.m);
    chunks = (g.m + chunk_sites - 1) / chunk_sites;
    const RowsPath path = rows_path<K>(ip, g);
    if (path == RowsPath::listed) weight_stride = listed_weight_stride<Acc>(g.c);
    gw_parts = at::empty({chunks, K * K, weight_stride}, x.options().dtype(acc));
    gb_parts = at::empty({chunks, g.c}, x.options().dtype(acc));
    Acc* gwp = gw_parts.mutable_data_ptr<Acc>();
    Acc* gbp = gb_parts.mutable_data_ptr<Acc>();
    // The listed and tiled paths gather grad_x with the mirrored weights: tap t holds tap k*k-1-t.
    const at::Tensor w_mirrored =
        path != RowsPath::sites ? with_row_stride(w.flip(0).contiguous(), weight_stride) : at::Tensor();
    if (path == RowsPath::listed)
      backward_rows_listed<K>(gyp, xp, w_mirrored.const_data_ptr<Acc>(), ip, np, gxp, gwp, gbp, chunk_sites, chunks, g,
                              valid);
    else if (path == RowsPath::tiled)
      backward_rows_tiled<K>(gyp, xp, w.const_data_ptr<Acc>(), w_mirrored.const_data_ptr<Acc>(), ip, np, gxp, gwp,
                             gbp, chunk_sites, chunks, g, valid);
    else if (fused)
      backward_rows<K, true>(gyp, xp, w.const_data_ptr<Acc>(), ip, np, gxp, gwp, gbp, chunk_sites, chunks, g, valid);
    else
      backward_rows<K, false>(gyp, xp, w.const_data_ptr<Acc>(), ip, np, gxp, gwp, gbp, chunk_sites, chunks, g, valid);
  } else {
    chunks = g.n;
    gw_parts = at::empty({chunks, g.c, K * K}, x.options().dtype(acc));
    gb_parts = at::empty({chunks, g.c}, x.options().dtype(acc));
    Acc* gwp = gw_parts.mutable_data_ptr<Acc>();
    Acc* gbp = gb_parts.mutable_data_ptr<Acc>();
    const auto start = image_starts(ip, g.m, g.n, g.out_plane());
    valid = valid && start[g.n] == g.m;
    if (fused)
      backward_planes<K, true>(gyp, xp, w.const_data_ptr<Acc>(), ip, np, gxp, gwp, gbp, g, start, valid);
    else
      backward_planes<K, false>(gyp, xp, w.const_data_ptr<Acc>(), ip, np, gxp, gwp, gbp, g, start, valid);
  }
  check_tables("dwconv_backward", valid);
  // Partials are (k*k, weight_stride) per chunk in rows (tap-major), (C, k*k) in planes: the weight's own order.
  at::Tensor gw_sum = at::empty(
      g.rows ? at::IntArrayRef{K * K, weight_stride} : at::IntArrayRef{g.c, K * K}, gw.options());
  reduce_chunks<Acc>(gw_parts.const_data_ptr<Acc>(), chunks, gw_sum.numel(), gw_sum.mutable_data_ptr<Acc>());
  reduce_chunks<Acc>(gb_parts.const_data_ptr<Acc>(), chunks, g.c, gb.mutable_data_ptr<Acc>());
  gw.copy_((g.rows ? gw_sum.narrow(1, 0, g.c).t() : gw_sum).reshape(gw.sizes()));
  // Weight gradients are summed in the accumulation dtype and rounded once, to the weight's dtype.
  return {gx, gw.to(weight.scalar_type()), gb.to(weight.scalar_type())};
}

}  // namespace

SK_REGISTER_DWCONV(CPU, CpuBackend)

}  // namespace spark_kernels
