"""Checkpoints (atomic writes, validated loads, RNG states) and the encoder export."""
from __future__ import annotations

import glob
import os
import random
from typing import Any, Dict, Iterable, List

import numpy as np
import torch
from torch import nn

from .model import ARCHITECTURE

FORMAT = "spark-pretrain-checkpoint"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pth"
TMP_MARKER = ".tmp-"


class CheckpointError(Exception):
    """A checkpoint cannot be used; str() is a one-line message for the user."""


def atomic_write(path: str, write) -> None:
    """Run write(file) on a temporary file in path's directory, fsync it, then rename it over `path`:
    a reader (or a crash at any moment) sees either the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_MARKER}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: str) -> List[str]:
    """Delete temporary files left by a process killed while saving into `folder`."""
    stale = glob.glob(os.path.join(folder, f".*{TMP_MARKER}*"))
    for path in stale:
        os.remove(path)
    return stale


def rng_state() -> Dict[str, Any]:
    """torch, numpy and python RNG states as tensors and plain lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": list(internal), "gauss": gauss}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read and sanity-check a checkpoint written by save; raises CheckpointError with a one-line reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for damaged files; all mean "unreadable"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"--resume {path}: not a readable checkpoint (truncated or corrupt?): {reason}") \
            from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"--resume {path}: not a spark-pretrain checkpoint")
    # Checked before anything else: a model whose parameters mean something else must never be resumed.
    architecture = ckpt.get("architecture", 1)
    if architecture != ARCHITECTURE:
        raise CheckpointError(f"--resume {path}: the SparK architecture changed since this checkpoint was written "
                              f"(architecture {architecture}, this spark-pretrain builds {ARCHITECTURE}: densify "
                              f"levels and projections now follow the official SparK); start a new run")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"--resume {path}: checkpoint format version {ckpt.get('version')}, "
                              f"this spark-pretrain reads version {VERSION}")
    missing = [k for k in ("model", "optimizer", "step", "total_steps", "args", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume {path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """strict load_state_dict, with a one-line message naming the first mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        raise CheckpointError(f"--resume {path}: checkpoint does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


# -- encoder export ----------------------------------------------------------------------------------

def _normalized(key: str) -> str:
    # timm's FeatureListNet flattens nested module names with "_" ("stages.0" -> "stages_0").
    return key.replace("_", ".")


def features_to_model_keys(features_state: Dict[str, torch.Tensor], model_state_keys: Iterable[str]) -> Dict[str, str]:
    """Map the keys of a timm features_only state_dict to those of the classification model.

    Keys match when they agree up to "_" vs "." (timm's flattening); the map must be one-to-one.
    """
    by_normal: Dict[str, List[str]] = {}
    for key in model_state_keys:
        by_normal.setdefault(_normalized(key), []).append(key)
    mapping = {}
    for key in features_state:
        candidates = by_normal.get(_normalized(key), [])
        if len(candidates) != 1:
            raise ValueError(f"cannot map encoder key {key!r} to the classification model "
                             f"({len(candidates)} candidates)")
        mapping[key] = candidates[0]
    return mapping


def export_encoder(encoder_state: Dict[str, torch.Tensor], model_name: str, out_dir: str) -> Dict[str, str]:
    """Write the encoder weights twice:

    - encoder_features.pth: loads with strict=True into timm.create_model(name, features_only=True);
    - encoder.pth: loads into timm.create_model(name) with strict=False, missing exactly the head's keys.
    Returns {kind: path}.
    """
    import timm
    state = {k: v.detach().cpu().clone() for k, v in encoder_state.items()}
    with torch.device("meta"):
        full = timm.create_model(model_name, pretrained=False)
    full_keys = full.state_dict().keys()
    mapping = features_to_model_keys(state, full_keys)
    paths = {"features": os.path.join(out_dir, "encoder_features.pth"),
             "model": os.path.join(out_dir, "encoder.pth")}
    atomic_torch_save(state, paths["features"])
    atomic_torch_save({mapping[k]: v for k, v in state.items()}, paths["model"])
    return paths
