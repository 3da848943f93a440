"""Inputs nobody planned for, on every backend that runs CPU tensors: each gives the reference's result
or a clear error naming the argument; never a crash, never garbage.

Covered for sparse_depthwise_conv2d, masked_batch_norm, masked_layer_norm (both formats), masked_group_norm,
ActiveSites
(.downsample, .at) and the spark_kernels.nn modules: wrong dtypes, mixed devices ("meta" as the second
device), non-contiguous / overlapping-stride / offset views of every tensor argument and of the
upstream gradient, zero-size tensors, NaN/Inf at active sites, NaN/Inf at inactive sites (input and
upstream gradient), masks and ActiveSites that do not match x.
"""
import math

import pytest
import torch
from torch import nn

import spark_kernels as sk
from spark_kernels._registry import VARIANTS

from helpers import assert_close_to_reference, cpu_tensor_backends, kernel_backends, random_mask

F64 = torch.float64
N, C, H, W = 2, 3, 5, 6
LN_FORMATS = ["channels_first", "channels_last"]
# op ids: every test case (Variant) of the op registry: the conv at each kernel size (and 3x3, 5x5 at stride 2;
# H = 5 is odd: a half block at the border), BN in both modes, LN in both formats, GN.
OPS = list(VARIANTS)
DIFFERENTIABLE = ("x", "weight", "bias")


def kernel_op(op: str) -> str:
    return VARIANTS[op][0].short


def conv_stride(op: str) -> int:
    return VARIANTS[op][1].stride or 1


def out_sites(op: str, mask: torch.Tensor) -> torch.Tensor:
    """The op's output's active sites: the mask itself but for a strided conv."""
    stride = conv_stride(op)
    return mask if stride == 1 else sk.ActiveSites(mask).strided(stride).mask


def op_backends():
    """(op, backend) pairs, each marked like kernel_backends() marks the op's backends."""
    params = []
    for op in OPS:
        for p in kernel_backends(kernel_op(op)):
            params.append(pytest.param(op, p.values[0], marks=p.marks, id=f"{op}-{p.id}"))
    return params


def make_inputs(op: str, n=N, c=C, h=H, w=W, dtype=F64, seed=0) -> dict:
    """The tensors of op (x in the op's logical layout) with random values, float64 by default."""
    return VARIANTS[op][1].inputs(n, c, h, w, dtype, torch.Generator().manual_seed(seed))


def call(op: str, backend: str, t: dict, active):
    return VARIANTS[op][1].call(t, active, backend)


def channels_last_input(op: str) -> bool:
    """x is (N, H, W, C) for this op id."""
    return VARIANTS[op][1].channels_last_input


def x_to_nchw(op: str, t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2) if channels_last_input(op) else t


KERNEL_LAYOUTS = ("planes", "rows")  # spark_kernels/_layout.py


def kernel_layout_views(op: str, layout: str) -> dict:
    """views for run() that hand x to op in the memory order the kernels process as `layout`: "planes"
    (NCHW-contiguous) or "rows" (channels_last). A channels_last-format x is (N, H, W, C): contiguous it
    is rows, and planes is a permuted NCHW-contiguous view."""
    if channels_last_input(op):
        return {"x": lambda t: t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)} if layout == "planes" else {}
    return {"x": lambda t: t.contiguous(memory_format=torch.channels_last)} if layout == "rows" else {}


def run(op, backend, inputs, active, views=None, grad_out="random"):
    """Forward and backward of op on clones of inputs, each passed through views[name] (a function of the
    leaf, so hostile layouts reach the op while gradients are taken w.r.t. the leaf).

    grad_out: "random" (contiguous), "expanded" (the stride-0 gradient of y.sum()), "transposed" (a
    random gradient in a non-contiguous layout) or a tensor. Returns (y, grads by name, the op's
    tensors after the call: the running statistics of BN are updated in place)."""
    views = views or {}
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k in DIFFERENTIABLE and v.is_floating_point())
              for k, v in inputs.items()}
    args = {k: None if v is None else views.get(k, lambda t: t)(v) for k, v in leaves.items()}
    y = call(op, backend, args, active)
    wrt = [k for k in DIFFERENTIABLE if leaves.get(k) is not None and leaves[k].requires_grad]
    if isinstance(grad_out, torch.Tensor):
        target, seed = y, grad_out
    elif grad_out == "expanded":
        target, seed = y.sum(), None
    else:
        g = torch.Generator().manual_seed(1)
        seed = torch.randn(y.shape[::-1], generator=g, dtype=y.dtype).permute(*reversed(range(y.dim())))
        seed = seed if grad_out == "transposed" else seed.contiguous()
        target = y
    grads = torch.autograd.grad(target, [leaves[k] for k in wrt], seed)
    return y.detach(), dict(zip(wrt, grads)), args


def assert_same_as_reference(op, backend, inputs, active, views=None, grad_out="random"):
    y, grads, args = run(op, backend, inputs, active, views, grad_out)
    ry, rgrads, rargs = run(op, "reference", inputs, active, views, grad_out)
    assert_close_to_reference(y, ry, ry, f"{op} {backend} output")
    assert grads.keys() == rgrads.keys()
    for k in grads:
        assert_close_to_reference(grads[k], rgrads[k], rgrads[k], f"{op} {backend} gradient of {k}")
    for k in ("running_mean", "running_var"):
        if args.get(k) is not None:
            assert_close_to_reference(args[k], rargs[k], rargs[k], f"{op} {backend} {k}")
    return y, grads


# -- wrong dtypes --------------------------------------------------------------------------------------
BAD_DTYPES = [torch.int32, torch.int64, torch.bool, torch.complex64]


@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("op, arg", [(op, arg) for op in OPS for arg in make_inputs(op)])
@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
def test_wrong_dtype_names_the_argument(backend, op, dtype, arg):
    inputs = make_inputs(op)
    mask = random_mask(N, H, W, 0.5)
    inputs[arg] = inputs[arg].to(dtype)
    with pytest.raises(TypeError, match=rf"^{arg} must"):
        call(op, backend, inputs, mask)


@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("op", OPS)
def test_mixed_float_dtypes_name_the_argument(backend, op):
    inputs = make_inputs(op, dtype=torch.float32)
    inputs["bias"] = inputs["bias"].double()
    with pytest.raises(TypeError, match="^bias must have (the same )?dtype"):
        call(op, backend, inputs, random_mask(N, H, W, 0.5))


@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float32], ids=str)
def test_non_bool_mask(backend, op, dtype):
    with pytest.raises(TypeError, match="^active must have dtype torch.bool"):
        call(op, backend, make_inputs(op), random_mask(N, H, W, 0.5).to(dtype))


# -- devices -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("op", OPS)
def test_mixed_devices_name_the_argument(backend, op):
    mask = random_mask(N, H, W, 0.5)
    for arg in ("weight", "bias", "running_mean", "running_var"):
        inputs = make_inputs(op)
        if arg in inputs:
            inputs[arg] = inputs[arg].to("meta")
            with pytest.raises(ValueError, match=rf"^{arg} is on meta but x is on cpu"):
                call(op, backend, inputs, mask)
    inputs = make_inputs(op)
    with pytest.raises(ValueError, match="^active is on the meta device"):
        call(op, backend, inputs, mask.to("meta"))
    with pytest.raises(ValueError, match="^active is on cpu but x is on meta"):
        call(op, backend, {k: v.to("meta") for k, v in inputs.items()}, sk.ActiveSites(mask))


# -- masks and ActiveSites that do not match x ------------------------------------------------------------
WRONG_MASKS = {
    "batch": lambda: random_mask(N + 1, H, W, 0.5),
    "height": lambda: random_mask(N, H - 1, W, 0.5),
    "transposed": lambda: random_mask(N, W, H, 0.5),
    "sites_for_other_shape": lambda: sk.ActiveSites(random_mask(N, 2 * H, 2 * W, 0.5)),
}


@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("wrong", sorted(WRONG_MASKS))
def test_mask_for_another_shape(backend, op, wrong):
    with pytest.raises(ValueError, match=r"^active is for \(N, H, W\)"):
        call(op, backend, make_inputs(op), WRONG_MASKS[wrong]())


@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("op", OPS)
def test_mask_of_wrong_rank_or_channels(backend, op):
    inputs = make_inputs(op)
    mask = random_mask(N, H, W, 0.5)
    bad = [mask.expand(N, 2, H, W), mask[None], mask[0, 0]]
    if not channels_last_input(op):
        bad.append(mask[:, 0])  # (N, H, W) is accepted for channels_last only
    for m in bad:
        with pytest.raises(ValueError, match=r"^active must have shape \(N, 1, H, W\)"):
            call(op, backend, inputs, m)
    with pytest.raises(TypeError, match="^active must be a bool mask tensor"):
        call(op, backend, inputs, mask.tolist())


# -- ActiveSites ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg", [0, -4, 8.0, True, None, "8"])
def test_sites_at_and_downsample_refuse_non_positive_ints(arg):
    sites = sk.ActiveSites(random_mask(2, 4, 4, 0.5))
    with pytest.raises(ValueError, match="^height must be a positive int"):
        sites.at(arg, 8)
    with pytest.raises(ValueError, match="^width must be a positive int"):
        sites.at(8, arg)
    with pytest.raises(ValueError, match="^factor must be a positive int"):
        sites.downsample(arg)


def test_sites_accept_integer_like_sizes():
    import numpy as np
    sites = sk.ActiveSites(random_mask(2, 4, 4, 0.5))
    assert sites.at(np.int64(8), torch.tensor(8)) is sites.at(8, 8)
    assert sites.downsample(np.int32(2)) is sites.downsample(2)


def test_sites_without_spatial_extent_cannot_be_resampled():
    for mask in (torch.zeros(2, 1, 0, 4, dtype=torch.bool), torch.zeros(2, 1, 4, 0, dtype=torch.bool)):
        sites = sk.ActiveSites(mask)
        assert sites.num_active == 0 and sites.neighbors(7).shape == (0, 49)
        with pytest.raises(ValueError, match="no sites"):
            sites.downsample(2)
        with pytest.raises(ValueError, match="no sites"):
            sites.at(8, 8)
    empty_batch = sk.ActiveSites(torch.zeros(0, 1, 4, 4, dtype=torch.bool))
    assert empty_batch.downsample(2).shape == (0, 2, 2) and empty_batch.at(8, 8).num_active == 0


def test_sites_from_views_and_meta():
    base = random_mask(1, 5, 5, 0.5)
    expanded = sk.ActiveSites(base.expand(3, 1, 5, 5))
    assert expanded.num_active == 3 * int(base.sum())
    transposed = sk.ActiveSites(base.transpose(2, 3))
    assert torch.equal(transposed.mask, base.transpose(2, 3).contiguous())
    assert torch.equal(transposed.index.long(), torch.nonzero(base.transpose(2, 3).reshape(-1)).reshape(-1))
    with pytest.raises(ValueError, match="^mask is on the meta device"):
        sk.ActiveSites(base.to("meta"))


# -- layouts: non-contiguous, overlapping strides, storage offsets -------------------------------------------
def x_view(kind: str, x: torch.Tensor) -> torch.Tensor:
    """A view of x's values with a hostile layout; the same function is applied to the reference's input."""
    n, c, h, w = x.shape
    if kind == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "channels_last_cropped":
        return torch.nn.functional.pad(x, (0, 1)).contiguous(memory_format=torch.channels_last)[..., :w]
    if kind == "every_other_channel":
        return torch.repeat_interleave(x, 2, dim=1)[:, ::2]
    if kind == "storage_offset":
        return torch.cat([x.new_zeros(7), x.reshape(-1)])[7:].view(n, c, h, w)
    if kind == "expanded_batch":  # overlapping: stride 0 over the batch
        return x[:1].expand(n, c, h, w)
    if kind == "expanded_width":
        return x[..., :1].expand(n, c, h, w)
    if kind == "as_strided_overlap":  # element (h, w) aliases (h + 1, w - 1)
        return x.reshape(-1).as_strided((n, c, h, w), (c * (h + w), h + w, 1, 1))
    raise ValueError(kind)


LAYOUTS = ["transposed", "channels_last", "channels_last_cropped", "every_other_channel", "storage_offset",
           "expanded_batch", "expanded_width", "as_strided_overlap"]


def param_view(kind: str, t: torch.Tensor) -> torch.Tensor:
    if kind == "strided":
        return torch.repeat_interleave(t, 2, dim=0)[::2]
    if kind == "expanded":  # every channel aliases the first
        return t[:1].expand(t.shape)
    if kind == "transposed":
        return t.transpose(-1, -2) if t.dim() == 4 else t.flip(0)
    raise ValueError(kind)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op, backend", op_backends())
def test_hostile_input_layouts(op, backend, layout):
    inputs = make_inputs(op)
    mask = random_mask(N, H, W, 0.4, seed=3)
    if channels_last_input(op):
        inputs["x"] = inputs["x"].permute(0, 3, 1, 2)  # views are built on the NCHW form, then permuted back

        def view(t):
            return x_view(layout, t).permute(0, 2, 3, 1)
    else:
        def view(t):
            return x_view(layout, t)
    assert_same_as_reference(op, backend, inputs, mask, views={"x": view})


@pytest.mark.parametrize("kind", ["strided", "expanded", "transposed"])
@pytest.mark.parametrize("op, backend", op_backends())
def test_hostile_parameter_layouts(op, backend, kind):
    inputs = make_inputs(op)
    views = {k: (lambda t, kind=kind: param_view(kind, t)) for k in inputs if k != "x"}
    mask = random_mask(N, H, W, 0.4, seed=4)
    if op == "bn_train" and kind == "expanded":  # running statistics are written in place
        with pytest.raises(ValueError, match="^running_mean is updated in place and must not be an expanded view"):
            run(op, backend, inputs, mask, views=views)
        views.pop("running_mean"), views.pop("running_var")
    assert_same_as_reference(op, backend, inputs, mask, views=views)


@pytest.mark.parametrize("grad_out", ["expanded", "transposed"])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op, backend", op_backends())
def test_hostile_gradient_layouts(op, backend, grad_out, x_layout):
    views = {}
    if x_layout == "channels_last" and not channels_last_input(op):
        views["x"] = lambda t: t.contiguous(memory_format=torch.channels_last)
    assert_same_as_reference(op, backend, make_inputs(op), random_mask(N, H, W, 0.4, seed=5), views=views,
                             grad_out=grad_out)


# -- zero-size tensors ---------------------------------------------------------------------------------
def check_zero_size(op, backend, empty):
    n, c, h, w = (0 if empty == d else s for d, s in zip("NCHW", (N, C, H, W)))
    inputs = make_inputs(op, n, c, h, w)
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool) if empty == "no_active_site" else random_mask(n, h, w, 0.5)
    before = {k: v.clone() for k, v in inputs.items()}
    y, grads = assert_same_as_reference(op, backend, inputs, mask)
    s = conv_stride(op)
    x_shape = tuple(inputs["x"].shape)
    assert tuple(y.shape) == x_shape[:2] + (-(-x_shape[2] // s), -(-x_shape[3] // s)) and (y == 0).all()
    for k, g in grads.items():
        assert g.shape == inputs[k].shape and (g == 0).all(), f"gradient of {k} must be zeros"
    if op == "bn_train":  # nothing observed: running statistics unchanged
        _, _, args = run(op, backend, inputs, mask)
        assert torch.equal(args["running_mean"], before["running_mean"])
        assert torch.equal(args["running_var"], before["running_var"])


@pytest.mark.parametrize("empty", ["N", "C", "H", "W"])
@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("op", OPS)
def test_zero_size(op, backend, empty):
    check_zero_size(op, backend, empty)


@pytest.mark.parametrize("op, backend", op_backends())
def test_no_active_site(op, backend):
    check_zero_size(op, backend, "no_active_site")


# -- non-finite values ---------------------------------------------------------------------------------
def with_values_at(x_nchw: torch.Tensor, where: torch.Tensor, value: float, count: int, seed: int):
    """x with `value` at `count` random (n, c, h, w) positions whose site is selected by `where` (N, 1, H, W)."""
    g = torch.Generator().manual_seed(seed)
    sites = torch.nonzero(where.expand_as(x_nchw).reshape(-1)).reshape(-1)
    pick = sites[torch.randperm(sites.numel(), generator=g)[:count]]
    out = x_nchw.clone().reshape(-1)
    out[pick] = value
    return out.reshape(x_nchw.shape)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("op, backend", op_backends())
def test_nonfinite_at_active_sites_propagates_like_the_reference(op, backend, value):
    """Same NaN/Inf pattern as the reference in the output, every gradient and BN's running statistics.

    The mask is fully active around the bad values: the conv's weight gradient from a bad value next to
    an inactive site is NaN in the reference (0 * NaN from the dense correlation over inactive outputs)
    and may be finite in a sparse backend, which never reads inactive outputs (docs/guarantees.md)."""
    inputs = make_inputs(op, seed=7)
    mask = torch.ones(N, 1, H, W, dtype=torch.bool)
    mask[1, :, 3:] = False
    core = torch.zeros_like(mask)
    core[0, :, 1:4, 1:5] = True
    x = x_to_nchw(op, inputs["x"])
    x = with_values_at(x, core, value, count=2, seed=8)
    inputs["x"] = x.permute(0, 2, 3, 1).contiguous() if channels_last_input(op) else x
    y, grads = assert_same_as_reference(op, backend, inputs, mask)
    assert not x_to_nchw(op, y).isfinite()[0].all()  # the bad values did reach the output


@pytest.mark.parametrize("op, backend", op_backends())
def test_nonfinite_next_to_inactive_sites(op, backend):
    """Output, input gradient (and for the norms every gradient) follow the reference exactly; the
    conv's parameter gradients are NaN wherever the backend's are (never NaN where the reference is finite)."""
    inputs = make_inputs(op, seed=9)
    mask = random_mask(N, H, W, 0.5, seed=9)
    x = with_values_at(x_to_nchw(op, inputs["x"]), mask, math.nan, count=2, seed=10)
    inputs["x"] = x.permute(0, 2, 3, 1).contiguous() if channels_last_input(op) else x
    if not op.startswith("conv"):
        assert_same_as_reference(op, backend, inputs, mask)
        return
    y, grads, _ = run(op, backend, inputs, mask)
    ry, rgrads, _ = run(op, "reference", inputs, mask)
    assert_close_to_reference(y, ry, ry, "output")
    assert_close_to_reference(grads["x"], rgrads["x"], rgrads["x"], "gradient of x")
    for k in ("weight", "bias"):
        both_finite = grads[k].isfinite() & rgrads[k].isfinite()
        assert not (grads[k].isnan() & ~rgrads[k].isnan()).any(), f"{k}: NaN where the reference is finite"
        torch.testing.assert_close(grads[k][both_finite], rgrads[k][both_finite])


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("op, backend", op_backends())
def test_nonfinite_at_inactive_sites_does_not_leak(op, backend, value):
    """Non-finite x and upstream gradient at inactive sites: bit-identical results to zeros there."""
    inputs = make_inputs(op, seed=11)
    mask = random_mask(N, H, W, 0.5, seed=11)
    x = x_to_nchw(op, inputs["x"])
    clean_x = torch.where(mask, x, 0.0)
    dirty_x = torch.where(mask, x, value)
    y_mask = out_sites(op, mask)
    g = torch.randn(x.shape[:2] + y_mask.shape[2:], generator=torch.Generator().manual_seed(12), dtype=F64)
    clean_g, dirty_g = torch.where(y_mask, g, 0.0), torch.where(y_mask, g, value)
    to_op = (lambda t: t.permute(0, 2, 3, 1).contiguous()) if channels_last_input(op) else (lambda t: t)
    y_clean, grads_clean, _ = run(op, backend, dict(inputs, x=to_op(clean_x)), mask, grad_out=to_op(clean_g))
    y_dirty, grads_dirty, _ = run(op, backend, dict(inputs, x=to_op(dirty_x)), mask, grad_out=to_op(dirty_g))
    assert y_dirty.isfinite().all()
    assert torch.equal(y_dirty, y_clean)
    for k in grads_clean:
        assert grads_dirty[k].isfinite().all(), f"gradient of {k}: non-finite values leaked from inactive sites"
        assert torch.equal(grads_dirty[k], grads_clean[k]), f"gradient of {k} depends on inactive sites"


# -- spark_kernels.nn modules --------------------------------------------------------------------------
def dense_modules():
    return {
        "conv3": (sk.nn.SparseDepthwiseConv2d.from_dense, nn.Conv2d(C, C, 3, padding=1, groups=C)),
        "conv7": (sk.nn.SparseDepthwiseConv2d.from_dense, nn.Conv2d(C, C, 7, padding=3, groups=C, bias=False)),
        "conv5s2": (sk.nn.SparseDepthwiseConv2d.from_dense, nn.Conv2d(C, C, 5, stride=2, padding=2, groups=C)),
        "bn": (sk.nn.MaskedBatchNorm2d.from_dense, nn.BatchNorm2d(C)),
        "ln_channels_first": (lambda m, backend: sk.nn.MaskedLayerNorm.from_dense(m, "channels_first", backend),
                              nn.LayerNorm(C)),
        "ln_channels_last": (lambda m, backend: sk.nn.MaskedLayerNorm.from_dense(m, "channels_last", backend),
                             nn.LayerNorm(C)),
        "gn": (sk.nn.MaskedGroupNorm.from_dense, nn.GroupNorm(3, C)),
    }


@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("name", ["conv3", "conv7", "conv5s2", "bn", "ln_channels_first", "ln_channels_last", "gn"])
def test_module_outside_active_context_and_with_mismatched_sites(backend, name):
    convert, dense = dense_modules()[name]
    module = convert(dense, backend=backend)
    x = torch.randn(N, C, H, W)
    if name == "ln_channels_last":
        x = x.permute(0, 2, 3, 1)
    with pytest.raises(RuntimeError, match="needs active sites: run it inside `with spark_kernels.active"):
        module(x)
    with sk.active(random_mask(N + 1, H, W, 0.5)):
        with pytest.raises(ValueError, match="input batch size 2 does not match the active sites' batch size 3"):
            module(x)
    with sk.active(random_mask(N, 4, 4, 0.5)):
        with pytest.raises(ValueError, match="cannot be resampled to 5x6"):
            module(x)
    with pytest.raises(ValueError, match="4-D"):
        with sk.active(random_mask(N, H, W, 0.5)):
            module(x[0])


@pytest.mark.parametrize("backend", cpu_tensor_backends())
def test_from_dense_refuses_what_it_cannot_replace(backend):
    conv = sk.nn.SparseDepthwiseConv2d.from_dense
    for bad, why in [(nn.Conv2d(C, C, 3, stride=3, padding=1, groups=C), "stride"),
                     (nn.Conv2d(C, C, 3, padding=1), "not depthwise"),
                     (nn.Conv2d(C, C, 9, padding=4, groups=C), "not one of 3x3, 5x5, 7x7"),
                     (nn.Conv2d(C, C, 3, padding=0, groups=C), "padding"),
                     (nn.Conv2d(C, C, 3, padding=1, groups=C, padding_mode="reflect"), "padding_mode"),
                     (nn.Conv2d(C, C, 3, padding=2, dilation=2, groups=C), "dilation"),
                     (nn.Conv1d(C, C, 3, padding=1, groups=C), "not a plain nn.Conv2d"),
                     (3, "not a plain nn.Conv2d")]:
        with pytest.raises(ValueError, match=why):
            conv(bad, backend=backend)
    for bad in (nn.BatchNorm1d(C), nn.LayerNorm(C), None):
        with pytest.raises(TypeError, match="MaskedBatchNorm2d.from_dense expects nn.BatchNorm2d"):
            sk.nn.MaskedBatchNorm2d.from_dense(bad, backend=backend)
    with pytest.raises(TypeError, match="MaskedLayerNorm.from_dense expects an nn.LayerNorm"):
        sk.nn.MaskedLayerNorm.from_dense(nn.BatchNorm2d(C), "channels_first", backend=backend)
    with pytest.raises(ValueError, match="normalizes over channels only"):
        sk.nn.MaskedLayerNorm.from_dense(nn.LayerNorm((C, 4)), "channels_first", backend=backend)
    with pytest.raises(ValueError, match="data_format must be one of"):
        sk.nn.MaskedLayerNorm.from_dense(nn.LayerNorm(C), "NCHW", backend=backend)
    for bad in (nn.BatchNorm2d(C), nn.LayerNorm(C), None):
        with pytest.raises(TypeError, match="MaskedGroupNorm.from_dense expects an nn.GroupNorm"):
            sk.nn.MaskedGroupNorm.from_dense(bad, backend=backend)


@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("name", ["conv3", "bn", "ln_channels_first", "gn"])
def test_from_dense_of_a_meta_module_keeps_the_device_and_refuses_cpu_inputs(backend, name):
    convert, dense = dense_modules()[name]
    module = convert(dense.to("meta"), backend=backend)
    assert all(p.device.type == "meta" for p in module.parameters())
    with sk.active(random_mask(N, H, W, 0.5)):
        with pytest.raises(ValueError, match="is on meta but x is on cpu"):
            module(torch.randn(N, C, H, W))


@pytest.mark.parametrize("backend", cpu_tensor_backends())
@pytest.mark.parametrize("name", ["conv3", "bn", "ln_channels_first", "gn"])
def test_module_with_other_dtype_than_input(backend, name):
    convert, dense = dense_modules()[name]
    module = convert(dense.double(), backend=backend)
    with sk.active(random_mask(N, H, W, 0.5)):
        with pytest.raises(TypeError, match="must have (the same )?dtype"):
            module(torch.randn(N, C, H, W))
