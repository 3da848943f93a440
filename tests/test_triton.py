"""The GPU backends against the masked-dense reference, forward and backward: "triton", and on a GPU
machine "cuda" too.

Here (no GPU) the Triton kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set in
conftest.py before triton is imported); on a GPU machine run with TRITON_INTERPRET=0 (scripts/gpu_check.sh)
and the same tests run the compiled Triton kernels and the CUDA kernels on CUDA tensors. Shapes are small because the interpreter costs ~ms per program.
bfloat16 runs too: Triton 3.8's interpreter emulates it (earlier interpreters had no bfloat16 arithmetic).
"""
from __future__ import annotations

import pytest
import torch

import spark_kernels as sk
from helpers import ATOL, RTOL, assert_close_to_reference, make_mask

if "triton" not in sk.available_backends():
    pytest.skip(f"triton backend unavailable: {sk.unavailable_reasons().get('triton')}", allow_module_level=True)

from spark_kernels.triton import common, config  # noqa: E402  (only importable when triton is)

DEVICE = "cpu" if common.INTERPRET else "cuda"
# The backends whose kernels run on DEVICE here.
BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" and "cuda" in sk.available_backends() else [])
DTYPES = common.KERNEL_DTYPES
LAYOUTS = ("planes", "rows")
# (mask kind, ratio): SparK patch masks and random masks at 0.6, plus nothing masked and everything masked.
MASKS = (("spark", 0.6), ("random", 0.6), ("spark", 0.0), ("spark", 1.0))


def _input(shape, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(DEVICE, dtype)
    return x.to(memory_format=torch.channels_last) if layout == "rows" else x


def _param(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def _run(fn, tensors, grad_dtype):
    """(output, grads of tensors) of fn(*tensors) with tensors as fresh leaves, back-propagating
    _grad(output, grad_dtype)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(_grad(out, grad_dtype).to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _check(fn_backend, fn_reference, tensors, what):
    """Backend in dtype d vs the reference in float64 and in d (flash-attention rule, tests/helpers.py)."""
    dtype = tensors[0].dtype
    out, grads = _run(fn_backend, tensors, dtype)
    ref64, grads64 = _run(fn_reference, [t.double() for t in tensors], dtype)
    ref_lp, grads_lp = _run(fn_reference, tensors, dtype)
    assert out.dtype == tensors[0].dtype
    assert_close_to_reference(out, ref_lp, ref64, f"{what}: output")
    for i, (g, g64, g_lp) in enumerate(zip(grads, grads64, grads_lp)):
        assert g.dtype == tensors[i].dtype
        assert_close_to_reference(g, g_lp, g64, f"{what}: grad of input {i}")
    return out, grads


def _grad(out, dtype):
    """The gradient fed back into an output: fixed values of its shape, rounded to the inputs' dtype (also
    for the float64 reference run, so that every run sees the same values)."""
    return _param(out.shape, dtype, 99)


def _mask(kind, ratio, n, h, w):
    return make_mask(kind, n, h, w, ratio, seed=1).to(DEVICE)


# -- depthwise conv -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k,stride", ((5, 1), (3, 2), (5, 2), (7, 2)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dwconv_k5_and_strided(backend, k, stride, layout, dtype):
    """5x5 and stride 2 (odd H: the last output row pools a half block); the strided input gradient gathers
    through the transposed table."""
    n, c, h, w = 2, 10, 11, 8
    mask = _mask("spark", 0.6, n, h, w)
    tensors = [_input((n, c, h, w), dtype, layout, 20), _param((c, 1, k, k), dtype, 21), _param((c,), dtype, 22)]
    out, grads = _check(lambda x, wt, b: sk.sparse_depthwise_conv2d(x, wt, b, mask, stride=stride, backend=backend),
                        lambda x, wt, b: sk.sparse_depthwise_conv2d(x, wt, b, mask, stride=stride,
                                                                    backend="reference"),
                        tensors, f"dwconv k={k} stride={stride} {layout} {dtype}")
    assert out.shape == (n, c, -(-h // stride), -(-w // stride))
    out_mask = sk.ActiveSites(mask).strided(stride).mask
    assert torch.all(out[~out_mask.expand_as(out)] == 0) and torch.all(grads[0][~mask.expand_as(grads[0])] == 0)


@pytest.mark.parametrize("kind,ratio", MASKS[1:])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dwconv_masks(backend, kind, ratio, layout):
    n, c, h, w = 1, 5, 9, 7
    mask = _mask(kind, ratio, n, h, w)
    tensors = [_input((n, c, h, w), torch.float32, layout, 3), _param((c, 1, 3, 3), torch.float32, 4),
               _param((c,), torch.float32, 5)]
    out, _ = _check(lambda x, wt, b: sk.sparse_depthwise_conv2d(x, wt, b, mask, backend=backend),
                    lambda x, wt, b: sk.sparse_depthwise_conv2d(x, wt, b, mask, backend="reference"),
                    tensors, f"dwconv {kind} {ratio} {layout}")
    if ratio == 1.0:
        assert torch.all(out == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dwconv_many_programs_and_channel_blocks(backend, layout, monkeypatch):
    """Several site programs, several site blocks per reduction program, several channel blocks, no bias,
    the k = 7 tap chunks (16 + 16 + 16 + 1)."""
    n, c, h, w = 1, 130, 9, 11
    channel_blocks = -(-c // config.config_for("dwconv_wgrad", layout, c).block_c)
    monkeypatch.setattr(config, "wgrad_programs", lambda device: 2 * channel_blocks)  # 2 site programs each
    mask = _mask("random", 0.3, n, h, w)
    tensors = [_input((n, c, h, w), torch.float32, layout, 6), _param((c, 1, 7, 7), torch.float32, 7)]
    _check(lambda x, wt: sk.sparse_depthwise_conv2d(x, wt, None, mask, backend=backend),
           lambda x, wt: sk.sparse_depthwise_conv2d(x, wt, None, mask, backend="reference"),
           tensors, f"dwconv multi-block {layout}")


# -- batch norm -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,ratio", MASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm(backend, layout, dtype, kind, ratio):
    n, c, h, w = 2, 10, 9, 7
    mask = _mask(kind, ratio, n, h, w)
    tensors = [_input((n, c, h, w), dtype, layout, 10), _param((c,), dtype, 11), _param((c,), dtype, 12)]
    running = {}

    def fn(backend):
        def run(x, wt, b):
            key = (backend, x.dtype)
            # Stock BatchNorm on CPU wants running statistics in the input's dtype.
            running[key] = (torch.zeros(c, device=DEVICE, dtype=x.dtype), torch.ones(c, device=DEVICE, dtype=x.dtype))
            return sk.masked_batch_norm(x, mask, *running[key], wt, b, training=True, backend=backend)
        return run

    _check(fn(backend), fn("reference"), tensors, f"bn {layout} {dtype} {kind} {ratio}")
    for got, want in zip(running[(backend, dtype)], running[("reference", torch.float64)]):
        torch.testing.assert_close(got.float(), want.float(), rtol=RTOL[dtype], atol=ATOL[dtype])


def _stats_for(x, *stats):
    """Copies of running statistics in the dtype stock BatchNorm on CPU wants next to x."""
    return [s.clone().to(x.dtype) for s in stats]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_eval_many_programs(backend, layout, monkeypatch):
    monkeypatch.setattr(config, "REDUCTION_PROGRAMS", 20 if layout == "planes" else 2)  # 2 per channel block
    n, c, h, w = 2, 37, 13, 11
    mask = _mask("random", 0.6, n, h, w)
    rm, rv = _param((c,), torch.float32, 13), _param((c,), torch.float32, 14).abs() + 0.5
    tensors = [_input((n, c, h, w), torch.float32, layout, 15), _param((c,), torch.float32, 16),
               _param((c,), torch.float32, 17)]
    for training in (False, True):
        _check(lambda x, wt, b: sk.masked_batch_norm(x, mask, rm.clone(), rv.clone(), wt, b, training=training,
                                                     backend=backend),
               lambda x, wt, b: sk.masked_batch_norm(x, mask, *_stats_for(x, rm, rv), wt, b,
                                                     training=training, backend="reference"),
               tensors, f"bn training={training} {layout}")


# -- layer norm -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("data_format", ("channels_first", "channels_last"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,ratio", MASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm(backend, data_format, dtype, kind, ratio):
    n, c, h, w = 2, 10, 9, 7
    mask = _mask(kind, ratio, n, h, w)
    shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    tensors = [_input(shape, dtype, "planes", 20), _param((c,), dtype, 21), _param((c,), dtype, 22)]
    _check(lambda x, wt, b: sk.masked_layer_norm(x, mask, wt, b, data_format=data_format, backend=backend),
           lambda x, wt, b: sk.masked_layer_norm(x, mask, wt, b, data_format=data_format, backend="reference"),
           tensors, f"ln {data_format} {dtype} {kind} {ratio}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_wide_many_programs(backend, layout, monkeypatch):
    """C = 130 (a 256-wide tile), several site blocks per program, no affine parameters."""
    monkeypatch.setattr(config, "REDUCTION_PROGRAMS", 3)
    n, c, h, w = 2, 130, 7, 9
    mask = _mask("random", 0.5, n, h, w)
    tensors = [_input((n, c, h, w), torch.float32, layout, 23)]
    _check(lambda x: sk.masked_layer_norm(x, mask, None, None, backend=backend),
           lambda x: sk.masked_layer_norm(x, mask, None, None, backend="reference"),
           tensors, f"ln wide {layout}")


# -- group norm -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,ratio", MASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm(backend, layout, dtype, kind, ratio):
    n, c, h, w = 2, 10, 9, 7
    mask = _mask(kind, ratio, n, h, w)
    tensors = [_input((n, c, h, w), dtype, layout, 60), _param((c,), dtype, 61), _param((c,), dtype, 62)]
    _check(lambda x, wt, b: sk.masked_group_norm(x, mask, 5, wt, b, backend=backend),
           lambda x, wt, b: sk.masked_group_norm(x, mask, 5, wt, b, backend="reference"),
           tensors, f"gn {layout} {dtype} {kind} {ratio}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_many_parts_and_channel_blocks(backend, layout, monkeypatch):
    """Several parts per image (some empty: image 1 has few active sites), several site blocks per part,
    several channel blocks, an image without active sites, no affine parameters; means far from 0."""
    c = 36 if layout == "planes" else 130
    monkeypatch.setattr(config, "REDUCTION_PROGRAMS", 3 * 4 * -(-c // config.config_for("gn", layout, c).block_c))
    n, h, w = 3, 13, 11
    mask = _mask("random", 0.5, n, h, w)
    mask[1, :, 2:] = False
    mask[2] = False
    x = _input((n, c, h, w), torch.float32, layout, 63) + 300.0
    _check(lambda x: sk.masked_group_norm(x, mask, 2, None, None, backend=backend),
           lambda x: sk.masked_group_norm(x, mask, 2, None, None, backend="reference"),
           [x], f"gn many parts {layout}")


# -- registration (opcheck of every primitive: tests/test_registry.py) --------------------------------------
def test_strided_dwconv_ops_pass_opcheck():
    """The conv's primitives at stride 2 (the registry's opcheck samples are stride 1): the output at the
    strided sites, the input gradient through the transposed table."""
    n, c, h, w = 1, 6, 5, 7
    sites = sk.ActiveSites(_mask("spark", 0.6, n, h, w))
    x = _input((n, c, h, w), torch.float32, "rows", 30)
    wt, b = _param((c, 1, 3, 3), torch.float32, 32), _param((c,), torch.float32, 33)
    out, table = sites.strided(2).index, sites.strided_neighbors(3, 2)
    g = _input((n, c, 3, 4), torch.float32, "rows", 31)
    ops = torch.ops.spark_kernels
    torch.library.opcheck(ops.triton_dwconv_forward, (x, wt, b, out, table, 2),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.triton_dwconv_backward, (g, x, wt, out, table, 2, sites.index,
                                                       sites.transposed_taps(3, 2)),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """The public functions on the triton backend trace into one graph and match eager."""
    n, c, h, w = 1, 6, 7, 5
    sites = sk.ActiveSites(_mask("spark", 0.6, n, h, w))
    x = _input((n, c, h, w), torch.float32, "rows", 40)
    wt, b = _param((c, 1, 3, 3), torch.float32, 41), _param((c,), torch.float32, 42)

    def block(x):
        y = sk.sparse_depthwise_conv2d(x, wt, b, sites, backend="triton")
        y = sk.masked_layer_norm(y, sites, b, b, backend="triton")
        y = sk.masked_group_norm(y, sites, 3, b, None, backend="triton")
        return sk.masked_batch_norm(y, sites, None, None, wt[:, 0, 0, 0], b, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))


def test_bad_tables_and_unsupported_width_raise_clear_errors():
    x = _input((1, 4, 3, 3), torch.float32, "planes", 50)
    sites = sk.ActiveSites(_mask("spark", 0.0, 1, 3, 3))
    wt = _param((4, 1, 3, 3), torch.float32, 51)
    ops = torch.ops.spark_kernels
    with pytest.raises(ValueError, match="index must be"):
        ops.triton_dwconv_forward(x, wt, None, sites.index.long(), sites.neighbors(3))
    with pytest.raises(ValueError, match="neighbors must be"):
        ops.triton_dwconv_forward(x, wt, None, sites.index, sites.neighbors(3)[:, :4].contiguous())
    wide = _input((1, 4097, 1, 1), torch.float32, "planes", 52)
    with pytest.raises(RuntimeError, match="at most 4096 channels"):  # declared: refused before dispatch
        sk.masked_layer_norm(wide, torch.ones(1, 1, 1, 1, dtype=torch.bool, device=DEVICE), None, None,
                             backend="triton")
