"""Triton submanifold depthwise conv: forward, input gradient (gather with mirrored taps) and weight/bias
gradient (two-stage reduction)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._layout import kernel_memory_format, to_kernel_layout
from ..depthwise_conv import KERNEL_SIZES
from .common import (KERNEL_DTYPES, TRITON_TYPE, channel_offsets, check_tables, launch, layout_name,
                     per_channel, reduce_partials, register_op, site_offsets, site_programs, spatial,
                     sum_over_sites, tile_and, tile_sum, zero_tile)
from .config import config_for, table_entries


@triton.jit
def dwconv_taps_kernel(src_ptr, weight_ptr, bias_ptr, out_ptr, index_ptr, neighbors_ptr, M, C, HW, mirror,
                       K: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[site] = bias + sum_t weight[tap(t)] * src[neighbor_t(site)] over one tile of active sites x
    channels. Forward: mirror = 0, tap(t) = t. Input gradient: src = grad_out, bias = 0, mirror = 1,
    tap(t) = K*K-1-t (the neighbour at offset d receives this site's value through tap -d)."""
    KK: tl.constexpr = K * K
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = channel_offsets(c, HW, ROWS)
    row_ptrs = neighbors_ptr + m.to(tl.int64) * KK
    acc = zero_tile(BLOCK_M, BLOCK_C, ROWS)
    # A loop, not unrolled: 49 unrolled taps hoist all their loads and run out of registers.
    for t in range(0, KK):
        nb = tl.load(row_ptrs + t, mask=m_ok, other=-1)
        nb_ok = nb >= 0
        src = tl.load(src_ptr + tile_sum(site_offsets(tl.where(nb_ok, nb, 0), C, HW, ROWS), c_off, ROWS),
                      mask=tile_and(nb_ok, c_ok, ROWS), other=0.0)
        w = tl.load(weight_ptr + c * KK + (t + mirror * (KK - 1 - 2 * t)), mask=c_ok, other=0.0)
        acc += src.to(tl.float32) * per_channel(w.to(tl.float32), ROWS)
    acc += per_channel(tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32), ROWS)
    sites = tl.load(index_ptr + m, mask=m_ok, other=0)
    tl.store(out_ptr + tile_sum(site_offsets(sites, C, HW, ROWS), c_off, ROWS), acc.to(out_ptr.dtype.element_ty),
             mask=tile_and(m_ok, c_ok, ROWS))


@triton.jit
def dwconv_wgrad_kernel(grad_ptr, x_ptr, index_ptr, neighbors_ptr, partials_ptr, M, C, HW, blocks_per_program,
                        K: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """First stage of grad_weight / grad_bias: partials[p, c, t] = sum over this program's chunk of sites of
    grad_out[site, c] * x[neighbor_t(site), c] (t < K*K) and partials[p, c, K*K] = sum grad_out[site, c].
    Taps are the outer loop so that only one tile accumulator is live; the chunk's grad_out tiles are
    re-read from cache."""
    KK: tl.constexpr = K * K
    p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = channel_offsets(c, HW, ROWS)
    first = p * blocks_per_program * BLOCK_M
    out_ptrs = partials_ptr + p.to(tl.int64) * C * (KK + 1) + c * (KK + 1)
    for t in range(0, KK + 1):
        acc = zero_tile(BLOCK_M, BLOCK_C, ROWS)
        for b in range(0, blocks_per_program):
            m = first + b * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = m < M
            sites = tl.load(index_ptr + m, mask=m_ok, other=0)
            g = tl.load(grad_ptr + tile_sum(site_offsets(sites, C, HW, ROWS), c_off, ROWS),
                        mask=tile_and(m_ok, c_ok, ROWS), other=0.0).to(tl.float32)
            # Tap KK is the bias: no neighbour is read and x counts as 1.
            nb = tl.load(neighbors_ptr + m.to(tl.int64) * KK + t, mask=m_ok & (t < KK), other=-1)
            nb_ok = nb >= 0
            xv = tl.load(x_ptr + tile_sum(site_offsets(tl.where(nb_ok, nb, 0), C, HW, ROWS), c_off, ROWS),
                         mask=tile_and(nb_ok, c_ok, ROWS), other=0.0).to(tl.float32)
            acc += g * tl.where(t < KK, xv, 1.0)
        tl.store(out_ptrs + t, sum_over_sites(acc, ROWS), mask=c_ok)


def _fake_forward(x, weight, bias, index, neighbors):
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


def _fake_backward(grad_out, x, weight, index, neighbors):
    return (torch.empty_like(x, memory_format=kernel_memory_format(x)), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)))


def _launch_taps(src, weight, bias, out, index, neighbors, mirror: int) -> None:
    c, hw = spatial(src)
    m = index.shape[0]
    layout = layout_name(src)
    cfg = config_for("dwconv", layout, c)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(c, cfg.block_c))
    launch(dwconv_taps_kernel, grid,
        src, weight, bias, out, index, neighbors, m, c, hw, mirror, K=weight.shape[-1], ROWS=layout == "rows",
        BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)


@register_op("dwconv_forward", _fake_forward)
def dwconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
                   neighbors: torch.Tensor) -> torch.Tensor:
    check_tables(x, index, neighbors, weight.shape[-1])
    x = to_kernel_layout(x, x)
    y = torch.zeros_like(x, memory_format=kernel_memory_format(x))
    if index.shape[0] == 0:
        return y
    weight = weight.contiguous()
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.contiguous()
    _launch_taps(x, weight, bias, y, index, neighbors, mirror=0)
    return y


@register_op("dwconv_backward", _fake_backward)
def dwconv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                    neighbors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_tables(x, index, neighbors, weight.shape[-1])
    x = to_kernel_layout(x, x)
    grad_out = to_kernel_layout(grad_out.to(x.dtype), x)
    weight = weight.contiguous()
    c, hw = spatial(x)
    kk = weight.shape[-1] * weight.shape[-1]
    grad_x = torch.zeros_like(x, memory_format=kernel_memory_format(x))
    m = index.shape[0]
    if m == 0:
        return grad_x, torch.zeros_like(weight), weight.new_zeros((c,))
    _launch_taps(grad_out, weight, weight.new_zeros((c,)), grad_x, index, neighbors, mirror=1)

    layout = layout_name(x)
    cfg = config_for("dwconv_wgrad", layout, c)
    programs, blocks_per_program = site_programs(m, cfg.block_m)
    partials = x.new_empty((programs, c, kk + 1), dtype=torch.float32)
    launch(dwconv_wgrad_kernel, (programs, triton.cdiv(c, cfg.block_c)),
        grad_out, x, index, neighbors, partials, m, c, hw, blocks_per_program, K=weight.shape[-1],
        ROWS=layout == "rows", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    sums = reduce_partials(partials, torch.float32)
    # Copies: the op's outputs must not alias each other.
    grad_w = sums[:, :kk].reshape(weight.shape).to(weight.dtype, copy=True)
    grad_b = sums[:, kk].to(weight.dtype, copy=True)
    return grad_x, grad_w, grad_b


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the launch code above can pick (compile check)."""
    for dtype in KERNEL_DTYPES:
        t = f"*{TRITON_TYPE[dtype]}"
        taps = {"src_ptr": t, "weight_ptr": t, "bias_ptr": t, "out_ptr": t, "index_ptr": "*i32",
                "neighbors_ptr": "*i32", "M": "i32", "C": "i32", "HW": "i32", "mirror": "i32"}
        wgrad = {"grad_ptr": t, "x_ptr": t, "index_ptr": "*i32", "neighbors_ptr": "*i32", "partials_ptr": "*fp32",
                 "M": "i32", "C": "i32", "HW": "i32", "blocks_per_program": "i32"}
        for kernel, family, signature in ((dwconv_taps_kernel, "dwconv", taps),
                                          (dwconv_wgrad_kernel, "dwconv_wgrad", wgrad)):
            for layout, cfg in table_entries(family):
                for k in KERNEL_SIZES:
                    constexprs = {"K": k, "ROWS": layout == "rows", "BLOCK_M": cfg.block_m, "BLOCK_C": cfg.block_c}
                    yield kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs, cfg.num_warps
