// Masked BatchNorm primitives on CUDA (schemas and conventions: csrc/ops.cpp), float32 / float16 /
// bfloat16, accumulating in float32. The autograd function in spark_kernels/batch_norm.py
// composes them; per-channel arithmetic between them happens there.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/norm_cuda.cuh"

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

struct Prepared {
  at::Tensor x, index;
  NormGeometry g;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& index, const char* op) {
  check_norm_input(x, op, c10::DeviceType::CUDA, {at::kFloat, at::kHalf, at::kBFloat16});
  check_index(index, x, op);
  Prepared p{to_kernel_layout(x, x), index.contiguous(), {}};
  p.g = NormGeometry::of(p.x);
  return p;
}

at::Tensor masked_bn_stats(const at::Tensor& x_in, const at::Tensor& index_in) {
  constexpr const char* op = "masked_bn_stats";
  const Prepared p = prepare(x_in, index_in, op);
  const c10::cuda::CUDAGuard guard(p.x.device());
  at::Tensor out = at::empty({2, p.g.channels}, p.x.options().dtype(at::kDouble));
  SK_DISPATCH_CUDA_FLOATS(p.x.scalar_type(), op, [&] {
    channel_moments<scalar_t>(p.g, p.index, p.x.const_data_ptr<scalar_t>(), out.data_ptr<double>(), p.x.options());
  });
  return out;
}

at::Tensor masked_bn_backward_stats(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& mean_in) {
  constexpr const char* op = "masked_bn_backward_stats";
  const Prepared p = prepare(x_in, index_in, op);
  check_like_x(grad_out_in, "grad_out", x_in, op);
  check_vector(mean_in, "mean", p.g.channels, x_in, op);
  const c10::cuda::CUDAGuard guard(p.x.device());
  const at::Tensor grad_out = to_kernel_layout(grad_out_in, p.x);
  const at::Tensor mean = mean_in.contiguous();
  at::Tensor out = at::empty({2, p.g.channels}, p.x.options().dtype(at::kDouble));
  SK_DISPATCH_CUDA_FLOATS(p.x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    double* sums = out.data_ptr<double>();
    const BackwardStatsTerm<scalar_t, acc_t> term{grad_out.const_data_ptr<scalar_t>(),
                                                  p.x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>()};
    channel_sums<acc_t>(p.g, p.index, term, sums, sums + p.g.channels, p.x.options());
  });
  return out;
}

at::Tensor masked_bn_elemt(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& scale_in,
                           const at::Tensor& shift_in) {
  constexpr const char* op = "masked_bn_elemt";
  const Prepared p = prepare(x_in, index_in, op);
  check_vector(scale_in, "scale", p.g.channels, x_in, op);
  check_vector(shift_in, "shift", p.g.channels, x_in, op);
  const c10::cuda::CUDAGuard guard(p.x.device());
  const at::Tensor scale = scale_in.contiguous(), shift = shift_in.contiguous();
  at::Tensor out;
  SK_DISPATCH_CUDA_FLOATS(p.x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const AffineElem<scalar_t, acc_t> elem{p.x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
                                           shift.const_data_ptr<acc_t>()};
    out = dense_from_active<scalar_t>(p.x, p.g, p.index, elem);
  });
  return out;
}

at::Tensor masked_bn_backward_elemt(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& index_in,
                                    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& d_in) {
  constexpr const char* op = "masked_bn_backward_elemt";
  const Prepared p = prepare(x_in, index_in, op);
  check_like_x(grad_out_in, "grad_out", x_in, op);
  check_vector(a_in, "a", p.g.channels, x_in, op);
  check_vector(b_in, "b", p.g.channels, x_in, op);
  check_vector(d_in, "d", p.g.channels, x_in, op);
  const c10::cuda::CUDAGuard guard(p.x.device());
  const at::Tensor grad_out = to_kernel_layout(grad_out_in, p.x);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), d = d_in.contiguous();
  at::Tensor out;
  SK_DISPATCH_CUDA_FLOATS(p.x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardElem<scalar_t, acc_t> elem{grad_out.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
                                             a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                                             d.const_data_ptr<acc_t>()};
    out = dense_from_active<scalar_t>(p.x, p.g, p.index, elem);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spark_kernels, CUDA, m) {
  m.impl("masked_bn_stats", &masked_bn_stats);
  m.impl("masked_bn_backward_stats", &masked_bn_backward_stats);
  m.impl("masked_bn_elemt", &masked_bn_elemt);
  m.impl("masked_bn_backward_elemt", &masked_bn_backward_elemt);
}

}  // namespace spark_kernels::cuda
