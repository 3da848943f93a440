"""Backend "reference": masked-dense PyTorch that mirrors the official SparK code.

It is the oracle of every test. The conv runs densely and masks (the official SparK approach); the
norms gather the active rows, normalize them with the stock PyTorch op and scatter them back
(the official SparseBatchNorm2d / SparseConvNeXtLayerNorm approach). Masking uses ``torch.where``
rather than a multiply so that non-finite values at inactive sites cannot leak into active ones,
which makes the result "computed from active sites only" for any input.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _zero(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(())


def _empty_result(x: torch.Tensor, *params) -> torch.Tensor:
    """The result for an x without elements: empty, connected to x and the parameters so that their
    gradients are zeros as for any other input."""
    y = x * 0
    for p in params:
        if p is not None:
            y = y + p.sum() * 0  # a 0-dim term: y keeps x's dtype
    return y


def sparse_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            mask: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """mask: bool (N, 1, H, W) of x's sites. The output's sites are active where any site of their
    stride x stride block of the mask is (blocks cut short at the border when the stride does not divide H, W)."""
    if x.numel() == 0:  # F.conv2d refuses C = 0 and images smaller than the kernel
        return _empty_result(x[..., ::stride, ::stride], weight, bias)
    k = weight.shape[-1]
    masked = torch.where(mask, x, _zero(x))
    y = F.conv2d(masked, weight, bias, stride=stride, padding=k // 2, groups=x.shape[1])
    out_mask = F.max_pool2d(mask.to(torch.uint8), stride, ceil_mode=True).to(torch.bool) if stride > 1 else mask
    return torch.where(out_mask, y, _zero(y))


def _scatter_rows(rows: torch.Tensor, mask_nhw: torch.Tensor, like_nhwc: torch.Tensor) -> torch.Tensor:
    out = like_nhwc.new_zeros(like_nhwc.shape, dtype=rows.dtype)
    return out.index_put((mask_nhw,), rows)


def _update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    if count == 0:
        return  # nothing was observed: keep the running statistics
    with torch.no_grad():
        unbiased = var * (count / max(count - 1, 1))
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


class _SumAcrossProcesses(torch.autograd.Function):
    """All-reduce (sum) that gradients flow through: every process's sum depends on every process's input, so
    the input gradient is the sum of the output gradients of all processes."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, process_group) -> torch.Tensor:
        import torch.distributed as dist
        ctx.process_group = process_group
        t = t.clone()
        dist.all_reduce(t, group=process_group)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _SumAcrossProcesses.apply(grad, ctx.process_group), None


def masked_batch_norm(x: torch.Tensor, mask: torch.Tensor, running_mean, running_var, weight, bias,
                      training: bool, momentum: float, eps: float, process_group=None) -> torch.Tensor:
    """Gather active (n, h, w) rows -> BatchNorm over them -> scatter into zeros. mask: bool (N, 1, H, W)."""
    if x.numel() == 0:  # nothing observed, nothing to update; F.batch_norm refuses C = 0 with weights
        return _empty_result(x, weight, bias)
    # torch 2.14's CPU batch_norm backward reads a non-contiguous weight, and in eval non-contiguous
    # running statistics, as if they were contiguous (wrong gradients): give it contiguous ones.
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if not training and running_mean is not None:  # not written in eval, so copies are fine
        running_mean, running_var = running_mean.contiguous(), running_var.contiguous()
    nhwc = x.permute(0, 2, 3, 1)
    mask_nhw = mask[:, 0]
    rows = nhwc[mask_nhw]  # (M, C)
    count = rows.shape[0]
    if process_group is None and (not training or count > 1):
        out_rows = F.batch_norm(rows, running_mean, running_var, weight, bias, training, momentum, eps)
        return _scatter_rows(out_rows, mask_nhw, nhwc).permute(0, 3, 1, 2)
    # Statistics by hand: a single active row (stock BN refuses it) or a process group to reduce over.
    if training:
        # Two passes (mean, then squared deviations from it), each all-reduced: the definition itself, with
        # no E[x^2] - E[x]^2 cancellation.
        acc = rows.to(torch.float64) if rows.dtype == torch.float64 else rows.float()
        first = torch.cat([acc.new_tensor([float(count)]), acc.sum(0)])
        if process_group is not None:
            first = _SumAcrossProcesses.apply(first, process_group)
        total = int(round(first[0].item()))
        denom = max(total, 1)
        mean = first[1:] / denom
        m2 = ((acc - mean) ** 2).sum(0)
        if process_group is not None:
            m2 = _SumAcrossProcesses.apply(m2, process_group)
        var = m2 / denom
        _update_running_stats(running_mean, running_var, mean.detach(), var.detach(), total, momentum)
    else:
        mean, var = running_mean.float(), running_var.float()
    out_rows = (rows - mean.to(rows.dtype)) * torch.rsqrt(var + eps).to(rows.dtype)
    if weight is not None:
        out_rows = out_rows * weight.to(rows.dtype)
    if bias is not None:
        out_rows = out_rows + bias.to(rows.dtype)
    return _scatter_rows(out_rows, mask_nhw, nhwc).permute(0, 3, 1, 2)


def masked_layer_norm(x: torch.Tensor, mask: torch.Tensor, weight, bias, eps: float,
                      channels_last: bool) -> torch.Tensor:
    """Gather active rows -> LayerNorm over channels -> scatter into zeros.

    channels_last: x is (N, H, W, C); else (N, C, H, W). mask: bool (N, 1, H, W)."""
    nhwc = x if channels_last else x.permute(0, 2, 3, 1)
    mask_nhw = mask[:, 0]
    rows = nhwc[mask_nhw]
    out_rows = F.layer_norm(rows, (rows.shape[-1],), weight, bias, eps)
    out = _scatter_rows(out_rows, mask_nhw, nhwc)
    return out if channels_last else out.permute(0, 3, 1, 2)


def masked_group_norm(x: torch.Tensor, mask: torch.Tensor, num_groups: int, weight, bias,
                      eps: float) -> torch.Tensor:
    """GroupNorm with statistics over each image's active sites only: mean and biased variance per
    (image, group) over its active sites x the group's C / num_groups channels, then the per-channel
    affine map at active sites, 0 elsewhere. An image with no active site gives zeros. mask: bool
    (N, 1, H, W).

    Written masked-dense (the active sites selected with torch.where, two passes: mean, then squared
    deviations from it), which equals gathering each image's active rows, running F.group_norm on them
    and scattering back (the official code's way of wrapping a dense norm), without a host sync per
    image. Statistics in float32 or wider: float16/bfloat16 inputs are normalized in float32."""
    if x.numel() == 0:
        return _empty_result(x, weight, bias)
    n, c, h, w = x.shape
    acc = x.to(torch.float64) if x.dtype == torch.float64 else x.float()
    groups = acc.reshape(n, num_groups, c // num_groups, h * w)
    active = mask.reshape(n, 1, 1, h * w)
    count = active.sum(dim=(2, 3), keepdim=True) * (c // num_groups)  # (N, 1, 1, 1)
    denom = count.clamp_min(1).to(acc.dtype)
    mean = torch.where(active, groups, _zero(acc)).sum(dim=(2, 3), keepdim=True) / denom
    centred = torch.where(active, groups - mean, _zero(acc))
    var = (centred * centred).sum(dim=(2, 3), keepdim=True) / denom
    # An image without active sites has no output to normalize; a zero gain keeps its gradients finite.
    rstd = torch.where(count > 0, torch.rsqrt(var + eps), _zero(acc))
    y = (centred * rstd).reshape(n, c, h, w)
    if weight is not None:
        y = y * weight.to(acc.dtype)[:, None, None]
    if bias is not None:
        y = y + bias.to(acc.dtype)[:, None, None]
    return torch.where(mask, y, _zero(acc)).to(x.dtype)
