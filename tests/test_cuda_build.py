"""The CUDA kernels as built (csrc/cuda/*.cu in spark_kernels._C): ptxas's resource usage of every kernel,
read back from the cubins of the extension for each target (`cuobjdump -res-usage`), shows no register
spills: a stack frame and local memory of 0 bytes (a spill store or load needs both). Runs wherever the
extension was built with its CUDA kernels (CI builds them when nvcc is present); no GPU needed."""
import os
import re
import shutil
import subprocess

import pytest
import torch

import spark_kernels as sk


def _extension_path() -> str:
    from spark_kernels import _C
    return _C.__file__


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found is None and shutil.which("nvcc"):
        candidate = os.path.join(os.path.dirname(os.path.realpath(shutil.which("nvcc"))), "cuobjdump")
        found = candidate if os.path.exists(candidate) else None
    if found is None:
        import triton  # bundles one
        candidate = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        found = candidate if os.path.exists(candidate) else None
    return found


def _usage():
    if "cpu" not in sk.available_backends():
        pytest.skip(f"the extension is not built: {sk.unavailable_reasons().get('cpu')}")
    if not torch.ops.spark_kernels.built_with_cuda():
        pytest.skip("the extension was built without its CUDA kernels (no nvcc at build time)")
    tool = _cuobjdump()
    assert tool, "cuobjdump not found (CUDA toolkit or triton's bundled copy)"
    text = subprocess.run([tool, "-res-usage", _extension_path()], capture_output=True, text=True, check=True).stdout
    kernels = []
    arch = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", lines[i + 1]))
            kernels.append((arch, m.group(1), {k: int(v) for k, v in fields.items()}))
    return kernels


def test_every_cuda_kernel_is_built_for_sm80_and_sm90_without_spills():
    kernels = _usage()
    archs = {arch for arch, _, _ in kernels}
    assert {"sm_80", "sm_90"} <= archs, archs
    names = " ".join(name for _, name, _ in kernels)
    for kernel in ("channel_moments_kernel", "channel_partials_kernel", "reduce_columns_kernel", "gather_kernel",
                   "weight_grad_kernel", "active_map_kernel"):
        assert kernel in names, f"{kernel} not found in the extension's cubins"
    spills = [f"{arch} {name}: {usage}" for arch, name, usage in kernels if usage["STACK"] or usage["LOCAL"]]
    assert not spills, "CUDA kernels with a stack frame or local memory (spills):\n" + "\n".join(spills)
