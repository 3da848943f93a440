// What each native backend takes, and the dtype and kernel-size dispatch of the host code shared by the
// CPU and CUDA ops (csrc/norm_ops.h, csrc/dwconv_ops.h). The Python side declares the same facts per op
// in spark_kernels/_registry.py, which the dispatcher reads before a call reaches these kernels; the
// checks here keep a direct torch.ops.spark_kernels.* call safe.
#pragma once
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>
#include <type_traits>

namespace spark_kernels {

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "float64";
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

// "a, b or c" of a list of words.
inline std::string either(std::initializer_list<std::string> words) {
  std::string out;
  size_t i = 0;
  for (const std::string& w : words) {
    if (i > 0) out += i + 1 == words.size() ? " or " : ", ";
    out += w;
    ++i;
  }
  return out;
}

// A list of dtypes: membership, the list in words, and dispatch of f(scalar_t{}) on a runtime dtype.
template <at::ScalarType... kTypes>
struct DtypeList {
  static bool contains(at::ScalarType t) { return ((t == kTypes) || ...); }
  static std::string names() { return either({std::string(dtype_name(kTypes))...}); }

  template <typename F>
  static auto dispatch(at::ScalarType t, const char* op, F&& f) {
    return dispatch_from<kTypes...>(t, op, f);
  }

 private:
  template <at::ScalarType kFirst, at::ScalarType... kRest, typename F>
  static auto dispatch_from(at::ScalarType t, const char* op, F& f) {
    using scalar_t = c10::impl::ScalarTypeToCPPTypeT<kFirst>;
    if constexpr (sizeof...(kRest) == 0) {
      TORCH_CHECK(t == kFirst, op, ": unsupported dtype ", t, " (expected ", names(), ")");
      return f(scalar_t{});
    } else {
      if (t == kFirst) return f(scalar_t{});
      return dispatch_from<kRest...>(t, op, f);
    }
  }
};

// A list of kernel sizes: membership, the list in words, and dispatch of f(std::integral_constant<int, k>{})
// on a runtime k, so that a size not in the list can never reach another size's template.
template <int... kSizes>
struct KernelSizes {
  static bool contains(int64_t k) { return ((k == kSizes) || ...); }
  static std::string names() { return either({std::to_string(kSizes)...}); }

  template <typename F>
  static auto dispatch(int64_t k, const char* op, F&& f) {
    return dispatch_from<kSizes...>(k, op, f);
  }

 private:
  template <int kFirst, int... kRest, typename F>
  static auto dispatch_from(int64_t k, const char* op, F& f) {
    if constexpr (sizeof...(kRest) == 0) {
      TORCH_CHECK(k == kFirst, op, ": weight: kernel size must be ", names(), ", got ", k);
      return f(std::integral_constant<int, kFirst>{});
    } else {
      if (k == kFirst) return f(std::integral_constant<int, kFirst>{});
      return dispatch_from<kRest...>(k, op, f);
    }
  }
};

// The depthwise conv kernel sizes every native backend is instantiated for (DWCONV_KERNEL_SIZES in
// spark_kernels/_registry.py).
using DwconvKernelSizes = KernelSizes<3, 5, 7>;
// Its strides (DWCONV_STRIDES): checked, never dispatched on (the site tables carry the stride).
using DwconvStrides = KernelSizes<1, 2>;

// The native backends: name, device type, dtypes (the "cpu" and "cuda" entries of the op registry).
// validates_index: the CPU kernels check every index value before use (cheap there); the CUDA kernels
// trap on an out-of-range site instead of paying a device synchronization per call.
struct CpuBackend {
  static constexpr const char* name = "cpu";
  static constexpr c10::DeviceType device = c10::DeviceType::CPU;
  using Dtypes = DtypeList<at::kDouble, at::kFloat, at::kHalf, at::kBFloat16>;
  static constexpr bool validates_index = true;
};

struct CudaBackend {
  static constexpr const char* name = "cuda";
  static constexpr c10::DeviceType device = c10::DeviceType::CUDA;
  using Dtypes = DtypeList<at::kFloat, at::kHalf, at::kBFloat16>;
  static constexpr bool validates_index = false;
};

}  // namespace spark_kernels
