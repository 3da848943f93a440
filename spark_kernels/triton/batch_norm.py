"""Triton masked BatchNorm primitives: per-channel statistics over active sites (two-stage reductions)
and the per-channel affine maps of the forward and backward passes.

The forward statistics use the algorithm of every backend (csrc/common/norm_row.h): shifted sums around a
pivot that is one of the summed values, partials merged with Chan's formula, so that a mean of 1e4
standard deviations costs no precision (E[x^2] - E[x]^2 in float32 would lose all of it)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import kernel_memory_format, to_kernel_layout
from .common import (KERNEL_DTYPES, TRITON_TYPE, channel_offsets, check_tables, chunk_backward_sums, chunk_moments,
                     f32_table, launch, layout_name, per_channel, reduce_partials, register_op, site_programs,
                     site_tile, spatial)
from . import config
from .config import MERGE_CONFIG, config_for, table_entries


@triton.jit
def bn_moments_kernel(x_ptr, index_ptr, partials_ptr, M, C, HW, blocks_per_program,
                      ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """First stage of the BN statistics over this program's chunk of active sites (chunk_moments),
    partials (P, 3, C) float32: [r, mean - r, M2]."""
    p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    _, reference, offset, m2 = chunk_moments(x_ptr, index_ptr, p * blocks_per_program * BLOCK_M, blocks_per_program,
                                             M, channel_offsets(c, HW, ROWS), c_ok, C, HW, ROWS, BLOCK_M, BLOCK_C)
    out_ptrs = partials_ptr + p.to(tl.int64) * 3 * C + c
    tl.store(out_ptrs, reference, mask=c_ok)
    tl.store(out_ptrs + C, offset, mask=c_ok)
    tl.store(out_ptrs + 2 * C, m2, mask=c_ok)


@triton.jit
def bn_merge_moments_kernel(partials_ptr, out_ptr, P, C, M, SITES_PER_PROGRAM,
                            BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Second stage: Chan's merge of the P partials [r_p, mean_p - r_p, M2_p] in float64, in a fixed order,
    relative to r_0: out (2, C) float64 = [mean, M2]. Program p of the first stage saw
    min(M - p * SITES_PER_PROGRAM, SITES_PER_PROGRAM) sites."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols_ok = cols < C
    reference = tl.load(partials_ptr + cols, mask=cols_ok, other=0.0).to(tl.float64)
    weighted = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ok = (rows < P)[:, None] & cols_ok[None, :]
        ptrs = partials_ptr + rows.to(tl.int64)[:, None] * 3 * C + cols[None, :]
        n = tl.minimum(tl.maximum(M - rows.to(tl.int64) * SITES_PER_PROGRAM, 0), SITES_PER_PROGRAM).to(tl.float64)
        mean = (tl.load(ptrs, mask=ok, other=0.0).to(tl.float64) - reference[None, :]
                + tl.load(ptrs + C, mask=ok, other=0.0).to(tl.float64))
        weighted += tl.where(ok, n[:, None] * mean, 0.0)
    offset = tl.sum(weighted, axis=0) / M
    squares = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ok = (rows < P)[:, None] & cols_ok[None, :]
        ptrs = partials_ptr + rows.to(tl.int64)[:, None] * 3 * C + cols[None, :]
        n = tl.minimum(tl.maximum(M - rows.to(tl.int64) * SITES_PER_PROGRAM, 0), SITES_PER_PROGRAM).to(tl.float64)
        deviation = (tl.load(ptrs, mask=ok, other=0.0).to(tl.float64) - reference[None, :]
                     + tl.load(ptrs + C, mask=ok, other=0.0).to(tl.float64) - offset[None, :])
        m2 = tl.load(ptrs + 2 * C, mask=ok, other=0.0).to(tl.float64)
        squares += tl.where(ok, m2 + n[:, None] * deviation * deviation, 0.0)
    tl.store(out_ptr + cols, reference + offset, mask=cols_ok)
    tl.store(out_ptr + C + cols, tl.sum(squares, axis=0), mask=cols_ok)


@triton.jit
def bn_sums_kernel(x_ptr, grad_ptr, mean_ptr, index_ptr, partials_ptr, M, C, HW, blocks_per_program,
                   ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """First stage of the backward sums over this program's chunk of active sites (chunk_backward_sums),
    partials (P, 2, C) float32: [sum dy, sum dy * (x - mean)]."""
    p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = per_channel(tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32), ROWS)
    sum_dy, sum_dy_xmu = chunk_backward_sums(x_ptr, grad_ptr, mean, index_ptr, p * blocks_per_program * BLOCK_M,
                                             blocks_per_program, M, channel_offsets(c, HW, ROWS), c_ok, C, HW,
                                             ROWS, BLOCK_M, BLOCK_C)
    out_ptrs = partials_ptr + p.to(tl.int64) * 2 * C + c
    tl.store(out_ptrs, sum_dy, mask=c_ok)
    tl.store(out_ptrs + C, sum_dy_xmu, mask=c_ok)


@triton.jit
def bn_elemt_kernel(x_ptr, grad_ptr, scale_ptr, shift_ptr, grad_scale_ptr, out_ptr, index_ptr, M, C, HW,
                    BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = x * scale[c] + shift[c] (+ grad * grad_scale[c] when BACKWARD) at one tile of active sites."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    offs, ok, _ = site_tile(index_ptr, m, channel_offsets(c, HW, ROWS), c_ok, M, C, HW, ROWS)
    scale = per_channel(tl.load(scale_ptr + c, mask=c_ok, other=0.0), ROWS)
    shift = per_channel(tl.load(shift_ptr + c, mask=c_ok, other=0.0), ROWS)
    out = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) * scale + shift
    if BACKWARD:
        grad_scale = per_channel(tl.load(grad_scale_ptr + c, mask=c_ok, other=0.0), ROWS)
        out += tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32) * grad_scale
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def _site_reduction(kernel, x: torch.Tensor, index: torch.Tensor, rows: int, *tensors):
    """First stage of a BN reduction over x's (>= 1) active sites: kernel(*tensors, index, partials, M, C, HW,
    blocks_per_program) writes partials (P, rows, C) float32. Returns (partials, sites per program)."""
    c, hw = spatial(x)
    m = index.shape[0]
    layout = layout_name(x)
    cfg = config_for("bn", layout, c)
    channel_blocks = triton.cdiv(c, cfg.block_c)
    programs, blocks_per_program = site_programs(m, cfg.block_m, config.REDUCTION_PROGRAMS, channel_blocks)
    partials = x.new_empty((programs, rows, c), dtype=torch.float32)
    launch(kernel, (programs, channel_blocks), *tensors, index, partials, m, c, hw, blocks_per_program,
           ROWS=layout == "rows", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return partials, blocks_per_program * cfg.block_m


def _moments(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    c, m = x.shape[1], index.shape[0]
    if m == 0:
        return x.new_zeros((2, c), dtype=torch.float64)
    partials, sites_per_program = _site_reduction(bn_moments_kernel, x, index, 3, x)
    out = x.new_empty((2, c), dtype=torch.float64)
    merge = MERGE_CONFIG
    launch(bn_merge_moments_kernel, (triton.cdiv(c, merge.block_c),),
        partials, out, partials.shape[0], c, m, sites_per_program, BLOCK_P=merge.block_m,
        BLOCK_C=merge.block_c, num_warps=merge.num_warps)
    return out


def _backward_sums(x: torch.Tensor, grad_out: torch.Tensor, mean: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if index.shape[0] == 0:
        return x.new_zeros((2, x.shape[1]), dtype=torch.float64)
    partials, _ = _site_reduction(bn_sums_kernel, x, index, 2, x, grad_out, mean)
    return reduce_partials(partials, torch.float64)


def _elemt(x: torch.Tensor, grad_out: torch.Tensor, index: torch.Tensor, scale: torch.Tensor,
           shift: torch.Tensor, grad_scale: torch.Tensor, backward: bool) -> torch.Tensor:
    out = torch.zeros_like(x, memory_format=kernel_memory_format(x))
    c, hw = spatial(x)
    m = index.shape[0]
    if m == 0:
        return out
    layout = layout_name(x)
    cfg = config_for("bn", layout, c)
    launch(bn_elemt_kernel, (triton.cdiv(m, cfg.block_m), triton.cdiv(c, cfg.block_c)),
        x, grad_out, scale, shift, grad_scale, out, index, m, c, hw, BACKWARD=backward, ROWS=layout == "rows",
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return out



@register_op
def bn_stats(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    return _moments(to_kernel_layout(x, x), index)


@register_op
def bn_backward_stats(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    grad_out = to_kernel_layout(grad_out.to(x.dtype), x)
    return _backward_sums(x, grad_out, f32_table(mean), index)


@register_op
def bn_elemt(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    scale = f32_table(scale)
    return _elemt(x, x, index, scale, f32_table(shift), scale, backward=False)


@register_op
def bn_backward_elemt(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    grad_out = to_kernel_layout(grad_out.to(x.dtype), x)
    # grad_out * a + x * b + d
    return _elemt(x, grad_out, index, f32_table(b), f32_table(d), f32_table(a), backward=True)


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the launch code above can pick (compile check)."""
    merge = MERGE_CONFIG
    yield (bn_merge_moments_kernel,
           {"partials_ptr": "*fp32", "out_ptr": "*fp64", "P": "i32", "C": "i32", "M": "i32", "SITES_PER_PROGRAM": "i32",
            "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"},
           {"BLOCK_P": merge.block_m, "BLOCK_C": merge.block_c}, merge.num_warps)
    for dtype in KERNEL_DTYPES:
        t = f"*{TRITON_TYPE[dtype]}"
        moments = {"x_ptr": t, "index_ptr": "*i32", "partials_ptr": "*fp32", "M": "i32", "C": "i32", "HW": "i32",
                   "blocks_per_program": "i32"}
        sums = {"x_ptr": t, "grad_ptr": t, "mean_ptr": "*fp32", "index_ptr": "*i32", "partials_ptr": "*fp32",
                "M": "i32", "C": "i32", "HW": "i32", "blocks_per_program": "i32"}
        elemt = {"x_ptr": t, "grad_ptr": t, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "grad_scale_ptr": "*fp32",
                 "out_ptr": t, "index_ptr": "*i32", "M": "i32", "C": "i32", "HW": "i32"}
        for layout, cfg in table_entries("bn"):
            base = {"ROWS": layout == "rows", "BLOCK_M": cfg.block_m, "BLOCK_C": cfg.block_c}
            for kernel, signature, flags in ((bn_moments_kernel, moments, ({},)), (bn_sums_kernel, sums, ({},)),
                                             (bn_elemt_kernel, elemt, ({"BACKWARD": False}, {"BACKWARD": True}))):
                for flag in flags:
                    constexprs = {**flag, **base}
                    yield kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs, cfg.num_warps
