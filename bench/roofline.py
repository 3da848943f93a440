"""Physical limits: this machine's compute and memory-bandwidth bounds, and each op's roofline time.

The roofline time of an op is max(FLOPs / peak FLOP/s, bytes / peak bytes/s) for the least work and
traffic any implementation of the contract needs: inputs are read at active sites only, dense outputs
are written in full (the contract returns dense tensors with exact zeros at inactive sites),
per-channel parameters and index tables are neglected. An element takes its dtype's bytes (4 for float32, 2 for
bfloat16); an expanded grad_out (one value, every stride 0: what y.sum().backward() gives) is not read as a
tensor, so its bytes do not count.
"""
from __future__ import annotations

from typing import Dict

import torch

from .common import BENCH_CASES, median_time

STREAM_BYTES = 4  # the machine's bandwidth is measured on float32 arrays

# Per active element (site x channel): FLOPs of the forward and of the backward pass, and how many
# tensors of the input's size are read at active sites (grad_out being one of the backward's reads) and written
# densely. Norm FLOPs count the
# statistics and the affine map (mean, variance, normalize, scale, shift and their gradients).
# dwconv k: forward 2k² per active OUTPUT element; backward 2k² for grad_x and 2k² for grad_weight (reading
# the active input and grad_out, writing grad_x densely); at stride 2 the output has a quarter of the sites.
_COSTS = {
    "dwconv": {"forward": {"flops_per_tap": 2}, "backward": {"flops_per_tap": 4}},
    "norm": {"forward": {"flops": 7, "reads": 1, "writes": 1},
             "backward": {"flops": 10, "reads": 2, "writes": 1}},
}


def op_cost(op: str, channels: int, size: int, batch: int, active_fraction: float, backward: bool,
            dtype: torch.dtype = torch.float32, grad_out: str = "random") -> Dict[str, float]:
    """FLOPs and bytes of the least work `op` (a key of BENCH_CASES) needs, forward or forward + backward, with
    activations in dtype and the grad_out variant of bench/ops.py (GRAD_OUTS)."""
    element = dtype.itemsize
    grad_reads = 0 if grad_out == "expanded" else 1  # tensors of grad_out's size read at active sites
    sites = batch * size * size
    active = channels * sites * active_fraction  # active elements
    dense = channels * sites
    passes = ("forward", "backward") if backward else ("forward",)
    flops = bytes_ = 0.0
    variant = BENCH_CASES[op][1]
    if variant.kernel_size is not None:
        k, stride = variant.kernel_size, variant.stride
        out_dense = channels * batch * (-(-size // stride)) ** 2
        out_active = out_dense * active_fraction  # exact for SparK masks whose patches the stride divides
        for pass_ in passes:
            flops += _COSTS["dwconv"][pass_]["flops_per_tap"] * k * k * out_active
        bytes_ = element * (active + out_dense)  # forward: read x, write y
        if backward:
            bytes_ += element * (grad_reads * out_active + active + dense)  # read grad_out and x, write grad_x
        return {"flops": flops, "bytes": bytes_}
    for pass_ in passes:
        c = _COSTS["norm"][pass_]
        reads = c["reads"] - (1 - grad_reads if pass_ == "backward" else 0)
        flops += c["flops"] * active
        bytes_ += element * (reads * active + c["writes"] * dense)
    return {"flops": flops, "bytes": bytes_}


def roofline_time(cost: Dict[str, float], bounds: Dict[str, float]) -> float:
    return max(cost["flops"] / bounds["flops_per_s"], cost["bytes"] / bounds["bytes_per_s"])


def measure_machine(repeats: int = 5, gemm_size: int = 2048, stream_elements: int = 1 << 25) -> Dict[str, float]:
    """Peak fp32 FLOP/s (a square GEMM) and memory bandwidth (STREAM copy and triad on arrays well
    beyond the last-level cache), with the threads torch runs on."""
    a = torch.randn(gemm_size, gemm_size)
    b = torch.randn(gemm_size, gemm_size)
    c = torch.empty(gemm_size, gemm_size)
    gemm = median_time(lambda: torch.mm(a, b, out=c), repeats)
    flops = 2 * gemm_size ** 3 / gemm["median"]
    x = torch.randn(stream_elements)
    y = torch.randn(stream_elements)
    z = torch.empty(stream_elements)
    copy = median_time(lambda: z.copy_(x), repeats)
    triad = median_time(lambda: torch.add(x, y, alpha=3.0, out=z), repeats)
    copy_bw = 2 * STREAM_BYTES * stream_elements / copy["median"]
    triad_bw = 3 * STREAM_BYTES * stream_elements / triad["median"]
    return {"flops_per_s": flops, "copy_bytes_per_s": copy_bw, "triad_bytes_per_s": triad_bw,
            "bytes_per_s": max(copy_bw, triad_bw), "gemm_size": gemm_size,
            "stream_bytes": STREAM_BYTES * stream_elements}
