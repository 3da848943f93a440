"""The model-family table (spark/families.py): names resolve, every support-matrix model belongs to its own
family, the reviewed blocks and conv -> norm pairs name real timm classes and children."""
from __future__ import annotations

import importlib

import pytest
import timm

from spark.families import FAMILIES, build_test_model, family_of, matrix_models


def resolve(qualname: str) -> type:
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_matrix_model_is_matched_by_its_family_only(family):
    for name in family.matrix:
        assert [f.name for f in FAMILIES if f.matches(name)] == [family.name], name
        assert family_of(name.upper() + ".a1_in1k") is family


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_reviewed_blocks_and_pairs_name_real_classes(family):
    for qualname in family.containers + tuple(family.conv_then_norm):
        assert isinstance(resolve(qualname), type), qualname


def test_conv_then_norm_pairs_name_children_of_the_matrix_models():
    """Every pair is found in at least one block of a matrix model (a misspelt child would silently keep a
    mask the fused flavour could skip)."""
    seen = set()
    for name in matrix_models():
        model = build_test_model(name)
        for module in model.modules():
            qualname = f"{type(module).__module__}.{type(module).__qualname__}"
            for family in FAMILIES:
                for conv, norm in family.conv_then_norm.get(qualname, ()):
                    if hasattr(module, conv) and hasattr(module, norm):
                        seen.add((qualname, conv, norm))
    declared = {(q, c, n) for f in FAMILIES for q, pairs in f.conv_then_norm.items() for c, n in pairs}
    # conv_s2d / bn_s2d exist only in InvertedResidual blocks built with a space-to-depth stem.
    missing = {p for p in declared - seen if p[1] != "conv_s2d"}
    assert not missing


def test_unknown_model_has_no_family():
    assert family_of("vgg11") is None


def test_bench_stages_are_spark_scales_of_their_model():
    """The op-benchmark shapes: a SparK patch covers 32 / stride pixels at each stage, and where the stages are
    feature maps (ConvNeXt-T, ResNet-50; EfficientNet-B0's are depthwise-conv inputs) they are the model's."""
    from spark.families import bench_stages
    stages = bench_stages()
    assert {"convnext_tiny", "resnet50", "efficientnet_b0"} <= set(stages)
    for name, shapes in stages.items():
        for channels, size, patch in shapes:
            assert 224 % size == 0 and patch * 224 == 32 * size, (name, channels, size, patch)
    for name in ("convnext_tiny", "resnet50"):
        info = timm.create_model(name, features_only=True, pretrained=False).feature_info
        maps = {(c, 224 // r) for c, r in zip(info.channels(), info.reduction())}
        assert set((c, s) for c, s, _ in stages[name]) <= maps, name
