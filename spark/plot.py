"""Loss and learning-rate curves of spark-pretrain runs, from their log.jsonl (also `spark-plot`).

    python -m spark.plot RUN_DIR                       # writes RUN_DIR/loss.png
    python -m spark.plot runs/fp32 runs/bf16 --out cmp.png   # overlays several runs

spark-pretrain rewrites RUN_DIR/loss.png itself at each checkpoint and at the end of a run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from .checkpoint import atomic_write

LOG_NAME = "log.jsonl"
LOSS_PLOT_NAME = "loss.png"
PROG = "spark-plot"


class PlotError(Exception):
    """A run cannot be plotted; str() is a one-line message for the user."""


def read_log(run_dir: str) -> List[Dict]:
    """The records of RUN_DIR/log.jsonl, in order (a torn last line from a killed run is ignored)."""
    path = os.path.join(run_dir, LOG_NAME)
    if not os.path.isfile(path):
        raise PlotError(f"{run_dir}: no {LOG_NAME} (not a spark-pretrain output folder?)")
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record and "loss" in record:
                records.append(record)
    return records


def loss_figure(run_dirs: Sequence[str], labels: Optional[Sequence[str]] = None):
    """A matplotlib figure: loss (top) and learning rate (bottom) against the step, one line per run."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    labels = list(labels) if labels is not None else [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    figure = Figure(figsize=(7, 5.5), layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for run_dir, label in zip(run_dirs, labels):
        records = read_log(run_dir)
        steps = [r["step"] for r in records]
        loss_axes.plot(steps, [r["loss"] for r in records], marker="." if len(records) < 40 else None, label=label)
        lr_axes.plot(steps, [r["lr"] for r in records], label=label)
    loss_axes.axhline(1.0, color="gray", linestyle=":", linewidth=1, label="predict the patch mean")
    loss_axes.set_ylabel("masked-patch loss")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend(fontsize="small")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("step")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_axes.grid(alpha=0.3)
    return figure


def write_loss_plot(run_dirs: Sequence[str], path: str, labels: Optional[Sequence[str]] = None) -> None:
    """Render loss_figure to a PNG at `path`, replacing it atomically."""
    buffer = io.BytesIO()
    loss_figure(run_dirs, labels).savefig(buffer, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Plot the loss and learning rate of spark-pretrain "
                                                            "runs against the step, overlaid.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="spark-pretrain --out folders")
    parser.add_argument("--out", metavar="PNG", default=None,
                        help=f"output file (default: RUN_DIR/{LOSS_PLOT_NAME} for one run, {LOSS_PLOT_NAME} in the "
                             f"current folder for several)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend labels (default: the folder names)")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        print(f"{PROG}: error: --labels: {len(args.labels)} labels for {len(args.run_dirs)} runs", file=sys.stderr)
        return 2
    out = args.out or (os.path.join(args.run_dirs[0], LOSS_PLOT_NAME) if len(args.run_dirs) == 1 else LOSS_PLOT_NAME)
    try:
        write_loss_plot(args.run_dirs, out, args.labels)
    except PlotError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG}: error: {out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
