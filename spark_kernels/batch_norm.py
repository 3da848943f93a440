"""Masked BatchNorm: statistics over active (n, h, w) sites only, exact zeros elsewhere.

The fused path is staged like PyTorch's SyncBatchNorm, so one autograd function serves every backend
and the synchronized variant: per-channel mean and M2 = sum (x - mean)^2 over local active sites (a
backend primitive), optionally merged over a process group, then a per-channel affine map at active
sites (another primitive). Per-channel arithmetic between the stages is done here in float64.

The statistics are never formed as E[x^2] - E[x]^2, which loses every digit in float32 once the mean is
~1e4 standard deviations: every backend sums x - p and (x - p)^2 around a pivot p that is one of the
summed values, and merges the partial (count, mean, M2) with Chan's formula (csrc/common/norm_row.h);
processes merge theirs the same way (merge_moments below).

Without a process group, a backend whose kernels have the whole-step training ops (bn_train_forward,
bn_train_backward: the cpu backend, for a channels_last x) runs each pass as one call instead: the same
stages and per-channel arithmetic in C++ (csrc/cpu/batch_norm.cpp), with the active rows kept for backward
copied in the same pass that writes y. At the small late stages the Python glue between stages costs
about as much as the kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._backends import select_backend
from ._layout import accumulation_dtype, kernel_memory_format, uses_rows
from ._sites import resolve_sites
from ._validation import check_input, check_param, check_param_dtypes


def _all_reduce(t: torch.Tensor, process_group) -> torch.Tensor:
    if process_group is None:
        return t
    import torch.distributed as dist
    t = t.clone()
    dist.all_reduce(t, group=process_group)
    return t


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """Chan's merge of P partials, float64: counts (P,), means and m2s (P, C) -> (mean (C,), M2 (C,)).
    M2 = sum of the partials' M2 + sum n_p (mean_p - mean)^2: every term is >= 0, nothing cancels."""
    counts = counts.to(torch.float64)[:, None]
    mean = (counts * means).sum(0) / counts.sum().clamp_min(1)
    deviation = torch.where(counts > 0, means - mean, 0.0)  # an empty partial's mean carries nothing
    return mean, (m2s + counts * deviation * deviation).sum(0)


def _gather_moments(count: int, moments: torch.Tensor, process_group):
    """(count, mean, M2) of the whole process group from each process's own (in rank order)."""
    import torch.distributed as dist
    local = torch.cat([moments.new_full((1,), float(count)), moments.reshape(-1)])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, local, group=process_group)
    table = torch.stack(parts)
    c = moments.shape[1]
    # One host read per BN call, only when a process group makes the count unknown locally.
    n = int(round(table[:, 0].sum().item()))
    mean, m2 = merge_moments(table[:, 0], table[:, 1:1 + c], table[:, 1 + c:])
    return n, mean, m2


def _compact_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The active rows (M, C) of a channels_last x: what backward needs, at the active fraction of x's size."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).index_select(0, index)


def _saved_input(kernels, saved_x: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """x as the backward kernels take it: the compact rows where they read them (the C++ ops), else dense."""
    if saved_x.dim() == 2 and not getattr(kernels, "takes_compact_rows", False):
        return _from_compact_rows(saved_x, index, shape)
    return saved_x


def _from_compact_rows(rows: torch.Tensor, index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A channels_last tensor holding rows at the active sites. Inactive sites are left unwritten: the kernels
    never read them (tests/test_batch_norm.py::test_inactive_garbage_does_not_leak)."""
    x = torch.empty(shape, dtype=rows.dtype, device=rows.device, memory_format=torch.channels_last)
    x.permute(0, 2, 3, 1).reshape(-1, shape[1]).index_copy_(0, index.long(), rows)
    return x


class _MaskedBatchNorm(torch.autograd.Function):
    """Backend primitives used (all take the (M,) int32 site index):

    bn_stats(x, index) -> (2, C) float64 [mean, M2 = sum (x - mean)^2] over active sites
    bn_elemt(x, index, scale, shift) -> x * scale + shift at active sites, 0 elsewhere
    bn_backward_stats(grad_out, x, index, mean) -> (2, C) [sum dy, sum dy * (x - mean)]
    bn_backward_elemt(grad_out, x, index, a, b, d) -> grad_out * a + x * b + d at active sites, 0 elsewhere

    A channels_last x is kept for backward as its (M, C) active rows; the backward primitives of kernels with
    ``takes_compact_rows`` (the C++ ones) read them as they are, other kernels get the dense x rebuilt.
    Training without a process group uses the kernels' whole-step ops where they have them (_uses_training_ops).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, index, count, training, momentum, eps,
                process_group, kernels):
        ctx.dense_shape = x.shape
        ctx.training, ctx.process_group, ctx.kernels = training, process_group, kernels
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.whole_step = training and process_group is None and _uses_training_ops(kernels, x)
        if ctx.whole_step:
            y, rows, mean, invstd = kernels.bn_train_forward(x, index, weight, bias, running_mean, running_var,
                                                             momentum, eps)
            ctx.save_for_backward(rows, index, mean, invstd, weight)
            return y
        acc = accumulation_dtype(x.dtype)
        if training:
            moments = kernels.bn_stats(x, index).to(torch.float64)
            if process_group is None:
                n, mean, m2 = count, moments[0], moments[1]
            else:
                n, mean, m2 = _gather_moments(count, moments, process_group)
            var = m2 / max(n, 1)
            reference._update_running_stats(running_mean, running_var, mean, var, n, momentum)
        else:
            n = count
            mean, var = running_mean.to(torch.float64), running_var.to(torch.float64)
        invstd = torch.rsqrt(var + eps)
        w = weight.to(torch.float64) if weight is not None else torch.ones_like(invstd)
        b = bias.to(torch.float64) if bias is not None else torch.zeros_like(invstd)
        scale = w * invstd
        shift = b - mean * scale
        y = kernels.bn_elemt(x, index, scale.to(acc), shift.to(acc))
        saved_x = _compact_rows(x, index) if uses_rows(x) else x
        ctx.save_for_backward(saved_x, index, mean, invstd, w)
        ctx.count = n  # the active sites over every process: what the staged backward divides by
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.whole_step:
            rows, index, mean, invstd, weight = ctx.saved_tensors
            grad_x, grad_w, grad_b = ctx.kernels.bn_train_backward(grad_out, rows, index, weight, mean, invstd)
            return _input_grads(ctx, grad_x, grad_w, grad_b)
        saved_x, index, mean, invstd, w = ctx.saved_tensors
        x = _saved_input(ctx.kernels, saved_x, index, ctx.dense_shape)
        acc = accumulation_dtype(x.dtype)
        c = x.shape[-1] if x.dim() == 2 else x.shape[1]
        mean_acc = mean.to(acc)
        local = ctx.kernels.bn_backward_stats(grad_out, x, index, mean_acc).to(torch.float64)
        # The kernels centre x on mean rounded to acc; sum dy (mean_acc - mean) restores the exact centre.
        local[1] -= (mean - mean_acc.to(torch.float64)) * local[0]
        sum_dy, sum_dy_xmu = local[0], local[1]
        # Parameter gradients stay local (data-parallel training averages them across processes).
        grad_w = sum_dy_xmu * invstd
        grad_b = sum_dy
        a = w * invstd
        if ctx.training:
            total = _all_reduce(local.reshape(-1), ctx.process_group).reshape(2, c)
            n = max(ctx.count, 1)
            b = -a * invstd * invstd * total[1] / n
            d = -a * total[0] / n - mean * b
            grad_x = ctx.kernels.bn_backward_elemt(grad_out, x, index, a.to(acc), b.to(acc), d.to(acc))
        else:
            # grad_out * a alone: x does not enter (x * 0 would turn a non-finite x into NaN).
            layout = torch.channels_last if x.dim() == 2 else kernel_memory_format(x)
            grad_x = ctx.kernels.bn_elemt(grad_out.contiguous(memory_format=layout), index, a.to(acc),
                                          torch.zeros_like(a, dtype=acc))
        return _input_grads(ctx, grad_x, grad_w, grad_b)


def _uses_training_ops(kernels, x: torch.Tensor) -> bool:
    """Whether the kernels run a training step of a channels_last x as one op per pass (the cpu backend)."""
    return hasattr(kernels, "bn_train_forward") and uses_rows(x)


def _input_grads(ctx, grad_x, grad_w, grad_b):
    """backward's return value: the requested gradients, the parameters' in their dtypes (float64, or weight's from
    bn_train_backward, before)."""
    wd, bd = ctx.param_dtypes
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_w.to(wd) if ctx.needs_input_grad[1] else None,
            grad_b.to(bd) if ctx.needs_input_grad[2] else None) + (None,) * 9


def masked_batch_norm(x: torch.Tensor, active, running_mean: Optional[torch.Tensor],
                      running_var: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None, training: bool = True, momentum: float = 0.1,
                      eps: float = 1e-5, process_group=None, backend: Optional[str] = None) -> torch.Tensor:
    """BatchNorm of x (N, C, H, W) over its active sites (bool mask (N, 1, H, W) or ActiveSites).

    In training, mean and biased variance over active (n, h, w) (reduced over process_group when
    given) normalize x and update the running statistics in place (unbiased variance, like
    nn.BatchNorm2d; left unchanged when no site is active). In eval, the running statistics are used.
    """
    check_input(x, "x")
    c = x.shape[1]
    check_param(running_mean, "running_mean", (c,), x, optional=training)
    check_param(running_var, "running_var", (c,), x, optional=training)
    check_param(weight, "weight", (c,), x)
    check_param(bias, "bias", (c,), x)
    check_param_dtypes(x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if training and t is not None and t.numel() > 1 and t.stride(0) == 0:
            raise ValueError(f"{name} is updated in place and must not be an expanded view (stride 0)")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    sites = resolve_sites(active, x)
    chosen = select_backend(backend, x, "masked_batch_norm")
    if chosen.name == "reference" or x.numel() == 0:  # an empty x: nothing for a kernel to do
        return reference.masked_batch_norm(x, sites.mask, running_mean, running_var, weight, bias,
                                           bool(training), float(momentum), float(eps), process_group)
    return _MaskedBatchNorm.apply(x, weight, bias, running_mean, running_var, sites.index, sites.num_active,
                                  bool(training), float(momentum), float(eps), process_group, chosen.kernels)
