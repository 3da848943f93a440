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

Conversion is a table, ``CONVERSIONS``: dense layer type -> the function that builds its sparse
replacement (``from_dense``) or swaps its class in place for a masked subclass; either way the parameters
and state_dict keys stay those of the dense layer. Layers the table does not know raise
``UnsupportedLayerError`` naming their type and path, rather than silently running dense. Containers are
converted child by child: torch's and timm's generic ones, the timm blocks each model family lists as
reviewed (spark/families.py: their forward only composes their children), and modules from outside torch
and timm (a user's own encoder) without parameters of their own. A timm or torch block that is not listed
raises: its forward might pool or resample the map outside its children, which the converter cannot see.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

import spark_kernels as sk
from spark_kernels.nn import MaskedBatchNorm2d, MaskedGroupNorm, MaskedLayerNorm, SparseDepthwiseConv2d

from timm.layers import GroupNorm as TimmGroupNorm, GroupNorm1 as TimmGroupNorm1
from timm.layers import LayerNorm as TimmLayerNorm, LayerNorm2d as TimmLayerNorm2d
from timm.layers import activations as timm_act
from timm.layers.drop import DropPath
from timm.layers.grn import GlobalResponseNorm
from timm.layers.mlp import GlobalResponseNormMlp, Mlp
from timm.layers.norm_act import BatchNormAct2d, GroupNorm1Act, GroupNormAct
from timm.models.convnext import ConvNeXtBlock

from . import masked_pooling
from .families import conv_then_norm_pairs, reviewed_containers
from .masked_pooling import MASKED_POOLING, active_mask

REFERENCE = "reference"


class UnsupportedLayerError(TypeError):
    """A layer the sparse-encoder converter cannot make sparse."""


# Layers that act per element and map 0 to 0, so zeros at inactive sites stay zeros.
ZERO_PRESERVING = (nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.Mish,
                   nn.ELU, nn.Tanh, nn.Dropout, nn.Dropout2d, DropPath, timm_act.GELU, timm_act.GELUTanh,
                   timm_act.Swish, timm_act.HardSwish, timm_act.Mish, timm_act.Tanh)


def _zero_inactive(y: torch.Tensor, layer: nn.Module, in_place: bool) -> torch.Tensor:
    mask = active_mask(y, layer)
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


class MaskedGroupNormAct(MaskedGroupNorm):
    """timm's GroupNormAct / GroupNorm1Act (GN -> drop -> act) over active sites; the same state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _mask_like(x: torch.Tensor, layer: nn.Module, channels_last: bool) -> torch.Tensor:
    """The active mask broadcastable against x, (N, H, W, C) when channels_last else (N, C, H, W)."""
    if channels_last:
        return active_mask(x, layer, spatial_dims=(1, 2)).permute(0, 2, 3, 1)
    return active_mask(x, layer)


class MaskedGlobalResponseNorm(GlobalResponseNorm):
    """ConvNeXt-V2's GRN with the per-channel L2 norm over each image's active sites only (as its sparse
    FCMAE encoder computes it on sparse tensors), zeros at inactive sites."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = _mask_like(x, self, channels_last=self.channel_dim == -1)
        y = super().forward(torch.where(mask, x, x.new_zeros(())))
        return torch.where(mask, y, y.new_zeros(()))


class _MaskOutput:
    """timm MLP over every position, then zeros at inactive sites: the official SparK ConvNeXt block, which
    masks the MLP branch before the residual add. Input (N, H, W, C), or (N, C, H, W) for a 1x1-conv MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return torch.where(_mask_like(y, self, channels_last=type(self.fc1) is not nn.Conv2d), y, y.new_zeros(()))


class MaskedDenseMlp(_MaskOutput, Mlp):
    pass


class MaskedDenseGrnMlp(_MaskOutput, GlobalResponseNormMlp):
    pass


def _grn_on_rows(grn: GlobalResponseNorm, rows: torch.Tensor, image: torch.Tensor, images: int) -> torch.Tensor:
    """GRN of (M, C) active rows, row i belonging to image image[i]: per image and channel, the L2 norm over
    that image's rows (accumulated in at least float32)."""
    acc = torch.promote_types(rows.dtype, torch.float32)
    sum_sq = rows.new_zeros((images, rows.shape[1]), dtype=acc).index_add_(0, image, rows.to(acc).square())
    # sqrt has an infinite derivative at 0; an image without active rows has norm 0 and gradient 0 (as
    # torch's norm gives it).
    nonzero = sum_sq > 0
    norm = torch.where(nonzero, torch.where(nonzero, sum_sq, sum_sq.new_ones(())).sqrt(), sum_sq.new_zeros(()))
    scale = (norm / (norm.mean(1, keepdim=True) + grn.eps)).to(rows.dtype).index_select(0, image)
    return rows + torch.addcmul(grn.bias, grn.weight, rows * scale)


def _mlp_on_rows(mlp: nn.Module, rows: torch.Tensor, image: Optional[torch.Tensor], images: int) -> torch.Tensor:
    """timm Mlp or GlobalResponseNormMlp applied to (M, C) active rows; 1x1-conv layers act as the linear
    layers they are."""
    x = F.linear(rows, mlp.fc1.weight.flatten(1), mlp.fc1.bias)
    x = mlp.drop1(mlp.act(x))
    x = _grn_on_rows(mlp.grn, x, image, images) if isinstance(mlp, GlobalResponseNormMlp) else mlp.norm(x)
    return mlp.drop2(F.linear(x, mlp.fc2.weight.flatten(1), mlp.fc2.bias))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) rows (a view when x is channels_last in memory)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class SparseConvNeXtBlock(ConvNeXtBlock):
    """ConvNeXt (V1 or V2) block whose LN -> MLP (with GRN for V2) -> layer scale -> drop path run on the
    compact active rows only, scatter-added into the residual. Inactive sites of the block input are zero
    and receive nothing, so they stay zero: the same result as the masked-dense block, with the MLP on
    ~(1 - mask ratio) of the rows. Same submodules and parameters as timm's ConvNeXtBlock."""

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
        image = torch.div(index, h * w, rounding_mode="floor")  # the image of each row
        rows = _mlp_on_rows(self.mlp, rows, image, n)
        if self.gamma is not None:
            rows = rows * self.gamma
        if isinstance(self.drop_path, DropPath) and self.training and self.drop_path.drop_prob > 0:
            keep_prob = 1 - self.drop_path.drop_prob
            keep = rows.new_empty((n,)).bernoulli_(keep_prob)  # one draw per image, as timm's drop_path
            if self.drop_path.scale_by_keep:
                keep.div_(keep_prob)
            rows = rows * keep.index_select(0, image)[:, None]
        shortcut = _rows(self.shortcut(x))
        # Under autocast the branch (float32 after the layer scale) and the input may differ in dtype: the
        # sum takes the wider one, as timm's `branch + shortcut` does.
        dtype = torch.promote_types(shortcut.dtype, rows.dtype)
        out = shortcut.to(dtype).index_add(0, index, rows.to(dtype))
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


_CONTAINERS = frozenset(reviewed_containers())
# Masked norms that read a conv's output at active sites only (so the conv's own mask may be skipped).
_NORMS_READING_ACTIVE_SITES_ONLY = (MaskedBatchNorm2d, MaskedLayerNorm, MaskedGroupNorm)
# Within these blocks the forward applies the named norm directly to the named conv's output.
_CONV_THEN_NORM = conv_then_norm_pairs()
# Containers whose forward runs their children one after the other.
_SEQUENTIAL = ("torch.nn.modules.container.Sequential", "timm.models._features.FeatureListNet",
               "timm.models._features.FeatureDictNet")


def _conv_norm_pairs(module: nn.Module) -> List[Tuple[str, str]]:
    if _qualname(module) in _SEQUENTIAL:
        names = [name for name, _ in module.named_children()]
        # A child that timm's feature wrapper returns as a feature map is read by more than the next child.
        returned = getattr(module, "return_layers", {})
        return [(a, b) for a, b in zip(names[:-1], names[1:]) if a not in returned]
    return list(_CONV_THEN_NORM.get(_qualname(module), ()))


def _swap_class(module: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    """Give module a subclass of its own type: same object, same parameters and state_dict keys."""
    if not issubclass(cls, type(module)):
        raise AssertionError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls
    return module


def _is_container(module: nn.Module) -> bool:
    """A module converted child by child: a reviewed container, or a module from outside torch and timm (a
    user's own encoder or block) without parameters or buffers of its own."""
    if _qualname(module) in _CONTAINERS:
        return True
    if type(module).__module__.split(".")[0] in ("torch", "timm"):
        return False
    return next(module.parameters(recurse=False), None) is None and \
        next(module.buffers(recurse=False), None) is None and next(module.children(), None) is not None


class _Converter:
    def __init__(self, backend: Optional[str]):
        self.backend = backend
        self.fused = backend != REFERENCE

    def fail(self, module: nn.Module, path: str, why: str = "") -> None:
        raise UnsupportedLayerError(
            f"cannot make layer {path or '<root>'!r} of type {_qualname(module)} sparse{': ' + why if why else ''}. "
            f"Supported: Conv2d, MaxPool2d/AvgPool2d, global (adaptive 1x1) pooling, BatchNorm2d/SyncBatchNorm/"
            f"BatchNormAct2d, GroupNorm/GroupNorm1/GroupNormAct, LayerNorm (channels_last) and LayerNorm2d, ConvNeXt V1/V2 blocks, GRN, timm's "
            f"SE/EffectiveSE/SqueezeExcite/ECA/CECA/GatherExcite attention, zero-preserving activations and "
            f"dropouts, and containers of these (spark/families.py lists the reviewed timm blocks)")

    def convert_children(self, module: nn.Module, path: str) -> None:
        for name, child in list(module.named_children()):
            new = self.convert(child, f"{path}.{name}" if path else name)
            if new is not child:
                setattr(module, name, new)
        if self.fused:
            for conv_name, norm_name in _conv_norm_pairs(module):
                conv, norm = getattr(module, conv_name, None), getattr(module, norm_name, None)
                if type(conv) is MaskedConv2d and isinstance(norm, _NORMS_READING_ACTIVE_SITES_ONLY):
                    conv.mask_output = False

    def convert(self, module: nn.Module, path: str) -> nn.Module:
        conversion = CONVERSIONS.get(type(module))
        if conversion is not None:
            return conversion(self, module, path)
        if _is_container(module):
            self.convert_children(module, path)
            return module
        if _qualname(module).startswith(("timm.", "torch.")) and next(module.children(), None) is not None:
            self.fail(module, path, "a block whose forward the converter does not know (it may pool or resample "
                                    "the map outside its children); list it among its family's reviewed "
                                    "containers in spark/families.py once its forward composes only its children")
        self.fail(module, path)


# -- the conversion table: dense layer type -> function building its sparse replacement ------------------
Conversion = Callable[[_Converter, nn.Module, str], nn.Module]


def _keep(converter: _Converter, module: nn.Module, path: str) -> nn.Module:
    return module


def _masked_dense(cls: Type[nn.Module]) -> Conversion:
    """Swap in a masked subclass that runs the dense op, then zeros inactive sites (in place when fused)."""
    def convert(converter: _Converter, module: nn.Module, path: str) -> nn.Module:
        module = _swap_class(module, cls)
        module.in_place = converter.fused
        return module
    return convert


def _convert_conv(converter: _Converter, conv: nn.Conv2d, path: str) -> nn.Module:
    if SparseDepthwiseConv2d.unsupported_reason(conv) is None:
        return SparseDepthwiseConv2d.from_dense(conv, backend=converter.backend)
    if conv.padding_mode != "zeros":
        converter.fail(conv, path, f"padding_mode {conv.padding_mode!r} would read inactive sites through the border")
    return _masked_dense(MaskedConv2d)(converter, conv, path)


def _norm_act(cls: type) -> Conversion:
    """timm's norm + drop + act layers: the masked norm, keeping the (zero-preserving) drop and act."""
    def convert(converter: _Converter, norm: nn.Module, path: str) -> nn.Module:
        for part in ("drop", "act"):
            if type(getattr(norm, part)) not in ZERO_PRESERVING:
                converter.fail(getattr(norm, part), f"{path}.{part}", "does not map 0 to 0")
        drop, act = norm.drop, norm.act
        # from_dense takes a plain norm (MaskedGroupNorm's refuses one with submodules); drop and act hold
        # no state and are handed to the masked norm as they are.
        del norm.drop, norm.act
        try:
            masked = cls.from_dense(norm, backend=converter.backend)
        finally:
            norm.drop, norm.act = drop, act
        masked.drop, masked.act = drop, act
        return masked
    return convert


def _convert_batch_norm(converter: _Converter, bn: nn.Module, path: str) -> nn.Module:
    return MaskedBatchNorm2d.from_dense(bn, backend=converter.backend)


def _convert_group_norm(converter: _Converter, gn: nn.GroupNorm, path: str) -> nn.Module:
    return MaskedGroupNorm.from_dense(gn, backend=converter.backend)


def _layer_norm(data_format: str) -> Conversion:
    def convert(converter: _Converter, ln: nn.LayerNorm, path: str) -> nn.Module:
        return MaskedLayerNorm.from_dense(ln, data_format, backend=converter.backend)
    return convert


def _convert_pooling(converter: _Converter, module: nn.Module, path: str) -> nn.Module:
    """Global pooling and the attention modules built on it (spark/masked_pooling.py), swapped in place;
    their excitation layers act on pooled vectors, not on the map, and stay as they are."""
    why = masked_pooling.unsupported_reason(module)
    if why:
        converter.fail(module, path, why)
    module = _swap_class(module, MASKED_POOLING[type(module)])
    module.fused = converter.fused
    return module


def _convert_grn(converter: _Converter, grn: GlobalResponseNorm, path: str) -> nn.Module:
    return _swap_class(grn, MaskedGlobalResponseNorm)


# Per-row layers of a ConvNeXt block's MLP (applying them to compact rows is exact), by MLP type.
_MLP_PER_ROW_PARTS = {Mlp: ("act", "drop1", "norm", "drop2"), GlobalResponseNormMlp: ("act", "drop1", "drop2")}
_MASKED_DENSE_MLP = {Mlp: MaskedDenseMlp, GlobalResponseNormMlp: MaskedDenseGrnMlp}


def _convert_convnext_block(converter: _Converter, block: ConvNeXtBlock, path: str) -> nn.Module:
    mlp = block.mlp
    if type(mlp) not in _MLP_PER_ROW_PARTS:
        converter.fail(mlp, f"{path}.mlp", "the MLP of a ConvNeXt block must be a timm Mlp or GlobalResponseNormMlp")
    fc = (nn.Conv2d,) if block.use_conv_mlp else (nn.Linear,)
    if not (type(mlp.fc1) in fc and type(mlp.fc2) in fc):
        converter.fail(mlp, f"{path}.mlp", f"fc1 and fc2 must be {fc[0].__name__}")
    if block.use_conv_mlp and any(fc.kernel_size != (1, 1) or fc.groups != 1 for fc in (mlp.fc1, mlp.fc2)):
        converter.fail(mlp, f"{path}.mlp", "the 1x1-conv MLP must have 1x1 kernels and groups=1")
    for part in _MLP_PER_ROW_PARTS[type(mlp)]:
        if type(getattr(mlp, part)) not in ZERO_PRESERVING:
            converter.fail(getattr(mlp, part), f"{path}.mlp.{part}", "is not a per-element layer the converter knows")
    if isinstance(mlp, GlobalResponseNormMlp) and type(mlp.grn) is not GlobalResponseNorm:
        converter.fail(mlp.grn, f"{path}.mlp.grn", "the GRN of a ConvNeXt-V2 block must be timm's GlobalResponseNorm")
    if type(block.drop_path) not in (nn.Identity, DropPath):
        converter.fail(block.drop_path, f"{path}.drop_path")
    for name in ("conv_dw", "norm", "shortcut"):
        child = getattr(block, name)
        new = converter.convert(child, f"{path}.{name}")
        if new is not child:
            setattr(block, name, new)
    if converter.fused and type(block.conv_dw) is SparseDepthwiseConv2d and type(block.shortcut) is nn.Identity:
        return _swap_class(block, SparseConvNeXtBlock)
    # Masked-dense flavour (and blocks that change resolution): timm's forward with the MLP branch masked.
    if isinstance(mlp, GlobalResponseNormMlp):
        _swap_class(mlp.grn, MaskedGlobalResponseNorm)
    _swap_class(mlp, _MASKED_DENSE_MLP[type(mlp)])
    return block


CONVERSIONS: Dict[Type[nn.Module], Conversion] = {
    **{t: _keep for t in ZERO_PRESERVING},
    nn.Conv2d: _convert_conv,
    nn.MaxPool2d: _masked_dense(MaskedMaxPool2d),
    nn.AvgPool2d: _masked_dense(MaskedAvgPool2d),
    **{t: _convert_pooling for t in MASKED_POOLING},
    BatchNormAct2d: _norm_act(MaskedBatchNormAct2d),
    nn.BatchNorm2d: _convert_batch_norm,
    nn.SyncBatchNorm: _convert_batch_norm,
    **{t: _convert_group_norm for t in (nn.GroupNorm, TimmGroupNorm, TimmGroupNorm1)},
    GroupNormAct: _norm_act(MaskedGroupNormAct),
    GroupNorm1Act: _norm_act(MaskedGroupNormAct),
    TimmLayerNorm2d: _layer_norm("channels_first"),
    nn.LayerNorm: _layer_norm("channels_last"),
    TimmLayerNorm: _layer_norm("channels_last"),
    GlobalResponseNorm: _convert_grn,
    ConvNeXtBlock: _convert_convnext_block,
}


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


def _layer_kind(module: nn.Module) -> Optional[Tuple[str, bool]]:
    """(kind, runs fused) of a converted layer, None for layers that are not converted ones."""
    if isinstance(module, (SparseDepthwiseConv2d, MaskedConv2d)):
        k, stride = module.kernel_size[0], module.stride[0]
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        kind = f"depthwise {k}x{k}" + (f" stride {stride}" if stride > 1 else "") if depthwise else "conv"
        return kind, type(module) is SparseDepthwiseConv2d and module.backend != REFERENCE
    if isinstance(module, ConvNeXtBlock):
        kind = "ConvNeXt-V2 MLP + GRN" if isinstance(module.mlp, GlobalResponseNormMlp) else "ConvNeXt MLP"
        return kind, type(module) is SparseConvNeXtBlock
    for cls, kind in ((MaskedBatchNorm2d, "BatchNorm"), (MaskedLayerNorm, "LayerNorm"), (MaskedGroupNorm, "GroupNorm"),
                      (MaskedMaxPool2d, "max pool"), (MaskedAvgPool2d, "avg pool")):
        if isinstance(module, cls):
            return kind, cls in _NORMS_READING_ACTIVE_SITES_ONLY and module.backend != REFERENCE
    if type(module) in MASKED_POOLING.values():
        return type(module).__mro__[2].__name__, module.fused  # the timm class after the mixin
    return None


def execution_report(encoder: nn.Module) -> Dict[str, Dict[str, int]]:
    """How a converted encoder runs: {"fused": {kind: count}, "masked-dense": {kind: count}}. Fused layers
    read or compute active sites only (sparse depthwise convs, masked norm kernels, the ConvNeXt MLP on active
    rows, pooling that skips the masking pass); masked-dense ones run the dense op, then zero inactive sites."""
    report: Dict[str, Dict[str, int]] = {"fused": {}, "masked-dense": {}}
    for module in encoder.modules():
        kind = _layer_kind(module)
        if kind is not None:
            counts = report["fused" if kind[1] else "masked-dense"]
            counts[kind[0]] = counts.get(kind[0], 0) + 1
    return report
