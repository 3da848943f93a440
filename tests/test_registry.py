"""Tests generated from the op registry (spark_kernels/_registry.py): what each backend declares it supports
is what it runs correctly, and what it does not declare is refused before any kernel runs.

Every declared (op test case, backend, dtype, kernel layout) combination, with the case's kernel size
and stride, runs forward and backward against the masked-dense reference on the device the backend's
tensors live on (helpers.tensor_device): here the "cpu" backend and "triton" in Triton's interpreter on
CPU tensors; on a GPU machine (scripts/gpu_check.sh) "triton" and "cuda" on CUDA tensors too. Every
primitive passes torch.library.opcheck on every such backend, test_aot_dispatch_dynamic included.
Shapes are tiny: the interpreter costs ~ms per program.
"""
from __future__ import annotations

import pytest
import torch

import spark_kernels as sk
from spark_kernels import _backends
from spark_kernels._registry import OPS, PRIMITIVES, VARIANTS, Call, dtype_name, get_op, sample_tensors

from helpers import assert_close_to_reference, kernel_backends, random_mask, tensor_device
from test_hostile_inputs import (KERNEL_LAYOUTS, kernel_layout_views, kernel_op, make_inputs, out_sites, run,
                                 x_to_nchw)

N, C, H, W = 1, 5, 5, 6


def harness_backends():
    """(backend, device) of every available fused backend whose tensors' device exists here."""
    out = []
    for name in sk.available_backends():
        device = tensor_device(name)
        if name != "reference" and (device == "cpu" or torch.cuda.is_available()):
            out.append((name, device))
    return out


def declared_cases():
    """pytest params (case, backend, device, dtype, layout) for every combination the registry declares: the
    case's kernel size and stride, every declared dtype and layout."""
    params = []
    for backend, device in harness_backends():
        for case, (op, variant) in VARIANTS.items():
            support = op.support[backend]
            marks = next((p.marks for p in kernel_backends(kernel_op(case)) if p.values[0] == backend), [])
            for dtype in support.dtypes.values:
                for layout in support.layouts.values:
                    if support.reasons(Call(dtype, layout, C, variant.kernel_size, variant.stride)):
                        continue
                    params.append(pytest.param(case, backend, device, dtype, layout, marks=marks,
                                               id=f"{case}-{backend}-{device}-{dtype_name(dtype)}-{layout}"))
    return params


@pytest.mark.parametrize("case, backend, device, dtype, layout", declared_cases())
def test_declared_combination_matches_the_reference(case, backend, device, dtype, layout):
    inputs = {k: v.to(device) for k, v in make_inputs(case, N, C, H, W, dtype=torch.float64, seed=3).items()}
    active = random_mask(N, H, W, 0.5, seed=4).to(device)
    views = kernel_layout_views(case, layout)
    lowp = {k: v.to(dtype) for k, v in inputs.items()}
    out_active = out_sites(case, active)  # a strided conv's output sites
    y_shape = inputs["x"].shape if out_active is active else (N, C) + out_active.shape[2:]
    seed = torch.randn(y_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    y, grads, _ = run(case, backend, lowp, active, views, grad_out=seed.to(dtype))
    ref_lowp, grads_lowp, _ = run(case, "reference", lowp, active, views, grad_out=seed.to(dtype))
    ref64, grads64, _ = run(case, "reference", inputs, active, views, grad_out=seed)
    assert y.dtype == dtype and y.device.type == device
    y_nchw, inactive = x_to_nchw(case, y), ~active.expand(N, C, H, W)
    assert y_nchw.is_contiguous(memory_format=torch.channels_last if layout == "rows" else torch.contiguous_format)
    assert torch.all(y_nchw[~out_active.expand_as(y_nchw)] == 0) and torch.all(x_to_nchw(case, grads["x"])[inactive] == 0)
    assert_close_to_reference(y, ref_lowp, ref64, f"{case} {backend} {layout} output")
    assert grads.keys() == grads64.keys()
    for k in grads:
        assert_close_to_reference(grads[k], grads_lowp[k], grads64[k], f"{case} {backend} {layout} gradient of {k}")


def opcheck_cases():
    params = []
    for backend, device in harness_backends():
        for p in PRIMITIVES:
            op = next(o for o in OPS.values() if p in o.primitives)
            marks = next((q.marks for q in kernel_backends(op.short) if q.values[0] == backend), [])
            for layout in KERNEL_LAYOUTS:
                params.append(pytest.param(p, backend, device, layout, marks=marks, id=f"{p.name}-{backend}-{layout}"))
    return params


@pytest.mark.parametrize("primitive, backend, device, layout", opcheck_cases())
def test_primitive_passes_opcheck(primitive, backend, device, layout):
    """Schema, fake implementation, autograd registration and AOT dispatch (dynamic shapes) of the op
    each backend registers for the primitive."""
    name = primitive.native if backend in ("cpu", "cuda") else f"triton_{primitive.name}"
    op = getattr(torch.ops.spark_kernels, name)
    t = sample_tensors(1, 6, 5, 7, 3, torch.float32, device, rows=layout == "rows", seed=30)
    torch.library.opcheck(op, primitive.sample(t))


# -- what is not declared is refused, with the reason -------------------------------------------------------
def test_undeclared_dtype_is_refused_by_name_with_the_declared_reason():
    for backend, device in harness_backends():
        for op in OPS.values():
            refused = [d for d in (torch.float64, torch.float16) if d not in op.support[backend].dtypes.values]
            for dtype in refused:
                x = torch.zeros(1, 4, 3, 3, dtype=dtype, device=device)
                why = f"backend {backend!r}.*supports dtypes .*not {dtype_name(dtype)}"
                with pytest.raises(RuntimeError, match=why):
                    _backends.select_backend(backend, x, op.name, **_geometry(op))


def _geometry(op):
    sizes = op.kernel_sizes()
    return {"kernel_size": sizes[0], "stride": 1} if sizes else {}


def test_undeclared_kernel_size_and_stride_are_refused():
    conv = get_op("sparse_depthwise_conv2d")
    x = torch.zeros(1, 4, 3, 3)
    for name in ("reference", "cpu"):
        with pytest.raises(RuntimeError, match="supports kernel sizes .*not 4"):
            _backends.select_backend(name, x, conv.name, kernel_size=4, stride=1)
        with pytest.raises(RuntimeError, match="supports strides .*not 5"):
            _backends.select_backend(name, x, conv.name, kernel_size=3, stride=5)


def test_a_channel_limit_sends_the_call_to_the_next_backend(monkeypatch):
    """The Triton LayerNorm's channel limit is declared: a wider call goes to the next backend of the
    preference order (here "cpu" after "triton"), and asking for "triton" by name says why it cannot."""
    limit = get_op("masked_layer_norm").support["triton"].max_channels.values[0]
    wide, narrow = torch.zeros(1, limit + 1, 1, 1), torch.zeros(1, limit, 1, 1)
    monkeypatch.setitem(_backends.DEFAULT_ORDER, "cpu", ("triton", "cpu", "reference"))
    monkeypatch.setattr(_backends.get_backend("triton"), "device_reason", lambda device_type: None)
    assert _backends.select_backend(None, narrow, "masked_layer_norm").name == "triton"
    assert _backends.select_backend(None, wide, "masked_layer_norm").name != "triton"
    with pytest.raises(RuntimeError, match=f"backend 'triton'.*at most {limit} channels, got {limit + 1}"):
        _backends.select_backend("triton", wide, "masked_layer_norm")


def test_call_properties_are_read_from_the_logical_input():
    x = torch.zeros(2, 8, 3, 5).contiguous(memory_format=torch.channels_last)
    assert Call.of(x, 3, 1) == Call(torch.float32, "rows", 8, 3, 1)
    assert Call.of(torch.zeros(2, 8, 3, 5, dtype=torch.float16)) == Call(torch.float16, "planes", 8)
    assert Call.of(torch.zeros(0)) == Call(torch.float32)  # a probe: nothing but the dtype is checked
