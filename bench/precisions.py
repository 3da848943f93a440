"""Fused kernels in a 16-bit precision against themselves in fp32, interleaved in one process.

    python -m bench.precisions [--precision bf16] [--net convnext_tiny] [--ops dwconv7 ...] [--stages 768@7 ...]
                               [--repeats 15] [--threads 2] [--json FILE]

Forward + backward of the fused backend per stage shape (the cases of bench/ops.py, random grad_out), the two
precisions called alternately with nothing between them; prints each median and "16-bit vs fp32" (fp32 time over
16-bit time: above 1 where the 16-bit kernel is faster). This is the measure of the target "every op at least as
fast in bf16 as in fp32": `python -m bench.ops --precision bf16` times each precision against its own reference,
and the bf16 reference (a slow generic convolution on CPUs without native bf16) between the fused calls leaves
them colder caches and idle threads, which at the small late-stage shapes cost more than the kernels' own
difference.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from spark.precision import DTYPES

from .common import BATCH, NET_OPS, STAGES, THREADS, environment, interleaved_times
from .ops import OPS, make_case, parse_with_stages

REFERENCE_PRECISION = "fp32"


def measure(op: str, stage: tuple, precision: str, batch: int, repeats: int, backend: str) -> dict:
    """One row: the fused op's forward + backward medians in fp32 and in `precision`, interleaved."""
    channels, size, patch = stage
    runners = {name: make_case(op, channels, size, patch, batch, dtype=DTYPES[name]).runner(backend, True)
               for name in (REFERENCE_PRECISION, precision)}
    times = interleaved_times(runners, repeats, warmup=2)
    fp32, low = times[REFERENCE_PRECISION]["median"], times[precision]["median"]
    return {"op": op, "channels": channels, "size": size, "batch": batch, "times": times,
            f"{precision}_vs_{REFERENCE_PRECISION}": fp32 / low}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=[p for p in DTYPES if p != REFERENCE_PRECISION], default="bf16")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--net", choices=sorted(STAGES), default="convnext_tiny", help="whose stage shapes")
    parser.add_argument("--ops", nargs="+", choices=OPS, help="default: the net's targeted ops")
    parser.add_argument("--stages", nargs="+", metavar="C@H", help="only these of the network's stages")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--json", help="write the rows to this file")
    args, stages = parse_with_stages(parser, argv)
    torch.set_num_threads(args.threads)
    ratio = f"{args.precision}_vs_{REFERENCE_PRECISION}"
    rows = [measure(op, stage, args.precision, args.batch, args.repeats, args.backend)
            for op in args.ops or NET_OPS[args.net] for stage in stages]
    env = environment()
    print(f"{args.backend}, forward + backward, batch {args.batch}, {args.threads} threads, allocator: "
          f"{env['allocator']}; {args.precision} vs {REFERENCE_PRECISION} = {REFERENCE_PRECISION} time / "
          f"{args.precision} time\n")
    print(f"| net | op | C@H² | {REFERENCE_PRECISION} ms | {args.precision} ms | {args.precision} vs "
          f"{REFERENCE_PRECISION} |\n|---|---|---|---|---|---|")
    for r in rows:
        ms = {name: r["times"][name]["median"] * 1e3 for name in (REFERENCE_PRECISION, args.precision)}
        print(f"| {args.net} | {r['op']} | {r['channels']}@{r['size']} | {ms[REFERENCE_PRECISION]:.2f} | "
              f"{ms[args.precision]:.2f} | {r[ratio]:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m bench.precisions " + " ".join(sys.argv[1:] if argv is None else argv),
                       "environment": env, "net": args.net, "precision": args.precision, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
