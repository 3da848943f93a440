"""What every benchmark shares: the shapes of DESIGN.md section 6, timing, and the environment record."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

# (channels, spatial size, SparK patch size in pixels at that scale) per stage, batch 32, ratio 0.6.
CONVNEXT_T_STAGES = [(96, 56, 8), (192, 28, 4), (384, 14, 2), (768, 7, 1)]
RESNET50_STAGES = [(256, 56, 8), (512, 28, 4), (1024, 14, 2), (2048, 7, 1)]
BATCH = 32
MASK_RATIO = 0.6
THREADS = 2

# DESIGN.md section 6: minimum speedup of the fused op over the reference, forward + backward.
TARGETS = {"dwconv7": 3.0, "dwconv3": 2.0, "batch_norm": 2.0, "layer_norm_cf": 2.0, "layer_norm_cl": 2.0}


def allocator() -> str:
    """Which malloc this process runs on: tcmalloc/jemalloc when preloaded, else glibc."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in maps:
            return name
    return "glibc malloc"


def environment() -> Dict[str, object]:
    import triton  # noqa: F401 - version record only
    return {
        "machine": platform.machine(), "cpu": _cpu_name(), "cores": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "triton": getattr(__import__("triton"), "__version__", "?"), "python": platform.python_version(),
        "allocator": allocator(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median and spread (seconds) of fn over `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}
