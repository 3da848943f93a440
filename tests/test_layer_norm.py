"""Masked LayerNorm: every backend that runs on CPU tensors (except "triton", tested with the Triton
kernels) against the masked-dense reference in both data formats, forward and backward, plus
gradcheck, opcheck, determinism, input validation and the module."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spark_kernels as sk
from helpers import (ATOL, GRADCHECK, NORM_TEST_SIZE, RTOL, assert_close_to_reference, assert_index_and_dtype_checks,
                     cpu_tensor_backends, make_active)

F32, F64 = torch.float32, torch.float64

H, W = NORM_TEST_SIZE
CPU_BACKENDS = cpu_tensor_backends()
FUSED = [b for b in CPU_BACKENDS if b != "reference"]
ops = torch.ops.spark_kernels


def to_format(t_nchw: torch.Tensor, data_format: str) -> torch.Tensor:
    return t_nchw.permute(0, 2, 3, 1) if data_format == "channels_last" else t_nchw


def with_layout(x_nchw: torch.Tensor, data_format: str, layout: str) -> torch.Tensor:
    """x in data_format, stored "contiguous" (in that format), "transposed" (in the other format's
    memory order), or "strided" (a non-contiguous view)."""
    if layout == "contiguous":
        return to_format(x_nchw, data_format).contiguous()
    if layout == "transposed":
        other = x_nchw.contiguous(memory_format=torch.channels_last) if data_format == "channels_first" \
            else x_nchw.contiguous()
        return to_format(other, data_format)
    x = to_format(x_nchw, data_format)
    big = x.new_full(x.shape[:-1] + (2 * x.shape[-1],), float("nan"))
    big[..., ::2] = x
    return big[..., ::2]


def run(backend, x, active, weight, bias, grad_out, data_format, dtype=None, layout="contiguous", eps=1e-6,
        param_dtype=None):
    """Forward + backward of masked_layer_norm; x and grad_out are given as (N, C, H, W). The parameters
    are in param_dtype (default: x's dtype)."""
    dtype = dtype or x.dtype
    param_dtype = param_dtype or dtype
    xd = with_layout(x.detach().to(dtype, copy=True), data_format, layout).requires_grad_()
    wd = None if weight is None else weight.detach().to(param_dtype, copy=True).requires_grad_()
    bd = None if bias is None else bias.detach().to(param_dtype, copy=True).requires_grad_()
    y = sk.masked_layer_norm(xd, active, wd, bd, eps, data_format, backend=backend)
    y.backward(to_format(grad_out.to(dtype), data_format))
    out = {"y": y, "grad_x": xd.grad}
    if wd is not None:
        out["grad_weight"] = wd.grad
    if bd is not None:
        out["grad_bias"] = bd.grad
    return out


def inputs(n, c, seed=0, h=H, w=W):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + 0.5
    weight = torch.randn(c, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    grad_out = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    return x, weight, bias, grad_out


def check_against_reference(backend, x, active, weight, bias, grad_out, data_format, dtype, layout="contiguous",
                            param_dtype=None):
    ref_active = active if isinstance(active, sk.ActiveSites) or active.dim() == 4 else active.unsqueeze(1)
    out = run(backend, x, active, weight, bias, grad_out, data_format, dtype, layout, param_dtype=param_dtype)
    ref64 = run("reference", x, ref_active, weight, bias, grad_out, data_format, torch.float64)
    reflow = run("reference", x, ref_active, weight, bias, grad_out, data_format, dtype, param_dtype=param_dtype)
    assert out.keys() == ref64.keys()
    for key in out:
        assert out[key].dtype == (dtype if key in ("y", "grad_x") else param_dtype or dtype), key
        assert_close_to_reference(out[key], reflow[key], ref64[key], f"{backend} {data_format} {key}")


# (x dtype, layout, parameter dtype): float16/bfloat16 inputs with float32 parameters is the mixed-precision
# (autocast) case.
DTYPE_LAYOUTS = [(torch.float32, "contiguous", None), (torch.float32, "transposed", None),
                 (torch.float64, "contiguous", None), (torch.bfloat16, "contiguous", torch.float32),
                 (torch.bfloat16, "transposed", None), (torch.float16, "contiguous", torch.float32),
                 (torch.float16, "transposed", None)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype,layout,param_dtype", DTYPE_LAYOUTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("kind", ["visible", "spark", "random", "masked"])
@pytest.mark.parametrize("n,c", [(1, 3), (8, 1), (8, 96), (1, 97)])
def test_matches_reference(backend, data_format, dtype, layout, param_dtype, kind, n, c):
    x, weight, bias, grad_out = inputs(n, c)
    check_against_reference(backend, x, make_active(kind, n), weight, bias, grad_out, data_format, dtype, layout,
                            param_dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_input(backend, data_format, dtype):
    x, weight, bias, grad_out = inputs(8, 97, seed=4)
    check_against_reference(backend, x, make_active("spark", 8), weight, bias, grad_out, data_format, dtype,
                            "strided")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("params", ["none", "weight_only", "bias_only"])
def test_optional_params(backend, data_format, params):
    x, weight, bias, grad_out = inputs(8, 97, seed=2)
    weight = None if params in ("none", "bias_only") else weight
    bias = None if params in ("none", "weight_only") else bias
    check_against_reference(backend, x, make_active("spark", 8), weight, bias, grad_out, data_format, torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mask_form", ["nhw", "sites"])
def test_channels_last_mask_forms(backend, mask_form):
    x, weight, bias, grad_out = inputs(4, 9, seed=3)
    mask = make_active("spark", 4)
    active = mask[:, 0] if mask_form == "nhw" else sk.ActiveSites(mask)
    check_against_reference(backend, x, active, weight, bias, grad_out, "channels_last", torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_all_visible_equals_layer_norm(backend, data_format):
    x, weight, bias, grad_out = inputs(8, 96)
    out = run(backend, x, make_active("visible", 8), weight, bias, grad_out, data_format)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = F.layer_norm(xr.permute(0, 2, 3, 1), (96,), wr, br, 1e-6)
    y = y if data_format == "channels_last" else y.permute(0, 3, 1, 2)
    y.backward(to_format(grad_out, data_format))
    for key, want in [("y", y), ("grad_x", to_format(xr.grad, data_format)), ("grad_weight", wr.grad),
                      ("grad_bias", br.grad)]:
        torch.testing.assert_close(out[key], want, rtol=RTOL[F64], atol=ATOL[F64], msg=key)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_masked_equals_definition(backend, data_format):
    """At each active site (x - mean) / sqrt(biased variance + eps) * weight + bias over channels, 0
    elsewhere, written densely with plain tensor ops (the reference path gathers and scatters rows)."""
    x, weight, bias, grad_out = inputs(3, 6, seed=2)
    active = make_active("random", 3)
    out = run(backend, x, active, weight, bias, grad_out, data_format, eps=1e-3)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    mean = xr.mean(1, keepdim=True)
    var = ((xr - mean) ** 2).mean(1, keepdim=True)
    y = ((xr - mean) / (var + 1e-3).sqrt() * wr[:, None, None] + br[:, None, None]) * active
    y.backward(grad_out)
    for key, want in [("y", y), ("grad_x", xr.grad), ("grad_weight", wr.grad), ("grad_bias", br.grad)]:
        want = to_format(want, data_format) if want.dim() == 4 else want
        torch.testing.assert_close(out[key], want, rtol=RTOL[F64], atol=ATOL[F64], msg=key)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_masked(backend, data_format, dtype):
    x, weight, bias, grad_out = inputs(2, 7)
    out = run(backend, x, make_active("masked", 2), weight, bias, grad_out, data_format, dtype)
    for key in out:
        assert torch.equal(out[key], torch.zeros_like(out[key])), key


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_inactive_garbage_does_not_leak(backend, data_format):
    x, weight, bias, grad_out = inputs(4, 9)
    active = make_active("spark", 4)
    clean = run(backend, x, active, weight, bias, grad_out, data_format)
    garbage = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5,
                          float("nan"), 1e30).to(x.dtype)
    dirty_g = torch.where(active, grad_out, torch.full_like(grad_out, float("inf")))
    dirty = run(backend, torch.where(active, x, garbage), active, weight, bias, dirty_g, data_format)
    for key in clean:
        assert torch.isfinite(dirty[key]).all(), key
        assert torch.equal(dirty[key], clean[key]), key


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
@pytest.mark.parametrize("c,dtype", [(64, torch.float32), (61, torch.float32), (64, torch.bfloat16)], ids=str)
def test_large_channels_last_outputs(c, dtype):
    """Outputs in rows of at least 2 MiB (streams_output in csrc/cpu/vec.h) are written with streaming stores; with 61
    channels the rows are not 32-byte aligned and fall back to plain writes."""
    side = 72 if dtype == torch.float32 else 96
    x, weight, bias, grad_out = inputs(2, c, h=side, w=side)
    assert x.numel() * dtype.itemsize >= 2 << 20
    check_against_reference("cpu", x, make_active("spark", 2, side, side), weight, bias, grad_out, "channels_last",
                            dtype, param_dtype=torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_deterministic_across_runs_and_threads(backend, data_format, dtype):
    # Enough sites for several reduction chunks of the parameter gradients.
    x, weight, bias, grad_out = inputs(2, 96, h=32, w=32)
    active = make_active("spark", 2, 32, 32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            results.append(run(backend, x, active, weight, bias, grad_out, data_format, dtype,
                               param_dtype=torch.float32))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for key in results[0]:
            assert torch.equal(results[0][key], other[key]), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gradcheck(backend, data_format, layout):
    g = torch.Generator().manual_seed(3)
    x = with_layout(torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), data_format, layout)
    x.requires_grad_()
    weight = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    active = make_active("random", 2, 3, 3, seed=1)

    def fn(x, weight, bias):
        return sk.masked_layer_norm(x, active, weight, bias, 1e-6, data_format, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight, bias), **GRADCHECK)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck(layout, dtype):
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is not available: " + sk.unavailable_reasons().get("cpu", ""))
    g = torch.Generator().manual_seed(0)
    x_nchw = torch.randn(2, 5, 4, 3, generator=g).to(dtype)
    x = {"contiguous": x_nchw, "channels_last": x_nchw.contiguous(memory_format=torch.channels_last),
         "strided": with_layout(x_nchw, "channels_first", "strided")}[layout]
    dy = torch.randn(2, 5, 4, 3, generator=g).to(dtype)
    index = sk.ActiveSites(make_active("random", 2, 4, 3)).index
    weight, bias = torch.randn(5, generator=g), torch.randn(5, generator=g)
    _, mean, rstd = ops.masked_ln_forward(x, index, weight, bias, 1e-6)
    for op, args in [(ops.masked_ln_forward, (x, index, weight, bias, 1e-6)),
                     (ops.masked_ln_forward, (x, index, None, None, 1e-6)),
                     (ops.masked_ln_backward, (dy, x, index, weight, mean, rstd)),
                     (ops.masked_ln_backward, (dy, x, index, None, mean, rstd))]:
        torch.library.opcheck(op, args)


def test_bad_inputs():
    x, weight, bias, _ = inputs(2, 4)
    x, weight, bias = x.float(), weight.float(), bias.float()
    active = make_active("random", 2)

    def call(**kw):
        args = dict(x=x, active=active, weight=weight, bias=bias)
        args.update(kw)
        return sk.masked_layer_norm(**args)

    for bad in (x.int(), x.bool(), x.to(torch.complex64)):
        with pytest.raises(TypeError, match="x must be a floating-point"):
            call(x=bad)
    with pytest.raises(ValueError, match="data_format must be one of"):
        call(data_format="NHWC")
    with pytest.raises(ValueError, match="weight is on meta"):
        call(weight=weight.to("meta"))
    with pytest.raises(ValueError, match="active is on the meta device"):
        call(active=active.to("meta"))
    with pytest.raises(TypeError, match="active must have dtype torch.bool"):
        call(active=active.int())
    with pytest.raises(ValueError, match="active is for"):
        call(active=active[:, :, :5])
    with pytest.raises(ValueError, match="active is for"):  # (N, H, W) mask of the wrong size, channels_last
        call(x=x.permute(0, 2, 3, 1), active=active[:1, 0], data_format="channels_last")
    with pytest.raises(ValueError, match="weight must have shape"):
        call(weight=torch.ones(5))
    with pytest.raises(ValueError, match="bias must have shape"):  # channels_last takes C from the last dim
        call(x=x.permute(0, 2, 3, 1), active=active[:, 0], data_format="channels_last", bias=torch.ones(11))
    with pytest.raises(ValueError, match="eps"):
        call(eps=-1e-6)


def test_kernel_argument_checks():
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is not available: " + sk.unavailable_reasons().get("cpu", ""))
    x = torch.randn(2, 4, 3, 3)
    index = sk.ActiveSites(make_active("random", 2, 3, 3)).index
    _, mean, rstd = ops.masked_ln_forward(x, index, None, None, 1e-6)
    with pytest.raises(RuntimeError, match="weight must have dtype Float"):
        ops.masked_ln_forward(x, index, torch.ones(4, dtype=torch.float64), None, 1e-6)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(4\)"):
        ops.masked_ln_forward(x, index, None, torch.ones(3), 1e-6)
    assert_index_and_dtype_checks(lambda x, index: ops.masked_ln_forward(x, index, None, None, 1e-6))
    with pytest.raises(RuntimeError, match="mean must have shape"):
        ops.masked_ln_backward(x, x, index, None, mean[:-1], rstd)
    with pytest.raises(RuntimeError, match="grad_out must have x's dtype"):
        ops.masked_ln_backward(x.double(), x, index, None, mean, rstd)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_module(backend, data_format):
    torch.manual_seed(0)
    dense = nn.LayerNorm(6, eps=1e-6)
    with torch.no_grad():
        dense.weight.normal_()
        dense.bias.normal_()
    module = sk.nn.MaskedLayerNorm.from_dense(dense, data_format, backend=backend)
    x_nchw, _, _, grad_out = inputs(4, 6)
    x = to_format(x_nchw.float(), data_format).contiguous().requires_grad_()
    active = make_active("spark", 4)
    with sk.active(sk.ActiveSites(active)):
        y = module(x)
    y.backward(to_format(grad_out.float(), data_format))
    xr = x.detach().clone().requires_grad_()
    want = sk.masked_layer_norm(xr, active, dense.weight, dense.bias, 1e-6, data_format, backend="reference")
    want.backward(to_format(grad_out.float(), data_format))
    torch.testing.assert_close(y, want, rtol=RTOL[F32], atol=ATOL[F32])
    torch.testing.assert_close(x.grad, xr.grad, rtol=RTOL[F32], atol=ATOL[F32])
    torch.testing.assert_close(module.weight.grad, dense.weight.grad, rtol=RTOL[F32], atol=ATOL[F32])
    torch.testing.assert_close(module.bias.grad, dense.bias.grad, rtol=RTOL[F32], atol=ATOL[F32])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["expanded", "other_layout"])
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("size", [NORM_TEST_SIZE, (24, 40)], ids=str)
def test_grad_out_read_in_place_equals_materialized(backend, kind, data_format, dtype, size):
    """A stride-0 grad_out (y.sum().backward()) or one in the other memory order than x's is read in place by the
    C++ kernels, with the results of a dense copy in x's memory order. At 24 x 40, an (N, C, H, W) grad_out of a
    channels_last x is gathered into rows 8 channels at a time (gather_rows in csrc/cpu/norm_cpu.h; its every way
    is tested in test_batch_norm.py): at 24 x 40, runs of 8 adjacent active sites (two adjacent SparK patches),
    shorter runs, and the channels past the last multiple of 8."""
    x, weight, bias, grad_out = inputs(2, 12, h=size[0], w=size[1])
    active = make_active("spark", 2, *size)
    if kind == "expanded":
        grad = torch.full((), 0.5, dtype=dtype).expand(x.shape)
    else:  # x's memory order is that of its format: (N, C, H, W) for channels_first, (N, H, W, C) for channels_last
        other = torch.channels_last if data_format == "channels_first" else torch.contiguous_format
        grad = grad_out.to(dtype).contiguous(memory_format=other)
    same = torch.contiguous_format if data_format == "channels_first" else torch.channels_last
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got = run(backend, x, active, weight, bias, grad, data_format, dtype=dtype, param_dtype=param_dtype)
    want = run(backend, x, active, weight, bias, grad.contiguous(memory_format=same), data_format, dtype=dtype,
               param_dtype=param_dtype)
    for key in want:
        assert torch.equal(got[key], want[key]), key
