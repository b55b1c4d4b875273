"""The model registry: one shared tester over every variant, the ResNet50 layout, weights and freezing."""

from __future__ import annotations

import dataclasses
import time

import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from safetensors.torch import save_file

from raysegm.config import ModelSettings
from raysegm.losses import make_loss
from raysegm.metrics import SegmentationMeter, confusion_counts, scores
from raysegm.models import (
    REGISTRY,
    DualAttention,
    ResNetUNet,
    components,
    count_parameters,
    create_model,
    model_name,
)

SMALL = ModelSettings(encoder="resnet18", unet_width=8)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on busy shared cores two threads stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VARIANT_CASES = [pytest.param(variant, SMALL, id=variant) for variant in REGISTRY] + [
    pytest.param("unet_resnet50", dataclasses.replace(SMALL, encoder="resnet34"), id="resnet34"),
    pytest.param("unet_resnet50_attention", dataclasses.replace(SMALL, encoder="resnet34", attention_mode="sequential"),
                 id="resnet34-attention-sequential"),
    pytest.param("unet", dataclasses.replace(SMALL, upsample="bilinear", unet_depth=3), id="unet-bilinear-depth3"),
    pytest.param("unet_attention", dataclasses.replace(SMALL, upsample="bilinear", attention_mode="sequential"),
                 id="unet-attention-bilinear-sequential"),
]


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize(("variant", "settings"), VARIANT_CASES)
@pytest.mark.parametrize("in_channels", [3, 1])
def test_every_variant_maps_images_to_logits_and_back_propagates(variant, settings, in_channels):
    torch.manual_seed(0)
    model = create_model(dataclasses.replace(settings, variant=variant), in_channels=in_channels)
    images = torch.randn(2, in_channels, 64, 64)
    logits = model(images)
    assert logits.shape == (2, 1, 64, 64)
    make_loss("bce_dice")(logits, (images[:, :1] > 0).float()).backward()
    assert first_conv(model).in_channels == in_channels
    assert first_conv(model).weight.grad.abs().sum() > 0
    # DistributedDataParallel (find_unused_parameters=False) needs a gradient for every trainable parameter
    without_grad = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []


def test_resnet50_layout_matches_the_paper():
    settings = ModelSettings(variant="unet_resnet50", encoder="resnet50", encoder_weights="none")
    model = create_model(settings)
    assert model.encoder.out_channels == [3, 64, 256, 512, 1024]
    assert [block.conv2[0].out_channels for block in model.decoder.blocks] == [512, 256, 128, 64]
    head = model.segmentation_head[0]
    assert (head.in_channels, head.out_channels, head.kernel_size) == (64, 1, (1, 1))  # paper 4.3.3
    assert torch.count_nonzero(head.bias) == 0  # smp's head initialisation: Xavier weights, zero bias
    assert not hasattr(model.encoder, "layer4")  # conv5_x never runs at encoder depth 4
    reference = smp.Unet("resnet50", encoder_depth=4, decoder_channels=(512, 256, 128, 64),
                         encoder_weights=None, classes=1)
    conv5_x = sum(p.numel() for p in reference.encoder.layer4.parameters())
    assert count_parameters(reference) == (35_935_617, 35_935_617)
    head_3x3_to_1x1 = 64 * 9 - 64  # smp's head is a 3x3 conv, ours the paper's 1x1
    assert count_parameters(model) == (35_935_617 - conv5_x - head_3x3_to_1x1,) * 2 == (20_970_369,) * 2
    assert model_name(settings) == "unet_resnet50"


def test_registry_builds_the_contracts_attention_r16_k7():
    # the equation tests pass r and k explicitly; this is what a default-built variant gets
    model = create_model(ModelSettings(variant="unet_resnet50_attention", encoder="resnet18"))
    blocks = [m for m in model.modules() if isinstance(m, DualAttention)]
    assert [b.channels for b in blocks] == [64, 64, 128, 256]  # conv1, conv2_x, conv3_x, the conv4_x bridge
    for block in blocks:
        assert block.spatial_conv.kernel_size == (7, 7)
        assert block.channel_mlp[0].out_features == max(1, block.channels // 16)


def test_model_name_records_a_swapped_encoder():
    assert model_name(ModelSettings(variant="unet_resnet50_attention", encoder="resnet18")) == (
        "unet_resnet50_attention[resnet18]"
    )
    assert model_name(ModelSettings(variant="unet", encoder="resnet18")) == "unet"
    with pytest.raises(ValueError, match="unet_resnet50_attention"):
        model_name(ModelSettings(variant="deeplab"))


@pytest.mark.parametrize("variant", list(REGISTRY))
def test_components_say_what_each_built_variant_has(variant):
    model = create_model(dataclasses.replace(SMALL, variant=variant))
    has = components(variant)
    assert ("ResNet encoder" in has) == isinstance(model, ResNetUNet)
    assert ("attention" in has) == any(isinstance(m, DualAttention) for m in model.modules())
    assert components("unet_resnet50_attention") == {"ResNet encoder", "attention"} and components("unet") == set()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variant": "segformer"}, "unknown model variant"),
        ({"variant": "unet_resnet50", "encoder": "vgg16"}, "encoder must be one of"),
        ({"variant": "unet_resnet50", "decoder_channels": (64, 32)}, "one entry per encoder level"),
        ({"variant": "unet", "upsample": "nearest"}, "upsample"),
        ({"variant": "unet_resnet50", "freeze_stages": -1}, "freeze_stages"),
    ],
)
def test_illegal_settings_raise_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        create_model(dataclasses.replace(SMALL, **changes))


def test_count_parameters_by_hand():
    layer = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    assert count_parameters(layer) == (8, 8)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == (8, 6)


# ---------------------------------------------------------------------------------------------------
# encoder weights


def encoder_output(model, images):
    model.eval()
    with torch.no_grad():
        return model.encoder(images)[-1]


def test_local_weights_load_in_every_accepted_form(tmp_path):
    torch.manual_seed(1)
    donor = create_model(dataclasses.replace(SMALL, variant="unet_resnet50"))
    whole_model = tmp_path / "whole.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(whole_model))
    torchvision_file = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), torchvision_file)

    images = torch.randn(1, 3, 64, 64)
    torch.manual_seed(2)
    untouched = encoder_output(create_model(dataclasses.replace(SMALL, variant="unet_resnet50")), images)
    torch.manual_seed(2)
    loaded = create_model(dataclasses.replace(SMALL, variant="unet_resnet50", encoder_weights=str(whole_model)))
    assert torch.equal(encoder_output(loaded, images), encoder_output(donor, images))
    assert not torch.allclose(encoder_output(loaded, images), untouched)

    tv_model = create_model(dataclasses.replace(SMALL, variant="unet_resnet50", encoder_weights=str(torchvision_file)))
    assert torch.equal(tv_model.encoder.layer3[1].conv2.weight, torch.load(torchvision_file)["layer3.1.conv2.weight"])

    # a 3-channel file into a 1-channel model: smp's rule sums the first conv over its input channels
    gray = create_model(dataclasses.replace(SMALL, variant="unet_resnet50", encoder_weights=str(whole_model)),
                        in_channels=1)
    assert torch.allclose(gray.encoder.conv1.weight, donor.encoder.conv1.weight.sum(1, keepdim=True))


def test_missing_or_mismatched_weights_file_names_the_file(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        create_model(dataclasses.replace(SMALL, variant="unet_resnet50", encoder_weights=str(missing)))
    resnet34_file = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), resnet34_file)
    with pytest.raises(ValueError, match=r"resnet34\.pt.*unexpected"):
        create_model(dataclasses.replace(SMALL, variant="unet_resnet50", encoder_weights=str(resnet34_file)))
    resnet50_file = tmp_path / "resnet50.safetensors"
    save_file(torchvision.models.resnet50(weights=None).state_dict(), str(resnet50_file))
    with pytest.raises(ValueError, match=r"resnet50\.safetensors.*wrong shape"):
        create_model(dataclasses.replace(SMALL, variant="unet_resnet50", encoder_weights=str(resnet50_file)))
    not_weights = tmp_path / "notes.pt"
    not_weights.write_text("not a tensor file")
    with pytest.raises(ValueError, match="notes.pt"):
        create_model(dataclasses.replace(SMALL, variant="unet_resnet50", encoder_weights=str(not_weights)))


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_imagenet_weights_fail_fast_offline(how, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    settings = dataclasses.replace(SMALL, variant="unet_resnet50", encoder_weights="imagenet")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="imagenet weights for resnet18 could not be downloaded.*local file"):
        create_model(settings)
    assert time.monotonic() - start < 10


def test_imagenet_weights_come_from_the_hub_cache_smp_uses_without_network(monkeypatch, tmp_path):
    from huggingface_hub import constants
    from segmentation_models_pytorch.encoders.resnet import resnet_encoders

    hub = resnet_encoders["resnet18"]["pretrained_settings"]["imagenet"]
    snapshot_dir = tmp_path / f"models--{hub['repo_id'].replace('/', '--')}" / "snapshots" / hub["revision"]
    snapshot_dir.mkdir(parents=True)
    torch.manual_seed(3)
    weights = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if not k.startswith("fc.")}
    save_file(weights, str(snapshot_dir / "model.safetensors"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_model(dataclasses.replace(SMALL, variant="unet_resnet50", encoder_weights="imagenet"))
    assert torch.equal(model.encoder.layer2[0].conv1.weight, weights["layer2.0.conv1.weight"])


# ---------------------------------------------------------------------------------------------------
# freezing for fine-tuning


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_freeze_stages_3_keeps_stem_layer1_layer2_and_their_statistics_fixed():
    torch.manual_seed(0)
    model = create_model(dataclasses.replace(SMALL, variant="unet_resnet50_attention", freeze_stages=3))
    encoder = model.encoder
    frozen = [encoder.conv1, encoder.bn1, encoder.layer1, encoder.layer2]
    frozen_size = sum(p.numel() for m in frozen for p in m.parameters())
    total, trainable = count_parameters(model)
    assert trainable == total - frozen_size
    assert all(p.requires_grad for p in encoder.layer3.parameters())

    model.train()
    assert not encoder.bn1.training and not encoder.layer2[1].bn2.training
    assert encoder.layer3[0].bn1.training and model.decoder.training

    parts = {"bn1": encoder.bn1, "layer1": encoder.layer1, "layer2": encoder.layer2,
             "layer3": encoder.layer3, "decoder": model.decoder}
    before = {name: snapshot(module) for name, module in parts.items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images = torch.randn(2, 3, 64, 64) * 3 + 1  # off-centre statistics move any BN that still tracks
    optimizer.zero_grad()
    make_loss("bce")(model(images), (images[:, :1] > 1).float()).backward()
    optimizer.step()
    after = {name: snapshot(module) for name, module in parts.items()}
    for name in ("bn1", "layer1", "layer2"):
        assert all(torch.equal(before[name][k], after[name][k]) for k in before[name]), name
    for name, key in [("layer3", "0.conv1.weight"), ("layer3", "0.bn1.running_mean"),
                      ("decoder", "blocks.0.conv1.0.weight")]:
        assert not torch.equal(before[name][key], after[name][key]), (name, key)


def test_freeze_stages_5_freezes_the_whole_encoder():
    model = create_model(dataclasses.replace(SMALL, variant="unet_resnet50", freeze_stages=5))
    encoder_size = sum(p.numel() for p in model.encoder.parameters())
    total, trainable = count_parameters(model)
    assert trainable == total - encoder_size
    model.train()
    assert not any(m.training for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))


# ---------------------------------------------------------------------------------------------------
# learning


def squares(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images with one bright square each (some have none); the mask is the square."""
    images = torch.randn(count, 3, size, size, generator=generator) * 0.3
    masks = torch.zeros(count, 1, size, size)
    for index in range(count):
        if index % 4 == 3:
            continue
        row, col = torch.randint(0, size - 12, (2,), generator=generator).tolist()
        masks[index, :, row:row + 12, col:col + 12] = 1
    return images + masks, masks


@pytest.mark.parametrize("variant", ["unet", "unet_attention"])
def test_classic_unet_learns_bright_squares(variant):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = create_model(ModelSettings(variant=variant, unet_width=4, unet_depth=2))
    loss_fn = make_loss("bce_dice")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_images, train_masks = squares(16, 32, generator)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = loss_fn(model(train_images), train_masks)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    test_images, test_masks = squares(8, 32, generator)
    model.eval()
    meter = SegmentationMeter()
    with torch.no_grad():
        meter.update([f"p{i // 4}" for i in range(8)], list(range(8)), torch.sigmoid(model(test_images)), test_masks)
    assert losses[-1] < 0.5 * losses[0]
    assert meter.summary(n_boot=100)["pooled"]["dice"] > 0.8


def squares_among_bars(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image: a filled 12x12 square (the mask) and two 4x30 bars exactly as bright (not in the
    mask). No intensity threshold tells them apart; the shape does."""
    images = torch.zeros(count, 1, size, size)
    masks = torch.zeros(count, 1, size, size)
    for index in range(count):
        row, col = torch.randint(0, size - 12, (2,), generator=generator).tolist()
        masks[index, :, row:row + 12, col:col + 12] = 1
        for horizontal in (True, False):
            for _ in range(20):  # a place that does not touch the square
                r, c = torch.randint(0, size - 30, (2,), generator=generator).tolist()
                bar = torch.zeros(size, size)
                if horizontal:
                    bar[r:r + 4, c:c + 30] = 1
                else:
                    bar[r:r + 30, c:c + 4] = 1
                if not (bar[max(row - 2, 0):row + 14, max(col - 2, 0):col + 14]).any():
                    break
            images[index, 0] = torch.maximum(images[index, 0], bar)
    images = torch.maximum(images, masks) + 0.2 * torch.randn(count, 1, size, size, generator=generator)
    return images.expand(-1, 3, -1, -1).contiguous(), masks


@pytest.mark.parametrize("variant", list(REGISTRY))
def test_every_variant_learns_a_shape_no_threshold_separates(variant):
    """The best single intensity threshold scores pooled Dice < 0.6 here; each model must reach 0.8."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    settings = ModelSettings(variant=variant, encoder="resnet18", decoder_channels=(64, 32, 16, 8),
                             unet_width=8, unet_depth=3)
    model = create_model(settings)
    loss_fn = make_loss("bce_dice")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_images, train_masks = squares_among_bars(32, 64, generator)
    for step in range(120):
        batch = slice((step % 4) * 8, (step % 4) * 8 + 8)
        optimizer.zero_grad()
        loss_fn(model(train_images[batch]), train_masks[batch]).backward()
        optimizer.step()
    test_images, test_masks = squares_among_bars(8, 64, generator)
    truth = test_masks[:, 0].numpy() > 0
    best_threshold = max(scores(confusion_counts(test_images[:, 0].numpy() > t, truth).sum(axis=0))["dice"]
                         for t in torch.linspace(-0.5, 1.5, 41).tolist())
    assert best_threshold < 0.6
    model.eval()
    meter = SegmentationMeter()
    with torch.no_grad():
        meter.update([f"p{i}" for i in range(8)], [0] * 8, torch.sigmoid(model(test_images)), test_masks)
    assert meter.summary(n_boot=100)["pooled"]["dice"] > 0.8
