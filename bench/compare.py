"""Compare two results files: every figure that moved by more than a tolerance.

    python -m bench compare OLD.json NEW.json [--tolerance 0.1]

A report for people, not a CI timing assertion: it always exits 0 when both files load.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Tuple

from .report import load

# figure name -> (value, True if higher is better)
Figures = Dict[str, Tuple[float, bool]]


def _case_key(section: str, r: Dict[str, object]) -> str:
    parts = [section, r.get("net", ""), r["op"], f"{r['channels']}@{r['size']}", f"batch {r['batch']}"]
    if section != "ops":
        parts.append(f"ratio {r['mask_ratio']:.2f}")
    parts.append(r["pass"])
    if r.get("grad_out") not in (None, "random"):  # results from before the variants were all "random"
        parts.append(f"grad_out {r['grad_out']}")
    return " ".join(p for p in parts if p)


def figures(results: Dict[str, object]) -> Figures:
    """Every comparable figure of a results file by a stable name: median times, speedups, images/s,
    peak memory and the machine bounds."""
    out: Figures = {}
    rows = [("ops", r) for r in results.get("ops", [])]
    for kind in ("mask_ratio", "batch"):
        rows += [(f"sweep {kind}", r) for r in results.get("sweeps", {}).get(kind, [])]
    for section, r in rows:
        key = _case_key(section, r)
        for impl, t in r["times"].items():
            if "median" in t:
                out[f"{key} {impl} median s"] = (t["median"], False)
        for impl, s in r["speedup"].items():
            if s is not None:
                out[f"{key} {impl} speedup"] = (s, True)
    for r in results.get("models", {}).get("rows", []):
        key = f"model {r['model']} {r['backend']} batch {r['batch']}"
        if "images_per_s" in r:
            out[f"{key} images/s"] = (r["images_per_s"], True)
        if r.get("peak_memory_bytes") is not None:
            out[f"{key} peak memory bytes"] = (r["peak_memory_bytes"], False)
    for name, value in (results.get("machine") or {}).items():
        if name.endswith("_per_s"):
            out[f"machine {name}"] = (value, True)
    return out


def compare(old: Dict[str, object], new: Dict[str, object], tolerance: float) -> Dict[str, List]:
    """Figures whose relative change |new / old - 1| exceeds tolerance, split into worse and better, and
    the names present in only one of the files."""
    a, b = figures(old), figures(new)
    worse, better = [], []
    for name in a.keys() & b.keys():
        (va, higher_is_better), (vb, _) = a[name], b[name]
        if va == 0:
            continue
        change = vb / va - 1
        if abs(change) > tolerance:
            (better if (change > 0) == higher_is_better else worse).append((name, va, vb, change))
    order = lambda item: -abs(item[3])  # noqa: E731 - largest moves first
    return {"worse": sorted(worse, key=order), "better": sorted(better, key=order),
            "only_old": sorted(a.keys() - b.keys()), "only_new": sorted(b.keys() - a.keys())}


def format_report(diff: Dict[str, List], tolerance: float, old_env: Dict, new_env: Dict) -> str:
    lines = [f"# figures that moved by more than {tolerance:.0%}",
             f"# old: allocator {old_env.get('allocator')}, load {old_env.get('load_average', ['?'])[0]}, "
             f"torch {old_env.get('torch')}; new: allocator {new_env.get('allocator')}, "
             f"load {new_env.get('load_average', ['?'])[0]}, torch {new_env.get('torch')}"]
    for label in ("worse", "better"):
        lines.append(f"{label.upper()} ({len(diff[label])})")
        for name, va, vb, change in diff[label]:
            lines.append(f"  {change:+7.1%}  {name}: {va:.4g} -> {vb:.4g}")
    for label in ("only_old", "only_new"):
        if diff[label]:
            lines.append(f"{label.replace('_', ' in ')} file ({len(diff[label])}): " + "; ".join(diff[label][:20]) +
                         (" ..." if len(diff[label]) > 20 else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--tolerance", type=float, default=0.1, help="relative change to report (0.1 = 10%%)")
    args = parser.parse_args(argv)
    if args.tolerance < 0:
        parser.error(f"--tolerance must be >= 0, got {args.tolerance}")
    old, new = load(args.old), load(args.new)
    print(format_report(compare(old, new, args.tolerance), args.tolerance, old["environment"], new["environment"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
