// Per-site math of masked LayerNorm and the per-channel terms of masked BatchNorm, shared by the CPU
// kernels (csrc/cpu) and the CUDA kernels (csrc/cuda): compiled as host code and as device code, no
// torch includes, so csrc/tests/test_norm_row.cpp checks on the CPU what the GPU kernels compute.
//
// A "row" is the C values of one site, x[c * stride]: stride 1 for channels_last rows, H*W for NCHW
// planes. Acc is the accumulation type (float, or double for double inputs); T the storage type.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

// Lets the CPU compiler vectorize a sum (it reassociates it in a fixed order chosen at build time, so
// results stay run-to-run identical). Empty in device code and in builds without OpenMP.
#if defined(_OPENMP) && !defined(__CUDA_ARCH__)
#define SK_PRAGMA(text) _Pragma(#text)
#define SK_SIMD_SUM(...) SK_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#else
#define SK_SIMD_SUM(...)
#endif

namespace spark_kernels::norm {

SK_HOST_DEVICE inline float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
SK_HOST_DEVICE inline double inv_sqrt(double v) { return 1.0 / sqrt(v); }

// ---- LayerNorm of one row ------------------------------------------------------------------------

template <typename Acc>
struct RowStats {
  Acc mean;
  Acc rstd;  // 1 / sqrt(biased variance + eps)
};

// Two-pass mean and biased variance over the row (no cancellation from E[x^2] - E[x]^2).
template <typename Acc, typename T>
SK_HOST_DEVICE inline RowStats<Acc> row_stats(const T* x, int64_t stride, int64_t channels, Acc eps) {
  Acc sum = 0;
  SK_SIMD_SUM(sum)
  for (int64_t c = 0; c < channels; ++c) sum += static_cast<Acc>(x[c * stride]);
  const Acc mean = sum / static_cast<Acc>(channels);
  Acc squares = 0;
  SK_SIMD_SUM(squares)
  for (int64_t c = 0; c < channels; ++c) {
    const Acc d = static_cast<Acc>(x[c * stride]) - mean;
    squares += d * d;
  }
  return {mean, inv_sqrt(squares / static_cast<Acc>(channels) + eps)};
}

// Output of channel c: (x - mean) * rstd * weight[c] + bias[c]; weight and bias may be null (identity).
template <typename Acc>
SK_HOST_DEVICE inline Acc normalize(Acc x, RowStats<Acc> s, const Acc* weight, const Acc* bias, int64_t c) {
  Acc v = (x - s.mean) * s.rstd;
  if (weight != nullptr) v *= weight[c];
  if (bias != nullptr) v += bias[c];
  return v;
}

template <typename Acc, typename T>
SK_HOST_DEVICE inline void row_forward(const T* x, int64_t x_stride, T* y, int64_t y_stride, int64_t channels,
                                       RowStats<Acc> s, const Acc* weight, const Acc* bias) {
  for (int64_t c = 0; c < channels; ++c) {
    y[c * y_stride] = static_cast<T>(normalize(static_cast<Acc>(x[c * x_stride]), s, weight, bias, c));
  }
}

// The input gradient of one element, given the row means of g = dy * weight and of g * xhat.
template <typename Acc>
SK_HOST_DEVICE inline Acc input_grad(Acc g, Acc xhat, Acc mean_g, Acc mean_g_xhat, Acc rstd) {
  return rstd * (g - mean_g - xhat * mean_g_xhat);
}

// Input gradient of one row: with g = dy * weight and xhat = (x - mean) * rstd,
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)). dx may alias dy (element c reads only element c).
template <typename Acc, typename T>
SK_HOST_DEVICE inline void row_backward(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride, T* dx,
                                        int64_t dx_stride, int64_t channels, RowStats<Acc> s, const Acc* weight) {
  Acc sum_g = 0, sum_g_xhat = 0;
  SK_SIMD_SUM(sum_g, sum_g_xhat)
  for (int64_t c = 0; c < channels; ++c) {
    const Acc g = static_cast<Acc>(dy[c * dy_stride]) * (weight != nullptr ? weight[c] : Acc(1));
    const Acc xhat = (static_cast<Acc>(x[c * x_stride]) - s.mean) * s.rstd;
    sum_g += g;
    sum_g_xhat += g * xhat;
  }
  const Acc mean_g = sum_g / static_cast<Acc>(channels);
  const Acc mean_g_xhat = sum_g_xhat / static_cast<Acc>(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const Acc g = static_cast<Acc>(dy[c * dy_stride]) * (weight != nullptr ? weight[c] : Acc(1));
    const Acc xhat = (static_cast<Acc>(x[c * x_stride]) - s.mean) * s.rstd;
    dx[c * dx_stride] = static_cast<T>(input_grad(g, xhat, mean_g, mean_g_xhat, s.rstd));
  }
}

// ---- Masked BatchNorm statistics: per-channel mean and M2 = sum (x - mean)^2 over active sites -----
// One algorithm on every backend (CPU, CUDA, and Triton in spark_kernels/triton/batch_norm.py), stable
// for any offset of the mean: a partial (a CPU chunk of sites, a CUDA thread's sites, a Triton lane's)
// sums d = x - p and d^2 around a pivot p that is its own first value, so M2 = sum d^2 - (sum d)^2 / n
// cancels at most a factor n (when p is one of the n values, n (mean - p)^2 <= (n - 1) M2); partials
// are then merged with Chan's formula, each mean carried as an offset from a common reference value
// (a pivot) so that no large mean is subtracted in low precision.

template <typename P>
struct ShiftedSums {
  P pivot, sum, sum_sq;
  int64_t count;

  SK_HOST_DEVICE void add(P x) {
    if (count == 0) pivot = x;
    const P d = x - pivot;
    sum += d;
    sum_sq += d * d;
    ++count;
  }
};

// count values with mean reference + offset and sum of squared deviations m2 (value-initialize: {}).
template <typename P>
struct Moments {
  P count, offset, m2;

  // Merges b (relative to the same reference) into this (Chan, Golub and LeVeque's pairwise update).
  SK_HOST_DEVICE void merge(const Moments& b) {
    if (b.count == 0) return;
    if (count == 0) {
      *this = b;
      return;
    }
    merge_nonempty(b);
  }

  // merge() when both are non-empty: branch-free, so that a loop over channels vectorizes.
  SK_HOST_DEVICE void merge_nonempty(const Moments& b) {
    const P n = count + b.count;
    const P delta = b.offset - offset;
    const P share = b.count / n;
    offset += delta * share;
    m2 += b.m2 + delta * delta * count * share;
    count = n;
  }
};

// The moments of a partial's shifted sums, relative to `reference`.
template <typename P>
SK_HOST_DEVICE inline Moments<P> moments_of(const ShiftedSums<P>& s, P reference) {
  if (s.count == 0) return {};
  const P n = static_cast<P>(s.count);
  const P m2 = s.sum_sq - s.sum * s.sum / n;
  return {n, (s.pivot - reference) + s.sum / n, m2 < P(0) ? P(0) : m2};  // rounding below 0; NaN stays NaN
}

// ---- Per-channel terms summed over active sites (each op sums a pair of terms per channel) -------

// masked_bn_backward_stats: (dy, dy * (x - mean[c])).
template <typename P>
struct BnBackwardTerms {
  SK_HOST_DEVICE void operator()(P dy, P x, P mean, P& first, P& second) const {
    first = dy;
    second = dy * (x - mean);
  }
};

// masked_ln_backward's parameter gradients: (dy * xhat, dy) for grad_weight and grad_bias.
template <typename P>
struct LnParamGradTerms {
  SK_HOST_DEVICE void operator()(P dy, P x, P mean, P rstd, P& first, P& second) const {
    first = dy * ((x - mean) * rstd);
    second = dy;
  }
};

// masked_bn_elemt: x * scale[c] + shift[c].
template <typename Acc>
SK_HOST_DEVICE inline Acc bn_affine(Acc x, Acc scale, Acc shift) {
  return x * scale + shift;
}

// masked_bn_backward_elemt: dy * a[c] + x * b[c] + d[c].
template <typename Acc>
SK_HOST_DEVICE inline Acc bn_backward_elem(Acc dy, Acc x, Acc a, Acc b, Acc d) {
  return dy * a + x * b + d;
}

// masked_gn_elemt: (x - center) * scale + shift, per (image, channel) coefficients. Centring first keeps a
// mean far from 0 from cancelling against the shift.
template <typename Acc>
SK_HOST_DEVICE inline Acc gn_affine(Acc x, Acc center, Acc scale, Acc shift) {
  return (x - center) * scale + shift;
}

// masked_gn_backward_elemt: dy * a + (x - center) * b + d.
template <typename Acc>
SK_HOST_DEVICE inline Acc gn_backward_elem(Acc dy, Acc x, Acc center, Acc a, Acc b, Acc d) {
  return dy * a + (x - center) * b + d;
}

// ---- Deterministic reductions over sites ---------------------------------------------------------
// Sites are cut into fixed chunks (a function of the channel count only, never of the thread count);
// each chunk's per-channel partial sums are computed by one worker, then added in chunk order.

// A chunk holds about kChunkElements values, and at least kMinChunkSites sites: each chunk leaves a few float64
// partials per channel, which at many channels would otherwise rival the input in size.
constexpr int64_t kChunkElements = 16384;
constexpr int64_t kMinChunkSites = 64;

SK_HOST_DEVICE inline int64_t sites_per_chunk(int64_t channels) {
  const int64_t by_elements = kChunkElements / (channels > 0 ? channels : 1);
  return by_elements > kMinChunkSites ? by_elements : kMinChunkSites;
}

SK_HOST_DEVICE inline int64_t num_chunks(int64_t sites, int64_t per_chunk) {
  return (sites + per_chunk - 1) / per_chunk;
}

// out[col] = the sum of column col of a row-major (chunks, width) table of partials, added in chunk order, in
// double; the table is read row by row.
template <typename P>
SK_HOST_DEVICE inline void combine_rows(const P* partials, int64_t chunks, int64_t width, double* out) {
  for (int64_t col = 0; col < width; ++col) out[col] = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t col = 0; col < width; ++col) out[col] += static_cast<double>(partials[k * width + col]);
  }
}

}  // namespace spark_kernels::norm
