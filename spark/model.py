"""SparK: sparse encoder + densify + light hierarchical decoder + masked, per-patch normalized loss."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
from torch import nn

import spark_kernels as sk
from spark_kernels.masks import patch_mask, upsample_mask
from spark_kernels.nn import MaskedBatchNorm2d, MaskedLayerNorm

from .decoder import LightDecoder, dense_memory_format
from .sparse_encoder import REFERENCE, sparse_encoder_

DECODER_WIDTH = 768  # LightDecoder(768, 32) of the paper and the official code
FINEST_LEVEL_STRIDE = 4  # densify levels sit at strides 4 .. downsample ratio; finer maps (a stem's) are not used
# Bumped whenever the model's parameters change meaning, so that checkpoints of an older model are refused.
# Architecture 1 (checkpoints without this stamp) had a densify level at stride 2 and Identity projections
# wherever the widths matched; 2 is the official SparK.
ARCHITECTURE = 2
TARGET_EPS = 1e-6
LOSS_EPS = 1e-8


def _feature_table(encoder: nn.Module) -> Tuple[List[int], List[int]]:
    """(channels, reductions) of the encoder's outputs, from timm-style `feature_info`."""
    info = getattr(encoder, "feature_info", None)
    if info is None:
        raise ValueError("encoder must expose multi-scale features like a timm features_only model: an "
                         "nn.Module returning a list of (N, C, H, W) maps with a `feature_info` attribute")
    if hasattr(info, "channels") and hasattr(info, "reduction"):
        return list(info.channels()), list(info.reduction())
    try:
        return [int(f["num_chs"]) for f in info], [int(f["reduction"]) for f in info]
    except (TypeError, KeyError) as e:
        raise ValueError(f"encoder.feature_info must be a timm FeatureInfo or a list of dicts with 'num_chs' and "
                         f"'reduction', got {type(info).__name__}") from e


def _input_channels(encoder: nn.Module) -> int:
    for m in encoder.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError("encoder has no nn.Conv2d; cannot tell how many image channels it takes")


def _has_layer_norm(encoder: nn.Module) -> bool:
    return any(isinstance(m, nn.LayerNorm) for m in encoder.modules())


class SparK(nn.Module):
    """SparK masked pretraining of a convnet (Tian et al., ICLR 2023), parameter for parameter the model of
    the official code (github keyu-tian/SparK, pretrain/).

    encoder: a timm model name (created with features_only=True, pretrained=False and `timm_kwargs`, e.g.
        drop_path_rate=0.1) or an nn.Module that returns multi-scale features with a timm-style
        `feature_info`; it is converted in place into a sparse encoder (same parameters and state_dict keys)
        and kept as ``self.encoder``.
    input_size: the pretraining resolution (a multiple of the encoder's downsample ratio); images of any
        multiple of the downsample ratio are accepted.
    mask_ratio: fraction of patches masked per image, in [0, 1).
    backend: "reference" for the masked-dense model that mirrors the official code; otherwise the
        spark_kernels backend of the fused layers (None: the best available for the images' device).
    decoder_width: channels of the decoder's first (deepest) step, halved at every step; 768, the paper's,
        unless a smaller decoder is wanted for speed (by FLOPs the decoder costs about width squared).

    Densify levels, deepest first, one per encoder stride from the downsample ratio down to 4 (the last
    feature map at that stride; a finer map such as a ResNet's stride-2 stem output is not used): masked norm
    (LN for encoders with LayerNorms, else BN), mask token at inactive sites, projection to the decoder
    width of that level: Identity only at the deepest level when the widths are equal, else a Conv2d with
    bias, 1x1 at the deepest level and 3x3 at the others.

    ``model(images, mask=None)`` returns the loss; ``model.reconstruct(images, mask=None)`` returns
    (images, masked images, reconstruction with the visible patches pasted back). mask: optional bool
    (B, 1, H / ratio, W / ratio) patch mask, True = visible; drawn at random when omitted.
    """

    def __init__(self, encoder: Union[str, nn.Module], input_size: int = 224, mask_ratio: float = 0.6,
                 backend: Optional[str] = None, decoder_width: int = DECODER_WIDTH, **timm_kwargs: Any):
        super().__init__()
        if backend is not None and backend not in sk.BACKEND_NAMES:
            raise ValueError(f"backend must be one of {list(sk.BACKEND_NAMES)} or None, got {backend!r}")
        _check_mask_ratio(mask_ratio)
        if isinstance(encoder, str):
            encoder = _create_timm_encoder(encoder, timm_kwargs)
        elif not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a timm model name or an nn.Module, got {type(encoder).__name__}")
        elif timm_kwargs:
            raise TypeError(f"keyword arguments {sorted(timm_kwargs)} are for timm.create_model and need a timm "
                            f"model name as encoder, not a built {type(encoder).__name__}")
        channels, reductions = _feature_table(encoder)
        ratio = max(reductions)
        if ratio < FINEST_LEVEL_STRIDE or ratio & (ratio - 1):
            raise ValueError(f"encoder's downsample ratio must be a power of 2 and at least {FINEST_LEVEL_STRIDE}, "
                             f"got {ratio}")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 or input_size % ratio:
            raise ValueError(f"input_size must be a positive multiple of the encoder's downsample ratio {ratio}, "
                             f"got {input_size!r}")
        self.input_size = input_size
        self.mask_ratio = float(mask_ratio)
        self.backend = backend
        self.downsample_ratio = ratio
        self.in_channels = _input_channels(encoder)
        use_layer_norm = _has_layer_norm(encoder)
        self.encoder = sparse_encoder_(encoder, backend)

        if isinstance(decoder_width, bool) or not isinstance(decoder_width, int) or decoder_width <= 0 \
                or decoder_width % ratio:
            raise ValueError(f"decoder_width must be a positive multiple of the encoder's downsample ratio {ratio} "
                             f"(it is halved at each of the decoder's {ratio.bit_length() - 1} steps), "
                             f"got {decoder_width!r}")
        self.decoder = LightDecoder(decoder_width, ratio, self.in_channels)
        # Encoder outputs fed to the decoder, deepest first: the last feature map at each level's stride
        # (None where the encoder provides none; that decoder step then gets no skip feature).
        self.feature_indices: List[Optional[int]] = []
        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        level_count = ratio.bit_length() - FINEST_LEVEL_STRIDE.bit_length() + 1
        for level, dec_width in enumerate(self.decoder.widths()[:level_count]):
            stride = ratio >> level
            idx = max((i for i, red in enumerate(reductions) if red == stride), default=None)
            self.feature_indices.append(idx)
            if idx is None:
                continue
            width = channels[idx]
            token = nn.Parameter(torch.zeros(1, width, 1, 1))
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            if use_layer_norm:
                self.densify_norms.append(MaskedLayerNorm(width, eps=1e-6, data_format="channels_first",
                                                          backend=backend))
            else:
                self.densify_norms.append(MaskedBatchNorm2d(width, backend=backend))
            if level == 0 and width == dec_width:
                self.densify_projs.append(nn.Identity())
            else:
                k = 1 if level == 0 else 3
                self.densify_projs.append(nn.Conv2d(width, dec_width, k, padding=k // 2, bias=True))
        if self.feature_indices[0] is None:
            raise ValueError(f"encoder provides no feature map at its downsample ratio {ratio}")

    # -- input checks -------------------------------------------------------------------------------------
    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must have shape (B, {self.in_channels}, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        r = self.downsample_ratio
        if h == 0 or w == 0 or h % r or w % r or images.shape[0] == 0:
            raise ValueError(f"images: height and width must be positive multiples of the downsample ratio {r} "
                             f"and the batch non-empty, got shape {tuple(images.shape)}")

    def _resolve_mask(self, images: torch.Tensor, mask) -> torch.Tensor:
        b, _, h, w = images.shape
        grid = (h // self.downsample_ratio, w // self.downsample_ratio)
        if mask is None:
            return patch_mask(b, grid, self.mask_ratio, device=images.device)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool (True = visible), got {mask.dtype}")
        if tuple(mask.shape) != (b, 1) + grid:
            raise ValueError(f"mask must have shape (B, 1, H/{self.downsample_ratio}, W/{self.downsample_ratio}) = "
                             f"{(b, 1) + grid} for images of shape {tuple(images.shape)}, got {tuple(mask.shape)}")
        if mask.device != images.device:
            raise ValueError(f"mask is on {mask.device} but images are on {images.device}")
        return mask

    # -- model ----------------------------------------------------------------------------------------------
    def _reconstruct_patches(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, C, H, W) in normalized-patch units, for the patch mask `mask`."""
        sites = sk.ActiveSites(mask)
        masked_images = images * upsample_mask(mask, *images.shape[-2:]).to(images.dtype)
        if self.backend != REFERENCE:
            # The kernels' fast path takes rows of channels per site; convs keep the layout they are given.
            masked_images = masked_images.contiguous(memory_format=torch.channels_last)
        with sk.active(sites):
            features = self.encoder(masked_images)
            to_decoder = []
            layer = 0
            for idx in self.feature_indices:
                if idx is None:
                    to_decoder.append(None)
                    continue
                f = self.densify_norms[layer](features[idx])
                f = torch.where(sites.at(*f.shape[-2:]).mask, f, self.mask_tokens[layer].to(f.dtype))
                to_decoder.append(self.densify_projs[layer](f.contiguous(memory_format=dense_memory_format(f.device))))
                layer += 1
        return self.decoder(to_decoder)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, C * p * p) patches of side p = downsample ratio."""
        b, c, h, w = x.shape
        p = self.downsample_ratio
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def _unpatchify(self, patches: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        b, c, h, w = like.shape
        p = self.downsample_ratio
        x = patches.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    @staticmethod
    def _patch_stats(patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True, unbiased=True) + TARGET_EPS).sqrt()
        return mean, std

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_images(images)
        mask = self._resolve_mask(images, mask)
        # The loss in the images' precision (float32 under autocast, whatever the decoder ran in).
        reconstruction = self._patchify(self._reconstruct_patches(images, mask)).to(images.dtype)
        target = self._patchify(images)
        mean, std = self._patch_stats(target)
        per_patch = ((reconstruction - (target - mean) / std) ** 2).mean(dim=-1)  # (B, L)
        masked = (~mask).reshape(mask.shape[0], -1).to(per_patch.dtype)
        return (per_patch * masked).sum() / (masked.sum() + LOSS_EPS)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images, masked images, reconstruction in pixel units with the visible patches pasted back).
        Runs in the module's current mode: call .eval() first to use the running BN statistics."""
        self._check_images(images)
        mask = self._resolve_mask(images, mask)
        visible = upsample_mask(mask, *images.shape[-2:])
        mean, std = self._patch_stats(self._patchify(images))
        predicted = self._unpatchify(self._patchify(self._reconstruct_patches(images, mask)) * std + mean, images)
        masked_images = images * visible.to(images.dtype)
        return images, masked_images, torch.where(visible, images, predicted)


def _create_timm_encoder(name: str, timm_kwargs: dict) -> nn.Module:
    import timm
    if "features_only" in timm_kwargs:
        raise ValueError("features_only: SparK always creates the timm encoder with features_only=True")
    kwargs = {"pretrained": False, **timm_kwargs}  # pretrained=True may be asked for
    try:
        return timm.create_model(name, features_only=True, **kwargs)
    except TypeError as err:
        if not timm_kwargs:
            raise
        raise TypeError(f"timm model {name!r} does not take the keyword arguments {sorted(timm_kwargs)}: "
                        f"{err}") from None


def _check_mask_ratio(mask_ratio) -> None:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
