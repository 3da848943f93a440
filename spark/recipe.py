"""Per-model defaults of SparK pretraining (the values of the official code), read from the family table
(spark/families.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from .families import CONVNEXT_BETAS, RESNET_BETAS, base_name, family_of

__all__ = ["ModelRecipe", "recipe_for", "RESNET_BETAS", "CONVNEXT_BETAS"]


@dataclass(frozen=True)
class ModelRecipe:
    drop_path_rate: float   # stochastic depth of the encoder during pretraining
    lamb_betas: Tuple[float, float]


def recipe_for(model_name: str) -> ModelRecipe:
    """The defaults for a timm model name (a pretrained tag such as ".a1_in1k" is ignored): its family's
    LAMB betas (ResNet's outside the table) and the official drop path rate (0 for models without one)."""
    family = family_of(model_name)
    if family is None:
        return ModelRecipe(drop_path_rate=0.0, lamb_betas=RESNET_BETAS)
    return ModelRecipe(drop_path_rate=family.drop_path_rates.get(base_name(model_name), 0.0),
                       lamb_betas=family.lamb_betas)
