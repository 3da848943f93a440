"""spark_kernels: fused kernels that make SparK masked pretraining of convnets actually sparse.

Public API (see docs/design.md section 3): ActiveSites, sparse_depthwise_conv2d, masked_batch_norm,
masked_layer_norm, masked_group_norm, available_backends, active, and the modules in spark_kernels.nn.
"""
from . import _native
from ._backends import (BACKEND_NAMES, Backend, FallbackWarning, available_backends, fallback_counts,
                        register_backend, reset_fallback_counts, select_backend, unavailable_reasons)
from ._sites import ActiveSites, sites_cache
from .batch_norm import masked_batch_norm
from .depthwise_conv import sparse_depthwise_conv2d
from .group_norm import masked_group_norm
from .layer_norm import masked_layer_norm
from . import nn
from .nn import active, current_sites
from .triton import device_unsupported_reason as _triton_device_check, load as _load_triton

# Where each backend runs; what it supports of each op is declared in the op registry (_registry.py).
register_backend(Backend("reference", ("cpu", "cuda", "meta"), lambda: (None, None)))
register_backend(Backend("cpu", ("cpu",), _native.load_cpu))
register_backend(Backend("cuda", ("cuda",), _native.load_cuda))
register_backend(Backend("triton", ("cuda", "cpu"), _load_triton, device_check=_triton_device_check))

__all__ = ["ActiveSites", "sparse_depthwise_conv2d", "masked_batch_norm", "masked_layer_norm", "masked_group_norm",
           "available_backends", "unavailable_reasons", "active", "current_sites", "nn", "BACKEND_NAMES",
           "FallbackWarning", "fallback_counts", "reset_fallback_counts"]
__version__ = "0.1.0"
