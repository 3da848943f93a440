"""Launch parameters of every Triton kernel: the one table the dispatcher reads.

No autotuning: a kernel's block sizes and warp count are picked from this table by (kernel family,
layout, channel count). The compile check (tests/test_triton_compile.py) compiles every entry for
sm_80 and sm_90, so nothing can be dispatched that was not checked for register spills and shared
memory. The values are starting points chosen for memory coalescing and register budget; tuning them
needs a GPU (docs/triton.md).

Layouts (spark_kernels/_layout.py): "rows" = channels_last, C contiguous values per site, so a tile
spans many channels (lanes along channels, coalesced); "planes" = NCHW, consecutive active sites of a
channel are contiguous, so a tile spans many sites (lanes along sites) and few channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Tuple

import torch

LAYOUTS = ("rows", "planes")
# Reductions (conv weight gradient, BN statistics, LN parameter gradients) run in two stages: programs along
# the sites each write one partial row, then one kernel reduces the rows. Their program counts come from
# the GPU design point, an H100/H200 with 132 SMs: the BN and LN reductions (4 warps a program, 16 resident
# per SM) get two full waves. The conv weight gradient takes the SM count of the GPU it runs on (the design
# point where none is visible: the interpreter, tracing) times a few waves of its programs, which hold a
# [sites, taps, channels] accumulator each (~4 resident per SM by registers), so that its (K*K + 1) * C
# partials per program stay small next to its inputs.
GPU_SMS = 132
RESIDENT_PROGRAMS_PER_SM = 16
REDUCTION_PROGRAMS = GPU_SMS * RESIDENT_PROGRAMS_PER_SM * 2
WGRAD_PROGRAMS_PER_SM = 4 * 2
# The depthwise conv forward / input gradient gathers its K*K taps in static chunks of this many taps
# (a power of two <= 32; the remainder in power-of-two pieces): a [sites, taps, channels] tile per chunk.
DWCONV_TAP_CHUNK = 16


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA device (GPU_SMS where no GPU is visible)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return GPU_SMS


def wgrad_programs(device: torch.device) -> int:
    """Programs of the depthwise conv weight gradient's first stage, over all channel blocks."""
    return sm_count(device) * WGRAD_PROGRAMS_PER_SM


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int    # active sites per tile
    block_c: int    # channels per tile
    num_warps: int


# family -> layout -> ((largest channel count served, config), ...), ascending; the last row serves
# every larger C (the kernels loop over channel blocks through the grid), except for "ln", which
# holds a whole site's channels in one tile and so has a hard upper bound on C.
_TABLE: Dict[str, Dict[str, Tuple[Tuple[int, LaunchConfig], ...]]] = {
    # depthwise conv forward and input gradient: one tile of sites x channels, K*K gathered taps in chunks of
    # DWCONV_TAP_CHUNK. 32 channels a tile: every ConvNeXt width (96 * 2^i) fills its lanes.
    "dwconv": {
        "rows": ((1 << 30, LaunchConfig(4, 32, 4)),),
        "planes": ((1 << 30, LaunchConfig(32, 4, 4)),),
    },
    # depthwise conv weight/bias gradient: per program a run of site blocks, all taps (padded to a power of
    # two, the bias in the pad) as the middle dimension of one [sites, taps, channels] accumulator.
    "dwconv_wgrad": {
        "rows": ((1 << 30, LaunchConfig(2, 32, 4)),),
        "planes": ((1 << 30, LaunchConfig(32, 2, 4)),),
    },
    # BN sums (forward and backward) and BN per-channel affine maps.
    "bn": {
        "rows": ((32, LaunchConfig(32, 32, 4)), (64, LaunchConfig(16, 64, 4)), (1 << 30, LaunchConfig(8, 128, 4))),
        "planes": ((1 << 30, LaunchConfig(128, 4, 4)),),
    },
    # GN per-(image, channel) sums and affine maps: the same tiles as BN's (set below).
    # LN forward and backward: a tile holds whole sites (block_c >= C). Planes at C <= 1024 take 4 warps:
    # at 8, ptxas caps the backward at 64 registers and the bf16 one needs a stack frame on sm_90 (the
    # correctly rounded division's slow path).
    "ln": {
        "rows": ((64, LaunchConfig(16, 64, 4)), (128, LaunchConfig(8, 128, 4)), (256, LaunchConfig(4, 256, 4)),
                 (512, LaunchConfig(2, 512, 4)), (1024, LaunchConfig(1, 1024, 4)), (2048, LaunchConfig(1, 2048, 8)),
                 (4096, LaunchConfig(1, 4096, 16))),
        "planes": ((64, LaunchConfig(8, 64, 4)), (128, LaunchConfig(4, 128, 4)), (256, LaunchConfig(2, 256, 4)),
                   (512, LaunchConfig(1, 512, 4)), (1024, LaunchConfig(1, 1024, 4)), (2048, LaunchConfig(1, 2048, 8)),
                   (4096, LaunchConfig(1, 4096, 16))),
    },
}
_TABLE["gn"] = _TABLE["bn"]
# Sums per-program partial rows into the final per-channel result (layout-independent).
REDUCE_CONFIG = LaunchConfig(8, 128, 4)
# Merges the per-program BN moments (float64; block_m partial rows x block_c channels per step).
MERGE_CONFIG = LaunchConfig(8, 64, 4)
LN_MAX_CHANNELS = _TABLE["ln"]["rows"][-1][0]


def config_for(family: str, layout: str, channels: int) -> LaunchConfig:
    for bound, config in _TABLE[family][layout]:
        if channels <= bound:
            return config
    raise ValueError(f"the Triton {family} kernels support at most {LN_MAX_CHANNELS} channels, got {channels}")


def table_entries(family: str) -> Iterator[Tuple[str, LaunchConfig]]:
    """Every (layout, config) the dispatcher can pick for a family (for the compile check)."""
    for layout in LAYOUTS:
        for _, config in _TABLE[family][layout]:
            yield layout, config
