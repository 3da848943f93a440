#pragma once
// Per-site math of the submanifold depthwise conv, shared by the CPU kernels (csrc/cpu/dwconv.cpp) and
// the CUDA kernels (csrc/cuda/dwconv.cu), and unit-tested on its own (csrc/tests/test_dwconv_site.cpp).
//
// A site's taps are one row of the neighbour table: taps[t] is the flat site number of tap t = (dy, dx)
// (row-major over the k x k window) or -1 when that neighbour is outside the image or inactive.
// A kernel works on V channels of a site at a time (a channel vector: V = 1 on the GPU and in the
// NCHW "planes" layout, a SIMD-sized block in the channels_last "rows" layout).
#include <cstdint>

#include "common/host_device.h"

#ifdef __CUDACC__
#define SK_UNROLL _Pragma("unroll")
#else
#define SK_UNROLL
#endif

namespace spark_kernels {

// Values of one tensor as seen from a range of sites: lane v of site j is at
// data[(j - site_base) * site_stride + v]. Only sites in [site_base, site_base + site_count) are
// readable; the kernels point `data` at the first channel of their vector (and, in the planes layout,
// at the plane of the image that holds the site, with site_base = n * H * W and site_count = H * W).
template <typename T>
struct SiteView {
  const T* data;
  int64_t site_base;
  int64_t site_count;
  int64_t site_stride;
};

// Offset of site j in `view`, or -1 when j is not readable there (an inactive tap is -1 too).
template <typename T>
SK_HOST_DEVICE inline int64_t site_offset(const SiteView<T>& view, int32_t j) {
  const int64_t rel = static_cast<int64_t>(j) - view.site_base;
  return static_cast<uint64_t>(rel) < static_cast<uint64_t>(view.site_count) ? rel * view.site_stride : -1;
}

// acc[v] += sum over the site's taps t of w[tap * w_tap_stride + v] * x(taps[t], v), where tap = t for
// the forward pass and the mirrored tap K*K-1-t for the stride-1 input gradient (x = grad_out then):
// because the stride-1 neighbour table is symmetric, dL/dx(j) = sum_t w[t] g(j - offset t) =
// sum_u w[mirror u] g(taps_j[u]), a gather that needs no atomics. The stride-2 input gradient is the
// unmirrored gather over grad_out through the transposed table (taps_j[t] = the output site whose tap t
// reads input site j). Returns false if some tap was neither -1 nor a readable site
// (a corrupt table); such taps are skipped, never read.
template <int K, bool kMirrored, int V, typename T, typename W, typename Acc>
SK_HOST_DEVICE inline bool dwconv_site_gather(const int32_t* taps, const SiteView<T>& x, const W* w,
                                              int64_t w_tap_stride, Acc (&acc)[V]) {
  bool valid = true;
  SK_UNROLL
  for (int t = 0; t < K * K; ++t) {
    const int64_t off = site_offset(x, taps[t]);
    if (off < 0) {
      valid &= taps[t] == -1;
      continue;
    }
    const T* xs = x.data + off;
    const W* wt = w + (kMirrored ? K * K - 1 - t : t) * w_tap_stride;
    SK_UNROLL
    for (int v = 0; v < V; ++v) acc[v] += static_cast<Acc>(wt[v]) * static_cast<Acc>(xs[v]);
  }
  return valid;
}

// Weight gradient of one site: gw[t * gw_tap_stride + v] += g[v] * x(taps[t], v), g = grad_out of the
// site (already in the accumulation type). Same validity rule as dwconv_site_gather.
template <int K, int V, typename T, typename Acc>
SK_HOST_DEVICE inline bool dwconv_site_weight_grad(const int32_t* taps, const Acc (&g)[V], const SiteView<T>& x,
                                                   Acc* gw, int64_t gw_tap_stride) {
  bool valid = true;
  SK_UNROLL
  for (int t = 0; t < K * K; ++t) {
    const int64_t off = site_offset(x, taps[t]);
    if (off < 0) {
      valid &= taps[t] == -1;
      continue;
    }
    const T* xs = x.data + off;
    Acc* gwt = gw + t * gw_tap_stride;
    SK_UNROLL
    for (int v = 0; v < V; ++v) gwt[v] += g[v] * static_cast<Acc>(xs[v]);
  }
  return valid;
}

}  // namespace spark_kernels
