"""Backend "triton": Triton kernels for CUDA GPUs, also runnable on CPU tensors in Triton's interpreter.

Nothing heavy happens at package import: ``load()`` imports triton and compiles nothing until a kernel
is first launched. The kernels (spark_kernels/triton/{dwconv,batch_norm,layer_norm,group_norm}.py) are registered
as custom ops ``spark_kernels::triton_*``; their launch parameters come from ``config.py``.
"""
from __future__ import annotations

import os
from types import SimpleNamespace
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
    from . import batch_norm, dwconv, group_norm, layer_norm
    kernels = SimpleNamespace(
        dwconv_forward=dwconv.dwconv_forward, dwconv_backward=dwconv.dwconv_backward,
        bn_stats=batch_norm.bn_stats, bn_backward_stats=batch_norm.bn_backward_stats,
        bn_elemt=batch_norm.bn_elemt, bn_backward_elemt=batch_norm.bn_backward_elemt,
        ln_forward=layer_norm.ln_forward, ln_backward=layer_norm.ln_backward,
        gn_stats=group_norm.gn_stats, gn_backward_stats=group_norm.gn_backward_stats,
        gn_elemt=group_norm.gn_elemt, gn_backward_elemt=group_norm.gn_backward_elemt)
    return kernels, None


def device_unsupported_reason(device_type: str) -> Optional[str]:
    """Why the backend cannot run on tensors of this device type (None if it can)."""
    from . import common
    if device_type == "cpu" and not common.INTERPRET:
        return "runs on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 when it was loaded)"
    return None
