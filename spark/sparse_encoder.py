"""Turn a dense convnet into a SparK sparse encoder, in place, without touching its code or state_dict keys.

Every layer is either replaced by a sparse counterpart or wrapped so that its output is exactly zero at
inactive sites; the active sites come from the ``spark_kernels.active`` context, each layer picking the
scale of its output (``ActiveSites.at``). Two flavours share this converter:

* fused (``backend`` anything but "reference"): the depthwise convs ``SparseDepthwiseConv2d.unsupported_reason``
  accepts (3x3, 5x5, 7x7 at stride 1 or 2) run as submanifold kernels, norms as masked kernels, ConvNeXt
  blocks run LN -> MLP on the compact active rows only and scatter-add them into the residual, and the mask
  after a dense conv is skipped when a masked norm (which reads active sites only) consumes the conv directly.
* masked-dense (``backend="reference"``): mirrors the official SparK code: dense op then mask, norms as
  gather -> norm -> scatter, the ConvNeXt MLP over all positions then masked.

Layers the converter does not know raise ``UnsupportedLayerError`` naming their type and path, rather than
silently running dense. Modules without parameters of their own that have children (Sequential, timm's
feature wrappers, residual blocks) are treated as containers and converted child by child.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

import spark_kernels as sk
from spark_kernels.nn import MaskedBatchNorm2d, MaskedLayerNorm, SparseDepthwiseConv2d

from timm.layers import LayerNorm as TimmLayerNorm, LayerNorm2d as TimmLayerNorm2d
from timm.layers import activations as timm_act
from timm.layers.drop import DropPath
from timm.layers.mlp import Mlp
from timm.layers.norm_act import BatchNormAct2d
from timm.models.convnext import ConvNeXtBlock

REFERENCE = "reference"


class UnsupportedLayerError(TypeError):
    """A layer the sparse-encoder converter cannot make sparse."""


# Layers that act per element and map 0 to 0, so zeros at inactive sites stay zeros.
ZERO_PRESERVING = (nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.Mish,
                   nn.ELU, nn.Tanh, nn.Dropout, nn.Dropout2d, DropPath, timm_act.GELU, timm_act.GELUTanh,
                   timm_act.Swish, timm_act.HardSwish, timm_act.Mish, timm_act.Tanh)


def _current_mask(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """The bool (N, 1, H, W) active mask at y's scale (y is (N, C, H, W))."""
    sites = sk.current_sites()
    if sites is None:
        raise RuntimeError(f"{type(layer).__name__} needs active sites: run the encoder inside "
                           f"`with spark_kernels.active(sites): ...`")
    return sites.at(y.shape[-2], y.shape[-1]).mask


def _zero_inactive(y: torch.Tensor, layer: nn.Module, in_place: bool) -> torch.Tensor:
    mask = _current_mask(y, layer)
    if in_place:  # the producing op does not save its output for backward, so it may be overwritten
        return y.masked_fill_(~mask, 0)
    return torch.where(mask, y, y.new_zeros(()))


class MaskedConv2d(nn.Conv2d):
    """Dense conv, then zeros at inactive output sites (the official SparK approach for general convs).

    ``mask_output`` is False when a masked norm consumes the output directly: that norm reads active
    sites only, so the mask would be redundant work."""

    mask_output: bool = True
    in_place: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return _zero_inactive(y, self, self.in_place) if self.mask_output else y

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.mask_output else ", mask_output=False")


class MaskedMaxPool2d(nn.MaxPool2d):
    """Dense max pool, then zeros at inactive output sites."""

    in_place: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _zero_inactive(super().forward(x), self, self.in_place)


class MaskedAvgPool2d(nn.AvgPool2d):
    """Dense average pool, then zeros at inactive output sites."""

    in_place: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _zero_inactive(super().forward(x), self, self.in_place)


class MaskedBatchNormAct2d(MaskedBatchNorm2d):
    """timm's BatchNormAct2d (BN -> drop -> act) over active sites; the same state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class MaskedDenseMlp(Mlp):
    """timm Mlp over every position, then zeros at inactive sites: the official SparK ConvNeXt block, which
    masks the MLP branch before the residual add. Input (N, H, W, C), or (N, C, H, W) for a 1x1-conv MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        channels_first = type(self.fc1) is nn.Conv2d
        mask = _current_mask(y if channels_first else y.permute(0, 3, 1, 2), self)
        return torch.where(mask if channels_first else mask.permute(0, 2, 3, 1), y, y.new_zeros(()))


def _mlp_on_rows(mlp: Mlp, rows: torch.Tensor) -> torch.Tensor:
    """timm Mlp applied to (M, C) rows; 1x1-conv layers act as the linear layers they are."""
    x = F.linear(rows, mlp.fc1.weight.flatten(1), mlp.fc1.bias)
    x = mlp.norm(mlp.drop1(mlp.act(x)))
    return mlp.drop2(F.linear(x, mlp.fc2.weight.flatten(1), mlp.fc2.bias))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) rows (a view when x is channels_last in memory)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class SparseConvNeXtBlock(ConvNeXtBlock):
    """ConvNeXt block whose LN -> MLP -> layer scale -> drop path run on the compact active rows only,
    scatter-added into the residual. Inactive sites of the block input are zero and receive nothing, so
    they stay zero: the same result as the masked-dense block, with the MLP on ~(1 - mask ratio) of the
    rows. Same submodules and parameters as timm's ConvNeXtBlock."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sites = sk.current_sites()
        if sites is None:
            raise RuntimeError("SparseConvNeXtBlock needs active sites: run it inside "
                               "`with spark_kernels.active(sites): ...`")
        n, c, h, w = x.shape
        index = sites.at(h, w).index
        y = self.conv_dw(x)
        rows = _rows(y).index_select(0, index)
        norm = self.norm
        rows = F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        rows = _mlp_on_rows(self.mlp, rows)
        if self.gamma is not None:
            rows = rows * self.gamma
        if isinstance(self.drop_path, DropPath) and self.training and self.drop_path.drop_prob > 0:
            keep_prob = 1 - self.drop_path.drop_prob
            keep = rows.new_empty((n,)).bernoulli_(keep_prob)  # one draw per image, as timm's drop_path
            if self.drop_path.scale_by_keep:
                keep.div_(keep_prob)
            rows = rows * keep.index_select(0, torch.div(index, h * w, rounding_mode="floor"))[:, None]
        shortcut = _rows(self.shortcut(x))
        # Under autocast the branch (float32 after the layer scale) and the input may differ in dtype: the
        # sum takes the wider one, as timm's `branch + shortcut` does.
        dtype = torch.promote_types(shortcut.dtype, rows.dtype)
        out = shortcut.to(dtype).index_add(0, index, rows.to(dtype))
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


# Within these blocks the forward applies the named norm directly to the named conv's output.
_CONV_THEN_NORM: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "timm.models.resnet.BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "timm.models.resnet.Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "timm.models._efficientnet_blocks.InvertedResidual": (("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"),
                                                          ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "timm.models.efficientnet.EfficientNetFeatures": (("conv_stem", "bn1"),),
}
# Containers whose forward runs their children one after the other.
_SEQUENTIAL = ("torch.nn.modules.container.Sequential", "timm.models._features.FeatureListNet",
               "timm.models._features.FeatureDictNet")


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _conv_norm_pairs(module: nn.Module) -> List[Tuple[str, str]]:
    if _qualname(module) in _SEQUENTIAL:
        names = [name for name, _ in module.named_children()]
        return list(zip(names[:-1], names[1:]))
    return list(_CONV_THEN_NORM.get(_qualname(module), ()))


def _swap_class(module: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    """Give module a subclass of its own type: same object, same parameters and state_dict keys."""
    if not issubclass(cls, type(module)):
        raise AssertionError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls
    return module


class _Converter:
    def __init__(self, backend: Optional[str]):
        self.backend = backend
        self.fused = backend != REFERENCE

    def fail(self, module: nn.Module, path: str, why: str = "") -> None:
        raise UnsupportedLayerError(
            f"cannot make layer {path or '<root>'!r} of type {_qualname(module)} sparse{': ' + why if why else ''}. "
            f"Supported: Conv2d, MaxPool2d/AvgPool2d, BatchNorm2d/SyncBatchNorm/BatchNormAct2d, LayerNorm "
            f"(channels_last) and LayerNorm2d, ConvNeXt blocks with timm Mlp, zero-preserving activations "
            f"and dropouts, and parameter-free containers of these")

    def convert_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            new = self.convert(child, f"{path}.{name}" if path else name)
            if new is not child:
                setattr(module, name, new)
        if self.fused:
            for conv_name, norm_name in _conv_norm_pairs(module):
                conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
                if type(conv) is MaskedConv2d and isinstance(norm, (MaskedBatchNorm2d, MaskedLayerNorm)):
                    conv.mask_output = False

    def convert(self, module: nn.Module, path: str) -> nn.Module:
        t = type(module)
        if t in ZERO_PRESERVING:
            return module
        if t is nn.Conv2d:
            if SparseDepthwiseConv2d.unsupported_reason(module) is None:
                return SparseDepthwiseConv2d.from_dense(module, backend=self.backend)
            if module.padding_mode != "zeros":
                self.fail(module, path, f"padding_mode {module.padding_mode!r} would read inactive sites "
                                        f"through the border")
            conv = _swap_class(module, MaskedConv2d)
            conv.in_place = self.fused
            return conv
        if t in (nn.MaxPool2d, nn.AvgPool2d):
            pool = _swap_class(module, MaskedMaxPool2d if t is nn.MaxPool2d else MaskedAvgPool2d)
            pool.in_place = self.fused
            return pool
        if t is BatchNormAct2d:
            for part in ("drop", "act"):
                if type(getattr(module, part)) not in ZERO_PRESERVING:
                    self.fail(getattr(module, part), f"{path}.{part}", "does not map 0 to 0")
            masked = MaskedBatchNormAct2d.from_dense(module, backend=self.backend)
            masked.drop, masked.act = module.drop, module.act
            return masked
        if t in (nn.BatchNorm2d, nn.SyncBatchNorm):
            return MaskedBatchNorm2d.from_dense(module, backend=self.backend)
        if t is TimmLayerNorm2d:
            return MaskedLayerNorm.from_dense(module, "channels_first", backend=self.backend)
        if t in (nn.LayerNorm, TimmLayerNorm):
            return MaskedLayerNorm.from_dense(module, "channels_last", backend=self.backend)
        if t is ConvNeXtBlock:
            return self.convert_convnext_block(module, path)
        if next(module.parameters(recurse=False), None) is None and next(module.buffers(recurse=False), None) is None \
                and next(module.children(), None) is not None:
            self.convert_children(module, path)
            return module
        self.fail(module, path)

    def convert_convnext_block(self, block: ConvNeXtBlock, path: str) -> nn.Module:
        mlp = block.mlp
        if type(mlp) is not Mlp:
            self.fail(mlp, f"{path}.mlp", "the MLP of a ConvNeXt block must be a timm Mlp")
        fc = (nn.Conv2d,) if block.use_conv_mlp else (nn.Linear,)
        if not (type(mlp.fc1) in fc and type(mlp.fc2) in fc):
            self.fail(mlp, f"{path}.mlp", f"fc1 and fc2 must be {fc[0].__name__}")
        if block.use_conv_mlp and any(fc.kernel_size != (1, 1) or fc.groups != 1 for fc in (mlp.fc1, mlp.fc2)):
            self.fail(mlp, f"{path}.mlp", "the 1x1-conv MLP must have 1x1 kernels and groups=1")
        for part in ("act", "drop1", "norm", "drop2"):  # per-row ops: applying them to compact rows is exact
            if type(getattr(mlp, part)) not in ZERO_PRESERVING:
                self.fail(getattr(mlp, part), f"{path}.mlp.{part}", "is not a per-element layer the converter knows")
        if type(block.drop_path) not in (nn.Identity, DropPath):
            self.fail(block.drop_path, f"{path}.drop_path")
        for name in ("conv_dw", "norm", "shortcut"):
            child = getattr(block, name)
            new = self.convert(child, f"{path}.{name}")
            if new is not child:
                setattr(block, name, new)
        if self.fused and type(block.conv_dw) is SparseDepthwiseConv2d and type(block.shortcut) is nn.Identity:
            return _swap_class(block, SparseConvNeXtBlock)
        # Masked-dense flavour (and blocks that change resolution): timm's forward with the MLP branch masked.
        _swap_class(mlp, MaskedDenseMlp)
        return block


def sparse_encoder_(encoder: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Convert `encoder` in place into a sparse encoder and return it (see the module docstring).

    backend: "reference" for the masked-dense model that mirrors the official SparK code; otherwise the
    spark_kernels backend of the fused layers (None picks the best for the tensors' device)."""
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    if backend is not None and backend not in sk.BACKEND_NAMES:
        raise ValueError(f"backend must be one of {list(sk.BACKEND_NAMES)} or None, got {backend!r}")
    converter = _Converter(backend)
    new = converter.convert(encoder, "")
    if new is not encoder:
        raise UnsupportedLayerError(f"the encoder itself must be a container of layers, got {_qualname(encoder)}")
    return encoder
