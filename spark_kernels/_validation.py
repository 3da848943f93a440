"""Argument checks shared by the public functions: every error names the argument and what was expected."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_input(x, name: str = "x", dim: int = 4) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor, got shape {tuple(x.shape)}")


def check_param(t, name: str, shape: Sequence[int], like: torch.Tensor, optional: bool = True,
                same_dtype: bool = False) -> None:
    """A parameter or buffer: a floating tensor of the given shape on like's device."""
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} is required here, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if same_dtype and t.dtype != like.dtype:
        raise TypeError(f"{name} must have the same dtype as x ({like.dtype}), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}; all tensors must be on one device")


def check_param_dtypes(x: torch.Tensor, **params) -> None:
    """A norm's parameters and buffers share one dtype: x's, or float32 for a float16/bfloat16 x
    (PyTorch's mixed-precision rule for batch_norm and layer_norm, which the reference calls)."""
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    dtypes = {name: t.dtype for name, t in params.items() if t is not None}
    for name, dtype in dtypes.items():
        if dtype not in allowed:
            names = " or ".join(str(d) for d in allowed)
            raise TypeError(f"{name} must have dtype {names} for x of dtype {x.dtype}, got {dtype}")
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name}: {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"the parameters and running statistics must share one dtype, got {listed}")
