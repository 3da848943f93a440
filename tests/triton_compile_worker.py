"""Compile every Triton kernel configuration the dispatcher can pick for one GPU target, without a GPU.

Run by tests/test_triton_compile.py in a subprocess without TRITON_INTERPRET (the interpreter replaces
triton.jit functions by Python ones, which cannot be compiled). Prints one JSON line per kernel
configuration: its name, registers, local memory (spill) and stack bytes, shared memory bytes.
Usage: python triton_compile_worker.py <compute capability, e.g. 80> [kernel name filter]
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


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:])
