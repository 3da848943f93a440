"""What every benchmark shares: the shapes of docs/design.md section 6, timing, and the environment record."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

from spark.families import bench_stages
from spark_kernels._registry import VARIANTS, group_norm_case_groups

# (channels, spatial size, SparK patch size in pixels at that scale) per stage, batch 32, ratio 0.6, by timm
# name: one column of the model-family table (spark/families.py).
STAGES = {name: list(stages) for name, stages in bench_stages().items()}
CONVNEXT_T_STAGES = STAGES["convnext_tiny"]
RESNET50_STAGES = STAGES["resnet50"]
EFFICIENTNET_B0_DW_STAGES = STAGES["efficientnet_b0"]
BATCH = 32
MASK_RATIO = 0.6
THREADS = 2

# docs/design.md section 6: minimum speedup of the fused op over the reference, forward + backward, the
# speedups at which the CPU kernels reach half of the machine's roofline (group_norm, which section 6 does not
# list, is held to the other norms' target).
TARGETS = {"dwconv7": 6.0, "dwconv3": 2.5, "batch_norm": 2.5, "layer_norm_cf": 2.5, "layer_norm_cl": 2.5,
           "group_norm": 2.5}
# The benchmarked ops: the op registry's test cases that have a benchmark name (op spec, variant) by that name.
BENCH_CASES = {v.bench_name: (op, v) for op, v in VARIANTS.values() if v.bench_name}
if not set(TARGETS) <= set(BENCH_CASES):
    raise RuntimeError(f"bench targets {sorted(TARGETS)} are not all in the op registry's {sorted(BENCH_CASES)}")
# Benchmarked ops without a design target (the 5x5 and strided depthwise convs), measured at the shapes of the
# networks that have them.
UNTARGETED_OPS = tuple(name for name in BENCH_CASES if name not in TARGETS)
# The ops measured at each network's stages.
NET_OPS = {"convnext_tiny": tuple(TARGETS), "resnet50": tuple(TARGETS), "efficientnet_b0": UNTARGETED_OPS}
# GroupNorm's groups at the benchmark shapes: those of the registry's case (32, fewer where C has fewer).
group_norm_groups = group_norm_case_groups

# docs/design.md section 6: minimum images/s ratio of the fused SparK training step over the reference model,
# with peak memory no higher (ResNet-50: "faster, never slower").
MODEL_TARGETS = {"convnext_tiny": 1.5, "resnet50": 1.0}


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
        "allocator": allocator(), "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "malloc_conf": os.environ.get("MALLOC_CONF", ""),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "load_average": list(os.getloadavg()),
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


def _summary(times: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": len(times)}


def _minor_faults() -> int:
    """Minor page faults of this process so far: first touches of freshly mapped memory (see docs/bench.md)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median and spread (seconds) of fn over `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _summary(times)


def interleaved_times(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      budget_s: float = float("inf")) -> Dict[str, Dict[str, object]]:
    """Median and spread (seconds) of each fn, timed in alternation so that a change in machine load
    hits every contender alike.

    Every fn gets `warmup` untimed calls (the first one's duration is kept as "first_call_s": it
    includes torch.compile's compilation), then up to `repeats` timed calls; a fn stops early once its
    timed calls add up to `budget_s` (at least one timed call). A fn that raises is recorded as
    {"error": ...} and dropped. "minor_faults" is the median count of page faults per timed call.
    """
    out: Dict[str, Dict[str, object]] = {}
    times: Dict[str, List[float]] = {}
    faults: Dict[str, List[int]] = {}
    for name, fn in fns.items():
        try:
            for i in range(max(warmup, 1)):
                t0 = time.perf_counter()
                fn()
                if i == 0:
                    out[name] = {"first_call_s": time.perf_counter() - t0}
            times[name], faults[name] = [], []
        except Exception as e:  # noqa: BLE001 - recorded per contender, the run goes on
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    for _ in range(repeats):
        for name in [n for n in times if len(times[n]) < repeats and (not times[n] or sum(times[n]) < budget_s)]:
            f0, t0 = _minor_faults(), time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(_minor_faults() - f0)
    for name, ts in times.items():
        out[name].update(_summary(ts), minor_faults=statistics.median(faults[name]))
    return out
