"""Triton masked LayerNorm primitives: normalization over the channels of each active site (a tile holds
whole sites), and its backward with the parameter gradients as a two-stage reduction."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._layout import kernel_memory_format, to_kernel_layout
from .common import (KERNEL_DTYPES, TRITON_TYPE, channel_offsets, check_tables, launch, layout_name,
                     per_channel, per_site, reduce_partials, register_op, site_programs, site_tile, spatial,
                     sum_over_channels, sum_over_sites, zero_tile)
from . import config
from .config import config_for, table_entries


@triton.jit
def ln_forward_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr, index_ptr, M, C, HW, eps,
                      ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = (x - mean) * rstd * weight + bias over the channels of BLOCK_M active sites (BLOCK_C >= C);
    mean and rstd (float32) per active site."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    offs, ok, m_ok = site_tile(index_ptr, m, channel_offsets(c, HW, ROWS), c_ok, M, C, HW, ROWS)
    xv = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    # Correctly rounded division and sqrt, as IEEE float32 math on the CPU (on NVIDIA GPUs plain / and
    # tl.sqrt compile to approximate instructions).
    mean = tl.div_rn(sum_over_channels(xv, ROWS), (C * 1.0))
    diff = tl.where(ok, xv - per_site(mean, ROWS), 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sum_over_channels(diff * diff, ROWS), (C * 1.0)) + eps))
    w = per_channel(tl.load(weight_ptr + c, mask=c_ok, other=0.0), ROWS)
    b = per_channel(tl.load(bias_ptr + c, mask=c_ok, other=0.0), ROWS)
    y = diff * per_site(rstd, ROWS) * w + b
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + m, mean, mask=m_ok)
    tl.store(rstd_ptr + m, rstd, mask=m_ok)


@triton.jit
def ln_backward_kernel(grad_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr, partials_ptr, index_ptr,
                       M, C, HW, blocks_per_program,
                       ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_x = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) with g = dy * weight, xhat = (x - mean) * rstd,
    for this program's chunk of active sites, and the first stage of the parameter gradients:
    partials[p] = [sum dy * xhat, sum dy] (2, C) float32."""
    p = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = channel_offsets(c, HW, ROWS)
    w = per_channel(tl.load(weight_ptr + c, mask=c_ok, other=0.0), ROWS)
    first = p * blocks_per_program * BLOCK_M
    acc_dw = zero_tile(BLOCK_M, BLOCK_C, ROWS)
    acc_db = zero_tile(BLOCK_M, BLOCK_C, ROWS)
    for b in range(0, blocks_per_program):
        m = first + b * BLOCK_M + tl.arange(0, BLOCK_M)
        offs, ok, m_ok = site_tile(index_ptr, m, c_off, c_ok, M, C, HW, ROWS)
        dy = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mean = per_site(tl.load(mean_ptr + m, mask=m_ok, other=0.0), ROWS)
        rstd = per_site(tl.load(rstd_ptr + m, mask=m_ok, other=0.0), ROWS)
        xhat = tl.where(ok, (xv - mean) * rstd, 0.0)
        g = dy * w
        mean_g = per_site(tl.div_rn(sum_over_channels(g, ROWS), (C * 1.0)), ROWS)
        mean_gx = per_site(tl.div_rn(sum_over_channels(g * xhat, ROWS), (C * 1.0)), ROWS)
        grad_x = rstd * (g - mean_g - xhat * mean_gx)
        tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=ok)
        acc_dw += dy * xhat
        acc_db += dy
    out_ptrs = partials_ptr + p.to(tl.int64) * 2 * C + c
    tl.store(out_ptrs, sum_over_sites(acc_dw, ROWS), mask=c_ok)
    tl.store(out_ptrs + C, sum_over_sites(acc_db, ROWS), mask=c_ok)


def _param_f32(t: Optional[torch.Tensor], c: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    if t is None:
        return like.new_full((c,), fill, dtype=torch.float32)
    return t.to(torch.float32).contiguous()


@register_op
def ln_forward(x: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    c, hw = spatial(x)
    m = index.shape[0]
    y = torch.zeros_like(x, memory_format=kernel_memory_format(x))
    mean = x.new_empty((m,), dtype=torch.float32)
    rstd = x.new_empty((m,), dtype=torch.float32)
    if m == 0:
        return y, mean, rstd
    layout = layout_name(x)
    cfg = config_for("ln", layout, c)
    launch(ln_forward_kernel, (triton.cdiv(m, cfg.block_m),),
        x, _param_f32(weight, c, 1.0, x), _param_f32(bias, c, 0.0, x), y, mean, rstd, index, m, c, hw, eps,
        ROWS=layout == "rows", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return y, mean, rstd


@register_op
def ln_backward(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, weight: Optional[torch.Tensor],
                mean: torch.Tensor, rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    grad_out = to_kernel_layout(grad_out.to(x.dtype), x)
    c, hw = spatial(x)
    m = index.shape[0]
    grad_x = torch.zeros_like(x, memory_format=kernel_memory_format(x))
    if m == 0:
        return grad_x, x.new_zeros((c,), dtype=torch.float32), x.new_zeros((c,), dtype=torch.float32)
    layout = layout_name(x)
    cfg = config_for("ln", layout, c)
    programs, blocks_per_program = site_programs(m, cfg.block_m, config.REDUCTION_PROGRAMS)
    partials = x.new_empty((programs, 2, c), dtype=torch.float32)
    launch(ln_backward_kernel, (programs,),
        grad_out, x, _param_f32(weight, c, 1.0, x), mean.contiguous(), rstd.contiguous(), grad_x, partials, index,
        m, c, hw, blocks_per_program, ROWS=layout == "rows", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps)
    sums = reduce_partials(partials, torch.float32)
    return grad_x, sums[0].clone(), sums[1].clone()


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the launch code above can pick (compile check)."""
    for dtype in KERNEL_DTYPES:
        t = f"*{TRITON_TYPE[dtype]}"
        forward = {"x_ptr": t, "weight_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": t, "mean_ptr": "*fp32",
                   "rstd_ptr": "*fp32", "index_ptr": "*i32", "M": "i32", "C": "i32", "HW": "i32", "eps": "fp32"}
        backward = {"grad_ptr": t, "x_ptr": t, "weight_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                    "grad_x_ptr": t, "partials_ptr": "*fp32", "index_ptr": "*i32", "M": "i32", "C": "i32", "HW": "i32",
                    "blocks_per_program": "i32"}
        for kernel, signature in ((ln_forward_kernel, forward), (ln_backward_kernel, backward)):
            for layout, cfg in table_entries("ln"):
                constexprs = {"ROWS": layout == "rows", "BLOCK_M": cfg.block_m, "BLOCK_C": cfg.block_c}
                yield kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs, cfg.num_warps
