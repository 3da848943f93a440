"""Triton masked BatchNorm primitives: per-channel sums over active sites (two-stage reduction) and the
per-channel affine maps of the forward and backward passes."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._layout import kernel_memory_format, to_kernel_layout
from .common import (KERNEL_DTYPES, TRITON_TYPE, channel_offsets, check_tables, layout_name, per_channel, reduce_partials, register_op, site_offsets,
                     site_programs, spatial, sum_over_sites, tile_and, tile_sum, zero_tile)
from .config import config_for, table_entries


@triton.jit
def bn_sums_kernel(x_ptr, grad_ptr, mean_ptr, index_ptr, partials_ptr, M, C, HW, blocks_per_program,
                   BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """First stage of the BN sums over this program's chunk of active sites, partials (P, 2, C) float32:
    forward [sum x, sum x^2]; backward [sum dy, sum dy * (x - mean)]."""
    p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = channel_offsets(c, HW, ROWS)
    first = p * blocks_per_program * BLOCK_M
    if BACKWARD:
        mean = per_channel(tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32), ROWS)
    acc0 = zero_tile(BLOCK_M, BLOCK_C, ROWS)
    acc1 = zero_tile(BLOCK_M, BLOCK_C, ROWS)
    for b in range(0, blocks_per_program):
        m = first + b * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        sites = tl.load(index_ptr + m, mask=m_ok, other=0)
        offs = tile_sum(site_offsets(sites, C, HW, ROWS), c_off, ROWS)
        ok = tile_and(m_ok, c_ok, ROWS)
        xv = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:
            g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            acc0 += g
            acc1 += g * (xv - mean)
        else:
            acc0 += xv
            acc1 += xv * xv
    out_ptrs = partials_ptr + p.to(tl.int64) * 2 * C + c
    tl.store(out_ptrs, sum_over_sites(acc0, ROWS), mask=c_ok)
    tl.store(out_ptrs + C, sum_over_sites(acc1, ROWS), mask=c_ok)


@triton.jit
def bn_elemt_kernel(x_ptr, grad_ptr, scale_ptr, shift_ptr, grad_scale_ptr, out_ptr, index_ptr, M, C, HW,
                    BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = x * scale[c] + shift[c] (+ grad * grad_scale[c] when BACKWARD) at one tile of active sites."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sites = tl.load(index_ptr + m, mask=m_ok, other=0)
    offs = tile_sum(site_offsets(sites, C, HW, ROWS), channel_offsets(c, HW, ROWS), ROWS)
    ok = tile_and(m_ok, c_ok, ROWS)
    scale = per_channel(tl.load(scale_ptr + c, mask=c_ok, other=0.0), ROWS)
    shift = per_channel(tl.load(shift_ptr + c, mask=c_ok, other=0.0), ROWS)
    out = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) * scale + shift
    if BACKWARD:
        grad_scale = per_channel(tl.load(grad_scale_ptr + c, mask=c_ok, other=0.0), ROWS)
        out += tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32) * grad_scale
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def _fake_stats(x, index):
    return x.new_empty((2, x.shape[1]), dtype=torch.float64)


def _fake_backward_stats(grad_out, x, index, mean):
    return x.new_empty((2, x.shape[1]), dtype=torch.float64)


def _fake_elemt(x, index, scale, shift):
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


def _fake_backward_elemt(grad_out, x, index, a, b, d):
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


def _sums(x: torch.Tensor, grad_out: torch.Tensor, mean: torch.Tensor, index: torch.Tensor,
          backward: bool) -> torch.Tensor:
    c, hw = spatial(x)
    m = index.shape[0]
    if m == 0:
        return x.new_zeros((2, c), dtype=torch.float64)
    layout = layout_name(x)
    cfg = config_for("bn", layout, c)
    programs, blocks_per_program = site_programs(m, cfg.block_m)
    partials = x.new_empty((programs, 2, c), dtype=torch.float32)
    wrap_triton(bn_sums_kernel)[(programs, triton.cdiv(c, cfg.block_c))](
        x, grad_out, mean, index, partials, m, c, hw, blocks_per_program, BACKWARD=backward,
        ROWS=layout == "rows", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
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
    wrap_triton(bn_elemt_kernel)[(triton.cdiv(m, cfg.block_m), triton.cdiv(c, cfg.block_c))](
        x, grad_out, scale, shift, grad_scale, out, index, m, c, hw, BACKWARD=backward, ROWS=layout == "rows",
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return out


def _per_channel_f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


@register_op("bn_stats", _fake_stats)
def bn_stats(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    return _sums(x, x, x, index, backward=False)


@register_op("bn_backward_stats", _fake_backward_stats)
def bn_backward_stats(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    grad_out = to_kernel_layout(grad_out.to(x.dtype), x)
    return _sums(x, grad_out, _per_channel_f32(mean), index, backward=True)


@register_op("bn_elemt", _fake_elemt)
def bn_elemt(x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    scale = _per_channel_f32(scale)
    return _elemt(x, x, index, scale, _per_channel_f32(shift), scale, backward=False)


@register_op("bn_backward_elemt", _fake_backward_elemt)
def bn_backward_elemt(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    grad_out = to_kernel_layout(grad_out.to(x.dtype), x)
    # grad_out * a + x * b + d
    return _elemt(x, grad_out, index, _per_channel_f32(b), _per_channel_f32(d), _per_channel_f32(a), backward=True)


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the launch code above can pick (compile check)."""
    for dtype in KERNEL_DTYPES:
        t = f"*{TRITON_TYPE[dtype]}"
        sums = {"x_ptr": t, "grad_ptr": t, "mean_ptr": "*fp32", "index_ptr": "*i32", "partials_ptr": "*fp32",
                "M": "i32", "C": "i32", "HW": "i32", "blocks_per_program": "i32"}
        elemt = {"x_ptr": t, "grad_ptr": t, "scale_ptr": "*fp32", "shift_ptr": "*fp32", "grad_scale_ptr": "*fp32",
                 "out_ptr": t, "index_ptr": "*i32", "M": "i32", "C": "i32", "HW": "i32"}
        for kernel, signature in ((bn_sums_kernel, sums), (bn_elemt_kernel, elemt)):
            for layout, cfg in table_entries("bn"):
                for backward in (False, True):
                    constexprs = {"BACKWARD": backward, "ROWS": layout == "rows", "BLOCK_M": cfg.block_m,
                                  "BLOCK_C": cfg.block_c}
                    yield kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs, cfg.num_warps
