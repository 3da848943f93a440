"""SparK's optimization recipe (docs/design.md section 2): LAMB, learning rate scaled with the batch, linear
warm-up then cosine decay, cosine weight-decay ramp, global gradient clipping."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

from torch import nn

from .recipe import recipe_for

BASE_BATCH = 256
MIN_LR_FRACTION = 1e-3      # the cosine ends at 1e-3 x peak
WD_START, WD_END = 0.04, 0.2
CLIP_GRAD_NORM = 5.0
# The paper's warm-up: 40 of 1600 epochs.
WARMUP_FRACTION = 40 / 1600


def peak_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule: peak lr = base_lr x global batch / 256."""
    return base_lr * batch_size / BASE_BATCH


@dataclass(frozen=True)
class Schedule:
    """Learning rate and weight decay as functions of the optimizer step (0-based)."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    wd_start: float = WD_START
    wd_end: float = WD_END

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        min_lr = self.peak_lr * MIN_LR_FRACTION
        span = max(self.total_steps - 1 - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return min_lr + (self.peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def weight_decay(self, step: int) -> float:
        progress = min(step / max(self.total_steps - 1, 1), 1.0)
        return self.wd_end + (self.wd_start - self.wd_end) * 0.5 * (1 + math.cos(math.pi * progress))


def default_warmup_steps(total_steps: int) -> int:
    return max(1, round(total_steps * WARMUP_FRACTION))


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases, layer scales and mask tokens are not decayed (as in the official code)."""
    return param.ndim <= 1 or name.endswith(".bias") or "mask_token" in name


def param_groups(model: nn.Module) -> List[Dict]:
    """Two groups; `wd_scale` multiplies the scheduled weight decay (0 for the exempt parameters)."""
    decay, exempt = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (exempt if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "wd_scale": 1.0}, {"params": exempt, "wd_scale": 0.0}]


def build_optimizer(model: nn.Module, model_name: str, lr: float):
    """timm's LAMB with the model's betas (spark/recipe.py); clipping is done by the training loop (which
    logs the norm), so LAMB's own is off."""
    from timm.optim import Lamb
    return Lamb(param_groups(model), lr=lr, betas=recipe_for(model_name).lamb_betas, weight_decay=WD_START,
                max_grad_norm=None)


def apply_schedule(optimizer, schedule: Schedule, step: int) -> Tuple[float, float]:
    lr, wd = schedule.lr(step), schedule.weight_decay(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd * group["wd_scale"]
    return lr, wd
