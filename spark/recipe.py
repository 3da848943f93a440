"""Per-model defaults of SparK pretraining (the values of the official code), in one table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class ModelRecipe:
    drop_path_rate: float   # stochastic depth of the encoder during pretraining
    lamb_betas: Tuple[float, float]


RESNET_BETAS = (0.9, 0.95)      # also the default of every model outside the ConvNeXt family
CONVNEXT_BETAS = (0.9, 0.999)

# LAMB betas per model family, matched as a prefix of the timm name (ConvNeXt V1 and V2).
FAMILY_BETAS = {"convnext": CONVNEXT_BETAS}

# Drop path rates of the official pretraining configurations, by exact timm name; other models get 0.
DROP_PATH_RATES = {
    "resnet50": 0.05, "resnet101": 0.08, "resnet152": 0.10, "resnet200": 0.15,
    "convnext_small": 0.2, "convnext_base": 0.3, "convnext_large": 0.4,
}


def recipe_for(model_name: str) -> ModelRecipe:
    """The defaults for a timm model name (a pretrained tag such as ".a1_in1k" is ignored)."""
    name = model_name.split(".")[0].lower()
    betas = next((b for family, b in FAMILY_BETAS.items() if name.startswith(family)), RESNET_BETAS)
    return ModelRecipe(drop_path_rate=DROP_PATH_RATES.get(name, 0.0), lamb_betas=betas)
