"""Reconstruction figures like figure 4 of the SparK paper: input / masked input / reconstruction."""
from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.utils import make_grid

from .checkpoint import atomic_write
from .data import denormalize

def reconstruction_grid(images: torch.Tensor, masked: torch.Tensor, reconstruction: torch.Tensor) -> Image.Image:
    """Three rows (input, masked input, reconstruction) of K normalized (K, 3, H, W) images, one column
    per image, denormalized for display."""
    if not images.shape == masked.shape == reconstruction.shape or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected three (K, 3, H, W) tensors of one shape, got {tuple(images.shape)}, "
                         f"{tuple(masked.shape)}, {tuple(reconstruction.shape)}")
    rows = torch.cat([denormalize(t.detach().float().cpu()) for t in (images, masked, reconstruction)])
    grid = make_grid(rows, nrow=images.shape[0], padding=2, pad_value=1.0)
    pixels = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


def save_png(image: Image.Image, path: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
