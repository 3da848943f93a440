"""The CPU kernels are deterministic: bit-identical forward and backward results (outputs, every
gradient, BN's running statistics) run to run and across torch.set_num_threads(1) vs 2.

The kernels split the active sites into a fixed partition that does not depend on the thread count
and reduce partial results in a fixed order. The extension links the libgomp that torch ships (same
soname, loaded by torch first), so torch.set_num_threads sets the kernels' OpenMP thread count too.
Only the "cpu" backend is covered: the reference's own determinism is PyTorch's business. Every test
case of the op registry runs in both memory orders of x (so both kernel layouts); the per-op files add
larger shapes and bfloat16 for BN and LN (test_*::test_*_across_runs_and_threads).
"""
import pytest
import torch

from helpers import kernel_backends
from test_hostile_inputs import KERNEL_LAYOUTS, OPS, kernel_layout_views, kernel_op, make_inputs, run

N, C, H, W = 4, 24, 20, 20  # enough sites per image for every thread to get work
# (op, the kernel layout x is processed in).
CASES = [(op, layout) for op in OPS for layout in KERNEL_LAYOUTS]


def cpu_backend_params():
    params = []
    for op, layout in CASES:
        for p in kernel_backends(kernel_op(op)):
            if p.values[0] == "cpu":
                params.append(pytest.param(op, layout, marks=p.marks, id=f"{op}-{layout}"))
    return params


def results(op, layout, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(op, N, C, H, W, dtype=torch.float32, seed=21)
        mask = torch.rand(N, 1, H, W, generator=torch.Generator().manual_seed(22)) > 0.6
        y, grads, args = run(op, "cpu", inputs, mask, views=kernel_layout_views(op, layout))
    finally:
        torch.set_num_threads(before)
    tensors = {"output": y, **{f"gradient of {k}": g for k, g in grads.items()}}
    tensors.update({k: args[k] for k in ("running_mean", "running_var") if k in args})
    return tensors


@pytest.mark.parametrize("op, layout", cpu_backend_params())
def test_bit_identical_across_runs_and_thread_counts(op, layout):
    first = results(op, layout, threads=2)
    again = results(op, layout, threads=2)
    single = results(op, layout, threads=1)
    for name, value in first.items():
        assert torch.equal(value, again[name]), f"{op}: {name} differs between two runs with 2 threads"
        assert torch.equal(value, single[name]), f"{op}: {name} differs between 2 threads and 1 thread"
