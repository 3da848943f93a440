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

python -m pytest tests -q "$@"
