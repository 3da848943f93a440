// Masked BatchNorm kernels on the CPU (conventions: csrc/ops.cpp; host code: csrc/norm_ops.h). The autograd
// function in spark_kernels/batch_norm.py composes the four staged primitives (every backend, SyncBatchNorm),
// doing the per-channel arithmetic between them in Python; without a process group it calls instead the two
// CPU-only training ops at the end of this file, which run the same primitives and do that arithmetic here.
#include <ATen/Dispatch.h>
#include <ATen/TensorAccessor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <tuple>
#include <vector>

#include "cpu/dtypes.h"
#include "cpu/norm_cpu.h"
#include "cpu/vec.h"
#include "norm_ops.h"

namespace spark_kernels::cpu {
namespace {


// -- The element-wise maps of a rows (channels_last) x, a whole row of C values at a time: kLanes<Acc> channels per
// step through cpu/vec.h's load_vec / store_vec (16-bit values converted by vector instructions, bit for bit as the
// scalar conversions), the channels left over value by value. Compiled without contracting a multiply and an add
// into one FMA (GCC contracts by default, and may pick other pairs in other inlined copies): every reader of x and
// grad_out (dense or kept rows, materialized or broadcast) gets the same bits.
#define SK_NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))

// out[c] = x[c] * scale[c] + shift[c], and kept[c] = x[c] when kept is not null.
template <typename T, typename Acc>
SK_NO_FP_CONTRACT void affine_row(const T* __restrict x, const Acc* __restrict scale, const Acc* __restrict shift,
                       int64_t channels, T* __restrict out, T* __restrict kept) {
  int64_t c = 0;
  for (; c + kLanes<Acc> <= channels; c += kLanes<Acc>) {
    if (kept != nullptr) std::memcpy(kept + c, x + c, kLanes<Acc> * sizeof(T));
    store_vec(out + c, load_vec(x + c) * load_vec(scale + c) + load_vec(shift + c));
  }
  for (; c < channels; ++c) {
    if (kept != nullptr) kept[c] = x[c];
    out[c] = static_cast<T>(norm::bn_affine<Acc>(x[c], scale[c], shift[c]));
  }
}

// out[c] = dy[c] * a[c] + x[c] * b[c] + d[c].
template <typename T, typename Acc>
SK_NO_FP_CONTRACT void backward_row(const T* __restrict dy, const T* __restrict x, const Acc* __restrict a,
                         const Acc* __restrict b, const Acc* __restrict d, int64_t channels, T* __restrict out) {
  int64_t c = 0;
  for (; c + kLanes<Acc> <= channels; c += kLanes<Acc>) {
    store_vec(out + c, load_vec(dy + c) * load_vec(a + c) + load_vec(x + c) * load_vec(b + c) + load_vec(d + c));
  }
  for (; c < channels; ++c) out[c] = static_cast<T>(norm::bn_backward_elem<Acc>(dy[c], x[c], a[c], b[c], d[c]));
}

// The start of active site j's row (dense row offset base) in a backward reader of a rows x. A broadcast grad_out
// (every stride 0) is read as a row of copies of its one value, broadcast_row: the same loads, so the compiler
// makes the same arithmetic of it as of a materialized grad_out (the same bits).
template <typename T, bool kCompact>
const T* row_start(const XReader<T, kCompact>& r, int64_t j, int64_t base, const T*) {
  return kCompact ? r.x + j * r.channels : r.x + base;
}
template <typename T>
const T* row_start(const CompactGradReader<T>& r, int64_t j, int64_t, const T*) {
  return r.dy + j * r.channels;
}
template <typename T, GradLayout kLayout>
const T* row_start(const GradReader<T, kLayout>& r, int64_t, int64_t base, const T* broadcast_row) {
  static_assert(kLayout == GradLayout::kSame || kLayout == GradLayout::kBroadcast);
  return kLayout == GradLayout::kSame ? r.dy + base : broadcast_row;
}

// The readers row_start takes: all but a grad_out read through the other layout's offsets (planes x only).
template <typename R>
constexpr bool kReadsRows = true;
template <typename T>
constexpr bool kReadsRows<GradReader<T, GradLayout::kOther>> = false;

// The kernels the shared host code (csrc/norm_ops.h) dispatches to.
struct Kernels {
  using Backend = CpuBackend;
  static constexpr bool reads_compact_x = true;
  static constexpr bool reads_any_grad_layout = true;

  template <typename scalar_t>
  static void bn_stats(const NormArgs& p, at::Tensor& out) {
    const auto* x = data_as<storage_t<scalar_t>>(p.x);
    auto value = [=](int64_t off) { return static_cast<double>(x[off]); };
    const int32_t* index = p.index.const_data_ptr<int32_t>();
    if (p.g.rows) {
      channel_moments<true>(p.g, index, p.index.numel(), value, out.data_ptr<double>(), row_prefetch(x));
    } else {
      channel_moments<false>(p.g, index, p.index.numel(), value, out.data_ptr<double>());
    }
  }

  template <typename scalar_t>
  static void bn_backward_stats(const NormArgs& p, const at::Tensor& grad_out, const at::Tensor& mean_t,
                                at::Tensor& out) {
    const acc_t<scalar_t>* mean = mean_t.const_data_ptr<acc_t<scalar_t>>();
    const int32_t* index = p.index.const_data_ptr<int32_t>();
    with_backward_readers<storage_t<scalar_t>>(p, grad_out, [&](auto x, auto dy) {
      const norm::BnBackwardTerms<double> terms;
      auto term = [=](int64_t j, int64_t off, int64_t c, double& a, double& b) {
        terms(static_cast<double>(dy(j, off, c)), static_cast<double>(x(j, off, c)), static_cast<double>(mean[c]), a,
              b);
      };
      if (p.g.rows) {
        channel_sums<true>(p.g, index, p.index.numel(), term, out.data_ptr<double>(), backward_prefetch(x, dy));
      } else {
        channel_sums<false>(p.g, index, p.index.numel(), term, out.data_ptr<double>());
      }
    });
  }

  template <typename scalar_t>
  static at::Tensor bn_elemt(const NormArgs& p, const at::Tensor& scale_t, const at::Tensor& shift_t) {
    using T = storage_t<scalar_t>;
    using Acc = acc_t<scalar_t>;
    const T* x = data_as<T>(p.x);
    const Acc* scale = scale_t.const_data_ptr<Acc>();
    const Acc* shift = shift_t.const_data_ptr<Acc>();
    if (p.g.rows) {
      const int64_t channels = p.g.channels;
      return dense_rows_map<T>(
          p, [=](int64_t, int64_t base, T* out) {
            affine_row(x + base, scale, shift, channels, out, static_cast<T*>(nullptr));
          },
          row_prefetch(x));
    }
    return dense_map<T>(
        p, [=](int64_t, int64_t off, int64_t c, int64_t) {
          return static_cast<T>(norm::bn_affine<Acc>(x[off], scale[c], shift[c]));
        },
        row_prefetch(x));
  }

  // bn_elemt that also copies the active rows of x, in index order, into rows (M, C): what backward reads, taken in
  // the same pass (x in rows layout).
  template <typename scalar_t>
  static at::Tensor bn_elemt_keeping_rows(const NormArgs& p, const at::Tensor& scale_t, const at::Tensor& shift_t,
                                          at::Tensor& rows_t) {
    using T = storage_t<scalar_t>;
    using Acc = acc_t<scalar_t>;
    TORCH_INTERNAL_ASSERT(p.g.rows);
    const T* x = data_as<T>(p.x);
    T* rows = mutable_data_as<T>(rows_t);
    const Acc* scale = scale_t.const_data_ptr<Acc>();
    const Acc* shift = shift_t.const_data_ptr<Acc>();
    const int64_t channels = p.g.channels;
    return dense_rows_map<T>(
        p, [=](int64_t j, int64_t base, T* out) {
          affine_row(x + base, scale, shift, channels, out, rows + j * channels);
        },
        row_prefetch(x));
  }

  // dy_rows: grad_out's active rows when the caller gathered them (planes_grad_sums_keeping_rows), else null.
  template <typename scalar_t>
  static at::Tensor bn_backward_elemt(const NormArgs& p, const at::Tensor& grad_out, const at::Tensor& a_t,
                                      const at::Tensor& b_t, const at::Tensor& d_t,
                                      const at::Tensor* dy_rows = nullptr) {
    using T = storage_t<scalar_t>;
    using Acc = acc_t<scalar_t>;
    const Acc* a = a_t.const_data_ptr<Acc>();
    const Acc* b = b_t.const_data_ptr<Acc>();
    const Acc* d = d_t.const_data_ptr<Acc>();
    return with_backward_readers<T>(p, grad_out, [&](auto x, auto dy) {
      if constexpr (kReadsRows<decltype(dy)>) {
        if (p.g.rows) {
          const int64_t channels = p.g.channels;
          std::vector<T> copies;
          if constexpr (std::is_same_v<decltype(dy), GradReader<T, GradLayout::kBroadcast>>) {
            copies.assign(channels, dy(0, 0, 0));
          }
          const T* broadcast_row = copies.data();
          return dense_rows_map<T>(
              p, [=](int64_t j, int64_t base, T* out) {
                backward_row(row_start(dy, j, base, broadcast_row), row_start(x, j, base, broadcast_row), a, b, d,
                             channels, out);
              },
              backward_prefetch(x, dy));
        }
      }
      return dense_map<T>(
          p, [=](int64_t j, int64_t off, int64_t c, int64_t) {
            return static_cast<T>(norm::bn_backward_elem<Acc>(dy(j, off, c), x(j, off, c), a[c], b[c], d[c]));
          },
          backward_prefetch(x, dy));
    }, dy_rows);
  }
};

}  // namespace

// -- The training ops (CPU only; schemas: CPU_TRAINING_OPS in spark_kernels/_registry.py). The per-channel
// arithmetic is that of spark_kernels/batch_norm.py's staged path, in float64, on n = M active sites.

namespace {

// Sites of a planes grad_out gathered at a time by planes_grad_sums_keeping_rows: about kGatheredElements values
// (a buffer that stays in the L2 cache).
constexpr int64_t kGatheredElements = 65536;

// Kernels::bn_backward_stats of a planes (NCHW) grad_out of a rows x, with channel_sums<true>'s chunks and per-channel
// order of the sites (the same bits as for a rows grad_out), that also leaves grad_out's active rows in dy_rows
// (M, C) for bn_backward_elemt. Each block of a chunk's sites is gathered (gather_rows) into a per-thread buffer that
// the sums read while it is cached, then copied out: one pass less over the M * C values than gathering all of them
// first (active_rows_of_planes). The buffer's rows are a cache line longer than C values: rows of 1024 or 2048
// float values (a multiple of 4 KiB) would all fall in the same L1 sets.
template <typename T, typename Acc>
void planes_grad_sums_keeping_rows(const NormArgs& p, const at::Tensor& grad_out, const Acc* mean, double* out,
                                   at::Tensor& dy_rows) {
  const NormGeometry& g = p.g;
  const int64_t channels = g.channels;
  const int32_t* index = p.index.const_data_ptr<int32_t>();
  const std::vector<int64_t> bases = other_layout_bases(p);
  const T* dy = data_as<T>(grad_out);
  T* kept = mutable_data_as<T>(dy_rows);
  std::vector<int64_t> bounds;
  append_chunks(0, p.index.numel(), norm::sites_per_chunk(channels), bounds);
  std::vector<double> partials(chunk_count(bounds) * 2 * channels, 0.0);
  const int64_t block = std::max<int64_t>(1, kGatheredElements / channels);
  const int64_t row_stride = channels + 64 / static_cast<int64_t>(sizeof(T));
  auto sums = [&](auto x) {
    const RowPrefetch prefetch = row_prefetch(x.dense_rows());
    const norm::BnBackwardTerms<double> terms;
    for_each_listed_chunk(bounds, [&](int64_t k, int64_t first, int64_t end) {
      thread_local std::vector<T> buffer;
      buffer.resize(std::max<size_t>(buffer.size(), block * row_stride));
      T* rows = buffer.data();
      double* __restrict sum_dy = partials.data() + k * 2 * channels;
      double* __restrict sum_dy_xmu = sum_dy + channels;
      for (int64_t j0 = first; j0 < end; j0 += block) {
        const int64_t j1 = std::min(end, j0 + block);
        gather_rows(dy, bases.data() + j0, j1 - j0, channels, g.plane, rows, row_stride);
        for (int64_t j = j0; j < j1; ++j) {
          prefetch.ahead(index, j, end, channels, 0, channels);
          const int64_t base = static_cast<int64_t>(index[j]) * channels;
          const T* row = rows + (j - j0) * row_stride;
          for (int64_t c = 0; c < channels; ++c) {
            double a, b;
            terms(static_cast<double>(row[c]), static_cast<double>(x(j, base + c, c)), static_cast<double>(mean[c]),
                  a, b);
            sum_dy[c] += a;
            sum_dy_xmu[c] += b;
          }
          std::memcpy(kept + j * channels, row, channels * sizeof(T));
        }
      }
    });
  };
  const T* x = data_as<T>(p.x);
  p.compact ? sums(XReader<T, true>{x, channels}) : sums(XReader<T, false>{x, channels});
  combine_chunk_sums(partials, 0, chunk_count(bounds), channels, out);
}

// An optional (C,) parameter or running statistic: floating, on the CPU.
void check_channel_param(const std::optional<at::Tensor>& t, const char* name, int64_t channels, const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": ", name, " must have shape (", channels, "), got ",
              t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be floating, got ", t->scalar_type());
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t->device());
}

// fn(scalar_t{}) with scalar_t the floating dtype of t (a checked channel parameter).
template <typename Fn>
void dispatch_param(const at::Tensor& t, const Fn& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "masked_bn_train", [&] {
    fn(scalar_t{});
  });
}

// The values of an optional (C,) parameter as float64, or fill where it is absent. Read in place, whatever its dtype
// and stride: at the late stages' few active rows, a converted copy per call costs a visible share.
std::vector<double> channel_values(const std::optional<at::Tensor>& t, int64_t channels, double fill) {
  std::vector<double> out(channels, fill);
  if (t.has_value()) {
    dispatch_param(*t, [&](auto dtype) {
      const auto values = t->accessor<decltype(dtype), 1>();
      for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<double>(values[c]);
    });
  }
  return out;
}

// running = (1 - momentum) * running + momentum * observed, in place, in running's dtype: the arithmetic of
// spark_kernels/reference.py's running.mul_(1 - momentum).add_(observed.to(running.dtype), alpha=momentum).
void update_running(at::Tensor& running, const std::vector<double>& observed, double momentum, const char* name,
                    const char* op) {
  TORCH_CHECK(running.stride(0) != 0 || running.numel() <= 1, op, ": ", name,
              " is updated in place and must not be an expanded view (stride 0)");
  dispatch_param(running, [&](auto dtype) {
    using scalar_t = decltype(dtype);
    using Op = at::opmath_type<scalar_t>;
    auto values = running.accessor<scalar_t, 1>();
    const Op keep = static_cast<Op>(1 - momentum), take = static_cast<Op>(momentum);
    for (int64_t c = 0; c < running.size(0); ++c) {
      const Op kept = static_cast<Op>(static_cast<scalar_t>(static_cast<Op>(values[c]) * keep));
      // add_'s vectorized kernel: one fused multiply-add.
      values[c] = static_cast<scalar_t>(std::fma(take, static_cast<Op>(static_cast<scalar_t>(observed[c])), kept));
    }
  });
}

// (y, rows, mean, invstd): y the normalized x (channels_last), rows the (M, C) active rows of x for backward, mean
// and invstd = 1 / sqrt(biased variance + eps) per channel in float64. running_mean / running_var, when given, are
// updated in place as nn.BatchNorm2d does (unbiased variance), unless no site is active.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_bn_train_forward(
    const at::Tensor& x_in, const at::Tensor& index_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, double momentum, double eps) {
  constexpr const char* op = "masked_bn_train_forward";
  const NormArgs p = prepare_norm<CpuBackend>(x_in, index_in, op);
  TORCH_CHECK(p.g.rows, op, ": x must be channels_last (the rows layout), got strides ", x_in.strides());
  const int64_t channels = p.g.channels;
  check_channel_param(weight, "weight", channels, op);
  check_channel_param(bias, "bias", channels, op);
  check_channel_param(running_mean, "running_mean", channels, op);
  check_channel_param(running_var, "running_var", channels, op);
  const auto doubles = p.x.options().dtype(at::kDouble);
  at::Tensor moments = at::empty({2, channels}, doubles);
  at::Tensor mean = at::empty({channels}, doubles), invstd = at::empty({channels}, doubles);
  const auto acc_options = p.x.options().dtype(accumulation_type(p.x.scalar_type()));
  at::Tensor scale = at::empty({channels}, acc_options), shift = at::empty({channels}, acc_options);
  at::Tensor rows = at::empty({p.index.numel(), channels}, p.x.options());
  const std::vector<double> w = channel_values(weight, channels, 1.0), b = channel_values(bias, channels, 0.0);
  const int64_t n = p.index.numel();
  std::vector<double> var(channels);
  at::Tensor y = CpuBackend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    using scalar_t = decltype(dtype);
    using Acc = acc_t<scalar_t>;
    Kernels::bn_stats<scalar_t>(p, moments);
    const double* m = moments.const_data_ptr<double>();
    double *mean_d = mean.data_ptr<double>(), *invstd_d = invstd.data_ptr<double>();
    Acc *scale_d = scale.data_ptr<Acc>(), *shift_d = shift.data_ptr<Acc>();
    for (int64_t c = 0; c < channels; ++c) {
      mean_d[c] = m[c];
      var[c] = m[channels + c] / static_cast<double>(std::max<int64_t>(n, 1));
      invstd_d[c] = 1.0 / std::sqrt(var[c] + eps);
      const double scale_c = w[c] * invstd_d[c];
      scale_d[c] = static_cast<Acc>(scale_c);
      shift_d[c] = static_cast<Acc>(b[c] - mean_d[c] * scale_c);
    }
    return Kernels::bn_elemt_keeping_rows<scalar_t>(p, scale, shift, rows);
  });
  if (n > 0) {  // the running statistics' update of spark_kernels/reference.py, in their dtype
    if (running_mean.has_value()) {
      const double* m = mean.const_data_ptr<double>();
      at::Tensor running = *running_mean;
      update_running(running, std::vector<double>(m, m + channels), momentum, "running_mean", op);
    }
    if (running_var.has_value()) {
      const double correction = static_cast<double>(n) / static_cast<double>(std::max<int64_t>(n - 1, 1));
      std::vector<double> unbiased(channels);
      for (int64_t c = 0; c < channels; ++c) unbiased[c] = var[c] * correction;
      at::Tensor running = *running_var;
      update_running(running, unbiased, momentum, "running_var", op);
    }
  }
  return {y, rows, mean, invstd};
}

// (grad_x, grad_weight, grad_bias) of masked_bn_train_forward: x dense or as the (M, C) rows it returned, mean and
// invstd its float64 statistics; grad_weight and grad_bias in weight's dtype (float64 without a weight), what
// autograd hands back for the parameters.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_bn_train_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  constexpr const char* op = "masked_bn_train_backward";
  const auto prepared = prepare_backward<Kernels>(grad_out_in, x_in, index_in, op);
  const NormArgs& p = prepared.first;
  const at::Tensor& grad_out = prepared.second;
  const int64_t channels = p.g.channels;
  check_channel_param(weight, "weight", channels, op);
  for (const auto& [t, name] : {std::pair{&mean_in, "mean"}, std::pair{&invstd_in, "invstd"}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == channels && t->scalar_type() == at::kDouble && t->device().is_cpu(),
                op, ": ", name, " must be a float64 CPU tensor of shape (", channels, "), got ", t->scalar_type(),
                " ", t->sizes(), " on ", t->device());
  }
  const at::ScalarType acc_type = accumulation_type(p.x.scalar_type());
  const auto acc_options = p.x.options().dtype(acc_type);
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  const std::vector<double> w = channel_values(weight, channels, 1.0);
  const at::ScalarType param_type = weight.has_value() ? weight->scalar_type() : at::kDouble;
  at::Tensor mean_acc = at::empty({channels}, acc_options);  // mean rounded to the accumulation dtype
  at::Tensor sums = at::empty({2, channels}, p.x.options().dtype(at::kDouble));
  at::Tensor a = at::empty({channels}, acc_options), b = at::empty({channels}, acc_options);
  at::Tensor d = at::empty({channels}, acc_options);
  const auto param_options = p.x.options().dtype(param_type);
  at::Tensor grad_weight = at::empty({channels}, param_options), grad_bias = at::empty({channels}, param_options);
  const double n = static_cast<double>(std::max<int64_t>(p.index.numel(), 1));
  at::Tensor grad_x = CpuBackend::Dtypes::dispatch(p.x.scalar_type(), op, [&](auto dtype) {
    using scalar_t = decltype(dtype);
    using Acc = acc_t<scalar_t>;
    const double *mean_d = mean.const_data_ptr<double>(), *invstd_d = invstd.const_data_ptr<double>();
    Acc* mean_a = mean_acc.data_ptr<Acc>();
    for (int64_t c = 0; c < channels; ++c) mean_a[c] = static_cast<Acc>(mean_d[c]);
    // A planes grad_out is read from its active rows by both passes: gathered once, by the first.
    std::optional<at::Tensor> dy_rows;
    if (p.g.rows && grad_layout(grad_out, true) == GradLayout::kOther) {
      dy_rows = at::empty({p.index.numel(), channels}, grad_out.options());
      planes_grad_sums_keeping_rows<storage_t<scalar_t>>(p, grad_out, mean_a, sums.data_ptr<double>(), *dy_rows);
    } else {
      Kernels::bn_backward_stats<scalar_t>(p, grad_out, mean_acc, sums);
    }
    const at::Tensor* dy_rows_ptr = dy_rows.has_value() ? &*dy_rows : nullptr;
    const double* s = sums.const_data_ptr<double>();
    Acc *a_d = a.data_ptr<Acc>(), *b_d = b.data_ptr<Acc>(), *d_d = d.data_ptr<Acc>();
    dispatch_param(grad_weight, [&](auto param_dtype) {
      using param_t = decltype(param_dtype);
      param_t *gw = grad_weight.data_ptr<param_t>(), *gb = grad_bias.data_ptr<param_t>();
      for (int64_t c = 0; c < channels; ++c) {
        // The kernels centre x on mean_acc; sum dy (mean_acc - mean) restores the exact centre.
        const double sum_dy = s[c];
        const double sum_dy_xmu = s[channels + c] - (mean_d[c] - static_cast<double>(mean_a[c])) * sum_dy;
        gw[c] = static_cast<param_t>(sum_dy_xmu * invstd_d[c]);
        gb[c] = static_cast<param_t>(sum_dy);
        const double ac = w[c] * invstd_d[c];
        const double bc = -ac * invstd_d[c] * invstd_d[c] * sum_dy_xmu / n;
        a_d[c] = static_cast<Acc>(ac);
        b_d[c] = static_cast<Acc>(bc);
        d_d[c] = static_cast<Acc>(-ac * sum_dy / n - mean_d[c] * bc);
      }
    });
    return Kernels::bn_backward_elemt<scalar_t>(p, grad_out, a, b, d, dy_rows_ptr);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

SK_REGISTER_BATCH_NORM(CPU, Kernels)

TORCH_LIBRARY_IMPL(spark_kernels, CPU, m) {
  m.impl("masked_bn_train_forward", &masked_bn_train_forward);
  m.impl("masked_bn_train_backward", &masked_bn_train_backward);
}

}  // namespace spark_kernels::cpu
