"""Backend registry and dispatch.

Each backend declares where it runs (device types) and why it is unavailable when it is; what it supports
of each op (dtypes, kernel sizes, strides, layouts, channel limits) is declared in the op registry
(_registry.py). The dispatcher picks the first backend in the device's preference order whose
declarations support the call, or raises with every backend's reason. A call that the preferred backends cannot take and that lands on the slow
masked-dense "reference" backend is never silent: it warns (FallbackWarning, once per op and reason) and
is counted (fallback_counts()).
"""
from __future__ import annotations

import collections
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._registry import Call, get_op

BACKEND_NAMES: Tuple[str, ...] = ("reference", "cpu", "triton", "cuda")
# Preference order per device type when the caller does not name a backend.
DEFAULT_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}
ENV_VAR = "SPARK_KERNELS_BACKEND"
REFERENCE = "reference"


class FallbackWarning(RuntimeWarning):
    """A call ran on the slow "reference" backend because the preferred backends cannot take it.
    Turn it into an error with ``warnings.simplefilter("error", spark_kernels.FallbackWarning)``."""


_fallbacks: "collections.Counter[Tuple[str, str]]" = collections.Counter()


def fallback_counts() -> Dict[Tuple[str, str], int]:
    """How many calls fell back to "reference" in this process, per (op, reason)."""
    return dict(_fallbacks)


def reset_fallback_counts() -> None:
    """Forget the fallbacks seen so far (their counts, and which were warned about)."""
    _fallbacks.clear()


# Reasons a backend is unavailable that were already announced once for the whole process (the extension
# failing to load warns at import): falling back because of them alone is counted but not warned again.
announced_unavailable: set = set()


def _note_fallback(op: str, reason: str, announced: bool = False) -> None:
    key = (op, reason)
    if key not in _fallbacks and not announced:
        warnings.warn(f"{op}: running on the slow masked-dense 'reference' backend because {reason}",
                      FallbackWarning, stacklevel=4)
    _fallbacks[key] += 1


@dataclass
class Backend:
    """A backend: where it runs and its kernel primitives (what it supports of each op: _registry.py).

    ``kernels`` is an object with the primitives the generic autograd functions call (see
    ``depthwise_conv.py``, ``batch_norm.py``, ``layer_norm.py``); None for the reference backend.
    ``load`` returns (kernels, None) or (None, reason) and runs once, on first use.
    ``device_check`` (optional) further restricts the device types after loading: it returns why a
    device type is unsupported, or None.
    """

    name: str
    device_types: Tuple[str, ...]
    load: Callable[[], Tuple[object, Optional[str]]]
    device_check: Optional[Callable[[str], Optional[str]]] = None
    _loaded: Optional[Tuple[object, Optional[str]]] = field(default=None, repr=False)

    def _ensure_loaded(self) -> Tuple[object, Optional[str]]:
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded

    @property
    def kernels(self):
        return self._ensure_loaded()[0]

    def unavailable_reason(self) -> Optional[str]:
        return self._ensure_loaded()[1]

    def device_reason(self, device_type: str) -> Optional[str]:
        """Why the backend cannot run on tensors of this device type (None if it can)."""
        why = self.unavailable_reason()
        if why:
            return why
        if device_type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)} tensors, not {device_type}"
        if self.device_check is not None:
            return self.device_check(device_type)
        return None

    def unsupported_reason(self, op: str, call: Call, device_type: str) -> Optional[str]:
        """Why the backend cannot take this call of op (None if it can): its device, then every limit
        the op's declaration for this backend puts on the call."""
        why = self.device_reason(device_type)
        if why:
            return why
        support = get_op(op).support.get(self.name)
        if support is None:
            return f"has no kernels for {op}"
        reasons = support.reasons(call, device_type)
        return "; ".join(reasons) if reasons else None


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_NAMES}")
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> Backend:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {list(BACKEND_NAMES)} or None, got {name!r}")
    backend = _REGISTRY.get(name)
    if backend is None:
        raise RuntimeError(f"backend {name!r} is not registered in this build")
    return backend


def available_backends() -> List[str]:
    """Names of the backends that can run in this process (on some device), in BACKEND_NAMES order."""
    return [n for n in BACKEND_NAMES if n in _REGISTRY and _REGISTRY[n].unavailable_reason() is None]


def unavailable_reasons() -> Dict[str, str]:
    """For each registered backend that cannot run here, why."""
    out = {}
    for name in BACKEND_NAMES:
        b = _REGISTRY.get(name)
        why = "not registered in this build" if b is None else b.unavailable_reason()
        if why:
            out[name] = why
    return out


def select_backend(requested: Optional[str], x: torch.Tensor, op: str, kernel_size: Optional[int] = None,
                   stride: Optional[int] = None) -> Backend:
    """The backend that runs `op` (a name in the op registry) on x, the logically (N, C, H, W) input: the
    requested one, else $SPARK_KERNELS_BACKEND, else the first backend of the device's preference order
    whose declaration supports the call. A backend that was asked for by name and cannot take the call, or
    a call no backend takes, raises with every reason."""
    call = Call.of(x, kernel_size, stride)
    device_type = x.device.type
    source = "backend"
    if requested is None:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            requested, source = env, f"${ENV_VAR}"
    if requested is not None:
        if not isinstance(requested, str) or requested not in BACKEND_NAMES:
            raise ValueError(f"{source} must be one of {list(BACKEND_NAMES)} or None, got {requested!r}")
        backend = get_backend(requested)
        why = backend.unsupported_reason(op, call, device_type)
        if why:
            raise RuntimeError(f"{op}: backend {requested!r} (from {source}) cannot run this call: {why}")
        return backend
    reasons, announced = [], True
    for name in DEFAULT_ORDER.get(device_type, (REFERENCE,)):
        backend = _REGISTRY.get(name)
        why = "not registered in this build" if backend is None else backend.unsupported_reason(op, call, device_type)
        if why is None:
            if name == REFERENCE and reasons:
                _note_fallback(op, "; ".join(reasons), announced)
            return backend
        reasons.append(f"{name}: {why}")
        announced = announced and why in announced_unavailable
    raise RuntimeError(f"{op}: no backend supports this call: " + "; ".join(reasons))
