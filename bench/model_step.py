"""SparK training steps: the fused model against the masked-dense reference model, side by side.

    python -m bench.model_step [--models convnext_tiny resnet50 | matrix] [--precision fp32 bf16] [--batch 16]
                               [--input-size 224] [--steps 5] [--warmup 1] [--threads 2] [--backend cpu]
                               [--separate] [--out FILE.json]

A step is forward + backward + LAMB step (timm.optim.Lamb, the recipe's betas and global clipping at 5)
on fixed images and a fixed sequence of random patch masks (ratio 0.6), the forward pass in fp32 or under
autocast to bf16 / fp16 (--precision; spark.precision.autocast, as in spark-pretrain; parameters and optimizer
stay float32). Both models of a network get the
same weights and run in one process, their steps interleaved so that machine load hits both alike;
the figure is the median step time after warm-up. ``--models matrix`` runs every model of the support
matrix (spark/families.py); each result lists which layers of the fused encoder run fused and which
masked-dense. Peak memory is the peak RSS (VmHWM) of a fresh
subprocess that builds only that configuration and runs warm-up + 1 steps; its RSS after building the
model, before the first step, is reported too. The allocator is glibc malloc unless LD_PRELOAD names
another (reported). With --separate, each configuration runs only in its own fresh process (warm-up, then
--steps timed steps), which gives its time and its peak memory at once: half the steps of the default, for
configurations too slow to run twice, at the price of timings
that are not interleaved. A markdown table of every network x precision x model is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

import torch

if __package__ in (None, ""):  # run as a script: make `bench` and `spark` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "bench"

from bench.common import MASK_RATIO, THREADS, allocator, environment, interleaved_times, median_time  # noqa: E402
from spark import precision as precision_mod  # noqa: E402
from spark.families import matrix_models  # noqa: E402
from spark.sparse_encoder import execution_report  # noqa: E402

REFERENCE = "reference"
MEMORY_METHOD = ("peak RSS (/proc/self/status VmHWM) of a fresh subprocess that builds only this configuration "
                 "and runs warm-up + 1 training steps")


def _lamb(model: torch.nn.Module, name: str, batch: int):
    from timm.optim import Lamb
    from spark.recipe import recipe_for
    return Lamb(model.parameters(), lr=2e-4 * batch / 256, betas=recipe_for(name).lamb_betas, weight_decay=0.04,
                max_grad_norm=5.0)


def build(name: str, backend: Optional[str], input_size: int, batch: int, seed: int = 0):
    """(model, optimizer) seeded for reproducibility."""
    import spark
    torch.manual_seed(seed)
    model = spark.SparK(name, input_size=input_size, mask_ratio=MASK_RATIO, backend=backend)
    return model, _lamb(model, name, batch)


def inputs(batch: int, input_size: int, count: int, seed: int = 0):
    """Fixed images and `count` fixed patch masks."""
    from spark_kernels.masks import patch_mask
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, input_size, input_size, generator=g)
    grid = input_size // 32
    masks = [patch_mask(batch, grid, MASK_RATIO, generator=g) for _ in range(count)]
    return images, masks


def stepper(model, optimizer, images, masks, precision: str = "fp32"):
    """A closure running one training step per call, cycling through the masks."""
    state = {"i": 0}
    device = images.device

    def step():
        mask = masks[state["i"] % len(masks)]
        state["i"] += 1
        optimizer.zero_grad(set_to_none=True)
        with precision_mod.autocast(precision, device):
            loss = model(images, mask)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    return _status_bytes("VmRSS")


def _child(name: str, backend: str, batch: int, input_size: int, warmup: int, precision: str,
           steps: int = 1) -> Dict[str, object]:
    """Run in a fresh process: build one configuration, run warm-up + `steps` steps, report memory and
    the time of the steps after warm-up."""
    model, opt = build(name, None if backend == "default" else backend, input_size, batch)
    images, masks = inputs(batch, input_size, warmup + steps)
    baseline = _rss_bytes()
    times = median_time(stepper(model, opt, images, masks, precision), repeats=steps, warmup=warmup)
    # VmHWM, not getrusage's ru_maxrss: a child spawned by a large parent inherits the parent's RSS into
    # ru_maxrss across exec (measured: a 1.5 GB parent gives a 13 MB child ru_maxrss = 1.4 GB).
    return {"peak_rss_bytes": _status_bytes("VmHWM"), "rss_before_first_step_bytes": baseline, "step_s": times}


def peak_memory(name: str, backend: Optional[str], batch: int, input_size: int, warmup: int,
                threads: int, precision: str = "fp32", steps: int = 1) -> Dict[str, object]:
    """The child's report (peak memory, and the time of its `steps` steps after warm-up), or an error."""
    cmd = [sys.executable, "-m", "bench.model_step", "--child", name, backend or "default", str(batch),
           str(input_size), str(warmup), precision, "--child-steps", str(steps), "--threads", str(threads)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=3600)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"memory_error": f"subprocess exited with {out.returncode}: {tail[:300]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(times: Dict[str, object], batch: int, memory: Dict[str, object]) -> Dict[str, object]:
    if "error" in times:
        return {"error": times["error"]}
    row = {"images_per_s": batch / times["median"], "step_s": times, **memory,
           "memory_method": MEMORY_METHOD, "allocator": allocator()}
    if "peak_rss_bytes" in memory:
        row["peak_memory_bytes"] = memory["peak_rss_bytes"]
    return row


def measure(name: str, backend: Optional[str] = None, batch: int = 16, steps: int = 5, warmup: int = 1,
            input_size: int = 224, memory: bool = True, precision: str = "fp32") -> Dict[str, object]:
    """One configuration on its own: images/s from the median of `steps` timed steps after `warmup`,
    and its peak memory from a subprocess."""
    model, opt = build(name, backend, input_size, batch)
    images, masks = inputs(batch, input_size, steps + warmup)
    times = median_time(stepper(model, opt, images, masks, precision), repeats=steps, warmup=warmup)
    del model, opt
    mem = peak_memory(name, backend, batch, input_size, warmup, torch.get_num_threads(),
                      precision) if memory else {}
    return _row(times, batch, mem)


def compare(name: str, backend: Optional[str], batch: int, steps: int, warmup: int, input_size: int,
            memory: bool = True, precision: str = "fp32", separate: bool = False) -> Dict[str, object]:
    """Fused and reference models of one network with the same weights, steps interleaved; with `separate`,
    each model's steps and peak memory from its own fresh process instead (same seed, hence same weights)."""
    label = backend or "default"
    if separate:
        fused, _ = build(name, backend, input_size, batch)
        layers = execution_report(fused.encoder)
        del fused
        rows = {}
        for b, key in ((REFERENCE, REFERENCE), (backend, label)):
            report = peak_memory(name, b, batch, input_size, warmup, torch.get_num_threads(), precision, steps)
            times = report.pop("step_s", {"error": report.get("memory_error", "no step time")})
            rows[key] = _row(times, batch, report)
    else:
        ref, ref_opt = build(name, REFERENCE, input_size, batch)
        fused, fused_opt = build(name, backend, input_size, batch)
        fused.load_state_dict(ref.state_dict())
        layers = execution_report(fused.encoder)
        images, masks = inputs(batch, input_size, steps + warmup)
        times = interleaved_times({REFERENCE: stepper(ref, ref_opt, images, masks, precision),
                                   label: stepper(fused, fused_opt, images, masks, precision)},
                                  repeats=steps, warmup=warmup)
        del ref, ref_opt, fused, fused_opt
        rows = {}
        for b, key in ((REFERENCE, REFERENCE), (backend, label)):
            mem = peak_memory(name, b, batch, input_size, warmup, torch.get_num_threads(), precision) if memory else {}
            mem.pop("step_s", None)  # the interleaved times are the figure
            rows[key] = _row(times[key], batch, mem)
    result = {"model": name, "precision": precision, "batch": batch, "input_size": input_size, "steps": steps,
              "warmup": warmup, "timing": "separate processes" if separate else "interleaved in one process",
              "rows": rows, "layers": layers}
    if "images_per_s" in rows[label] and "images_per_s" in rows[REFERENCE]:
        result["speedup"] = rows[label]["images_per_s"] / rows[REFERENCE]["images_per_s"]
        if "peak_memory_bytes" in rows[label] and "peak_memory_bytes" in rows[REFERENCE]:
            result["peak_memory_ratio"] = rows[label]["peak_memory_bytes"] / rows[REFERENCE]["peak_memory_bytes"]
    return result


def markdown_table(results: Dict[str, object]) -> str:
    """Network x precision x model: images/s and peak memory, fused vs reference and low precision vs fp32."""
    fp32 = {(r["model"], b): row for r in results["models"] if r["precision"] == "fp32" for b, row in r["rows"].items()}
    lines = ["| network | precision | model | batch | images/s | peak memory GB | vs reference: speed / memory | "
             "vs fp32: speed / memory |", "|---|---|---|---|---|---|---|---|"]
    for r in results["models"]:
        ref = r["rows"].get(REFERENCE, {})
        for backend, row in r["rows"].items():
            head = f"| {r['model']} | {r['precision']} | {'reference' if backend == REFERENCE else 'fused ' + backend} " \
                   f"| {r['batch']} | "
            if "images_per_s" not in row:
                lines.append(head + f"failed: {row.get('error', '?')[:80]} | | | |")
                continue
            mem = row.get("peak_memory_bytes")
            base = fp32.get((r["model"], backend)) if r["precision"] != "fp32" else None
            lines.append(head + f"{row['images_per_s']:.2f} | {'—' if mem is None else f'{mem / 1e9:.2f}'} | "
                         f"{'' if backend == REFERENCE else _ratios(row, ref)} | {_ratios(row, base) if base else ''} |")
    return "\n".join(lines)


def _ratios(row: Dict[str, object], base: Dict[str, object]) -> str:
    speed = f"{row['images_per_s'] / base['images_per_s']:.2f}x" if "images_per_s" in base else "—"
    both = "peak_memory_bytes" in row and "peak_memory_bytes" in base
    return speed + " / " + (f"{row['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x" if both else "—")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["convnext_tiny", "resnet50"],
                        help='timm model names, or "matrix" for every model of the support matrix')
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32"],
                        help="forward pass in fp32 or under autocast to bf16 / fp16; several: one run each")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--backend", default=None, help="backend of the fused model (default: best available)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--separate", action="store_true",
                        help="time each model in its own memory subprocess instead of interleaving both in one "
                             "process (half the steps; for slow configurations)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--child", nargs=6, metavar=("MODEL", "BACKEND", "BATCH", "SIZE", "WARMUP", "PRECISION"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.separate and args.no_memory:
        parser.error("--separate measures in the memory subprocesses; it cannot go with --no-memory")
    for option in ("batch", "input_size", "steps", "threads", "child_steps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    torch.set_num_threads(args.threads)
    if args.child:
        name, backend, batch, size, warmup, precision = args.child
        print(json.dumps(_child(name, backend, int(batch), int(size), int(warmup), precision, args.child_steps)))
        return 0
    results = {"command": " ".join([os.path.basename(sys.executable), "-m", "bench.model_step"] +
                                   (sys.argv[1:] if argv is None else argv)),
               "environment": environment(), "mask_ratio": MASK_RATIO, "memory_method": MEMORY_METHOD,
               "models": []}
    models = list(matrix_models()) if args.models == ["matrix"] else args.models
    for name in models:
        for precision in args.precision:
            r = compare(name, args.backend, args.batch, args.steps, args.warmup, args.input_size,
                        memory=not args.no_memory, precision=precision, separate=args.separate)
            results["models"].append(r)
            summary = {k: r.get(k) for k in ("model", "precision", "speedup", "peak_memory_ratio")}
            summary.update({f"{b}_peak_MB": round(row.get("peak_memory_bytes", 0) / 2 ** 20)
                            for b, row in r["rows"].items()})
            print(json.dumps(summary), file=sys.stderr)
    results["environment"]["load_average_end"] = list(os.getloadavg())
    print(markdown_table(results), file=sys.stderr)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
