"""The sparse-encoder converter: which layer each dense layer becomes, and converted encoders against
masked-dense formulations written here from the definition (code the fused and the reference flavour
share, e.g. the scale each layer picks from the active sites, cannot be checked by comparing them)."""
from __future__ import annotations

import collections

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import LayerNorm2d
from timm.models.convnext import ConvNeXtBlock

import spark_kernels as sk
from spark import sparse_encoder_
from spark.sparse_encoder import MaskedConv2d, MaskedDenseMlp, SparseConvNeXtBlock
from spark_kernels.nn import MaskedLayerNorm

from helpers import ATOL, RTOL, cpu_tensor_backends, random_mask

F64 = torch.float64
BACKENDS = cpu_tensor_backends()
FLAVOURS = [pytest.param(None, id="fused"), pytest.param("reference", id="reference")]


def layer_census(encoder: nn.Module) -> dict:
    """How many layers of each converted kind, masked convs split by their flags."""
    counts = collections.Counter()
    for module in encoder.modules():
        kind = type(module).__name__
        if isinstance(module, MaskedConv2d):
            kind += f"(mask_output={module.mask_output}, in_place={module.in_place})"
        elif isinstance(module, MaskedLayerNorm):
            kind += f"({module.data_format})"
        if kind.startswith(("Masked", "Sparse")) or kind == "ConvNeXtBlock":
            counts[kind] += 1
    return dict(counts)


def masked_conv(fused: bool, mask_output: bool) -> str:
    return f"MaskedConv2d(mask_output={mask_output}, in_place={fused})"


# Expected by architecture. ResNet-18: stem conv + 8 BasicBlocks x 2 convs + 3 downsample convs, each
# followed by its BN; ResNet-50: stem + 16 Bottlenecks x 3 + 4 downsample convs. MobileNetV2 (features):
# stem, the first block's depthwise (stride 1) and pointwise convs, then 16 inverted residuals with a
# pointwise, a depthwise (4 of stride 2, sparse too) and a linear pointwise conv, each followed by a BN + act.
# ConvNeXt-atto: stem conv + LayerNorm2d, 3 downsample convs after a LayerNorm2d (nothing normalizes their
# output inside the downsample container), 12 blocks with a 7x7 depthwise conv and a LayerNorm2d (1x1-conv
# MLP; with conv_mlp=False the block's LayerNorm is channels_last).
def expected_census(name: str, fused: bool) -> dict:
    skip = fused  # the fused flavour skips a conv's mask when a masked norm consumes it directly
    if name in ("resnet18", "resnet50"):
        convs = 1 + 8 * 2 + 3 if name == "resnet18" else 1 + 16 * 3 + 4
        return {masked_conv(fused, not skip): convs, "MaskedBatchNorm2d": convs, "MaskedMaxPool2d": 1}
    if name == "mobilenetv2_100":
        return {masked_conv(fused, not skip): 1 + 1 + 16 * 2, "SparseDepthwiseConv2d": 1 + 16,
                "MaskedBatchNormAct2d": 1 + 2 + 16 * 3}
    block_norm = "channels_first" if name == "convnext_atto" else "channels_last"
    census = collections.Counter({masked_conv(fused, not skip): 1, "SparseDepthwiseConv2d": 12,
                                  "MaskedLayerNorm(channels_first)": 1 + 3})
    census.update({masked_conv(fused, True): 3, f"MaskedLayerNorm({block_norm})": 12})
    census.update({"SparseConvNeXtBlock": 12} if fused else {"ConvNeXtBlock": 12, "MaskedDenseMlp": 12})
    return dict(census)


@pytest.mark.parametrize("backend", FLAVOURS)
@pytest.mark.parametrize("name, kwargs", [("resnet18", {}), ("resnet50", {}), ("mobilenetv2_100", {}),
                                          ("convnext_atto", {}), ("convnext_atto_cl", dict(conv_mlp=False))])
def test_layer_choice_per_architecture(name, kwargs, backend):
    model_name = name.replace("_cl", "")
    encoder = sparse_encoder_(timm.create_model(model_name, features_only=True, pretrained=False, **kwargs), backend)
    expected = expected_census(name, fused=backend is None)
    assert layer_census(encoder) == {k: v for k, v in expected.items() if v}


@pytest.mark.parametrize("backend", FLAVOURS)
def test_mask_after_a_conv_is_skipped_only_before_a_masked_norm(backend):
    encoder = sparse_encoder_(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),  # skipped (fused)
        nn.Conv2d(8, 8, 1), nn.ReLU(), nn.BatchNorm2d(8),  # kept: the ReLU reads it
        nn.Conv2d(8, 8, 1), LayerNorm2d(8),  # skipped (fused)
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise 3x3: a sparse conv
        nn.Conv2d(8, 8, 3, padding=2, groups=8, dilation=2),  # dilated: masked dense
        nn.Conv2d(8, 8, 1)), backend)  # last: kept
    fused = backend is None
    assert [m.mask_output for m in encoder if isinstance(m, MaskedConv2d)] == [not fused, True, not fused, True, True]
    assert [m.in_place for m in encoder if isinstance(m, MaskedConv2d)] == [fused] * 5
    assert type(encoder[7]).__name__ == "SparseDepthwiseConv2d" and encoder[7].backend == backend


# -- converted encoders against masked-dense formulations written here -----------------------------------

def any_child(mask: torch.Tensor) -> torch.Tensor:
    """The next coarser scale of a (N, 1, H, W) mask: a site is active if any of its 2 x 2 children is."""
    n, _, h, w = mask.shape
    return mask.reshape(n, 1, h // 2, 2, w // 2, 2).any(5).any(3)


def batch_norm_by_hand(x: torch.Tensor, mask: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """Training-mode BN over the active sites (biased variance), zeros elsewhere."""
    values = x.permute(1, 0, 2, 3)[:, mask[:, 0]]
    mean = values.mean(1)[:, None, None]
    var = ((values - values.mean(1, keepdim=True)) ** 2).mean(1)[:, None, None]
    y = (x - mean) / (var + bn.eps).sqrt() * bn.weight[:, None, None] + bn.bias[:, None, None]
    return y * mask


def strided_encoder() -> nn.Sequential:
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # 1/2
        nn.MaxPool2d(3, 2, 1),  # 1/4
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 2, stride=2), nn.ReLU()).to(F64)  # 1/8
    with torch.no_grad():
        for bn in (encoder[1], encoder[5]):
            bn.weight.normal_()
            bn.bias.normal_()
    return encoder


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_mask_scales_are_any_child_active(backend):
    """Run with a pixel-level mask that no patch grid aligns with, every strided layer must take the
    ActiveSites.downsample scale: a coarse site is active if any of its children is."""
    encoder = strided_encoder()
    conv1, bn1, _, pool, dw, bn2, conv3, _ = encoder
    mask = random_mask(2, 16, 16, 0.5, seed=3)
    mask[:, :, :, 8:] = False  # the right half masked: the coarsest scale has inactive sites too
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=F64)
    m1 = any_child(mask)
    m2 = any_child(m1)
    m3 = any_child(m2)
    assert not torch.equal(m1, mask[:, :, ::2, ::2]) and not bool(m3.all()) and bool(m3.any())
    a = torch.relu(batch_norm_by_hand(F.conv2d(images * mask, conv1.weight, None, 2, 1) * m1, m1, bn1))
    p = F.max_pool2d(a, 3, 2, 1) * m2
    d = batch_norm_by_hand(F.conv2d(p, dw.weight, dw.bias, 1, 1, groups=8) * m2, m2, bn2)
    expected = torch.relu(F.conv2d(d, conv3.weight, conv3.bias, 2) * m3)

    sparse = sparse_encoder_(encoder, backend)
    with sk.active(sk.ActiveSites(mask)):
        got = sparse(images * mask)
    torch.testing.assert_close(got, expected, rtol=RTOL[F64], atol=ATOL[F64])


@pytest.mark.parametrize("conv_mlp", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_convnext_block_equals_definition(backend, conv_mlp):
    """dwconv 7x7 over active sites -> LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> layer scale,
    masked, + residual; written densely with plain ops (fused and reference flavours both)."""
    torch.manual_seed(0)
    block = ConvNeXtBlock(8, conv_mlp=conv_mlp, ls_init_value=0.5).to(F64)
    with torch.no_grad():
        block.gamma.normal_()
        block.norm.weight.normal_()
        block.norm.bias.normal_()
    mask = random_mask(2, 7, 6, 0.5, seed=5)
    x = torch.randn(2, 8, 7, 6, generator=torch.Generator().manual_seed(6), dtype=F64) * mask

    dw = F.conv2d(x, block.conv_dw.weight, block.conv_dw.bias, padding=3, groups=8) * mask
    rows = dw.permute(0, 2, 3, 1)
    mean = rows.mean(-1, keepdim=True)
    rows = (rows - mean) / (((rows - mean) ** 2).mean(-1, keepdim=True) + block.norm.eps).sqrt()
    rows = rows * block.norm.weight + block.norm.bias
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    hidden = F.gelu(rows @ fc1.weight.reshape(32, 8).T + fc1.bias)
    branch = (hidden @ fc2.weight.reshape(8, 32).T + fc2.bias) * block.gamma
    expected = x + branch.permute(0, 3, 1, 2) * mask

    sparse = sparse_encoder_(nn.Sequential(block), None if backend == "cpu" else "reference")
    expected_type = SparseConvNeXtBlock if backend == "cpu" else ConvNeXtBlock
    assert type(sparse[0]) is expected_type
    if expected_type is ConvNeXtBlock:
        assert type(sparse[0].mlp) is MaskedDenseMlp
    with sk.active(sk.ActiveSites(mask)):
        got = sparse(x)
    torch.testing.assert_close(got, expected, rtol=RTOL[F64], atol=ATOL[F64])


@pytest.mark.parametrize("conv_mlp", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_convnextv2_block_grn_over_active_sites(backend, conv_mlp):
    """ConvNeXt-V2: the MLP's GRN takes each channel's L2 norm over the image's active sites only (ConvNeXt-V2's
    sparse FCMAE encoder); an image without active sites stays zero and gets finite gradients."""
    torch.manual_seed(0)
    block = ConvNeXtBlock(8, conv_mlp=conv_mlp, use_grn=True, ls_init_value=None).to(F64)
    with torch.no_grad():
        block.mlp.grn.weight.normal_()
        block.mlp.grn.bias.normal_()
    mask = random_mask(3, 7, 6, 0.5, seed=5)
    mask[2] = False
    x = torch.randn(3, 8, 7, 6, generator=torch.Generator().manual_seed(6), dtype=F64) * mask

    dw = F.conv2d(x, block.conv_dw.weight, block.conv_dw.bias, padding=3, groups=8) * mask
    rows = dw.permute(0, 2, 3, 1)
    rows = F.layer_norm(rows, (8,), block.norm.weight, block.norm.bias, block.norm.eps)
    fc1, fc2, grn = block.mlp.fc1, block.mlp.fc2, block.mlp.grn
    hidden = F.gelu(rows @ fc1.weight.reshape(32, 8).T + fc1.bias)  # (N, H, W, 32)
    active = mask.permute(0, 2, 3, 1)
    norm = torch.stack([hidden[i][active[i, ..., 0]].square().sum(0).sqrt() for i in range(3)])  # (N, 32)
    scale = (norm / (norm.mean(1, keepdim=True) + grn.eps))[:, None, None, :]
    hidden = hidden + grn.bias + grn.weight * hidden * scale
    branch = hidden @ fc2.weight.reshape(8, 32).T + fc2.bias
    expected = x + branch.permute(0, 3, 1, 2) * mask

    sparse = sparse_encoder_(nn.Sequential(block), None if backend == "cpu" else "reference")
    assert type(sparse[0]) is (SparseConvNeXtBlock if backend == "cpu" else ConvNeXtBlock)
    x = x.clone().requires_grad_()
    with sk.active(sk.ActiveSites(mask)):
        got = sparse(x)
    torch.testing.assert_close(got, expected, rtol=RTOL[F64], atol=ATOL[F64])
    got.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def group_norm_by_hand(x: torch.Tensor, mask: torch.Tensor, gn: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm with mean and biased variance per (image, group) over the active sites, zeros elsewhere."""
    n, c, h, w = x.shape
    y = torch.zeros_like(x)
    for i in range(n):
        for g in range(gn.num_groups):
            chans = slice(g * c // gn.num_groups, (g + 1) * c // gn.num_groups)
            values = x[i, chans][:, mask[i, 0]]
            if values.numel():
                y[i, chans] = (x[i, chans] - values.mean()) / (values.var(unbiased=False) + gn.eps).sqrt()
    return (y * gn.weight[:, None, None] + gn.bias[:, None, None]) * mask


@pytest.mark.parametrize("backend", FLAVOURS)
def test_group_norm_variants_over_active_sites(backend):
    """nn.GroupNorm and timm's GroupNorm, GroupNorm1 and GroupNormAct (act kept) become masked group norms
    with their state_dict keys; a conv feeding one directly skips its mask in the fused flavour."""
    from timm.layers import GroupNorm, GroupNorm1
    from timm.layers.norm_act import GroupNormAct
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), GroupNormAct(8, 4, act_layer=nn.ReLU),
                            GroupNorm(8, num_groups=2), nn.Conv2d(8, 8, 1), GroupNorm1(8), nn.GroupNorm(4, 8)).to(F64)
    with torch.no_grad():
        for gn in list(encoder)[1:3] + list(encoder)[4:]:
            gn.weight.normal_()
            gn.bias.normal_()
    keys = list(encoder.state_dict())
    mask = random_mask(2, 6, 5, 0.5, seed=7)
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(8), dtype=F64) * mask
    conv1, gn_act, gn, conv2, gn1, plain = encoder
    y = torch.relu(group_norm_by_hand(F.conv2d(x, conv1.weight, conv1.bias, padding=1) * mask, mask, gn_act))
    y = group_norm_by_hand(y, mask, gn)
    y = group_norm_by_hand(F.conv2d(y, conv2.weight, conv2.bias) * mask, mask, gn1)
    expected = group_norm_by_hand(y, mask, plain)

    sparse = sparse_encoder_(encoder, backend)
    assert list(sparse.state_dict()) == keys
    assert [type(m).__name__ for m in sparse] == ["MaskedConv2d", "MaskedGroupNormAct", "MaskedGroupNorm",
                                                  "MaskedConv2d", "MaskedGroupNorm", "MaskedGroupNorm"]
    assert type(sparse[1].act) is nn.ReLU
    assert [sparse[0].mask_output, sparse[3].mask_output] == [backend is not None] * 2
    with sk.active(sk.ActiveSites(mask)):
        got = sparse(x)
    torch.testing.assert_close(got, expected, rtol=RTOL[F64], atol=ATOL[F64])
