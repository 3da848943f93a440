"""Submanifold depthwise conv (padding k//2, groups = channels; kernel sizes and strides: _registry.py).

Output at the active output sites only (``ActiveSites.strided(stride)``: an output site is active if any
input site of its stride x stride block is), from active input neighbours only, bias at active output
sites only, exact zeros elsewhere; the input gradient is zero at inactive input sites. The output has
nn.Conv2d's size, ceil(H / stride) x ceil(W / stride). Under torch.autocast the conv runs in the
autocast dtype, as F.conv2d does (the kernels accumulate in float32).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._backends import select_backend
from ._registry import DWCONV
from ._sites import resolve_sites
from ._validation import check_input, check_param

KERNEL_SIZES = DWCONV.kernel_sizes()  # those some backend supports
STRIDES = DWCONV.strides()


def either(values) -> str:
    """(3, 7) -> "3 or 7"; (3, 5, 7) -> "3, 5 or 7"."""
    words = [str(v) for v in values]
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


class _SparseDepthwiseConv(torch.autograd.Function):
    """Autograd over a backend's primitives ``dwconv_forward`` and ``dwconv_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, neighbors, stride, input_index, input_taps, kernels):
        ctx.save_for_backward(x, weight, index, neighbors, input_index, input_taps)
        ctx.stride = stride
        ctx.kernels = kernels
        return kernels.dwconv_forward(x, weight, bias, index, neighbors, stride)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, index, neighbors, input_index, input_taps = ctx.saved_tensors
        grad_x, grad_w, grad_b = ctx.kernels.dwconv_backward(grad_out, x, weight, index, neighbors, ctx.stride,
                                                             input_index, input_taps)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_w if ctx.needs_input_grad[1] else None,
                grad_b if ctx.needs_input_grad[2] else None, None, None, None, None, None, None)


def check_conv_args(x, weight, bias) -> int:
    """Validate the conv's tensors; returns the kernel size."""
    check_input(x, "x")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    c = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have shape (C, 1, k, k) = ({c}, 1, k, k) for a depthwise conv of x with "
                         f"C = {c}, got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if k not in KERNEL_SIZES:
        raise ValueError(f"weight: kernel size must be {either(KERNEL_SIZES)}, got {k}")
    check_param(weight, "weight", (c, 1, k, k), x, optional=False, same_dtype=True)
    check_param(bias, "bias", (c,), x, same_dtype=True)
    return k


def check_stride(stride) -> int:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in STRIDES:
        raise ValueError(f"stride must be {either(STRIDES)}, got {stride!r}")
    return stride


def _autocast(x, weight, bias):
    """x, weight and bias in the autocast dtype when autocast is on for x's device (float32, float16 and
    bfloat16 tensors are cast, float64 ones are not: autocast's rule for conv2d)."""
    if not isinstance(x, torch.Tensor):
        return x, weight, bias
    try:
        enabled = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (meta) is never autocast
        return x, weight, bias
    if not enabled:
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (  # noqa: E731
        torch.float32, torch.float16, torch.bfloat16) else t
    return cast(x), cast(weight), cast(bias)


def sparse_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], active,
                            stride: int = 1, backend: Optional[str] = None) -> torch.Tensor:
    """Submanifold depthwise conv of x (N, C, H, W), any memory format, with weight (C, 1, k, k), k in
    KERNEL_SIZES, padding k//2 and a stride in STRIDES.

    active: x's active sites, a bool mask (N, 1, H, W) (True = active) or an ActiveSites. Returns a dense
    (N, C, ceil(H / stride), ceil(W / stride)) tensor with exact zeros at the inactive sites of
    ``active.strided(stride)``.
    """
    x, weight, bias = _autocast(x, weight, bias)
    k = check_conv_args(x, weight, bias)
    stride = check_stride(stride)
    sites = resolve_sites(active, x)
    chosen = select_backend(backend, x, DWCONV.name, kernel_size=k, stride=stride)
    if chosen.name == "reference" or x.numel() == 0:  # an empty x: nothing for a kernel to do
        return reference.sparse_depthwise_conv2d(x, weight, bias, sites.mask, stride)
    if stride == 1:  # the input gradient gathers through the mirrored forward table
        out_index, table, input_index, input_taps = sites.index, sites.neighbors(k), None, None
    else:
        out_index, table = sites.strided(stride).index, sites.strided_neighbors(k, stride)
        input_index, input_taps = sites.index, sites.transposed_taps(k, stride)
    return _SparseDepthwiseConv.apply(x, weight, bias, out_index, table, stride, input_index, input_taps,
                                      chosen.kernels)
