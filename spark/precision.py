"""Training precision of spark-pretrain: fp32, or autocast to bf16/fp16 with float32 parameters.

"auto" picks bf16 where the hardware computes it natively (CUDA compute capability 8.0 and newer; CPUs
with AVX512-BF16 or AMX-BF16), else fp32. fp16 is for CUDA only and runs with a gradient scaler (its
state is checkpointed). Under autocast, convs and linears run in the low precision, the masked norms
keep float32 statistics and parameters, and the loss is float32.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device, flags: Optional[set] = None) -> Tuple[bool, str]:
    """Whether the device computes bfloat16 natively, and the evidence, in words."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"CUDA compute capability {major}.{minor}"
    flags = cpu_flags() if flags is None else flags
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU flags {', '.join(found)}"
    return False, f"no {' or '.join(CPU_BF16_FLAGS)} among the CPU flags" if flags else "CPU flags unknown"


def resolve(requested: str, device: torch.device, flags: Optional[set] = None) -> Tuple[str, str]:
    """(precision to use, why): "auto" resolved for the device; an impossible request raises ValueError."""
    if requested not in CHOICES:
        raise ValueError(f"--precision must be one of {CHOICES}, got {requested!r}")
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (on CPUs use bf16 or fp32)")
    if requested in ("fp32", "fp16"):
        return requested, "requested"
    native, evidence = native_bf16(device, flags)
    if requested == "bf16":
        # Said at start, since nothing else would tell: PyTorch's convolutions take a generic bf16 kernel there.
        return "bf16", "requested" if native else (
            f"requested, though bf16 is not native here ({evidence}): convolutions fall back to slow generic "
            f"kernels, steps may take many times as long as in fp32")
    return ("bf16", f"auto: bf16 is native here ({evidence})") if native else \
        ("fp32", f"auto: bf16 is not native here ({evidence})")


def autocast(precision: str, device: torch.device):
    """The context a training step's forward pass runs in."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> Optional["torch.amp.GradScaler"]:
    """A gradient scaler for fp16 (whose small range underflows gradients), else None."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
