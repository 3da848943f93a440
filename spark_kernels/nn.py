"""Drop-in modules that read the active sites from a context.

    with sk.active(sites):          # an ActiveSites (any scale of the batch) or a bool (N, 1, H, W) mask
        y = module(x)

Each module picks the scale matching its input's spatial size (``ActiveSites.at``), so one context
serves a whole multi-scale network. The context is a ``contextvars.ContextVar``: threads and asyncio
tasks each see their own.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
from torch import nn

from ._sites import ActiveSites, as_sites
from .batch_norm import masked_batch_norm
from .depthwise_conv import KERNEL_SIZES, STRIDES, sparse_depthwise_conv2d
from .group_norm import masked_group_norm
from .layer_norm import DATA_FORMATS, masked_layer_norm

_ACTIVE: contextvars.ContextVar[Optional[ActiveSites]] = contextvars.ContextVar("spark_kernels_active", default=None)


@contextlib.contextmanager
def active(sites) -> Iterator[ActiveSites]:
    """Make `sites` (ActiveSites or bool (N, 1, H, W) mask) the active sites of the modules run inside."""
    sites = as_sites(sites, "sites")
    token = _ACTIVE.set(sites)
    try:
        yield sites
    finally:
        _ACTIVE.reset(token)


def current_sites() -> Optional[ActiveSites]:
    return _ACTIVE.get()


def sites_for(x: torch.Tensor, module: nn.Module, spatial_dims=(2, 3)) -> ActiveSites:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{type(module).__name__} expects a 4-D input tensor, got {shape}")
    sites = _ACTIVE.get()
    if sites is None:
        raise RuntimeError(f"{type(module).__name__} needs active sites: run it inside "
                           f"`with spark_kernels.active(sites_or_mask): ...`")
    if x.shape[0] != sites.batch_size:
        raise ValueError(f"{type(module).__name__}: input batch size {x.shape[0]} does not match the active "
                         f"sites' batch size {sites.batch_size}")
    return sites.at(x.shape[spatial_dims[0]], x.shape[spatial_dims[1]])


def _copy_state(dst: nn.Module, src: nn.Module) -> None:
    """Give dst src's device, float dtype, state, train/eval mode and requires_grad flags."""
    floats = [t for t in list(src.parameters()) + list(src.buffers()) if t.is_floating_point()]
    if floats:
        dst.to(device=floats[0].device, dtype=floats[0].dtype)
    dst.load_state_dict(src.state_dict())
    dst.train(src.training)
    for name, param in src.named_parameters(recurse=False):
        getattr(dst, name).requires_grad_(param.requires_grad)


class SparseDepthwiseConv2d(nn.Conv2d):
    """Submanifold depthwise conv (k in {3, 5, 7}, stride 1 or 2, padding k//2); same parameters and
    state_dict keys as the nn.Conv2d it replaces. Its output's active sites are ``sites.strided(stride)``."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, stride: int = 1,
                 backend: Optional[str] = None, device=None, dtype=None):
        if kernel_size not in KERNEL_SIZES:
            raise ValueError(f"kernel_size must be one of {KERNEL_SIZES}, got {kernel_size}")
        if stride not in STRIDES:
            raise ValueError(f"stride must be one of {STRIDES}, got {stride}")
        super().__init__(channels, channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=channels,
                         bias=bias, device=device, dtype=dtype)
        self.backend = backend

    @staticmethod
    def unsupported_reason(conv: nn.Module) -> Optional[str]:
        """Why a dense conv cannot become a SparseDepthwiseConv2d, or None if it can (the converters ask this
        instead of knowing the supported kernel sizes and strides)."""
        if type(conv) is not nn.Conv2d:
            return f"is a {type(conv).__name__}, not a plain nn.Conv2d"
        k = conv.kernel_size
        if k[0] != k[1] or k[0] not in KERNEL_SIZES:
            sizes = ", ".join(f"{s}x{s}" for s in KERNEL_SIZES)
            return f"kernel size {k} is not one of {sizes}"
        if conv.in_channels != conv.out_channels or conv.groups != conv.in_channels:
            return f"is not depthwise (in={conv.in_channels}, out={conv.out_channels}, groups={conv.groups})"
        if conv.stride[0] != conv.stride[1] or conv.stride[0] not in STRIDES:
            return f"stride {conv.stride} is not one of {', '.join(f'({s}, {s})' for s in STRIDES)}"
        if tuple(conv.dilation) != (1, 1):
            return f"dilation {conv.dilation} is not 1"
        if conv.padding == "valid" or (conv.padding != "same" and tuple(conv.padding) != (k[0] // 2,) * 2):
            return f"padding {conv.padding} is not k//2 = {(k[0] // 2,) * 2} ('same' at stride 1)"
        if conv.padding_mode != "zeros":
            return f"padding_mode {conv.padding_mode!r} is not 'zeros'"
        return None

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, backend: Optional[str] = None) -> "SparseDepthwiseConv2d":
        why = cls.unsupported_reason(conv)
        if why:
            raise ValueError(f"SparseDepthwiseConv2d.from_dense: conv {why}")
        sparse = cls(conv.in_channels, conv.kernel_size[0], bias=conv.bias is not None, stride=conv.stride[0],
                     backend=backend)
        _copy_state(sparse, conv)
        return sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_depthwise_conv2d(x, self.weight, self.bias, sites_for(x, self), stride=self.stride[0],
                                       backend=self.backend)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over active sites; synchronized over `process_group` when one is set (or when
    converted from an nn.SyncBatchNorm inside an initialized process group)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.backend = backend

    @classmethod
    def from_dense(cls, bn: nn.modules.batchnorm._BatchNorm, backend: Optional[str] = None,
                   process_group=None) -> "MaskedBatchNorm2d":
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise TypeError(f"MaskedBatchNorm2d.from_dense expects nn.BatchNorm2d or nn.SyncBatchNorm, "
                            f"got {type(bn).__name__}")
        if process_group is None and isinstance(bn, nn.SyncBatchNorm):
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                process_group = bn.process_group or dist.group.WORLD
        masked = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                     process_group=process_group, backend=backend)
        _copy_state(masked, bn)
        return masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sites = sites_for(x, self)  # first: a call that cannot run must not count as a tracked batch
        # The momentum / num_batches_tracked logic of nn.BatchNorm2d.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return masked_batch_norm(
            x, sites, self.running_mean if track else None, self.running_var if track else None,
            self.weight, self.bias, training=use_batch_stats, momentum=factor, eps=self.eps,
            process_group=self.process_group if self.training else None, backend=self.backend)


class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm over channels at active sites, for (N, C, H, W) ("channels_first") or (N, H, W, C)
    ("channels_last") inputs."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_first",
                 elementwise_affine: bool = True, bias: bool = True, backend: Optional[str] = None,
                 device=None, dtype=None):
        if data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
        super().__init__(normalized_shape, eps, elementwise_affine, bias=bias, device=device, dtype=dtype)
        self.data_format = data_format
        self.backend = backend

    @classmethod
    def from_dense(cls, ln: nn.LayerNorm, data_format: str, backend: Optional[str] = None) -> "MaskedLayerNorm":
        if not isinstance(ln, nn.LayerNorm):
            raise TypeError(f"MaskedLayerNorm.from_dense expects an nn.LayerNorm, got {type(ln).__name__}")
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"MaskedLayerNorm normalizes over channels only; normalized_shape "
                             f"{tuple(ln.normalized_shape)} has more than one dimension")
        masked = cls(ln.normalized_shape[0], ln.eps, data_format, ln.elementwise_affine,
                     bias=ln.bias is not None, backend=backend)
        _copy_state(masked, ln)
        return masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (1, 2) if self.data_format == "channels_last" else (2, 3)
        return masked_layer_norm(x, sites_for(x, self, dims), self.weight, self.bias, self.eps,
                                 self.data_format, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", data_format={self.data_format}"


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per (image, group) over the image's active sites, zeros elsewhere; same
    parameters and state_dict keys as the nn.GroupNorm it replaces."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.backend = backend

    @classmethod
    def from_dense(cls, gn: nn.GroupNorm, backend: Optional[str] = None) -> "MaskedGroupNorm":
        """A MaskedGroupNorm with gn's groups, eps, parameters, mode and requires_grad flags. Subclasses of
        nn.GroupNorm whose forward is a plain group norm (timm's GroupNorm, GroupNorm1) are accepted; one with
        submodules does more than that (timm's GroupNormAct applies its drop and act after the norm) and is
        refused: the model layer converts it, keeping those submodules."""
        if not isinstance(gn, nn.GroupNorm):
            raise TypeError(f"MaskedGroupNorm.from_dense expects an nn.GroupNorm, got {type(gn).__name__}")
        children = [name for name, _ in gn.named_children()]
        if children:
            raise ValueError(f"MaskedGroupNorm.from_dense converts a plain group norm; this {type(gn).__name__} "
                             f"has submodules {children} that its forward applies too")
        masked = cls(gn.num_groups, gn.num_channels, gn.eps, gn.affine, backend=backend)
        _copy_state(masked, gn)
        return masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_group_norm(x, sites_for(x, self), self.num_groups, self.weight, self.bias, self.eps,
                                 backend=self.backend)
