"""Pieces shared by the Triton kernels: tile addressing in both layouts, the partial-sum reduce kernel,
launch helpers and op registration.

Tiles are 2-D: [sites, channels] in the "rows" layout (channels fastest, the contiguous direction) and
[channels, sites] in the "planes" layout (sites fastest); the helpers below hide the orientation, so
each kernel is written once for both layouts with a ``ROWS`` constexpr.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch.cuda import is_available as cuda_available
from torch.library import triton_op, wrap_triton

from .._layout import uses_rows
from .._registry import primitive
from .config import REDUCE_CONFIG

# Decided once, when the kernels are first loaded (triton.jit reads it at decoration time too).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Input dtypes the kernels take (statistics and accumulation are float32).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


# -- tile addressing ---------------------------------------------------------------------------------
def f32_table(t: torch.Tensor) -> torch.Tensor:
    """A per-channel (or per-(image, channel)) coefficient table as the kernels read it: contiguous float32."""
    return t.to(torch.float32).contiguous()


@triton.jit
def site_offsets(sites, C, HW, ROWS: tl.constexpr):
    """Element offset of channel 0 of each flat site number n*HW + hw (int64)."""
    s = sites.to(tl.int64)
    if ROWS:
        off = s * C
    else:
        off = s + (s // HW) * HW * (C - 1)  # n*C*HW + hw
    return off


@triton.jit
def channel_offsets(channels, HW, ROWS: tl.constexpr):
    if ROWS:
        off = channels.to(tl.int64)
    else:
        off = channels.to(tl.int64) * HW
    return off


@triton.jit
def tile_sum(per_site, per_channel, ROWS: tl.constexpr):
    """Outer sum of a per-site and a per-channel vector, in the layout's tile orientation."""
    if ROWS:
        t = per_site[:, None] + per_channel[None, :]
    else:
        t = per_channel[:, None] + per_site[None, :]
    return t


@triton.jit
def tile_and(site_ok, channel_ok, ROWS: tl.constexpr):
    if ROWS:
        t = site_ok[:, None] & channel_ok[None, :]
    else:
        t = channel_ok[:, None] & site_ok[None, :]
    return t


@triton.jit
def per_channel(v, ROWS: tl.constexpr):
    """A per-channel vector broadcastable against a tile."""
    if ROWS:
        t = v[None, :]
    else:
        t = v[:, None]
    return t


@triton.jit
def per_site(v, ROWS: tl.constexpr):
    if ROWS:
        t = v[:, None]
    else:
        t = v[None, :]
    return t


@triton.jit
def sum_over_sites(t, ROWS: tl.constexpr):
    if ROWS:
        s = tl.sum(t, axis=0)
    else:
        s = tl.sum(t, axis=1)
    return s


@triton.jit
def sum_over_channels(t, ROWS: tl.constexpr):
    if ROWS:
        s = tl.sum(t, axis=1)
    else:
        s = tl.sum(t, axis=0)
    return s


@triton.jit
def site_tile(index_ptr, m, c_off, c_ok, M, C, HW, ROWS: tl.constexpr):
    """A tile of active sites (positions m of the index) x channels (offsets c_off, valid c_ok): the
    element offsets, the tile's mask and the sites' mask."""
    m_ok = m < M
    sites = tl.load(index_ptr + m, mask=m_ok, other=0)
    return tile_sum(site_offsets(sites, C, HW, ROWS), c_off, ROWS), tile_and(m_ok, c_ok, ROWS), m_ok


@triton.jit
def zero_tile(BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    if ROWS:
        t = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    else:
        t = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float32)
    return t


# -- first stage of the norms' reductions -------------------------------------------------------------
@triton.jit
def chunk_moments(x_ptr, index_ptr, first, blocks, end, c_off, c_ok, C, HW,
                  ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Statistics of x over the active sites at index positions [first, min(end, first + blocks * BLOCK_M)),
    per channel: (count, r, mean - r, M2). Each lane (one site row of the tile, one channel) sums d = x - p
    and d^2 around its own first value p; the lanes are merged with Chan's formula relative to r, the pivot
    of the chunk's first site (r and mean - r are 0 for an empty chunk)."""
    lane = tl.arange(0, BLOCK_M)
    offs, ok, _ = site_tile(index_ptr, first + lane, c_off, c_ok, end, C, HW, ROWS)
    pivot = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s1 = zero_tile(BLOCK_M, BLOCK_C, ROWS)
    s2 = zero_tile(BLOCK_M, BLOCK_C, ROWS)
    for b in range(1, blocks):
        offs, ok, _ = site_tile(index_ptr, first + b * BLOCK_M + lane, c_off, c_ok, end, C, HW, ROWS)
        xv = tl.load(x_ptr + offs, mask=ok, other=0.0)
        d = tl.where(ok, xv.to(tl.float32) - pivot, 0.0)
        s1 += d
        s2 += d * d
    # The sites of lane l: the blocks b < blocks with first + b * BLOCK_M + l < end.
    lane_count = tl.minimum((tl.maximum(end - first - lane, 0) + BLOCK_M - 1) // BLOCK_M, blocks)
    n = per_site(lane_count.to(tl.float32), ROWS)
    safe_n = tl.maximum(n, 1.0)
    reference = sum_over_sites(tl.where(per_site(lane == 0, ROWS), pivot, 0.0), ROWS)
    lane_offset = (pivot - per_channel(reference, ROWS)) + s1 / safe_n
    lane_m2 = s2 - s1 * s1 / safe_n
    lane_m2 = tl.where(lane_m2 < 0, 0.0, lane_m2)  # rounding below 0; a NaN stays NaN
    count = tl.sum(lane_count.to(tl.float32), axis=0)
    offset = sum_over_sites(n * lane_offset, ROWS) / tl.maximum(count, 1.0)
    deviation = tl.where(n > 0, lane_offset - per_channel(offset, ROWS), 0.0)
    return count, reference, offset, sum_over_sites(lane_m2 + n * deviation * deviation, ROWS)


@triton.jit
def chunk_backward_sums(x_ptr, grad_ptr, center, index_ptr, first, blocks, end, c_off, c_ok, C, HW,
                        ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """(sum dy, sum dy * (x - center)) per channel over the same chunk of active sites as chunk_moments;
    center is a per-channel tile (x is centred: no cancellation to guard against)."""
    acc0 = zero_tile(BLOCK_M, BLOCK_C, ROWS)
    acc1 = zero_tile(BLOCK_M, BLOCK_C, ROWS)
    for b in range(0, blocks):
        offs, ok, _ = site_tile(index_ptr, first + b * BLOCK_M + tl.arange(0, BLOCK_M), c_off, c_ok, end, C, HW,
                                ROWS)
        xv = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        acc0 += g
        acc1 += g * (xv - center)
    return sum_over_sites(acc0, ROWS), sum_over_sites(acc1, ROWS)


# -- second stage of every reduction -------------------------------------------------------------------
@triton.jit
def reduce_partials_kernel(partials_ptr, out_ptr, P, L, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[l] = sum over p of partials[p, l] (partials float32, (P, L) contiguous), accumulated in out's
    dtype (float32 or float64)."""
    cols = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols_ok = cols < L
    acc = tl.zeros([BLOCK_P, BLOCK_L], dtype=out_ptr.dtype.element_ty)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ptrs = partials_ptr + rows.to(tl.int64)[:, None] * L + cols[None, :]
        acc += tl.load(ptrs, mask=(rows < P)[:, None] & cols_ok[None, :], other=0.0).to(acc.dtype)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=cols_ok)


REDUCE_OUT_DTYPES = (torch.float32, torch.float64)


def reduce_compile_configs():
    cfg = REDUCE_CONFIG
    for dtype in REDUCE_OUT_DTYPES:
        signature = {"partials_ptr": "*fp32", "out_ptr": f"*{TRITON_TYPE[dtype]}", "P": "i32", "L": "i32",
                     "BLOCK_P": "constexpr", "BLOCK_L": "constexpr"}
        yield reduce_partials_kernel, signature, {"BLOCK_P": cfg.block_m, "BLOCK_L": cfg.block_c}, cfg.num_warps


def reduce_partials(partials: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(P, *shape) float32 partial sums -> shape, summed over P in out_dtype."""
    p = partials.shape[0]
    out = partials.new_empty(partials.shape[1:], dtype=out_dtype)
    length = out.numel()
    cfg = REDUCE_CONFIG
    launch(reduce_partials_kernel, (triton.cdiv(length, cfg.block_c),),
           partials, out, p, length, BLOCK_P=cfg.block_m, BLOCK_L=cfg.block_c, num_warps=cfg.num_warps)
    return out


# -- launch helpers -------------------------------------------------------------------------------------
def tensor_device_guard(args):
    """A context in which the CUDA device of the tensors among args is current: Triton launches on the
    current device and its current stream, so a launch on tensors of another device would read them at
    addresses of the wrong device, unordered with the work queued on theirs. Nothing to do for CPU tensors
    (the interpreter) or on a machine without CUDA (fake tensors while tracing)."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"a Triton kernel's tensors must all be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" or not cuda_available():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on the device of its tensor arguments; every launch goes through here."""
    with tensor_device_guard(args):
        wrap_triton(kernel)[grid](*args, **kwargs)


def site_programs(num_sites: int, block_m: int, max_programs: int, channel_blocks: int = 1):
    """(programs, site blocks per program) for a two-stage reduction over num_sites >= 1 sites: at most
    max_programs programs in all over the channel_blocks blocks of channels."""
    blocks = triton.cdiv(num_sites, block_m)
    per_program = triton.cdiv(blocks, min(blocks, max(1, max_programs // channel_blocks)))
    return triton.cdiv(blocks, per_program), per_program


def layout_name(x: torch.Tensor) -> str:
    return "rows" if uses_rows(x) else "planes"


def spatial(x: torch.Tensor):
    """(C, H*W) of a logically NCHW tensor."""
    return x.shape[1], x.shape[2] * x.shape[3]


def check_tables(x: torch.Tensor, index: torch.Tensor, neighbors: Optional[torch.Tensor] = None,
                 kernel_size: int = 0, num_sites: Optional[int] = None, names=("index", "neighbors")) -> None:
    """The site tables must be the int32 tables of spark_kernels._sites for x (values are trusted: they
    come from ActiveSites; checking them would cost a device sync). num_sites: the sites index numbers
    (x's N*H*W unless given: a strided conv's index numbers its output sites)."""
    if x.dim() != 4 or x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x must be a 4-D float32/float16/bfloat16 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    index_name, table_name = names
    if index.dtype != torch.int32 or index.dim() != 1 or not index.is_contiguous() or index.device != x.device:
        raise ValueError(f"{index_name} must be a contiguous 1-D int32 tensor on {x.device}, got {index.dtype} "
                         f"{tuple(index.shape)} on {index.device}")
    num_sites = x.shape[0] * x.shape[2] * x.shape[3] if num_sites is None else num_sites
    if index.shape[0] > num_sites:
        raise ValueError(f"{index_name} has {index.shape[0]} sites but there are only {num_sites}")
    if neighbors is not None:
        want = (index.shape[0], kernel_size * kernel_size)
        if (neighbors.dtype != torch.int32 or tuple(neighbors.shape) != want or not neighbors.is_contiguous()
                or neighbors.device != x.device):
            raise ValueError(f"{table_name} must be a contiguous int32 tensor of shape {want} on {x.device}, got "
                             f"{neighbors.dtype} {tuple(neighbors.shape)} on {neighbors.device}")


def register_op(fn: Callable) -> Callable:
    """Register fn, the implementation of the op registry's primitive of its name, as the custom op
    spark_kernels::triton_<name>.

    On GPUs it is a ``triton_op`` (torch.compile sees and schedules the Triton kernels inside it). The
    interpreter's kernels are plain Python that torch.compile cannot trace, so there it is an opaque
    ``custom_op`` with the registry's fake implementation.
    """
    qualname = f"spark_kernels::triton_{fn.__name__}"
    if INTERPRET:
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(primitive(fn.__name__).fake)
        return op
    return triton_op(qualname, mutates_args=())(fn)

