// Masked LayerNorm kernels on the CPU (conventions: csrc/ops.cpp; host code: csrc/norm_ops.h): normalization over the
// C channels of each active site, with the row math of csrc/common/norm_row.h (its statistics, output and input
// gradient written on vectors below, the last fused with the parameter-gradient terms), in the accumulation type
// (float for float32, float16 and bfloat16 inputs; double for float64). The parameter gradients are summed per chunk
// of sites in the accumulation type, and the chunks' sums added in float64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <type_traits>

#include "cpu/dtypes.h"
#include "cpu/norm_cpu.h"
#include "cpu/vec.h"
#include "norm_ops.h"

namespace spark_kernels::cpu {
namespace {

// Pointer to an optional (C,) parameter in the accumulation dtype, or null.
template <typename acc_t>
const acc_t* optional_param(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<acc_t>() : nullptr;
}

// The per-site math on vectors of the accumulation type (cpu/vec.h), with each row sum kept in vector lanes and added
// across them once per row, in a fixed order: an `omp simd` reduction of a row of C values would spill its lanes and
// add them one after another, a chain of dependent additions per row sum that costs about as much as the row itself
// at C = 96.

template <typename Acc>
inline Acc lane_sum(Vec<Acc> v) {
  Acc l[kLanes<Acc>];
  std::memcpy(l, &v, sizeof v);
  if constexpr (kLanes<Acc> == 8) {
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
  } else {
    return (l[0] + l[2]) + (l[1] + l[3]);
  }
}

// common/norm_row.h's row_stats of a row of C contiguous values (two passes: the mean, then the squared deviations).
template <typename Acc, typename T>
inline norm::RowStats<Acc> site_stats(const T* __restrict x, int64_t channels, Acc eps) {
  constexpr int64_t kL = kLanes<Acc>;
  const int64_t body = channels - channels % kL;
  Vec<Acc> a{}, b{};  // two chains of vector additions
  int64_t c = 0;
  for (; c + 2 * kL <= body; c += 2 * kL) {
    a += load_vec(x + c);
    b += load_vec(x + c + kL);
  }
  if (c < body) a += load_vec(x + c);
  Acc sum = lane_sum<Acc>(a + b);
  for (c = body; c < channels; ++c) sum += static_cast<Acc>(x[c]);
  const Acc mean = sum / static_cast<Acc>(channels);
  const Vec<Acc> m = broadcast(mean);
  a = Vec<Acc>{};
  b = Vec<Acc>{};
  for (c = 0; c + 2 * kL <= body; c += 2 * kL) {
    const Vec<Acc> d0 = load_vec(x + c) - m, d1 = load_vec(x + c + kL) - m;
    a += d0 * d0;
    b += d1 * d1;
  }
  if (c < body) {
    const Vec<Acc> d = load_vec(x + c) - m;
    a += d * d;
  }
  Acc squares = lane_sum<Acc>(a + b);
  for (c = body; c < channels; ++c) {
    const Acc d = static_cast<Acc>(x[c]) - mean;
    squares += d * d;
  }
  return {mean, norm::inv_sqrt(squares / static_cast<Acc>(channels) + eps)};
}

// common/norm_row.h's row_forward of a row of C contiguous values, lane-wise (norm::normalize's operations in its
// order): the compiler vectorizes row_forward's loop poorly for 16-bit storage (float16 took 10x as long as float32).
template <bool kWeighted, bool kBiased, typename Acc, typename X, typename T>
inline void site_forward(const X* __restrict x, T* __restrict y, int64_t channels, norm::RowStats<Acc> s,
                         const Acc* __restrict weight, const Acc* __restrict bias) {
  using V = Vec<Acc>;
  constexpr int64_t kL = kLanes<Acc>;
  const int64_t body = channels - channels % kL;
  const V mean = broadcast(s.mean), rstd = broadcast(s.rstd);
  for (int64_t c = 0; c < body; c += kL) {
    V v = (load_vec(x + c) - mean) * rstd;
    if constexpr (kWeighted) v *= load_vec(weight + c);
    if constexpr (kBiased) v += load_vec(bias + c);
    store_vec(y + c, v);
  }
  for (int64_t c = body; c < channels; ++c) {
    y[c] = static_cast<T>(norm::normalize(static_cast<Acc>(x[c]), s, weight, bias, c));
  }
}

// The C values of a row converted to the accumulation type (exactly).
template <typename Acc, typename T>
inline void widen_row(const T* __restrict x, int64_t channels, Acc* __restrict out) {
  constexpr int64_t kL = kLanes<Acc>;
  const int64_t body = channels - channels % kL;
  for (int64_t c = 0; c < body; c += kL) store_vec(out + c, load_vec(x + c));
  for (int64_t c = body; c < channels; ++c) out[c] = static_cast<Acc>(x[c]);
}

// One site's input gradient (common/norm_row.h's row_backward) with its terms of the parameter gradients added
// to a chunk's per-channel sums, dy * xhat and dy, in the accumulation type: the terms ride on the first of the
// two passes over the row, which reads dy and x already. kDyStep 0: one grad_out value for the whole row.
// 16-bit storage: the first pass keeps g and xhat in `kept` (2 C values of scratch) for the second, which then
// reads them instead of converting dy and x again (the same values, so the same bits).
template <int64_t kDyStep, bool kWeighted, typename Acc, typename T>
inline void site_backward(const T* __restrict dy, const T* __restrict x, T* __restrict dx, int64_t channels,
                          norm::RowStats<Acc> s, const Acc* __restrict weight, Acc* __restrict sum_dy_xhat,
                          Acc* __restrict sum_dy, Acc* __restrict kept) {
  using V = Vec<Acc>;
  constexpr int64_t kL = kLanes<Acc>;
  constexpr bool kKeep = sizeof(T) < sizeof(Acc);
  Acc* __restrict kept_g = kept;
  Acc* __restrict kept_xhat = kept + channels;
  const int64_t body = channels - channels % kL;
  auto dy_at = [&](int64_t c) -> V {
    if constexpr (kDyStep == 0) return broadcast(static_cast<Acc>(dy[0]));
    return load_vec(dy + c);
  };
  auto weighted = [&](V d, int64_t c) -> V {
    if constexpr (kWeighted) return d * load_vec(weight + c);
    return d;
  };
  auto dy_of = [&](int64_t c) { return static_cast<Acc>(dy[c * kDyStep]); };
  auto g_of = [&](Acc d, int64_t c) {
    if constexpr (kWeighted) return d * weight[c];
    return d;
  };
  const V mean = broadcast(s.mean), rstd = broadcast(s.rstd);
  V g_sum{}, g_xhat_sum{};
  for (int64_t c = 0; c < body; c += kL) {
    const V d = dy_at(c);
    const V xhat = (load_vec(x + c) - mean) * rstd;
    const V g = weighted(d, c);
    g_sum += g;
    g_xhat_sum += g * xhat;
    if constexpr (kKeep) {
      store_vec(kept_g + c, g);
      store_vec(kept_xhat + c, xhat);
    }
    store_vec(sum_dy_xhat + c, load_vec(sum_dy_xhat + c) + d * xhat);
    store_vec(sum_dy + c, load_vec(sum_dy + c) + d);
  }
  Acc sum_g = lane_sum<Acc>(g_sum), sum_g_xhat = lane_sum<Acc>(g_xhat_sum);
  for (int64_t c = body; c < channels; ++c) {
    const Acc d = dy_of(c);
    const Acc xhat = (static_cast<Acc>(x[c]) - s.mean) * s.rstd;
    const Acc g = g_of(d, c);
    sum_g += g;
    sum_g_xhat += g * xhat;
    sum_dy_xhat[c] += d * xhat;
    sum_dy[c] += d;
  }
  const Acc mean_g = sum_g / static_cast<Acc>(channels);
  const Acc mean_g_xhat = sum_g_xhat / static_cast<Acc>(channels);
  const V mean_g_v = broadcast(mean_g), mean_g_xhat_v = broadcast(mean_g_xhat);
  for (int64_t c = 0; c < body; c += kL) {  // norm::input_grad, lane-wise
    const V xhat = kKeep ? load_vec(kept_xhat + c) : (load_vec(x + c) - mean) * rstd;
    const V g = kKeep ? load_vec(kept_g + c) : weighted(dy_at(c), c);
    store_vec(dx + c, rstd * (g - mean_g_v - xhat * mean_g_xhat_v));
  }
  for (int64_t c = body; c < channels; ++c) {
    const Acc xhat = (static_cast<Acc>(x[c]) - s.mean) * s.rstd;
    dx[c] = static_cast<T>(norm::input_grad(g_of(dy_of(c), c), xhat, mean_g, mean_g_xhat, s.rstd));
  }
}

// The kernels the shared host code (csrc/norm_ops.h) dispatches to.
struct Kernels {
  using Backend = CpuBackend;
  static constexpr bool reads_any_grad_layout = true;

  template <typename scalar_t>
  static at::Tensor ln_forward(const NormArgs& p, const std::optional<at::Tensor>& weight_t,
                               const std::optional<at::Tensor>& bias_t, double eps, at::Tensor& mean_t,
                               at::Tensor& rstd_t) {
    using T = storage_t<scalar_t>;
    using acc_t = cpu::acc_t<scalar_t>;
    const NormGeometry g = p.g;
    const int64_t count = p.index.numel();
    const int32_t* index = p.index.const_data_ptr<int32_t>();
    at::Tensor y_t = empty_dense(p);
    const T* x = data_as<T>(p.x);
    T* y = mutable_data_as<T>(y_t);
    acc_t* mean = mean_t.data_ptr<acc_t>();
    acc_t* rstd = rstd_t.data_ptr<acc_t>();
    const acc_t* weight = optional_param<acc_t>(weight_t);
    const acc_t* bias = optional_param<acc_t>(bias_t);
    const acc_t eps_acc = static_cast<acc_t>(eps);
    const int64_t channels = g.channels;
    // 16-bit storage: each row converted to the accumulation type once, for the three passes over it.
    constexpr bool kWiden = sizeof(T) < sizeof(acc_t);
    // One site, its C values contiguous (x, y rows of the tensor or of the planes path's buffers); wide: C values of
    // scratch for the converted row.
    auto site = [&](const T* xr, T* yr, int64_t j, acc_t* wide) {
      auto normalize_row = [&](const auto* row) {
        const auto s = site_stats<acc_t>(row, channels, eps_acc);
        if (weight != nullptr) {
          bias != nullptr ? site_forward<true, true>(row, yr, channels, s, weight, bias)
                          : site_forward<true, false>(row, yr, channels, s, weight, bias);
        } else {
          bias != nullptr ? site_forward<false, true>(row, yr, channels, s, weight, bias)
                          : site_forward<false, false>(row, yr, channels, s, weight, bias);
        }
        mean[j] = s.mean;
        rstd[j] = s.rstd;
      };
      if constexpr (kWiden) {
        widen_row(xr, channels, wide);
        normalize_row(static_cast<const acc_t*>(wide));
      } else {
        normalize_row(xr);
      }
    };
    const bool stream = streams_rows(p, y_t);
    const RowPrefetch prefetch = row_prefetch(x);
    for_each_chunk(count, norm::sites_per_chunk(channels), [&](int64_t, int64_t j0, int64_t j1) {
      zero_inactive(g, index, count, j0, j1, y, stream);
      thread_local std::vector<acc_t> wide_row;
      if (kWiden) wide_row.resize(channels);
      acc_t* wide = wide_row.data();
      if (g.rows) {
        const RowSink<T> sink(y, channels, stream);
        for (int64_t j = j0; j < j1; ++j) {
          prefetch.ahead(index, j, j1, channels, 0, channels);
          const int64_t base = int64_t(index[j]) * channels;
          site(x + base, sink.row(base), j, wide);
          sink.done(base);
        }
        stream_fence();
        return;
      }
      thread_local std::vector<int64_t> bases;
      thread_local std::vector<T> x_rows, y_rows;
      bases.resize(j1 - j0);
      x_rows.resize((j1 - j0) * channels);
      y_rows.resize((j1 - j0) * channels);
      for (int64_t j = j0; j < j1; ++j) bases[j - j0] = g.base(index[j]);
      gather_rows(g, x, bases, x_rows.data());
      for (int64_t j = j0; j < j1; ++j) {
        site(x_rows.data() + (j - j0) * channels, y_rows.data() + (j - j0) * channels, j, wide);
      }
      scatter_rows(g, y_rows.data(), bases, y);
    });
    return y_t;
  }

  template <typename scalar_t>
  static at::Tensor ln_backward(const NormArgs& p, const at::Tensor& dy_t, const std::optional<at::Tensor>& weight_t,
                                const at::Tensor& mean_c, const at::Tensor& rstd_c, at::Tensor& grad_weight,
                                at::Tensor& grad_bias) {
    using T = storage_t<scalar_t>;
    using acc_t = cpu::acc_t<scalar_t>;
    const NormGeometry g = p.g;
    const int64_t count = p.index.numel();
    const int32_t* index = p.index.const_data_ptr<int32_t>();
    const int64_t channels = g.channels;
    at::Tensor dx_t = empty_dense(p);
    const int64_t per_chunk = norm::sites_per_chunk(channels);
    const int64_t chunks = norm::num_chunks(count, per_chunk);
    // Per-chunk partial sums of (dy * xhat, dy) per channel, summed over the chunk's sites in the accumulation type,
    // then added in chunk order below in float64.
    std::vector<double> partials(chunks * 2 * channels);
    const T* x = data_as<T>(p.x);
    const T* dy = data_as<T>(dy_t);
    T* dx = mutable_data_as<T>(dx_t);
    const acc_t* mean = mean_c.const_data_ptr<acc_t>();
    const acc_t* rstd = rstd_c.const_data_ptr<acc_t>();
    const acc_t* weight = optional_param<acc_t>(weight_t);
    // grad_out in x's layout, in the other layout, or one value (every stride 0): norm_ops.h keeps these three.
    // A site's grad_out values are read contiguously (gathered into a chunk buffer where they are not), so that
    // every layout gives the same bits.
    const GradLayout layout = grad_layout(dy_t, g.rows);
    const std::vector<int64_t> other_bases =
        layout == GradLayout::kOther ? other_layout_bases(p) : std::vector<int64_t>{};
    const bool stream = streams_rows(p, dx_t);
    // x, and grad_out where it is read at x's offsets.
    const RowPrefetch prefetch = layout == GradLayout::kSame ? row_prefetch(x, dy) : row_prefetch(x);
    auto run = [&](auto mode) {
      constexpr GradLayout kMode = decltype(mode)::value;
      constexpr int64_t dy_step = kMode == GradLayout::kBroadcast ? 0 : 1;
      // Whether a chunk's grad_out is gathered: planes in x's layout, or planes in the other layout (rows x).
      const bool gather_dy = kMode == GradLayout::kSame ? !g.rows : kMode == GradLayout::kOther && g.rows;
      for_each_chunk(count, per_chunk, [&](int64_t k, int64_t j0, int64_t j1) {
        zero_inactive(g, index, count, j0, j1, dx, stream);
        thread_local std::vector<acc_t> sums, kept;
        sums.assign(2 * channels, acc_t(0));
        kept.resize(2 * channels);
        acc_t* sum_dy_xhat = sums.data();
        acc_t* sum_dy = sum_dy_xhat + channels;
        // One site, its x and dx values contiguous (rows of the tensors or of the planes path's buffers).
        auto site = [&](const T* dyr, const T* xr, T* dxr, int64_t j) {
          const norm::RowStats<acc_t> s{mean[j], rstd[j]};
          if (weight != nullptr) {
            site_backward<dy_step, true>(dyr, xr, dxr, channels, s, weight, sum_dy_xhat, sum_dy, kept.data());
          } else {
            site_backward<dy_step, false>(dyr, xr, dxr, channels, s, weight, sum_dy_xhat, sum_dy, kept.data());
          }
        };
        auto keep_sums = [&] {
          double* partial = partials.data() + k * 2 * channels;
          for (int64_t c = 0; c < 2 * channels; ++c) partial[c] = static_cast<double>(sums[c]);
        };
        thread_local std::vector<T> dy_rows;
        if (gather_dy) {
          dy_rows.resize((j1 - j0) * channels);
          if (kMode == GradLayout::kOther) {
            gather_rows(dy, other_bases.data() + j0, j1 - j0, channels, g.plane, dy_rows.data());
          }
        }
        // Where grad_out's values of site j (the chunk's r-th value) start.
        auto dy_row = [&](int64_t j, int64_t base) -> const T* {
          if (gather_dy) return dy_rows.data() + (j - j0) * channels;
          if constexpr (kMode == GradLayout::kBroadcast) return dy;
          if constexpr (kMode == GradLayout::kOther) return dy + other_bases[j];
          return dy + base;
        };
        if (g.rows) {
          const RowSink<T> sink(dx, channels, stream);
          for (int64_t j = j0; j < j1; ++j) {
            prefetch.ahead(index, j, j1, channels, 0, channels);
            const int64_t base = int64_t(index[j]) * channels;
            site(dy_row(j, base), x + base, sink.row(base), j);
            sink.done(base);
          }
          stream_fence();
          keep_sums();
          return;
        }
        thread_local std::vector<int64_t> bases;
        thread_local std::vector<T> x_rows, dx_rows;
        bases.resize(j1 - j0);
        for (auto* rows : {&x_rows, &dx_rows}) rows->resize((j1 - j0) * channels);
        for (int64_t j = j0; j < j1; ++j) bases[j - j0] = g.base(index[j]);
        if (gather_dy) gather_rows(g, dy, bases, dy_rows.data());
        gather_rows(g, x, bases, x_rows.data());
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t r = (j - j0) * channels;
          site(dy_row(j, 0), x_rows.data() + r, dx_rows.data() + r, j);
        }
        scatter_rows(g, dx_rows.data(), bases, dx);
        keep_sums();
      });
    };
    if (layout == GradLayout::kBroadcast) {
      run(std::integral_constant<GradLayout, GradLayout::kBroadcast>{});
    } else if (layout == GradLayout::kOther) {
      run(std::integral_constant<GradLayout, GradLayout::kOther>{});
    } else {
      run(std::integral_constant<GradLayout, GradLayout::kSame>{});
    }
    acc_t* gw = grad_weight.data_ptr<acc_t>();
    acc_t* gb = grad_bias.data_ptr<acc_t>();
    std::vector<double> totals(2 * channels);
    norm::combine_rows(partials.data(), chunks, 2 * channels, totals.data());
    for (int64_t c = 0; c < channels; ++c) {
      gw[c] = static_cast<acc_t>(totals[c]);
      gb[c] = static_cast<acc_t>(totals[channels + c]);
    }
    return dx_t;
  }
};

}  // namespace

SK_REGISTER_LAYER_NORM(CPU, Kernels)

}  // namespace spark_kernels::cpu
