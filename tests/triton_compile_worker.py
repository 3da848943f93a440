"""Compile every Triton kernel configuration the dispatcher can pick for one GPU target, without a GPU.

Run by tests/test_triton_compile.py in a subprocess without TRITON_INTERPRET (the interpreter replaces
triton.jit functions by Python ones, which cannot be compiled). Prints one JSON line per kernel
configuration: its name, registers, local memory (spill) and stack bytes, shared memory bytes.
Usage: python triton_compile_worker.py <compute capability, e.g. 80> [kernel name filter]
       python triton_compile_worker.py trace   (traces the GPU ops, registered as triton_op, on fake CUDA tensors)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spark_kernels.triton import batch_norm, common, dwconv, layer_norm

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def all_configs():
    yield from dwconv.compile_configs()
    yield from batch_norm.compile_configs()
    yield from layer_norm.compile_configs()
    yield from common.reduce_compile_configs()


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if set(fields) != {"REG", "STACK", "SHARED", "LOCAL"}:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{text}")
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_and_measure(kernel, signature, constexprs, target, options) -> dict:
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
    usage = resource_usage(compiled.asm["cubin"])
    # Triton allocates its shared memory dynamically (metadata.shared); cuobjdump sees only static shared.
    usage["shared"] = max(compiled.metadata.shared, usage["shared"])
    return usage


def main(capability: int, only: str = "") -> None:
    target = GPUTarget("cuda", capability, 32)
    # Probe: the same measurement must see spills when registers are capped far below the kernel's need.
    kernel, signature, constexprs, num_warps = next(iter(layer_norm.compile_configs()))
    usage = compile_and_measure(kernel, signature, constexprs, target, {"num_warps": num_warps, "maxnreg": 24})
    print(json.dumps({"name": "probe: ln_forward_kernel capped at 24 registers", "probe": True, **usage}), flush=True)
    for kernel, signature, constexprs, num_warps in all_configs():
        if only not in kernel.__name__:
            continue
        usage = compile_and_measure(kernel, signature, constexprs, target, {"num_warps": num_warps})
        dtypes = sorted({v for v in signature.values() if v.startswith("*") and v not in ("*i32", "*fp32")}) or ["fp32"]
        name = f"{kernel.__name__}[{dtypes[0].lstrip('*')} {constexprs} warps={num_warps}]"
        print(json.dumps({"name": name, **usage}), flush=True)


def trace() -> None:
    """Run every op's host code (the triton_op bodies, as torch.compile traces them) on fake CUDA tensors in
    both layouts and all kernel dtypes, and check the outputs' shapes, dtypes and memory formats."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from spark_kernels._layout import kernel_memory_format

    assert not common.INTERPRET
    ops = torch.ops.spark_kernels
    n, c, h, w, m, k = 2, 96, 14, 14, 150, 7
    with FakeTensorMode():
        for dtype in common.KERNEL_DTYPES:
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.empty(n, c, h, w, device="cuda", dtype=dtype).to(memory_format=fmt)
                g = torch.empty_like(x)
                wt, b = torch.empty(c, 1, k, k, device="cuda", dtype=dtype), torch.empty(c, device="cuda", dtype=dtype)
                vec = torch.empty(c, device="cuda", dtype=torch.float32)
                index = torch.empty(m, device="cuda", dtype=torch.int32)
                nbrs = torch.empty(m, k * k, device="cuda", dtype=torch.int32)
                site_stats = torch.empty(m, device="cuda", dtype=torch.float32)
                dense = [ops.triton_dwconv_forward(x, wt, b, index, nbrs),
                         ops.triton_bn_elemt(x, index, vec, vec), ops.triton_bn_backward_elemt(g, x, index, vec, vec, vec)]
                grad_x, grad_w, grad_b = ops.triton_dwconv_backward(g, x, wt, index, nbrs)
                y, mean, rstd = ops.triton_ln_forward(x, index, vec, None, 1e-6)
                ln_gx, ln_gw, ln_gb = ops.triton_ln_backward(g, x, index, None, site_stats, site_stats)
                for t in dense + [grad_x, y, ln_gx]:
                    assert t.shape == x.shape and t.dtype == dtype and t.is_contiguous(memory_format=kernel_memory_format(x))
                assert grad_w.shape == wt.shape and grad_w.dtype == dtype and grad_b.shape == (c,)
                for stats in (ops.triton_bn_stats(x, index), ops.triton_bn_backward_stats(g, x, index, vec)):
                    assert stats.shape == (2, c) and stats.dtype == torch.float64
                assert mean.shape == rstd.shape == (m,) and mean.dtype == torch.float32
                assert ln_gw.shape == ln_gb.shape == (c,) and ln_gw.dtype == torch.float32
    print("traced")


if __name__ == "__main__":
    if sys.argv[1] == "trace":
        trace()
    else:
        main(int(sys.argv[1]), *sys.argv[2:])
