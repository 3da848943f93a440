"""Per-model recipe defaults (spark/recipe.py): the official pretraining values, and who uses them."""
from __future__ import annotations

import pytest
from torch import nn

from spark.recipe import CONVNEXT_BETAS, RESNET_BETAS, recipe_for
from spark.schedule import build_optimizer


@pytest.mark.parametrize("name, rate", [
    ("resnet50", 0.05), ("resnet101", 0.08), ("resnet152", 0.10), ("resnet200", 0.15),
    ("convnext_small", 0.2), ("convnext_base", 0.3), ("convnext_large", 0.4),
    ("resnet18", 0.0), ("resnet50d", 0.0), ("convnext_tiny", 0.0), ("mobilenetv2_100", 0.0),
    ("resnet50.a1_in1k", 0.05),  # a pretrained tag names the same architecture
])
def test_official_drop_path_rates(name, rate):
    assert recipe_for(name).drop_path_rate == rate


@pytest.mark.parametrize("name, betas", [
    ("resnet50", (0.9, 0.95)), ("mobilenetv2_100", (0.9, 0.95)),
    ("convnext_tiny", (0.9, 0.999)), ("convnextv2_atto", (0.9, 0.999)),
])
def test_lamb_betas_by_family(name, betas):
    assert recipe_for(name).lamb_betas == betas


def test_optimizer_takes_the_recipe_betas():
    model = nn.Conv2d(3, 4, 3)
    assert build_optimizer(model, "convnext_small", 1e-3).defaults["betas"] == CONVNEXT_BETAS
    assert build_optimizer(model, "resnet50", 1e-3).defaults["betas"] == RESNET_BETAS
