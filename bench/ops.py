"""Microbenchmark of the ops: fused backend vs the masked-dense reference, in one process.

    python -m bench.ops [--backend cpu] [--batch 32] [--repeats 7] [--ops dwconv7 dwconv3 ...] [--compile]
                        [--net convnext_tiny|resnet50] [--grad-outs random expanded nchw] [--precision bf16]
                        [--json FILE]

Forward + backward per ConvNeXt-T (or ResNet-50, or EfficientNet-B0 for the 5x5 and strided depthwise convs)
stage shape (docs/design.md section 6), fp32 unless --precision says otherwise, channels_last inputs, SparK patch masks at ratio 0.6; prints the
median times and the speedup per shape next to the target.
The full suite (`python -m bench`) builds on the cases defined here.
The reference is the official SparK formulation: dense conv then mask (its best layout,
channels_last), and gather -> BatchNorm/LayerNorm -> scatter for the norms. GroupNorm (32 groups) has no
official formulation; its reference is the one the official code uses for every other norm: per image,
gather the active rows -> F.group_norm -> scatter (official_group_norm below). Its torch.compile contender
compiles the masked-dense reference of the "reference" backend instead (no per-image host syncs to break
the graph).
"""
from __future__ import annotations

import argparse
import json
import sys

from typing import Callable, Dict

import torch

import spark_kernels as sk
from spark_kernels import reference
from spark_kernels.masks import patch_mask, upsample_mask

from .common import BATCH, BENCH_CASES, CONVNEXT_T_STAGES, MASK_RATIO, STAGES, TARGETS, THREADS, group_norm_groups

OPS = tuple(BENCH_CASES)
REFERENCE = "reference"
# The grad_out a backward pass receives: random values in the output's layout (what a following conv gives),
# an expanded scalar 1 with every stride 0 (what y.sum().backward() gives), random values in the (N, C, H, W)
# memory order whatever the output's layout.
GRAD_OUTS = ("random", "expanded", "nchw")
COMPILED = "reference+compile"  # the reference under torch.compile (inductor): what a user would try instead

# One torch.compile'd reference function per op, reused across shapes as in a user's model (torch.compile
# recompiles on a new shape, then goes dynamic); built on first use.
_compiled: Dict[str, Callable] = {}


def _reference_fn(op: str) -> Callable:
    """The plain masked-dense reference of `op` taking (x, mask, weight, bias, running stats)."""
    spec, variant = BENCH_CASES[op]
    if spec.name == "sparse_depthwise_conv2d":
        return lambda x, mask, w, b, rm, rv: reference.sparse_depthwise_conv2d(x, w, b, mask, variant.stride)
    if spec.name == "masked_batch_norm":
        return lambda x, mask, w, b, rm, rv: reference.masked_batch_norm(x, mask, rm, rv, w, b, True, 0.1, 1e-5)
    if spec.name == "masked_group_norm":
        return lambda x, mask, w, b, rm, rv: reference.masked_group_norm(x, mask, group_norm_groups(x.shape[1]), w,
                                                                         b, 1e-5)
    channels_last = variant.channels_last_input
    return lambda x, mask, w, b, rm, rv: reference.masked_layer_norm(x, mask, w, b, 1e-6, channels_last)


def compiled_reference(op: str) -> Callable:
    if op not in _compiled:
        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        _compiled[op] = torch.compile(_reference_fn(op))
    return _compiled[op]


def official_group_norm(x: torch.Tensor, mask: torch.Tensor, num_groups: int, weight, bias,
                        eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm over active sites the way the official code wraps a dense norm: per image, gather the active
    rows (boolean indexing: a host sync per image), F.group_norm over them, scatter into zeros."""
    nhwc = x.permute(0, 2, 3, 1)
    out = torch.zeros_like(nhwc)
    for n in range(x.shape[0]):
        rows = nhwc[n][mask[n, 0]]  # (M_n, C)
        if rows.shape[0]:
            normed = torch.nn.functional.group_norm(rows.t()[None], num_groups, weight, bias, eps)[0].t()
            out[n] = out[n].index_put((mask[n, 0],), normed)
    return out.permute(0, 3, 1, 2)


class Case:
    """Inputs of one op at one shape and mask, and runners doing its forward (training mode, autograd
    recording) or forward + backward once, with the fused backends, the reference or the compiled one."""

    def __init__(self, op: str, channels: int, size: int, patch: int, batch: int, mask_ratio: float = MASK_RATIO,
                 seed: int = 0, dtype: torch.dtype = torch.float32, grad_out: str = "random"):
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if grad_out not in GRAD_OUTS:
            raise ValueError(f"grad_out must be one of {GRAD_OUTS}, got {grad_out!r}")
        self.grad_out = grad_out
        self.op, self.channels, self.size, self.patch, self.batch = op, channels, size, patch, batch
        self.dtype = dtype
        g = torch.Generator().manual_seed(seed)
        self.mask = upsample_mask(patch_mask(batch, size // patch, mask_ratio, generator=g), size, size)
        self.sites = sk.ActiveSites(self.mask)
        self.active_fraction = self.sites.active_fraction
        x = torch.randn(batch, channels, size, size, generator=g)
        # Activations in dtype; the conv weights too (a conv under autocast), norm parameters in float32
        # (the mixed-precision contract of the masked norms).
        x = torch.where(self.mask, x, 0).to(dtype).contiguous(memory_format=torch.channels_last)
        _, self.variant = BENCH_CASES[op]
        k = self.variant.kernel_size  # None for the norms
        self.stride = self.variant.stride or 1
        out_size = -(-size // self.stride)
        self.grad = torch.randn(batch, channels, out_size, out_size, generator=g).to(dtype).contiguous(
            memory_format=torch.channels_last)
        if grad_out == "nchw":
            self.grad = self.grad.contiguous()
        if self.variant.channels_last_input:
            x = x.permute(0, 2, 3, 1).contiguous()
            nhwc = self.grad.permute(0, 2, 3, 1)
            self.grad = nhwc if grad_out == "nchw" else nhwc.contiguous()
        if grad_out == "expanded":
            self.grad = torch.ones((), dtype=dtype).expand(self.grad.shape)
        self.x = x.requires_grad_()
        if k is not None:
            self.weight = torch.randn(channels, 1, k, k, generator=g).to(dtype).requires_grad_()
            # Built once per mask and scale in real use.
            self.sites.strided_neighbors(k, self.stride)
            if self.stride > 1:
                self.sites.transposed_taps(k, self.stride)
        else:
            self.weight = torch.randn(channels, generator=g).requires_grad_()
        self.bias = torch.randn(channels, generator=g).to(dtype if k is not None else torch.float32)
        self.bias.requires_grad_()
        self.running_mean, self.running_var = torch.zeros(channels), torch.ones(channels)

    def _forward(self, impl: str) -> Callable[[], torch.Tensor]:
        x, w, b, rm, rv = self.x, self.weight, self.bias, self.running_mean, self.running_var
        if impl == COMPILED:
            fn = compiled_reference(self.op)
            return lambda: fn(x, self.mask, w, b, rm, rv)
        active = self.mask if impl == REFERENCE else self.sites
        if self.op == "group_norm" and impl == REFERENCE:  # the official style (the module docstring)
            return lambda: official_group_norm(x, self.mask, group_norm_groups(self.channels), w, b)
        tensors = dict(x=x, weight=w, bias=b, running_mean=rm, running_var=rv)
        return lambda: self.variant.call(tensors, active, impl)

    def runner(self, impl: str, backward: bool = True) -> Callable[[], None]:
        forward = self._forward(impl)
        params = (self.x, self.weight, self.bias)

        def run():
            for p in params:
                p.grad = None
            y = forward()
            if backward:
                y.backward(self.grad)

        return run


def make_case(op: str, channels: int, size: int, patch: int, batch: int, seed: int = 0,
              mask_ratio: float = MASK_RATIO, dtype: torch.dtype = torch.float32, grad_out: str = "random") -> Case:
    return Case(op, channels, size, patch, batch, mask_ratio, seed, dtype, grad_out)


def parse_with_stages(parser: argparse.ArgumentParser, argv) -> tuple:
    """The parsed arguments of a command with --backend, --net and --stages "C@H ..." (all of the net's stages
    without it), and those (channels, size, patch) stages; a parser error for an unknown stage or an unavailable
    backend."""
    args = parser.parse_args(argv)
    if args.backend not in sk.available_backends():
        parser.error(f"--backend {args.backend!r} unavailable: {sk.unavailable_reasons().get(args.backend)}")
    stages = STAGES[args.net]
    if not args.stages:
        return args, stages
    by_name = {f"{channels}@{size}": (channels, size, patch) for channels, size, patch in stages}
    unknown = [name for name in args.stages if name not in by_name]
    if unknown:
        parser.error(f"--stages: {', '.join(unknown)} not among {args.net}'s stages {', '.join(by_name)}")
    return args, [stage for name, stage in by_name.items() if name in args.stages]


def main(argv=None) -> int:
    """The op table alone: `python -m bench --sections ops` at the ConvNeXt-T stages, forward + backward."""
    from . import report, suite  # the suite builds on this module

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--net", choices=sorted(STAGES), default="convnext_tiny", help="whose stage shapes")
    parser.add_argument("--stages", nargs="+", metavar="C@H",
                        help="only these of the network's stages, e.g. 384@14 768@7 (default: every stage)")
    parser.add_argument("--compile", action="store_true", help="also time the reference under torch.compile")
    parser.add_argument("--grad-outs", nargs="+", choices=GRAD_OUTS, default=["random"],
                        help="the grad_out variants of the backward pass (see GRAD_OUTS)")
    parser.add_argument("--precision", choices=tuple(suite.DTYPES), default="fp32",
                        help="the activations' dtype, the reference's too (norm parameters float32)")
    parser.add_argument("--json", help="write the results (the suite's format) to this file")
    args, stages = parse_with_stages(parser, argv)
    settings = suite.Settings(batch=args.batch, repeats=args.repeats, threads=args.threads, ops=tuple(args.ops),
                              stages={args.net: stages}, passes=("forward_backward",),
                              backends=[args.backend], compile_stages=None if args.compile else (),
                              grad_outs=tuple(args.grad_outs), precision=args.precision)
    results = suite.run(settings, ("ops",))
    print(f"Precision: {args.precision} activations (norm parameters float32), batch {args.batch}, "
          f"{args.threads} threads, allocator: {results['environment']['allocator']}")
    print("\n".join(report.ops_table(results)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
