"""SparK's light hierarchical decoder (paper, appendix A), written from the paper's description."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn


def dense_memory_format(device: torch.device) -> torch.memory_format:
    """Memory format of the dense convs after the encoder (the densify projections and the decoder): NCHW on
    CPUs, where oneDNN ran this decoder's forward + backward 1.5x faster in NCHW than in channels_last (width
    768, batch 16, 224 px, an AVX2 CPU); channels_last elsewhere (cuDNN's tensor-core convs take NHWC)."""
    return torch.contiguous_format if device.type == "cpu" else torch.channels_last


class _ReLU6Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.clamp(0, 6)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        # 0 < y < 6 exactly where 0 < x < 6: the gradient of hardtanh, read from the output.
        return grad_y * ((y > 0) & (y < 6))


class ReLU6(nn.Module):
    """min(max(x, 0), 6) whose backward reads its output, which the next conv keeps anyway: one tensor kept for
    backward where nn.ReLU6(inplace=True) keeps two (PyTorch's in-place hardtanh saves a copy of its input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU6Function.apply(x)


class UpsampleBlock(nn.Sequential):
    """One decoder step: transposed conv (kernel 4, stride 2, padding 1) doubling the resolution, then
    conv3x3 -> BN -> ReLU6 -> conv3x3 -> BN, going from `in_channels` to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose2d(in_channels, in_channels, kernel_size=4, stride=2, padding=1, bias=True),
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            ReLU6(),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class LightDecoder(nn.Module):
    """Widths halve from `width` at every upsampling step; `log2(upsample_ratio)` steps bring the
    deepest feature map back to the input resolution, and a 1x1 conv maps to `out_channels` pixels.

    forward(features) takes the skip features deepest first; features[i] (width // 2**i channels) is
    added before step i. Fewer features than steps is fine; None entries are skipped."""

    def __init__(self, width: int = 768, upsample_ratio: int = 32, out_channels: int = 3):
        super().__init__()
        steps = int(round(math.log2(upsample_ratio)))
        if 2 ** steps != upsample_ratio:
            raise ValueError(f"upsample_ratio must be a power of 2, got {upsample_ratio}")
        if width % 2 ** steps:
            raise ValueError(f"width {width} must be divisible by 2**{steps} for {steps} halving steps")
        self.width = width
        self.upsample_ratio = upsample_ratio
        widths = [width >> i for i in range(steps + 1)]
        self.steps = nn.ModuleList(UpsampleBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Conv2d(widths[-1], out_channels, kernel_size=1, bias=True)
        self.reset_parameters()

    def widths(self) -> List[int]:
        """Channels expected of the skip feature added before each step."""
        return [self.width >> i for i in range(len(self.steps))]

    def reset_parameters(self) -> None:
        """The official initialization: 3x3 convs and the 1x1 head trunc-normal (std 0.02), transposed convs
        kaiming-normal (fan_out, relu), biases 0, BN weight 1."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, features: List[Optional[torch.Tensor]]) -> torch.Tensor:
        x = 0
        for i, step in enumerate(self.steps):
            if i < len(features) and features[i] is not None:
                f = features[i]
                x = x + f.contiguous(memory_format=dense_memory_format(f.device))
            x = step(x)
        return self.head(x)
