"""Every preset in configs/ loads, passes the training checks and builds its model and loss."""

from pathlib import Path

import pytest
import torch

from raysegm.config import POSTPROCESS, load_config, replace
from raysegm.losses import make_loss
from raysegm.models import create_model
from raysegm.train import check_settings
from raysegm.tune import check_study, trial_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_presets_the_docs_name_exist():
    names = {p.name for p in PRESETS}
    assert {"demo.yaml", "cpu-small.yaml", "paper.yaml", "best.yaml", "ablation-demo.yaml", "ablation-lgg.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_is_valid(path):
    config = load_config(path)
    check_settings(config)
    make_loss(config.train.loss)
    # no download here: the ImageNet encoder is the same network with other numbers in it
    model = create_model(replace(config, model={"encoder_weights": "none"}).model, config.data.model_channels)
    # twice the deepest downsampling (2**depth) of either network family: a side every variant accepts
    side = 2 ** max(config.model.encoder_depth, config.model.unet_depth) * 2
    with torch.no_grad():
        logits = model.eval()(torch.zeros(1, config.data.model_channels, side, side))
    assert logits.shape == (1, 1, side, side)
    assert config.data.size % side == 0, "the slice size must be divisible by the network's downsampling"
    assert config.infer.postprocess in POSTPROCESS


@pytest.mark.parametrize("path", [p for p in PRESETS if p.name.startswith("ablation-")], ids=lambda p: p.name)
def test_every_trial_of_an_ablation_preset_builds_and_runs(path):
    config = load_config(path)
    grid = check_study(config)
    assert len(grid) == len(config.tune.variants) * len(config.tune.batch_sizes) * len(config.tune.losses)
    for params in grid:
        trial = trial_config(config, params)
        model = create_model(replace(trial, model={"encoder_weights": "none"}).model, trial.data.model_channels)
        side = 2 ** max(trial.model.encoder_depth, trial.model.unet_depth) * 2
        images, masks = torch.randn(2, trial.data.model_channels, side, side), torch.zeros(2, 1, side, side)
        loss = make_loss(trial.train.loss)(model.train()(images), masks)
        loss.backward()
        assert torch.isfinite(loss), params


def test_a_config_saved_over_another_is_never_left_cut(tmp_path, monkeypatch):
    import json

    from raysegm.config import save_json

    path = tmp_path / "config.json"
    first = replace(load_config(ROOT / "configs" / "demo.yaml"), train={"epochs": 3})
    save_json(first, path)
    assert json.loads(path.read_text())["train"]["epochs"] == 3

    write_text = Path.write_text

    def dies_halfway(self, data, *args, **kwargs):  # the process is killed in the middle of the write
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_json(replace(first, train={"epochs": 5}), path)
    monkeypatch.undo()
    assert json.loads(path.read_text())["train"]["epochs"] == 3  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # and no temporary left beside it
