"""U-Net with a ResNet encoder (paper 3.1, 4.3.3-4.3.4), built from segmentation-models-pytorch parts.

smp's `Unet.forward` is `encoder(x) -> decoder(features) -> segmentation_head`; we keep its encoder
and decoder, give it the paper's 1x1 head and put dual attention between the first two, on every
encoder output except features[0] (the raw input, which smp's decoder drops anyway). Encoder stages
deeper than `encoder_depth` never run in smp's forward; they are removed so that every parameter
receives a gradient (DistributedDataParallel without find_unused_parameters fails otherwise) and
checkpoints carry no dead weights. For ResNet50 at depth 4 that is conv5_x (layer4, 14,964,736
parameters).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.base.initialization import initialize_head
from segmentation_models_pytorch.encoders.resnet import resnet_encoders
from torch import nn

from raysegm.models.attention import DualAttention

RESNET_ENCODERS = tuple(resnet_encoders)
NETWORK_PROBE_SECONDS = 3.0


class ResNetUNet(nn.Module):
    """smp U-Net on a ResNet encoder: (B, in_channels, H, W) -> logits (B, 1, H, W).

    encoder_depth 4 (the paper's "4 output layers") keeps skips at conv1 (H/2, 64 channels), conv2_x
    (H/4) and conv3_x (H/8), and the bridge at conv4_x (H/16); for ResNet50 the encoder outputs have
    3, 64, 256, 512, 1024 channels. The decoder has `decoder_channels` filters (512, 256, 128, 64),
    one block per encoder level; the head is a 1x1 conv to one logit channel (paper 4.3.3: "the final
    output uses a 1x1 kernel"; smp's own Unet head is 3x3).

    `attention=True` wraps encoder outputs 1..depth (every skip and the bridge) with DualAttention
    before the decoder sees them (`unet_resnet50_attention`).

    `encoder_weights`: "none", "imagenet" (the files smp itself uses, from the Hugging Face hub; fails
    at once with a clear message when offline), or a local state-dict file (safetensors or a
    `torch.load(weights_only=True)` file; keys with or without an "encoder." prefix, or a torchvision
    ResNet state dict).

    `freeze_stages` N >= 1 freezes the stem (conv1, bn1) and the first N-1 residual stages: weights
    and BatchNorm running statistics, whose modules stay in eval mode across `train()` calls.
    N >= encoder_depth freezes the whole encoder (N = 5 always does).
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        in_channels: int = 3,
        encoder_depth: int = 4,
        decoder_channels: tuple[int, ...] = (512, 256, 128, 64),
        encoder_weights: str = "none",
        freeze_stages: int = 0,
        attention: bool = False,
        attention_reduction: int = 16,
        attention_kernel: int = 7,
        attention_mode: str = "parallel",
    ):
        super().__init__()
        if encoder not in RESNET_ENCODERS:
            raise ValueError(f"ResNetUNet: encoder must be one of {', '.join(RESNET_ENCODERS)}, got {encoder!r}")
        if not 1 <= encoder_depth <= 5:
            raise ValueError(f"ResNetUNet: encoder_depth must be in 1..5, got {encoder_depth}")
        if len(decoder_channels) != encoder_depth:
            raise ValueError(
                f"ResNetUNet: decoder_channels needs one entry per encoder level ({encoder_depth}), "
                f"got {tuple(decoder_channels)}"
            )
        if in_channels < 1:
            raise ValueError(f"ResNetUNet: in_channels must be >= 1, got {in_channels}")
        if freeze_stages < 0:
            raise ValueError(f"ResNetUNet: freeze_stages must be >= 0, got {freeze_stages}")
        self.in_channels = in_channels
        unet = smp.Unet(
            encoder, encoder_depth=encoder_depth, decoder_channels=tuple(decoder_channels),
            encoder_weights=None, in_channels=3, classes=1,
        )
        self.encoder = unet.encoder
        for stage in range(encoder_depth, 5):
            delattr(self.encoder, f"layer{stage}")
        load_encoder_weights(self.encoder, encoder_weights, in_channels, encoder)
        self.attention = None
        if attention:
            self.attention = nn.ModuleList(
                DualAttention(channels, attention_reduction, attention_kernel, attention_mode)
                for channels in self.encoder.out_channels[1:]
            )
        self.decoder = unet.decoder
        self.segmentation_head = SegmentationHead(decoder_channels[-1], 1, kernel_size=1)
        initialize_head(self.segmentation_head)  # smp's own (Xavier weights, zero bias); Unet's was for its head
        self.frozen_norms = freeze_encoder_stages(self.encoder, freeze_stages)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        if self.attention is not None:
            features = [features[0]] + [attend(f) for attend, f in zip(self.attention, features[1:])]
        return self.segmentation_head(self.decoder(features))

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen_norms:
            self.encoder.get_submodule(name).eval()
        return self


def encoder_stages(encoder: nn.Module) -> list[list[str]]:
    """Module names per stage: [["conv1", "bn1"], ["layer1"], ...] for the stages the encoder kept."""
    stages = [["conv1", "bn1"]]
    stages += [[f"layer{k}"] for k in range(1, 5) if hasattr(encoder, f"layer{k}")]
    return stages


def freeze_encoder_stages(encoder: nn.Module, freeze_stages: int) -> tuple[str, ...]:
    """Freeze the stem and the first freeze_stages-1 residual stages; returns the frozen norm modules."""
    frozen_norms = []
    for names in encoder_stages(encoder)[:freeze_stages]:
        for name in names:
            module = encoder.get_submodule(name)
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                frozen_norms.append(name)
            frozen_norms += [
                f"{name}.{child}" for child, sub in module.named_modules()
                if child and isinstance(sub, nn.modules.batchnorm._BatchNorm)
            ]
    for name in frozen_norms:
        encoder.get_submodule(name).eval()
    return tuple(frozen_norms)


# ---------------------------------------------------------------------------------------------------
# encoder weights: none, imagenet from the hub, or a local file


def load_encoder_weights(encoder: nn.Module, source: str, in_channels: int, encoder_name: str) -> None:
    """Load `source` into a 3-channel encoder, then adapt its first conv to `in_channels` as smp does."""
    if source in ("", "none"):
        encoder.set_in_channels(in_channels, pretrained=False)
        return
    if source == "imagenet":
        state = imagenet_state_dict(encoder_name)
        label = f"imagenet weights of {encoder_name}"
    else:
        state = read_state_dict(source)
        label = str(source)
    state = encoder_keys(state, encoder)
    first_conv = state.get("conv1.weight")
    if first_conv is not None and first_conv.shape[1] == in_channels != 3:
        encoder.set_in_channels(in_channels, pretrained=False)
        check_state_dict(encoder, state, label)
        encoder.load_state_dict(state)
        return
    check_state_dict(encoder, state, label)
    encoder.load_state_dict(state)
    encoder.set_in_channels(in_channels, pretrained=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a weights_only torch file (a {"state_dict": ...} wrapper is fine)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path} (model.encoder_weights)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or pickled file: say which and why, whatever the loader raised
        raise ValueError(f"{path}: not a readable state dict ({type(error).__name__}: {error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    return state


def encoder_keys(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Strip "module."/"encoder." prefixes; drop the classifier and stages the encoder does not run."""
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("encoder.") for key in state):
        state = {key.removeprefix("encoder."): v for key, v in state.items() if key.startswith("encoder.")}
    unused = ("fc.",) + tuple(f"layer{k}." for k in range(1, 5) if not hasattr(encoder, f"layer{k}"))
    return {key: value for key, value in state.items() if not key.startswith(unused)}


def check_state_dict(encoder: nn.Module, state: dict[str, torch.Tensor], label: str) -> None:
    """Raise one ValueError naming the source and the first mismatches (missing, unexpected, shape)."""
    expected = encoder.state_dict()
    # old torchvision files lack BatchNorm's batch counter; torch fills it in on load
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state if k in expected and state[k].shape != expected[k].shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            problems.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})")
    if problems:
        raise ValueError(f"{label}: does not fit the {type(encoder).__name__}: {'; '.join(problems)}")


def imagenet_state_dict(encoder_name: str) -> dict[str, torch.Tensor]:
    """The encoder's ImageNet weights from the hub files smp uses; one clear RuntimeError when unreachable.

    smp retries the hub for about 25 s before failing; we check HF_HUB_OFFLINE and probe the endpoint
    with a short timeout first, and then look only in the local cache.
    """
    from huggingface_hub import constants, hf_hub_download
    from safetensors.torch import load_file

    settings = resnet_encoders[encoder_name]["pretrained_settings"].get("imagenet")
    if settings is None:
        raise ValueError(f"{encoder_name} has no imagenet weights in segmentation-models-pytorch")
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    reason = "HF_HUB_OFFLINE is set" if offline else network_problem(endpoint)
    try:
        path = hf_hub_download(
            settings["repo_id"], filename="model.safetensors", revision=settings["revision"],
            endpoint=endpoint, local_files_only=reason is not None, etag_timeout=NETWORK_PROBE_SECONDS,
        )
    except Exception as error:  # HTTP, network and cache-miss errors all mean the weights are not here
        raise RuntimeError(
            f"imagenet weights for {encoder_name} could not be downloaded from {endpoint}/{settings['repo_id']} "
            f"and are not in the local Hugging Face cache ({reason or type(error).__name__}). Download them "
            f"where a network is available, or set model.encoder_weights to a local file (safetensors or "
            f"torch state dict of the encoder, e.g. torchvision's {encoder_name} weights)."
        ) from error
    return load_file(path, device="cpu")


def network_problem(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached within NETWORK_PROBE_SECONDS, or None when it can. Behind a proxy
    (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY set) a direct connection proves nothing, so the download is
    left to try through it."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                             "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=NETWORK_PROBE_SECONDS):
            return None
    except OSError as error:
        return f"{url.hostname}:{port} unreachable: {error}"
