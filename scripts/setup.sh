#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with pinned torch, the dependencies, and the
# C++/CUDA extension built in place against that torch (no build isolation, so pip does not fetch
# another torch to build with). Idempotent: re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-test.txt

# CUDA kernels compile when nvcc is present (the extension still imports and runs on CPU-only machines).
if command -v nvcc >/dev/null 2>&1; then
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
fi
export MAX_JOBS=${MAX_JOBS:-2}
python -m pip install -q -e . --no-build-isolation
python -c "import spark_kernels as sk; print('spark_kernels backends available here:', sk.available_backends())"
