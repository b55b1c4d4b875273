"""Dual attention against the paper's equations (section 3.2), and where the variants place it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from raysegm.config import ModelSettings
from raysegm.models import DualAttention, create_model


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on busy shared cores two threads stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand_set_module(mode: str) -> DualAttention:
    """Two channels, 1x1 spatial conv (w 0.5, b -2), W0 = [1 0 0 -1], W1 = [1, -1]^T, no biases."""
    module = DualAttention(2, reduction=2, kernel_size=1, mode=mode)
    with torch.no_grad():
        module.spatial_conv.weight.fill_(0.5)
        module.spatial_conv.bias.fill_(-2.0)
        module.channel_mlp[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, -1.0]]))
        module.channel_mlp[0].bias.zero_()
        module.channel_mlp[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        module.channel_mlp[2].bias.zero_()
    return module


# F: channel 0 = [1, 3], channel 1 = [3, -1] on a 1x2 map
HAND_FEATURES = torch.tensor([[[[1.0, 3.0]], [[3.0, -1.0]]]])


def test_parallel_mode_on_hand_computed_numbers():
    # S: max_c + mean_c = [3 + 2, 3 + 1] = [5, 4] -> conv -> [0.5, 0] -> sigmoid
    s0, s1 = sigmoid(0.5), sigmoid(0.0)
    # C: [maxpool || avgpool] = [3, 3, 2, 1]; W0 -> 3 - 1 = 2; ReLU 2; W1 -> [2, -2] -> sigmoid
    c0, c1 = sigmoid(2.0), sigmoid(-2.0)
    expected = torch.tensor([[[[1 * (s0 + c0), 3 * (s1 + c0)]], [[3 * (s0 + c1), -1 * (s1 + c1)]]]])
    module = hand_set_module("parallel")
    assert torch.allclose(module(HAND_FEATURES), expected, atol=1e-6)
    assert torch.allclose(module.spatial_map(HAND_FEATURES), torch.tensor([[[[s0, s1]]]]), atol=1e-6)
    assert torch.allclose(module.channel_map(HAND_FEATURES).flatten(), torch.tensor([c0, c1]), atol=1e-6)


def test_sequential_mode_is_channel_then_spatial_on_hand_computed_numbers():
    c0, c1 = sigmoid(2.0), sigmoid(-2.0)
    refined = [[1 * c0, 3 * c0], [3 * c1, -1 * c1]]  # F' = C * F
    expected = []
    for channel in refined:
        row = []
        for col in range(2):
            column = [refined[0][col], refined[1][col]]
            s = sigmoid(0.5 * (max(column) + sum(column) / 2) - 2.0)
            row.append(s * channel[col])
        expected.append([row])
    module = hand_set_module("sequential")
    assert torch.allclose(module(HAND_FEATURES), torch.tensor([expected]), atol=1e-6)


@pytest.mark.parametrize(("channels", "reduction", "kernel_size"), [(32, 16, 7), (5, 16, 3), (64, 4, 5)])
def test_parallel_mode_matches_the_equations_with_explicit_ops(channels, reduction, kernel_size):
    torch.manual_seed(0)
    module = DualAttention(channels, reduction=reduction, kernel_size=kernel_size)
    features = torch.randn(2, channels, 9, 11)
    assert module.spatial_conv.in_channels == 1  # the SUM of the max and mean maps, not their concatenation
    hidden = max(1, channels // reduction)
    w0, w1 = module.channel_mlp[0], module.channel_mlp[2]
    assert (w0.in_features, w0.out_features, w1.out_features) == (2 * channels, hidden, channels)

    pooled_map = features.max(dim=1, keepdim=True).values + features.mean(dim=1, keepdim=True)
    spatial = torch.sigmoid(F.conv2d(pooled_map, module.spatial_conv.weight, module.spatial_conv.bias,
                                     padding=kernel_size // 2))
    pooled = torch.cat([features.flatten(2).max(dim=2).values, features.flatten(2).mean(dim=2)], dim=1)
    channel = torch.sigmoid(torch.relu(pooled @ w0.weight.T + w0.bias) @ w1.weight.T + w1.bias)
    expected = spatial * features + channel[:, :, None, None] * features
    assert spatial.shape == (2, 1, 9, 11)
    assert torch.allclose(module(features), expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": 0},
        {"channels": 8, "reduction": 0},
        {"channels": 8, "kernel_size": 4},
        {"channels": 8, "kernel_size": 0},
        {"channels": 8, "kernel_size": -3},
        {"channels": 8, "mode": "cbam"},
    ],
)
def test_illegal_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match="DualAttention"):
        DualAttention(**kwargs)


def test_wrong_channel_count_is_an_error():
    with pytest.raises(ValueError, match="expected 8 channels"):
        DualAttention(8)(torch.randn(1, 4, 5, 5))


# ---------------------------------------------------------------------------------------------------
# placement: every skip level and the bottleneck, never the raw input


def capture_outputs(modules) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    for module in modules:
        module.register_forward_hook(lambda _m, _inputs, output: outputs.append(output))
    return outputs


def test_classic_unet_decoder_reads_attended_skips_and_bottleneck():
    torch.manual_seed(0)
    model = create_model(ModelSettings(variant="unet_attention", unet_width=4, unet_depth=3)).eval()
    assert [a.channels for a in model.attention] == [4, 8, 16, 32]  # three skips, then the bottleneck
    assert create_model(ModelSettings(variant="unet", unet_width=4, unet_depth=3)).attention is None
    attended = capture_outputs(model.attention)
    decoder_inputs: list[torch.Tensor] = []
    for up_conv in model.up_conv:
        up_conv.register_forward_pre_hook(lambda _m, inputs: decoder_inputs.append(inputs[0]))
    first_up_inputs: list[torch.Tensor] = []
    model.up[0].register_forward_pre_hook(lambda _m, inputs: first_up_inputs.append(inputs[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert torch.equal(first_up_inputs[0], attended[3])  # the decoder starts from the attended bottleneck
    assert len(decoder_inputs) == 3
    for level, concatenated in zip((2, 1, 0), decoder_inputs):
        skip = attended[level]
        assert torch.equal(concatenated[:, : skip.shape[1]], skip)


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50"])
def test_resnet_decoder_reads_attended_encoder_outputs_but_not_the_raw_input(encoder):
    torch.manual_seed(0)
    settings = ModelSettings(variant="unet_resnet50_attention", encoder=encoder)
    model = create_model(settings).eval()
    assert [a.channels for a in model.attention] == model.encoder.out_channels[1:]
    assert len(model.attention) == settings.encoder_depth == 4
    assert create_model(dataclasses.replace(settings, variant="unet_resnet50")).attention is None
    encoder_features: list[list[torch.Tensor]] = []
    model.encoder.register_forward_hook(lambda _m, _inputs, output: encoder_features.append(output))
    attended = capture_outputs(model.attention)
    decoder_features: list[list[torch.Tensor]] = []
    model.decoder.register_forward_pre_hook(lambda _m, inputs: decoder_features.append(inputs[0]))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(images)
    received = decoder_features[0]
    assert received[0] is images  # features[0], the raw input, passes through untouched
    assert len(received) == len(attended) + 1
    for got, attended_map, raw in zip(received[1:], attended, encoder_features[0][1:]):
        assert got is attended_map
        assert not torch.allclose(got, raw)
