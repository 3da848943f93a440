#!/usr/bin/env bash
# The GPU acceptance run, one command on a machine with a CUDA GPU, PyTorch (>= 2.6, with CUDA) and Triton
# already installed, and no network:
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default OUT_DIR: gpu-check-<date>)
#
# 1. builds the C++/CUDA extension in place against the installed torch (no pip, no download), for this
#    GPU's architecture only;
# 2. runs the Triton, CUDA and generated-support tests compiled (TRITON_INTERPRET=0: "triton" and "cuda" on
#    CUDA tensors);
# 3. measures the GPU (copy bandwidth, fp32 FMA rate), then every op on both GPU backends against the
#    reference, fp32 and bf16, with each pass's roofline fraction (python -m bench.gpu);
# 4. SparK training steps of resnet50 and convnext_tiny at 224, fused vs reference, bf16 autocast and fp32.
# Each part is time-boxed (sized for an H100/H200: under 8 minutes in all), so a failing or hanging part
# still leaves the others' results. OUT_DIR gets each part's log and JSON, status.tsv (part, exit code,
# seconds) and report.md. Set PYTHON to choose the interpreter (default: python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
printf 'part\texit\tseconds\n' > "$OUT/status.tsv"

# part NAME SECONDS COMMAND...: runs COMMAND under `timeout`, output to OUT/NAME.log, status to status.tsv.
part() {
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (at most ${limit}s)"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$OUT/status.tsv"
  [ "$rc" -eq 0 ] || echo "   $name exited with $rc (124: time box); see $OUT/$name.log"
  return 0
}

"$PYTHON" - > "$OUT/environment.txt" 2>&1 <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton unavailable:", e)
assert torch.cuda.is_available(), "no CUDA device visible to torch"
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i), "capability", torch.cuda.get_device_capability(i))
PY
cat "$OUT/environment.txt"
ARCH=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")

# 1. Build: setup.py build_ext uses the installed torch (no build isolation, nothing downloaded).
part build 140 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" SPARK_KERNELS_PORTABLE=1 \
  "$PYTHON" setup.py build_ext --inplace
"$PYTHON" -c "import torch, spark_kernels as sk; print('backends:', sk.available_backends()); \
print('unavailable:', sk.unavailable_reasons()); assert torch.ops.spark_kernels.built_with_cuda()" \
  >> "$OUT/build.log" 2>&1 || echo "   the CUDA kernels are not available: see $OUT/build.log"

# 2. Tests, compiled: test_triton.py runs "triton" and "cuda" on CUDA tensors; test_registry.py runs every
#    combination the op registry declares for them, and their opcheck, on CUDA tensors; the property tests
#    and the large-offset statistics tests take every fused backend on its device (tests/helpers.fused_backends).
part tests 155 env TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -p no:cacheprovider -x \
  tests/test_triton.py tests/test_registry.py tests/test_properties.py -k "triton or cuda or large_offsets"

# 3. The GPU's bounds, then the ops with their rooflines.
part machine 25 env TRITON_INTERPRET=0 "$PYTHON" -m bench.gpu --section machine --out "$OUT/machine.json"
part ops 100 env TRITON_INTERPRET=0 "$PYTHON" -m bench.gpu --section ops --machine "$OUT/machine.json" \
  --out "$OUT/ops.json"

# 4. SparK training steps.
part models 60 env TRITON_INTERPRET=0 "$PYTHON" -m bench.gpu --section models --out "$OUT/models.json"

tests_summary=$(tail -n 1 "$OUT/tests.log" 2>/dev/null)
reports=()
for f in machine ops models; do [ -s "$OUT/$f.json" ] && reports+=("$OUT/$f.json"); done
{
  echo "# GPU acceptance run ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo '```'
  cat "$OUT/environment.txt" "$OUT/status.tsv"
  echo '```'
  echo
  echo "Tests: $tests_summary"
  echo
  if [ ${#reports[@]} -gt 0 ]; then "$PYTHON" -m bench.gpu report "${reports[@]}"; fi
} > "$OUT/report.md" 2>> "$OUT/report.log"
echo "report: $OUT/report.md"
