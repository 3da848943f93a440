#!/usr/bin/env bash
# The op tests against the C++ extension built with AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Not part of CI (scripts/test.sh runs the torch-free C++ unit tests under ASan/UBSan instead). This
# builds spark_kernels._C with -fsanitize=address,undefined into build/asan (the in-place build in
# spark_kernels/ is untouched), stages a copy of the Python package with that build, and runs the
# op tests with the sanitizer runtimes preloaded (torch and Python themselves are not instrumented:
# only the kernels' memory accesses are checked). Any report aborts the run with a stack trace.
#
#   scripts/asan_extension.sh [pytest args]      # default: the op, hostile-input and property tests
#
# Measured once on the 2-core development machine under load (other builds running): 11.5 minutes in
# total (build and 1,065 tests, none reported by the sanitizers).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -z "${VIRTUAL_ENV:-}" ]; then
  for venv in .venv /work/venv; do [ -f "$venv/bin/activate" ] && { . "$venv/bin/activate"; break; }; done
fi

BUILD=$ROOT/build/asan
SANITIZE="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
rm -rf "$BUILD/stage"
mkdir -p "$BUILD/stage"

# CFLAGS/LDFLAGS reach the compile and link lines of setuptools' build (and torch's ninja build).
CFLAGS="$SANITIZE" LDFLAGS="$SANITIZE" SPARK_KERNELS_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
  python setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/temp" >"$BUILD/build.log" 2>&1 \
  || { tail -30 "$BUILD/build.log"; exit 1; }

cp -r spark_kernels "$BUILD/stage/"
find "$BUILD/stage" -name "_C*.so" -delete
cp "$BUILD"/lib/spark_kernels/_C*.so "$BUILD/stage/spark_kernels/"
ldd "$BUILD"/stage/spark_kernels/_C*.so | grep -q libasan || { echo "the build is not instrumented" >&2; exit 1; }

# Python and torch allocate without freeing at exit: leak checking would only report them.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:print_stacktrace=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export PYTHONPATH=$BUILD/stage:$ROOT/tests
if [ $# -eq 0 ]; then
  set -- $(ls tests/test_depthwise_conv.py tests/test_batch_norm.py tests/test_layer_norm.py tests/test_group_norm.py \
    2>/dev/null) \
    tests/test_hostile_inputs.py tests/test_properties.py tests/test_determinism.py
fi
# Run from the staging directory so `import spark_kernels` finds the instrumented copy.
cd "$BUILD/stage"
python - <<'EOF'
import spark_kernels as sk
assert "cpu" in sk.available_backends(), sk.unavailable_reasons()
print("instrumented extension:", sk._native.__file__.replace("_native.py", ""), sk.available_backends())
EOF
python -m pytest -q -p no:cacheprovider "${@/#tests\//$ROOT/tests/}"
