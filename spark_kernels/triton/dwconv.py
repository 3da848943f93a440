"""Triton submanifold depthwise conv: forward, input gradient (a gather: with mirrored taps over the forward
table at stride 1, through the transposed table at stride 2) and weight/bias gradient (two-stage reduction).
Sources and destinations of a gather may be different grids (a stride-2 conv's input and output)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._layout import kernel_memory_format, to_kernel_layout
from .._registry import DWCONV, dwconv_output_shape
from .common import (KERNEL_DTYPES, TRITON_TYPE, channel_offsets, check_tables, launch, layout_name,
                     per_channel, reduce_partials, register_op, site_offsets, site_programs, spatial, tile_and,
                     tile_sum, zero_tile)
from . import config
from .config import config_for, table_entries


@triton.jit
def tap_offsets(neighbors_ptr, m, m_ok, c_ok, c_off, C, HW, KK: tl.constexpr, FIRST: tl.constexpr,
                TAPS: tl.constexpr, ROWS: tl.constexpr):
    """Neighbour addresses of taps FIRST .. FIRST+TAPS-1 (those < KK) for a tile of sites x channels, as a 3-D
    tile with the taps in the middle: [sites, taps, channels] in rows, [channels, taps, sites] in planes. The
    tile's neighbour indices come in one load, so every gather depends on one index load only. Returns
    (offsets, in-bounds mask, taps)."""
    t = FIRST + tl.arange(0, TAPS)
    t_ok = t < KK
    if ROWS:
        nb = tl.load(neighbors_ptr + m.to(tl.int64)[:, None] * KK + t[None, :], mask=m_ok[:, None] & t_ok[None, :],
                     other=-1)
    else:
        nb = tl.load(neighbors_ptr + m.to(tl.int64)[None, :] * KK + t[:, None], mask=m_ok[None, :] & t_ok[:, None],
                     other=-1)
    nb_ok = nb >= 0
    sites = site_offsets(tl.where(nb_ok, nb, 0), C, HW, ROWS)
    if ROWS:
        offs = sites[:, :, None] + c_off[None, None, :]
        ok = nb_ok[:, :, None] & c_ok[None, None, :]
    else:
        offs = c_off[:, None, None] + sites[None, :, :]
        ok = nb_ok[None, :, :] & c_ok[:, None, None]
    return offs, ok, t


@triton.jit
def taps_chunk(src_ptr, weight_ptr, neighbors_ptr, m, m_ok, c, c_ok, c_off, C, HW, mirror, KK: tl.constexpr,
               FIRST: tl.constexpr, TAPS: tl.constexpr, ROWS: tl.constexpr):
    """sum over taps t in [FIRST, FIRST + TAPS) of weight[tap(t), c] * src[neighbor_t(site), c], a 2-D tile
    (weight (K*K, C), tap-major: a tile's weights are contiguous along the channels)."""
    offs, ok, t = tap_offsets(neighbors_ptr, m, m_ok, c_ok, c_off, C, HW, KK, FIRST, TAPS, ROWS)
    src = tl.load(src_ptr + offs, mask=ok, other=0.0)
    tap = t + mirror * (KK - 1 - 2 * t)
    w_ok = tile_and(t < KK, c_ok, ROWS)
    if ROWS:
        w = tl.load(weight_ptr + tap[:, None] * C + c[None, :], mask=w_ok, other=0.0)[None, :, :]
    else:
        w = tl.load(weight_ptr + tap[None, :] * C + c[:, None], mask=w_ok, other=0.0)[:, :, None]
    return tl.sum(src.to(tl.float32) * w.to(tl.float32), axis=1)


@triton.jit
def dwconv_taps_kernel(src_ptr, weight_ptr, bias_ptr, out_ptr, index_ptr, neighbors_ptr, M, C, HW, OUT_HW, mirror,
                       K: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       TAP_CHUNK: tl.constexpr):
    """out[site] = bias + sum_t weight[tap(t)] * src[neighbor_t(site)] over one tile of active sites x
    channels; src has HW sites per image, out OUT_HW. Forward: mirror = 0, tap(t) = t. Input gradient:
    src = grad_out, bias = 0, and at stride 1 mirror = 1, tap(t) = K*K-1-t (the neighbour at offset d
    receives this site's value through tap -d); at stride 2 mirror = 0 over the transposed table.

    No loop: the K*K taps are cut into static chunks of TAP_CHUNK taps and then the power-of-two pieces of
    the remainder (49 = 16 + 16 + 16 + 1, 9 = 8 + 1), each one [sites, taps, channels] gather, so no lane is
    masked off for padding and no load waits for another tap's load."""
    KK: tl.constexpr = K * K
    REST: tl.constexpr = KK % TAP_CHUNK
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = channel_offsets(c, HW, ROWS)
    out_c_off = channel_offsets(c, OUT_HW, ROWS)
    bias = per_channel(tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32), ROWS)
    acc = bias + zero_tile(BLOCK_M, BLOCK_C, ROWS)
    for i in tl.static_range(KK // TAP_CHUNK):
        acc += taps_chunk(src_ptr, weight_ptr, neighbors_ptr, m, m_ok, c, c_ok, c_off, C, HW, mirror, KK,
                          i * TAP_CHUNK, TAP_CHUNK, ROWS)
    for j in tl.static_range(5):  # the remainder's power-of-two pieces (TAP_CHUNK <= 32)
        if (REST >> j) & 1:
            acc += taps_chunk(src_ptr, weight_ptr, neighbors_ptr, m, m_ok, c, c_ok, c_off, C, HW, mirror, KK,
                              KK - REST % (2 << j), 1 << j, ROWS)
    sites = tl.load(index_ptr + m, mask=m_ok, other=0)
    tl.store(out_ptr + tile_sum(site_offsets(sites, C, OUT_HW, ROWS), out_c_off, ROWS),
             acc.to(out_ptr.dtype.element_ty), mask=tile_and(m_ok, c_ok, ROWS))


@triton.jit
def dwconv_wgrad_kernel(grad_ptr, x_ptr, index_ptr, neighbors_ptr, partials_ptr, M, C, HW, OUT_HW,
                        blocks_per_program, K: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """First stage of grad_weight / grad_bias: partials[p, c, t] = sum over this program's chunk of output sites
    of grad_out[site, c] * x[neighbor_t(site), c] (t < K*K) and partials[p, c, K*K] = sum grad_out[site, c]
    (x has HW sites per image, grad_out OUT_HW).

    Sites are the loop, taps a tile dimension: each site block loads its grad_out tile once and gathers
    the x values of all K*K taps as one [sites, taps, channels] tile (taps padded to a power of two; the
    pad slot K*K is the bias, whose x is 1), so grad_out is read once and no load depends on another tap's."""
    KK: tl.constexpr = K * K
    TAPS: tl.constexpr = triton.next_power_of_2(KK + 1)
    p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = channel_offsets(c, HW, ROWS)
    out_c_off = channel_offsets(c, OUT_HW, ROWS)
    first = p * blocks_per_program * BLOCK_M
    if ROWS:
        acc = tl.zeros([BLOCK_M, TAPS, BLOCK_C], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_C, TAPS, BLOCK_M], dtype=tl.float32)
    for b in range(0, blocks_per_program):
        m = first + b * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        sites = tl.load(index_ptr + m, mask=m_ok, other=0)
        g = tl.load(grad_ptr + tile_sum(site_offsets(sites, C, OUT_HW, ROWS), out_c_off, ROWS),
                    mask=tile_and(m_ok, c_ok, ROWS), other=0.0).to(tl.float32)
        offs, ok, t = tap_offsets(neighbors_ptr, m, m_ok, c_ok, c_off, C, HW, KK, 0, TAPS, ROWS)
        xv = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        acc += g[:, None, :] * tl.where((t == KK)[None, :, None], 1.0, xv)
    t = tl.arange(0, TAPS)
    if ROWS:
        sums = tl.sum(acc, axis=0)  # [TAPS, BLOCK_C]
        out_ptrs = partials_ptr + p.to(tl.int64) * C * (KK + 1) + c[None, :] * (KK + 1) + t[:, None]
        out_ok = (t <= KK)[:, None] & c_ok[None, :]
    else:
        sums = tl.sum(acc, axis=2)  # [BLOCK_C, TAPS]
        out_ptrs = partials_ptr + p.to(tl.int64) * C * (KK + 1) + c[:, None] * (KK + 1) + t[None, :]
        out_ok = c_ok[:, None] & (t <= KK)[None, :]
    tl.store(out_ptrs, sums, mask=out_ok)


def _launch_taps(src, weight, bias, out, index, neighbors, mirror: int) -> None:
    """out (every site zero beforehand) = the gather over src at the index's sites."""
    c, hw = spatial(src)
    _, out_hw = spatial(out)
    m = index.shape[0]
    weight_taps = weight.reshape(c, -1).t().contiguous()  # (K*K, C): vector loads along the channels
    layout = layout_name(src)
    cfg = config_for("dwconv", layout, c)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(c, cfg.block_c))
    launch(dwconv_taps_kernel, grid,
        src, weight_taps, bias, out, index, neighbors, m, c, hw, out_hw, mirror, K=weight.shape[-1],
        ROWS=layout == "rows", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, TAP_CHUNK=config.DWCONV_TAP_CHUNK,
        num_warps=cfg.num_warps)


def _check_conv_tables(x, weight, index, neighbors, stride) -> None:
    strides = DWCONV.support["triton"].strides.values
    if stride not in strides:
        raise ValueError(f"stride must be one of {strides}, got {stride}")
    n, _, ho, wo = dwconv_output_shape(x, stride)
    check_tables(x, index, neighbors, weight.shape[-1], num_sites=n * ho * wo)


@register_op
def dwconv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor,
                   neighbors: torch.Tensor, stride: int = 1) -> torch.Tensor:
    _check_conv_tables(x, weight, index, neighbors, stride)
    x = to_kernel_layout(x, x)
    y = x.new_zeros(dwconv_output_shape(x, stride)).contiguous(memory_format=kernel_memory_format(x))
    if index.shape[0] == 0:
        return y
    bias = weight.new_zeros(weight.shape[0]) if bias is None else bias.contiguous()
    _launch_taps(x, weight, bias, y, index, neighbors, mirror=0)
    return y


@register_op
def dwconv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                    neighbors: torch.Tensor, stride: int = 1, input_index: Optional[torch.Tensor] = None,
                    input_taps: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_conv_tables(x, weight, index, neighbors, stride)
    if (stride == 1) != (input_index is None and input_taps is None):
        raise ValueError(f"input_index and input_taps must be None at stride 1 and given at stride 2, got stride "
                         f"{stride} with {'no ' if input_index is None else ''}input_index and "
                         f"{'no ' if input_taps is None else ''}input_taps")
    if stride != 1:
        check_tables(x, input_index, input_taps, weight.shape[-1], names=("input_index", "input_taps"))
    x = to_kernel_layout(x, x)
    if tuple(grad_out.shape) != dwconv_output_shape(x, stride):
        raise ValueError(f"grad_out must have the output's shape {dwconv_output_shape(x, stride)}, got "
                         f"{tuple(grad_out.shape)}")
    grad_out = to_kernel_layout(grad_out.to(x.dtype), x)
    c, hw = spatial(x)
    _, out_hw = spatial(grad_out)
    kk = weight.shape[-1] * weight.shape[-1]
    grad_x = torch.zeros_like(x, memory_format=kernel_memory_format(x))
    m = index.shape[0]
    if m == 0:
        return grad_x, torch.zeros_like(weight), weight.new_zeros((c,))
    if stride == 1:
        _launch_taps(grad_out, weight, weight.new_zeros((c,)), grad_x, index, neighbors, mirror=1)
    else:
        _launch_taps(grad_out, weight, weight.new_zeros((c,)), grad_x, input_index, input_taps, mirror=0)

    layout = layout_name(x)
    cfg = config_for("dwconv_wgrad", layout, c)
    programs, blocks_per_program = site_programs(m, cfg.block_m, config.wgrad_programs(x.device),
                                                   triton.cdiv(c, cfg.block_c))
    partials = x.new_empty((programs, c, kk + 1), dtype=torch.float32)
    launch(dwconv_wgrad_kernel, (programs, triton.cdiv(c, cfg.block_c)),
        grad_out, x, index, neighbors, partials, m, c, hw, out_hw, blocks_per_program, K=weight.shape[-1],
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
                "neighbors_ptr": "*i32", "M": "i32", "C": "i32", "HW": "i32", "OUT_HW": "i32", "mirror": "i32"}
        wgrad = {"grad_ptr": t, "x_ptr": t, "index_ptr": "*i32", "neighbors_ptr": "*i32", "partials_ptr": "*fp32",
                 "M": "i32", "C": "i32", "HW": "i32", "OUT_HW": "i32", "blocks_per_program": "i32"}
        for kernel, family, signature in ((dwconv_taps_kernel, "dwconv", taps),
                                          (dwconv_wgrad_kernel, "dwconv_wgrad", wgrad)):
            for layout, cfg in table_entries(family):
                for k in DWCONV.support["triton"].kernel_sizes.values:
                    constexprs = {"K": k, "ROWS": layout == "rows", "BLOCK_M": cfg.block_m, "BLOCK_C": cfg.block_c}
                    if kernel is dwconv_taps_kernel:
                        constexprs["TAP_CHUNK"] = config.DWCONV_TAP_CHUNK
                    yield kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs, cfg.num_warps
