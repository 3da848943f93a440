#pragma once
// Functions marked SK_HOST_DEVICE compile as host code for the CPU kernels and as device code under nvcc,
// so the CPU tests exercise the per-site math the CUDA kernels run.
#ifdef __CUDACC__
#define SK_HOST_DEVICE __host__ __device__
#else
#define SK_HOST_DEVICE
#endif
