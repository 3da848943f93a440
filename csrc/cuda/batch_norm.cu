// Masked BatchNorm kernels on CUDA (conventions: csrc/ops.cpp; host code: csrc/norm_ops.h), float32 / float16 /
// bfloat16, accumulating in float32. The autograd function in spark_kernels/batch_norm.py
// composes them; per-channel arithmetic between them happens there.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/norm_cuda.cuh"
#include "norm_ops.h"

namespace spark_kernels::cuda {
namespace {

template <typename T, typename Acc>
struct BackwardStatsTerm {
  const T* dy;
  const T* x;
  const Acc* mean;
  __device__ void operator()(int64_t, int64_t offset, int64_t c, Acc& a, Acc& b) const {
    norm::BnBackwardTerms<Acc>()(static_cast<Acc>(dy[offset]), static_cast<Acc>(x[offset]), mean[c], a, b);
  }
};

template <typename T, typename Acc>
struct AffineElem {
  const T* x;
  const Acc* scale;
  const Acc* shift;
  __device__ T operator()(int64_t offset, int64_t c, int64_t) const {
    return static_cast<T>(norm::bn_affine<Acc>(static_cast<Acc>(x[offset]), scale[c], shift[c]));
  }
};

template <typename T, typename Acc>
struct BackwardElem {
  const T* dy;
  const T* x;
  const Acc* a;
  const Acc* b;
  const Acc* d;
  __device__ T operator()(int64_t offset, int64_t c, int64_t) const {
    return static_cast<T>(
        norm::bn_backward_elem<Acc>(static_cast<Acc>(dy[offset]), static_cast<Acc>(x[offset]), a[c], b[c], d[c]));
  }
};

// The kernels the shared host code (csrc/norm_ops.h) dispatches to.
struct Kernels {
  using Backend = CudaBackend;

  template <typename scalar_t>
  static void bn_stats(const NormArgs& p, at::Tensor& out) {
    channel_moments<scalar_t>(p.g, p.index, p.x.const_data_ptr<scalar_t>(), out.data_ptr<double>(), p.x.options());
  }

  template <typename scalar_t>
  static void bn_backward_stats(const NormArgs& p, const at::Tensor& grad_out, const at::Tensor& mean,
                                at::Tensor& out) {
    using acc_t = at::opmath_type<scalar_t>;
    double* sums = out.data_ptr<double>();
    const BackwardStatsTerm<scalar_t, acc_t> term{grad_out.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
                                                  mean.const_data_ptr<acc_t>()};
    channel_sums<acc_t>(p.g, p.index, term, sums, sums + p.g.channels, p.x.options());
  }

  template <typename scalar_t>
  static at::Tensor bn_elemt(const NormArgs& p, const at::Tensor& scale, const at::Tensor& shift) {
    using acc_t = at::opmath_type<scalar_t>;
    const AffineElem<scalar_t, acc_t> elem{p.x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
                                           shift.const_data_ptr<acc_t>()};
    return dense_from_active<scalar_t>(p.x, p.g, p.index, elem);
  }

  template <typename scalar_t>
  static at::Tensor bn_backward_elemt(const NormArgs& p, const at::Tensor& grad_out, const at::Tensor& a,
                                      const at::Tensor& b, const at::Tensor& d) {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardElem<scalar_t, acc_t> elem{grad_out.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
                                             a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                                             d.const_data_ptr<acc_t>()};
    return dense_from_active<scalar_t>(p.x, p.g, p.index, elem);
  }
};

}  // namespace

SK_REGISTER_BATCH_NORM(CUDA, Kernels)

}  // namespace spark_kernels::cuda
