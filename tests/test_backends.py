import pytest
import torch

import spark_kernels as sk
from spark_kernels._backends import ENV_VAR, select_backend

from helpers import random_mask


def test_reference_always_available():
    assert "reference" in sk.available_backends()
    assert set(sk.available_backends()) <= set(sk.BACKEND_NAMES)


def test_unavailable_backends_say_why():
    for name, why in sk.unavailable_reasons().items():
        assert name not in sk.available_backends()
        assert isinstance(why, str) and len(why) > 10


def test_no_gpu_here_means_cuda_backend_unavailable():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the check is for GPU-less machines")
    reasons = sk.unavailable_reasons()
    assert "cuda" in reasons
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        sk.sparse_depthwise_conv2d(x, torch.zeros(1, 1, 3, 3), None, torch.ones(1, 1, 2, 2, dtype=torch.bool),
                                   backend="cuda")


def test_default_cpu_choice_and_env_override(monkeypatch):
    x = torch.zeros(1, 2, 3, 3)
    monkeypatch.delenv(ENV_VAR, raising=False)
    expected = "cpu" if "cpu" in sk.available_backends() else "reference"
    assert select_backend(None, x, "op").name == expected
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_backend(None, x, "op").name == "reference"
    assert select_backend("reference", x, "op").name == "reference"  # explicit argument wins
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=ENV_VAR):
        select_backend(None, x, "op")


def test_unknown_backend_name():
    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.masked_layer_norm(x, torch.ones(1, 1, 3, 3, dtype=torch.bool), None, None, backend="fast")


def test_cpu_backend_refuses_half_with_reason():
    if "cpu" not in sk.available_backends():
        pytest.skip("the C++ extension is not built here")
    x = torch.zeros(1, 2, 3, 3, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float16"):
        sk.masked_batch_norm(x, random_mask(1, 3, 3, 0.5), None, None, backend="cpu")
    # ... while the default dispatch falls back to the reference for it.
    assert select_backend(None, x, "op").name == "reference"
