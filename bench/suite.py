"""The benchmark suite behind `python -m bench`: ops at the stage shapes, mask-ratio and batch sweeps,
whole SparK training steps, and this machine's bounds, measured in one process into one results dict.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import spark_kernels as sk

from . import roofline
from .common import (BATCH, MASK_RATIO, MODEL_TARGETS, NET_OPS, STAGES, TARGETS, THREADS, environment,
                     interleaved_times)
from .ops import COMPILED, GRAD_OUTS, OPS, REFERENCE, Case
from .report import SCHEMA
from spark.precision import DTYPES
PASSES = {"forward": False, "forward_backward": True}  # pass name -> with backward


@dataclasses.dataclass
class Settings:
    """What one run measures. The defaults are the full run; QUICK overrides some of them."""

    batch: int = BATCH
    repeats: int = 7
    warmup: int = 2
    budget_s: float = 20.0  # at most this much timed work per contender and case (long compiled cases)
    threads: int = THREADS
    ops: Sequence[str] = OPS
    stages: Dict[str, List[Tuple[int, int, int]]] = dataclasses.field(default_factory=lambda: dict(STAGES))
    # Ops measured at each network's stages (None: every op at every network's stages).
    net_ops: Optional[Dict[str, Sequence[str]]] = dataclasses.field(default_factory=lambda: dict(NET_OPS))
    passes: Sequence[str] = tuple(PASSES)
    backends: Optional[Sequence[str]] = None  # fused backends; None = every available one but the interpreter
    # The reference under torch.compile at these stages (1-based; None = every stage, () = none) and ops.
    compile_stages: Optional[Sequence[int]] = None
    compile_ops: Optional[Sequence[str]] = None  # None = every op
    compile_budget_s: float = 1800.0  # compiled cases after this much compiling are recorded as skipped
    sweep_ops: Sequence[str] = tuple(TARGETS)
    sweep_shape: Tuple[int, int, int] = STAGES["convnext_tiny"][0]
    mask_ratios: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)
    sweep_repeats: int = 5
    models: Sequence[str] = tuple(MODEL_TARGETS)
    model_batch: int = BATCH
    model_input_size: int = 224
    model_steps: int = 5
    model_warmup: int = 1
    model_memory: bool = True  # peak memory from a subprocess per configuration (bench/model_step.py)
    machine_repeats: int = 5
    machine_gemm_size: int = 2048
    machine_stream_elements: int = 1 << 25  # 128 MB per array, 4x the last-level cache here
    quick: bool = False
    precision: str = "fp32"  # ops: activations in this dtype; models: steps under autocast to it
    grad_outs: Sequence[str] = GRAD_OUTS  # the ops table's backward grad_out variants (bench/ops.py)


QUICK = dict(repeats=3, warmup=1, budget_s=5.0, passes=("forward_backward",), grad_outs=("random", "expanded"),
             net_ops={"convnext_tiny": tuple(TARGETS), "resnet50": ("batch_norm", "group_norm"),
                      "efficientnet_b0": ("dwconv5s2",)},
             compile_stages=(4,), compile_ops=("dwconv7", "batch_norm"), compile_budget_s=120.0,
             sweep_ops=("dwconv7", "batch_norm"), mask_ratios=(0.0, 0.3, 0.6, 0.9), batch_sizes=(1, 8, 32),
             sweep_repeats=3, model_batch=8, model_steps=2, machine_repeats=3, quick=True)


def fused_backends(requested: Optional[Sequence[str]] = None) -> List[str]:
    """The fused backends to measure on CPU tensors: the requested ones, else every available one except
    the reference and Triton (on CPU tensors Triton runs in its interpreter, a test tool, not a backend to time)."""
    if requested is not None:
        return list(requested)
    return [b for b in sk.available_backends() if b not in (REFERENCE, "triton", "cuda")]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ms(entry: Dict[str, object]) -> str:
    return f"{entry['median'] * 1e3:9.2f}" if "median" in entry else "        -"


def _ratio(times: Dict[str, Dict[str, object]], slow: str, fast: str) -> Optional[float]:
    if "median" in times.get(slow, {}) and "median" in times.get(fast, {}):
        return times[slow]["median"] / times[fast]["median"]
    return None


def measure_case(case: Case, impls: Sequence[str], backward: bool, settings: Settings,
                 bounds: Optional[Dict[str, float]]) -> Dict[str, object]:
    """Times of every contender on one case, speedups over the reference, roofline time."""
    times = interleaved_times({impl: case.runner(impl, backward) for impl in impls}, settings.repeats,
                              settings.warmup, settings.budget_s)
    row: Dict[str, object] = {
        "op": case.op, "channels": case.channels, "size": case.size, "batch": case.batch,
        "active_fraction": case.active_fraction, "pass": "forward_backward" if backward else "forward",
        "dtype": str(case.dtype).replace("torch.", ""), "grad_out": case.grad_out if backward else None,
        "times": times,
        "speedup": {impl: _ratio(times, REFERENCE, impl) for impl in impls if impl != REFERENCE},
    }
    cost = roofline.op_cost(case.op, case.channels, case.size, case.batch, case.active_fraction, backward,
                            case.dtype, case.grad_out)
    row.update(cost)
    if bounds:
        row["roofline_s"] = roofline.roofline_time(cost, bounds)
    return row


def run_ops(settings: Settings, backends: List[str], bounds) -> List[Dict[str, object]]:
    rows = []
    compile_spent = 0.0  # seconds spent compiling (first calls beyond a normal call)
    for net, stages in settings.stages.items():
        ops = [op for op in settings.ops if settings.net_ops is None or op in settings.net_ops.get(net, ())]
        for op in ops:
            for stage, (channels, size, patch) in enumerate(stages, 1):
                compile_here = (settings.compile_stages is None or stage in settings.compile_stages) and \
                    (settings.compile_ops is None or op in settings.compile_ops)
                over_budget = compile_here and compile_spent >= settings.compile_budget_s
                impls = [REFERENCE] + backends + ([COMPILED] if compile_here and not over_budget else [])
                for pass_ in settings.passes:
                    # The forward pass takes no grad_out: measured once.
                    for grad_out in settings.grad_outs if PASSES[pass_] else settings.grad_outs[:1]:
                        case = Case(op, channels, size, patch, settings.batch, dtype=DTYPES[settings.precision],
                                    grad_out=grad_out)
                        # torch.compile's contender at the first variant only (one compilation per shape).
                        first_variant = grad_out == settings.grad_outs[0]
                        contenders = impls if first_variant else [i for i in impls if i != COMPILED]
                        row = measure_case(case, contenders, PASSES[pass_], settings, bounds)
                        compiled = row["times"].get(COMPILED, {})
                        if "median" in compiled:
                            compile_spent += compiled["first_call_s"] - compiled["median"]
                        if over_budget and first_variant:
                            row["times"][COMPILED] = {"error": f"skipped: the run's torch.compile budget of "
                                                               f"{settings.compile_budget_s:.0f} s was used up"}
                        row.update(net=net, stage=stage, mask_ratio=MASK_RATIO,
                                   target=TARGETS.get(op) if pass_ == "forward_backward" else None)
                        rows.append(row)
                        t = row["times"]
                        _log(f"{net:<15} {op:<14}{channels:>5}@{size:<3} {pass_:<17}{row['grad_out'] or '':<9}" +
                             "".join(f" {impl}{_ms(t[impl])}" for impl in contenders) +
                             "".join(f"  {impl} x{s:.2f}" for impl, s in row["speedup"].items() if s))
    return rows


def run_sweeps(settings: Settings, backends: List[str], bounds) -> Dict[str, List[Dict[str, object]]]:
    channels, size, patch = settings.sweep_shape
    impls = [REFERENCE] + backends
    sweep = dataclasses.replace(settings, repeats=settings.sweep_repeats)
    out: Dict[str, List[Dict[str, object]]] = {"mask_ratio": [], "batch": []}
    for op in settings.sweep_ops:
        for ratio in settings.mask_ratios:
            row = measure_case(Case(op, channels, size, patch, settings.batch, ratio, dtype=DTYPES[settings.precision]),
                               impls, True, sweep, bounds)
            row["mask_ratio"] = ratio
            out["mask_ratio"].append(row)
            _log(f"sweep mask {op:<14}ratio {ratio:.1f} active {row['active_fraction']:.2f}" +
                 "".join(f" {i}{_ms(row['times'][i])}" for i in impls))
        for batch in settings.batch_sizes:
            row = measure_case(Case(op, channels, size, patch, batch, dtype=DTYPES[settings.precision]), impls, True,
                               sweep, bounds)
            row["mask_ratio"] = MASK_RATIO
            out["batch"].append(row)
            _log(f"sweep batch {op:<14}batch {batch:<4}" + "".join(f" {i}{_ms(row['times'][i])}" for i in impls))
    return out


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def run_models(settings: Settings, backends: List[str]) -> Dict[str, object]:
    """Whole SparK training steps through bench/model_step.py (the model layer's benchmark): per network,
    the reference model and each fused backend's model with the same weights, steps interleaved."""
    try:
        from . import model_step
    except ImportError as e:
        return {"status": f"not measured: bench/model_step.py is not available ({e})", "rows": []}
    rows: List[Dict[str, object]] = []
    for model in settings.models:
        base = {"model": model, "precision": settings.precision, "batch": settings.model_batch,
                "input_size": settings.model_input_size}
        for backend in backends:
            try:
                r = model_step.compare(model, backend, settings.model_batch, settings.model_steps,
                                       settings.model_warmup, settings.model_input_size, memory=settings.model_memory,
                                       precision=settings.precision)
                measured = [(REFERENCE, r["rows"][REFERENCE]), (backend, r["rows"][backend])]
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                measured = [(backend, {"error": _error(e)})]
            for name, row in measured:
                if name == REFERENCE and any(x["model"] == model and x["backend"] == REFERENCE for x in rows):
                    continue  # one reference row per network
                rows.append({**base, "backend": name, **row})
                _log(f"model {model:<14}{name:<12}" + (f"{row['images_per_s']:.2f} images/s, peak memory "
                     f"{row.get('peak_memory_bytes', 0) / 2 ** 20:.0f} MB" if "images_per_s" in row else row["error"]))
    return {"status": "measured", "rows": rows}


def run(settings: Settings, sections: Sequence[str] = ("machine", "ops", "sweeps", "models")) -> Dict[str, object]:
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    backends = fused_backends(settings.backends)
    results: Dict[str, object] = {
        "schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "bench"] + sys.argv[1:]),
        "settings": {k: v for k, v in dataclasses.asdict(settings).items()},
        "environment": environment(), "backends": backends, "unavailable": sk.unavailable_reasons(),
        "mask_ratio": MASK_RATIO, "targets": {"ops": TARGETS, "models": MODEL_TARGETS},
        "sparsity_limit": 1 / (1 - MASK_RATIO),
    }
    _log(f"# {results['environment']['cpu']}, {settings.threads} threads, allocator "
         f"{results['environment']['allocator']}, fused backends {backends}, load {os.getloadavg()}")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        _log(f"warning: the machine is busy (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); "
             f"timings with {settings.threads} threads will be unreliable")
    bounds = None
    if "machine" in sections:
        bounds = roofline.measure_machine(settings.machine_repeats, settings.machine_gemm_size,
                                          settings.machine_stream_elements)
        _log(f"machine: {bounds['flops_per_s'] / 1e9:.1f} GFLOP/s fp32 GEMM, "
             f"{bounds['bytes_per_s'] / 1e9:.1f} GB/s (copy {bounds['copy_bytes_per_s'] / 1e9:.1f}, "
             f"triad {bounds['triad_bytes_per_s'] / 1e9:.1f})")
    results["machine"] = bounds
    results["ops"] = run_ops(settings, backends, bounds) if "ops" in sections else []
    results["sweeps"] = run_sweeps(settings, backends, bounds) if "sweeps" in sections else \
        {"mask_ratio": [], "batch": []}
    results["models"] = run_models(settings, backends) if "models" in sections else {"status": "not run", "rows": []}
    results["environment"]["load_average_end"] = list(os.getloadavg())
    results["duration_s"] = time.perf_counter() - started
    return results
