"""Sparse depthwise conv: every CPU-capable backend against the reference evaluated in float64 (and against
plain F.conv2d when every site is visible), gradients, determinism, the custom-op contract, argument errors
and the nn module. (The "triton" backend is tested in the Triton tests; the reference itself in
test_reference.py.)"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spark_kernels as sk
from spark_kernels import reference
from spark_kernels._backends import get_backend

from helpers import GRADCHECK, assert_close_to_reference, make_mask

BACKENDS = [b for b in sk.available_backends() if b != "triton" and "cpu" in get_backend(b).device_types]
NATIVE = [b for b in BACKENDS if b == "cpu"]
needs_cpu_backend = pytest.mark.skipif("cpu" not in BACKENDS, reason="the 'cpu' backend is unavailable: "
                                       + sk.unavailable_reasons().get("cpu", ""))
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "channels_last", "strided_view")
# (mask kind, ratio): ratio 0 = all visible, 1 = all masked.
MASKS = (("random", 0.0), ("spark", 0.6), ("random", 0.6), ("random", 1.0))
# (N, C, with bias)
SHAPES = ((1, 1, True), (8, 3, False), (1, 96, True), (8, 97, True))
H, W = 13, 11  # odd: a stride-2 conv's last output row and column pool half blocks
# Kernel sizes x strides: the original 3x3/7x7 stride-1 cases over every layout and mask, the others
# (5x5, stride 2) over the two dense layouts and the masks that tell them apart (the strided-view
# layout is handled before the kernel size or stride matter).
CASES = [(k, s, layout, mask) for k, s in ((3, 1), (7, 1), (5, 1), (3, 2), (5, 2), (7, 2))
         for layout in (LAYOUTS if (k, s) in ((3, 1), (7, 1)) else LAYOUTS[:2])
         for mask in (MASKS if (k, s) in ((3, 1), (7, 1)) else MASKS[:3])]


def out_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """The output's active sites: a site is active if any input site of its stride x stride block is."""
    return sk.ActiveSites(mask).strided(stride).mask


@pytest.fixture(autouse=True)
def one_thread():
    """These cases are tiny: one thread avoids OpenMP start-up and contention costs on a shared machine.
    The multi-threaded paths run in test_two_threads_bit_identical_and_correct."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t (a leaf) as a tensor of the given memory layout, differentiable back to t."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    # A view that is neither contiguous nor channels_last: every other column of a bigger tensor.
    view = t.repeat_interleave(2, dim=3)[..., ::2]
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


def conv_and_grads(fn, x, weight, bias, grad_out):
    """fn(x, weight, bias) and the gradients of <fn, grad_out> w.r.t. x, weight and bias (None if bias is)."""
    inputs = [t for t in (x, weight, bias) if t is not None]
    y = fn(x, weight, bias)
    grads = list(torch.autograd.grad(y, inputs, grad_out))
    if bias is None:
        grads.append(None)
    return y.detach(), grads


def make_inputs(n, c, k, dtype, with_bias, seed=0, stride=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64) if with_bias else None
    grad_out = torch.randn(n, c, -(-H // stride), -(-W // stride), generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return (x, weight, bias, grad_out), (cast(x), cast(weight), cast(bias), cast(grad_out))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride,layout,mask_kind,ratio", [(k, s, lay, *m) for k, s, lay, m in CASES],
                         ids=[f"k{k}-s{s}-{lay}-{m[0]}{m[1]}" for k, s, lay, m in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, k, stride, layout, mask_kind, ratio, dtype):
    for n, c, with_bias in SHAPES:
        mask = make_mask(mask_kind, n, H, W, ratio, seed=c)
        sites = sk.ActiveSites(mask)
        (x64, w64, b64, g64), (x, w, b, g) = make_inputs(n, c, k, dtype, with_bias, seed=c, stride=stride)
        leaves = [t.requires_grad_() if t is not None else None for t in (x, w, b)]
        y, grads = conv_and_grads(
            lambda xx, ww, bb: sk.sparse_depthwise_conv2d(in_layout(xx, layout), ww, bb, sites, stride=stride,
                                                          backend=backend),
            *leaves, g)
        if ratio == 0.0:  # all visible: plain dense conv
            dense = lambda xx, ww, bb: F.conv2d(xx, ww, bb, stride, padding=k // 2, groups=c)  # noqa: E731
            ref_lowp, ref_lowp_grads = conv_and_grads(dense, *leaves, g)
            ref64, ref64_grads = conv_and_grads(dense, *[t.requires_grad_() if t is not None else None
                                                         for t in (x64, w64, b64)], g64)
        else:
            ref_lowp, ref_lowp_grads = conv_and_grads(
                lambda xx, ww, bb: reference.sparse_depthwise_conv2d(xx, ww, bb, mask, stride), *leaves, g)
            ref64, ref64_grads = conv_and_grads(
                lambda xx, ww, bb: reference.sparse_depthwise_conv2d(xx, ww, bb, mask, stride),
                *[t.requires_grad_() if t is not None else None for t in (x64, w64, b64)], g64)
        what = f"{backend} k={k} stride={stride} N={n} C={c} {layout} {mask_kind}{ratio} {dtype}"
        assert y.dtype == dtype and y.shape == g.shape
        assert_close_to_reference(y, ref_lowp, ref64, what + ": output")
        for name, got, lowp, exact in zip(("grad x", "grad weight", "grad bias"), grads, ref_lowp_grads, ref64_grads):
            if exact is None:
                assert got is None
                continue
            assert_close_to_reference(got, lowp, exact, f"{what}: {name}")
        if ratio == 1.0:  # all masked: exact zeros everywhere, no NaN
            assert torch.equal(y, torch.zeros_like(y)), what
            for got in grads:
                assert got is None or torch.equal(got, torch.zeros_like(got)), what
        if ratio > 0.0:
            assert torch.all(y[~out_mask(mask, stride).expand_as(y)] == 0), f"{what}: non-zero output at inactive sites"
            assert torch.all(grads[0][~mask.expand_as(x)] == 0), f"{what}: non-zero grad x at inactive sites"


@pytest.mark.parametrize("k,stride", ((7, 1), (5, 2)))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_at_inactive_sites_does_not_leak(backend, layout, k, stride):
    n, c = 2, 5
    mask = make_mask("spark", n, H, W, 0.6, seed=3)
    (x64, w64, b64, g64), _ = make_inputs(n, c, k, torch.float64, True, seed=3, stride=stride)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e300], dtype=torch.float64)

    def dirty(t, active):
        inactive = ~active.expand_as(t)
        return t.masked_scatter(inactive, garbage[torch.arange(int(inactive.sum())) % 4])

    dirty_x, dirty_g = dirty(x64, mask), dirty(g64, out_mask(mask, stride))
    clean = conv_and_grads(lambda xx, ww, bb: reference.sparse_depthwise_conv2d(xx, ww, bb, mask, stride),
                           *[t.clone().requires_grad_() for t in (x64, w64, b64)], g64)
    dirty = conv_and_grads(
        lambda xx, ww, bb: sk.sparse_depthwise_conv2d(in_layout(xx, layout), ww, bb, mask, stride=stride,
                                                      backend=backend),
        *[t.clone().requires_grad_() for t in (dirty_x, w64, b64)], dirty_g)
    for name, got, want in zip(("output", "grad x", "grad weight", "grad bias"), [dirty[0]] + dirty[1],
                               [clean[0]] + clean[1]):
        assert torch.isfinite(got).all(), f"{backend} {layout}: garbage leaked into {name}"
        torch.testing.assert_close(got, want, msg=lambda m: f"{backend} {layout} {name}: {m}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("k,stride", ((3, 1), (7, 1), (5, 2)))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("backend", NATIVE)
def test_two_threads_bit_identical_and_correct(backend, layout, k, stride, dtype):
    # Enough active sites for several weight-gradient chunks.
    n, c, h, w = 8, 37, 28, 28
    mask = make_mask("spark", n, h, w, 0.6, seed=5)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, c, h, w, generator=g)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    weight, bias = torch.randn(c, 1, k, k, generator=g), torch.randn(c, generator=g)
    grad_out = torch.randn(n, c, h // stride, w // stride, generator=g)
    sites = sk.ActiveSites(mask)

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
        y, grads = conv_and_grads(fn, *leaves, grad_out.to(dtype))
        return [y] + grads

    fused = lambda xx, ww, bb: sk.sparse_depthwise_conv2d(xx, ww, bb, sites, stride=stride,  # noqa: E731
                                                          backend=backend)
    torch.set_num_threads(2)
    first, second = run(fused, dtype), run(fused, dtype)
    torch.set_num_threads(1)
    single = run(fused, dtype)
    masked_dense = lambda xx, ww, bb: reference.sparse_depthwise_conv2d(xx, ww, bb, mask, stride)  # noqa: E731
    ref, ref64 = run(masked_dense, dtype), run(masked_dense, torch.float64)
    for name, a, b, s, r, r64 in zip(("output", "grad x", "grad weight", "grad bias"), first, second, single, ref,
                                     ref64):
        assert torch.equal(a, b), f"{name} differs between two runs"
        assert torch.equal(a, s), f"{name} differs between 2 threads and 1 thread"
        assert_close_to_reference(a, r, r64, f"{backend} {layout} k={k} stride={stride} 2 threads: {name}")


def tiling_masks():
    """Masks (N, 1, H, W) whose active runs exercise the CPU kernel's stride-1 paths. "runs" (mean run 4) and
    "full" take the tiles of adjacent active sites (1, 2, 4 or 8 sites of one row): a run of 13 (tiles 8 + 4 + 1)
    and one of 21 across the row, a run at the image's right edge and at its left edge, runs of length 1, a
    single active site, an image with none. "short" (runs of 1 to 3 sites, at the image edges too) takes the
    lists of active taps that the CPU kernels use where runs are short."""
    n, h, w = 3, 7, 21
    m = torch.zeros(n, 1, h, w, dtype=torch.bool)
    m[0, 0, 1, 2:15] = True     # a run of 13: tiles 8, 4, 1
    m[0, 0, 3, :] = True        # the whole row, both image edges
    m[0, 0, 4, 17:] = True      # 4 sites at the right edge
    m[0, 0, 5, ::3] = True      # runs of length 1
    m[0, 0, 6, 0:2] = True      # 2 sites at the left edge, bottom row
    m[1, 0, 2, 20] = True       # a single active site, on the right edge
    # image 2: no active site
    short = torch.zeros(2, 1, 7, 9, dtype=torch.bool)
    short[0, 0, 1, 1] = True
    short[0, 0, 1, 3:5] = True
    short[0, 0, 2, 0:3] = True  # at the left edge
    short[0, 0, 4, ::2] = True  # runs of length 1, at both edges
    short[1, 0, 6, 7:] = True   # at the right edge, bottom row
    return {"runs": m, "full": torch.ones(1, 1, 5, 19, dtype=torch.bool), "short": short}


@needs_cpu_backend
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("k", (3, 5, 7))
@pytest.mark.parametrize("mask_name", ("runs", "full", "short"))
def test_tiles_of_adjacent_sites(mask_name, k, dtype):
    """The channels_last stride-1 paths against the reference on the tiling edge cases, with channel counts below,
    at and past the vector width (8 floats, 4 doubles), and enough channels (so few sites per weight-gradient
    chunk) that chunks cut runs; garbage at inactive sites must not leak. An NCHW or expanded (stride-0) grad_out
    gives the gradients of the same values in channels_last, bit for bit."""
    mask = tiling_masks()[mask_name]
    n, _, h, w = mask.shape
    sites = sk.ActiveSites(mask)
    for c in (3, 8, 13, 601):
        g = torch.Generator().manual_seed(c)
        x64 = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
        w64 = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
        b64 = torch.randn(c, generator=g, dtype=torch.float64)
        g64 = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
        inactive = ~mask.expand_as(x64)
        g_dirty = g64.masked_fill(inactive, float("nan"))
        x_dirty = x64.masked_fill(inactive, float("inf"))
        leaves = [t.to(dtype).requires_grad_() for t in (x_dirty, w64, b64)]
        conv = lambda xx, ww, bb: sk.sparse_depthwise_conv2d(  # noqa: E731
            xx.contiguous(memory_format=torch.channels_last), ww, bb, sites, backend="cpu")
        y, grads = conv_and_grads(conv, *leaves, g_dirty.to(dtype).contiguous(memory_format=torch.channels_last))
        masked_dense = lambda xx, ww, bb: reference.sparse_depthwise_conv2d(xx, ww, bb, mask, 1)  # noqa: E731
        ref_lowp, ref_lowp_grads = conv_and_grads(masked_dense, *[t.to(dtype).requires_grad_() for t in
                                                                  (x64, w64, b64)], g64.to(dtype))
        ref64, ref64_grads = conv_and_grads(masked_dense, *[t.clone().requires_grad_() for t in (x64, w64, b64)], g64)
        what = f"{mask_name} k={k} C={c} {dtype}"
        assert y.is_contiguous(memory_format=torch.channels_last), what
        assert_close_to_reference(y, ref_lowp, ref64, what + ": output")
        for name, got, lowp, exact in zip(("grad x", "grad weight", "grad bias"), grads, ref_lowp_grads,
                                          ref64_grads):
            assert_close_to_reference(got, lowp, exact, f"{what}: {name}")
        assert torch.all(y[inactive] == 0) and torch.all(grads[0][inactive] == 0), what
        ones = torch.ones((), dtype=dtype).expand(g64.shape)
        for grad_out, same_values in ((g_dirty.to(dtype).contiguous(), g_dirty.to(dtype)), (ones, ones)):
            _, got = conv_and_grads(conv, *leaves, grad_out)
            _, want = conv_and_grads(conv, *leaves, same_values.contiguous(memory_format=torch.channels_last))
            for name, a, b in zip(("grad x", "grad weight", "grad bias"), got, want):
                assert torch.equal(a, b), f"{what}: {name} with grad_out strides {grad_out.stride()}"


@pytest.mark.parametrize("k,stride", ((3, 1), (7, 1), (5, 1), (3, 2), (5, 2), (7, 2)))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpu", "reference")])
def test_gradcheck_float64(backend, layout, k, stride):
    n, c, h, w = 2, 2, 6, 5
    mask = make_mask("spark", n, h, w, 0.5, seed=7)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(c, generator=g, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: sk.sparse_depthwise_conv2d(*a, mask, stride=stride, backend=backend),
                                    inputs, **GRADCHECK)


def op_args(layout, with_bias, k, dtype=torch.float32):
    n, c, h, w = 2, 5, 9, 8
    sites = sk.ActiveSites(make_mask("spark", n, h, w, 0.6, seed=11))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    weight = torch.randn(c, 1, k, k, generator=g, dtype=dtype)
    bias = torch.randn(c, generator=g, dtype=dtype) if with_bias else None
    return x, weight, bias, sites.index, sites.neighbors(k)


def strided_op_args(layout, with_bias, k, dtype=torch.float32):
    """The ops' arguments at stride 2: x, weight, bias, the output sites' index and table, the stride, x's
    index and the transposed table (H = 9 odd, W = 8 even)."""
    x, weight, bias, _, _ = op_args(layout, with_bias, k, dtype)
    sites = sk.ActiveSites(make_mask("spark", 2, 9, 8, 0.6, seed=11))
    return (x, weight, bias, sites.strided(2).index, sites.strided_neighbors(k, 2), 2, sites.index,
            sites.transposed_taps(k, 2))


@needs_cpu_backend
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("k,stride", ((3, 1), (7, 1), (5, 1), (3, 2)))
@pytest.mark.parametrize("with_bias", (True, False))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_opcheck(layout, with_bias, k, stride, dtype):
    if stride == 1:
        x, weight, bias, index, neighbors = op_args(layout, with_bias, k, dtype)
        backward_tables = ()
    else:
        x, weight, bias, index, neighbors, _, input_index, input_taps = strided_op_args(layout, with_bias, k, dtype)
        backward_tables = (input_index, input_taps)
    torch.library.opcheck(torch.ops.spark_kernels.dwconv_forward, (x, weight, bias, index, neighbors, stride))
    y = torch.ops.spark_kernels.dwconv_forward(x, weight, bias, index, neighbors, stride)
    assert y.shape == (x.shape[0], x.shape[1], -(-x.shape[2] // stride), -(-x.shape[3] // stride))
    grad_out = torch.randn_like(y)
    torch.library.opcheck(torch.ops.spark_kernels.dwconv_backward,
                          (grad_out, x, weight, index, neighbors, stride, *backward_tables))


def bad_calls():
    """(description, thunk(backend), exception type, words the message must contain)."""
    n, c = 2, 4
    mask = make_mask("spark", n, H, W, 0.6)
    x = torch.randn(n, c, H, W)
    w3, b = torch.randn(c, 1, 3, 3), torch.randn(c)
    conv = sk.sparse_depthwise_conv2d
    return [
        ("int x", lambda be: conv(x.to(torch.int32), w3, b, mask, backend=be), TypeError, ["x", "int32"]),
        ("bool x", lambda be: conv(x > 0, w3, b, mask, backend=be), TypeError, ["x", "bool"]),
        ("complex x", lambda be: conv(x.to(torch.complex64), w3, b, mask, backend=be), TypeError, ["x", "complex"]),
        ("x/weight dtype mismatch", lambda be: conv(x, w3.double(), b, mask, backend=be), TypeError,
         ["weight", "dtype"]),
        ("weight on another device", lambda be: conv(x, w3.to("meta"), b, mask, backend=be), ValueError,
         ["weight", "meta"]),
        ("bias on another device", lambda be: conv(x, w3, b.to("meta"), mask, backend=be), ValueError,
         ["bias", "meta"]),
        ("mask on another device", lambda be: conv(x, w3, b, mask.to("meta"), backend=be), ValueError,
         ["active", "meta"]),
        ("mask of wrong shape", lambda be: conv(x, w3, b, mask[:, 0], backend=be), ValueError, ["active", "shape"]),
        ("mask of other spatial size", lambda be: conv(x, w3, b, mask[:, :, :-1], backend=be), ValueError,
         ["active", "(N, H, W)"]),
        ("non-bool mask", lambda be: conv(x, w3, b, mask.float(), backend=be), TypeError, ["active", "bool"]),
        ("kernel size 9", lambda be: conv(x, torch.randn(c, 1, 9, 9), b, mask, backend=be), ValueError,
         ["weight", "3, 5 or 7", "9"]),
        ("kernel size 4", lambda be: conv(x, torch.randn(c, 1, 4, 4), b, mask, backend=be), ValueError,
         ["weight", "3, 5 or 7", "4"]),
        ("stride 3", lambda be: conv(x, w3, b, mask, stride=3, backend=be), ValueError, ["stride", "1 or 2", "3"]),
        ("stride (2, 2)", lambda be: conv(x, w3, b, mask, stride=(2, 2), backend=be), ValueError,
         ["stride", "1 or 2"]),
        ("mask at the output scale", lambda be: conv(x[..., :12, :10], w3, b, mask[..., :6, :5], stride=2,
                                                     backend=be), ValueError, ["active", "(N, H, W)"]),
        ("weight not (C, 1, k, k)", lambda be: conv(x, torch.randn(c, 2, 3, 3), b, mask, backend=be), ValueError,
         ["weight", "(C, 1, k, k)"]),
        ("weight for other C", lambda be: conv(x, torch.randn(c + 1, 1, 3, 3), b, mask, backend=be), ValueError,
         ["weight", "(C, 1, k, k)"]),
        ("bias of wrong shape", lambda be: conv(x, w3, torch.randn(c + 1), mask, backend=be), ValueError,
         ["bias", "shape"]),
        ("ActiveSites for another batch", lambda be: conv(x, w3, b, sk.ActiveSites(mask[:1]), backend=be),
         ValueError, ["active", "(N, H, W)"]),
        ("ActiveSites for another size",
         lambda be: conv(x, w3, b, sk.ActiveSites(make_mask("spark", n, H + 1, W, 0.6)), backend=be),
         ValueError, ["active", "(N, H, W)"]),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(bad_calls())))
def test_bad_input_raises_naming_the_argument(backend, case):
    what, thunk, exc, words = bad_calls()[case]
    with pytest.raises(exc) as info:
        thunk(backend)
    for word in words:
        assert word in str(info.value), f"{what}: message {str(info.value)!r} does not mention {word!r}"


@needs_cpu_backend
def test_native_op_checks_its_arguments():
    """The C++ ops validate on their own (they are callable without the Python wrapper)."""
    x, weight, bias, index, neighbors = op_args("channels_last", True, 3)
    fwd, bwd = torch.ops.spark_kernels.dwconv_forward, torch.ops.spark_kernels.dwconv_backward
    corrupt = neighbors.clone()
    corrupt[0, 0] = x.shape[0] * x.shape[2] * x.shape[3] + 5
    strided = strided_op_args("channels_last", True, 3)
    strided_corrupt = strided[7].clone()
    strided_corrupt[0, 0] = strided[3].shape[0] + 10**6
    unsorted = index.flip(0).contiguous()
    cases = [
        (lambda: fwd(x.int(), weight.int(), None, index, neighbors), "x must be float64, float32, float16 or bfloat16"),
        (lambda: fwd(x, weight.double(), bias, index, neighbors), "weight must have x's dtype"),
        (lambda: fwd(x, weight, bias.double(), index, neighbors), "bias must have x's dtype"),
        (lambda: fwd(x, weight[:, :, :2, :2], bias, index, neighbors), "kernel size must be 3, 5 or 7, got 2"),
        (lambda: fwd(x, torch.randn(5, 1, 9, 9), bias, index, neighbors), "kernel size must be 3, 5 or 7, got 9"),
        (lambda: fwd(x, weight, bias, index, neighbors, 3), "stride must be 1 or 2, got 3"),
        (lambda: fwd(x, weight, bias, index, neighbors, 0), "stride must be 1 or 2, got 0"),
        (lambda: fwd(x, weight, bias[:-1], index, neighbors), "bias must have shape"),
        (lambda: fwd(x, weight, bias, index.long(), neighbors), "index must be a 1-D int32 tensor"),
        (lambda: fwd(x, weight, bias, index, neighbors.long()), "neighbors must be a 2-D int32 tensor"),
        (lambda: fwd(x, weight, bias, index, neighbors[:, :4]), "neighbors must have shape (M, k*k)"),
        (lambda: fwd(x, weight, bias, index[:-1], neighbors), "neighbors must have shape (M, k*k)"),
        (lambda: fwd(x, weight, bias, index, corrupt), "site numbers outside x"),
        (lambda: fwd(x.contiguous(), weight, bias, unsorted, neighbors.flip(0).contiguous()),
         "site numbers outside x"),
        (lambda: bwd(x[:1], x, weight, index, neighbors), "grad_out must have the output's shape"),
        (lambda: bwd(x, x, weight, index, neighbors, 1, index, neighbors), "must be None at stride 1"),
        (lambda: bwd(x[..., ::2, ::2], x, weight, *strided[3:6]), "input_index and input_taps are required"),
        (lambda: bwd(x[..., ::2, ::2], x, weight, *strided[3:7], strided[7][:, :4]),
         "input_taps must have shape (M, k*k)"),
        (lambda: bwd(x[..., ::2, ::2], x, weight, *strided[3:6], strided[6].long(), strided[7]),
         "input_index must be a 1-D int32 tensor"),
        (lambda: bwd(x, x, weight, *strided[3:]), "grad_out must have the output's shape"),
        (lambda: fwd(x, weight, bias, index, neighbors, 2), "index has"),
        (lambda: bwd(x[..., ::2, ::2], x, weight, *strided[3:7], strided_corrupt), "site numbers outside x"),
        (lambda: bwd(x.double(), x, weight, index, neighbors), "grad_out must have x's dtype"),
        (lambda: bwd(x, x, weight, index, corrupt), "site numbers outside x"),
    ]
    for thunk, words in cases:
        with pytest.raises(RuntimeError, match=words.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
            thunk()


@pytest.mark.parametrize("k", (3, 5, 7))
@pytest.mark.parametrize("backend", BACKENDS)
def test_module_from_dense_equals_functional(backend, k):
    n, c = 2, 6
    dense = nn.Conv2d(c, c, k, padding=k // 2, groups=c)
    module = sk.nn.SparseDepthwiseConv2d.from_dense(dense, backend=backend)
    assert torch.equal(module.weight, dense.weight) and torch.equal(module.bias, dense.bias)
    mask = make_mask("spark", n, 16, 16, 0.6, seed=13)
    sites = sk.ActiveSites(mask)
    x = torch.randn(n, c, 16, 16)
    with sk.active(sites):
        y = module(x)
    assert torch.equal(y, sk.sparse_depthwise_conv2d(x, dense.weight, dense.bias, sites, backend=backend))
    # One context serves every scale: a half-resolution input reads the downsampled sites.
    half = torch.randn(n, c, 8, 8)
    with sk.active(sites):
        y_half = module(half)
    assert torch.equal(y_half, sk.sparse_depthwise_conv2d(half, dense.weight, dense.bias, sites.downsample(2),
                                                          backend=backend))


@pytest.mark.parametrize("conv,words", [
    (nn.Conv2d(4, 4, 3, stride=3, padding=1, groups=4), "stride"),
    (nn.Conv2d(4, 4, 3, stride=(1, 2), padding=1, groups=4), "stride"),
    (nn.Conv2d(4, 4, 3, padding=1), "not depthwise"),
    (nn.Conv2d(4, 8, 3, padding=1, groups=4), "not depthwise"),
    (nn.Conv2d(4, 4, 9, padding=4, groups=4), "kernel size"),
    (nn.Conv2d(4, 4, (5, 3), padding=(2, 1), groups=4), "kernel size"),
    (nn.Conv2d(4, 4, 5, padding=1, groups=4), "padding"),
    (nn.Conv2d(4, 4, 5, stride=2, padding=0, groups=4), "padding"),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), "dilation"),
], ids=["stride3", "stride1x2", "dense", "multiplier2", "k9", "k5x3", "padding1", "stride2-padding0", "dilation2"])
def test_from_dense_refuses_unsupported_convs(conv, words):
    with pytest.raises(ValueError, match=words):
        sk.nn.SparseDepthwiseConv2d.from_dense(conv)


def test_module_needs_active_sites():
    module = sk.nn.SparseDepthwiseConv2d(3, 3)
    with pytest.raises(RuntimeError, match="active sites"):
        module(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("backend", NATIVE)
def test_outputs_in_kernel_layout(backend, layout):
    """Outputs and input gradients come back in the layout the kernels processed the input in."""
    x, weight, bias, index, neighbors = op_args(layout, True, 3)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = sk.sparse_depthwise_conv2d(x, weight, bias, sk.ActiveSites(make_mask("spark", 2, 9, 8, 0.6, seed=11)),
                                   backend=backend)
    assert y.is_contiguous(memory_format=fmt)
    gx, _, _ = torch.ops.spark_kernels.dwconv_backward(torch.randn_like(x), x, weight, index, neighbors)
    assert gx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("k,stride", ((3, 1), (7, 1), (5, 1), (5, 2), (3, 2)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_module_from_dense(backend, k, stride):
    """An EfficientNet/MobileNet-style strided depthwise conv converts; its output is at the next scale of the
    same context, equals the functional op, and with every site active equals the dense conv."""
    n, c = 2, 6
    dense = nn.Conv2d(c, c, k, stride=stride, padding=k // 2, groups=c, bias=False)
    assert sk.nn.SparseDepthwiseConv2d.unsupported_reason(dense) is None
    module = sk.nn.SparseDepthwiseConv2d.from_dense(dense, backend=backend)
    assert module.stride == (stride, stride) and module.bias is None
    sites = sk.ActiveSites(make_mask("spark", n, 16, 16, 0.6, seed=13))
    x = torch.randn(n, c, 16, 16)
    with sk.active(sites):
        y = module(x)
    assert y.shape == (n, c, 16 // stride, 16 // stride)
    assert torch.equal(y, sk.sparse_depthwise_conv2d(x, dense.weight, None, sites, stride=stride, backend=backend))
    assert torch.all(y[~sites.at(16 // stride, 16 // stride).mask.expand_as(y)] == 0)
    with sk.active(torch.ones(n, 1, 16, 16, dtype=torch.bool)):
        torch.testing.assert_close(module(x), dense(x))


@pytest.mark.parametrize("k", [3, 5, 7])
def test_module_defaults_are_those_of_a_depthwise_conv2d(k):
    """SparseDepthwiseConv2d(C, k) built directly: a bias, 'same' padding, one group per channel, so that
    with every site active it equals F.conv2d with its parameters."""
    torch.manual_seed(0)
    module = sk.nn.SparseDepthwiseConv2d(4, k, backend="reference")
    assert module.bias is not None and module.padding == (k // 2, k // 2) and module.groups == 4
    x = torch.randn(2, 4, 6, 5)
    with sk.active(torch.ones(2, 1, 6, 5, dtype=torch.bool)):
        y = module(x)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, module.weight, module.bias, padding=k // 2, groups=4))


@needs_cpu_backend
@pytest.mark.parametrize("k", (3, 7))
def test_large_output_streams_zeros(k):
    """Outputs of at least kStreamZeroRowsBytes (4 MiB, csrc/cpu/vec.h), as this one, have their inactive rows
    zeroed by streaming stores: those rows are exact zeros and the active ones match the reference, forward and
    backward, NCHW grad_out included."""
    n, c, h, w = 1, 256, 64, 64  # 4 MiB of float32
    mask = make_mask("spark", n, h, w, 0.6, seed=3)
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    w64 = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    g64 = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    conv = lambda xx, ww, bb: sk.sparse_depthwise_conv2d(  # noqa: E731
        xx.contiguous(memory_format=torch.channels_last), ww, bb, mask, backend="cpu")
    masked_dense = lambda xx, ww, bb: reference.sparse_depthwise_conv2d(xx, ww, bb, mask, 1)  # noqa: E731
    leaves = lambda dtype: [t.to(dtype).requires_grad_() for t in (x64, w64)] + [None]  # noqa: E731
    for _ in range(3):  # freed NaN blocks of the outputs' size that the allocator may reuse: zeros are written
        torch.full((n, c, h, w), float("nan"))
    y, grads = conv_and_grads(conv, *leaves(torch.float32), g64.float().contiguous())
    ref32, ref32_grads = conv_and_grads(masked_dense, *leaves(torch.float32), g64.float())
    ref64, ref64_grads = conv_and_grads(masked_dense, *leaves(torch.float64), g64)
    inactive = ~mask.expand_as(y)
    assert torch.all(y[inactive] == 0) and torch.all(grads[0][inactive] == 0)
    assert_close_to_reference(y, ref32, ref64, f"k={k}: output")
    for name, got, lowp, exact in zip(("grad x", "grad weight"), grads, ref32_grads, ref64_grads):
        assert_close_to_reference(got, lowp, exact, f"k={k}: {name}")
