"""The support matrix (spark/families.py): every listed timm model converts with no code change, and its
fused sparse encoder matches the masked-dense reference encoder in float64 (eval mode): the loss (a fixed
random projection of every feature map) and the gradient of every parameter; both leave exact zeros at
inactive sites."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import spark_kernels as sk
from spark import UnsupportedLayerError, sparse_encoder_
from spark.families import build_test_model, matrix_models
from spark.sparse_encoder import execution_report
from spark_kernels.masks import upsample_mask

from helpers import ATOL, MODEL_GRAD_RTOL, RTOL, patch_mask_with_both

DTYPE = torch.float64
MATRIX = matrix_models()


def encoder_pair(name: str):
    """(fused, reference) sparse encoders of the model's small test configuration, identical weights."""
    torch.manual_seed(0)
    dense = build_test_model(name).to(DTYPE)
    with torch.no_grad():  # timm initializes norms to weight 1, bias 0, running stats 0 / 1: randomize them
        for module in dense.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    # Eval mode: BatchNorms use their running statistics. Batch statistics over the few active sites of a
    # 32 x 64 image pair at stride 32 amplify float64 rounding beyond the tolerance (the masked BN's training
    # path is compared with the reference in the op tests and in test_model's SparK parity).
    dense.eval()
    reference = sparse_encoder_(copy.deepcopy(dense), "reference")
    return sparse_encoder_(dense), reference


def projection_loss(features, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in features)


@pytest.mark.parametrize("name", list(MATRIX))
def test_fused_encoder_matches_reference(name):
    h, w = MATRIX[name].test_size
    fused, reference = encoder_pair(name)
    mask = patch_mask_with_both(2, h // 32, w // 32, seed=1)
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    images = images * upsample_mask(mask, h, w)
    sites = sk.ActiveSites(mask)
    losses = {}
    for label, encoder in (("fused", fused), ("reference", reference)):
        with sk.active(sites):
            features = encoder(images.contiguous(memory_format=torch.channels_last) if label == "fused" else images)
        for i, f in enumerate(features):
            inactive = ~sites.at(*f.shape[-2:]).mask.expand_as(f)
            assert not f[inactive].any(), f"{label} feature map {i}: nonzero at inactive sites"
        losses[label] = projection_loss(features)
        losses[label].backward()
    torch.testing.assert_close(losses["fused"], losses["reference"], rtol=RTOL[DTYPE], atol=ATOL[DTYPE])
    ref_params = dict(reference.named_parameters())
    assert [n for n, _ in fused.named_parameters()] == list(ref_params)
    floor = max(p.grad.abs().max().item() for p in ref_params.values()) * 1e-6
    for pname, p in fused.named_parameters():
        q = ref_params[pname]
        assert p.grad is not None and q.grad is not None, f"{pname}: missing gradient"
        err = (p.grad - q.grad).abs().max().item()
        scale = max(q.grad.abs().max().item(), floor)
        assert err <= MODEL_GRAD_RTOL[DTYPE] * scale, f"{pname}: gradient differs by {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("name", list(MATRIX))
def test_state_dict_keys_unchanged_and_norms_fused(name):
    dense = build_test_model(name)
    keys = list(dense.state_dict())
    reference = sparse_encoder_(copy.deepcopy(dense), "reference")
    fused = sparse_encoder_(dense)
    assert list(fused.state_dict()) == keys == list(reference.state_dict())
    assert execution_report(reference)["fused"] == {}
    assert not {"BatchNorm", "LayerNorm", "GroupNorm"} & set(execution_report(fused)["masked-dense"])


def test_timm_block_with_unseen_global_pooling_raises():
    """SKNet's selective-kernel block averages its branches over the whole map inside its own forward: the
    converter cannot see that pool, so the block is refused rather than run dense."""
    dense = timm.create_model("skresnet18", features_only=True, pretrained=False)
    with pytest.raises(UnsupportedLayerError, match=r"'layer1\.0' of type timm\.models\.sknet\.SelectiveKernelBasic"):
        sparse_encoder_(dense)
