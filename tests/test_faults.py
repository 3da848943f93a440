"""The C++ extension failing to load leaves the package importable on "reference", with exactly one
clear warning, and every request for a native backend says why it cannot run.

Each case runs in a fresh interpreter on a copy of the Python package whose spark_kernels._C is
missing or corrupt (the repository's own build is untouched).
"""
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import spark_kernels

PACKAGE = Path(spark_kernels.__file__).parent
EXTENSION_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

CHILD = textwrap.dedent("""
    import json, sys, warnings
    # An editable install (pip install -e) adds a finder that maps spark_kernels._C to the repository's
    # build; drop it, since this child stands for a machine where that build does not exist.
    sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import spark_kernels as sk
        import torch
        out = {"warnings": [(w.category.__name__, str(w.message)) for w in caught if "spark_kernels" in str(w.message)]}
        out["available"] = sk.available_backends()
        out["file"] = sk.__file__
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5
        errors = {}
        for backend in ("cpu", "cuda"):
            try:
                sk.masked_layer_norm(x, mask, None, None, backend=backend)
                errors[backend] = None
            except Exception as e:
                errors[backend] = f"{type(e).__name__}: {e}"
        out["errors"] = errors
        # The default dispatch on CPU tensors falls back to the reference; all three ops run, with gradients.
        y = sk.sparse_depthwise_conv2d(x, torch.randn(3, 1, 7, 7), None, mask)
        y = sk.masked_batch_norm(y, mask, torch.zeros(3), torch.ones(3))
        y = sk.masked_layer_norm(y, sk.ActiveSites(mask), torch.ones(3), torch.zeros(3))
        y.square().sum().backward()
        out["ops_ok"] = bool(torch.isfinite(y).all()) and bool((y * ~mask == 0).all()) and x.grad is not None
        out["warnings_after_ops"] = len([w for w in caught if "spark_kernels" in str(w.message)])
    print("RESULT " + json.dumps(out))
""")


def broken_copy(tmp_path: Path, how: str) -> Path:
    dest = tmp_path / "spark_kernels"
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    if how == "corrupt":
        (dest / f"_C{EXTENSION_SUFFIX}").write_bytes(b"\x7fELF this is not a shared object" * 64)
    return tmp_path


def run_child(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("SPARK_KERNELS_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(root)  # only the broken copy: never the repository's build
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout + proc.stderr
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_unloadable_extension_leaves_reference_with_one_warning(tmp_path, how):
    out = run_child(broken_copy(tmp_path, how))
    assert Path(out["file"]).parent == tmp_path / "spark_kernels"
    assert len(out["warnings"]) == 1, out["warnings"]
    category, message = out["warnings"][0]
    assert category == "RuntimeWarning"
    assert "spark_kernels._C could not be loaded" in message and "reference" in message
    problem = "no _C extension file is built in" if how == "missing" else "ImportError"
    assert problem in message, message
    assert out["available"] == ["reference"]
    for backend, error in out["errors"].items():
        assert error is not None, f"backend {backend!r} ran without its extension"
        assert error.startswith("RuntimeError: masked_layer_norm: backend") and "could not be loaded" in error, error
    assert out["ops_ok"]
    assert out["warnings_after_ops"] == 1  # the fallback itself does not warn again
