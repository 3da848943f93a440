"""Backends "cpu" and "cuda": the C++ extension ``spark_kernels._C``.

Both register kernels for the same custom ops (``torch.ops.spark_kernels.*``) under the CPU and CUDA
dispatch keys. This module loads the extension, defines the ops' schemas and registers their fake (meta)
implementations from the op registry (_registry.py; the fakes make the ops traceable by torch.compile),
and exposes the primitives the autograd functions call.
"""
from __future__ import annotations

import importlib.machinery
import os
import warnings
from typing import Optional, Tuple

import torch

from ._backends import announced_unavailable
from ._registry import CPU_TRAINING_OPS, PRIMITIVES, kernels_namespace

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


def _define_schemas() -> Optional[str]:
    """Define the native ops' schemas from the op registry (the extension registers only their kernels);
    None, or why the extension does not match the registry (an extension built from older sources)."""
    library = torch.library.Library("spark_kernels", "FRAGMENT")
    for p in PRIMITIVES + CPU_TRAINING_OPS:
        existing = getattr(torch.ops.spark_kernels, p.native, None)
        try:
            if existing is None:
                library.define(p.native + p.schema)
            elif str(existing.default._schema) != f"spark_kernels::{p.native}{p.schema}":
                raise RuntimeError(f"it defines {existing.default._schema}")
        except RuntimeError as e:
            return (f"the C++ extension spark_kernels._C does not match the op registry for {p.native} ({e}); "
                    f"rebuild it with `pip install -e . --no-build-isolation`")
    _libraries.append(library)  # the definitions last as long as the library object
    return None


_libraries: list = []
if _load_error is None:
    _load_error = _define_schemas()


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
    for p in PRIMITIVES + CPU_TRAINING_OPS:
        torch.library.register_fake(f"spark_kernels::{p.native}", p.fake)


if _load_error is None:
    _register_fakes()


def _kernels():
    kernels = kernels_namespace(lambda p: getattr(torch.ops.spark_kernels, p.native))
    # The C++ BatchNorm/GroupNorm backward ops take x as the compact rows of the active sites (csrc/norm_ops.h).
    kernels.takes_compact_rows = True
    return kernels


def load_cpu() -> Tuple[object, Optional[str]]:
    if _load_error:
        return None, _load_error
    kernels = _kernels()
    for p in CPU_TRAINING_OPS:  # the CPU-only whole-step ops (_registry.py)
        setattr(kernels, p.name, getattr(torch.ops.spark_kernels, p.native))
    return kernels, None


def load_cuda() -> Tuple[object, Optional[str]]:
    if _load_error:
        return None, _load_error
    if not _built_with_cuda():
        return None, ("the C++ extension was built without CUDA kernels (nvcc or a CUDA build of torch "
                      "was missing at build time)")
    if not torch.cuda.is_available():
        return None, "no CUDA device is available (torch.cuda.is_available() is False)"
    return _kernels(), None
