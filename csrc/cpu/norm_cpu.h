// CPU building blocks of the masked-norm kernels: the fixed chunking of the active sites, deterministic
// per-channel reductions over them, and zeroing of the inactive sites of a dense output.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/norm_checks.h"
#include "common/norm_row.h"

namespace spark_kernels::cpu {

// Runs fn(chunk, first_site, end_site) for each chunk of the fixed partition of [0, count), in parallel.
template <typename Fn>
inline void for_each_chunk(int64_t count, int64_t per_chunk, const Fn& fn) {
  const int64_t chunks = norm::num_chunks(count, per_chunk);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) fn(k, k * per_chunk, std::min(count, (k + 1) * per_chunk));
  });
}

// Per-channel sums of two terms over the active sites, in float64: out[0][c], out[1][c].
// term(j, offset, c, first, second) computes the terms of active site j (index[j]) at element offset.
template <bool kRows, typename Term>
void channel_sums(const NormGeometry& g, const int32_t* index, int64_t count, const Term& term, double* out) {
  const int64_t c_count = g.channels;
  const int64_t per_chunk = norm::sites_per_chunk(c_count);
  const int64_t chunks = norm::num_chunks(count, per_chunk);
  std::vector<double> partials(chunks * 2 * c_count, 0.0);
  for_each_chunk(count, per_chunk, [&](int64_t k, int64_t j0, int64_t j1) {
    double* __restrict first = partials.data() + k * 2 * c_count;
    double* __restrict second = first + c_count;
    if constexpr (kRows) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t base = static_cast<int64_t>(index[j]) * c_count;
        for (int64_t c = 0; c < c_count; ++c) {
          double a, b;
          term(j, base + c, c, a, b);
          first[c] += a;
          second[c] += b;
        }
      }
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
  for (int64_t col = 0; col < 2 * c_count; ++col) {
    out[col] = norm::combine_column(partials.data(), chunks, 2 * c_count, col);
  }
}

// Per-channel mean and M2 of value(offset) over the active sites, in double (common/norm_row.h: shifted
// sums per chunk, pivot = the chunk's first site, chunks merged in order): out[0][c] mean, out[1][c] M2.
template <bool kRows, typename Value>
void channel_moments(const NormGeometry& g, const int32_t* index, int64_t count, const Value& value, double* out) {
  const int64_t c_count = g.channels;
  const int64_t per_chunk = norm::sites_per_chunk(c_count);
  const int64_t chunks = norm::num_chunks(count, per_chunk);
  // Per chunk and channel (separate arrays, so the rows loop vectorizes over channels).
  std::vector<double> pivots(chunks * c_count), sums(chunks * c_count, 0.0), sums_sq(chunks * c_count, 0.0);
  for_each_chunk(count, per_chunk, [&](int64_t k, int64_t j0, int64_t j1) {
    double* __restrict pivot = pivots.data() + k * c_count;
    double* __restrict sum = sums.data() + k * c_count;
    double* __restrict sum_sq = sums_sq.data() + k * c_count;
    if constexpr (kRows) {
      const int64_t first = static_cast<int64_t>(index[j0]) * c_count;
      for (int64_t c = 0; c < c_count; ++c) pivot[c] = value(first + c);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t base = static_cast<int64_t>(index[j]) * c_count;
        for (int64_t c = 0; c < c_count; ++c) {
          const double d = value(base + c) - pivot[c];
          sum[c] += d;
          sum_sq[c] += d * d;
        }
      }
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
  for (int64_t c = 0; c < c_count; ++c) {
    const double reference = chunks ? pivots[c] : 0.0;
    norm::Moments<double> merged{};
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t i = k * c_count + c;
      const int64_t sites = std::min(count, (k + 1) * per_chunk) - k * per_chunk;
      merged.merge(norm::moments_of(norm::ShiftedSums<double>{pivots[i], sums[i], sums_sq[i], sites}, reference));
    }
    out[c] = reference + merged.offset;
    out[c_count + c] = merged.m2;
  }
}

// Zeros the inactive sites owned by chunk [j0, j1): the sites from its first active site (0 for the
// first chunk) up to the next chunk's first active site (the end for the last chunk). The chunks thus
// own disjoint ranges that cover every site. Rows: one memset per gap, so with the active writes each
// element is written once. Planes: a gap is one short run per channel, so the whole owned range is
// zeroed instead (one memset per channel and image) and the caller's active writes, which must come
// after, overwrite it while it is still in cache.
template <typename T>
void zero_inactive(const NormGeometry& g, const int32_t* index, int64_t count, int64_t j0, int64_t j1, T* out) {
  auto zero_range = [&](int64_t from, int64_t to) {  // sites [from, to)
    if (from >= to) return;
    if (g.rows) {
      std::memset(out + from * g.channels, 0, sizeof(T) * (to - from) * g.channels);
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
// per-site LayerNorm math runs on contiguous channels in both layouts. bases[s] = g.base(site s).
template <typename T>
void gather_rows(const NormGeometry& g, const T* src, const std::vector<int64_t>& bases, T* rows) {
  const int64_t sites = static_cast<int64_t>(bases.size());
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* plane = src + c * g.plane;
    for (int64_t s = 0; s < sites; ++s) rows[s * g.channels + c] = plane[bases[s]];
  }
}

template <typename T>
void scatter_rows(const NormGeometry& g, const T* rows, const std::vector<int64_t>& bases, T* dst) {
  const int64_t sites = static_cast<int64_t>(bases.size());
  for (int64_t c = 0; c < g.channels; ++c) {
    T* plane = dst + c * g.plane;
    for (int64_t s = 0; s < sites; ++s) plane[bases[s]] = rows[s * g.channels + c];
  }
}

// A dense output in x's kernel layout whose every element is written by the caller or zero_inactive.
inline at::Tensor empty_dense(const at::Tensor& x_kernel_layout) {
  return at::empty_like(x_kernel_layout, kernel_memory_format(x_kernel_layout));
}

}  // namespace spark_kernels::cpu
