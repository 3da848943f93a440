"""Triton masked GroupNorm primitives: per-(image, channel) statistics over each image's active sites and
the per-(image, channel) affine maps of the forward and backward passes (the autograd function in
spark_kernels/group_norm.py merges a group's channels and computes the coefficients in between).

The active sites are sorted by site number, so image n's are a contiguous run index[starts[n]:starts[n+1]]
(starts found by a searchsorted on the device, no host sync). The reductions give each image the same
number of programs, each one a contiguous part of the image's run; the statistics use the algorithm of
every backend (csrc/common/norm_row.h): shifted sums around a pivot that is one of the summed values,
partials merged with Chan's formula (in float64, here)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import kernel_memory_format, to_kernel_layout
from .common import (KERNEL_DTYPES, TRITON_TYPE, channel_offsets, check_tables, chunk_backward_sums, chunk_moments,
                     f32_table, launch, layout_name, per_channel, register_op, site_offsets, spatial, tile_and,
                     tile_sum)
from . import config
from .config import config_for, table_entries


@triton.jit
def image_part(starts_ptr, PARTS, BLOCK_M: tl.constexpr):
    """(image, first site, end, blocks) of program_id(0)'s part of its image's run of active sites: part q
    of PARTS takes `blocks` blocks of BLOCK_M sites from `first`, clipped at `end`."""
    image = tl.program_id(0) // PARTS
    q = tl.program_id(0) % PARTS
    lo = tl.load(starts_ptr + image)
    hi = tl.load(starts_ptr + image + 1)
    blocks = tl.cdiv(tl.cdiv(hi - lo, BLOCK_M), PARTS)
    first = lo + q * blocks * BLOCK_M
    return image, first, tl.minimum(hi, first + blocks * BLOCK_M), blocks


@triton.jit
def gn_moments_kernel(x_ptr, index_ptr, starts_ptr, partials_ptr, C, HW, PARTS,
                      ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """First stage of the per-(image, channel) statistics over one part of an image's active sites
    (chunk_moments), partials (N * PARTS, 4, C) float32: [count, r, mean - r, M2]."""
    _, first, end, blocks = image_part(starts_ptr, PARTS, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    count, reference, offset, m2 = chunk_moments(x_ptr, index_ptr, first, blocks, end, channel_offsets(c, HW, ROWS),
                                                 c_ok, C, HW, ROWS, BLOCK_M, BLOCK_C)
    out_ptrs = partials_ptr + tl.program_id(0).to(tl.int64) * 4 * C + c
    tl.store(out_ptrs, tl.zeros([BLOCK_C], dtype=tl.float32) + count, mask=c_ok)
    tl.store(out_ptrs + C, reference, mask=c_ok)
    tl.store(out_ptrs + 2 * C, offset, mask=c_ok)
    tl.store(out_ptrs + 3 * C, m2, mask=c_ok)


@triton.jit
def gn_sums_kernel(x_ptr, grad_ptr, center_ptr, index_ptr, starts_ptr, partials_ptr, C, HW, PARTS,
                   ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """First stage of the backward sums over one part of an image's active sites (chunk_backward_sums),
    partials (N * PARTS, 2, C) float32: [sum dy, sum dy * (x - center[image])]."""
    image, first, end, blocks = image_part(starts_ptr, PARTS, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    center = per_channel(tl.load(center_ptr + image.to(tl.int64) * C + c, mask=c_ok, other=0.0), ROWS)
    sum_dy, sum_dy_xmu = chunk_backward_sums(x_ptr, grad_ptr, center, index_ptr, first, blocks, end,
                                             channel_offsets(c, HW, ROWS), c_ok, C, HW, ROWS, BLOCK_M, BLOCK_C)
    out_ptrs = partials_ptr + tl.program_id(0).to(tl.int64) * 2 * C + c
    tl.store(out_ptrs, sum_dy, mask=c_ok)
    tl.store(out_ptrs + C, sum_dy_xmu, mask=c_ok)


@triton.jit
def gn_elemt_kernel(x_ptr, grad_ptr, center_ptr, scale_ptr, shift_ptr, grad_scale_ptr, out_ptr, index_ptr, M, C,
                    HW, BACKWARD: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = (x - center) * scale + shift (+ grad * grad_scale when BACKWARD) at one tile of active sites;
    the coefficients are (N, C) tables, read at each site's image."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sites = tl.load(index_ptr + m, mask=m_ok, other=0)
    offs = tile_sum(site_offsets(sites, C, HW, ROWS), channel_offsets(c, HW, ROWS), ROWS)
    ok = tile_and(m_ok, c_ok, ROWS)
    coef = tile_sum((sites // HW).to(tl.int64) * C, c.to(tl.int64), ROWS)  # image * C + c
    center = tl.load(center_ptr + coef, mask=ok, other=0.0)
    scale = tl.load(scale_ptr + coef, mask=ok, other=0.0)
    shift = tl.load(shift_ptr + coef, mask=ok, other=0.0)
    out = (tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) - center) * scale + shift
    if BACKWARD:
        grad_scale = tl.load(grad_scale_ptr + coef, mask=ok, other=0.0)
        out += tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32) * grad_scale
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def _image_starts(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(N + 1,) int32: image n's active sites are index[starts[n]:starts[n + 1]]."""
    bounds = torch.arange(x.shape[0] + 1, device=index.device, dtype=torch.int64) * (x.shape[2] * x.shape[3])
    return torch.searchsorted(index, bounds.to(torch.int32)).to(torch.int32)


def reduction_grid(n: int, c: int, hw: int, cfg) -> tuple:
    """(parts per image, grid) of the per-image reductions over N images of C channels and H*W sites: about
    config.REDUCTION_PROGRAMS programs in all, never more parts than an image has blocks of sites."""
    channel_blocks = triton.cdiv(c, cfg.block_c)
    parts = max(1, min(triton.cdiv(hw, cfg.block_m), config.REDUCTION_PROGRAMS // (n * channel_blocks)))
    return parts, (n * parts, channel_blocks)


def _moments(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
    layout = layout_name(x)
    cfg = config_for("gn", layout, c)
    parts, grid = reduction_grid(n, c, hw, cfg)
    partials = x.new_empty((n * parts, 4, c), dtype=torch.float32)
    launch(gn_moments_kernel, grid, x, index, _image_starts(x, index), partials, c, hw, parts,
           ROWS=layout == "rows", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    # Chan's merge of each image's parts in float64 (an empty part carries nothing).
    p = partials.view(n, parts, 4, c).to(torch.float64)
    count, mean, m2 = p[:, :, 0], p[:, :, 1] + p[:, :, 2], p[:, :, 3]
    seen = count > 0
    image_mean = torch.where(seen, count * mean, 0.0).sum(1) / count.sum(1).clamp_min(1)
    deviation = torch.where(seen, mean - image_mean[:, None], 0.0)
    image_m2 = torch.where(seen, m2 + count * deviation * deviation, 0.0).sum(1)
    return torch.stack([image_mean, image_m2], dim=1)


def _backward_sums(x: torch.Tensor, grad_out: torch.Tensor, center: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    hw = x.shape[2] * x.shape[3]
    layout = layout_name(x)
    cfg = config_for("gn", layout, c)
    parts, grid = reduction_grid(n, c, hw, cfg)
    partials = x.new_empty((n * parts, 2, c), dtype=torch.float32)
    launch(gn_sums_kernel, grid, x, grad_out, center, index, _image_starts(x, index), partials, c, hw, parts,
           ROWS=layout == "rows", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return partials.view(n, parts, 2, c).to(torch.float64).sum(1)


def _elemt(x, grad_out, index, center, scale, shift, grad_scale, backward: bool) -> torch.Tensor:
    out = torch.zeros_like(x, memory_format=kernel_memory_format(x))
    c, hw = spatial(x)
    m = index.shape[0]
    if m == 0:
        return out
    layout = layout_name(x)
    cfg = config_for("gn", layout, c)
    launch(gn_elemt_kernel, (triton.cdiv(m, cfg.block_m), triton.cdiv(c, cfg.block_c)),
           x, grad_out, center, scale, shift, grad_scale, out, index, m, c, hw, BACKWARD=backward,
           ROWS=layout == "rows", BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return out



@register_op
def gn_stats(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    return _moments(to_kernel_layout(x, x), index)


@register_op
def gn_backward_stats(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor,
                      center: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    grad_out = to_kernel_layout(grad_out.to(x.dtype), x)
    return _backward_sums(x, grad_out, f32_table(center), index)


@register_op
def gn_elemt(x: torch.Tensor, index: torch.Tensor, center: torch.Tensor, scale: torch.Tensor,
             shift: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    scale = f32_table(scale)
    return _elemt(x, x, index, f32_table(center), scale, f32_table(shift), scale, backward=False)


@register_op
def gn_backward_elemt(grad_out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, center: torch.Tensor,
                      a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    check_tables(x, index)
    x = to_kernel_layout(x, x)
    grad_out = to_kernel_layout(grad_out.to(x.dtype), x)
    # grad_out * a + (x - center) * b + d
    return _elemt(x, grad_out, index, f32_table(center), f32_table(b), f32_table(d), f32_table(a),
                  backward=True)


def compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the launch code above can pick (compile check)."""
    for dtype in KERNEL_DTYPES:
        t = f"*{TRITON_TYPE[dtype]}"
        moments = {"x_ptr": t, "index_ptr": "*i32", "starts_ptr": "*i32", "partials_ptr": "*fp32", "C": "i32",
                   "HW": "i32", "PARTS": "i32"}
        sums = {"x_ptr": t, "grad_ptr": t, "center_ptr": "*fp32", "index_ptr": "*i32", "starts_ptr": "*i32",
                "partials_ptr": "*fp32", "C": "i32", "HW": "i32", "PARTS": "i32"}
        elemt = {"x_ptr": t, "grad_ptr": t, "center_ptr": "*fp32", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
                 "grad_scale_ptr": "*fp32", "out_ptr": t, "index_ptr": "*i32", "M": "i32", "C": "i32", "HW": "i32"}
        for layout, cfg in table_entries("gn"):
            base = {"ROWS": layout == "rows", "BLOCK_M": cfg.block_m, "BLOCK_C": cfg.block_c}
            for kernel, signature, flags in ((gn_moments_kernel, moments, ({},)), (gn_sums_kernel, sums, ({},)),
                                             (gn_elemt_kernel, elemt, ({"BACKWARD": False}, {"BACKWARD": True}))):
                for flag in flags:
                    constexprs = {**flag, **base}
                    yield kernel, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs, cfg.num_warps
