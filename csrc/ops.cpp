// Schemas of the spark_kernels custom ops: defined once here, implemented per dispatch key in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA). Fake (meta) implementations are in
// spark_kernels/_native.py; the autograd functions that compose them in spark_kernels/*.py.
//
// Conventions shared by every kernel:
//  * x is logically (N, C, H, W). It is processed as "rows" (C contiguous values per site) when it is
//    channels_last-contiguous and not plain-contiguous, else as contiguous NCHW "planes"
//    (csrc/common/layout.h). Dense outputs come back in that layout, exact zeros at inactive sites.
//  * index: (M,) int32 flat site numbers n*H*W + h*W + w of the active sites, ascending.
//  * neighbors: (M, k*k) int32 flat site number of tap (dy, dx) (row-major) or -1 if outside/inactive.
//  * Per-channel and per-site statistics are float64 for float64 inputs and float32 otherwise
//    ("accumulation dtype"), except the masked_bn_*stats results, which are always float64.
#include <Python.h>
#include <torch/library.h>

#include "common/build_info.h"

TORCH_LIBRARY(spark_kernels, m) {
  m.def("built_with_cuda() -> bool", []() { return spark_kernels::kBuiltWithCuda; });
  // y (N, C, ceil(H/stride), ceil(W/stride)) = submanifold depthwise conv of x with weight (C, 1, k, k),
  // k in {3, 5, 7}, stride 1 or 2, padding k//2. index: the active OUTPUT sites (numbered in y's grid);
  // neighbors: for each, the x site read by each tap or -1 (ActiveSites.strided_neighbors).
  m.def("dwconv_forward(Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor neighbors, int stride=1)"
        " -> Tensor");
  // (grad_x, grad_weight, grad_bias); grad_x in x's kernel layout, zero at inactive sites. At stride 2,
  // input_index (x's active sites) and input_taps (ActiveSites.transposed_taps: the output site whose
  // tap t reads each, or -1) give the input gradient; at stride 1 they are None (mirrored neighbors).
  m.def("dwconv_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor index, Tensor neighbors, int stride=1,"
        " Tensor? input_index=None, Tensor? input_taps=None) -> (Tensor, Tensor, Tensor)");
  // (2, C) float64: [mean, M2 = sum (x - mean)^2] over active sites (0 and 0 when there are none), by the
  // shifted-sum / Chan-merge algorithm of csrc/common/norm_row.h.
  m.def("masked_bn_stats(Tensor x, Tensor index) -> Tensor");
  // (2, C) float64: [sum dy, sum dy * (x - mean)] over active sites; mean in the accumulation dtype.
  m.def("masked_bn_backward_stats(Tensor grad_out, Tensor x, Tensor index, Tensor mean) -> Tensor");
  // x * scale[c] + shift[c] at active sites, 0 elsewhere; scale, shift in the accumulation dtype.
  m.def("masked_bn_elemt(Tensor x, Tensor index, Tensor scale, Tensor shift) -> Tensor");
  // grad_out * a[c] + x * b[c] + d[c] at active sites, 0 elsewhere.
  m.def("masked_bn_backward_elemt(Tensor grad_out, Tensor x, Tensor index, Tensor a, Tensor b, Tensor d)"
        " -> Tensor");
  // (y, mean, rstd): LayerNorm over C at each active site; mean and rstd (M,) per active site.
  m.def("masked_ln_forward(Tensor x, Tensor index, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  // (grad_x, grad_weight, grad_bias); weight grads in the accumulation dtype.
  m.def("masked_ln_backward(Tensor grad_out, Tensor x, Tensor index, Tensor? weight, Tensor mean, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor)");
}

// Importing spark_kernels._C runs the static registrations above; the module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
