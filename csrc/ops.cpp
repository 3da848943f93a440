// The spark_kernels library. The schemas and fake (meta) implementations of its ops are in the op
// registry, spark_kernels/_registry.py (defined when spark_kernels._native loads this extension); their
// host code is csrc/dwconv_ops.h and csrc/norm_ops.h, their kernels per dispatch key csrc/cpu/*.cpp
// (CPU) and csrc/cuda/*.cu (CUDA); the autograd functions that compose them are spark_kernels/*.py.
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
}

// Importing spark_kernels._C runs the static registrations above; the module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
