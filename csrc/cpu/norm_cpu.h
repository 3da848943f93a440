// CPU building blocks of the masked-norm kernels: the fixed chunking of the active sites, deterministic
// per-channel reductions over them, and zeroing of the inactive sites of a dense output.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/norm_checks.h"
#include "common/norm_row.h"
#include "cpu/dtypes.h"
#include "cpu/vec.h"

namespace spark_kernels::cpu {

// Runs fn(chunk, first_site, end_site) for each chunk of the fixed partition of [0, count), in parallel.
template <typename Fn>
inline void for_each_chunk(int64_t count, int64_t per_chunk, const Fn& fn) {
  const int64_t chunks = norm::num_chunks(count, per_chunk);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) fn(k, k * per_chunk, std::min(count, (k + 1) * per_chunk));
  });
}

// A fixed partition of the active sites into chunks, chunk k = [bounds[k], bounds[k + 1]): appends the cuts of
// [first, end) into runs of per_chunk sites to bounds, which is empty or ends at first. Ranges appended one
// after the other (each image's run of sites, for GroupNorm) give chunks that never straddle two ranges.
inline void append_chunks(int64_t first, int64_t end, int64_t per_chunk, std::vector<int64_t>& bounds) {
  if (bounds.empty()) bounds.push_back(first);
  for (int64_t j = first + per_chunk; j < end; j += per_chunk) bounds.push_back(j);
  if (end > first) bounds.push_back(end);
}

inline int64_t chunk_count(const std::vector<int64_t>& bounds) {
  return bounds.empty() ? 0 : static_cast<int64_t>(bounds.size()) - 1;
}

// Runs fn(chunk, first_site, end_site) for each chunk of bounds, in parallel (one parallel region).
template <typename Fn>
inline void for_each_listed_chunk(const std::vector<int64_t>& bounds, const Fn& fn) {
  at::parallel_for(0, chunk_count(bounds), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) fn(k, bounds[k], bounds[k + 1]);
  });
}

// Runs fn(c0, c1) over blocks of the channels small enough that a chunk's per-channel float64 accumulators of a
// block stay in the L1 cache while the chunk's rows stream past (a channel's sites are still added in order).
template <typename Fn>
inline void for_each_channel_block(int64_t channels, const Fn& fn) {
  constexpr int64_t kChannelBlock = 512;
  for (int64_t c0 = 0; c0 < channels; c0 += kChannelBlock) fn(c0, std::min(channels, c0 + kChannelBlock));
}

// Software prefetch of the rows of active sites a few sites ahead, in up to two dense rows tensors (null: none, e.g.
// compact rows, which are read in order): the active rows lie scattered, which the hardware prefetchers do not
// follow.
struct RowPrefetch {
  static constexpr int64_t kSitesAhead = 4;
  const char* first = nullptr;
  const char* second = nullptr;
  int64_t element_bytes = 0;

  // Lines of channels [c0, c1) of site j + kSitesAhead (if below end).
  void ahead(const int32_t* index, int64_t j, int64_t end, int64_t channels, int64_t c0, int64_t c1) const {
    if (first == nullptr || j + kSitesAhead >= end) return;
    const int64_t offset = (static_cast<int64_t>(index[j + kSitesAhead]) * channels + c0) * element_bytes;
    const int64_t bytes = (c1 - c0) * element_bytes;
    for (int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(first + offset + b);
      if (second != nullptr) __builtin_prefetch(second + offset + b);
    }
  }
};

template <typename T>
RowPrefetch row_prefetch(const T* first, const T* second = nullptr) {
  return {reinterpret_cast<const char*>(first), reinterpret_cast<const char*>(second), sizeof(T)};
}

// Per-chunk, per-channel sums of two terms, in float64: partials (chunks, 2, C).
// term(j, offset, c, first, second) computes the terms of active site j (index[j]) at element offset.
template <bool kRows, typename Term>
std::vector<double> chunk_sums(const NormGeometry& g, const int32_t* index, const std::vector<int64_t>& bounds,
                               const Term& term, const RowPrefetch& prefetch = {}) {
  const int64_t c_count = g.channels;
  std::vector<double> partials(chunk_count(bounds) * 2 * c_count, 0.0);
  for_each_listed_chunk(bounds, [&](int64_t k, int64_t j0, int64_t j1) {
    double* __restrict first = partials.data() + k * 2 * c_count;
    double* __restrict second = first + c_count;
    if constexpr (kRows) {
      for_each_channel_block(c_count, [&](int64_t c0, int64_t c1) {
        for (int64_t j = j0; j < j1; ++j) {
          prefetch.ahead(index, j, j1, c_count, c0, c1);
          const int64_t base = static_cast<int64_t>(index[j]) * c_count;
          for (int64_t c = c0; c < c1; ++c) {
            double a, b;
            term(j, base + c, c, a, b);
            first[c] += a;
            second[c] += b;
          }
        }
      });
    } else {
      std::vector<int64_t> bases(j1 - j0);
      for (int64_t j = j0; j < j1; ++j) bases[j - j0] = g.base(index[j]);
      for (int64_t c = 0; c < c_count; ++c) {
        double a_sum = 0, b_sum = 0;
        for (int64_t j = j0; j < j1; ++j) {
          double a, b;
          term(j, bases[j - j0] + c * g.plane, c, a, b);
          a_sum += a;
          b_sum += b;
        }
        first[c] = a_sum;
        second[c] = b_sum;
      }
    }
  });
  return partials;
}

// out[col] (2C columns) = the chunks [k0, k1)'s partial sums of column col, added in chunk order.
inline void combine_chunk_sums(const std::vector<double>& partials, int64_t k0, int64_t k1, int64_t channels,
                               double* out) {
  norm::combine_rows(partials.data() + k0 * 2 * channels, k1 - k0, 2 * channels, out);
}

// Per-channel sums of two terms over the active sites, in float64: out[0][c], out[1][c] (fixed chunks of the
// sites, each summed by one worker, then added in chunk order).
template <bool kRows, typename Term>
void channel_sums(const NormGeometry& g, const int32_t* index, int64_t count, const Term& term, double* out,
                  const RowPrefetch& prefetch = {}) {
  std::vector<int64_t> bounds;
  append_chunks(0, count, norm::sites_per_chunk(g.channels), bounds);
  combine_chunk_sums(chunk_sums<kRows>(g, index, bounds, term, prefetch), 0, chunk_count(bounds), g.channels, out);
}

// Per-chunk, per-channel shifted sums of value(offset) (common/norm_row.h: pivot = the chunk's first site),
// (chunks, C) each, separate arrays so that the rows loop vectorizes over channels.
struct ChunkMoments {
  std::vector<double> pivots, sums, sums_sq;
};

template <bool kRows, typename Value>
ChunkMoments chunk_moments(const NormGeometry& g, const int32_t* index, const std::vector<int64_t>& bounds,
                           const Value& value, const RowPrefetch& prefetch = {}) {
  const int64_t c_count = g.channels;
  const int64_t chunks = chunk_count(bounds);
  ChunkMoments m{std::vector<double>(chunks * c_count), std::vector<double>(chunks * c_count, 0.0),
                 std::vector<double>(chunks * c_count, 0.0)};
  for_each_listed_chunk(bounds, [&](int64_t k, int64_t j0, int64_t j1) {
    double* __restrict pivot = m.pivots.data() + k * c_count;
    double* __restrict sum = m.sums.data() + k * c_count;
    double* __restrict sum_sq = m.sums_sq.data() + k * c_count;
    if constexpr (kRows) {
      const int64_t first = static_cast<int64_t>(index[j0]) * c_count;
      for (int64_t c = 0; c < c_count; ++c) pivot[c] = value(first + c);
      for_each_channel_block(c_count, [&](int64_t c0, int64_t c1) {
        for (int64_t j = j0; j < j1; ++j) {
          prefetch.ahead(index, j, j1, c_count, c0, c1);
          const int64_t base = static_cast<int64_t>(index[j]) * c_count;
          for (int64_t c = c0; c < c1; ++c) {
            const double d = value(base + c) - pivot[c];
            sum[c] += d;
            sum_sq[c] += d * d;
          }
        }
      });
    } else {
      std::vector<int64_t> bases(j1 - j0);
      for (int64_t j = j0; j < j1; ++j) bases[j - j0] = g.base(index[j]);
      for (int64_t c = 0; c < c_count; ++c) {
        norm::ShiftedSums<double> s{};
        for (const int64_t base : bases) s.add(value(base + c * g.plane));
        pivot[c] = s.pivot;
        sum[c] = s.sum;
        sum_sq[c] = s.sum_sq;
      }
    }
  });
  return m;
}

// Chan's merge of chunks [k0, k1) in order, relative to the pivot of chunk k0: out[0][c] mean, out[1][c] M2
// (0 and 0 without chunks). Chunk by chunk, all channels at a time (the tables are read in order, the loop over
// channels vectorizes); chunks are never empty.
inline void merge_chunk_moments(const ChunkMoments& m, const std::vector<int64_t>& bounds, int64_t k0, int64_t k1,
                                int64_t channels, double* out) {
  double* __restrict mean = out;  // the merged offsets from the reference until the end
  double* __restrict m2 = out + channels;
  if (k1 <= k0) {
    std::fill(out, out + 2 * channels, 0.0);
    return;
  }
  const double* reference = m.pivots.data() + k0 * channels;
  double count = 0;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t sites = bounds[k + 1] - bounds[k];
    const double* pivot = m.pivots.data() + k * channels;
    const double* sum = m.sums.data() + k * channels;
    const double* sum_sq = m.sums_sq.data() + k * channels;
    for (int64_t c = 0; c < channels; ++c) {
      const norm::Moments<double> chunk = norm::moments_of(norm::ShiftedSums<double>{pivot[c], sum[c], sum_sq[c], sites},
                                                           reference[c]);
      if (k == k0) {
        mean[c] = chunk.offset;
        m2[c] = chunk.m2;
      } else {
        norm::Moments<double> merged{count, mean[c], m2[c]};
        merged.merge_nonempty(chunk);
        mean[c] = merged.offset;
        m2[c] = merged.m2;
      }
    }
    count += static_cast<double>(sites);
  }
  for (int64_t c = 0; c < channels; ++c) mean[c] += reference[c];
}

// Per-channel mean and M2 of value(offset) over the active sites, in double: out[0][c] mean, out[1][c] M2.
template <bool kRows, typename Value>
void channel_moments(const NormGeometry& g, const int32_t* index, int64_t count, const Value& value, double* out,
                     const RowPrefetch& prefetch = {}) {
  std::vector<int64_t> bounds;
  append_chunks(0, count, norm::sites_per_chunk(g.channels), bounds);
  merge_chunk_moments(chunk_moments<kRows>(g, index, bounds, value, prefetch), bounds, 0, chunk_count(bounds),
                      g.channels, out);
}

// Zeros the inactive sites owned by chunk [j0, j1): the sites from its first active site (0 for the
// first chunk) up to the next chunk's first active site (the end for the last chunk). The chunks thus
// own disjoint ranges that cover every site. Rows: one memset per gap, so with the active writes each
// element is written once. Planes: a gap is one short run per channel, so the whole owned range is
// zeroed instead (one memset per channel and image) and the caller's active writes, which must come
// after, overwrite it while it is still in cache.
// stream: rows are zeroed with streaming stores (RowSink).
template <typename T>
void zero_inactive(const NormGeometry& g, const int32_t* index, int64_t count, int64_t j0, int64_t j1, T* out,
                   bool stream = false) {
  auto zero_range = [&](int64_t from, int64_t to) {  // sites [from, to)
    if (from >= to) return;
    if (g.rows) {
      const int64_t bytes = sizeof(T) * (to - from) * g.channels;
      stream ? stream_zero(out + from * g.channels, bytes) : (void)std::memset(out + from * g.channels, 0, bytes);
      return;
    }
    while (from < to) {  // one image's part of the range per step
      const int64_t n = from / g.plane;
      const int64_t stop = std::min(to, (n + 1) * g.plane);
      T* first = out + n * g.channels * g.plane + (from - n * g.plane);
      for (int64_t c = 0; c < g.channels; ++c) std::memset(first + c * g.plane, 0, sizeof(T) * (stop - from));
      from = stop;
    }
  };
  const int64_t owned_end = j1 == count ? g.sites() : index[j1];
  int64_t cursor = j0 == 0 ? 0 : index[j0];
  if (!g.rows) return zero_range(cursor, owned_end);
  for (int64_t j = j0; j < j1; ++j) {
    zero_range(cursor, index[j]);
    cursor = static_cast<int64_t>(index[j]) + 1;
  }
  zero_range(cursor, owned_end);
}

// Planes: the chunk's sites copied into site-major rows (C contiguous values per site) and back, so the
// per-site LayerNorm math runs on contiguous channels in both layouts. bases[s] = g.base(site s). A block of
// kTransposeChannels channels (gather_rows: 8) at a time, site by site: the planes of the block are walked side by
// side, each row gets a contiguous run (about 2-3x faster than plane by plane, whose row accesses are all strided).
constexpr int64_t kTransposeChannels = 16;

// fn(c0, c1): the channel blocks [c0, c1) of the transposes, the last one shorter.
template <typename Fn>
inline void for_each_transpose_block(int64_t channels, const Fn& fn) {
  for (int64_t c0 = 0; c0 < channels; c0 += kTransposeChannels) fn(c0, std::min(channels, c0 + kTransposeChannels));
}

// Where gather_rows transposes a span of plane offsets: consecutive sites with ascending offsets less than kSpanSites
// apart, at least 8 and at least one in kSpanDensity of them a site.
constexpr int64_t kSpanSites = 128, kSpanDensity = 4;

// rows: row_stride apart (channels unless given). 32-bit and 16-bit values move 8 channels at a time, in one of two
// ways:
//  * a span of nearby sites (an image row of SparK patches, or a few of them, in the small planes of the late
//    stages) by 8 x 8 register transposes (transpose8x8) of all its offsets, 8 channels by 8 (each plane read as a
//    contiguous stretch), then each site's 8 values copied out; a run of 8 adjacent sites, 8-aligned in the span,
//    transposed straight into its rows. The offsets between the span's sites are read too: they lie between two
//    sites' values of the same planes, in the tensor. Forward + backward with an NCHW grad_out, one thread, fp32,
//    batch 32, ratio 0.6, 3 rounds of alternating builds on this noisy AVX2 VM: BatchNorm 8.2-11.7 -> 6.5-7.1 ms at
//    ResNet-50's 2048@7, 1.8-3.4 -> 1.6-1.7 ms at 768@7, 0-15% less at the other stages; LayerNorm (channels_first,
//    which had a gather of its own) as fast or faster (384@14: 4.0-5.7 -> 2.8-4.1 ms);
//  * any other site alone: its 8 values loaded into one vector and stored at once (about 1.3-2x faster than a plain
//    copy loop, whose values the compiler stores one by one).
// Both prefetch the planes of the next channels as they go: each plane is walked for a few lines only, too short a
// stream for the hardware prefetchers (another 1.1-1.5x at the ResNet-50 and ConvNeXt-T stages). The channels left
// over, and other types, value by value.
template <typename T>
void gather_rows(const T* src, const int64_t* bases, int64_t sites, int64_t channels, int64_t channel_stride,
                 T* rows, int64_t row_stride = -1) {
  if (row_stride < 0) row_stride = channels;
  int64_t vector_channels = 0;
  if constexpr (sizeof(T) == 4 || sizeof(T) == 2) {
    using Bits [[gnu::may_alias]] = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
    using Vector = std::conditional_t<sizeof(T) == 4, u32x8, u16x8>;
    constexpr int64_t kWidth = 8, kPrefetchChannels = 16, kLineShift = sizeof(T) == 4 ? 4 : 5;
    vector_channels = channels / kWidth * kWidth;
    const int64_t cs = channel_stride;
    auto site_by_site = [&](int64_t s_begin, int64_t s_end) {
      for (int64_t c0 = 0; c0 < vector_channels; c0 += kWidth) {
        const Bits* first = reinterpret_cast<const Bits*>(src + c0 * cs);
        const bool prefetch = c0 + kPrefetchChannels + kWidth <= channels;
        int64_t line = -1;
        for (int64_t s = s_begin; s < s_end; ++s) {
          const Bits* from = first + bases[s];
          if (prefetch && (bases[s] >> kLineShift) != line) {
            line = bases[s] >> kLineShift;
            for (int64_t k = 0; k < kWidth; ++k) __builtin_prefetch(from + (kPrefetchChannels + k) * cs);
          }
          const Vector v = {from[0], from[cs], from[2 * cs], from[3 * cs], from[4 * cs], from[5 * cs], from[6 * cs],
                            from[7 * cs]};
          std::memcpy(rows + s * row_stride + c0, &v, sizeof(v));
        }
      }
    };
    auto by_span = [&](int64_t s_begin, int64_t s_end) {
      const int64_t origin = bases[s_begin], span = bases[s_end - 1] - origin + 1;
      for (int64_t c0 = 0; c0 < vector_channels; c0 += kWidth) {
        const Bits* first = reinterpret_cast<const Bits*>(src + c0 * cs) + origin;
        const bool prefetch = c0 + 2 * kWidth <= vector_channels;
        int64_t s = s_begin;
        for (int64_t j0 = 0; j0 < span; j0 += kWidth) {
          const int64_t jb = std::min(j0, span - kWidth);  // the last block overlaps the one before
          if (prefetch)
            for (int64_t k = 0; k < kWidth; ++k) __builtin_prefetch(first + (kWidth + k) * cs + jb);
          if (jb == j0 && s + kWidth <= s_end && bases[s] - origin == j0 && bases[s + kWidth - 1] - origin == j0 + 7) {
            transpose8x8(first + j0, cs, reinterpret_cast<Bits*>(rows + s * row_stride + c0), row_stride);
            s += kWidth;
            continue;
          }
          alignas(32) Bits block[kWidth][kWidth];  // block[i]: the 8 values of offset jb + i
          transpose8x8(first + jb, cs, &block[0][0], kWidth);
          for (; s < s_end && bases[s] - origin < j0 + kWidth; ++s)
            std::memcpy(rows + s * row_stride + c0, block[bases[s] - origin - jb], sizeof(block[0]));
        }
      }
    };
    for (int64_t s0 = 0; s0 < sites;) {
      int64_t s1 = s0 + 1;
      while (s1 < sites && bases[s1] > bases[s1 - 1] && bases[s1] - bases[s0] < kSpanSites) ++s1;
      const int64_t span = bases[s1 - 1] - bases[s0] + 1;
      if (span >= kWidth && (s1 - s0) * kSpanDensity >= span) {
        by_span(s0, s1);
      } else {
        site_by_site(s0, s1);
      }
      s0 = s1;
    }
  }
  for (int64_t c0 = vector_channels; c0 < channels; c0 += kTransposeChannels) {
    const int64_t c1 = std::min(channels, c0 + kTransposeChannels);
    const T* first = src + c0 * channel_stride;
    for (int64_t s = 0; s < sites; ++s) {
      const T* from = first + bases[s];
      T* __restrict to = rows + s * row_stride + c0;
      for (int64_t k = 0; k < c1 - c0; ++k) to[k] = from[k * channel_stride];
    }
  }
}

template <typename T>
void gather_rows(const NormGeometry& g, const T* src, const std::vector<int64_t>& bases, T* rows) {
  gather_rows(src, bases.data(), static_cast<int64_t>(bases.size()), g.channels, g.plane, rows);
}

template <typename T>
void scatter_rows(const NormGeometry& g, const T* rows, const std::vector<int64_t>& bases, T* dst) {
  const int64_t sites = static_cast<int64_t>(bases.size());
  for_each_transpose_block(g.channels, [&](int64_t c0, int64_t c1) {
    T* first = dst + c0 * g.plane;
    for (int64_t s = 0; s < sites; ++s) {
      T* __restrict to = first + bases[s];
      const T* from = rows + s * g.channels + c0;
      for (int64_t k = 0; k < c1 - c0; ++k) to[k * g.plane] = from[k];
    }
  });
}

// A dense output in x's kernel layout (channels_last for compact x) whose every element is written by the caller
// or zero_inactive.
inline at::Tensor empty_dense(const NormArgs& p) {
  return at::empty(p.sizes, p.x.options().memory_format(p.g.rows ? at::MemoryFormat::ChannelsLast
                                                                   : at::MemoryFormat::Contiguous));
}

// Dense outputs in rows are written with streaming stores where cpu/vec.h's streams_output says.
inline bool streams_rows(const NormArgs& p, const at::Tensor& out) {
  return p.g.rows && streams_output(static_cast<int64_t>(out.nbytes()));
}

// Where a kernel writes the C values of an active site of a rows output: in place, or, when streaming, into a
// one-row buffer that done() streams out. The writer of a chunk calls stream_fence() after its last row.
template <typename T>
class RowSink {
 public:
  RowSink(T* out, int64_t channels, bool stream) : out_(out), channels_(channels), stream_(stream) {
    thread_local std::vector<T> buffer;
    if (stream_) buffer.resize(channels_);
    buffer_ = buffer.data();
  }
  T* row(int64_t base) const { return stream_ ? buffer_ : out_ + base; }
  void done(int64_t base) const {
    if (stream_) stream_copy(out_ + base, buffer_, channels_ * static_cast<int64_t>(sizeof(T)));
  }

 private:
  T* out_;
  int64_t channels_;
  bool stream_;
  T* buffer_;
};

// The offset in grad_out of channel 0 of each active site when grad_out is dense in the other layout than x's
// (GradLayout::kOther); its channel stride is other_channel_stride(g). The index is ascending: the image number
// is counted up, no division per site.
inline std::vector<int64_t> other_layout_bases(const NormArgs& p) {
  NormGeometry other = p.g;
  other.rows = !p.g.rows;
  const int32_t* index = p.index.const_data_ptr<int32_t>();
  std::vector<int64_t> bases(p.index.numel());
  int64_t image = 0;
  for (size_t j = 0; j < bases.size(); ++j) {
    const int64_t site = index[j];
    while (site >= (image + 1) * p.g.plane) ++image;
    const int64_t within = site - image * p.g.plane;
    bases[j] = other.rows ? site * p.g.channels : image * p.g.channels * p.g.plane + within;
  }
  return bases;
}

inline int64_t other_channel_stride(const NormGeometry& g) { return g.rows ? g.plane : 1; }

// The backward kernels' reads of x at (active site j, dense offset off, channel c): from the dense tensor, or
// from the compact rows (NormArgs::compact); and of grad_out: at the same offset (kSame), through the other
// layout's site offsets (kOther), or its one value (kBroadcast) (csrc/norm_ops.h). Compile-time, so that each
// combination's loops vectorize.
template <typename T, bool kCompact>
struct XReader {
  const T* x;
  int64_t channels;
  T operator()(int64_t j, int64_t off, int64_t c) const {
    if constexpr (kCompact) return x[j * channels + c];
    return x[off];
  }
  // The tensor read at dense row offsets (RowPrefetch), or null.
  const T* dense_rows() const { return kCompact ? nullptr : x; }
};

template <typename T, GradLayout kLayout>
struct GradReader {
  const T* dy;
  const int64_t* other_bases;  // kOther: other_layout_bases
  int64_t other_stride;        // kOther: other_channel_stride
  T operator()(int64_t j, int64_t off, int64_t c) const {
    if constexpr (kLayout == GradLayout::kBroadcast) return dy[0];
    if constexpr (kLayout == GradLayout::kOther) return dy[other_bases[j] + c * other_stride];
    return dy[off];
  }
  const T* dense_rows() const { return kLayout == GradLayout::kSame ? dy : nullptr; }
};

// grad_out read from the (M, C) rows of its active sites, in index order (active_rows_of_planes).
template <typename T>
struct CompactGradReader {
  const T* dy;
  int64_t channels;
  T operator()(int64_t j, int64_t, int64_t c) const { return dy[j * channels + c]; }
  const T* dense_rows() const { return nullptr; }
};

// The values of a planes (NCHW) grad_out at the active sites of a rows x, as (M, C) rows in index order. Read
// kTransposeChannels planes side by side over fixed chunks of sites (gather_rows), so that the backward kernels,
// which visit the sites row by row, read them in order instead of C strided values per site.
template <typename T>
at::Tensor active_rows_of_planes(const NormArgs& p, const at::Tensor& grad_out) {
  TORCH_INTERNAL_ASSERT(p.g.rows && grad_layout(grad_out, true) == GradLayout::kOther);
  const std::vector<int64_t> bases = other_layout_bases(p);
  const int64_t channels = p.g.channels;
  at::Tensor rows = at::empty({p.index.numel(), channels}, grad_out.options());
  const T* dy = data_as<T>(grad_out);
  T* out = mutable_data_as<T>(rows);
  for_each_chunk(p.index.numel(), norm::sites_per_chunk(channels), [&](int64_t, int64_t j0, int64_t j1) {
    gather_rows(dy, bases.data() + j0, j1 - j0, channels, p.g.plane, out + j0 * channels);
  });
  return rows;
}

// The RowPrefetch of the backward kernels' reads (rows layout).
template <typename XR, typename GR>
RowPrefetch backward_prefetch(const XR& x, const GR& dy) {
  return dy.dense_rows() != nullptr ? row_prefetch(dy.dense_rows(), x.dense_rows()) : row_prefetch(x.dense_rows());
}

// fn(x_reader, grad_reader) with the readers that fit p and grad_out (one of the layouts norm_ops.h keeps). A planes
// grad_out of a rows x is read from its active rows: dy_rows when the caller gathered them already
// (active_rows_of_planes), else gathered here.
template <typename T, typename Fn>
auto with_backward_readers(const NormArgs& p, const at::Tensor& grad_out, const Fn& fn,
                           const at::Tensor* dy_rows = nullptr) {
  const T* x = data_as<T>(p.x);
  const T* dy = data_as<T>(grad_out);
  const GradLayout layout = grad_layout(grad_out, p.g.rows);
  auto with_x = [&](auto grad) {
    return p.compact ? fn(XReader<T, true>{x, p.g.channels}, grad) : fn(XReader<T, false>{x, p.g.channels}, grad);
  };
  if (layout == GradLayout::kBroadcast) return with_x(GradReader<T, GradLayout::kBroadcast>{dy, nullptr, 0});
  if (layout == GradLayout::kOther && p.g.rows) {
    const at::Tensor rows = dy_rows != nullptr ? *dy_rows : active_rows_of_planes<T>(p, grad_out);
    return with_x(CompactGradReader<T>{data_as<T>(rows), p.g.channels});
  }
  const std::vector<int64_t> bases = layout == GradLayout::kOther ? other_layout_bases(p) : std::vector<int64_t>{};
  const int64_t stride = other_channel_stride(p.g);
  if (layout == GradLayout::kOther) return with_x(GradReader<T, GradLayout::kOther>{dy, bases.data(), stride});
  TORCH_INTERNAL_ASSERT(layout == GradLayout::kSame || grad_out.numel() == 0);
  return with_x(GradReader<T, GradLayout::kSame>{dy, nullptr, 0});
}

// out = row(j, base, out's row) at the active sites of a rows output, 0 elsewhere: row writes the C values of active
// site j (j: the site's place in the index; base: its dense row offset) at out's row; the zeroing, chunks, prefetch
// and streaming of every norm's element-wise map.
template <typename T, typename Row>
at::Tensor dense_rows_map(const NormArgs& p, const Row& row, const RowPrefetch& prefetch = {}) {
  const NormGeometry& g = p.g;
  TORCH_INTERNAL_ASSERT(g.rows);
  const int32_t* index = p.index.const_data_ptr<int32_t>();
  const int64_t count = p.index.numel();
  at::Tensor out = empty_dense(p);
  if (count == 0) return out.zero_();
  T* y = mutable_data_as<T>(out);
  const bool stream = streams_rows(p, out);
  for_each_chunk(count, norm::sites_per_chunk(g.channels), [&](int64_t, int64_t j0, int64_t j1) {
    zero_inactive(g, index, count, j0, j1, y, stream);
    const RowSink<T> sink(y, g.channels, stream);
    for (int64_t j = j0; j < j1; ++j) {
      prefetch.ahead(index, j, j1, g.channels, 0, g.channels);
      const int64_t base = static_cast<int64_t>(index[j]) * g.channels;
      row(j, base, sink.row(base));
      sink.done(base);
    }
    stream_fence();
  });
  return out;
}

// out = elem(j, offset, c, image) at the active sites (j: the site's place in the index), 0 elsewhere, in x's
// kernel layout; T: the storage type.
template <typename T, typename Elem>
at::Tensor dense_map(const NormArgs& p, const Elem& elem, const RowPrefetch& prefetch = {}) {
  const NormGeometry& g = p.g;
  const int32_t* index = p.index.const_data_ptr<int32_t>();
  if (g.rows) {
    return dense_rows_map<T>(
        p,
        [&](int64_t j, int64_t base, T* __restrict row) {
          const int64_t image = index[j] / g.plane;
          for (int64_t c = 0; c < g.channels; ++c) row[c] = elem(j, base + c, c, image);
        },
        prefetch);
  }
  const int64_t count = p.index.numel();
  at::Tensor out = empty_dense(p);
  if (count == 0) return out.zero_();
  T* y = mutable_data_as<T>(out);
  for_each_chunk(count, norm::sites_per_chunk(g.channels), [&](int64_t, int64_t j0, int64_t j1) {
    zero_inactive(g, index, count, j0, j1, y);
    // channel by channel: consecutive sites of a plane are mostly adjacent in memory
    std::vector<int64_t> bases(j1 - j0), images(j1 - j0);
    for (int64_t j = j0; j < j1; ++j) {
      bases[j - j0] = g.base(index[j]);
      images[j - j0] = index[j] / g.plane;
    }
    for (int64_t c = 0; c < g.channels; ++c) {
      for (int64_t s = 0; s < j1 - j0; ++s) {
        y[bases[s] + c * g.plane] = elem(j0 + s, bases[s] + c * g.plane, c, images[s]);
      }
    }
  });
  return out;
}

}  // namespace spark_kernels::cpu
