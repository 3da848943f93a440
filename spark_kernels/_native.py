"""Backends "cpu" and "cuda": the C++ extension ``spark_kernels._C``.

Both register kernels for the same custom ops (``torch.ops.spark_kernels.*``, schemas in
csrc/ops.cpp) under the CPU and CUDA dispatch keys. This module loads the extension, registers the
fake (meta) implementations that make the ops traceable by torch.compile, and exposes the
primitives the autograd functions call.
"""
from __future__ import annotations

import importlib.machinery
import os
import warnings
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from ._backends import announced_unavailable
from ._layout import accumulation_dtype, kernel_memory_format
from .depthwise_conv import dwconv_backward_fake, dwconv_forward_fake

_load_error: Optional[str] = None
_warned = False

try:
    from . import _C  # noqa: F401  (registers the ops)
except Exception as e:  # noqa: BLE001 - any failure to load means "backend unavailable, say why"
    here = os.path.dirname(os.path.abspath(__file__))
    built = any(os.path.exists(os.path.join(here, "_C" + s)) for s in importlib.machinery.EXTENSION_SUFFIXES)
    # A missing file surfaces as a confusing "partially initialized module" ImportError: name the cause.
    cause = f"{type(e).__name__}: {e}" if built else f"no _C extension file is built in {here}"
    _load_error = f"the C++ extension spark_kernels._C could not be loaded ({cause}); " \
                  f"build it with `pip install -e . --no-build-isolation`"


def _warn_once() -> None:
    global _warned
    if _load_error and not _warned:
        _warned = True
        announced_unavailable.add(_load_error)
        warnings.warn(f"spark_kernels: {_load_error}. Only the 'reference' backend (and 'triton' on GPUs) "
                      f"is available.", RuntimeWarning, stacklevel=3)


_warn_once()


def _built_with_cuda() -> bool:
    return bool(_load_error is None and torch.ops.spark_kernels.built_with_cuda())


def _register_fakes() -> None:
    lib = "spark_kernels::"

    torch.library.register_fake(lib + "dwconv_forward", dwconv_forward_fake)
    torch.library.register_fake(lib + "dwconv_backward", dwconv_backward_fake)

    def channel_stats(x, index, *rest):
        return x.new_empty((2, x.shape[1]), dtype=torch.float64)

    torch.library.register_fake(lib + "masked_bn_stats", channel_stats)
    torch.library.register_fake(lib + "masked_bn_backward_stats", channel_stats)

    @torch.library.register_fake(lib + "masked_bn_elemt")
    def _(x, index, scale, shift):
        return torch.empty_like(x, memory_format=kernel_memory_format(x))

    @torch.library.register_fake(lib + "masked_bn_backward_elemt")
    def _(grad_out, x, index, a, b, d):
        return torch.empty_like(x, memory_format=kernel_memory_format(x))

    @torch.library.register_fake(lib + "masked_ln_forward")
    def _(x, index, weight, bias, eps):
        m = index.shape[0]
        acc = accumulation_dtype(x.dtype)
        return (torch.empty_like(x, memory_format=kernel_memory_format(x)),
                x.new_empty((m,), dtype=acc), x.new_empty((m,), dtype=acc))

    @torch.library.register_fake(lib + "masked_ln_backward")
    def _(grad_out, x, index, weight, mean, rstd):
        acc = accumulation_dtype(x.dtype)
        c = x.shape[1]
        return (torch.empty_like(x, memory_format=kernel_memory_format(x)),
                x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc))


if _load_error is None:
    _register_fakes()


def _kernels() -> SimpleNamespace:
    ops = torch.ops.spark_kernels
    return SimpleNamespace(
        dwconv_forward=ops.dwconv_forward, dwconv_backward=ops.dwconv_backward,
        bn_stats=ops.masked_bn_stats, bn_backward_stats=ops.masked_bn_backward_stats,
        bn_elemt=ops.masked_bn_elemt, bn_backward_elemt=ops.masked_bn_backward_elemt,
        ln_forward=ops.masked_ln_forward, ln_backward=ops.masked_ln_backward)


def load_cpu() -> Tuple[object, Optional[str]]:
    if _load_error:
        return None, _load_error
    return _kernels(), None


def load_cuda() -> Tuple[object, Optional[str]]:
    if _load_error:
        return None, _load_error
    if not _built_with_cuda():
        return None, ("the C++ extension was built without CUDA kernels (nvcc or a CUDA build of torch "
                      "was missing at build time)")
    if not torch.cuda.is_available():
        return None, "no CUDA device is available (torch.cuda.is_available() is False)"
    return _kernels(), None
