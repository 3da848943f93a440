"""GPU acceptance benchmarks (run by scripts/gpu_check.sh): the GPU backends against the masked-dense
reference, per op with each pass's fraction of its roofline, and SparK training steps.

    python -m bench.gpu --section machine|ops|models --out FILE.json [--quick] [--device cuda]
    python -m bench.gpu report FILE.json ... > REPORT.md

machine: the device's copy bandwidth (a large device-to-device copy) and its non-tensor-core fp32 FMA rate
    (a Triton kernel of dependent FMA chains; the kernels accumulate in fp32, so fp32 FMA is their
    compute ceiling in every input dtype).
ops: every op at the ConvNeXt-T stage shapes (BN also at the ResNet-50 ones), batch 256, SparK masks at
    ratio 0.6, fp32 and bf16, the "triton" and "cuda" backends and the reference; the forward and
    forward + backward passes are timed with CUDA events (median), the backward as their difference.
    Roofline of a pass: max(bytes / copy bandwidth, FLOPs / (2 x FMA rate)) for the least traffic and work
    the contract needs (bench/roofline.py's op_cost, at the dtype's element size).
models: one SparK training step (forward, backward, LAMB) of resnet50 and convnext_tiny at 224, the fused
    model (default backend) and the reference, fp32 and bf16 autocast: images/s (median step) and
    peak CUDA memory (torch.cuda.max_memory_allocated).

--quick: tiny shapes and one repeat, runnable on CPU tensors (the "cpu" backend, and "triton" in the
interpreter when TRITON_INTERPRET=1): what tests/test_bench.py runs to keep this code path working here.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import spark_kernels as sk
from spark_kernels.masks import patch_mask, upsample_mask

from .common import (BENCH_CASES, CONVNEXT_T_STAGES, EFFICIENTNET_B0_DW_STAGES, MASK_RATIO, RESNET50_STAGES,
                     UNTARGETED_OPS)
from .roofline import op_cost

GPU_BATCH = 256
GPU_BACKENDS = ("triton", "cuda")
REFERENCE = "reference"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = tuple(BENCH_CASES)
# The targets of the GPU acceptance (fp16/bf16 and fp32, forward + backward).
SPEEDUP_TARGET = 2.0
ROOFLINE_TARGET = {"default": 0.6, "dwconv_backward": 0.5}


def _shapes(op: str, quick: bool):
    if quick:
        return [(8, 8, 2)]
    if op in UNTARGETED_OPS:
        return EFFICIENTNET_B0_DW_STAGES
    if op == "group_norm":
        return RESNET50_STAGES
    return CONVNEXT_T_STAGES + (RESNET50_STAGES if op == "batch_norm" else [])


# -- timing ---------------------------------------------------------------------------------------------
def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median time of fn: CUDA events on a GPU (queue time excluded), wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _error(e: BaseException) -> Dict[str, str]:
    text = str(e).splitlines()[0][:300] if str(e) else ""
    return {"error": f"{type(e).__name__}: {text}"}


# -- machine ---------------------------------------------------------------------------------------------
def _fma_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fma_chain_kernel(out_ptr, a, b, STEPS: tl.constexpr, BLOCK: tl.constexpr):
        """Four independent chains of STEPS dependent FMAs per element (enough parallelism to fill the pipes)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x0 = i.to(tl.float32) * 1e-9
        x1, x2, x3 = x0 + 1.0, x0 + 2.0, x0 + 3.0
        for _ in range(STEPS):
            x0 = x0 * a + b
            x1 = x1 * a + b
            x2 = x2 * a + b
            x3 = x3 * a + b
        tl.store(out_ptr + i, x0 + x1 + x2 + x3)

    return fma_chain_kernel


def measure_machine(device: torch.device, quick: bool) -> Dict[str, object]:
    out: Dict[str, object] = {}
    elements = (1 << 12) if quick else (1 << 28)  # 1 GiB in fp32: far beyond any L2
    try:
        src = torch.ones(elements, device=device)
        dst = torch.empty_like(src)
        t = median_seconds(lambda: dst.copy_(src), device, repeats=1 if quick else 20, warmup=1 if quick else 3)
        out["copy_bytes_per_s"] = 2 * 4 * elements / t
        del src, dst
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        out["copy_error"] = _error(e)["error"]
    try:
        kernel = _fma_kernel()
        steps, block = (8, 64) if quick else (2048, 1024)
        programs = 4 if quick else 132 * 64
        res = torch.empty(programs * block, device=device)
        t = median_seconds(lambda: kernel[(programs,)](res, 0.999, 1e-3, STEPS=steps, BLOCK=block), device,
                           repeats=1 if quick else 10, warmup=1 if quick else 2)
        out["fma_per_s"] = 4 * steps * programs * block / t
    except Exception as e:  # noqa: BLE001
        out["fma_error"] = _error(e)["error"]
    return out


def roofline_seconds(op: str, channels: int, size: int, batch: int, active: float, dtype: torch.dtype,
                     backward_only: bool, forward_only: bool, machine: Dict[str, object]) -> Optional[float]:
    """The roofline time of a pass at the measured copy bandwidth and FMA rate (None if either is missing)."""
    if "copy_bytes_per_s" not in machine or "fma_per_s" not in machine:
        return None
    fwd = op_cost(op, channels, size, batch, active, backward=False, dtype=dtype)
    both = op_cost(op, channels, size, batch, active, backward=True, dtype=dtype)
    cost = fwd if forward_only else ({k: both[k] - fwd[k] for k in both} if backward_only else both)
    return max(cost["bytes"] / machine["copy_bytes_per_s"],
               cost["flops"] / (2 * machine["fma_per_s"]))


# -- ops --------------------------------------------------------------------------------------------------
def _case(op: str, channels: int, size: int, patch: int, batch: int, dtype, device):
    g = torch.Generator().manual_seed(0)
    grid = max(size // patch, 1)
    mask = upsample_mask(patch_mask(batch, (grid, grid), MASK_RATIO, generator=g), size, size)[:, :, :size, :size]
    sites = sk.ActiveSites(mask.contiguous().to(device))
    x = torch.randn(batch, channels, size, size, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    _, variant = BENCH_CASES[op]
    if variant.channels_last_input:
        x = x.permute(0, 2, 3, 1).contiguous()
    k, stride = variant.kernel_size, variant.stride or 1
    weight = torch.randn(channels, 1, k, k, generator=g) if k is not None else torch.randn(channels, generator=g)
    bias = torch.randn(channels, generator=g)
    out_shape = x.shape if stride == 1 else (batch, channels, -(-size // stride), -(-size // stride))
    grad = torch.randn(out_shape, generator=g).to(device, dtype)
    return sites, x, weight.to(device, dtype), bias.to(device, dtype), grad


def _runner(op: str, backend: str, sites, x, weight, bias):
    _, variant = BENCH_CASES[op]
    c = weight.shape[0]
    running = dict(running_mean=torch.zeros(c, device=x.device, dtype=x.dtype),
                   running_var=torch.ones(c, device=x.device, dtype=x.dtype))
    return lambda x, w, b: variant.call(dict(x=x, weight=w, bias=b, **running), sites, backend)


def measure_op(op, channels, size, patch, batch, dtype_name, backend, device, machine, repeats, warmup):
    dtype = DTYPES[dtype_name]
    sites, x, weight, bias, grad = _case(op, channels, size, patch, batch, dtype, device)
    fn = _runner(op, backend, sites, x, weight, bias)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]

    def forward():
        with torch.no_grad():
            fn(x, weight, bias)

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)

    row = {"op": op, "channels": channels, "size": size, "batch": batch, "dtype": dtype_name, "backend": backend,
           "active_fraction": sites.active_fraction}
    try:
        row["forward_s"] = median_seconds(forward, device, repeats, warmup)
        row["forward_backward_s"] = median_seconds(forward_backward, device, repeats, warmup)
    except Exception as e:  # noqa: BLE001 - a backend that cannot run a case is recorded, the run goes on
        row.update(_error(e))
        return row
    row["backward_s"] = max(row["forward_backward_s"] - row["forward_s"], 0.0)
    for pass_, key in (("forward", "forward_s"), ("backward", "backward_s"), ("forward_backward", "forward_backward_s")):
        roof = roofline_seconds(op, channels, size, batch, sites.active_fraction, dtype, pass_ == "backward",
                                pass_ == "forward", machine)
        if roof is not None and row[key] > 0:
            row[f"{pass_}_roofline_fraction"] = roof / row[key]
    return row


def run_ops(device: torch.device, quick: bool, backends: List[str], machine: Dict[str, object],
            ops=OPS) -> List[Dict]:
    batch = 2 if quick else GPU_BATCH
    repeats, warmup = (1, 1) if quick else (10, 3)
    rows = []
    for op in ops:
        for channels, size, patch in _shapes(op, quick):
            for dtype_name in DTYPES:
                for backend in [REFERENCE] + backends:
                    rows.append(measure_op(op, channels, size, patch, batch, dtype_name, backend, device, machine,
                                           repeats, warmup))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    reference = {(r["op"], r["channels"], r["size"], r["dtype"]): r for r in rows if r["backend"] == REFERENCE}
    for r in rows:
        ref = reference[r["op"], r["channels"], r["size"], r["dtype"]]
        if r["backend"] != REFERENCE and "forward_backward_s" in r and "forward_backward_s" in ref:
            r["speedup"] = ref["forward_backward_s"] / r["forward_backward_s"]
    return rows


# -- models ------------------------------------------------------------------------------------------------
MODELS = ("resnet50", "convnext_tiny")
PRECISIONS = ("bf16-autocast", "fp32")


def run_models(device: torch.device, quick: bool, backends: List[str], models=MODELS,
               precisions=PRECISIONS) -> List[Dict]:
    from .model_step import _lamb
    import spark
    size, batch, steps, warmup = (32, 2, 1, 1) if quick else (224, 64, 3, 2)
    rows = []
    for name in models:
        for precision in precisions:
            for backend in [REFERENCE] + backends:
                row = {"model": name, "precision": precision, "backend": backend, "batch": batch, "input_size": size}
                try:
                    torch.manual_seed(0)
                    model = spark.SparK(name, input_size=size, mask_ratio=MASK_RATIO, backend=backend).to(device)
                    opt = _lamb(model, name, batch)
                    g = torch.Generator().manual_seed(0)
                    images = torch.randn(batch, 3, size, size, generator=g).to(device)
                    mask = patch_mask(batch, size // 32, MASK_RATIO, generator=g).to(device)
                    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32")

                    def step():
                        opt.zero_grad(set_to_none=True)
                        with autocast:
                            loss = model(images, mask)
                        loss.backward()
                        opt.step()

                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    t = median_seconds(step, device, steps, warmup)
                    row["images_per_s"] = batch / t
                    if device.type == "cuda":
                        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
                    del model, opt
                except Exception as e:  # noqa: BLE001
                    row.update(_error(e))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


# -- report ------------------------------------------------------------------------------------------------
def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def render(results: List[Dict]) -> str:
    lines = []
    for r in results:
        env = r["environment"]
        lines.append(f"## {r['section']} ({env['device_name']}, torch {env['torch']}, triton {env['triton']}, "
                     f"python {env['python']})\n")
        if r["section"] == "machine":
            m = r["machine"]
            lines.append(f"copy bandwidth {_fmt(m.get('copy_bytes_per_s', 0) / 1e9)} GB/s; fp32 FMA rate "
                         f"{_fmt(m.get('fma_per_s', 0) / 1e12)} TFMA/s {m.get('copy_error', '')} {m.get('fma_error', '')}\n")
        elif r["section"] == "ops":
            lines.append("| op | C@HxW | dtype | backend | fwd ms | fwd+bwd ms | speedup (target 2x) | "
                         "fwd roofline | bwd roofline |")
            lines.append("|---|---|---|---|---|---|---|---|---|")
            for row in r["ops"]:
                if "error" in row:
                    lines.append(f"| {row['op']} | {row['channels']}@{row['size']} | {row['dtype']} | {row['backend']} | "
                                 f"error: {row['error']} | | | | |")
                    continue
                lines.append(f"| {row['op']} | {row['channels']}@{row['size']} | {row['dtype']} | {row['backend']} | "
                             f"{row['forward_s'] * 1e3:.3f} | {row['forward_backward_s'] * 1e3:.3f} | "
                             f"{_fmt(row.get('speedup'), '.2f')} | {_fmt(row.get('forward_roofline_fraction'), '.0%')} | "
                             f"{_fmt(row.get('backward_roofline_fraction'), '.0%')} |")
        else:
            lines.append("| model | precision | backend | batch | images/s | peak memory GiB |")
            lines.append("|---|---|---|---|---|---|")
            for row in r["models"]:
                mem = row.get("peak_memory_bytes")
                lines.append(f"| {row['model']} | {row['precision']} | {row['backend']} | {row['batch']} | "
                             f"{_fmt(row.get('images_per_s'), '.1f') if 'error' not in row else 'error: ' + row['error']} | "
                             f"{_fmt(None if mem is None else mem / 2**30, '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def environment(device: torch.device) -> Dict[str, object]:
    import platform
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "unavailable"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "backends_available": sk.available_backends(),
            "unavailable": sk.unavailable_reasons()}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "report":
        print(render([json.load(open(path)) for path in argv[1:]]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=("machine", "ops", "models"), required=True)
    parser.add_argument("--out", required=True, help="results JSON (the ops section also reads the machine JSON "
                                                     "given with --machine for the roofline)")
    parser.add_argument("--machine", help="a machine-section JSON whose bandwidth and FMA rate the rooflines use")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (any device)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", nargs="+", help=f"fused backends (default: those of {GPU_BACKENDS} available)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends or [b for b in GPU_BACKENDS if b in sk.available_backends()]
    result = {"section": args.section, "quick": args.quick, "environment": environment(device), "backends": backends}
    t0 = time.perf_counter()
    if args.section == "machine":
        result["machine"] = measure_machine(device, args.quick)
    elif args.section == "ops":
        machine = json.load(open(args.machine))["machine"] if args.machine else measure_machine(device, args.quick)
        result["machine"] = machine
        result["ops"] = run_ops(device, args.quick, backends, machine, args.ops)
    else:
        result["models"] = run_models(device, args.quick, backends, args.models, args.precisions)
    result["duration_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
