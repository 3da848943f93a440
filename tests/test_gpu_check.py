"""scripts/gpu_check.sh, the one-command GPU acceptance run, checked without a GPU: it parses, every file and
benchmark section it names exists, and each part is time-boxed. (Its benchmarks run on CPU in quick mode in
tests/test_bench.py; its tests are the suite's own.)"""
import os
import re
import shutil
import subprocess

import pytest

from bench import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
TEXT = open(SCRIPT).read()


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed here")
def test_shellcheck_is_clean():
    subprocess.run(["shellcheck", SCRIPT], check=True)


def test_named_files_and_sections_exist():
    for path in re.findall(r"\b(tests/\w+\.py|setup\.py)\b", TEXT):
        assert os.path.exists(os.path.join(ROOT, path)), path
    sections = re.findall(r"--section (\w+)", TEXT)
    assert sorted(set(sections)) == ["machine", "models", "ops"]


def test_every_part_is_time_boxed_and_the_run_fits_8_minutes():
    parts = re.findall(r"^part (\w+) (\d+) ", TEXT, flags=re.M)
    assert [name for name, _ in parts] == ["build", "tests", "machine", "ops", "models"]
    # The boxes themselves (plus their 15 s kill grace) fit in 8 minutes, whatever happens inside.
    assert sum(int(limit) + 15 for _, limit in parts) <= 8 * 60 + 5 * 15
    assert 'timeout --kill-after=15 "$limit" "$@"' in TEXT


def test_no_downloads_and_no_unquoted_output_dir():
    assert "pip install" not in TEXT and "curl" not in TEXT and "wget" not in TEXT
    for line in TEXT.splitlines():  # every $OUT path is inside double quotes (OUT_DIR may contain spaces)
        assert not re.search(r'^[^"]*(?:"[^"]*"[^"]*)*\$OUT', line), line


def test_bench_module_sections_match():
    assert set(gpu.OPS) >= {"dwconv7", "dwconv3", "batch_norm", "layer_norm_cf", "layer_norm_cl"}
    assert set(gpu.MODELS) == {"resnet50", "convnext_tiny"} and set(gpu.DTYPES) == {"fp32", "bf16"}
