"""The SparK model layer: fused vs masked-dense reference parity, conversion, reconstruction, bad input."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import timm
import torch
from torch import nn

import spark_kernels as sk
from spark import SparK, UnsupportedLayerError, precision, sparse_encoder_
from spark_kernels.masks import upsample_mask

from helpers import AUTOCAST_FLOOR, ERROR_MULTIPLE, MODEL_GRAD_RTOL, RTOL, ATOL, patch_mask_with_both

MODELS = ["resnet18", "resnet50", "convnext_tiny", "mobilenetv2_100"]
DTYPE = torch.float64
BATCH = 2


def _cpu_kernels_ready() -> str:
    """Why the "cpu" backend cannot run the model's ops in float64, or "" when it can."""
    try:
        x = torch.randn(1, 4, 5, 5, dtype=DTYPE)
        mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
        for k in (3, 7):
            sk.sparse_depthwise_conv2d(x, torch.randn(4, 1, k, k, dtype=DTYPE), None, mask, backend="cpu")
        sk.masked_batch_norm(x, mask, torch.zeros(4, dtype=DTYPE), torch.ones(4, dtype=DTYPE), backend="cpu")
        sk.masked_layer_norm(x, mask, None, None, backend="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means the kernels are not there yet
        return f"cpu kernels unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return ""


CPU_NOT_READY = _cpu_kernels_ready()

# Fused model variants: the fused model layer on the C++ "cpu" kernels, and (for ConvNeXt, where the model
# layer's own fused code is largest) the same model layer with every kernel op forced to the reference, which
# isolates that code (compact MLP rows, skipped masks) from the kernels.
NEEDS_CPU = pytest.mark.skipif(bool(CPU_NOT_READY), reason=CPU_NOT_READY or "ready")
CPU = pytest.param("cpu", marks=NEEDS_CPU, id="cpu")
PARITY_CASES = [pytest.param(name, "cpu", marks=NEEDS_CPU, id=f"{name}-cpu") for name in MODELS] + \
               [pytest.param("convnext_tiny", "reference", id="convnext_tiny-reference_ops")]


@pytest.fixture
def ops_backend(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setenv("SPARK_KERNELS_BACKEND", "reference")
    else:
        monkeypatch.delenv("SPARK_KERNELS_BACKEND", raising=False)
    return request.param


def dense_encoder(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, features_only=True, pretrained=False, **kwargs).to(DTYPE)


def model_pair(name: str, input_size: int = 64, **kwargs):
    """(fused, reference) SparK models with identical weights."""
    dense = dense_encoder(name, **kwargs)
    reference = SparK(copy.deepcopy(dense), input_size=input_size, backend="reference").to(DTYPE)
    fused = SparK(dense, input_size=input_size).to(DTYPE)
    fused.load_state_dict(reference.state_dict())
    return fused, reference


def patch_mask_for(h: int, w: int, seed: int = 1) -> torch.Tensor:
    """A fixed (BATCH, 1, h/32, w/32) patch mask with visible and masked patches in every image."""
    return patch_mask_with_both(BATCH, h // 32, w // 32, seed)


def images_for(h: int, w: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, h, w, generator=g, dtype=DTYPE)


def assert_grads_match(fused: nn.Module, reference: nn.Module) -> None:
    """Per parameter: max |difference| <= MODEL_GRAD_RTOL x (max |reference grad| of that parameter, floored
    at the largest gradient entry of the model: some gradients are exactly zero in exact arithmetic, e.g.
    the bias of a BN followed by another BN, and hold only rounding noise that differs between paths)."""
    ref_params = dict(reference.named_parameters())
    names = [n for n, _ in fused.named_parameters()]
    assert names == list(ref_params), "fused and reference models have different parameters"
    for name, q in ref_params.items():
        assert q.grad is not None, f"{name}: missing gradient"
    floor = max(q.grad.abs().max().item() for q in ref_params.values()) * 1e-6
    for name, p in fused.named_parameters():
        q = ref_params[name]
        assert p.grad is not None, f"{name}: missing gradient"
        scale = max(q.grad.abs().max().item(), floor)
        err = (p.grad - q.grad).abs().max().item()
        assert err <= MODEL_GRAD_RTOL[DTYPE] * scale, \
            f"{name}: gradient differs by {err:.3g} (max |reference grad| {q.grad.abs().max().item():.3g})"


# mobilenetv2 at 64x64, not 32x64: at 32x64 its stride-16 stage has 8 sites per image, and BN channels that
# ReLU6 clips to near-constant amplify float64 rounding of the two summation orders to ~1.7e-8 relative.
SHAPES = {"resnet18": (32, 64), "resnet50": (32, 64), "convnext_tiny": (64, 64), "mobilenetv2_100": (64, 64)}


@pytest.mark.parametrize("name, ops_backend", PARITY_CASES, indirect=["ops_backend"])
def test_fused_matches_reference_loss_and_gradients(name, ops_backend):
    h, w = SHAPES[name]
    fused, reference = model_pair(name)
    images, mask = images_for(h, w), patch_mask_for(h, w)
    loss_ref = reference(images, mask)
    loss_fused = fused(images, mask)
    torch.testing.assert_close(loss_fused, loss_ref, rtol=RTOL[DTYPE], atol=ATOL[DTYPE])
    loss_ref.backward()
    loss_fused.backward()
    assert_grads_match(fused, reference)
    for (n, a), (_, b) in zip(fused.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(a, b, rtol=RTOL[DTYPE], atol=ATOL[DTYPE], msg=lambda m: f"buffer {n}: {m}")


@pytest.mark.parametrize("ops_backend", [CPU], indirect=True)
def test_fused_convnext_drop_path_matches_reference(ops_backend):
    """Drop path on compact rows draws one keep flag per image, like timm's drop_path on the dense map."""
    fused, reference = model_pair("convnext_atto", drop_path_rate=0.5)
    images, mask = images_for(64, 64), patch_mask_for(64, 64)
    torch.manual_seed(3)
    loss_ref = reference(images, mask)
    torch.manual_seed(3)
    loss_fused = fused(images, mask)
    torch.testing.assert_close(loss_fused, loss_ref, rtol=RTOL[DTYPE], atol=ATOL[DTYPE])
    loss_ref.backward()
    loss_fused.backward()
    assert_grads_match(fused, reference)


# -- mixed precision ---------------------------------------------------------------------------------------
# Small members of each family (the encoder's fused ops are what is tested; width and depth only cost time).
SMALL_ENCODERS = {"resnet": ("resnet18", dict(layers=[1, 1, 1, 1])),
                  "convnext": ("convnext_tiny", dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)))}


def small_float32_pair(family: str):
    name, kwargs = SMALL_ENCODERS[family]
    torch.manual_seed(0)
    dense = timm.create_model(name, features_only=True, pretrained=False, **kwargs)
    reference = SparK(copy.deepcopy(dense), input_size=64, backend="reference")
    fused = SparK(dense, input_size=64)
    fused.load_state_dict(reference.state_dict())
    return fused, reference


def loss_and_grads(model: nn.Module, images, mask, dtype, context=None):
    """Loss and flattened parameter gradients of one step under CPU autocast to dtype (none for float32), or under
    `context`."""
    model.zero_grad()
    with context or torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = model(images, mask)
    loss.backward()
    assert loss.dtype == torch.float32, "the loss must be computed in float32"
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.fixture
def no_fallback():
    """Every masked op of the fused model must run on its fused kernels: a fall back to the reference raises."""
    sk.reset_fallback_counts()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sk.FallbackWarning)
        yield
    assert sk.fallback_counts() == {}


@NEEDS_CPU
@pytest.mark.parametrize("family,dtype", [("convnext", torch.bfloat16), ("resnet", torch.bfloat16),
                                          ("convnext", torch.float16)], ids=lambda v: str(v).replace("torch.", ""))
def test_autocast_fused_matches_reference(family, dtype, no_fallback, monkeypatch):
    """Under CPU autocast the fused model (convs and linears in dtype, masked norms with float32 statistics,
    loss and parameters in float32) is as close to the float32 reference as the reference under the same
    autocast is."""
    monkeypatch.delenv("SPARK_KERNELS_BACKEND", raising=False)
    fused, reference = small_float32_pair(family)
    # Two images: with one, ResNet's last stage normalizes two sites per channel, and a channel whose two
    # values nearly agree amplifies any upstream rounding difference without bound.
    images, mask = images_for(64, 64).float(), patch_mask_for(64, 64)
    exact_loss, exact_grads = loss_and_grads(reference, images, mask, torch.float32)
    ref_loss, ref_grads = loss_and_grads(reference, images, mask, dtype)
    loss, grads = loss_and_grads(fused, images, mask, dtype)

    def within(err, own, exact, what):
        bound = ERROR_MULTIPLE * own + AUTOCAST_FLOOR * exact
        assert err <= bound, f"{what}: error {err:.3g} exceeds {bound:.3g} (the reference's own error {own:.3g})"

    within((loss - exact_loss).abs().item(), (ref_loss - exact_loss).abs().item(), exact_loss.abs().item(), "loss")
    within((grads - exact_grads).norm().item(), (ref_grads - exact_grads).norm().item(), exact_grads.norm().item(),
           "gradients")


@NEEDS_CPU
@pytest.mark.parametrize("family", ["convnext", "resnet"])
def test_bf16_step_computing_in_float32_matches_autocast(family, no_fallback, monkeypatch):
    """spark.precision's bf16 context where oneDNN takes no bf16 (Float32Compute, forced here): the fused model's
    loss and gradients are as close to float32's as under plain bf16 autocast, its forward and backward run no
    generic slow convolution, and the masked ops stay fused."""
    monkeypatch.delenv("SPARK_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(precision, "onednn_takes_bf16", lambda: False)
    fused, _ = small_float32_pair(family)
    images, mask = images_for(64, 64).float(), patch_mask_for(64, 64)
    exact_loss, exact_grads = loss_and_grads(fused, images, mask, torch.float32)
    own_loss, own_grads = loss_and_grads(fused, images, mask, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss, grads = loss_and_grads(fused, images, mask, torch.bfloat16,
                                     precision.autocast("bf16", torch.device("cpu")))
    ops = {event.name for event in profile.events()}
    assert "aten::convolution_backward" in ops and not [op for op in ops if "slow_conv" in op], sorted(ops)
    for what, err, own, exact in (("loss", (loss - exact_loss).abs(), (own_loss - exact_loss).abs(), exact_loss),
                                  ("gradients", (grads - exact_grads).norm(), (own_grads - exact_grads).norm(),
                                   exact_grads.norm())):
        bound = ERROR_MULTIPLE * own.item() + AUTOCAST_FLOOR * exact.abs().item()
        assert err.item() <= bound, f"{what}: error {err.item():.3g} exceeds {bound:.3g} (autocast's {own.item():.3g})"


@NEEDS_CPU
def test_bfloat16_training_loss_falls_like_float32(no_fallback, monkeypatch):
    """A few optimizer steps on one batch: the loss under bfloat16 autocast falls as it does in float32."""
    monkeypatch.delenv("SPARK_KERNELS_BACKEND", raising=False)
    images, mask = images_for(64, 64).float()[:1], patch_mask_for(64, 64)[:1]
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = small_float32_pair("convnext")
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for _ in range(4):
            loss, _ = loss_and_grads(model, images, mask, dtype)
            optimizer.step()
            curve.append(loss.item())
        curves[dtype] = curve
    fp32, bf16 = curves[torch.float32], curves[torch.bfloat16]
    assert fp32[-1] < 0.9 * fp32[0], f"float32 loss did not fall: {fp32}"
    assert bf16[-1] < 0.9 * bf16[0], f"bfloat16 loss did not fall: {bf16}"
    drop32, drop16 = fp32[0] - fp32[-1], bf16[0] - bf16[-1]
    assert abs(drop16 - drop32) <= 0.1 * drop32, f"bfloat16 {bf16} vs float32 {fp32}"
def test_fused_convnext_drop_path_keeps_or_drops_all_rows_of_an_image(monkeypatch):
    """The fused block's drop path on compact rows: per image, the residual branch of every active site is
    either dropped (exactly 0) or kept and scaled by 1 / keep probability, one draw per image."""
    if CPU_NOT_READY:
        monkeypatch.setenv("SPARK_KERNELS_BACKEND", "reference")
    batch = 8
    model = SparK("convnext_atto", input_size=32, drop_path_rate=0.6).to(DTYPE)
    block = model.encoder.stages_2.blocks[2]  # block 6 of 12: the rates go linearly from 0 to 0.6
    assert type(block).__name__ == "SparseConvNeXtBlock" and block.drop_path.drop_prob == pytest.approx(0.6 * 6 / 11)
    keep_prob = 1 - block.drop_path.drop_prob
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(batch, 1, 8, 8, generator=g) < 0.5
    x = torch.randn(batch, 160, 8, 8, generator=g, dtype=DTYPE) * mask
    with sk.active(sk.ActiveSites(mask)):
        block.eval()
        full_branch = block(x) - x
        block.train()
        torch.manual_seed(5)
        branch = block(x) - x
    kept = []
    for b in range(batch):
        active = mask[b, 0]
        rows, full_rows = branch[b][:, active], full_branch[b][:, active]
        assert bool((full_rows != 0).all())
        if bool((rows == 0).all()):
            kept.append(False)
        else:
            torch.testing.assert_close(rows, full_rows / keep_prob, rtol=RTOL[DTYPE], atol=ATOL[DTYPE])
            kept.append(True)
        assert bool((branch[b][:, ~active] == 0).all())
    assert any(kept) and not all(kept), f"expected kept and dropped images in one batch, got {kept}"


def _encoder_features(model: SparK, images: torch.Tensor, mask: torch.Tensor):
    with sk.active(sk.ActiveSites(mask)):
        return model.encoder(images * upsample_mask(mask, *images.shape[-2:]).to(images.dtype))


@pytest.mark.parametrize("name, backend", [(name, None) for name in MODELS] +
                         [("resnet18", "reference"), ("convnext_tiny", "reference")])
def test_all_visible_features_equal_dense_encoder(name, backend, monkeypatch):
    if backend is None and CPU_NOT_READY:
        monkeypatch.setenv("SPARK_KERNELS_BACKEND", "reference")
    dense = dense_encoder(name)
    model = SparK(copy.deepcopy(dense), input_size=32, backend=backend).to(DTYPE)
    images = images_for(32, 64)
    expected = dense(images)
    got = _encoder_features(model, images, torch.ones(BATCH, 1, 1, 2, dtype=torch.bool))
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, rtol=RTOL[DTYPE], atol=ATOL[DTYPE], msg=lambda m: f"feature {i}: {m}")


@pytest.mark.parametrize("backend", [None, "reference"])
def test_features_are_zero_at_masked_sites(backend, monkeypatch):
    if backend is None and CPU_NOT_READY:
        monkeypatch.setenv("SPARK_KERNELS_BACKEND", "reference")
    for name in ("resnet18", "convnext_atto"):
        model = SparK(dense_encoder(name), input_size=64, backend=backend).to(DTYPE)
        mask = patch_mask_for(64, 64)
        for f in _encoder_features(model, images_for(64, 64), mask):
            inactive = ~upsample_mask(mask, *f.shape[-2:]).expand_as(f)
            assert f.shape[-1] < 64 and bool((f[inactive] == 0).all()), f"{name}: nonzero feature at masked site"


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("name", MODELS + ["convnext_atto"])
def test_converted_encoder_keeps_state_dict_keys(name, backend):
    dense = timm.create_model(name, features_only=True, pretrained=False)
    keys = list(dense.state_dict())
    shapes = {k: v.shape for k, v in dense.state_dict().items()}
    converted = sparse_encoder_(copy.deepcopy(dense), backend)
    assert list(converted.state_dict()) == keys
    assert {k: v.shape for k, v in converted.state_dict().items()} == shapes
    dense.load_state_dict(converted.state_dict())  # exports back into the dense timm model


def test_reconstruct_shapes_and_visible_patches_pasted_back():
    model = SparK("resnet18", input_size=64, backend="reference").to(DTYPE).eval()
    images, mask = images_for(64, 96), patch_mask_for(64, 96)
    inp, masked, rec = model.reconstruct(images, mask)
    assert inp.shape == masked.shape == rec.shape == images.shape
    visible = upsample_mask(mask, 64, 96).expand_as(images)
    assert torch.equal(inp, images)
    assert torch.equal(masked[visible], images[visible]) and bool((masked[~visible] == 0).all())
    assert torch.equal(rec[visible], images[visible])
    assert not torch.equal(rec[~visible], images[~visible])
    assert not rec.requires_grad


def test_loss_only_counts_masked_patches():
    """The gradient of the loss reaches the decoder output only inside masked patches, and the loss is the
    mean over masked patches of the per-patch MSE against normalized pixels."""
    model = SparK("resnet18", input_size=64, backend="reference").to(DTYPE)
    images, mask = images_for(64, 64), patch_mask_for(64, 64)
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["out"] = out

    model.decoder.register_forward_hook(keep)
    loss = model(images, mask)
    loss.backward()
    out = captured["out"]
    visible = upsample_mask(mask, 64, 64).expand_as(out)
    assert bool((out.grad[visible] == 0).all()) and bool((out.grad[~visible] != 0).any())
    # Independent evaluation of the loss, patch by patch.
    total, count = 0.0, 0
    for b in range(BATCH):
        for i in range(2):
            for j in range(2):
                if mask[b, 0, i, j]:
                    continue
                patch = images[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32]
                target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
                total += ((out[b, :, 32 * i:32 * i + 32, 32 * j:32 * j + 32] - target) ** 2).mean().item()
                count += 1
    assert abs(loss.item() - total / (count + 1e-8)) <= 1e-12 * max(1.0, abs(loss.item()))


def test_random_mask_keeps_the_visible_count():
    model = SparK("resnet18", input_size=64, mask_ratio=0.6, backend="reference").to(DTYPE)
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    model(images_for(128, 128))
    patches = seen[0].reshape(BATCH, 3, 4, 32, 4, 32)
    visible = (patches != 0).any(dim=5).any(dim=3).any(dim=1)  # (B, 4, 4)
    assert visible.flatten(1).sum(1).tolist() == [round(16 * 0.4)] * BATCH


# -- architecture: the official SparK, parameter for parameter ------------------------------------------------

def projection_kinds(model: SparK):
    """Per densify level, deepest first: "identity" or ("conv", kernel, in channels, out channels)."""
    kinds = []
    for proj in model.densify_projs:
        if isinstance(proj, nn.Identity):
            kinds.append("identity")
        else:
            assert type(proj) is nn.Conv2d and proj.bias is not None, proj
            kinds.append(("conv", proj.kernel_size[0], proj.in_channels, proj.out_channels))
    return kinds


# Parameter counts of the official model (github keyu-tian/SparK, pretrain/, input 224). ConvNeXt-S's is
# derived: its official encoder (timm's convnext_small without the head norm, 49,453,152) plus the densify
# layers and decoder of ConvNeXt-T, which has the same widths (52,748,523 - 27,818,592).
OFFICIAL = {
    "resnet50": dict(features=[4, 3, 2, 1], params=52_921_835,
                     projections=[("conv", 1, 2048, 768), ("conv", 3, 1024, 384), ("conv", 3, 512, 192),
                                  ("conv", 3, 256, 96)]),
    "convnext_tiny": dict(features=[3, 2, 1, 0], params=52_748_523,
                          projections=["identity", ("conv", 3, 384, 384), ("conv", 3, 192, 192),
                                       ("conv", 3, 96, 96)]),
    "convnext_small": dict(features=[3, 2, 1, 0], params=74_383_083,
                           projections=["identity", ("conv", 3, 384, 384), ("conv", 3, 192, 192),
                                        ("conv", 3, 96, 96)]),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_architecture_levels_projections_and_parameter_count(name):
    expected = OFFICIAL[name]
    model = SparK(name, input_size=224, backend="reference")
    # One level per stride 32, 16, 8, 4 (a ResNet's stride-2 stem output, feature 0, is not one).
    assert model.feature_indices == expected["features"]
    assert len(model.mask_tokens) == len(model.densify_norms) == len(model.densify_projs) == 4
    assert projection_kinds(model) == expected["projections"]
    assert [t.shape[1] for t in model.mask_tokens] == [model.encoder.feature_info.channels()[i]
                                                       for i in expected["features"]]
    assert sum(p.numel() for p in model.parameters()) == expected["params"]


class FeatureEncoder(nn.Module):
    """A user encoder in timm features_only style with maps of the given (channels, stride)."""

    def __init__(self, maps):
        super().__init__()
        self.layers = nn.ModuleList()
        self.feature_info = []
        channels, stride = 3, 1
        for width, target in maps:
            factor = target // stride
            self.layers.append(nn.Sequential(nn.Conv2d(channels, width, factor, stride=factor), nn.BatchNorm2d(width)))
            self.feature_info.append(dict(num_chs=width, reduction=target))
            channels, stride = width, target

    def forward(self, x):
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


@pytest.mark.parametrize("maps, features, projections", [
    # The deepest width equals the decoder's: Identity there only; equal widths elsewhere still get a conv.
    ([(8, 2), (96, 4), (192, 8), (16, 16), (768, 32)], [4, 3, 2, 1],
     ["identity", ("conv", 3, 16, 384), ("conv", 3, 192, 192), ("conv", 3, 96, 96)]),
    # Downsample ratio 16: levels at strides 16, 8, 4 with decoder widths 768, 384, 192.
    ([(8, 2), (16, 4), (384, 8), (32, 16)], [3, 2, 1],
     [("conv", 1, 32, 768), ("conv", 3, 384, 384), ("conv", 3, 16, 192)]),
    # A stride without a map gets no level; its decoder step gets no skip feature.
    ([(16, 4), (32, 16), (64, 32)], [2, 1, None, 0],
     [("conv", 1, 64, 768), ("conv", 3, 32, 384), ("conv", 3, 16, 96)]),
])
def test_any_encoder_follows_the_official_rules(maps, features, projections):
    model = SparK(FeatureEncoder(maps), input_size=64, backend="reference").to(DTYPE)
    assert model.feature_indices == features
    assert projection_kinds(model) == projections
    loss = model(images_for(64, 64))
    loss.backward()
    assert torch.isfinite(loss) and all(t.grad is not None for t in model.mask_tokens)


def test_mobilenetv2_levels_are_its_stride_4_to_32_maps():
    model = SparK("mobilenetv2_100", input_size=64, backend="reference")
    assert model.encoder.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert model.feature_indices == [4, 3, 2, 1]
    assert projection_kinds(model) == [("conv", 1, 320, 768), ("conv", 3, 96, 384), ("conv", 3, 32, 192),
                                       ("conv", 3, 24, 96)]


def _std_within(t: torch.Tensor, std: float) -> bool:
    """Sample std of t within a few standard errors of `std` (relative standard error ~ 1/sqrt(2n))."""
    return abs(t.std().item() / std - 1) <= 5 / (2 * t.numel()) ** 0.5 + 0.005


def test_decoder_densify_and_mask_token_initialization():
    """Official init: decoder Conv2d (3x3 convs and the 1x1 head) trunc-normal std 0.02 with zero bias,
    ConvTranspose2d kaiming-normal (fan_out, relu) with zero bias, BN weight 1 / bias 0; densify convs keep
    PyTorch's default init; mask tokens trunc-normal std 0.02 within [-0.02, 0.02]."""
    torch.manual_seed(0)
    model = SparK("resnet50", input_size=224, backend="reference")
    convs = transposed = norms = 0
    for name, m in model.decoder.named_modules():
        if type(m) is nn.Conv2d:
            convs += 1
            assert _std_within(m.weight, 0.02) and m.weight.abs().max() <= 2, name  # trunc_normal_'s [-2, 2]
            assert m.bias is None or bool((m.bias == 0).all()), name
        elif type(m) is nn.ConvTranspose2d:
            transposed += 1
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            assert _std_within(m.weight, (2 / fan_out) ** 0.5) and bool((m.bias == 0).all()), name
        elif type(m) is nn.BatchNorm2d:
            norms += 1
            assert bool((m.weight == 1).all()) and bool((m.bias == 0).all()), name
    assert (convs, transposed, norms) == (11, 5, 10)
    for proj in model.densify_projs:  # kaiming-uniform(a=sqrt(5)): weights and biases within 1/sqrt(fan_in)
        bound = 1 / proj.weight[0].numel() ** 0.5
        for t in (proj.weight, proj.bias):
            assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
    # A normal truncated at +-1 sigma has std sqrt(1 - 2 pdf(1) / (cdf(1) - cdf(-1))) sigma (~0.54 sigma).
    pdf1, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
    for token in model.mask_tokens:
        assert token.abs().max() <= 0.02 and _std_within(token, 0.02 * math.sqrt(1 - 2 * pdf1 / mass))


def test_timm_keyword_arguments_reach_the_encoder():
    model = SparK("resnet18", input_size=64, backend="reference", drop_path_rate=0.1)
    rates = [m.drop_prob for m in model.encoder.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)
    with pytest.raises(TypeError, match="drop_path_rate.*timm model name"):
        SparK(dense_encoder("resnet18"), drop_path_rate=0.1)
    with pytest.raises(TypeError, match="not_an_argument"):
        SparK("resnet18", not_an_argument=1)
    with pytest.raises(ValueError, match="features_only"):
        SparK("resnet18", features_only=False)


# -- bad input ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    return SparK("resnet18", input_size=64, backend="reference")


@pytest.mark.parametrize("images, message", [
    (torch.randn(3, 64, 64), "images"),
    (torch.randn(2, 1, 64, 64), "images"),
    (torch.randn(2, 3, 48, 64), "images"),
    (torch.randn(2, 3, 64, 80), "images"),
    (torch.randint(0, 255, (2, 3, 64, 64)), "images"),
    ("not a tensor", "images"),
])
def test_bad_images_raise_naming_the_argument(small_model, images, message):
    with pytest.raises((ValueError, TypeError), match=message):
        small_model(images)


@pytest.mark.parametrize("mask, error", [
    (torch.ones(2, 1, 3, 2, dtype=torch.bool), ValueError),
    (torch.ones(2, 2, 2, dtype=torch.bool), ValueError),
    (torch.ones(1, 1, 2, 2, dtype=torch.bool), ValueError),
    (torch.ones(2, 1, 2, 2), TypeError),
    (torch.ones(2, 1, 2, 2, dtype=torch.uint8), TypeError),
    ([[True]], TypeError),
])
def test_bad_mask_raises_naming_the_argument(small_model, mask, error):
    with pytest.raises(error, match="mask"):
        small_model(torch.randn(2, 3, 64, 64), mask)
    with pytest.raises(error, match="mask"):
        small_model.reconstruct(torch.randn(2, 3, 64, 64), mask)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, "0.6", True, float("nan")])
def test_bad_mask_ratio_raises(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        SparK(nn.Identity(), mask_ratio=ratio)


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_size=100), "input_size"),
    (dict(input_size=0), "input_size"),
    (dict(backend="gpu"), "backend"),
    (dict(decoder_width=48), "decoder_width must be a positive multiple of the encoder's downsample ratio 32"),
    (dict(decoder_width=0), "decoder_width"),
    (dict(decoder_width=256.0), "decoder_width"),
])
def test_bad_constructor_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparK("resnet18", **kwargs)


def test_decoder_width_halves_from_the_given_width_and_sizes_the_projections():
    model = SparK("resnet18", input_size=64, backend="reference", decoder_width=64)
    assert model.decoder.widths() == [64, 32, 16, 8, 4]
    assert [p.out_channels for p in model.densify_projs] == [64, 32, 16, 8]
    assert model.decoder.head.in_channels == 2
    loss = model(torch.randn(2, 3, 64, 64))
    loss.backward()
    assert torch.isfinite(loss) and model.decoder.head.weight.grad is not None
    assert SparK("resnet18", input_size=64, backend="reference").decoder.widths()[0] == 768


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dense_convs_after_the_encoder_run_in_the_devices_memory_format(backend):
    """On a CPU the densify projections and the decoder take NCHW inputs, whatever the encoder's layout (the
    fused encoder's is channels_last); GPUs get channels_last (spark/decoder.py: dense_memory_format)."""
    from spark.decoder import dense_memory_format
    assert dense_memory_format(torch.device("cuda")) == torch.channels_last
    model = SparK("resnet18", input_size=64, backend=backend, decoder_width=64)
    seen = []
    for m in [*model.densify_projs, *model.decoder.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    model(torch.randn(2, 3, 64, 64)).backward()
    assert len(seen) == 4 + 5 * 3 + 1 and all(seen)


class TinyEncoder(nn.Module):
    """A user encoder in timm features_only style: two maps at reductions 16 and 32."""

    def __init__(self, extra: nn.Module = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 4, stride=4), nn.BatchNorm2d(16), extra or nn.Identity(),
                                 nn.Conv2d(16, 16, 3, padding=1, groups=16))
        self.last = nn.Sequential(nn.Conv2d(16, 32, 2, stride=2), nn.BatchNorm2d(32))
        self.feature_info = [dict(num_chs=16, reduction=16), dict(num_chs=32, reduction=32)]

    def forward(self, x):
        a = self.mid(self.stem(x))
        return [a, self.last(a)]


@pytest.mark.parametrize("layer, type_name", [(nn.InstanceNorm2d(16), "InstanceNorm2d"), (nn.Sigmoid(), "Sigmoid"),
                                              (nn.Upsample(scale_factor=1), "Upsample")])
def test_unknown_layer_raises_naming_type_and_path(layer, type_name):
    with pytest.raises(UnsupportedLayerError, match=rf"mid\.2.*{type_name}"):
        SparK(TinyEncoder(layer), input_size=64)


def test_user_encoder_with_feature_info_trains():
    model = SparK(TinyEncoder(), input_size=64, backend="reference").to(DTYPE)
    assert model.feature_indices == [1, 0, None, None]  # levels at strides 32, 16, 8, 4
    loss = model(images_for(64, 64), patch_mask_for(64, 64))
    loss.backward()
    assert torch.isfinite(loss) and model.mask_tokens[1].grad is not None


def test_encoder_without_feature_info_raises():
    with pytest.raises(ValueError, match="feature_info"):
        SparK(nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_feature_info_without_reductions_raises():
    class ChannelsOnly(list):
        def channels(self):
            return [16, 32]

    encoder = TinyEncoder()
    encoder.feature_info = ChannelsOnly([16, 32])
    with pytest.raises(ValueError, match="feature_info"):
        SparK(encoder, input_size=64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_decoder_relu6_is_hardtanh_and_keeps_only_its_output(dtype):
    """The decoder's ReLU6 computes nn.ReLU6's values and gradients (also at 0 and 6, where the gradient is 0)
    and keeps one tensor for backward, its output, where nn.ReLU6(inplace=True) keeps a copy of its input too."""
    from spark.decoder import ReLU6
    x = torch.tensor([-1.0, 0.0, 0.5, 3.0, 6.0, 7.0], dtype=dtype).repeat(4)
    grad = torch.arange(1, x.numel() + 1, dtype=dtype)
    results = []
    for act in (ReLU6(), nn.ReLU6()):
        leaf = x.clone().requires_grad_()
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            y = act(leaf * 1)  # a non-leaf input, as in the decoder
        y.backward(grad)
        results.append((y.detach(), leaf.grad, kept, y))
    (y, g, kept, out), (y_ref, g_ref, _, _) = results
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    assert g[1] == 0 and g[4] == 0 and g[2] == grad[2]
    assert len(kept) == 1 and kept[0].data_ptr() == out.data_ptr()
