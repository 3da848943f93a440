"""Compile every Triton kernel configuration the dispatcher can pick for one GPU target, without a GPU.

Run by tests/test_triton_compile.py in a subprocess without TRITON_INTERPRET (the interpreter replaces
triton.jit functions by Python ones, which cannot be compiled). Prints one JSON line per kernel
configuration: its name, registers, local memory (spill) and stack bytes, shared memory bytes.
Usage: python triton_compile_worker.py <compute capability, e.g. 80> [kernel name filter]
       python triton_compile_worker.py specialized <capability>   (as launched at the benchmark shapes: every
           pointer 16-byte aligned, C and H*W divisible by 16; adds the count of 128-bit global loads)
       python triton_compile_worker.py trace   (traces the GPU ops, registered as triton_op, on fake CUDA tensors)
       python triton_compile_worker.py guard   (the CUDA device current at each launch, for tensors on cuda:1)
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

from spark_kernels.triton import common, kernel_modules, layer_norm

KERNEL_MODULES = kernel_modules()  # every Triton module of the op registry; importing one registers its ops
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def all_configs():
    """Every kernel configuration of every Triton module of the op registry, and the shared reduction."""
    for module in KERNEL_MODULES:
        yield from module.compile_configs()
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


# Integer arguments Triton's launcher sees divisible by 16 at the benchmark shapes (C = 96 ... 2048, H*W =
# 56², 28², 14²; 7² is not, and M, the active-site count, is arbitrary).
DIVISIBLE_AT_BENCHMARK_SHAPES = {"C", "HW"}


def launch_specialization(signature) -> dict:
    """Triton's launch-time attributes for the benchmark shapes: pointers from PyTorch allocations are
    16-byte aligned, and C, HW there are multiples of 16."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
            if kind.startswith("*") or name in DIVISIBLE_AT_BENCHMARK_SHAPES}


def compile_and_measure(kernel, signature, constexprs, target, options, attrs=None) -> dict:
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
    usage = resource_usage(compiled.asm["cubin"])
    usage["v4_loads"] = len(re.findall(r"\bld\.global(?:\.\w+)*\.v4\.", compiled.asm["ptx"]))
    # Triton allocates its shared memory dynamically (metadata.shared); cuobjdump sees only static shared.
    usage["shared"] = max(compiled.metadata.shared, usage["shared"])
    return usage


def main(capability: int, only: str = "", specialized: bool = False) -> None:
    target = GPUTarget("cuda", capability, 32)
    # Probe: the same measurement must see spills when registers are capped far below the kernel's need.
    kernel, signature, constexprs, num_warps = next(iter(layer_norm.compile_configs()))
    usage = compile_and_measure(kernel, signature, constexprs, target, {"num_warps": num_warps, "maxnreg": 24})
    print(json.dumps({"name": "probe: ln_forward_kernel capped at 24 registers", "probe": True, **usage}), flush=True)
    for kernel, signature, constexprs, num_warps in all_configs():
        if only not in kernel.__name__:
            continue
        attrs = launch_specialization(signature) if specialized else None
        usage = compile_and_measure(kernel, signature, constexprs, target, {"num_warps": num_warps}, attrs)
        dtypes = sorted({v for v in signature.values() if v.startswith("*") and v not in ("*i32", "*fp32")}) or ["fp32"]
        name = f"{kernel.__name__}[{dtypes[0].lstrip('*')} {constexprs} warps={num_warps}]"
        print(json.dumps({"name": name, "kernel": kernel.__name__, "rows": constexprs.get("ROWS"), **usage}), flush=True)


def run_every_op(device: str) -> None:
    """Every op's host code (the triton_op bodies, as torch.compile traces them) on fake tensors of `device`,
    in both layouts and all kernel dtypes, checking the outputs' shapes, dtypes and memory formats."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from spark_kernels._layout import kernel_memory_format

    assert not common.INTERPRET
    ops = torch.ops.spark_kernels
    n, c, h, w, m, k = 2, 96, 14, 14, 150, 7
    with FakeTensorMode():
        for dtype in common.KERNEL_DTYPES:
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.empty(n, c, h, w, device=device, dtype=dtype).to(memory_format=fmt)
                g = torch.empty_like(x)
                wt, b = torch.empty(c, 1, k, k, device=device, dtype=dtype), torch.empty(c, device=device, dtype=dtype)
                vec = torch.empty(c, device=device, dtype=torch.float32)
                index = torch.empty(m, device=device, dtype=torch.int32)
                nbrs = torch.empty(m, k * k, device=device, dtype=torch.int32)
                site_stats = torch.empty(m, device=device, dtype=torch.float32)
                dense = [ops.triton_dwconv_forward(x, wt, b, index, nbrs),
                         ops.triton_bn_elemt(x, index, vec, vec), ops.triton_bn_backward_elemt(g, x, index, vec, vec, vec)]
                grad_x, grad_w, grad_b = ops.triton_dwconv_backward(g, x, wt, index, nbrs)
                y, mean, rstd = ops.triton_ln_forward(x, index, vec, None, 1e-6)
                ln_gx, ln_gw, ln_gb = ops.triton_ln_backward(g, x, index, None, site_stats, site_stats)
                for t in dense + [grad_x, y, ln_gx]:
                    assert t.shape == x.shape and t.dtype == dtype and t.is_contiguous(memory_format=kernel_memory_format(x))
                assert grad_w.shape == wt.shape and grad_w.dtype == dtype and grad_b.shape == (c,)
                # Stride 2: index and table of the (7x7) output's sites, the input gradient through x's.
                out_index = torch.empty(m // 4, device=device, dtype=torch.int32)
                out_nbrs = torch.empty(m // 4, k * k, device=device, dtype=torch.int32)
                y2 = ops.triton_dwconv_forward(x, wt, b, out_index, out_nbrs, 2)
                assert y2.shape == (n, c, h // 2, w // 2) and y2.dtype == dtype
                assert y2.is_contiguous(memory_format=kernel_memory_format(x))
                grad_x2, grad_w2, _ = ops.triton_dwconv_backward(torch.empty_like(y2), x, wt, out_index, out_nbrs, 2,
                                                                 index, nbrs)
                assert grad_x2.shape == x.shape and grad_x2.is_contiguous(memory_format=kernel_memory_format(x))
                assert grad_w2.shape == wt.shape
                for stats in (ops.triton_bn_stats(x, index), ops.triton_bn_backward_stats(g, x, index, vec)):
                    assert stats.shape == (2, c) and stats.dtype == torch.float64
                assert mean.shape == rstd.shape == (m,) and mean.dtype == torch.float32
                assert ln_gw.shape == ln_gb.shape == (c,) and ln_gw.dtype == torch.float32
                table = torch.empty(n, c, device=device, dtype=torch.float32)
                for t in (ops.triton_gn_elemt(x, index, table, table, table),
                          ops.triton_gn_backward_elemt(g, x, index, table, table, table, table)):
                    assert t.shape == x.shape and t.dtype == dtype and t.is_contiguous(memory_format=kernel_memory_format(x))
                for stats in (ops.triton_gn_stats(x, index), ops.triton_gn_backward_stats(g, x, index, table)):
                    assert stats.shape == (n, 2, c) and stats.dtype == torch.float64


def trace() -> None:
    run_every_op("cuda")
    print("traced")


def guard() -> None:
    """Every op on fake cuda:1 tensors while cuda:0 is current, on a pretended 2-GPU machine: each launch must
    find cuda:1 current (prints the number of launches checked)."""
    import torch

    current = [0]
    launches = []

    class FakeDeviceContext:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            self.previous, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.previous

    def fake_wrap_triton(kernel):
        def at_grid(grid):
            def run(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                launches.append(kernel.__name__)
                if devices != {torch.device("cuda", current[0])}:
                    raise AssertionError(f"{kernel.__name__} launched with cuda:{current[0]} current on {devices}")
            return run
        return type("Launcher", (), {"__getitem__": lambda self, grid: at_grid(grid)})()

    common.cuda_available = lambda: True
    torch.cuda.device = FakeDeviceContext
    common.wrap_triton = fake_wrap_triton
    run_every_op("cuda:1")
    assert current[0] == 0, "the device guard did not restore the current device"
    print(f"guarded {len(launches)} launches")


if __name__ == "__main__":
    if sys.argv[1] == "trace":
        trace()
    elif sys.argv[1] == "guard":
        guard()
    elif sys.argv[1] == "specialized":
        main(int(sys.argv[2]), specialized=True)
    else:
        main(int(sys.argv[1]), *sys.argv[2:])
