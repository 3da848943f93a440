"""Masked LayerNorm: normalization over channels at each active site, exact zeros elsewhere."""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._backends import select_backend
from ._layout import accumulation_dtype
from ._sites import ActiveSites, as_sites
from ._validation import check_input, check_param, check_param_dtypes

DATA_FORMATS = ("channels_first", "channels_last")


def _as_dtype(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _as_nchw(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x as the kernels see it: (N, C, H, W), a permuted view of a channels_last (N, H, W, C) x."""
    return x.permute(0, 3, 1, 2) if channels_last else x


class _MaskedLayerNorm(torch.autograd.Function):
    """Autograd over a backend's primitives ``ln_forward`` and ``ln_backward``.

    x is (N, C, H, W), or (N, H, W, C) with channels_last, which the kernels see as its (N, C, H, W)
    permuted view (permuted here rather than by autograd: a graph node less per call, which counts at
    the small late-stage shapes); y is (N, C, H, W) either way. Weight and bias are passed to the kernels
    in the accumulation dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, index, eps, kernels, channels_last):
        acc = accumulation_dtype(x.dtype)
        w, b = _as_dtype(weight, acc), _as_dtype(bias, acc)
        y, mean, rstd = kernels.ln_forward(_as_nchw(x, channels_last), index, w, b, eps)
        ctx.save_for_backward(x, w, index, mean, rstd)
        ctx.kernels = kernels
        ctx.channels_last = channels_last
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, w, index, mean, rstd = ctx.saved_tensors
        channels_last = ctx.channels_last
        grad_x, grad_w, grad_b = ctx.kernels.ln_backward(grad_out, _as_nchw(x, channels_last), index, w, mean, rstd)
        wd, bd = ctx.param_dtypes
        needs = ctx.needs_input_grad
        return ((grad_x.permute(0, 2, 3, 1) if channels_last else grad_x) if needs[0] else None,
                _as_dtype(grad_w, wd) if needs[1] else None,
                _as_dtype(grad_b, bd) if needs[2] else None, None, None, None, None)


def _sites_for_layer_norm(active, x: torch.Tensor, channels_last: bool) -> ActiveSites:
    n, h, w = (x.shape[0], x.shape[1], x.shape[2]) if channels_last else (x.shape[0], x.shape[2], x.shape[3])
    if channels_last and isinstance(active, torch.Tensor) and active.dim() == 3:
        active = active.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    sites = as_sites(active, "active")
    if sites.shape != (n, h, w):
        raise ValueError(f"active is for (N, H, W) = {sites.shape} but x has (N, H, W) = {(n, h, w)} "
                         f"(data_format={'channels_last' if channels_last else 'channels_first'!r})")
    if sites.device != x.device:
        raise ValueError(f"active is on {sites.device} but x is on {x.device}")
    return sites


def masked_layer_norm(x: torch.Tensor, active, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      eps: float = 1e-6, data_format: str = "channels_first",
                      backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm over channels at active sites. x is (N, C, H, W) for data_format="channels_first" and
    (N, H, W, C) for "channels_last"; active is a bool mask ((N, 1, H, W), or (N, H, W) for
    channels_last) or an ActiveSites."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    channels_last = data_format == "channels_last"
    check_input(x, "x")
    c = x.shape[-1] if channels_last else x.shape[1]
    check_param(weight, "weight", (c,), x)
    check_param(bias, "bias", (c,), x)
    check_param_dtypes(x, weight=weight, bias=bias)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    sites = _sites_for_layer_norm(active, x, channels_last)
    chosen = select_backend(backend, _as_nchw(x, channels_last), "masked_layer_norm")
    if chosen.name == "reference" or x.numel() == 0:  # an empty x: nothing for a kernel to do
        return reference.masked_layer_norm(x, sites.mask, weight, bias, float(eps), channels_last)
    y = _MaskedLayerNorm.apply(x, weight, bias, sites.index, float(eps), chosen.kernels, channels_last)
    return y.permute(0, 2, 3, 1) if channels_last else y
