"""Backend "triton": Triton kernels for CUDA GPUs, also runnable on CPU tensors in Triton's interpreter.

Nothing heavy happens at package import: ``load()`` imports triton and compiles nothing until a kernel
is first launched. Each primitive of the op registry (spark_kernels/_registry.py) is implemented by the
function of its name in the module it names here, registered as the custom op
``spark_kernels::triton_<name>`` with the registry's fake; launch parameters come from ``config.py``.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional, Tuple

import torch


def interpreter_requested() -> bool:
    """TRITON_INTERPRET is set: Triton runs kernels in its interpreter, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load() -> Tuple[object, Optional[str]]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable, say why"
        return None, f"triton could not be imported ({type(e).__name__}: {e}); install it with `pip install triton`"
    if not interpreter_requested() and not torch.cuda.is_available():
        return None, ("no CUDA device is available (torch.cuda.is_available() is False) and TRITON_INTERPRET "
                      "is not set (set TRITON_INTERPRET=1 before triton is first imported to run the kernels "
                      "in Triton's interpreter on CPU tensors)")
    from .._registry import kernels_namespace
    return kernels_namespace(lambda p: getattr(kernel_module(p.triton_module), p.name)), None


def kernel_module(name: str):
    """The module spark_kernels.triton.<name> (importing it registers its ops)."""
    return importlib.import_module(f"{__name__}.{name}")


def kernel_modules():
    """Every module holding Triton kernels of the op registry, in registry order (the compile check)."""
    from .._registry import PRIMITIVES
    names = dict.fromkeys(p.triton_module for p in PRIMITIVES)
    return [kernel_module(n) for n in names]


def device_unsupported_reason(device_type: str) -> Optional[str]:
    """Why the backend cannot run on tensors of this device type (None if it can)."""
    from . import common
    if device_type == "cpu" and not common.INTERPRET:
        return "runs on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 when it was loaded)"
    return None
