"""Dual attention (paper section 3.2): spatial and channel attention applied to encoder features."""

from __future__ import annotations

import torch
from torch import nn

MODES = ("parallel", "sequential")


class DualAttention(nn.Module):
    """Spatial plus channel attention on a feature map F of shape (B, C, H, W); output has F's shape.

    Paper section 3.2, with k = `kernel_size` and r = `reduction`:

        S    = sigmoid(Conv_kxk(max_c F + mean_c F))                  (B, 1, H, W)
        C    = sigmoid(W1 ReLU(W0 [maxpool_hw F || avgpool_hw F]))    (B, C, 1, 1)
        F_DA = S * F + C * F                                          mode "parallel" (the paper)

    The spatial map is the SUM of the channel-max and channel-mean maps, so the convolution has one
    input channel. W0 maps the 2C pooled values to max(1, C // r), W1 maps those back to C.
    Mode "sequential" is the original CBAM order, channel first, then spatial on the result:
    F' = C(F) * F, out = S(F') * F'.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, mode: str = "parallel"):
        super().__init__()
        if channels < 1:
            raise ValueError(f"DualAttention: channels must be >= 1, got {channels}")
        if reduction < 1:
            raise ValueError(f"DualAttention: reduction must be >= 1, got {reduction}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"DualAttention: kernel_size must be odd and >= 1, got {kernel_size}")
        if mode not in MODES:
            raise ValueError(f"DualAttention: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.channels = channels
        self.mode = mode
        hidden = max(1, channels // reduction)
        self.spatial_conv = nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2)
        self.channel_mlp = nn.Sequential(
            nn.Linear(2 * channels, hidden),  # W0
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),  # W1
        )

    def spatial_map(self, features: torch.Tensor) -> torch.Tensor:
        """S = sigmoid(Conv_kxk(max_c F + mean_c F)), shape (B, 1, H, W)."""
        pooled = features.amax(dim=1, keepdim=True) + features.mean(dim=1, keepdim=True)
        return torch.sigmoid(self.spatial_conv(pooled))

    def channel_map(self, features: torch.Tensor) -> torch.Tensor:
        """C = sigmoid(W1 ReLU(W0 [maxpool_hw F || avgpool_hw F])), shape (B, C, 1, 1)."""
        pooled = torch.cat([features.amax(dim=(2, 3)), features.mean(dim=(2, 3))], dim=1)
        return torch.sigmoid(self.channel_mlp(pooled))[:, :, None, None]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.channels:
            raise ValueError(f"DualAttention: expected {self.channels} channels, got {tuple(features.shape)}")
        if self.mode == "parallel":
            return self.spatial_map(features) * features + self.channel_map(features) * features
        refined = self.channel_map(features) * features
        return self.spatial_map(refined) * refined

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mode={self.mode}"
