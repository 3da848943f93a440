"""Masked BatchNorm: every backend that runs on CPU tensors (except "triton", tested with the Triton
kernels) against the masked-dense reference, forward and backward, plus gradcheck, opcheck, running
statistics, determinism, input validation, the module and the synchronized variant."""
import os
import socket

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


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in a given memory layout: plain, channels_last, or a non-contiguous strided view."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    big = x.new_full(x.shape[:-1] + (2 * x.shape[-1],), float("nan"))
    big[..., ::2] = x
    return big[..., ::2]


def run(backend, x, active, weight, bias, running, grad_out, training=True, momentum=0.1, eps=1e-5,
        dtype=None, layout="contiguous", param_dtype=None):
    """Forward + backward of masked_batch_norm in `dtype`, the parameters and running statistics in
    param_dtype (default: dtype); returns outputs, gradients, running stats."""
    dtype = dtype or x.dtype
    param_dtype = param_dtype or dtype
    xd = with_layout(x.detach().to(dtype, copy=True), layout).requires_grad_()
    wd = None if weight is None else weight.detach().to(param_dtype, copy=True).requires_grad_()
    bd = None if bias is None else bias.detach().to(param_dtype, copy=True).requires_grad_()
    rm, rv = (None, None) if running is None else (running[0].to(param_dtype, copy=True),
                                                   running[1].to(param_dtype, copy=True))
    y = sk.masked_batch_norm(xd, active, rm, rv, wd, bd, training=training, momentum=momentum, eps=eps,
                             backend=backend)
    y.backward(grad_out.to(dtype))
    out = {"y": y, "grad_x": xd.grad}
    if wd is not None:
        out["grad_weight"] = wd.grad
    if bd is not None:
        out["grad_bias"] = bd.grad
    if rm is not None:
        out["running_mean"], out["running_var"] = rm, rv
    return out


def inputs(n, c, seed=0, h=H, w=W):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2 + 0.5
    weight = torch.randn(c, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    running = (torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    grad_out = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    return x, weight, bias, running, grad_out


def check_against_reference(backend, x, active, weight, bias, running, grad_out, dtype, layout="contiguous",
                            **kw):
    out = run(backend, x, active, weight, bias, running, grad_out, dtype=dtype, layout=layout, **kw)
    ref64 = run("reference", x, active, weight, bias, running, grad_out, dtype=torch.float64,
                **{**kw, "param_dtype": None})
    reflow = run("reference", x, active, weight, bias, running, grad_out, dtype=dtype, **kw)
    assert out.keys() == ref64.keys()
    for key in out:
        assert out[key].dtype == (dtype if key in ("y", "grad_x") else kw.get("param_dtype") or dtype), key
        assert_close_to_reference(out[key], reflow[key], ref64[key], f"{backend} {key}")
    return out


# (x dtype, layout, parameter and running statistics dtype): float16/bfloat16 inputs with float32
# parameters is the mixed-precision (autocast) case.
DTYPE_LAYOUTS = [(torch.float32, "contiguous", None), (torch.float32, "channels_last", None),
                 (torch.float64, "channels_last", None), (torch.bfloat16, "channels_last", torch.float32),
                 (torch.bfloat16, "contiguous", None), (torch.float16, "channels_last", torch.float32),
                 (torch.float16, "contiguous", None)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype,layout,param_dtype", DTYPE_LAYOUTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("kind", ["visible", "spark", "random", "masked"])
@pytest.mark.parametrize("n,c", [(1, 3), (8, 1), (8, 96), (1, 97)])
def test_matches_reference_training(backend, dtype, layout, param_dtype, kind, n, c):
    x, weight, bias, running, grad_out = inputs(n, c)
    check_against_reference(backend, x, make_active(kind, n), weight, bias, running, grad_out, dtype, layout,
                            param_dtype=param_dtype)


# A single active site has zero variance, so its output b = x * scale + shift cancels two terms of
# size |mean| * w / sqrt(eps): the (x, scale, shift) contract of masked_bn_elemt cannot be accurate
# there in float32 (the reference computes (x - mean) * ... exactly); it is checked in float64.
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("kind,dtype,param_dtype", [("spark", torch.float32, None), ("spark", torch.float64, None),
                                                    ("single", torch.float64, None),
                                                    ("spark", torch.bfloat16, torch.float32)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_matches_reference_modes(backend, dtype, param_dtype, training, affine, kind):
    x, weight, bias, running, grad_out = inputs(8, 97, seed=1)
    if not affine:
        weight = bias = None
    check_against_reference(backend, x, make_active(kind, 8), weight, bias, running, grad_out, dtype,
                            "channels_last", training=training, momentum=0.3, param_dtype=param_dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_input(backend, dtype):
    x, weight, bias, running, grad_out = inputs(8, 97, seed=4)
    check_against_reference(backend, x, make_active("spark", 8), weight, bias, running, grad_out, dtype, "strided")


@pytest.mark.parametrize("backend", FUSED)
def test_no_running_stats(backend):
    x, weight, bias, _, grad_out = inputs(2, 5)
    check_against_reference(backend, x, make_active("random", 2), weight, bias, None, grad_out, torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_all_visible_equals_batch_norm(backend, training):
    x, weight, bias, running, grad_out = inputs(8, 96)
    out = run(backend, x, make_active("visible", 8), weight, bias, running, grad_out, training=training,
              momentum=0.2)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, weight, bias))
    rm, rv = running[0].clone(), running[1].clone()
    y = F.batch_norm(xr, rm, rv, wr, br, training, 0.2, 1e-5)
    y.backward(grad_out)
    for key, want in [("y", y), ("grad_x", xr.grad), ("grad_weight", wr.grad), ("grad_bias", br.grad),
                      ("running_mean", rm), ("running_var", rv)]:
        torch.testing.assert_close(out[key], want, rtol=RTOL[F64], atol=ATOL[F64], msg=key)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_masked(backend, dtype):
    x, weight, bias, running, grad_out = inputs(2, 7)
    out = run(backend, x, make_active("masked", 2), weight, bias, running, grad_out, dtype=dtype)
    for key in ("y", "grad_x", "grad_weight", "grad_bias"):
        assert torch.equal(out[key], torch.zeros_like(out[key])), key
    assert torch.equal(out["running_mean"], running[0].to(dtype))
    assert torch.equal(out["running_var"], running[1].to(dtype))


# Statistics computed by hand (the running-statistics update is code every backend shares, so comparing
# backends cannot see a bug in it). One active site: PyTorch's batch_norm refuses it in training
# (F.batch_norm raises; the official SparK calls BatchNorm1d on the active rows, which raises too; the
# aten op would store NaN in running_var). Ours normalizes with variance 0 (output = bias) and treats the
# unbiased variance of one value as 0, so running_var decays towards 0 and running_mean moves as usual.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_statistics_by_hand_one_and_two_active_sites(backend, layout):
    x = torch.zeros(2, 2, 3, 4, dtype=F64)
    x[1, :, 2, 1] = torch.tensor([3.0, -2.0])  # site a
    x[0, :, 0, 3] = torch.tensor([1.0, 4.0])  # site b
    x[0, :, 1, 1] = 50.0  # an inactive site
    weight, bias = torch.tensor([2.0, -1.0], dtype=F64), torch.tensor([0.5, 0.25], dtype=F64)
    running = (torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([2.0, 3.0], dtype=F64))
    grad_out = torch.ones_like(x)
    one = torch.zeros(2, 1, 3, 4, dtype=torch.bool)
    one[1, 0, 2, 1] = True
    out = run(backend, x, one, weight, bias, running, grad_out, momentum=0.25, layout=layout)
    assert torch.equal(out["running_mean"], torch.tensor([0.75 * 1.0 + 0.25 * 3.0, 0.75 * -1.0 + 0.25 * -2.0],
                                                         dtype=F64))
    assert torch.equal(out["running_var"], torch.tensor([0.75 * 2.0, 0.75 * 3.0], dtype=F64))
    expected_y = torch.zeros_like(x)
    expected_y[1, :, 2, 1] = bias
    torch.testing.assert_close(out["y"], expected_y, rtol=0, atol=1e-9)

    two = one.clone()
    two[0, 0, 0, 3] = True
    out = run(backend, x, two, weight, bias, running, grad_out, momentum=0.25, layout=layout)
    # mean (a + b) / 2 = (2, 1); biased variance ((a - b) / 2)^2 = (1, 9); unbiased twice that.
    torch.testing.assert_close(out["running_mean"], torch.tensor([0.75 * 1 + 0.25 * 2, 0.75 * -1 + 0.25 * 1],
                                                                 dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(out["running_var"], torch.tensor([0.75 * 2 + 0.25 * 2, 0.75 * 3 + 0.25 * 18],
                                                                dtype=F64), rtol=0, atol=1e-15)
    xhat_a = torch.tensor([1.0 / (1 + 1e-5) ** 0.5, -3.0 / (9 + 1e-5) ** 0.5], dtype=F64)
    expected_y = torch.zeros_like(x)
    expected_y[1, :, 2, 1] = xhat_a * weight + bias
    expected_y[0, :, 0, 3] = -xhat_a * weight + bias
    torch.testing.assert_close(out["y"], expected_y, rtol=1e-12, atol=1e-12)
    # dL/dbias = sum of grad_out over active sites; dL/dweight = sum of grad_out * xhat = 0 here.
    torch.testing.assert_close(out["grad_bias"], torch.tensor([2.0, 2.0], dtype=F64))
    torch.testing.assert_close(out["grad_weight"], torch.zeros(2, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eval_uses_running_statistics_by_hand(backend):
    x, weight, bias, running, grad_out = inputs(2, 3, seed=7)
    active = make_active("spark", 2)
    out = run(backend, x, active, weight, bias, running, grad_out, training=False)
    scale = weight / (running[1] + 1e-5).sqrt()
    expected = ((x - running[0][:, None, None]) * scale[:, None, None] + bias[:, None, None]) * active
    torch.testing.assert_close(out["y"], expected, rtol=RTOL[F64], atol=ATOL[F64])
    torch.testing.assert_close(out["grad_x"], grad_out * scale[:, None, None] * active, rtol=RTOL[F64],
                               atol=ATOL[F64])
    assert torch.equal(out["running_mean"], running[0]) and torch.equal(out["running_var"], running[1])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inactive_garbage_does_not_leak(backend, layout):
    x, weight, bias, running, grad_out = inputs(4, 9)
    active = make_active("spark", 4)
    clean = run(backend, x, active, weight, bias, running, grad_out, layout=layout)
    garbage = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5,
                          float("nan"), 1e30).to(x.dtype)
    dirty_x = torch.where(active, x, garbage)
    dirty_g = torch.where(active, grad_out, torch.full_like(grad_out, float("inf")))
    dirty = run(backend, dirty_x, active, weight, bias, running, dirty_g, layout=layout)
    for key in clean:
        assert torch.isfinite(dirty[key]).all(), key
        assert torch.equal(dirty[key], clean[key]), key


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
@pytest.mark.parametrize("c,dtype", [(64, F32), (61, F32), (64, torch.bfloat16)], ids=str)
def test_large_channels_last_outputs(c, dtype):
    """Channels_last outputs of at least kStreamOutputBytes (2 MiB, csrc/cpu/vec.h) are written with streaming
    stores, these of 4 MiB too; with 61 channels the rows are not 32-byte aligned and fall back to plain writes."""
    side = 96 if dtype == F32 else 128
    x, weight, bias, running, grad_out = inputs(2, c, h=side, w=side)
    assert x.numel() * dtype.itemsize >= 4 << 20
    check_against_reference("cpu", x, make_active("spark", 2, side, side), weight, bias, running, grad_out, dtype,
                            layout="channels_last", param_dtype=F32)


@pytest.mark.parametrize("backend", FUSED)
def test_backward_keeps_active_rows_only(backend):
    """A channels_last x is kept for backward as its active rows, not whole: the fused model must not keep
    more for backward than the reference's gather -> batch_norm -> scatter (issue 13, peak memory)."""
    x, weight, bias, running, _ = inputs(4, 16, h=16, w=16)
    x = x.float().contiguous(memory_format=torch.channels_last).requires_grad_()
    active = sk.ActiveSites(make_active("spark", 4, 16, 16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sk.masked_batch_norm(x, active, running[0].float(), running[1].float(), weight.float(), bias.float(),
                             backend=backend)
    kept = sum(t.numel() * t.element_size() for t in saved if t.dtype == x.dtype and t.dim() > 1)
    assert 0 < active.num_active < x.shape[0] * 16 * 16
    assert kept == active.num_active * x.shape[1] * x.element_size()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deterministic_across_runs_and_threads(backend, layout, dtype):
    # Enough sites for several reduction chunks.
    x, weight, bias, running, grad_out = inputs(2, 96, h=32, w=32)
    active = make_active("spark", 2, 32, 32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2, 2):
            torch.set_num_threads(n_threads)
            results.append(run(backend, x, active, weight, bias, running, grad_out, dtype=dtype,
                               layout=layout, param_dtype=torch.float32))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for key in results[0]:
            assert torch.equal(results[0][key], other[key]), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(backend, training, layout):
    g = torch.Generator().manual_seed(3)
    x = with_layout(torch.randn(2, 3, 4, 3, generator=g, dtype=torch.float64), layout).requires_grad_()
    weight = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    running = (torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) + 1)
    active = make_active("random", 2, 4, 3, seed=1)

    def fn(x, weight, bias):
        # Fresh running statistics: they are updated in place at every call in training.
        return sk.masked_batch_norm(x, active, running[0].clone(), running[1].clone(), weight, bias,
                                    training=training, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, weight, bias), **GRADCHECK)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck(layout, dtype):
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is not available: " + sk.unavailable_reasons().get("cpu", ""))
    g = torch.Generator().manual_seed(0)
    x = with_layout(torch.randn(2, 5, 4, 3, generator=g).to(dtype), layout)
    dy = with_layout(torch.randn(2, 5, 4, 3, generator=g).to(dtype), "contiguous")
    index = sk.ActiveSites(make_active("random", 2, 4, 3)).index
    vec = [torch.randn(5, generator=g) for _ in range(3)]
    for op, args in [(ops.masked_bn_stats, (x, index)),
                     (ops.masked_bn_backward_stats, (dy, x, index, vec[0])),
                     (ops.masked_bn_elemt, (x, index, vec[0], vec[1])),
                     (ops.masked_bn_backward_elemt, (dy, x, index, *vec))]:
        torch.library.opcheck(op, args)


def test_bad_inputs():
    x, weight, bias, running, _ = inputs(2, 4)
    x = x.float()
    weight, bias = weight.float(), bias.float()
    rm, rv = running[0].float(), running[1].float()
    active = make_active("random", 2)

    def call(**kw):
        args = dict(x=x, active=active, running_mean=rm, running_var=rv, weight=weight, bias=bias)
        args.update(kw)
        return sk.masked_batch_norm(**args)

    for bad in (x.int(), x.bool(), x.to(torch.complex64)):
        with pytest.raises(TypeError, match="x must be a floating-point"):
            call(x=bad)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        call(x=x[0])
    with pytest.raises(ValueError, match="weight is on meta"):
        call(weight=weight.to("meta"))
    with pytest.raises(ValueError, match="running_mean is on meta"):
        call(running_mean=rm.to("meta"))
    with pytest.raises(ValueError, match="active is on the meta device"):
        call(active=active.to("meta"))
    with pytest.raises(TypeError, match="active must have dtype torch.bool"):
        call(active=active.float())
    with pytest.raises(ValueError, match=r"active must have shape \(N, 1, H, W\)"):
        call(active=active[:, 0])
    with pytest.raises(ValueError, match="active is for"):
        call(active=active[:1])
    with pytest.raises(ValueError, match="weight must have shape"):
        call(weight=weight[:3])
    with pytest.raises(ValueError, match="running_var must have shape"):
        call(running_var=torch.ones(5))
    with pytest.raises(ValueError, match="running_mean and running_var"):
        call(running_var=None)
    for momentum in (-0.1, 1.5, "0.1"):
        with pytest.raises(ValueError, match="momentum"):
            call(momentum=momentum)
    with pytest.raises(ValueError, match="eps"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        call(backend="nope")


def test_kernel_argument_checks():
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is not available: " + sk.unavailable_reasons().get("cpu", ""))
    x = torch.randn(2, 4, 3, 3)
    index = sk.ActiveSites(make_active("random", 2, 3, 3)).index
    vec = torch.zeros(4)
    assert_index_and_dtype_checks(ops.masked_bn_stats)
    with pytest.raises(RuntimeError, match="scale must have dtype Float"):
        ops.masked_bn_elemt(x, index, vec.double(), vec)
    with pytest.raises(RuntimeError, match=r"shift must have shape \(4\)"):
        ops.masked_bn_elemt(x, index, vec, torch.zeros(3))
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        ops.masked_bn_backward_elemt(x[:1], x, index, vec, vec, vec)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.masked_bn_stats(x[0], index)


# ---- modules ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dense_type", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_module_matches_functional(backend, dense_type):
    torch.manual_seed(0)
    dense = dense_type(6, momentum=0.25)
    with torch.no_grad():
        dense.weight.normal_()
        dense.bias.normal_()
        dense.running_mean.normal_()
    module = sk.nn.MaskedBatchNorm2d.from_dense(dense, backend=backend)
    x, _, _, _, grad_out = inputs(4, 6)
    x, grad_out = x.float(), grad_out.float()
    active = make_active("spark", 4)
    rm, rv = dense.running_mean.clone(), dense.running_var.clone()
    want = sk.masked_batch_norm(x, active, rm, rv, dense.weight, dense.bias, True, 0.25, dense.eps,
                                backend="reference")
    with sk.active(active):
        y = module(x)
    torch.testing.assert_close(y, want, rtol=RTOL[F32], atol=ATOL[F32])
    torch.testing.assert_close(module.running_mean, rm)
    torch.testing.assert_close(module.running_var, rv)
    assert module.num_batches_tracked.item() == 1
    module.eval()
    with sk.active(active):
        y_eval = module(x)
    dense_eval = dense.eval()
    dense_eval.load_state_dict(module.state_dict())
    torch.testing.assert_close(y_eval, torch.where(active, nn.BatchNorm2d.forward(dense_eval, x), 0.0),
                               rtol=RTOL[F32], atol=ATOL[F32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_cumulative_average(backend):
    """momentum=None: running stats are the cumulative average, as nn.BatchNorm2d (all sites visible)."""
    dense = nn.BatchNorm2d(5, momentum=None)
    module = sk.nn.MaskedBatchNorm2d.from_dense(dense, backend=backend)
    active = make_active("visible", 3)
    for seed in range(3):
        x = inputs(3, 5, seed=seed)[0].float()
        with sk.active(active):
            y = module(x)
        torch.testing.assert_close(y, dense(x), rtol=RTOL[F32], atol=ATOL[F32])
    torch.testing.assert_close(module.running_mean, dense.running_mean)
    torch.testing.assert_close(module.running_var, dense.running_var)


# ---- synchronized BatchNorm ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_case(seed: int = 5):
    x, weight, bias, running, grad_out = inputs(4, 6, seed=seed, h=6, w=5)
    return x, weight, bias, running, grad_out, make_active("spark", 4, 6, 5)


# The float32 case with per-channel means of up to 1e4 standard deviations (x's std is 2): statistics merged
# across processes as (count, sum, sum of squares) would lose every digit of the variance. The fused
# backends include "triton" in Triton's interpreter (CPU tensors), whose partials are float32.
SYNC_OFFSETS = torch.tensor([2e4, -2e4, 2e3, 0.0, 2e2, 2e4], dtype=torch.float64).view(1, 6, 1, 1)


def _sync_offset_backends():
    interpreted = "triton" in sk.available_backends() and sk._backends.get_backend("triton").device_reason("cpu") is None
    return ["reference"] + FUSED + (["triton"] if interpreted else [])


def _sync_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=__import__("datetime").timedelta(seconds=30))
    try:
        x, weight, bias, running, grad_out, active = _sync_case()
        half = slice(2 * rank, 2 * rank + 2)
        results = {}
        for case, backends, dtype, shift in (("plain", ["reference"] + FUSED, F64, torch.zeros(1, 6, 1, 1, dtype=F64)),
                                             ("offset", _sync_offset_backends(), F32, SYNC_OFFSETS)):
            for backend in backends:
                rm, rv = (running[0] + shift.flatten()).to(dtype), running[1].to(dtype, copy=True)
                xr = (x[half] + shift).to(dtype).detach().requires_grad_()
                wr, br = weight.to(dtype, copy=True).requires_grad_(), bias.to(dtype, copy=True).requires_grad_()
                y = sk.masked_batch_norm(xr, active[half].clone(), rm, rv, wr, br, training=True, momentum=0.3,
                                         process_group=dist.group.WORLD, backend=backend)
                y.backward(grad_out[half].to(dtype))
                results[case, backend] = dict(y=y.detach(), grad_x=xr.grad, grad_weight=wr.grad, grad_bias=br.grad,
                                              running_mean=rm, running_var=rv)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_synchronized_equals_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.start_processes(_sync_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    import time
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("synchronized BatchNorm workers timed out")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, weight, bias, running, grad_out, active = _sync_case()
    for backend in ["reference"] + FUSED:
        whole = run(backend, x, active, weight, bias, running, grad_out, momentum=0.3)
        for key in ("y", "grad_x"):
            torch.testing.assert_close(torch.cat([r["plain", backend][key] for r in ranks]), whole[key].detach(),
                                       rtol=RTOL[F64], atol=ATOL[F64], msg=f"{backend} {key}")
        for key in ("running_mean", "running_var"):
            for r in ranks:
                torch.testing.assert_close(r["plain", backend][key], whole[key], rtol=RTOL[F64], atol=ATOL[F64],
                                           msg=f"{backend} {key}")
        for key in ("grad_weight", "grad_bias"):
            torch.testing.assert_close(ranks[0]["plain", backend][key] + ranks[1]["plain", backend][key], whole[key],
                                       rtol=RTOL[F64], atol=ATOL[F64], msg=f"{backend} {key}")
    # Offsets: every backend's synchronized statistics (float32) against the whole batch's in float64 on the
    # same float32 inputs, allowed 4x the error of the reference on the whole batch in float32 (helpers.py).
    x32 = (x + SYNC_OFFSETS).float()
    params = (weight.float().double(), bias.float().double(),
              ((running[0] + SYNC_OFFSETS.flatten()).float().double(), running[1].float().double()))
    exact = run("reference", x32.double(), active, *params, grad_out, momentum=0.3)
    lowp = run("reference", x32, active, *params, grad_out, momentum=0.3, dtype=F32)
    for backend in _sync_offset_backends():
        for key in ("running_mean", "running_var"):
            for r in ranks:
                assert_close_to_reference(r["offset", backend][key], lowp[key], exact[key],
                                          f"synchronized {backend} {key}")


def grad_out_variant(values: torch.Tensor, kind: str, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A grad_out the C++ kernels read in place: one value with every stride 0 (what y.sum().backward() passes), or
    values dense in the other layout than x's (an NCHW grad_out for a channels_last x and the reverse)."""
    if kind == "expanded":
        return torch.full((), 0.75, dtype=dtype).expand(values.shape)
    other = torch.contiguous_format if layout == "channels_last" else torch.channels_last
    return values.to(dtype).contiguous(memory_format=other)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["expanded", "other_layout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_grad_out_read_in_place_equals_materialized(backend, kind, dtype, layout):
    x, weight, bias, running, grad_out = inputs(4, 9)
    active = make_active("spark", 4)
    grad = grad_out_variant(grad_out, kind, dtype, layout)
    got = run(backend, x, active, weight, bias, running, grad, dtype=dtype, layout=layout, param_dtype=F32)
    want = run(backend, x, active, weight, bias, running, with_layout(grad.contiguous(), layout), dtype=dtype,
               layout=layout, param_dtype=F32)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_ops_take_compact_rows(dtype):
    """The C++ backward ops read x from the (M, C) active rows forward keeps, as from the dense channels_last x."""
    if "cpu" not in FUSED:
        pytest.skip("the cpu backend is not available: " + sk.unavailable_reasons().get("cpu", ""))
    x, _, _, _, grad = inputs(3, 7)
    x, grad = (t.to(dtype).contiguous(memory_format=torch.channels_last) for t in (x, grad))
    index = sk.ActiveSites(make_active("spark", 3)).index
    rows = x.permute(0, 2, 3, 1).reshape(-1, 7)[index.long()]
    mean, a, b, d = torch.randn(4, 7, generator=torch.Generator().manual_seed(2))
    for g in (grad, torch.full((), 0.5, dtype=dtype).expand(grad.shape), grad.contiguous()):
        assert torch.equal(ops.masked_bn_backward_stats(g, rows, index, mean),
                           ops.masked_bn_backward_stats(g, x, index, mean))
        from_rows = ops.masked_bn_backward_elemt(g, rows, index, a, b, d)
        assert from_rows.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(from_rows, ops.masked_bn_backward_elemt(g, x, index, a, b, d))
    if dtype == torch.float32:  # the fake (meta) kernels agree on the compact form's output
        torch.library.opcheck(ops.masked_bn_backward_elemt, (grad, rows, index, a, b, d))
        torch.library.opcheck(ops.masked_bn_backward_stats, (grad, rows, index, mean))
    with pytest.raises(RuntimeError, match=r"rows of the active sites must have shape \(\d+, 7\)"):
        ops.masked_bn_backward_stats(grad, rows[1:], index, mean)
    with pytest.raises(RuntimeError, match="x must have grad_out's dtype"):
        ops.masked_bn_backward_elemt(grad, rows.double(), index, a, b, d)


def staged_cpu_kernels():
    """The cpu backend's kernels without its whole-step training ops: the staged path every other backend and
    SyncBatchNorm take."""
    from types import SimpleNamespace
    from spark_kernels._backends import get_backend
    from spark_kernels._registry import CPU_TRAINING_OPS
    training_ops = {p.name for p in CPU_TRAINING_OPS}
    return SimpleNamespace(**{k: v for k, v in vars(get_backend("cpu").kernels).items() if k not in training_ops})


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["random", "expanded", "other_layout"])
@pytest.mark.parametrize("affine", [True, False])
def test_training_ops_match_the_staged_path(dtype, kind, affine):
    """A channels_last training step of the cpu backend runs as one C++ op per pass; it computes what the staged
    primitives and the Python arithmetic between them compute (float64 coefficients, exact-centre correction)."""
    from spark_kernels.batch_norm import _MaskedBatchNorm
    x, weight, bias, running, grad_out = inputs(4, 9)
    sites = sk.ActiveSites(make_active("spark", 4))
    grad = grad_out.to(dtype).contiguous(memory_format=torch.channels_last) if kind == "random" else \
        grad_out_variant(grad_out, kind, dtype, "channels_last")
    param_dtype = F32 if dtype == torch.bfloat16 else dtype
    results = []
    for kernels in (staged_cpu_kernels(), None):
        xd = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
        params = [t.to(param_dtype).requires_grad_() for t in (weight, bias)] if affine else [None, None]
        rm, rv = (t.to(param_dtype) for t in running)
        if kernels is None:
            y = sk.masked_batch_norm(xd, sites, rm, rv, *params, momentum=0.3, backend="cpu")
        else:
            y = _MaskedBatchNorm.apply(xd, *params, rm, rv, sites.index, sites.num_active, True, 0.3, 1e-5, None,
                                       kernels)
        y.backward(grad)
        results.append([y, xd.grad, rm, rv] + [p.grad for p in params if p is not None])
    for staged, whole in zip(*results):
        assert whole.dtype == staged.dtype
        torch.testing.assert_close(whole, staged)


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [13, 2048])
def test_training_backward_same_bits_for_nchw_grad_out(dtype, c):
    """An NCHW grad_out of a channels_last x is gathered into rows a block of sites at a time (several blocks per
    reduction chunk at 2048 channels; 13 channels are not a multiple of the gather's 8-wide vectors): the training
    backward gives the same bits as for the same values in channels_last, with x as the kept rows or dense."""
    x, weight, _, _, grad_out = inputs(2, c, h=12, w=12)
    sites = sk.ActiveSites(make_active("spark", 2, 12, 12))
    xd = x.to(dtype).contiguous(memory_format=torch.channels_last)
    w = weight.to(F32 if dtype == torch.bfloat16 else dtype)
    _, rows, mean, invstd = ops.masked_bn_train_forward(xd, sites.index, w, None, None, None, 0.1, 1e-5)
    grad = grad_out.to(dtype)
    want = ops.masked_bn_train_backward(grad.contiguous(memory_format=torch.channels_last), rows, sites.index, w,
                                        mean, invstd)
    for x_kept in (rows, xd):
        got = ops.masked_bn_train_backward(grad.contiguous(), x_kept, sites.index, w, mean, invstd)
        for name, a, b in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
            assert torch.equal(a, b), name


def gather_patterns_mask() -> torch.Tensor:
    """Active sites that take each of the ways the cpu backend gathers an NCHW grad_out's values into rows
    (gather_rows in csrc/cpu/norm_cpu.h), on 12 x 24 planes: image 0 a whole image row (runs of 8 that line up with
    their span, transposed straight into the rows) and an unaligned run of 7 (transposed, then copied out); image 1
    sites too far apart for a span (gathered one by one), two adjacent sites (a span under 8 values) and the last
    site of the image; image 2 all active (spans cut at kSpanSites, the last block overlapping the one before)."""
    m = torch.zeros(3, 1, 12, 24, dtype=torch.bool)
    m[0, 0, 3, :] = True
    m[0, 0, 5, 3:10] = True
    for h, w in ((0, 0), (4, 17), (7, 5), (7, 6), (11, 23)):
        m[1, 0, h, w] = True
    m[2] = True
    return m


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("c", [13, 16])
def test_nchw_grad_out_gathered_in_every_pattern(dtype, c):
    """Each way of gathering an NCHW grad_out (gather_patterns_mask) gives the same bits as the same values in
    channels_last, for a width of whole 8-channel vectors and one with a remainder."""
    x, weight, _, _, grad_out = inputs(3, c, h=12, w=24)
    sites = sk.ActiveSites(gather_patterns_mask())
    xd = x.to(dtype).contiguous(memory_format=torch.channels_last)
    w = weight.to(F64 if dtype == F64 else F32)
    _, rows, mean, invstd = ops.masked_bn_train_forward(xd, sites.index, w, None, None, None, 0.1, 1e-5)
    grad = grad_out.to(dtype)
    want = ops.masked_bn_train_backward(grad.contiguous(memory_format=torch.channels_last), rows, sites.index, w,
                                        mean, invstd)
    got = ops.masked_bn_train_backward(grad.contiguous(), rows, sites.index, w, mean, invstd)
    for name, a, b in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.skipif("cpu" not in FUSED, reason="the cpu backend is not built")
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=str)
def test_training_ops_opcheck_and_argument_checks(dtype):
    from spark_kernels._registry import CPU_TRAINING_OPS, sample_tensors
    t = sample_tensors(2, 5, 4, 3, 3, dtype, "cpu", rows=True, seed=3)
    for p in CPU_TRAINING_OPS:
        torch.library.opcheck(getattr(ops, p.native), p.sample(t))
    y, rows, mean, invstd = ops.masked_bn_train_forward(t.x, t.index, None, None, None, None, 0.1, 1e-5)
    assert torch.equal(rows, t.x.permute(0, 2, 3, 1).reshape(-1, 5)[t.index.long()])
    grad_x, _, _ = ops.masked_bn_train_backward(t.grad, rows, t.index, None, mean, invstd)
    assert torch.equal(grad_x, ops.masked_bn_train_backward(t.grad, t.x, t.index, None, mean, invstd)[0])
    with pytest.raises(RuntimeError, match="x must be channels_last"):
        ops.masked_bn_train_forward(t.x.contiguous(), t.index, None, None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match=r"running_var must have shape \(5\)"):
        ops.masked_bn_train_forward(t.x, t.index, None, None, None, t.vec[:4], 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="invstd must be a float64 CPU tensor"):
        ops.masked_bn_train_backward(t.grad, rows, t.index, None, mean, invstd.float())
