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

# CUDA kernels compile when nvcc is present (setup.py finds the toolkit from nvcc; the extension still
# imports and runs on CPU-only machines).
export MAX_JOBS=${MAX_JOBS:-2}
python -m pip install -q -e . --no-build-isolation
python -c "import spark_kernels as sk; print('spark_kernels backends available here:', sk.available_backends())"
