"""Render a results file of `python -m bench` as markdown tables and PNG plots.

    python -m bench.report bench/results/RESULTS.json [--out REPORT.md] [--plots DIR]

The README's performance table is this module's output; every figure comes from the results file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from .ops import COMPILED, REFERENCE

GB = 1e9
SCHEMA = 1


# Keys of a results file (schema 1) and of each op measurement row.
TOP_KEYS = {"schema": int, "created": str, "command": str, "settings": dict, "environment": dict, "backends": list,
            "mask_ratio": float, "targets": dict, "sparsity_limit": float, "machine": (dict, type(None)),
            "ops": list, "sweeps": dict, "models": dict, "duration_s": float}
ROW_KEYS = {"op": str, "channels": int, "size": int, "batch": int, "active_fraction": float, "pass": str,
            "times": dict, "speedup": dict, "flops": float, "bytes": float}
ENVIRONMENT_KEYS = ("cpu", "cores", "threads", "torch", "triton", "allocator", "load_average")


def check_schema(results: Dict[str, object]) -> None:
    """Raise ValueError naming the first missing or mistyped field of a results file."""
    def check(obj, keys, where):
        for key, kind in keys.items():
            if key not in obj:
                raise ValueError(f"results file: {where} lacks {key!r}")
            if not isinstance(obj[key], kind):
                raise ValueError(f"results file: {where}[{key!r}] is a {type(obj[key]).__name__}")

    check(results, TOP_KEYS, "the top level")
    if results["schema"] != SCHEMA:
        raise ValueError(f"results file: schema {results['schema']}, this code reads schema {SCHEMA}")
    for key in ENVIRONMENT_KEYS:
        if key not in results["environment"]:
            raise ValueError(f"results file: environment lacks {key!r}")
    rows = results["ops"] + results["sweeps"]["mask_ratio"] + results["sweeps"]["batch"]
    for i, row in enumerate(rows):
        check(row, ROW_KEYS, f"measurement {i}")
        for impl, t in row["times"].items():
            if "error" not in t and not {"median", "min", "max", "repeats", "first_call_s"} <= t.keys():
                raise ValueError(f"results file: measurement {i} {impl} has neither times nor an error: {t}")
    if not isinstance(results["models"].get("rows"), list):
        raise ValueError("results file: models lacks its 'rows' list")


def load(path: str) -> Dict[str, object]:
    with open(path) as f:
        results = json.load(f)
    check_schema(results)
    return results


def _ms(times: Dict[str, Dict[str, object]], impl: str) -> str:
    entry = times.get(impl)
    if entry is None:
        return "—"
    if "error" in entry:
        return "skipped" if entry["error"].startswith("skipped") else "failed"
    return f"{entry['median'] * 1e3:.2f}"


def _x(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _median(times: Dict[str, Dict[str, object]], impl: str) -> Optional[float]:
    return times.get(impl, {}).get("median")


def linear_fit(points: Sequence[tuple]) -> Optional[Dict[str, float]]:
    """Least-squares t = a + b f over (active fraction f, time t); overhead_at_zero = a / (a + b) is the
    share of the full-density time left when nothing is active (0 for a cost exactly linear in f)."""
    if len(points) < 2:
        return None
    n = len(points)
    mf = sum(f for f, _ in points) / n
    mt = sum(t for _, t in points) / n
    var = sum((f - mf) ** 2 for f, _ in points)
    if var == 0:
        return None
    b = sum((f - mf) * (t - mt) for f, t in points) / var
    a = mt - b * mf
    ss_tot = sum((t - mt) ** 2 for _, t in points)
    ss_res = sum((t - a - b * f) ** 2 for f, t in points)
    return {"intercept_s": a, "slope_s": b, "overhead_at_zero": a / (a + b) if a + b else float("nan"),
            "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def _header(results: Dict[str, object]) -> List[str]:
    env = results["environment"]
    lines = [f"Measured {results['created']} by `{results['command']}` in {results['duration_s'] / 60:.1f} min "
             f"({'quick' if results['settings']['quick'] else 'full'} run): {env['cpu']}, {env['cores']} cores, "
             f"{env['threads']} threads, torch {env['torch']}, triton {env['triton']}, allocator "
             f"**{env['allocator']}**, load average {env['load_average'][0]:.1f} at the start and "
             f"{env.get('load_average_end', [float('nan')])[0]:.1f} at the end. Fused backends: "
             f"{', '.join(results['backends']) or 'none'}."]
    busiest = max(env["load_average"][0], env.get("load_average_end", [0])[0])
    if busiest > env["cores"]:
        lines.append(f"**The machine was busy (load average up to {busiest:.1f} on {env['cores']} cores): "
                     f"timings with {env['threads']} threads are unreliable, re-run on a quiet machine.**")
    bounds = results.get("machine")
    if bounds:
        lines.append(f"Machine bounds (measured): {bounds['flops_per_s'] / 1e9:.1f} GFLOP/s fp32 "
                     f"({bounds['gemm_size']}² GEMM), {bounds['bytes_per_s'] / GB:.1f} GB/s (STREAM copy "
                     f"{bounds['copy_bytes_per_s'] / GB:.1f}, triad {bounds['triad_bytes_per_s'] / GB:.1f}). "
                     f"Sparsity limit at mask ratio {results['mask_ratio']}: "
                     f"{results['sparsity_limit']:.2f}x = 1/(1 - ratio).")
    faults = {}
    for r in results["ops"]:
        if r["pass"] == "forward_backward":
            for impl, t in r["times"].items():
                if "minor_faults" in t:
                    faults.setdefault(impl, []).append(t["minor_faults"])
    if faults:
        lines.append("Page faults per forward + backward call (median per case, mean over the ops table; "
                     "see the allocator note): " + ", ".join(f"{impl} {sum(v) / len(v):.0f}"
                                                             for impl, v in faults.items()) + ".")
    return lines


def ops_table(results: Dict[str, object], pass_: str = "forward_backward") -> List[str]:
    backends = results["backends"]
    rows = [r for r in results["ops"] if r["pass"] == pass_]
    if not rows:
        return []
    cols = ["net", "op", "C@HxW", "grad_out", "reference ms", "compiled ms"] + [f"{b} ms" for b in backends] + \
        [f"{b} vs ref" for b in backends] + [f"{b} vs compiled" for b in backends] + \
        ["target", "met", "roofline ms", "ref/roofline"] + [f"{b} at roofline" for b in backends] + ["compile s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        t = r["times"]
        target = r.get("target") if r["net"] == "convnext_tiny" else None
        cells = [r["net"], r["op"], f"{r['channels']}@{r['size']}²", r.get("grad_out") or "—", _ms(t, REFERENCE),
                 _ms(t, COMPILED)]
        cells += [_ms(t, b) for b in backends]
        cells += [_x(r["speedup"].get(b)) for b in backends]
        cells += [_x(_median(t, COMPILED) / _median(t, b)) if _median(t, COMPILED) and _median(t, b) else "—"
                  for b in backends]
        speedups = [r["speedup"].get(b) for b in backends if r["speedup"].get(b)]
        met = "—" if target is None else ("n/a" if not speedups else "yes" if max(speedups) >= target else "no")
        roof = r.get("roofline_s")
        ref = _median(t, REFERENCE)
        compiled = t.get(COMPILED, {})
        compile_s = compiled["first_call_s"] - compiled["median"] if "median" in compiled else None
        cells += [_x(target), met, f"{roof * 1e3:.2f}" if roof else "—",
                  _x(ref / roof) if roof and ref else "—"]
        cells += [f"{roof / _median(t, b):.0%}" if roof and _median(t, b) else "—" for b in backends]
        cells += [f"{compile_s:.1f}" if compile_s is not None else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _geomean(values: Sequence[float]) -> float:
    import math
    return math.exp(sum(math.log(v) for v in values) / len(values))


def targets_table(results: Dict[str, object]) -> List[str]:
    """docs/design.md section 6 targets next to the measured figures and the physical limits."""
    lines = ["| target (docs/design.md §6) | required | measured: min / geomean over the ConvNeXt-T stages | met | "
             "sparsity limit | roofline limit (geomean ref/roofline) |", "|---|---|---|---|---|---|"]
    backends = results["backends"]
    for op, target in results["targets"]["ops"].items():
        rows = [r for r in results["ops"] if r["op"] == op and r["net"] == "convnext_tiny"
                and r["pass"] == "forward_backward"]
        best = [max((r["speedup"].get(b) or 0) for b in backends) if backends else 0 for r in rows]
        measured = [b for b in best if b > 0]
        limits = [_median(r["times"], REFERENCE) / r["roofline_s"] for r in rows if r.get("roofline_s")]
        if measured and len(measured) == len(rows):
            shown = f"{min(measured):.2f}x / {_geomean(measured):.2f}x"
            met = "yes" if min(measured) >= target else f"no ({sum(m >= target for m in measured)}/{len(rows)} stages)"
        else:
            shown, met = "not measured", "n/a"
        lines.append(f"| {op} fwd+bwd vs reference | {target:.1f}x | {shown} | {met} | "
                     f"{results['sparsity_limit']:.2f}x | {_x(_geomean(limits)) if limits else '—'} |")
    model_rows = results["models"]["rows"]
    for model, target in results["targets"]["models"].items():
        ref = next((r for r in model_rows if r["model"] == model and r["backend"] == REFERENCE
                    and "images_per_s" in r), None)
        fused = [r for r in model_rows if r["model"] == model and r["backend"] != REFERENCE and "images_per_s" in r]
        if ref and fused:
            best = max(fused, key=lambda r: r["images_per_s"])
            ratio = best["images_per_s"] / ref["images_per_s"]
            mem_ok = None if best.get("peak_memory_bytes") is None or ref.get("peak_memory_bytes") is None else \
                best["peak_memory_bytes"] <= ref["peak_memory_bytes"]
            mem = "" if mem_ok is None else f", peak memory {best['peak_memory_bytes'] / ref['peak_memory_bytes']:.2f}x"
            shown = f"{ratio:.2f}x images/s{mem}"
            met = "yes" if ratio >= target and mem_ok is not False else "no"
        else:
            shown, met = "not measured", "n/a"
        lines.append(f"| SparK step {model}, images/s vs reference, memory no higher | {target:.1f}x | {shown} | "
                     f"{met} | — | — |")
    return lines


def sweep_table(results: Dict[str, object]) -> List[str]:
    rows = results["sweeps"]["mask_ratio"]
    if not rows:
        return []
    impls = [REFERENCE] + results["backends"]
    lines = ["| op | mask ratio | active fraction | " + " | ".join(f"{i} ms" for i in impls) +
             " | roofline ms |", "|" + "---|" * (len(impls) + 4)]
    for r in rows:
        roof = r.get("roofline_s")
        lines.append(f"| {r['op']} | {r['mask_ratio']:.1f} | {r['active_fraction']:.2f} | " +
                     " | ".join(_ms(r["times"], i) for i in impls) + (f" | {roof * 1e3:.2f} |" if roof else " | — |"))
    lines += ["", "Linearity in the active fraction (least squares t = a + b f; share of the full-density time left "
              "at f = 0, ideal 0):", "", "| op | " + " | ".join(impls) + " |", "|" + "---|" * (len(impls) + 1)]
    for op in dict.fromkeys(r["op"] for r in rows):
        cells = []
        for impl in impls:
            fit = linear_fit([(r["active_fraction"], _median(r["times"], impl)) for r in rows
                              if r["op"] == op and _median(r["times"], impl) is not None])
            cells.append("—" if fit is None else f"{fit['overhead_at_zero']:.0%} (R² {fit['r2']:.2f})")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return lines


def batch_table(results: Dict[str, object]) -> List[str]:
    rows = results["sweeps"]["batch"]
    if not rows:
        return []
    backends = results["backends"]
    lines = ["| op | batch | reference ms/image | " + " | ".join(f"{b} ms/image | {b} vs ref" for b in backends)
             + " |", "|" + "---|" * (3 + 2 * len(backends))]
    for r in rows:
        per = {i: f"{_median(r['times'], i) / r['batch'] * 1e3:.3f}" if _median(r["times"], i) else "—"
               for i in [REFERENCE] + backends}
        lines.append(f"| {r['op']} | {r['batch']} | {per[REFERENCE]} | " +
                     " | ".join(f"{per[b]} | {_x(r['speedup'].get(b))}" for b in backends) + " |")
    return lines


def models_table(results: Dict[str, object]) -> List[str]:
    models = results["models"]
    if not models["rows"]:
        return [f"SparK training steps: {models['status']}."]
    ref = {r["model"]: r for r in models["rows"] if r["backend"] == REFERENCE}
    lines = ["| model | backend | batch | images/s | peak memory MB | vs reference | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in models["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['backend']} | {r['batch']} | failed: {r['error'][:80]} | | | | |")
            continue
        base = ref.get(r["model"], {})
        ratio = r["images_per_s"] / base["images_per_s"] if base.get("images_per_s") else None
        target = results["targets"]["models"].get(r["model"]) if r["backend"] != REFERENCE else None
        mem = r.get("peak_memory_bytes")
        mem_ok = mem is not None and base.get("peak_memory_bytes") is not None and mem <= base["peak_memory_bytes"]
        met = "—" if target is None or ratio is None else \
            ("yes" if ratio >= target and mem_ok else f"no ({'speed' if ratio < target else 'memory'})")
        lines.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['images_per_s']:.2f} | "
                     f"{mem / 2 ** 20:.0f} | {_x(ratio) if r['backend'] != REFERENCE else ''} | "
                     f"{_x(target) if target else ''} | {met} |" if mem is not None else
                     f"| {r['model']} | {r['backend']} | {r['batch']} | {r['images_per_s']:.2f} | — | "
                     f"{_x(ratio)} | {_x(target)} | {met} |")
    return lines


def failures(results: Dict[str, object]) -> Dict[tuple, int]:
    """(contender, error message) -> how many op cases failed with it."""
    counts: Dict[tuple, int] = {}
    rows = results["ops"] + results["sweeps"]["mask_ratio"] + results["sweeps"]["batch"]
    for r in rows:
        for impl, t in r["times"].items():
            if "error" in t:
                counts[(impl, t["error"])] = counts.get((impl, t["error"]), 0) + 1
    return counts


def render_markdown(results: Dict[str, object], plots: Sequence[str] = ()) -> str:
    out = ["## Performance", ""] + _header(results) + [""] + targets_table(results) + [""]
    out += ["### Ops, forward + backward, batch {} (targets of docs/design.md section 6 at the ConvNeXt-T stages)"
            .format(results["settings"]["batch"]), ""]
    out += ops_table(results) or ["(not measured)"]
    fwd = ops_table(results, "forward")
    if fwd:
        out += ["", "### Ops, forward only (training mode)", ""] + fwd
    out += ["", "`compiled` is the reference under `torch.compile` (inductor); `ref/roofline` is the most any "
            "implementation could gain over the reference on this machine (roofline time from the op's least "
            "FLOPs and bytes at the active fraction); `<backend> at roofline` is roofline time / fused time "
            "(100% = at the machine's bound)."]
    sweep = sweep_table(results)
    if sweep:
        out += ["", "### Time vs active fraction (forward + backward, {}@{}²)".format(
            *results["settings"]["sweep_shape"][:2]), ""] + sweep
    batch = batch_table(results)
    if batch:
        out += ["", "### Batch sweep (forward + backward, mask ratio {})".format(results["mask_ratio"]), ""] + batch
    out += ["", "### SparK training step (forward, backward, optimizer)", ""] + models_table(results)
    errors = failures(results)
    if errors:
        out += ["", "### Failed measurements", ""] + [f"- {impl} ({n} cases): {msg}" for (impl, msg), n in errors.items()]
    if plots:
        out += [""] + [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def write_plots(results: Dict[str, object], out_dir: str, link_base: Optional[str] = None) -> List[str]:
    """PNG plots of the results; returns their paths (relative to link_base when given)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    backends = results["backends"]

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(os.path.relpath(path, link_base) if link_base else path)

    rows = [r for r in results["ops"] if r["pass"] == "forward_backward"]
    # One bar per case: the first grad_out variant measured.
    first_grad = next((r.get("grad_out") for r in rows), None)
    rows = [r for r in rows if r.get("grad_out") == first_grad]
    nets = list(dict.fromkeys(r["net"] for r in rows))
    if rows:
        fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4), squeeze=False)
        for ax, net in zip(axes[0], nets):
            net_rows = [r for r in rows if r["net"] == net]
            ops = list(dict.fromkeys(r["op"] for r in net_rows))
            shapes = list(dict.fromkeys(f"{r['channels']}@{r['size']}²" for r in net_rows))
            contenders = backends + [COMPILED]
            width = 0.8 / max(len(ops) * len(contenders), 1)
            for i, op in enumerate(ops):
                for j, impl in enumerate(contenders):
                    xs, ys = [], []
                    for r in net_rows:
                        if r["op"] == op and r["speedup"].get(impl):
                            xs.append(shapes.index(f"{r['channels']}@{r['size']}²"))
                            ys.append(r["speedup"][impl])
                    if xs:
                        k = i * len(contenders) + j
                        ax.bar([x - 0.4 + (k + 0.5) * width for x in xs], ys, width,
                               label=f"{op} {impl}", hatch="//" if impl == COMPILED else None)
                if net == "convnext_tiny" and op in results["targets"]["ops"]:
                    ax.axhline(results["targets"]["ops"][op], color=f"C{i}", linestyle=":", linewidth=1)
            ax.axhline(1, color="black", linewidth=0.8)
            ax.set_yscale("log")  # ratios: slowdowns and speedups alike
            ax.set_xticks(range(len(shapes)), shapes)
            ax.set_ylabel("speedup over the reference (fwd+bwd, log)")
            ax.set_title(f"{net} stages, batch {results['settings']['batch']}"
                         + (" (dotted: targets)" if net == "convnext_tiny" else ""))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        save(fig, "speedup.png")

    sweep = results["sweeps"]["mask_ratio"]
    if sweep:
        ops = list(dict.fromkeys(r["op"] for r in sweep))
        fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 3.8), squeeze=False)
        for ax, op in zip(axes[0], ops):
            op_rows = sorted((r for r in sweep if r["op"] == op), key=lambda r: r["active_fraction"])
            fs = [r["active_fraction"] for r in op_rows]
            for impl in [REFERENCE] + backends:
                pts = [(r["active_fraction"], _median(r["times"], impl) * 1e3) for r in op_rows
                       if _median(r["times"], impl) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
                    if impl != REFERENCE:  # ideal: cost proportional to the active fraction
                        f_max, t_max = max(pts)
                        ax.plot([0, f_max], [0, t_max], linestyle="--", color="gray", linewidth=0.8,
                                label=f"{impl} ideal (linear)")
            if all("roofline_s" in r for r in op_rows):
                ax.plot(fs, [r["roofline_s"] * 1e3 for r in op_rows], linestyle=":", color="black", label="roofline")
            ax.set_xlabel("active fraction")
            ax.set_ylabel("ms (fwd+bwd)")
            ax.set_title(op)
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        save(fig, "mask_sweep.png")

    batch = results["sweeps"]["batch"]
    if batch:
        ops = list(dict.fromkeys(r["op"] for r in batch))
        fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 3.8), squeeze=False)
        for ax, op in zip(axes[0], ops):
            op_rows = sorted((r for r in batch if r["op"] == op), key=lambda r: r["batch"])
            for impl in [REFERENCE] + backends:
                pts = [(r["batch"], _median(r["times"], impl) / r["batch"] * 1e3) for r in op_rows
                       if _median(r["times"], impl) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch")
            ax.set_ylabel("ms per image (fwd+bwd)")
            ax.set_title(op)
            ax.legend(fontsize=7)
        save(fig, "batch_sweep.png")

    models = [r for r in results["models"]["rows"] if "images_per_s" in r]
    if models:
        names = list(dict.fromkeys(r["model"] for r in models))
        impls = list(dict.fromkeys(r["backend"] for r in models))
        fig, ax = plt.subplots(figsize=(5, 3.8))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            pts = [(names.index(r["model"]), r["images_per_s"]) for r in models if r["backend"] == impl]
            ax.bar([x - 0.4 + (j + 0.5) * width for x, _ in pts], [y for _, y in pts], width, label=impl)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("images/s (SparK training step)")
        ax.legend()
        save(fig, "images_per_s.png")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results JSON file of `python -m bench`")
    parser.add_argument("--out", help="write the markdown here (default: stdout)")
    parser.add_argument("--plots", help="write the PNG plots into this directory")
    args = parser.parse_args(argv)
    results = load(args.results)
    link_base = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    plots = write_plots(results, args.plots, link_base) if args.plots else []
    text = render_markdown(results, plots)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
