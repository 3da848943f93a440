"""Launch model of the Triton kernels at H100/H200 scale (132 SMs), at the benchmark shapes (ConvNeXt-T stages,
ResNet-50 stages for BN, EfficientNet-B0's depthwise shapes for 5x5 and stride 2, batch 256, 40% active): per kernel, the programs per SM (from the dispatcher's own
launch code), the serial chain of dependent global loads per program and the re-read factor of each input
(from the kernel's loop structure, stated next to each kernel), each under a stated bound. GroupNorm is modelled
at the ResNet-50 stage shapes."""
from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton")

from spark_kernels.triton import config  # noqa: E402
from spark_kernels.triton.common import site_programs  # noqa: E402
from spark_kernels.triton.group_norm import reduction_grid  # noqa: E402

from bench.common import CONVNEXT_T_STAGES, EFFICIENTNET_B0_DW_STAGES, RESNET50_STAGES  # noqa: E402

BATCH, ACTIVE = 256, 0.4
SMS = config.GPU_SMS
# Bounds.
MIN_PROGRAMS_PER_SM = 2          # a tile kernel fills every SM at least twice (load balance, latency hiding)
MIN_REDUCTION_WAVES = 1.0        # site-chunked reductions: at least one full wave of resident programs
MIN_WGRAD_PROGRAMS_PER_SM = 4    # the conv weight gradient: a full wave (~4 resident per SM by registers), 8 by design
MAX_SERIAL_LOADS = 4             # dependent global loads in a row per program (index -> data, no longer chains)
MAX_REREAD = {"norm": 1.0, "dwconv_grad_out": 1.0}  # loads per needed element of a streamed input


@dataclass
class Launch:
    kernel: str
    shape: str
    programs: int
    serial_loads: int
    reread: float
    reduction: bool


def _dwconv_launches(channels, size, k, stride):
    out = []
    shape = f"{channels}@{size}"
    name = f"dwconv{k}" + (f"s{stride}" if stride > 1 else "")
    m_in = int(BATCH * size * size * ACTIVE)
    m_out = int(BATCH * (-(-size // stride)) ** 2 * ACTIVE)  # active output sites (SparK masks: exact)
    cfg = config.config_for("dwconv", "rows", channels)
    channel_blocks = (channels + cfg.block_c - 1) // cfg.block_c
    # dwconv_taps_kernel: no loop; static chunks of taps, each one load of the tile's neighbour indices
    # then one gather of the rows they point to (no load waits for another tap's): neighbour -> input. It runs
    # over the output sites (forward) and, at stride 2, over the input sites (input gradient).
    for m in sorted({m_out, m_in if stride > 1 else m_out}):
        out.append(Launch(f"{name}_taps", f"{shape} M={m}", (m + cfg.block_m - 1) // cfg.block_m * channel_blocks,
                          2, 1.0, False))
    wcfg = config.config_for("dwconv_wgrad", "rows", channels)
    blocks = (channels + wcfg.block_c - 1) // wcfg.block_c
    programs, per = site_programs(m_out, wcfg.block_m, config.wgrad_programs(torch.device("cpu")), blocks)
    # dwconv_wgrad_kernel: site blocks in a loop whose loads do not depend on each other, all taps a
    # tile dimension: per block index -> grad_out (read once) and neighbour block -> x.
    out.append(Launch(f"{name}_wgrad", shape, programs * blocks, 2, 1.0, True))
    return out


def _launches():
    out = []
    for channels, size, _ in EFFICIENTNET_B0_DW_STAGES:
        for k, stride in ((5, 1), (3, 2), (5, 2)):
            out += _dwconv_launches(channels, size, k, stride)
    for channels, size, _ in CONVNEXT_T_STAGES:
        m = int(BATCH * size * size * ACTIVE)
        shape = f"{channels}@{size}"
        for k in (3, 7):
            out += _dwconv_launches(channels, size, k, 1)
        for family in ("bn", "ln"):
            cfg = config.config_for(family, "rows", channels)
            blocks = (channels + cfg.block_c - 1) // cfg.block_c
            elementwise = (m + cfg.block_m - 1) // cfg.block_m * (blocks if family == "bn" else 1)
            # bn_elemt / ln_forward: one tile, index -> x.
            out.append(Launch(f"{family}_tile", shape, elementwise, 2, 1.0, False))
            programs, _ = site_programs(m, cfg.block_m, config.REDUCTION_PROGRAMS, blocks if family == "bn" else 1)
            # bn_moments / bn_sums / ln_backward: site blocks in a loop whose loads do not depend on each other:
            # index -> x (and grad_out) per block.
            out.append(Launch(f"{family}_reduction", shape, programs * (blocks if family == "bn" else 1), 2, 1.0, True))
    for channels, size, _ in RESNET50_STAGES:
        m = int(BATCH * size * size * ACTIVE)
        cfg = config.config_for("bn", "rows", channels)
        blocks = (channels + cfg.block_c - 1) // cfg.block_c
        programs, _ = site_programs(m, cfg.block_m, config.REDUCTION_PROGRAMS, blocks)
        out.append(Launch("bn_reduction", f"{channels}@{size}", programs * blocks, 2, 1.0, True))
        # GroupNorm (32 groups) at the same shapes: gn_elemt is one tile, index -> x and the image's coefficients.
        gcfg = config.config_for("gn", "rows", channels)
        tiles = (m + gcfg.block_m - 1) // gcfg.block_m * ((channels + gcfg.block_c - 1) // gcfg.block_c)
        out.append(Launch("gn_tile", f"{channels}@{size}", tiles, 2, 1.0, False))
        # gn_moments / gn_sums: image starts -> index -> x (and grad_out) per block, blocks independent.
        _, grid = reduction_grid(BATCH, channels, size * size, gcfg)
        out.append(Launch("gn_reduction", f"{channels}@{size}", grid[0] * grid[1], 3, 1.0, True))
    return out


LAUNCHES = _launches()
PARAMS = [pytest.param(launch, id=f"{launch.kernel}-{launch.shape}") for launch in LAUNCHES]


@pytest.mark.parametrize("launch", PARAMS)
def test_programs_fill_the_gpu(launch):
    if launch.reduction:
        waves = launch.programs / (SMS * config.RESIDENT_PROGRAMS_PER_SM)
        wgrad = launch.kernel.endswith("wgrad")  # fewer, larger programs (its partials are (K*K + 1) * C each)
        assert launch.programs / SMS >= MIN_WGRAD_PROGRAMS_PER_SM if wgrad else waves >= MIN_REDUCTION_WAVES, launch
    else:
        assert launch.programs / SMS >= MIN_PROGRAMS_PER_SM, launch


@pytest.mark.parametrize("launch", PARAMS)
def test_serial_dependent_loads_per_program(launch):
    assert launch.serial_loads <= MAX_SERIAL_LOADS, launch


@pytest.mark.parametrize("launch", PARAMS)
def test_reread_factor(launch):
    bound = MAX_REREAD["dwconv_grad_out" if "wgrad" in launch.kernel else "norm"]
    if launch.kernel.endswith("taps"):
        # Each input row is gathered by each active neighbour: K*K loads, served by L1/L2 (inherent to a gather).
        bound = float(int(launch.kernel[6]) ** 2)
    assert launch.reread <= bound, launch
