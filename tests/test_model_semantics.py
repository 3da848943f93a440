"""SparK's model-level semantics against formulations written here from the definition.

The parity tests of test_model.py compare the fused model with the masked-dense reference model, so
they cannot see a bug in code both run: mask resolution and upsampling, densify (norm -> mask token ->
projection), patchify and the loss, reconstruction. These tests recompute each of those by hand, on
every backend that runs CPU tensors, with small encoders (fast enough for the mutation run,
scripts/mutate.py).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from timm.layers import LayerNorm2d

import spark_kernels as sk
from spark import SparK

from helpers import ATOL, RTOL, cpu_tensor_backends

F64 = torch.float64
BACKENDS = cpu_tensor_backends()
PATCH = 32
# One image with a 2 x 3 patch grid (64 x 96 pixels): the hand-computed cases below refer to its patches.
HAND_MASK = torch.tensor([[[[True, False, False], [False, True, True]]]])


class PyramidEncoder(nn.Module):
    """timm features_only style: feature maps of widths 12, 24, 48 at reductions 8, 16, 32, normalized
    by BatchNorm (norm="bn") or channels-first LayerNorm (norm="ln")."""

    def __init__(self, norm: str = "bn"):
        super().__init__()

        def block(c_in, c_out, k):
            layer_norm = LayerNorm2d(c_out, eps=1e-6) if norm == "ln" else nn.BatchNorm2d(c_out)
            return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=k), layer_norm, nn.ReLU())

        self.s8, self.s16, self.s32 = block(3, 12, 8), block(12, 24, 2), block(24, 48, 2)
        self.feature_info = [dict(num_chs=12, reduction=8), dict(num_chs=24, reduction=16),
                             dict(num_chs=48, reduction=32)]

    def forward(self, x):
        a = self.s8(x)
        b = self.s16(a)
        return [a, b, self.s32(b)]


class RecordingDecoder(nn.Module):
    """Stands in for SparK's 768-wide decoder (the slow part of these tests, and not what they check):
    records its inputs and returns fixed pseudo-random pixels, connected to every input feature."""

    def __init__(self, ratio: int):
        super().__init__()
        self.ratio = ratio
        self.inputs = []

    def forward(self, features):
        self.inputs.append(features)
        deepest = features[0]
        b, _, h, w = deepest.shape
        g = torch.Generator().manual_seed(h * 1000 + w)
        out = torch.randn(b, 3, h * self.ratio, w * self.ratio, generator=g, dtype=deepest.dtype)
        return out + sum(f.sum() for f in features if f is not None) * 0


@functools.lru_cache(maxsize=None)
def _built_model(backend: str, norm: str) -> SparK:
    torch.manual_seed(0)
    model = SparK(PyramidEncoder(norm), input_size=64, backend=backend).to(F64)
    model.decoder = RecordingDecoder(model.downsample_ratio)  # built once: SparK builds the real one
    return model


def make_model(backend: str, norm: str = "bn") -> SparK:
    model = copy.deepcopy(_built_model(backend, norm))
    with torch.no_grad():  # distinct, recognisable tokens and non-trivial densify norm parameters
        for i, token in enumerate(model.mask_tokens):
            token.copy_(100.0 * (i + 1) + torch.arange(token.shape[1], dtype=F64).reshape(token.shape))
        for norm_layer in model.densify_norms:
            norm_layer.weight.normal_()
            norm_layer.bias.normal_()
    return model


def images_for(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g, dtype=F64) * 2 + 0.5


def blow_up(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upsampling by `factor`, written as a Kronecker product with a block of ones."""
    return torch.kron(mask.to(torch.int64), torch.ones(1, 1, factor, factor, dtype=torch.int64)).bool()


def capture(module: nn.Module, pre: bool = False):
    """Record the inputs (pre=True) or the output of every call of module."""
    seen = []
    if pre:
        module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        module.register_forward_hook(lambda m, args, out: seen.append(out))
    return seen


def norm_by_hand(f: torch.Tensor, visible: torch.Tensor, norm: nn.Module, kind: str) -> torch.Tensor:
    """Densify's norm from the definition, at every site (the caller keeps the visible ones).
    bn: per channel over the visible sites, biased variance; ln: per site over channels."""
    if kind == "bn":
        values = f.permute(1, 0, 2, 3)[:, visible[:, 0]]  # (C, visible sites)
        mean = values.mean(1)
        var = ((values - mean[:, None]) ** 2).mean(1)
        normed = (f - mean[:, None, None]) / (var[:, None, None] + norm.eps).sqrt()
    else:
        mean = f.mean(1, keepdim=True)
        var = ((f - mean) ** 2).mean(1, keepdim=True)
        normed = (f - mean) / (var + norm.eps).sqrt()
    return normed * norm.weight[:, None, None] + norm.bias[:, None, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_token_at_masked_sites_features_at_visible_sites(backend):
    """Hand case on HAND_MASK: what reaches each densify projection holds the level's mask token at
    masked sites and the normalized feature at visible ones (a swapped torch.where fails here)."""
    model = make_model(backend)
    proj_inputs = [capture(p, pre=True) for p in model.densify_projs]
    norm_outputs = [capture(n) for n in model.densify_norms]
    model(images_for(1, 64, 96), HAND_MASK)
    for level, (token, seen_in, seen_norm) in enumerate(zip(model.mask_tokens, proj_inputs, norm_outputs)):
        f, normed = seen_in[0], seen_norm[0]
        factor = f.shape[-1] // 3
        visible = blow_up(HAND_MASK, factor).expand_as(f)
        tokens = token.expand_as(f)
        assert torch.equal(f[~visible], tokens[~visible]), f"level {level}: token missing at masked sites"
        assert torch.equal(f[visible], normed[visible]), f"level {level}: features missing at visible sites"
        assert not bool((f[visible] == tokens[visible]).any()), f"level {level}: token at a visible site"
        # Patch (0, 1) is masked and patch (0, 0) visible: their top-left sites at this level.
        assert torch.equal(f[0, :, 0, factor], token[0, :, 0, 0])
        assert torch.equal(f[0, :, 0, 0], normed[0, :, 0, 0])


@pytest.mark.parametrize("norm", ["bn", "ln"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_densify_equals_definition(backend, norm):
    """Each decoder input (deepest first) = projection(norm over visible sites, then mask tokens at
    masked sites), computed here from the encoder's features with plain tensor arithmetic."""
    model = make_model(backend, norm)
    features = capture(model.encoder)
    mask = torch.tensor([[[[True, False, True], [False, False, True]]],
                         [[[False, True, True], [True, False, False]]]])
    model(images_for(2, 64, 96, seed=1), mask)
    encoder_out, got = features[0], model.decoder.inputs[0]
    # Levels at strides 32, 16, 8, 4: the PyramidEncoder's maps deepest first, none at stride 4.
    assert [None if g is None else tuple(g.shape) for g in got] == \
        [(2, 768, 2, 3), (2, 384, 4, 6), (2, 192, 8, 12), None]
    for level, f in enumerate(reversed(encoder_out)):
        visible = blow_up(mask, f.shape[-1] // 3)
        normed = norm_by_hand(f, visible, model.densify_norms[level], norm)
        token = model.mask_tokens[level]
        filled = normed * visible + token * (~visible)
        proj = model.densify_projs[level]
        expected = nn.functional.conv2d(filled, proj.weight, proj.bias, padding=proj.kernel_size[0] // 2)
        torch.testing.assert_close(got[level], expected, rtol=RTOL[F64], atol=ATOL[F64],
                                   msg=lambda m: f"level {level}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_sees_images_masked_by_the_patch_mask(backend):
    """The encoder gets images x (patch mask blown up to pixels), and the active sites at every scale
    are the patch mask blown up to that scale."""
    model = make_model(backend)
    mask = torch.tensor([[[[True, False, True], [False, False, True]]],
                         [[[False, True, False], [True, True, False]]]])
    images = images_for(2, 64, 96, seed=2)
    seen = []

    def check_sites(module, args):
        seen.append(args[0])
        sites = sk.current_sites()
        for factor in (32, 16, 8, 1):
            assert torch.equal(sites.at(2 * 32 // factor, 3 * 32 // factor).mask, blow_up(mask, 32 // factor))

    model.encoder.register_forward_pre_hook(check_sites)
    model(images, mask)
    assert torch.equal(seen[0], images * blow_up(mask, PATCH))


def loss_by_hand(decoded: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over masked patches of the per-patch MSE against the patch's pixels normalized by their mean
    and unbiased variance (+ 1e-6); sum / (count + 1e-8)."""
    total, count = 0.0, 0
    for b in range(images.shape[0]):
        for i in range(mask.shape[2]):
            for j in range(mask.shape[3]):
                if mask[b, 0, i, j]:
                    continue
                window = (b, slice(None), slice(PATCH * i, PATCH * i + PATCH), slice(PATCH * j, PATCH * j + PATCH))
                patch = images[window]
                n = patch.numel()
                mean = patch.sum() / n
                var = ((patch - mean) ** 2).sum() / (n - 1)
                target = (patch - mean) / (var + 1e-6).sqrt()
                total += ((decoded[window] - target) ** 2).sum().item() / n
                count += 1
    return total / (count + 1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_equals_definition_on_a_non_square_grid(backend):
    """A 2 x 3 grid (rows and columns of patches cannot be confused) and a masked patch of pixel
    variance ~1e-6, where eps = 1e-6 and the unbiased variance both matter."""
    model = make_model(backend)
    decoded = capture(model.decoder)
    images = images_for(2, 64, 96, seed=3)
    images[1, :, 32:, :32] = images[1, :, 32:, :32] * 1e-3 + 0.25
    mask = torch.tensor([[[[True, False, False], [True, True, False]]],
                         [[[False, True, True], [False, True, False]]]])
    loss = model(images, mask)
    expected = loss_by_hand(decoded[0], images, mask)
    assert abs(loss.item() - expected) <= 1e-12 * abs(expected), (loss.item(), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reconstruct_equals_definition(backend):
    """Masked patches: the decoder output de-normalized with the patch's own mean and unbiased std;
    visible patches: the input pixels; masked images: zeros in masked patches."""
    model = make_model(backend).eval()
    decoded = capture(model.decoder)
    images = images_for(1, 64, 96, seed=4)
    inp, masked_images, rec = model.reconstruct(images, HAND_MASK)
    out = decoded[0]
    assert torch.equal(inp, images)
    for i in range(2):
        for j in range(3):
            window = (0, slice(None), slice(PATCH * i, PATCH * i + PATCH), slice(PATCH * j, PATCH * j + PATCH))
            patch = images[window]
            if HAND_MASK[0, 0, i, j]:
                assert torch.equal(rec[window], patch) and torch.equal(masked_images[window], patch)
            else:
                n = patch.numel()
                std = (((patch - patch.mean()) ** 2).sum() / (n - 1) + 1e-6).sqrt()
                torch.testing.assert_close(rec[window], out[window] * std + patch.mean(), rtol=RTOL[F64],
                                           atol=ATOL[F64])
                assert bool((masked_images[window] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_mask_is_a_patch_mask_with_the_visible_count(backend):
    """mask=None draws round(L * (1 - mask_ratio)) visible patches per image (here L = 6, ratio 0.6:
    round(2.4) = 2) and masks whole 32 x 32 patches of the input."""
    model = make_model(backend)
    seen = capture(model.encoder, pre=True)
    images = images_for(3, 64, 96, seed=5).abs() + 1  # no zero pixel: a zero in the input means masked
    model(images)
    visible = seen[0] != 0
    patches = visible.reshape(3, 3, 2, PATCH, 3, PATCH)
    per_patch = patches.all(5).all(3).all(1)
    assert torch.equal(per_patch, patches.any(5).any(3).any(1)), "a patch is partly masked"
    assert per_patch.flatten(1).sum(1).tolist() == [2, 2, 2]
