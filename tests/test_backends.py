import dataclasses
import warnings

import pytest
import torch

import spark_kernels as sk
from spark_kernels._backends import _REGISTRY, ENV_VAR, Backend, select_backend
from spark_kernels._registry import OPS, Limit

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
    assert select_backend(None, x, "masked_batch_norm").name == expected
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_backend(None, x, "masked_batch_norm").name == "reference"
    assert select_backend("reference", x, "masked_batch_norm").name == "reference"  # explicit argument wins
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=ENV_VAR):
        select_backend(None, x, "masked_batch_norm")


def test_unknown_backend_name():
    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.masked_layer_norm(x, torch.ones(1, 1, 3, 3, dtype=torch.bool), None, None, backend="fast")


def test_cpu_backend_takes_every_float_dtype():
    if "cpu" not in sk.available_backends():
        pytest.skip("the C++ extension is not built here")
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for op in OPS:
            assert select_backend(None, torch.zeros(1, 2, 3, 3, dtype=dtype), op).name == "cpu"
    with pytest.raises(RuntimeError, match="backend 'cpu'.*int32"):
        select_backend("cpu", torch.zeros(1, 2, 3, 3, dtype=torch.int32), "masked_batch_norm")


def test_fallback_to_reference_warns_once_per_op_and_reason_and_is_counted(monkeypatch):
    """A call the default backend cannot take runs on the reference, never silently."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    restricted = Backend("cpu", ("cpu",), lambda: (object(), None))
    monkeypatch.setitem(_REGISTRY, "cpu", restricted)
    for op in OPS.values():  # a cpu backend that takes float64 only
        monkeypatch.setitem(op.support, "cpu", dataclasses.replace(op.support["cpu"], dtypes=Limit((torch.float64,),
                                                                                               "a test")))
    sk.reset_fallback_counts()
    mask = random_mask(2, 5, 5, 0.5)
    x, weight = torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # "once" is the library's own doing, not the filter's
        for _ in range(3):
            y = sk.sparse_depthwise_conv2d(x, weight, None, mask)
        sk.masked_layer_norm(x, mask, None, None)
        sk.sparse_depthwise_conv2d(x.half(), weight.half(), None, mask)
    assert torch.equal(y, sk.sparse_depthwise_conv2d(x, weight, None, mask, backend="reference"))
    assert all(w.category is sk.FallbackWarning for w in caught)
    assert [str(w.message) for w in caught] == [
        "sparse_depthwise_conv2d: running on the slow masked-dense 'reference' backend because cpu: supports "
        "dtypes float64, not float32 (a test)",
        "masked_layer_norm: running on the slow masked-dense 'reference' backend because cpu: supports dtypes "
        "float64, not float32 (a test)",
        "sparse_depthwise_conv2d: running on the slow masked-dense 'reference' backend because cpu: supports "
        "dtypes float64, not float16 (a test)"]
    counts = sk.fallback_counts()
    assert counts == {("sparse_depthwise_conv2d", "cpu: supports dtypes float64, not float32 (a test)"): 3,
                      ("masked_layer_norm", "cpu: supports dtypes float64, not float32 (a test)"): 1,
                      ("sparse_depthwise_conv2d", "cpu: supports dtypes float64, not float16 (a test)"): 1}
    # Naming the reference is a choice, not a fallback; and as an error the warning stops the call.
    sk.reset_fallback_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sk.FallbackWarning)
        sk.sparse_depthwise_conv2d(x, weight, None, mask, backend="reference")
        with pytest.raises(sk.FallbackWarning):
            sk.sparse_depthwise_conv2d(x, weight, None, mask)
    assert sk.fallback_counts() == {}  # the raising call never ran