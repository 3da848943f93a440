"""Microbenchmark of the three ops: fused backend vs the masked-dense reference, in one process.

    python -m bench.ops [--backend cpu] [--batch 32] [--repeats 7] [--ops dwconv7 dwconv3 ...] [--json FILE]

Forward + backward per ConvNeXt-T stage shape (DESIGN.md section 6), fp32, channels_last inputs, SparK
patch masks at ratio 0.6; prints the median times and the speedup per shape next to the target.
The reference is the official SparK formulation: dense conv then mask (its best layout,
channels_last), and gather -> BatchNorm/LayerNorm -> scatter for the norms.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import spark_kernels as sk
from spark_kernels.masks import patch_mask, upsample_mask

from .common import BATCH, CONVNEXT_T_STAGES, MASK_RATIO, TARGETS, THREADS, environment, median_time

OPS = tuple(TARGETS)


def make_case(op: str, channels: int, size: int, patch: int, batch: int, seed: int = 0):
    """Inputs and a `run(backend)` closure doing forward + backward of `op` once."""
    g = torch.Generator().manual_seed(seed)
    mask = upsample_mask(patch_mask(batch, size // patch, MASK_RATIO, generator=g), size, size)
    sites = sk.ActiveSites(mask)
    x = torch.randn(batch, channels, size, size, generator=g)
    x = torch.where(mask, x, 0).contiguous(memory_format=torch.channels_last)
    if op == "layer_norm_cl":
        x = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)
    x.requires_grad_()
    grad = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last) \
        if x.dim() == 4 and op != "layer_norm_cl" else torch.randn(x.shape, generator=g)
    w1 = torch.randn(channels, requires_grad=True)
    b1 = torch.randn(channels, requires_grad=True)
    if op.startswith("dwconv"):
        k = int(op[-1])
        weight = torch.randn(channels, 1, k, k, generator=g).requires_grad_()
        sites.neighbors(k)  # built once per mask and scale in real use

        def fn(backend):
            return sk.sparse_depthwise_conv2d(x, weight, b1, sites if backend != "reference" else mask, backend)
    elif op == "batch_norm":
        rm, rv = torch.zeros(channels), torch.ones(channels)

        def fn(backend):
            return sk.masked_batch_norm(x, sites if backend != "reference" else mask, rm, rv, w1, b1,
                                        training=True, backend=backend)
    else:
        fmt = "channels_last" if op == "layer_norm_cl" else "channels_first"

        def fn(backend):
            return sk.masked_layer_norm(x, sites if backend != "reference" else mask, w1, b1, 1e-6, fmt, backend)

    def run(backend):
        x.grad = None
        fn(backend).backward(grad)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.backend not in sk.available_backends():
        print(f"backend {args.backend!r} unavailable: {sk.unavailable_reasons().get(args.backend)}", file=sys.stderr)
        return 1
    env = environment()
    print(f"# {env['cpu']}, {env['threads']} threads, torch {env['torch']}, allocator: {env['allocator']}")
    print(f"# forward+backward, fp32, batch {args.batch}, SparK masks at ratio {MASK_RATIO}, medians of "
          f"{args.repeats}")
    print(f"{'op':<14}{'shape':<12}{'reference ms':>14}{args.backend + ' ms':>12}{'speedup':>9}{'target':>8}")
    rows = []
    for op in args.ops:
        for channels, size, patch in CONVNEXT_T_STAGES:
            run = make_case(op, channels, size, patch, args.batch)
            ref = median_time(lambda: run("reference"), args.repeats)
            fused = median_time(lambda: run(args.backend), args.repeats)
            speedup = ref["median"] / fused["median"]
            rows.append({"op": op, "channels": channels, "size": size, "batch": args.batch,
                         "reference_s": ref, "fused_s": fused, "speedup": speedup, "target": TARGETS[op],
                         "met": speedup >= TARGETS[op]})
            print(f"{op:<14}{f'{channels}@{size}²':<12}{ref['median'] * 1e3:>14.2f}{fused['median'] * 1e3:>12.2f}"
                  f"{speedup:>8.2f}x{TARGETS[op]:>7.1f}x{'' if speedup >= TARGETS[op] else '  (missed)'}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "backend": args.backend, "mask_ratio": MASK_RATIO, "results": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
