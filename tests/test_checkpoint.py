"""Checkpoint folders: round trip in a fresh process, safe loading only, model ids."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from raysegm.checkpoint import (
    capture_rng_state,
    load_model,
    load_training_state,
    model_id,
    restore_rng_state,
    save_checkpoint,
    save_ensemble,
)
from raysegm.config import ExperimentConfig, replace
from raysegm.models import create_model
from raysegm.models.ensemble import SeedEnsemble

CONFIG = replace(
    ExperimentConfig(),
    data={"size": 64, "normalize": "volume_zscore"},
    model={"variant": "unet_resnet50_attention", "encoder": "resnet18", "freeze_stages": 2,
           "encoder_weights": "/nowhere/resnet18.safetensors"},
)
TINY = replace(ExperimentConfig(), data={"size": 32}, model={"variant": "unet", "unet_width": 4, "unet_depth": 2})


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on busy shared cores two threads stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_model(config: ExperimentConfig = CONFIG) -> torch.nn.Module:
    """A model whose weights and BatchNorm statistics are not the fresh ones (so loading must restore them)."""
    torch.manual_seed(0)
    settings = replace(config, model={"encoder_weights": "none"}).model
    model = create_model(settings, in_channels=config.data.in_channels)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images = torch.randn(2, config.data.in_channels, 32, 32) + 0.5
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(images), (images[:, :1] > 0).float()).backward()
    optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The resnet18 attention variant with frozen stages, saved through a DataParallel wrapper."""
    model = trained_model()
    directory = save_checkpoint(tmp_path_factory.mktemp("checkpoint"), torch.nn.DataParallel(model), CONFIG)
    return model, directory


def test_checkpoint_folder_layout(saved):
    _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert not any(key.startswith("module.") for key in load_file(str(directory / "model.safetensors")))
    written = json.loads((directory / "config.json").read_text())
    assert {k: written[k] for k in ("variant", "model_name", "encoder", "in_channels", "size", "normalize")} == {
        "variant": "unet_resnet50_attention", "model_name": "unet_resnet50_attention[resnet18]",
        "encoder": "resnet18", "in_channels": 3, "size": 64, "normalize": "volume_zscore",
    }


def test_round_trip_gives_identical_outputs(saved):
    model, directory = saved
    images = torch.randn(2, 3, 64, 64)
    loaded, config = load_model(directory)
    assert config == CONFIG  # including the encoder_weights path, which loading never touches
    assert not loaded.training and not loaded.encoder.bn1.training
    loaded.train()
    assert not loaded.encoder.bn1.training  # freeze_stages came back with the config
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


@pytest.mark.slow
def test_round_trip_in_a_fresh_process_gives_identical_outputs(saved, tmp_path):
    model, directory = saved
    images = torch.randn(2, 3, 64, 64)
    save_file({"images": images}, str(tmp_path / "images.safetensors"))
    with torch.no_grad():
        expected = model(images)
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from raysegm.checkpoint import load_model
        model, config = load_model({str(directory)!r})
        assert not model.training and config.model.freeze_stages == 2
        with torch.no_grad():
            logits = model(load_file({str(tmp_path / "images.safetensors")!r})["images"])
        save_file({{"logits": logits}}, {str(tmp_path / "logits.safetensors")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    reloaded = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    assert torch.allclose(reloaded, expected, atol=1e-5)


def test_model_id_is_the_weights_sha256_prefix(tmp_path):
    directory = save_checkpoint(tmp_path / "a", trained_model(TINY), TINY)
    digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert model_id(directory) == digest[:16]
    assert len(model_id(directory)) == 16
    other = create_model(TINY.model)
    assert model_id(save_checkpoint(tmp_path / "b", other, TINY)) != model_id(directory)


def test_training_state_round_trips_with_weights_only(tmp_path):
    model = trained_model(TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 32, 32)).mean().backward()
    optimizer.step()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    state = {"epoch": 3, "optimizer": optimizer.state_dict(), "rng": capture_rng_state(),
             "history": {1: {"train_loss": 0.5}, 2: {"train_loss": 0.4}}}
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    save_checkpoint(tmp_path / "c", model, TINY, training_state=state)

    loaded = load_training_state(tmp_path / "c")
    assert loaded["epoch"] == 3 and loaded["history"][2] == {"train_loss": 0.4}
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    fresh.load_state_dict(loaded["optimizer"])
    first = next(iter(optimizer.state.values()))["exp_avg"]
    assert torch.equal(next(iter(fresh.state.values()))["exp_avg"], first)
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws

    save_checkpoint(tmp_path / "c", model, TINY)  # saved again without a state: the stale one goes
    assert load_training_state(tmp_path / "c") is None


class NotPlainData:
    def __init__(self):
        self.payload = "anything the unpickler would run"


def test_a_pickled_object_in_the_training_state_is_refused(tmp_path):
    directory = save_checkpoint(tmp_path / "d", trained_model(TINY), TINY)
    torch.save({"epoch": 1, "thing": NotPlainData()}, directory / "training_state.pt")
    with pytest.raises(ValueError, match=r"training_state\.pt: refused"):
        load_training_state(directory)


def test_saving_a_state_that_weights_only_cannot_read_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"training_state\['rng'\]\['numpy'\]: a ndarray"):
        save_checkpoint(tmp_path / "e", trained_model(TINY), TINY, training_state={"rng": {"numpy": np.zeros(3)}})
    assert not (tmp_path / "e" / "model.safetensors").exists()  # nothing half-written


def test_plain_torch_weights_are_accepted_but_pickles_are_not(tmp_path):
    model = trained_model(TINY)
    directory = save_checkpoint(tmp_path / "f", model, TINY)
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "model.pt")
    loaded, _ = load_model(directory)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save(model, directory / "model.pt")  # a whole pickled module
    with pytest.raises(ValueError, match=r"model\.pt: refused"):
        load_model(directory)
    # weights_only loads these, but they are no state dict: named, not an AttributeError
    for value, found in (([torch.zeros(2)], "a list"), ({"x": 1}, "a dict with values other than tensors")):
        torch.save(value, directory / "model.pt")
        with pytest.raises(ValueError, match=rf"{directory / 'model.pt'}: not a state dict .*: it holds {found}$"):
            load_model(directory)


def test_bad_checkpoints_are_clear_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    directory = tmp_path / "g"
    shutil.copytree(saved[1], directory)
    (directory / "config.json").write_text(
        (directory / "config.json").read_text().replace('"encoder": "resnet18"', '"encoder": "resnet34"')
    )
    with pytest.raises(ValueError, match=r"model\.safetensors: weights do not fit unet_resnet50_attention\[resnet34\]"):
        load_model(directory)
    older = tmp_path / "older"  # a ResNet checkpoint from before the paper's 1x1 head
    shutil.copytree(saved[1], older)
    state = load_file(str(older / "model.safetensors"))
    state["segmentation_head.0.weight"] = torch.zeros(1, state["segmentation_head.0.weight"].shape[1], 3, 3)
    save_file(state, str(older / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: a unet_resnet50_attention\[resnet18\] with a 3x3 head"):
        load_model(older)
    one_channel = replace(TINY, data={"in_channels": 1})
    with pytest.raises(ValueError, match="3 input channels"):
        save_checkpoint(tmp_path / "h", trained_model(TINY), one_channel)


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_truncated_checkpoint_files_are_named(tmp_path, cut):
    model = trained_model(TINY)
    state = {"epoch": 1, "history": {1: {"train_loss": 0.5}}}
    directory = save_checkpoint(tmp_path / "i", model, TINY, training_state=state)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    for name in ("model.safetensors", "training_state.pt", "config.json"):
        data = (directory / name).read_bytes()
        (directory / name).write_bytes(b"" if cut == "empty" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"training_state\.pt: unreadable training state \("):
        load_training_state(directory)
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(directory)
    (directory / "config.json").write_text(json.dumps({"train": {"epoch": 3}}))
    with pytest.raises(ValueError, match=r"config\.json: unknown config key\(s\): train\.epoch"):
        load_model(directory)
    save_checkpoint(tmp_path / "j", model, TINY)
    shutil.copy(tmp_path / "j" / "config.json", directory / "config.json")
    with pytest.raises(ValueError, match=r"model\.safetensors: unreadable weights \(\w+"):
        load_model(directory)
    (directory / "model.safetensors").unlink()
    data = (tmp_path / "model.pt").read_bytes()
    (directory / "model.pt").write_bytes(b"" if cut == "empty" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.pt: unreadable weights \(\w+"):
        load_model(directory)


def test_a_seed_ensemble_is_one_checkpoint_whose_probability_is_its_members_mean(tmp_path):
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(TINY.model, in_channels=3).eval()
        members.append((model, save_checkpoint(tmp_path / f"seed-{seed}", model, replace(TINY, train={"seed": seed}))))
    directory = save_ensemble(tmp_path / "ensemble", [path for _, path in members])
    ensemble, config = load_model(directory)
    assert isinstance(ensemble, SeedEnsemble) and config.train.ensemble == 2 and config.train.seed == 0
    assert sorted({key.split(".")[1] for key in load_file(str(directory / "model.safetensors"))}) == ["0", "1"]
    assert model_id(directory) not in {model_id(path) for _, path in members}
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        by_hand = (torch.sigmoid(members[0][0](images)) + torch.sigmoid(members[1][0](images))) / 2
        assert torch.allclose(torch.sigmoid(ensemble(images)), by_hand, atol=1e-6)
        assert not torch.allclose(by_hand, torch.sigmoid(members[0][0](images)), atol=1e-3)


def test_an_ensemble_of_unlike_members_is_refused(tmp_path):
    torch.manual_seed(0)
    first = save_checkpoint(tmp_path / "a", create_model(TINY.model, 3), TINY)
    wider = replace(TINY, model={"unet_width": 8})
    with pytest.raises(ValueError, match=r"model\.\*"):
        save_ensemble(tmp_path / "e", [first, save_checkpoint(tmp_path / "b", create_model(wider.model, 3), wider)])
    other_size = replace(TINY, data={"size": 64})
    with pytest.raises(ValueError, match=r"data\.size"):
        save_ensemble(tmp_path / "e", [first, save_checkpoint(tmp_path / "c", create_model(TINY.model, 3), other_size)])
    with pytest.raises(ValueError, match="at least 2 members"):
        save_ensemble(tmp_path / "e", [first])
    pair = save_ensemble(tmp_path / "pair", [first, first])
    with pytest.raises(ValueError, match="already an ensemble of 2"):
        save_ensemble(tmp_path / "e", [pair, first])
    assert not (tmp_path / "e").exists()
