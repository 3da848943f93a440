"""Global pooling over active sites, and the timm attention modules built on it, for the sparse encoder.

A global (or adaptive 1x1) average pool averages over an image's active sites only: the sum over them
divided by their count, 0 for an image with none. A global max pool takes the maximum over the active sites
(0 for an image with none). The excitation that follows (1x1 convs or a 1-D conv on the pooled vector, a
gate) acts per image, not per site, and runs as timm wrote it; the gated output ``x * gate`` is zero at
inactive sites because x is.

Each masked module is a subclass of the timm module, swapped in place (same parameters, same state_dict
keys). ``fused`` selects the path: the reference path zeroes inactive sites before the sum (the masked-dense
formulation); the fused path sums the map as it is (every layer of a converted encoder leaves exact zeros at
inactive sites), so it saves a full pass over the map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import spark_kernels as sk
from timm.layers.eca import CecaModule, EcaModule
from timm.layers.gather_excite import GatherExcite
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
from timm.models._efficientnet_blocks import SqueezeExcite as EfficientNetSqueezeExcite


def active_mask(x: torch.Tensor, layer: nn.Module, spatial_dims=(2, 3)) -> torch.Tensor:
    """The bool (N, 1, H, W) active mask at the scale of x (H, W: x's `spatial_dims`)."""
    sites = sk.current_sites()
    if sites is None:
        raise RuntimeError(f"{type(layer).__name__} needs active sites: run the encoder inside "
                           f"`with spark_kernels.active(sites): ...`")
    return sites.at(x.shape[spatial_dims[0]], x.shape[spatial_dims[1]]).mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, inactive_are_zero: bool) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 1, 1): mean over each image's active sites, 0 for an image with none."""
    total = (x if inactive_are_zero else torch.where(mask, x, x.new_zeros(()))).sum((2, 3), keepdim=True)
    count = mask.sum((2, 3), keepdim=True).clamp_min(1)
    return total / count.to(total.dtype)


def masked_amax(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 1, 1): max over each image's active sites, 0 for an image with none."""
    lowest = torch.finfo(x.dtype).min if x.is_floating_point() else torch.iinfo(x.dtype).min
    peak = torch.where(mask, x, x.new_full((), lowest)).amax((2, 3), keepdim=True)
    return torch.where(mask.any((2, 3), keepdim=True), peak, peak.new_zeros(()))


class _MaskedSqueeze:
    """What every masked pooling module shares: the squeeze over active sites."""

    fused: bool = False

    def squeeze(self, x: torch.Tensor, add_maxpool: bool = False) -> torch.Tensor:
        mask = active_mask(x, self)
        pooled = masked_mean(x, mask, inactive_are_zero=self.fused)
        if add_maxpool:  # timm's optional mean + max squeeze
            pooled = 0.5 * pooled + 0.5 * masked_amax(x, mask)
        return pooled


class MaskedAdaptiveAvgPool2d(_MaskedSqueeze, nn.AdaptiveAvgPool2d):
    """Global average pool (output size 1) over active sites."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.squeeze(x)


class MaskedAdaptiveMaxPool2d(_MaskedSqueeze, nn.AdaptiveMaxPool2d):
    """Global max pool (output size 1) over active sites."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_amax(x, active_mask(x, self))


class MaskedSEModule(_MaskedSqueeze, SEModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.fc1(self.squeeze(x, self.add_maxpool))
        return x * self.gate(self.fc2(self.act(self.bn(x_se))))


class MaskedEffectiveSEModule(_MaskedSqueeze, EffectiveSEModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc(self.squeeze(x, self.add_maxpool)))


class MaskedEfficientNetSqueezeExcite(_MaskedSqueeze, EfficientNetSqueezeExcite):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.conv_expand(self.act1(self.conv_reduce(self.squeeze(x))))
        return x * self.gate(x_se)


class MaskedEcaModule(_MaskedSqueeze, EcaModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.squeeze(x).view(x.shape[0], 1, -1))  # channels as a 1-D signal
        if self.conv2 is not None:
            y = self.conv2(self.act(y))
        return x * self.gate(y).view(x.shape[0], -1, 1, 1)


class MaskedCecaModule(_MaskedSqueeze, CecaModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(self.squeeze(x).view(x.shape[0], 1, -1), (self.padding, self.padding), mode="circular")
        return x * self.gate(self.conv(y)).view(x.shape[0], -1, 1, 1)


class MaskedGatherExcite(_MaskedSqueeze, GatherExcite):
    """Gather-excite without learned gather convs (extra_params=False): the gather is a global pool
    (extent 0) or an average (and optionally max) pool of window 2 * extent - 1 and stride extent over the
    active sites of each window (0 for a window with none), upsampled back (nearest) to gate x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extent == 0:
            gathered = self.squeeze(x, self.add_maxpool)
        else:
            mask = active_mask(x, self)
            gathered = self._window_mean(x, mask)
            if self.add_maxpool:
                gathered = 0.5 * gathered + 0.5 * self._window_max(x, mask)
        gathered = self.mlp(gathered)
        if gathered.shape[-2:] != (1, 1):
            gathered = F.interpolate(gathered, size=x.shape[-2:])
        return x * self.gate(gathered)

    def _window_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pool = dict(kernel_size=self.gk, stride=self.gs, padding=self.gk // 2)
        values = x if self.fused else torch.where(mask, x, x.new_zeros(()))
        # Both averages divide by the window's size: their ratio is sum / count over active sites.
        total = F.avg_pool2d(values, count_include_pad=True, divisor_override=1, **pool)
        count = F.avg_pool2d(mask.to(x.dtype), count_include_pad=True, divisor_override=1, **pool)
        return total / count.clamp_min(1)

    def _window_max(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pool = dict(kernel_size=self.gk, stride=self.gs, padding=self.gk // 2)
        lowest = torch.finfo(x.dtype).min
        peak = F.max_pool2d(torch.where(mask, x, x.new_full((), lowest)), **pool)
        any_active = F.max_pool2d(mask.to(x.dtype), **pool) > 0
        return torch.where(any_active, peak, peak.new_zeros(()))


# timm module type -> its masked subclass (swapped in place by the converter).
MASKED_POOLING = {
    nn.AdaptiveAvgPool2d: MaskedAdaptiveAvgPool2d, nn.AdaptiveMaxPool2d: MaskedAdaptiveMaxPool2d,
    SEModule: MaskedSEModule, EffectiveSEModule: MaskedEffectiveSEModule,
    EfficientNetSqueezeExcite: MaskedEfficientNetSqueezeExcite,
    EcaModule: MaskedEcaModule, CecaModule: MaskedCecaModule, GatherExcite: MaskedGatherExcite,
}


def unsupported_reason(module: nn.Module) -> str:
    """Why a pooling module in MASKED_POOLING cannot be converted, or "" if it can."""
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = module.output_size
        sizes = tuple(size) if isinstance(size, (tuple, list)) else (size,)
        if sizes not in ((1,), (1, 1)):
            return f"output_size {size}: only global pooling (output size 1) has a defined set of active sites"
        if getattr(module, "return_indices", False):
            return "return_indices=True"
    if isinstance(module, GatherExcite) and module.gather is not None:
        return ("gather-excite with learned gather convs (extra_params=True): a full-extent or strided "
                "depthwise conv over the map, whose masked semantics SparK does not define")
    return ""
