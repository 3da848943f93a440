"""Masked GroupNorm: every backend that runs on CPU tensors (except "triton", tested with the Triton
kernels) against the masked-dense reference, forward and backward, plus statistics by hand, stability far
from zero, empty images, gradcheck, opcheck, determinism, input validation and the module."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spark_kernels as sk
from helpers import (ATOL, GRADCHECK, NORM_TEST_SIZE, RTOL, assert_close_to_reference, assert_index_and_dtype_checks,
                     kernel_backends, make_active)
from test_batch_norm import with_layout

F32, F64 = torch.float32, torch.float64
H, W = NORM_TEST_SIZE
CPU_BACKENDS = [p.values[0] for p in kernel_backends("group_norm")]
FUSED = [b for b in CPU_BACKENDS if b != "reference"]
ops = torch.ops.spark_kernels


def run(backend, x, active, groups, weight, bias, grad_out, dtype=None, layout="contiguous", param_dtype=None,
        eps=1e-5):
    """Forward + backward of masked_group_norm in `dtype`, the parameters in param_dtype (default: dtype)."""
    dtype = dtype or x.dtype
    param_dtype = param_dtype or dtype
    xd = with_layout(x.detach().to(dtype, copy=True), layout).requires_grad_()
    wd = None if weight is None else weight.detach().to(param_dtype, copy=True).requires_grad_()
    bd = None if bias is None else bias.detach().to(param_dtype, copy=True).requires_grad_()
    y = sk.masked_group_norm(xd, active, groups, wd, bd, eps=eps, backend=backend)
    y.backward(grad_out.to(dtype))
    out = {"y": y, "grad_x": xd.grad}
    if wd is not None:
        out["grad_weight"] = wd.grad
    if bd is not None:
        out["grad_bias"] = bd.grad
    return out


def inputs(n, c, seed=0, h=H, w=W, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=F64) * 2 + offset
    weight = torch.randn(c, generator=g, dtype=F64)
    bias = torch.randn(c, generator=g, dtype=F64)
    grad_out = torch.randn(n, c, h, w, generator=g, dtype=F64)
    return x, weight, bias, grad_out


def cancelled_terms(x, active, groups, weight, grad_out, eps=1e-5) -> float:
    """helpers.assert_close_to_reference's `terms`: the largest gain 1/sqrt(var + eps) of a group with active
    sites times the largest |grad_out| and |weight| (a one-site group's input gradient is 0 = the difference
    of two terms of that size). |x| does not enter: the kernels centre x on its group's mean first."""
    n, c = x.shape[:2]
    sites = active.reshape(n, 1, -1).expand(n, c, -1).reshape(n, groups, -1)
    values = x.reshape(n, groups, -1)
    gains = [(values[i, j][sites[i, j]].var(unbiased=False).item() + eps) ** -0.5
             for i in range(n) for j in range(groups) if sites[i, j].any()]
    w = 1.0 if weight is None else max(1.0, weight.abs().max().item())
    return max(gains, default=0.0) * w * max(1.0, grad_out.abs().max().item())


def check_against_reference(backend, x, active, groups, weight, bias, grad_out, dtype, layout="contiguous",
                            param_dtype=None):
    terms = cancelled_terms(x, active, groups, weight, grad_out)
    out = run(backend, x, active, groups, weight, bias, grad_out, dtype=dtype, layout=layout,
              param_dtype=param_dtype)
    ref64 = run("reference", x, active, groups, weight, bias, grad_out, dtype=F64)
    reflow = run("reference", x, active, groups, weight, bias, grad_out, dtype=dtype, param_dtype=param_dtype)
    assert out.keys() == ref64.keys()
    for key in out:
        assert out[key].dtype == (dtype if key in ("y", "grad_x") else param_dtype or dtype), key
        assert_close_to_reference(out[key], reflow[key], ref64[key], f"{backend} {key}", terms)
    return out


DTYPE_LAYOUTS = [(F32, "contiguous", None), (F32, "channels_last", None), (F64, "channels_last", None),
                 (F64, "contiguous", None), (torch.bfloat16, "channels_last", F32),
                 (torch.bfloat16, "contiguous", None), (torch.float16, "channels_last", F32),
                 (torch.float16, "contiguous", None)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype,layout,param_dtype", DTYPE_LAYOUTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("kind", ["visible", "spark", "random", "masked", "single"])
@pytest.mark.parametrize("n,c,groups", [(1, 3, 1), (3, 6, 3), (2, 96, 32), (1, 97, 97)])
def test_matches_reference(backend, dtype, layout, param_dtype, kind, n, c, groups):
    x, weight, bias, grad_out = inputs(n, c)
    check_against_reference(backend, x, make_active(kind, n), groups, weight, bias, grad_out, dtype, layout,
                            param_dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_no_affine_and_non_contiguous(backend, dtype):
    x, _, _, grad_out = inputs(3, 12, seed=4)
    check_against_reference(backend, x, make_active("spark", 3), 4, None, None, grad_out, dtype, "strided")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_all_visible_equals_group_norm(backend, layout):
    x, weight, bias, grad_out = inputs(3, 12, seed=2)
    out = run(backend, x, make_active("visible", 3), 4, weight, bias, grad_out, layout=layout)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = F.group_norm(xr, 4, wr, br, 1e-5)
    y.backward(grad_out)
    for key, want in [("y", y), ("grad_x", xr.grad), ("grad_weight", wr.grad), ("grad_bias", br.grad)]:
        torch.testing.assert_close(out[key], want, rtol=RTOL[F64], atol=ATOL[F64], msg=key)


# Statistics by hand: every backend shares the group merge of group_norm.py, so comparing backends with
# each other cannot see a bug in it.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_statistics_by_hand(backend, layout):
    x = torch.full((2, 4, 2, 3), 100.0, dtype=F64)  # inactive sites hold 100
    # Image 0: sites a, b active. Group 0 = channels 0, 1: values 1, 3 (a) and 5, 7 (b) -> mean 4,
    # variance (9 + 1 + 1 + 9) / 4 = 5. Group 1 = channels 2, 3: -1, -1, -1, 3 -> mean 0, variance 3.
    x[0, :, 0, 0] = torch.tensor([1.0, 3.0, -1.0, -1.0])
    x[0, :, 1, 2] = torch.tensor([5.0, 7.0, -1.0, 3.0])
    active = torch.zeros(2, 1, 2, 3, dtype=torch.bool)
    active[0, 0, 0, 0] = active[0, 0, 1, 2] = True  # image 1: no active site
    weight = torch.tensor([2.0, 1.0, -1.0, 0.5], dtype=F64)
    bias = torch.tensor([0.5, 0.0, 1.0, -2.0], dtype=F64)
    out = run(backend, x, active, 2, weight, bias, torch.ones_like(x), layout=layout)
    mean = torch.tensor([4.0, 4.0, 0.0, 0.0], dtype=F64)
    rstd = torch.tensor([5.0, 5.0, 3.0, 3.0], dtype=F64).add(1e-5).rsqrt()
    expected = torch.zeros_like(x)
    for h, w in ((0, 0), (1, 2)):
        expected[0, :, h, w] = (x[0, :, h, w] - mean) * rstd * weight + bias
    torch.testing.assert_close(out["y"], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["grad_bias"], torch.full((4,), 2.0, dtype=F64))
    # grad_out = 1: dL/dweight[c] = sum over active sites of xhat; the image without sites adds nothing.
    xhat = (x[0, :, [0, 1], [0, 2]] - mean[:, None]) * rstd[:, None]
    torch.testing.assert_close(out["grad_weight"], xhat.sum(1), rtol=1e-12, atol=1e-12)
    assert torch.equal(out["grad_x"][1], torch.zeros_like(x[1]))
    assert torch.equal(out["grad_x"][0] * ~active[0], torch.zeros_like(x[0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_image_without_active_sites(backend, dtype):
    """An image with no active site gives 0 output and zero gradients, never NaN, even with eps = 0."""
    x, weight, bias, grad_out = inputs(3, 6)
    active = make_active("spark", 3)
    active[1] = False
    for eps in (1e-5, 0.0):
        out = run(backend, x, active, 3, weight, bias, grad_out, dtype=dtype, eps=eps)
        for key in ("y", "grad_x"):
            assert torch.equal(out[key][1], torch.zeros_like(out[key][1])), key
        for key in out:
            assert torch.isfinite(out[key]).all(), key
    out = run(backend, x, make_active("masked", 3), 3, weight, bias, grad_out, dtype=dtype)
    for key in out:
        assert torch.equal(out[key], torch.zeros_like(out[key])), key


# Means of up to 1e4 standard deviations per (image, group): E[x^2] - E[x]^2 in float32 would lose every
# digit of the variance, and x * scale + shift would lose the output's.
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_offsets_float32(backend, layout):
    x, weight, bias, grad_out = inputs(3, 8, seed=6, offset=0.0)
    x = x + torch.tensor([2e4, -2e4, 3e3, 0.0], dtype=F64).repeat_interleave(2).view(1, 8, 1, 1) \
        * torch.tensor([1.0, -0.5, 0.25], dtype=F64).view(3, 1, 1, 1)
    check_against_reference(backend, x, make_active("spark", 3), 4, weight, bias, grad_out, F32, layout)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inactive_garbage_does_not_leak(backend, layout):
    x, weight, bias, grad_out = inputs(4, 9)
    active = make_active("spark", 4)
    clean = run(backend, x, active, 3, weight, bias, grad_out, layout=layout)
    garbage = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5,
                          float("nan"), 1e30).to(x.dtype)
    dirty_x = torch.where(active, x, garbage)
    dirty_g = torch.where(active, grad_out, torch.full_like(grad_out, float("inf")))
    dirty = run(backend, dirty_x, active, 3, weight, bias, dirty_g, layout=layout)
    for key in clean:
        assert torch.isfinite(dirty[key]).all(), key
        assert torch.equal(dirty[key], clean[key]), key


@pytest.mark.parametrize("backend", FUSED)
def test_backward_keeps_active_rows_only(backend):
    """A channels_last x is kept for backward as its active rows, not whole (as masked BN keeps it)."""
    x, weight, bias, _ = inputs(4, 16, h=16, w=16)
    x = x.float().contiguous(memory_format=torch.channels_last).requires_grad_()
    active = sk.ActiveSites(make_active("spark", 4, 16, 16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sk.masked_group_norm(x, active, 4, weight.float(), bias.float(), backend=backend)
    kept = sum(t.numel() * t.element_size() for t in saved if t.dtype == x.dtype and t.dim() > 1)
    assert 0 < active.num_active < x.shape[0] * 16 * 16
    assert kept == active.num_active * x.shape[1] * x.element_size()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic_across_runs_and_threads(backend, layout, dtype):
    x, weight, bias, grad_out = inputs(2, 96, h=32, w=32)  # enough sites for several reduction chunks
    active = make_active("spark", 2, 32, 32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            results.append(run(backend, x, active, 32, weight, bias, grad_out, dtype=dtype, layout=layout,
                               param_dtype=F32))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for key in results[0]:
            assert torch.equal(results[0][key], other[key]), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(backend, layout):
    g = torch.Generator().manual_seed(3)
    x = with_layout(torch.randn(3, 6, 4, 3, generator=g, dtype=F64), layout).requires_grad_()
    weight = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    active = make_active("random", 3, 4, 3, seed=1)
    active[2] = False  # an image without active sites

    def fn(x, weight, bias):
        return sk.masked_group_norm(x, active, 2, weight, bias, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight, bias), **GRADCHECK)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16, F64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck(layout, dtype):
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is not available: " + sk.unavailable_reasons().get("cpu", ""))
    g = torch.Generator().manual_seed(0)
    acc = F64 if dtype == F64 else F32
    x = with_layout(torch.randn(2, 5, 4, 3, generator=g).to(dtype), layout)
    dy = torch.randn(2, 5, 4, 3, generator=g).to(dtype)
    index = sk.ActiveSites(make_active("random", 2, 4, 3)).index
    vec = [torch.randn(2, 5, generator=g).to(acc) for _ in range(4)]
    for op, args in [(ops.masked_gn_stats, (x, index)),
                     (ops.masked_gn_backward_stats, (dy, x, index, vec[0])),
                     (ops.masked_gn_elemt, (x, index, *vec[:3])),
                     (ops.masked_gn_backward_elemt, (dy, x, index, *vec))]:
        torch.library.opcheck(op, args)


def test_bad_inputs():
    x, weight, bias, _ = inputs(2, 4)
    x, weight, bias = x.float(), weight.float(), bias.float()
    active = make_active("random", 2)

    def call(**kw):
        args = dict(x=x, active=active, num_groups=2, weight=weight, bias=bias)
        args.update(kw)
        return sk.masked_group_norm(**args)

    for bad in (x.int(), x.bool(), x.to(torch.complex64)):
        with pytest.raises(TypeError, match="x must be a floating-point"):
            call(x=bad)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call(x=x.numpy())
    with pytest.raises(ValueError, match="x must be a 4-D"):
        call(x=x[0])
    with pytest.raises(ValueError, match=r"num_groups \(3\) must divide the number of channels of x \(4\)"):
        call(num_groups=3)
    for groups in (0, -2, 2.0, True, "2", None):
        with pytest.raises(ValueError, match="num_groups must be a positive int"):
            call(num_groups=groups)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        call(weight=weight[:2])
    with pytest.raises(ValueError, match="bias must have shape"):
        call(bias=torch.zeros(2, 2))
    with pytest.raises(TypeError, match="weight must have dtype torch.float32"):
        call(weight=weight.double())
    with pytest.raises(TypeError, match="must share one dtype"):
        call(x=x.half(), weight=weight.half())
    with pytest.raises(ValueError, match="weight is on meta"):
        call(weight=weight.to("meta"))
    with pytest.raises(TypeError, match="active must have dtype torch.bool"):
        call(active=active.float())
    with pytest.raises(ValueError, match=r"active must have shape \(N, 1, H, W\)"):
        call(active=active[:, 0])
    with pytest.raises(ValueError, match="active is for"):
        call(active=active[:1])
    for eps in (-1.0, "1e-5", float("nan")):
        with pytest.raises(ValueError, match="eps must be a non-negative number"):
            call(eps=eps)
    with pytest.raises(ValueError, match="backend"):
        call(backend="nope")


def test_kernel_argument_checks():
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is not available: " + sk.unavailable_reasons().get("cpu", ""))
    x = torch.randn(2, 4, 3, 3)
    index = sk.ActiveSites(make_active("random", 2, 3, 3)).index
    vec = torch.zeros(2, 4)
    assert_index_and_dtype_checks(ops.masked_gn_stats)
    with pytest.raises(RuntimeError, match=r"masked_gn_elemt: scale must have shape \(2, 4\)"):
        ops.masked_gn_elemt(x, index, vec, torch.zeros(4), vec)
    with pytest.raises(RuntimeError, match="center must have dtype Float"):
        ops.masked_gn_backward_stats(x, x, index, vec.double())
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        ops.masked_gn_backward_elemt(x[:1], x, index, vec, vec, vec, vec)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.masked_gn_stats(x[0], index)


# ---- module -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_module_from_dense(backend, affine):
    torch.manual_seed(0)
    dense = nn.GroupNorm(3, 6, eps=1e-4, affine=affine)
    if affine:
        with torch.no_grad():
            dense.weight.normal_()
            dense.bias.normal_()
        dense.bias.requires_grad_(False)
    module = sk.nn.MaskedGroupNorm.from_dense(dense, backend=backend)
    assert module.state_dict().keys() == dense.state_dict().keys()
    assert (module.num_groups, module.num_channels, module.eps, module.affine) == (3, 6, 1e-4, affine)
    if affine:
        assert not module.bias.requires_grad and module.weight.requires_grad
    x = inputs(4, 6)[0].float()
    active = make_active("spark", 4)
    want = sk.masked_group_norm(x, active, 3, dense.weight, dense.bias, 1e-4, backend="reference")
    with sk.active(sk.ActiveSites(active).downsample(1)):
        y = module(x)
    torch.testing.assert_close(y, want, rtol=RTOL[F32], atol=ATOL[F32])
    with sk.active(make_active("visible", 4)):  # all sites active: nn.GroupNorm itself
        torch.testing.assert_close(module(x), dense(x), rtol=RTOL[F32], atol=ATOL[F32])


def test_module_errors():
    module = sk.nn.MaskedGroupNorm(2, 4)
    with pytest.raises(RuntimeError, match="MaskedGroupNorm needs active sites"):
        module(torch.randn(1, 4, 2, 2))
    with pytest.raises(TypeError, match="expects an nn.GroupNorm, got BatchNorm2d"):
        sk.nn.MaskedGroupNorm.from_dense(nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"num_channels \(4\) must be divisible by num_groups \(3\)"):
        sk.nn.MaskedGroupNorm(3, 4)


def test_module_from_timm_group_norms():
    """timm's plain GroupNorm subclasses convert; GroupNormAct (norm, then drop and act) is refused by the
    module (the model layer keeps its drop and act)."""
    layers = pytest.importorskip("timm.layers")
    x = inputs(2, 8)[0].float()
    active = make_active("visible", 2)
    for dense in (layers.GroupNorm(8, num_groups=4), layers.GroupNorm1(8)):
        module = sk.nn.MaskedGroupNorm.from_dense(dense)
        assert module.num_groups == dense.num_groups
        with sk.active(active):
            torch.testing.assert_close(module(x), dense(x), rtol=RTOL[F32], atol=ATOL[F32])
    with pytest.raises(ValueError, match=r"GroupNormAct has submodules \['drop', 'act'\]"):
        sk.nn.MaskedGroupNorm.from_dense(layers.GroupNormAct(8, num_groups=4))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["expanded", "other_layout"])
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_grad_out_read_in_place_equals_materialized(backend, kind, dtype, layout):
    """A stride-0 grad_out (y.sum().backward()) or one in the other layout than x's is read in place by the C++
    kernels, with the results of a dense copy in x's layout."""
    x, weight, bias, grad_out = inputs(3, 8)
    active = make_active("spark", 3)
    other = torch.contiguous_format if layout == "channels_last" else torch.channels_last
    grad = (torch.full((), -1.25, dtype=dtype).expand(x.shape) if kind == "expanded"
            else grad_out.to(dtype).contiguous(memory_format=other))
    got = run(backend, x, active, 4, weight, bias, grad, dtype=dtype, layout=layout, param_dtype=F32)
    want = run(backend, x, active, 4, weight, bias, with_layout(grad.contiguous(), layout), dtype=dtype,
               layout=layout, param_dtype=F32)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_backward_ops_take_compact_rows():
    """The C++ backward ops read x from the (M, C) active rows forward keeps, as from the dense channels_last x."""
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is not available: " + sk.unavailable_reasons().get("cpu", ""))
    x, _, _, grad = inputs(3, 6)
    x, grad = (t.float().contiguous(memory_format=torch.channels_last) for t in (x, grad))
    index = sk.ActiveSites(make_active("spark", 3)).index
    rows = x.permute(0, 2, 3, 1).reshape(-1, 6)[index.long()]
    center, a, b, d = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(2))
    for g in (grad, grad.contiguous()):
        assert torch.equal(ops.masked_gn_backward_stats(g, rows, index, center),
                           ops.masked_gn_backward_stats(g, x, index, center))
        assert torch.equal(ops.masked_gn_backward_elemt(g, rows, index, center, a, b, d),
                           ops.masked_gn_backward_elemt(g, x, index, center, a, b, d))
