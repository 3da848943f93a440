"""Masked GroupNorm: statistics per (image, group) over the image's active sites only, exact zeros elsewhere.

Mean and biased variance per (image, group) are taken over the image's active sites x the group's
C / num_groups channels; the output at active sites is normalized and then affine-transformed per channel.
An image without active sites gives zeros and zero gradients.

The fused path is staged like masked BatchNorm (batch_norm.py), so that each backend implements four
simple primitives: per-(image, channel) moments over the image's active sites, a per-(image, channel)
affine map at active sites, and the same two for the backward pass. The per-(image, group) arithmetic
between them (merging a group's channels, the gain, the backward coefficients) is done here, in float64.
Statistics never form E[x^2] - E[x]^2: the kernels sum around a pivot and merge with Chan's formula
(csrc/common/norm_row.h), the channels of a group are merged the same way here, and the affine maps
centre x on the (rounded) mean before scaling, so a mean of 1e4 standard deviations costs no precision.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from . import reference
from ._backends import select_backend
from ._layout import accumulation_dtype, uses_rows
from ._sites import resolve_sites
from ._validation import check_input, check_param, check_param_dtypes
from .batch_norm import _compact_rows, _saved_input


def group_moments(moments: torch.Tensor, counts: torch.Tensor, num_groups: int):
    """Chan's merge of each group's channels, float64: moments (N, 2, C) [mean, M2] per (image, channel)
    over the image's counts[n] active sites -> mean and M2 per (image, group), (N, G) each. All channels of
    an image share its count, so the group mean is the plain mean of the channel means, and
    M2 = sum of the channels' M2 + count * sum (channel mean - group mean)^2 (no term cancels)."""
    n, _, c = moments.shape
    means = moments[:, 0].reshape(n, num_groups, c // num_groups)
    m2s = moments[:, 1].reshape(n, num_groups, c // num_groups)
    mean = means.mean(dim=2)
    deviation = means - mean[:, :, None]
    return mean, m2s.sum(dim=2) + counts.to(torch.float64)[:, None] * (deviation * deviation).sum(dim=2)


def _per_channel(t: torch.Tensor, channels_per_group: int) -> torch.Tensor:
    """(N, G) -> (N, C): each group's value repeated over its channels."""
    return t.repeat_interleave(channels_per_group, dim=1)


class _MaskedGroupNorm(torch.autograd.Function):
    """Backend primitives used (all take the (M,) int32 site index; per-(image, channel) vectors are (N, C)
    in the accumulation dtype):

    gn_stats(x, index) -> (N, 2, C) float64 [mean, M2 = sum (x - mean)^2] over each image's active sites
    gn_elemt(x, index, center, scale, shift) -> (x - center) * scale + shift at active sites, 0 elsewhere
    gn_backward_stats(grad_out, x, index, center) -> (N, 2, C) float64 [sum dy, sum dy * (x - center)]
    gn_backward_elemt(grad_out, x, index, center, a, b, d) -> dy * a + (x - center) * b + d at active
        sites, 0 elsewhere
    """

    @staticmethod
    def forward(ctx, x, weight, bias, index, counts, num_groups, eps, kernels):
        acc = accumulation_dtype(x.dtype)
        n, c = x.shape[:2]
        per_group = c // num_groups
        mean, m2 = group_moments(kernels.gn_stats(x, index).to(torch.float64), counts, num_groups)
        group_count = counts.to(torch.float64)[:, None] * per_group
        var = m2 / group_count.clamp_min(1)
        # An image without active sites has no output; a zero gain keeps its gradients zero.
        rstd = torch.where(group_count > 0, torch.rsqrt(var + eps), 0.0)
        mean_c, rstd_c = _per_channel(mean, per_group), _per_channel(rstd, per_group)
        w = weight.to(torch.float64) if weight is not None else torch.ones_like(mean_c[0])
        b = bias.to(torch.float64) if bias is not None else torch.zeros_like(mean_c[0])
        center = mean_c.to(acc)
        scale = w * rstd_c
        shift = b + (center.to(torch.float64) - mean_c) * scale  # the centre's rounding, undone
        y = kernels.gn_elemt(x, index, center, scale.to(acc), shift.to(acc))
        # A channels_last x is kept as its active rows only (backward reads nothing else), as masked BN does.
        ctx.save_for_backward(_compact_rows(x, index) if uses_rows(x) else x, index, counts, mean_c, rstd_c, w)
        ctx.dense_shape, ctx.num_groups, ctx.kernels = x.shape, num_groups, kernels
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        saved_x, index, counts, mean_c, rstd_c, w = ctx.saved_tensors
        x = _saved_input(ctx.kernels, saved_x, index, ctx.dense_shape)
        acc = accumulation_dtype(x.dtype)
        n, c = ctx.dense_shape[:2]
        groups = ctx.num_groups
        per_group = c // groups
        center = mean_c.to(acc)
        correction = mean_c - center.to(torch.float64)
        sums = ctx.kernels.gn_backward_stats(grad_out, x, index, center).to(torch.float64)
        sum_dy = sums[:, 0]
        sum_dy_xmu = sums[:, 1] - correction * sum_dy  # centred on the exact mean
        grad_w = (sum_dy_xmu * rstd_c).sum(dim=0)
        grad_b = sum_dy.sum(dim=0)
        # With g = dy * w and xhat = (x - mean) * rstd over a group's active elements:
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) = dy * a + (x - mean) * b + d'.
        group_count = (counts.to(torch.float64)[:, None] * per_group).clamp_min(1)
        rstd = rstd_c[:, ::per_group]
        mean_g = (w * sum_dy).reshape(n, groups, per_group).sum(dim=2) / group_count
        mean_g_xhat = (w * sum_dy_xmu).reshape(n, groups, per_group).sum(dim=2) * rstd / group_count
        a = w * rstd_c
        b = _per_channel(-rstd * rstd * mean_g_xhat, per_group)
        d = _per_channel(-rstd * mean_g, per_group) - b * correction
        grad_x = ctx.kernels.gn_backward_elemt(grad_out, x, index, center, a.to(acc), b.to(acc), d.to(acc))
        wd, bd = ctx.param_dtypes
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_w.to(wd) if ctx.needs_input_grad[1] else None,
                grad_b.to(bd) if ctx.needs_input_grad[2] else None) + (None,) * 5


def check_num_groups(num_groups, channels: int) -> int:
    """num_groups as an int that divides the channel count (the error names it and says what is expected)."""
    try:
        groups = operator.index(num_groups)  # ints, numpy and torch integers; not floats or bools
    except TypeError:
        groups = None
    if isinstance(num_groups, bool) or groups is None or groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if channels % groups:
        raise ValueError(f"num_groups ({groups}) must divide the number of channels of x ({channels})")
    return groups


def masked_group_norm(x: torch.Tensor, active, num_groups: int, weight: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                      backend: Optional[str] = None) -> torch.Tensor:
    """GroupNorm of x (N, C, H, W) with statistics per (image, group) over the image's active sites
    (active: bool mask (N, 1, H, W) or ActiveSites); weight and bias (C,) are the per-channel affine map
    of nn.GroupNorm. Zero at inactive sites; an image without active sites gives zeros."""
    check_input(x, "x")
    c = x.shape[1]
    groups = check_num_groups(num_groups, c)
    check_param(weight, "weight", (c,), x)
    check_param(bias, "bias", (c,), x)
    check_param_dtypes(x, weight=weight, bias=bias)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    sites = resolve_sites(active, x)
    chosen = select_backend(backend, x, "masked_group_norm")
    if chosen.name == "reference" or x.numel() == 0:  # an empty x: nothing for a kernel to do
        return reference.masked_group_norm(x, sites.mask, groups, weight, bias, float(eps))
    return _MaskedGroupNorm.apply(x, weight, bias, sites.index, sites.image_counts, groups, float(eps),
                                  chosen.kernels)
