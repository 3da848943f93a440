"""SparK patch masks."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """round(L * (1 - mask_ratio)) patches stay visible (SparK)."""
    return int(round(num_patches * (1 - mask_ratio)))


def patch_mask(batch: int, grid: Union[int, Tuple[int, int]], mask_ratio: float,
               generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Bool (batch, 1, gh, gw) patch mask, True = visible: per image, round(L * (1 - mask_ratio)) of the
    L = gh * gw patches, drawn uniformly at random."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if not 0 <= mask_ratio <= 1:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}")
    if batch < 0 or gh < 1 or gw < 1:
        raise ValueError(f"batch must be >= 0 and grid >= 1, got batch={batch}, grid={(gh, gw)}")
    L = gh * gw
    keep = num_visible(L, mask_ratio)
    noise = torch.rand(batch, L, generator=generator, device="cpu" if generator is not None else device)
    order = noise.argsort(dim=1)
    visible = torch.zeros(batch, L, dtype=torch.bool, device=noise.device)
    visible.scatter_(1, order[:, :keep], True)
    return visible.reshape(batch, 1, gh, gw).to(device)


def upsample_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest upsampling of a (N, 1, gh, gw) bool mask to (N, 1, height, width) (integer factors)."""
    gh, gw = mask.shape[-2:]
    if height % gh or width % gw:
        raise ValueError(f"cannot upsample a {gh}x{gw} mask to {height}x{width}: not an integer factor")
    return mask.repeat_interleave(height // gh, dim=2).repeat_interleave(width // gw, dim=3)
