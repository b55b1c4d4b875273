"""The classic U-Net (paper 4.3.1), optionally with dual attention on its skips and bottleneck."""

from __future__ import annotations

import torch
from torch import nn

from raysegm.models.attention import DualAttention

UPSAMPLE_MODES = ("transpose", "bilinear")


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """(3x3 conv -> BN -> ReLU) twice; the convolutions carry no bias since BN follows."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def up_layer(channels: int, upsample: str) -> nn.Module:
    """Doubles the side and halves the channels: a 2x2 transposed conv, or bilinear + 1x1 conv."""
    if upsample == "transpose":
        return nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2)
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(channels, channels // 2, kernel_size=1),
    )


class UNet(nn.Module):
    """Classic U-Net: (B, in_channels, H, W) -> logits (B, 1, H, W); H and W divisible by 2**depth.

    Level l (0..depth-1) holds `width * 2**l` filters; the bottleneck `width * 2**depth` at H / 2**depth.
    Paper 4.3.1 gives "64 filters and bottleneck has 128", one pooling level; we keep its 64 filters at
    the top (`width`) and its doubling per level, at the classic U-Net's depth 4 (`depth=1` is the
    paper's literal reading).
    Down: double conv, then 2x2 max-pool. Up: transposed conv (or bilinear), concatenation with the skip
    of the same level, double conv. Head: 1x1 conv to one logit channel (the sigmoid lives in the loss).

    With `attention=True` a DualAttention module refines every skip and the bottleneck before the
    decoder reads them (the `unet_attention` variant). The encoder path itself continues from the
    unrefined features, as it does in the ResNet variant where attention wraps the encoder's outputs.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 64,
        depth: int = 4,
        upsample: str = "transpose",
        attention: bool = False,
        attention_reduction: int = 16,
        attention_kernel: int = 7,
        attention_mode: str = "parallel",
    ):
        super().__init__()
        if in_channels < 1 or width < 1 or depth < 1:
            raise ValueError(
                f"UNet: in_channels, width and depth must be >= 1, got {in_channels}, {width}, {depth}"
            )
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"UNet: upsample must be one of {', '.join(UPSAMPLE_MODES)}, got {upsample!r}")
        self.in_channels = in_channels
        self.depth = depth
        level_channels = [width * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList()
        previous = in_channels
        for channels in level_channels[:-1]:
            self.down.append(double_conv(previous, channels))
            previous = channels
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double_conv(level_channels[-2], level_channels[-1])
        self.attention = None
        if attention:
            self.attention = nn.ModuleList(
                DualAttention(channels, attention_reduction, attention_kernel, attention_mode)
                for channels in level_channels
            )
        self.up = nn.ModuleList(up_layer(channels, upsample) for channels in reversed(level_channels[1:]))
        self.up_conv = nn.ModuleList(
            double_conv(channels, channels // 2) for channels in reversed(level_channels[1:])
        )
        self.head = nn.Conv2d(width, 1, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        side = 2**self.depth
        if images.shape[-2] % side or images.shape[-1] % side:
            raise ValueError(f"UNet: height and width must be divisible by {side}, got {tuple(images.shape)}")
        skips = []
        features = images
        for block in self.down:
            features = block(features)
            skips.append(features)
            features = self.pool(features)
        features = self.bottleneck(features)
        if self.attention is not None:
            skips = [attend(skip) for attend, skip in zip(self.attention, skips)]
            features = self.attention[-1](features)
        for up, up_conv, skip in zip(self.up, self.up_conv, reversed(skips)):
            features = up_conv(torch.cat([skip, up(features)], dim=1))
        return self.head(features)
