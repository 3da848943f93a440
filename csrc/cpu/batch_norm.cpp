// Masked BatchNorm kernels on the CPU (conventions: csrc/ops.cpp; host code: csrc/norm_ops.h). The autograd
// function in spark_kernels/batch_norm.py composes them; per-channel arithmetic between them happens there.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/dtypes.h"
#include "cpu/norm_cpu.h"
#include "norm_ops.h"

namespace spark_kernels::cpu {
namespace {

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
    return dense_map<T>(
        p, [=](int64_t, int64_t off, int64_t c, int64_t) {
          return static_cast<T>(norm::bn_affine<Acc>(x[off], scale[c], shift[c]));
        },
        row_prefetch(x));
  }

  template <typename scalar_t>
  static at::Tensor bn_backward_elemt(const NormArgs& p, const at::Tensor& grad_out, const at::Tensor& a_t,
                                      const at::Tensor& b_t, const at::Tensor& d_t) {
    using T = storage_t<scalar_t>;
    using Acc = acc_t<scalar_t>;
    const Acc* a = a_t.const_data_ptr<Acc>();
    const Acc* b = b_t.const_data_ptr<Acc>();
    const Acc* d = d_t.const_data_ptr<Acc>();
    return with_backward_readers<T>(p, grad_out, [&](auto x, auto dy) {
      return dense_map<T>(
          p, [=](int64_t j, int64_t off, int64_t c, int64_t) {
            return static_cast<T>(norm::bn_backward_elem<Acc>(dy(j, off, c), x(j, off, c), a[c], b[c], d[c]));
          },
          backward_prefetch(x, dy));
    });
  }
};

}  // namespace

SK_REGISTER_BATCH_NORM(CPU, Kernels)

}  // namespace spark_kernels::cpu
