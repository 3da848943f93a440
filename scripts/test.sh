#!/usr/bin/env bash
# The test suite: C++ unit tests of the shared kernel math (plain and under ASan/UBSan) with ctest,
# then the Python suite with pytest. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

for variant in plain asan; do
  sanitize=$([ "$variant" = asan ] && echo ON || echo OFF)
  cmake -S . -B "build/ctest-$variant" -DSPARK_KERNELS_SANITIZE=$sanitize >/dev/null
  cmake --build "build/ctest-$variant" -j2 >/dev/null
  ctest --test-dir "build/ctest-$variant" --output-on-failure
done

# The suite skips fused-backend tests only where a backend cannot exist; here the CPU kernels must have
# been built, and the CUDA kernels too wherever nvcc is on the PATH.
python - <<'PY'
import shutil, torch, spark_kernels as sk
assert "cpu" in sk.available_backends(), f"the cpu backend is missing: {sk.unavailable_reasons()}"
if shutil.which("nvcc"):
    assert torch.ops.spark_kernels.built_with_cuda(), "nvcc is present but the CUDA kernels were not built"
print("backends:", sk.available_backends(), "| CUDA kernels built:", torch.ops.spark_kernels.built_with_cuda())
PY

python -m pytest tests -q "$@"
