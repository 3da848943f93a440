// Masked LayerNorm kernels on CUDA (conventions: csrc/ops.cpp; host code: csrc/norm_ops.h), float32 / float16 /
// bfloat16, accumulating in float32. Rows (channels_last): one warp per active site, lanes
// over channels. Planes (NCHW): one thread per active site running the shared row math of
// common/norm_row.h (consecutive threads read consecutive sites of a plane).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>

#include "cuda/norm_cuda.cuh"
#include "norm_ops.h"

namespace spark_kernels::cuda {
namespace {

// Butterfly sum: every lane ends with the same value (a + b == b + a exactly at each step).
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

struct WarpSlot {
  int64_t warp, warps;
  int lane;
};

__device__ __forceinline__ WarpSlot warp_slot() {
  const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  return {thread / kWarp, int64_t(gridDim.x) * blockDim.x / kWarp, static_cast<int>(threadIdx.x % kWarp)};
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
ln_forward_rows_kernel(NormGeometry g, const int32_t* __restrict__ index, int64_t count, const T* __restrict__ x,
                       const Acc* __restrict__ weight, const Acc* __restrict__ bias, Acc eps, T* __restrict__ y,
                       Acc* __restrict__ mean, Acc* __restrict__ rstd) {
  const WarpSlot w = warp_slot();
  const Acc channels = static_cast<Acc>(g.channels);
  for (int64_t j = w.warp; j < count; j += w.warps) {
    const int64_t base = g.base(site_of(index, j, g.sites()));
    Acc sum = 0;
    for (int64_t c = w.lane; c < g.channels; c += kWarp) sum += static_cast<Acc>(x[base + c]);
    const Acc row_mean = warp_sum(sum) / channels;
    Acc squares = 0;
    for (int64_t c = w.lane; c < g.channels; c += kWarp) {
      const Acc d = static_cast<Acc>(x[base + c]) - row_mean;
      squares += d * d;
    }
    const norm::RowStats<Acc> s{row_mean, norm::inv_sqrt(warp_sum(squares) / channels + eps)};
    for (int64_t c = w.lane; c < g.channels; c += kWarp) {
      y[base + c] = static_cast<T>(norm::normalize(static_cast<Acc>(x[base + c]), s, weight, bias, c));
    }
    if (w.lane == 0) {
      mean[j] = s.mean;
      rstd[j] = s.rstd;
    }
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
ln_forward_planes_kernel(NormGeometry g, const int32_t* __restrict__ index, int64_t count, const T* __restrict__ x,
                         const Acc* __restrict__ weight, const Acc* __restrict__ bias, Acc eps, T* __restrict__ y,
                         Acc* __restrict__ mean, Acc* __restrict__ rstd) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = g.base(site_of(index, j, g.sites()));
    const auto s = norm::row_stats<Acc>(x + base, g.plane, g.channels, eps);
    norm::row_forward<Acc>(x + base, g.plane, y + base, g.plane, g.channels, s, weight, bias);
    mean[j] = s.mean;
    rstd[j] = s.rstd;
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
ln_backward_rows_kernel(NormGeometry g, const int32_t* __restrict__ index, int64_t count, const T* __restrict__ dy,
                        const T* __restrict__ x, const Acc* __restrict__ weight, const Acc* __restrict__ mean,
                        const Acc* __restrict__ rstd, T* __restrict__ dx) {
  const WarpSlot w = warp_slot();
  const Acc channels = static_cast<Acc>(g.channels);
  for (int64_t j = w.warp; j < count; j += w.warps) {
    const int64_t base = g.base(site_of(index, j, g.sites()));
    const norm::RowStats<Acc> s{mean[j], rstd[j]};
    Acc sum_g = 0, sum_g_xhat = 0;
    for (int64_t c = w.lane; c < g.channels; c += kWarp) {
      const Acc grad = static_cast<Acc>(dy[base + c]) * (weight != nullptr ? weight[c] : Acc(1));
      sum_g += grad;
      sum_g_xhat += grad * (static_cast<Acc>(x[base + c]) - s.mean) * s.rstd;
    }
    const Acc mean_g = warp_sum(sum_g) / channels;
    const Acc mean_g_xhat = warp_sum(sum_g_xhat) / channels;
    for (int64_t c = w.lane; c < g.channels; c += kWarp) {
      const Acc grad = static_cast<Acc>(dy[base + c]) * (weight != nullptr ? weight[c] : Acc(1));
      const Acc xhat = (static_cast<Acc>(x[base + c]) - s.mean) * s.rstd;
      dx[base + c] = static_cast<T>(norm::input_grad(grad, xhat, mean_g, mean_g_xhat, s.rstd));
    }
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
ln_backward_planes_kernel(NormGeometry g, const int32_t* __restrict__ index, int64_t count, const T* __restrict__ dy,
                          const T* __restrict__ x, const Acc* __restrict__ weight, const Acc* __restrict__ mean,
                          const Acc* __restrict__ rstd, T* __restrict__ dx) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < count; j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t base = g.base(site_of(index, j, g.sites()));
    const norm::RowStats<Acc> s{mean[j], rstd[j]};
    norm::row_backward<Acc>(dy + base, g.plane, x + base, g.plane, dx + base, g.plane, g.channels, s, weight);
  }
}

// (dy * xhat, dy) of one element, summed per channel into grad_weight and grad_bias.
template <typename T, typename Acc>
struct ParamGradTerm {
  const T* dy;
  const T* x;
  const Acc* mean;
  const Acc* rstd;
  __device__ void operator()(int64_t j, int64_t offset, int64_t, Acc& a, Acc& b) const {
    norm::LnParamGradTerms<Acc>()(static_cast<Acc>(dy[offset]), static_cast<Acc>(x[offset]), mean[j], rstd[j], a, b);
  }
};

template <typename Acc>
const Acc* optional_param(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<Acc>() : nullptr;
}

// Rows: one warp per site; planes: one thread per site.
unsigned row_grid(const NormGeometry& g, int64_t count) {
  return grid_for(g.rows ? count * kWarp : count, kThreads);
}

// The kernels the shared host code (csrc/norm_ops.h) dispatches to.
struct Kernels {
  using Backend = CudaBackend;

  template <typename scalar_t>
  static at::Tensor ln_forward(const NormArgs& p, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps, at::Tensor& mean,
                               at::Tensor& rstd) {
    using acc_t = at::opmath_type<scalar_t>;
    const NormGeometry& g = p.g;
    const int64_t count = p.index.numel();
    at::Tensor y = at::zeros_like(p.x, kernel_memory_format(p.x));
    auto kernel = g.rows ? ln_forward_rows_kernel<scalar_t, acc_t> : ln_forward_planes_kernel<scalar_t, acc_t>;
    kernel<<<row_grid(g, count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g, p.index.const_data_ptr<int32_t>(), count, p.x.const_data_ptr<scalar_t>(), optional_param<acc_t>(weight),
        optional_param<acc_t>(bias), static_cast<acc_t>(eps), y.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
        rstd.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
  }

  template <typename scalar_t>
  static at::Tensor ln_backward(const NormArgs& p, const at::Tensor& dy, const std::optional<at::Tensor>& weight,
                                const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& grad_weight,
                                at::Tensor& grad_bias) {
    using acc_t = at::opmath_type<scalar_t>;
    const NormGeometry& g = p.g;
    const int64_t count = p.index.numel();
    at::Tensor dx = at::zeros_like(p.x, kernel_memory_format(p.x));
    auto kernel = g.rows ? ln_backward_rows_kernel<scalar_t, acc_t> : ln_backward_planes_kernel<scalar_t, acc_t>;
    kernel<<<row_grid(g, count), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g, p.index.const_data_ptr<int32_t>(), count, dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
        optional_param<acc_t>(weight), mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
        dx.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const ParamGradTerm<scalar_t, acc_t> term{dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
                                              mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>()};
    channel_sums<acc_t>(g, p.index, term, grad_weight.data_ptr<acc_t>(), grad_bias.data_ptr<acc_t>(), p.x.options());
    return dx;
  }
};

}  // namespace

SK_REGISTER_LAYER_NORM(CUDA, Kernels)

}  // namespace spark_kernels::cuda
