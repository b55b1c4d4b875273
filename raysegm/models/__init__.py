"""The model registry: four U-Net variants keyed by lowercase names, built from `ModelSettings`.

Adding a variant is one builder below plus one line in `REGISTRY`. Every model maps
(B, in_channels, H, W) to logits (B, 1, H, W); the classic U-Nets need H and W divisible by
2**unet_depth; the ResNet variants take any size (smp's decoder resizes its upsampled features to each skip).
Settings a variant has no use for are ignored: the classic U-Nets have no pretrained encoder to load
or freeze (encoder, encoder_weights, freeze_stages), the ResNet variants no unet_width/unet_depth/upsample,
so one study config can span all four variants.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from raysegm.config import ModelSettings
from raysegm.models.attention import DualAttention
from raysegm.models.resnet_unet import ResNetUNet
from raysegm.models.unet import UNet

__all__ = ["REGISTRY", "DualAttention", "ResNetUNet", "UNet", "components", "count_parameters", "create_model",
           "model_name"]


def _unet(model: ModelSettings, in_channels: int, attention: bool) -> nn.Module:
    return UNet(
        in_channels, width=model.unet_width, depth=model.unet_depth, upsample=model.upsample,
        attention=attention, attention_reduction=model.attention_reduction,
        attention_kernel=model.attention_kernel, attention_mode=model.attention_mode,
    )


def _resnet_unet(model: ModelSettings, in_channels: int, attention: bool) -> nn.Module:
    return ResNetUNet(
        model.encoder, in_channels, encoder_depth=model.encoder_depth,
        decoder_channels=model.decoder_channels, encoder_weights=model.encoder_weights,
        freeze_stages=model.freeze_stages, attention=attention,
        attention_reduction=model.attention_reduction, attention_kernel=model.attention_kernel,
        attention_mode=model.attention_mode,
    )


REGISTRY: dict[str, partial] = {
    "unet": partial(_unet, attention=False),
    "unet_attention": partial(_unet, attention=True),
    "unet_resnet50": partial(_resnet_unet, attention=False),
    "unet_resnet50_attention": partial(_resnet_unet, attention=True),
}
DEFAULT_ENCODER = "resnet50"  # the encoder the ResNet variants are named after


def create_model(model: ModelSettings, in_channels: int = 3) -> nn.Module:
    """Build `model.variant`: (B, in_channels, H, W) -> logits (B, 1, H, W); unknown names are a ValueError."""
    builder = REGISTRY.get(model.variant)
    if builder is None:
        raise ValueError(f"unknown model variant {model.variant!r}; choose one of {', '.join(REGISTRY)}")
    return builder(model, in_channels)


def model_name(model: ModelSettings) -> str:
    """The variant, plus the encoder in brackets when a ResNet variant's encoder is swapped.

    "unet_resnet50" with encoder resnet50; "unet_resnet50[resnet18]" with resnet18.
    """
    if model.variant not in REGISTRY:
        raise ValueError(f"unknown model variant {model.variant!r}; choose one of {', '.join(REGISTRY)}")
    if REGISTRY[model.variant].func is _resnet_unet and model.encoder != DEFAULT_ENCODER:
        return f"{model.variant}[{model.encoder}]"
    return model.variant


def components(variant: str) -> frozenset[str]:
    """What `variant` adds to the classic U-Net ("ResNet encoder", "attention"), read off its registry
    entry: a paired difference between two variants isolates the components one has and the other lacks."""
    if variant not in REGISTRY:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {', '.join(REGISTRY)}")
    builder = REGISTRY[variant]
    return frozenset({"ResNet encoder"} if builder.func is _resnet_unet else set()) | frozenset(
        {"attention"} if builder.keywords.get("attention") else set())


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; frozen encoder stages count as not trainable."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable
