"""Every Triton kernel, at every configuration the dispatcher can pick (every launch-table entry x dtype x
kernel size x flag), compiles for sm_80 and sm_90 without a GPU, without register spills, and within the
target's shared memory.

Compilation runs in a subprocess without TRITON_INTERPRET (tests/triton_compile_worker.py). Spills are read
from the cubin with `cuobjdump -res-usage`: ptxas puts spilled registers in the stack frame (STACK) or in
local memory (LOCAL); both must be 0. Triton's on-disk cache (~/.triton/cache) makes reruns fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from spark_kernels.triton import batch_norm, common, dwconv, group_norm, layer_norm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Shared memory per block (opt-in maximum) of the targets, bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
KERNELS = {"dwconv_taps_kernel", "dwconv_wgrad_kernel", "bn_moments_kernel", "bn_merge_moments_kernel",
           "bn_sums_kernel", "bn_elemt_kernel", "ln_forward_kernel",
           "ln_backward_kernel", "reduce_partials_kernel", "gn_moments_kernel", "gn_sums_kernel", "gn_elemt_kernel"}


def _expected_count() -> int:
    configs = [*dwconv.compile_configs(), *batch_norm.compile_configs(), *layer_norm.compile_configs(),
               *group_norm.compile_configs(), *common.reduce_compile_configs()]
    assert {k.__name__ for k, *_ in configs} == KERNELS
    return len(configs)


@pytest.fixture(scope="module")
def workers():
    """The worker subprocesses (one per target, and the trace), started together so they run in parallel."""
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    procs = {arg: subprocess.Popen([sys.executable, os.path.join(HERE, "triton_compile_worker.py"), arg,
                                    *(["90"] if arg == "specialized" else [])], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arg in [*map(str, sorted(SHARED_LIMIT)), "trace", "guard", "specialized"]}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _result(workers, arg: str) -> subprocess.CompletedProcess:
    proc = workers[arg]
    stdout, stderr = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("capability", sorted(SHARED_LIMIT))
def test_every_kernel_configuration_compiles_without_spills(workers, capability):
    proc = _result(workers, str(capability))
    assert proc.returncode == 0, f"compilation for sm_{capability} failed:\n{proc.stderr[-4000:]}"
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    probe, results = rows[0], rows[1:]
    assert probe.get("probe") and probe["stack"] + probe["local"] > 0, \
        f"the spill measurement did not see the spills of a register-starved kernel: {probe}"
    assert len(results) == _expected_count()
    spills = [r for r in results if r["stack"] or r["local"]]
    assert not spills, f"sm_{capability}: kernels spill registers:\n" + "\n".join(map(str, spills))
    too_big = [r for r in results if r["shared"] > SHARED_LIMIT[capability]]
    assert not too_big, f"sm_{capability}: kernels need too much shared memory:\n" + "\n".join(map(str, too_big))
    assert all(0 < r["reg"] <= 255 for r in results)


def test_gpu_ops_trace_on_fake_cuda_tensors(workers):
    """The GPU registration (triton_op) runs its host code on fake CUDA tensors, as torch.compile does."""
    proc = _result(workers, "trace")
    assert proc.returncode == 0 and proc.stdout.strip() == "traced", proc.stderr[-4000:]


def test_every_launch_runs_on_the_tensors_device(workers):
    """Every op on (fake) cuda:1 tensors while cuda:0 is current: each Triton launch finds cuda:1 current
    (tests/triton_compile_worker.py's guard mode fails on the first launch that does not)."""
    proc = _result(workers, "guard")
    assert proc.returncode == 0, proc.stderr[-4000:]
    launches = int(proc.stdout.split()[-2])
    # Per dtype and layout: dwconv forward 1, backward 3 (at stride 1 and at stride 2); BN stats 2, backward
    # stats 2, elemt 2; LN 1 + 2; GN stats 1, backward stats 1, elemt 2.
    assert launches == 6 * 21, proc.stdout


# The kernels that stream their tensors in the channels_last ("rows") layout: C contiguous values per site.
STREAMING = {"dwconv_taps_kernel", "dwconv_wgrad_kernel", "bn_moments_kernel", "bn_sums_kernel", "bn_elemt_kernel",
             "ln_forward_kernel", "ln_backward_kernel", "gn_moments_kernel", "gn_sums_kernel", "gn_elemt_kernel"}


def test_launch_specialized_kernels_do_not_spill_and_load_128_bits(workers):
    """sm_90, compiled as Triton compiles them when launched at the benchmark shapes (16-byte-aligned pointers,
    C and H*W multiples of 16): no spills (stack frame and local memory 0), and every channels_last streaming
    kernel loads its tensors with 128-bit loads (ld.global.v4 in the PTX)."""
    proc = _result(workers, "specialized")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()][1:]
    assert len(results) == _expected_count()
    spills = [r["name"] for r in results if r["stack"] or r["local"]]
    assert not spills, "kernels spill when specialized:\n" + "\n".join(spills)
    rows = [r for r in results if r["kernel"] in STREAMING and r["rows"]]
    assert len(rows) >= 10 * 3
    narrow = [r["name"] for r in rows if r["v4_loads"] == 0]
    assert not narrow, "channels_last kernels without 128-bit loads:\n" + "\n".join(narrow)
