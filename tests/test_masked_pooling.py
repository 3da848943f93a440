"""Global pooling over active sites and the timm attention modules built on it (spark/masked_pooling.py),
against formulations written here from the definition: the mean over an image's active sites (sum /
count, 0 with none), the max over them (0 with none), the excitation as timm defines it on that vector."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers.eca import CecaModule, EcaModule
from timm.layers.gather_excite import GatherExcite
from timm.layers.mlp import ConvMlp
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
from timm.models._efficientnet_blocks import SqueezeExcite

import spark_kernels as sk
from spark import UnsupportedLayerError, sparse_encoder_
from spark.masked_pooling import MASKED_POOLING

from helpers import ATOL, RTOL, random_mask

F64 = torch.float64
FLAVOURS = [pytest.param(None, id="fused"), pytest.param("reference", id="reference")]
C, H, W = 16, 7, 6


def batch() -> tuple:
    """(x, mask): 3 images, the last without any active site; x is zero at inactive sites (as every
    layer of a converted encoder leaves it) and mostly negative, so a max over zeros would be wrong."""
    mask = random_mask(3, H, W, 0.6, seed=1)
    mask[2] = False
    x = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(2), dtype=F64) - 2
    return x * mask, mask


def global_by_hand(x: torch.Tensor, mask: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per image and channel, the mean or max over the active sites (0 with none), as (N, C, 1, 1)."""
    out = torch.zeros(x.shape[0], x.shape[1], 1, 1, dtype=x.dtype)
    for i in range(x.shape[0]):
        if mask[i].any():
            vals = x[i][:, mask[i, 0]]
            out[i, :, 0, 0] = vals.mean(1) if reduce == "mean" else vals.amax(1)
    return out


def mean_by_hand(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return global_by_hand(x, mask, "mean")


def max_by_hand(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return global_by_hand(x, mask, "max")


def window_by_hand(x, mask, k, stride, reduce):
    """Average (or max) over the active sites of each k x k window (stride, padding k // 2); 0 for none."""
    n, c, h, w = x.shape
    oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    out = torch.zeros(n, c, oh, ow, dtype=x.dtype)
    for i in range(n):
        for a in range(oh):
            for b in range(ow):
                r0, c0 = a * stride - k // 2, b * stride - k // 2
                rows = slice(max(r0, 0), min(r0 + k, h))
                cols = slice(max(c0, 0), min(c0 + k, w))
                sel = mask[i, 0, rows, cols]
                if sel.any():
                    vals = x[i, :, rows, cols][:, sel]
                    out[i, :, a, b] = vals.mean(1) if reduce == "mean" else vals.amax(1)
    return out


def randomized(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    module = module.to(F64)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def convert(module: nn.Module, backend) -> nn.Module:
    return sparse_encoder_(nn.Sequential(module), backend)[0]


def gather_excite(**kwargs) -> GatherExcite:
    """GatherExcite with its default 1x1-conv MLP, laid out as timm does (timm 1.0.31's constructor fails
    with use_mlp=True, passing its device/dtype dict positionally to ConvMlp)."""
    module = GatherExcite(C, use_mlp=False, **kwargs)
    module.mlp = ConvMlp(C, C // 4, act_layer=nn.ReLU)
    return module


def excite_se(m: SEModule, pooled):
    return m.gate(m.fc2(m.act(m.bn(m.fc1(pooled)))))


CASES = {
    "SEModule": (lambda: SEModule(C, rd_ratio=0.25), lambda m, x, k: excite_se(m, mean_by_hand(x, k))),
    "SEModule-maxpool": (lambda: SEModule(C, rd_ratio=0.25, add_maxpool=True),
                         lambda m, x, k: excite_se(m, 0.5 * mean_by_hand(x, k) + 0.5 * max_by_hand(x, k))),
    "EffectiveSEModule": (lambda: EffectiveSEModule(C), lambda m, x, k: m.gate(m.fc(mean_by_hand(x, k)))),
    "SqueezeExcite": (lambda: SqueezeExcite(C, act_layer=nn.SiLU),
                      lambda m, x, k: m.gate(m.conv_expand(m.act1(m.conv_reduce(mean_by_hand(x, k)))))),
    "EcaModule": (lambda: EcaModule(C),
                  lambda m, x, k: m.gate(m.conv(mean_by_hand(x, k).view(3, 1, C))).view(3, C, 1, 1)),
    "EcaModule-mlp": (lambda: EcaModule(C, use_mlp=True),
                      lambda m, x, k: m.gate(m.conv2(m.act(m.conv(mean_by_hand(x, k).view(3, 1, C))))).view(3, C, 1, 1)),
    "CecaModule": (lambda: CecaModule(C),
                   lambda m, x, k: m.gate(m.conv(F.pad(mean_by_hand(x, k).view(3, 1, C), (m.padding,) * 2,
                                                       mode="circular"))).view(3, C, 1, 1)),
    "GatherExcite-global": (lambda: gather_excite(add_maxpool=True),
                            lambda m, x, k: m.gate(m.mlp(0.5 * mean_by_hand(x, k) + 0.5 * max_by_hand(x, k)))),
    "GatherExcite-extent2": (
        lambda: gather_excite(extent=2, add_maxpool=True),
        lambda m, x, k: m.gate(F.interpolate(m.mlp(0.5 * window_by_hand(x, k, 3, 2, "mean")
                                                   + 0.5 * window_by_hand(x, k, 3, 2, "max")), size=(H, W)))),
}


@pytest.mark.parametrize("backend", FLAVOURS)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_equals_definition_over_active_sites(case, backend):
    build, excite = CASES[case]
    module = randomized(build())
    dense_type, keys = type(module), list(module.state_dict())
    x, mask = batch()
    expected = x * excite(module, x, mask)
    x = x.clone().requires_grad_()
    converted = convert(module, backend)
    assert type(converted) is MASKED_POOLING[dense_type] and converted is module
    assert list(converted.state_dict()) == keys
    with sk.active(sk.ActiveSites(mask)):
        got = converted(x)
    torch.testing.assert_close(got, expected, rtol=RTOL[F64], atol=ATOL[F64])
    assert not got[~mask.expand_as(got)].any()
    got.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", FLAVOURS)
@pytest.mark.parametrize("pool, by_hand", [((nn.AdaptiveAvgPool2d, 1), mean_by_hand),
                                           ((nn.AdaptiveAvgPool2d, (1, 1)), mean_by_hand),
                                           ((nn.AdaptiveMaxPool2d, 1), max_by_hand)], ids=["avg", "avg11", "max"])
def test_global_pooling_over_active_sites(pool, by_hand, backend):
    x, mask = batch()
    converted = convert(pool[0](pool[1]), backend)
    with sk.active(sk.ActiveSites(mask)):
        got = converted(x)
    torch.testing.assert_close(got, by_hand(x, mask), rtol=RTOL[F64], atol=ATOL[F64])
    assert not got[2].any()  # no active site: 0


def learned_gather_excite() -> GatherExcite:
    """GatherExcite(extra_params=True) as timm lays it out."""
    module = gather_excite(extent=2)
    module.gather = nn.Sequential(nn.Conv2d(C, C, 3, stride=2, padding=1, groups=C), nn.BatchNorm2d(C))
    return module


@pytest.mark.parametrize("build, reason", [
    (lambda: nn.AdaptiveAvgPool2d(2), "output_size 2"),
    (lambda: nn.AdaptiveMaxPool2d(1, return_indices=True), "return_indices"),
    (learned_gather_excite, "learned gather convs"),
], ids=["adaptive-2", "indices", "learned-gather"])
def test_pooling_without_defined_active_sites_raises(build, reason):
    with pytest.raises(UnsupportedLayerError, match=rf"'0'.*{reason}"):
        convert(build(), None)
