"""The benchmark suite of spark-kernels.

    python -m bench [--quick] [--out FILE.json] [--backends cpu ...] [--no-compile] [--sections ...]
    python -m bench compare OLD.json NEW.json [--tolerance 0.1]
    python -m bench report RESULTS.json [--out REPORT.md] [--plots DIR]

A run measures, in one process: every op (fused backends, the masked-dense reference and the reference
under torch.compile) at the ConvNeXt-T and ResNet-50 stage shapes, a mask-ratio and a batch sweep, whole
SparK training steps, and this machine's FLOP/s and bandwidth bounds. It writes the results JSON, the
markdown report and the PNG plots under bench/results/ (see docs/bench.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys

from . import compare, report, suite

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SECTIONS = ("machine", "ops", "sweeps", "models")


def run_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer shapes, passes, repeats and compiled cases (< 5 min on 2 cores)")
    parser.add_argument("--out", help="results JSON path (default: bench/results/<time>-<quick|full>.json)")
    parser.add_argument("--backends", nargs="+", help="fused backends to measure (default: every available one)")
    parser.add_argument("--no-compile", action="store_true", help="skip the reference under torch.compile")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, help="torch threads (default: 2, docs/design.md section 6)")
    parser.add_argument("--repeats", type=int, help="timed repeats per case")
    parser.add_argument("--precision", choices=tuple(suite.DTYPES),
                        help="ops in this dtype (norm parameters float32), model steps under autocast to it "
                             "(default: fp32)")
    args = parser.parse_args(argv)

    settings = suite.Settings(**(suite.QUICK if args.quick else {}))
    overrides = {"backends": args.backends, "threads": args.threads, "repeats": args.repeats,
                 "precision": args.precision}
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_compile:
        settings = dataclasses.replace(settings, compile_stages=())

    results = suite.run(settings, args.sections)
    out = args.out or os.path.join(RESULTS_DIR, datetime.datetime.now().strftime("%Y%m%d-%H%M%S") +
                                   ("-quick" if args.quick else "-full") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    stem = os.path.splitext(out)[0]
    plots = report.write_plots(results, stem + "-plots", os.path.dirname(os.path.abspath(out)))
    with open(stem + ".md", "w") as f:
        f.write(report.render_markdown(results, plots))
    print(report.render_markdown(results))
    print(f"results: {out}\nreport: {stem}.md, plots: {stem}-plots/\n"
          f"duration: {results['duration_s'] / 60:.1f} min", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":
        return compare.main(argv[1:])
    if argv and argv[0] == "report":
        return report.main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
