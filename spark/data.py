"""Pretraining data: an image folder or the embedded default photographs, SparK's augmentation, and a
resumable distributed sampler.

Every sample's augmentation is seeded from (run seed, epoch, position in the epoch's global order), not
from a worker's RNG stream, so a batch is the same whatever the number of workers or processes and a
resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import os
import random
from typing import Iterator, List, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# ImageNet statistics, as in the official SparK code.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Photographs shipped inside scikit-image's wheel (skimage/data): the colour ones, plus grayscale
# photographs converted to RGB. Synthetic images (phantom, chessboard, logo, text, ...) are left out.
DEFAULT_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png",
                  "brick.png", "grass.png", "gravel.png")
# Tried in turn when an image is unreadable, before giving up on the data set.
MAX_SUBSTITUTES = 64


class DataError(Exception):
    """The data cannot be used; str() is a one-line message for the user."""


def find_images(root: str) -> List[str]:
    """Sorted paths of the image files under `root` (class subfolders allowed, names ignored)."""
    if not os.path.exists(root):
        raise DataError(f"--data {root}: no such directory")
    if not os.path.isdir(root):
        raise DataError(f"--data {root}: not a directory")
    paths = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        paths.extend(os.path.join(folder, f) for f in sorted(files)
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not paths:
        raise DataError(f"--data {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return paths


def default_photo_paths() -> List[str]:
    """The embedded default data: sample photographs from scikit-image's installed data folder."""
    try:
        import skimage.data
    except ImportError as err:
        raise DataError(f"the default data set needs scikit-image (pip install scikit-image): {err}") from None
    folder = os.path.dirname(skimage.data.__file__)
    paths = [os.path.join(folder, name) for name in DEFAULT_PHOTOS if os.path.isfile(os.path.join(folder, name))]
    if not paths:
        raise DataError(f"no default photographs found in {folder}; pass --data DIR")
    return paths


def load_rgb(path: str) -> Image.Image:
    """Decode `path` fully (so truncated files fail here) as RGB. Raises OSError/ValueError if unreadable."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def train_transform(input_size: int) -> transforms.Compose:
    """SparK's augmentation: RandomResizedCrop(scale 0.67-1, bicubic) + horizontal flip, normalized."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.67, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def eval_transform(input_size: int) -> transforms.Compose:
    """Deterministic view for the reconstruction images: resize the short side, center crop."""
    return transforms.Compose([
        transforms.Resize(input_size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalized (..., 3, H, W) images back to [0, 1] for display."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the augmentation of the sample at `position` of `epoch`'s global order."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + position) & 0x7FFF_FFFF_FFFF_FFFF


class PretrainDataset(Dataset):
    """Images from `paths`, each `repeats` times per epoch, augmented by `transform`.

    Keys are (index, seed) pairs from :class:`ResumableSampler`; an item is (image tensor, tuple of the
    paths found unreadable while producing it). An unreadable file is replaced by the next readable one,
    so a batch stays full; the caller warns about and counts the paths it gets back.
    With `preload`, images are decoded once up front (used for the small embedded set).
    """

    def __init__(self, paths: Sequence[str], transform, repeats: int = 1, preload: bool = False):
        self.paths = list(paths)
        self.transform = transform
        self.repeats = repeats
        self.cache = [load_rgb(p) for p in self.paths] if preload else None

    def __len__(self) -> int:
        return len(self.paths) * self.repeats

    def image(self, i: int) -> Image.Image:
        return self.cache[i] if self.cache is not None else load_rgb(self.paths[i])

    def readable(self, start: int) -> Tuple[Image.Image, Tuple[str, ...]]:
        """The first readable image at or after file `start` (cyclically) and the unreadable paths passed."""
        bad = []
        for k in range(min(MAX_SUBSTITUTES, len(self.paths))):
            i = (start + k) % len(self.paths)
            try:
                return self.image(i), tuple(bad)
            except UNREADABLE:
                bad.append(self.paths[i])
        raise DataError(f"{len(bad)} image files in a row are unreadable (e.g. {bad[0]}); "
                        f"is this an image folder?")

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        img, bad = self.readable(index % len(self.paths))
        # Seed the transform's global RNGs for this sample only, leaving the caller's streams untouched.
        with torch.random.fork_rng(devices=[]):
            state = random.getstate()
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                x = self.transform(img)
            finally:
                random.setstate(state)
        return x, bad


def collate(items):
    images = torch.stack([x for x, _ in items])
    bad = [p for _, paths in items for p in paths]
    return images, bad


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, truncated to a multiple of the process count) that yields
    (index, augmentation seed) keys and can start an epoch at a given step (for --resume).

    Process `rank` takes positions rank, rank + world, ... of the epoch's permutation, so with a
    per-process batch b the global batch of step t is positions [t*b*world, (t+1)*b*world): the same set
    of samples whatever the number of processes.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_per_process: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_per_process = batch_per_process
        self.start_step = 0

    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_per_process

    def set_position(self, epoch: int, start_step: int) -> None:
        self.set_epoch(epoch)
        self.start_step = start_step

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(super().__iter__())[:self.steps_per_epoch() * self.batch_per_process]
        for k in range(self.start_step * self.batch_per_process, len(indices)):
            position = self.rank + k * self.num_replicas
            yield indices[k], sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start_step) * self.batch_per_process


def fixed_images(dataset: PretrainDataset, count: int, input_size: int) -> Tuple[torch.Tensor, List[str]]:
    """The first `count` readable images, center-cropped: the fixed set shown in reconstruction grids."""
    view = eval_transform(input_size)
    images, bad = [], []
    for i, path in enumerate(dataset.paths):
        if len(images) == count:
            break
        try:
            images.append(view(dataset.image(i)))
        except UNREADABLE:
            bad.append(path)
    if not images:
        raise DataError(f"none of the {len(dataset.paths)} image files could be read (e.g. {bad[0]})")
    return torch.stack(images), bad


__all__ = ["DataError", "find_images", "default_photo_paths", "load_rgb", "train_transform", "eval_transform",
           "denormalize", "PretrainDataset", "ResumableSampler", "collate", "fixed_images", "MEAN", "STD"]
