"""Property-based tests (hypothesis): every op on every backend that runs CPU tensors, against the
masked-dense reference, forward and backward, on random shapes (1x1 images, one channel, batch 1,
H != W), random site masks and SparK patch masks, values from 1e-3 to 1e4 scale with offsets,
random values at inactive sites and a random upstream gradient everywhere (also at inactive sites).

float64 runs compare with the float64 tolerances of helpers.py; float32 runs with the
"ERROR_MULTIPLE x the reference's own float32 error + floor" rule of helpers.py. Invariants checked
for every backend, including the reference: exact zeros at inactive sites in the output and in the
input gradient, and no non-finite value from finite inputs.
"""
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings, strategies as st

import spark_kernels as sk

from helpers import assert_close_to_reference, fused_backends, kernel_backends, random_mask, spark_mask

SETTINGS = settings(max_examples=25, deadline=None, derandomize=False, print_blob=True)
DTYPES = [torch.float64, torch.float32]


@dataclass
class Case:
    n: int
    c: int
    h: int
    w: int
    mask: torch.Tensor  # bool (n, 1, h, w)
    seed: int
    scale: float
    offset: float  # in units of scale
    channels_last: bool  # memory format of x (data_format for the channels_last LayerNorm)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def values(self, *shape, g: torch.Generator, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) + offset) * scale

    def x(self, g: torch.Generator) -> torch.Tensor:
        """float64 (N, C, H, W) input, values at inactive sites too."""
        return self.values(self.n, self.c, self.h, self.w, g=g, scale=self.scale, offset=self.offset)


@st.composite
def cases(draw, max_channels: int = 9) -> Case:
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, max_channels))
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    ratio = draw(st.sampled_from([0.0, 0.3, 0.6, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    if draw(st.booleans()):
        mask = random_mask(n, h, w, ratio, seed=seed)
    else:
        mask = spark_mask(n, h, w, ratio, patch=draw(st.sampled_from([1, 2, 4])), seed=seed)
    return Case(n, c, h, w, mask, seed, scale=draw(st.sampled_from([1.0, 1e-3, 1e4])),
                offset=draw(st.sampled_from([0.0, 3.0])), channels_last=draw(st.booleans()))


def run(op, tensors, grad_out):
    """(outputs, gradients of every non-None tensor) of op(*leaves) with the upstream gradient grad_out."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    y, *extras = op(*leaves)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wrt, grad_out)
    return [y.detach()] + [e.detach() for e in extras], list(grads)


def in_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def norm_terms(x: torch.Tensor, weight, grad_out: torch.Tensor, gain: float) -> float:
    """The magnitude of the terms a normalization's outputs and gradients cancel down from: its gain
    (the largest 1/sqrt(var + eps)) times the largest input, upstream gradient and weight."""
    w = 1.0 if weight is None else max(1.0, weight.abs().max().item())
    return gain * w * max([1.0] + [t.abs().max().item() for t in (x, grad_out) if t.numel()])


def check_against_reference(backend, dtype, make_op, tensors64, grad_out64, channels_last, inactive, terms=0.0,
                            device="cpu", exact_outputs=(), inactive_out=None):
    """make_op(backend) -> op(*tensors) -> (y, *extras). tensors64: float64 inputs (x first), moved to `device`.

    inactive: bool tensor broadcastable to y (unless inactive_out, y's, is given) and to x's gradient, True at
    inactive sites. terms: see
    helpers.assert_close_to_reference; the outputs numbered in exact_outputs (statistics, which cancel
    nothing) are held to the rule without it."""
    def cast(ts, d):
        return [None if t is None else in_layout(t.to(device, d), channels_last) for t in ts]

    # The backend and the reference in `dtype`, and the reference in float64 on the same rounded inputs.
    lowp = cast(tensors64, dtype)
    exact = [None if t is None else t.double() for t in lowp]
    grad_out64 = grad_out64.to(device)
    outs, grads = run(make_op(backend), lowp, grad_out64.to(dtype))
    ref_outs, ref_grads = run(make_op("reference"), cast(tensors64, dtype), grad_out64.to(dtype))
    ref64_outs, ref64_grads = run(make_op("reference"), exact, grad_out64)
    names = [f"output {i}" for i in range(len(outs))] + [f"gradient {i}" for i in range(len(grads))]
    for i, (name, out, ref, ref64) in enumerate(zip(names, outs + grads, ref_outs + ref_grads,
                                                    ref64_outs + ref64_grads)):
        assert out.dtype == ref.dtype, f"{backend} {name}: dtype {out.dtype}, reference gives {ref.dtype}"
        assert_close_to_reference(out, ref, ref64, f"{backend} {name} ({dtype})",
                                  0.0 if i in exact_outputs else terms)
        if all(t.isfinite().all() for t in exact if t is not None):
            assert out.isfinite().all(), f"{backend} {name}: non-finite values from finite inputs"
    y, grad_x = outs[0], grads[0]
    inactive = inactive.to(device)
    inactive_out = inactive if inactive_out is None else inactive_out.to(device)
    assert (y.masked_select(inactive_out) == 0).all(), f"{backend}: output not exactly 0 at inactive sites"
    assert (grad_x.masked_select(inactive) == 0).all(), f"{backend}: input gradient not 0 at inactive sites"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", kernel_backends("conv"))
@SETTINGS
@given(case=cases(max_channels=17), k=st.sampled_from([3, 5, 7]), stride=st.sampled_from([1, 2]),
       with_bias=st.booleans())
def test_depthwise_conv(backend, dtype, case, k, stride, with_bias):
    g = case.generator()
    x = case.x(g)
    weight = case.values(case.c, 1, k, k, g=g)
    bias = case.values(case.c, g=g) if with_bias else None
    sites = sk.ActiveSites(case.mask)
    out_mask = sites.strided(stride).mask
    grad_out = case.values(x.shape[0], x.shape[1], *out_mask.shape[2:], g=g)

    def make_op(name):
        return lambda x, weight, bias=None: (sk.sparse_depthwise_conv2d(x, weight, bias, sites, stride=stride,
                                                                        backend=name),)

    check_against_reference(backend, dtype, make_op, [x, weight, bias], grad_out, case.channels_last, ~case.mask,
                            inactive_out=~out_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", kernel_backends("batch_norm"))
@SETTINGS
@given(case=cases(), affine=st.booleans(), momentum=st.sampled_from([0.1, 0.5, 1.0]))
def test_masked_batch_norm(backend, training, dtype, case, affine, momentum):
    g = case.generator()
    x = case.x(g)
    weight = case.values(case.c, g=g) if affine else None
    bias = case.values(case.c, g=g) if affine else None
    running_mean = case.values(case.c, g=g, scale=case.scale, offset=case.offset)
    running_var = (torch.rand(case.c, generator=g, dtype=torch.float64) + 0.5) * case.scale ** 2
    grad_out = case.values(*x.shape, g=g)

    def make_op(name):
        def op(x, weight=None, bias=None):
            # Fresh running statistics per run, in the dtype of the parameters (x's dtype here).
            rm, rv = running_mean.to(x.dtype), running_var.to(x.dtype)
            y = sk.masked_batch_norm(x, case.mask, rm, rv, weight, bias, training=training, momentum=momentum,
                                     eps=1e-5, backend=name)
            return y, rm, rv
        return op

    rows = x.permute(0, 2, 3, 1)[case.mask[:, 0]]
    var = rows.var(0, unbiased=False) if training and rows.shape[0] else running_var
    gain = (var.min().item() + 1e-5) ** -0.5 if var.numel() else 1.0
    check_against_reference(backend, dtype, make_op, [x, weight, bias], grad_out, case.channels_last, ~case.mask,
                            terms=norm_terms(x, weight, grad_out, gain))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("backend", kernel_backends("layer_norm"))
@SETTINGS
@given(case=cases(max_channels=17), affine=st.booleans(), mask_3d=st.booleans())
def test_masked_layer_norm(backend, data_format, dtype, case, affine, mask_3d):
    g = case.generator()
    x = case.x(g)
    weight = case.values(case.c, g=g) if affine else None
    bias = case.values(case.c, g=g) if affine else None
    inactive = ~case.mask
    active = case.mask
    channels_last_memory = case.channels_last
    if data_format == "channels_last":
        # (N, H, W, C): a contiguous tensor, or a permuted view of an NCHW-contiguous one.
        x = x.permute(0, 2, 3, 1)
        x = x.contiguous() if case.channels_last else x
        channels_last_memory = False
        inactive = inactive.permute(0, 2, 3, 1)
        active = case.mask[:, 0] if mask_3d else case.mask
    grad_out = case.values(*x.shape, g=g)

    def make_op(name):
        return lambda x, weight=None, bias=None: (
            sk.masked_layer_norm(x, active, weight, bias, eps=1e-6, data_format=data_format, backend=name),)

    rows = (x if data_format == "channels_last" else x.permute(0, 2, 3, 1))[case.mask[:, 0]]
    gain = (rows.var(-1, unbiased=False).min().item() + 1e-6) ** -0.5 if rows.shape[0] else 1.0
    check_against_reference(backend, dtype, make_op, [x, weight, bias], grad_out, channels_last_memory, inactive,
                            terms=norm_terms(x, weight, grad_out, gain))


def group_gain(x: torch.Tensor, mask: torch.Tensor, groups: int, eps: float) -> float:
    """The largest 1 / sqrt(var + eps) of an (image, group) with active sites (1.0 when none has any)."""
    n, c = x.shape[:2]
    values = x.reshape(n, groups, -1)
    sites = mask.reshape(n, 1, -1).expand(n, c, -1).reshape(n, groups, -1)
    gains = [(values[i, j][sites[i, j]].var(unbiased=False).item() + eps) ** -0.5
             for i in range(n) for j in range(groups) if sites[i, j].any()]
    return max(gains, default=1.0)


def divisors(c: int) -> list:
    return [d for d in range(1, c + 1) if c % d == 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", kernel_backends("group_norm"))
@SETTINGS
@given(case=cases(max_channels=12), affine=st.booleans(), data=st.data())
def test_masked_group_norm(backend, dtype, case, affine, data):
    groups = data.draw(st.sampled_from(divisors(case.c)), label="num_groups")
    g = case.generator()
    x = case.x(g)
    weight = case.values(case.c, g=g) if affine else None
    bias = case.values(case.c, g=g) if affine else None
    grad_out = case.values(*x.shape, g=g)

    def make_op(name):
        return lambda x, weight=None, bias=None: (
            sk.masked_group_norm(x, case.mask, groups, weight, bias, eps=1e-5, backend=name),)

    gain = group_gain(x, case.mask, groups, 1e-5)
    check_against_reference(backend, dtype, make_op, [x, weight, bias], grad_out, case.channels_last, ~case.mask,
                            terms=norm_terms(x, weight, grad_out, gain))


# -- large offsets: the statistics must not cancel catastrophically (E[x^2] - E[x]^2) on any backend ------
OFFSET_SETTINGS = settings(max_examples=6, deadline=None, derandomize=False, print_blob=True)
OFFSET_DTYPES = (torch.float32, torch.bfloat16)


@st.composite
def offset_cases(draw):
    """A case whose x has, per channel, a mean of up to 1e4 standard deviations (the first channel always
    1e4), one standard deviation from 1e-2 to 1e2 (one for all channels, so that helpers' `terms`, a
    scalar, is that of every channel), and SparK or random masks at ratio 0.3 / 0.6."""
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    h, w = draw(st.integers(4, 9)), draw(st.integers(4, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    ratio = draw(st.sampled_from([0.3, 0.6]))
    mask = random_mask(n, h, w, ratio, seed=seed) if draw(st.booleans()) else spark_mask(n, h, w, ratio, 2, seed)
    mask[0, 0, 0, 0] = True  # at least one active site
    offsets = [1e4] + draw(st.lists(st.sampled_from([-1e4, -1e3, 0.0, 30.0, 1e3, 1e4]), min_size=c - 1,
                                    max_size=c - 1))
    std = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    return Case(n, c, h, w, mask, seed, scale=std, offset=0.0, channels_last=draw(st.booleans())), \
        torch.tensor(offsets, dtype=torch.float64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,device,dtype", fused_backends(*OFFSET_DTYPES))
@OFFSET_SETTINGS
@given(drawn=offset_cases())
def test_masked_batch_norm_large_offsets(backend, device, dtype, training, drawn):
    case, offsets = drawn
    g = case.generator()
    x = (torch.randn(case.n, case.c, case.h, case.w, generator=g, dtype=torch.float64)
         + offsets.view(1, case.c, 1, 1)) * case.scale
    weight, bias = case.values(case.c, g=g), case.values(case.c, g=g)
    running_mean = offsets * case.scale
    running_var = torch.full((case.c,), case.scale ** 2, dtype=torch.float64)
    grad_out = case.values(*x.shape, g=g)
    mask = case.mask.to(device)

    def make_op(name):
        def op(x, weight, bias):
            rm, rv = running_mean.to(x.device, x.dtype), running_var.to(x.device, x.dtype)
            y = sk.masked_batch_norm(x, mask, rm, rv, weight, bias, training=training, momentum=0.5, backend=name)
            return y, rm, rv
        return op

    rows = x.permute(0, 2, 3, 1)[case.mask[:, 0]].to(dtype).double()  # the values the backends see
    var = rows.var(0, unbiased=False) if training else running_var
    gain = (var.min().item() + 1e-5) ** -0.5
    check_against_reference(backend, dtype, make_op, [x, weight, bias], grad_out, case.channels_last, ~case.mask,
                            terms=norm_terms(x, weight, grad_out, gain), device=device, exact_outputs=(1, 2))


@pytest.mark.parametrize("backend,device,dtype", fused_backends(*OFFSET_DTYPES))
@OFFSET_SETTINGS
@given(drawn=offset_cases(), data_format=st.sampled_from(["channels_first", "channels_last"]))
def test_masked_layer_norm_large_offsets(backend, device, dtype, data_format, drawn):
    """LayerNorm normalizes each site over its channels: there the offset is per site (up to 1e4 x std)."""
    case, offsets = drawn
    g = case.generator()
    site_offsets = offsets[torch.randint(0, case.c, (case.n, 1, case.h, case.w), generator=g)]
    x = (torch.randn(case.n, case.c, case.h, case.w, generator=g, dtype=torch.float64) + site_offsets) * case.scale
    weight, bias = case.values(case.c, g=g), case.values(case.c, g=g)
    inactive, channels_last_memory = ~case.mask, case.channels_last
    if data_format == "channels_last":
        x, inactive, channels_last_memory = x.permute(0, 2, 3, 1).contiguous(), inactive.permute(0, 2, 3, 1), False
    grad_out = case.values(*x.shape, g=g)
    mask = case.mask.to(device)

    def make_op(name):
        return lambda x, weight, bias: (
            sk.masked_layer_norm(x, mask, weight, bias, eps=1e-6, data_format=data_format, backend=name),)

    rows = (x if data_format == "channels_last" else x.permute(0, 2, 3, 1))[case.mask[:, 0]].to(dtype).double()
    gain = (rows.var(-1, unbiased=False).min().item() + 1e-6) ** -0.5
    check_against_reference(backend, dtype, make_op, [x, weight, bias], grad_out, channels_last_memory, inactive,
                            terms=norm_terms(x, weight, grad_out, gain), device=device)


@pytest.mark.parametrize("backend,device,dtype", fused_backends(*OFFSET_DTYPES))
@OFFSET_SETTINGS
@given(drawn=offset_cases(), data=st.data())
def test_masked_group_norm_large_offsets(backend, device, dtype, drawn, data):
    """GroupNorm normalizes each (image, group): there the offset is per (image, group) (up to 1e4 x std)."""
    case, offsets = drawn
    groups = data.draw(st.sampled_from(divisors(case.c)), label="num_groups")
    g = case.generator()
    per_group = offsets[torch.randint(0, case.c, (case.n, groups), generator=g)]
    x = (torch.randn(case.n, case.c, case.h, case.w, generator=g, dtype=torch.float64)
         + per_group.repeat_interleave(case.c // groups, dim=1)[:, :, None, None]) * case.scale
    weight, bias = case.values(case.c, g=g), case.values(case.c, g=g)
    grad_out = case.values(*x.shape, g=g)
    mask = case.mask.to(device)

    def make_op(name):
        return lambda x, weight, bias: (sk.masked_group_norm(x, mask, groups, weight, bias, backend=name),)

    gain = group_gain(x.to(dtype).double(), case.mask, groups, 1e-5)
    check_against_reference(backend, dtype, make_op, [x, weight, bias], grad_out, case.channels_last, ~case.mask,
                            terms=norm_terms(x, weight, grad_out, gain), device=device)
