"""Ray Train training: settings checks, the schedule, learning on synthetic data, a worker killed
mid-run, and resuming a run from its storage path."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from raysegm.config import load_config, replace, to_dict
from raysegm.train import HISTORY_COLUMNS, VAL_METRIC, build_trainer, check_settings, lr_factor, train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def demo_config(storage: Path, name: str, **sections):
    """configs/demo.yaml with its run folder under `storage` and any section overrides."""
    config = load_config(DEMO)
    return replace(config, run={"name": name, "storage_path": str(storage)}, **sections)


def history_json(run_dir: Path) -> pd.DataFrame:
    return pd.DataFrame(json.loads((run_dir / "history.json").read_text()), columns=list(HISTORY_COLUMNS))


def read_history(run_dir: Path) -> pd.DataFrame:
    """history.csv, checked against history.json."""
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.columns) == list(HISTORY_COLUMNS)
    pd.testing.assert_frame_equal(history_json(run_dir), history, check_dtype=False)
    return history


# ---------------------------------------------------------------------------------------------------
# fast: no Ray


def test_a_resume_may_lengthen_the_run_but_not_change_what_it_trains(tmp_path):
    from raysegm.config import save_json
    from raysegm.train import _check_resumable

    config = demo_config(tmp_path, "resumed")
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    # as build_trainer saves it: the manifest the run prepared filled in
    saved = replace(config, data={"manifest": str(run_dir / "data" / "manifest.parquet")})
    save_json(saved, run_dir / "config.json")
    for changed in ({"train": {"lr": 0.01}}, {"model": {"variant": "unet_attention"}},
                    {"data": {"size": 32}}, {"data": {"manifest": str(tmp_path / "other.parquet")}}):
        section, values = next(iter(changed.items()))
        key, value = next(iter(values.items()))
        before = getattr(getattr(saved, section), key)
        with pytest.raises(ValueError, match=re.escape(f"started with other settings ({section}.{key} "
                                                       f"{before!r} -> {value!r})")):
            train(replace(config, **changed), resume=True)
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(json.dumps(to_dict(saved)))
    _check_resumable(to_dict(saved), replace(config, train={"epochs": config.train.epochs + 5},
                                             scale={"num_workers": 1}, data={"read_cache_mb": 0}),
                     run_dir / "config.json")
    # the run's own manifest, named where the run folder now lives (moved or copied)
    moved = replace(config, data={"manifest": str(tmp_path / "moved" / "resumed" / "data" / "manifest.parquet")})
    _check_resumable(to_dict(saved), moved, run_dir / "config.json")


def test_paths_are_made_absolute_and_a_folder_saved_with_relative_ones_still_resumes(tmp_path, monkeypatch):
    from raysegm.train import _check_resumable, absolute_paths

    monkeypatch.chdir(tmp_path)
    config = replace(demo_config(tmp_path, "relative"), data={"manifest": "prep/m.parquet"},
                     model={"variant": "unet_resnet50", "encoder": "resnet18", "encoder_weights": "w.safetensors"})
    absolute = absolute_paths(config)
    assert absolute.data.manifest == str(tmp_path / "prep" / "m.parquet")
    assert absolute.model.encoder_weights == str(tmp_path / "w.safetensors")
    for not_a_path in ("", "none", "imagenet"):  # "" is "none" to the encoder loader: not the current folder
        assert absolute_paths(replace(config, model={"encoder_weights": not_a_path})).model.encoder_weights == not_a_path
    assert absolute_paths(replace(config, data={"manifest": ""})).data.manifest == ""
    # a folder saved before paths were made absolute: the same relative paths resume, other ones do not
    _check_resumable(to_dict(config), absolute, tmp_path / "config.json")
    with pytest.raises(ValueError, match="model.encoder_weights"):
        _check_resumable(to_dict(config), replace(absolute, model={"encoder_weights": "/elsewhere/w.safetensors"}),
                         tmp_path / "config.json")


@pytest.mark.parametrize(("section", "values", "message"), [
    ("train", {"precision": "fp16"}, "fp16 needs CUDA"),
    ("train", {"optimizer": "sgd"}, "train.optimizer must be one of"),
    ("train", {"schedule": "step"}, "train.schedule must be one of"),
    ("train", {"precision": "fp8"}, "train.precision must be one of"),
    ("train", {"batch_size": 7}, "must split evenly across scale.num_workers 2"),
    ("data", {"context_slices": -1}, "data.context_slices must be >= 0"),
    ("data", {"read_cache_mb": -1}, "data.read_cache_mb must be >= 0"),
    ("data", {"intensity_augment": 1.5}, "data.intensity_augment is a probability"),
    ("data", {"sequence_dropout": -0.1}, "data.sequence_dropout is a probability"),
    ("data", {"sequence_dropout": 0.1, "in_channels": 1}, "data.sequence_dropout needs the three sequences"),
    ("model", {"variant": "unet_resnet"}, r"model.variant must be one of \['unet', "),
    ("train", {"loss": "focal"}, r"train.loss must be one of \['bce', "),
    ("data", {"normalize": "minmax"}, r"data.normalize must be one of \['scale', 'volume_zscore', 'imagenet'\]"),
    ("data", {"normalize": "imagenet", "in_channels": 1}, "data.normalize imagenet needs 3 sequences a slice"),
    ("train", {"batch_size": -2}, "train.batch_size must be at least 1, got -2"),
    ("train", {"batch_size": 0}, "train.batch_size must be at least 1, got 0"),
    ("data", {"size": 0}, "data.size must be at least 1, got 0"),
    ("data", {"in_channels": 0}, "data.in_channels must be at least 1, got 0"),
    ("data", {"size": 36}, r"data.size 36 must be divisible by 8 for unet \(model.unet_depth 3 poolings\)"),
    ("data", {"clip_percentiles": [99.5, 0.5]}, r"data.clip_percentiles must be 0 <= low < high <= 100"),
    ("train", {"schedule": "cosine", "warmup_epochs": 3, "epochs": 3}, "train.warmup_epochs must be >= 0"),
    ("train", {"warmup_epochs": -1}, r"below train.epochs \d+; got -1"),
    ("train", {"epochs": 0}, "train.epochs must be at least 1, got 0"),
    ("scale", {"num_workers": 0}, "scale.num_workers must be at least 1, got 0"),
    ("train", {"lr": 0.0}, "train.lr must be above 0, got 0.0"),
    ("train", {"weight_decay": -0.1}, "train.weight_decay must be at least 0, got -0.1"),
    ("scale", {"torch_threads": 0}, "scale.torch_threads must be at least 1, got 0"),
    ("scale", {"worker_resources": {"CPU": 1}}, "got CPU: 1"),
    ("scale", {"worker_resources": {"node2": "abc"}}, "got node2: 'abc'"),
    ("data", {"tumor_oversample": 0.5}, "data.tumor_oversample must be at least 1, got 0.5"),
    ("data", {"val_fraction": 1.5}, r"data.val_fraction must be in \[0, 1\), got 1.5"),
    ("data", {"folds": 5, "fold": 5}, "data.fold must be in 0..data.folds - 1, got 5"),
    ("data", {"folds": 1}, r"data.folds must be 0 \(a plain split\) or at least 2, got 1"),
    ("model", {"unet_width": 0}, r"model settings unet: ValueError: UNet: in_channels, width and depth must be >= 1"),
    ("model", {"variant": "unet_attention", "attention_kernel": 4}, "kernel_size must be odd"),
    ("model", {"variant": "unet_resnet50", "encoder": "resnet18", "encoder_weights": "/nowhere/w.safetensors"},
     "model.encoder_weights: file not found: /nowhere/w.safetensors"),
    ("model", {"variant": "unet_resnet50", "encoder": "resnet18", "freeze_stages": 2},
     "model.freeze_stages 2 would keep randomly initialised encoder stages fixed"),
])
def test_settings_the_loop_cannot_honour_are_refused(tmp_path, section, values, message):
    config = demo_config(tmp_path, "refused", **{section: values})
    with pytest.raises(ValueError, match=message):
        check_settings(config)
    with pytest.raises(ValueError, match=message):
        train(config)
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(("values", "message"), [
    ({"num_to_keep": 0}, "run.num_to_keep must be at least 1, got 0"),
    ({"max_failures": -2}, "run.max_failures must be at least 0, or -1 for no limit, got -2"),
    ({"name": "../elsewhere"}, "run.name must be one folder name under run.storage_path, got '../elsewhere'"),
    ({"name": ""}, "run.name must be one folder name under run.storage_path, got ''"),
])
def test_run_settings_that_cannot_work_are_refused(tmp_path, values, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_settings(replace(demo_config(tmp_path, "refused"), run=values))


def test_a_uri_storage_path_is_refused_not_made_a_local_folder(tmp_path):
    config = replace(demo_config(tmp_path, "uri"), run={"storage_path": "s3://bucket/runs"})
    with pytest.raises(ValueError, match="run.storage_path must be a filesystem path"):
        check_settings(config)
    with pytest.raises(ValueError, match="run.storage_path must be a filesystem path"):
        train(config)
    assert not list(tmp_path.iterdir()) and not Path("s3:").exists()


def test_precision_and_memory_format_switches_change_the_arithmetic_and_layout():
    from raysegm.train import autocast, memory_format_of

    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 8, 8)
    with autocast("bf16", torch.device("cpu")):
        assert conv(x).dtype == torch.bfloat16
    with autocast("fp32", torch.device("cpu")):
        assert conv(x).dtype == torch.float32
    assert memory_format_of(True) is torch.channels_last and memory_format_of(False) is torch.contiguous_format
    assert x.contiguous(memory_format=memory_format_of(True)).is_contiguous(memory_format=torch.channels_last)


def test_a_lengthened_run_resumes_on_its_new_schedule():
    from raysegm.config import TrainSettings
    from raysegm.train import _restore, _training_state

    def run(epochs, state=None, until=None):
        settings = TrainSettings(lr=1.0, schedule="cosine", warmup_epochs=1, epochs=epochs)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=settings.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: lr_factor(e, settings.schedule, settings.warmup_epochs, settings.epochs))
        start = _restore(state, optimizer, scheduler, None, settings)[0] if state else 0
        rates = []
        for _ in range(start + 1, (until or epochs) + 1):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates, _training_state(until or epochs, optimizer, scheduler, None, {}, [])

    full, _ = run(6)
    first, state = run(6, until=3)
    assert first + run(6, state)[0] == pytest.approx(full)  # an interrupted run continues exactly
    short, finished = run(3)
    assert short[-1] > 0
    assert run(6, finished)[0] == pytest.approx(full[3:])  # epoch 4 at its new rate, not 0
    assert run(6, finished)[0][0] > 0


def test_an_interrupted_run_continues_with_adams_moments(tmp_path):
    """Three epochs, a training state saved and read back as a checkpoint holds it, three more: the
    weights equal six epochs in one go, bit for bit. Adam restarted from zero moments would not."""
    from raysegm.config import TrainSettings
    from raysegm.train import _restore, _training_state

    settings = TrainSettings(lr=0.1, schedule="cosine", warmup_epochs=1, epochs=6)
    target = torch.tensor([3.0, -2.0, 0.5])

    def run(saved=None, until=6):
        weights = torch.nn.Parameter(saved["weights"].clone() if saved else torch.zeros(3))
        optimizer = torch.optim.Adam([weights], lr=settings.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: lr_factor(e, settings.schedule, settings.warmup_epochs, settings.epochs))
        start = _restore(saved["training"], optimizer, scheduler, None, settings)[0] if saved else 0
        for _ in range(start + 1, until + 1):
            for _step in range(4):
                optimizer.zero_grad()
                ((weights - target) ** 2).sum().backward()
                optimizer.step()
            scheduler.step()
        state = {"weights": weights.detach().clone(),
                 "training": _training_state(until, optimizer, scheduler, None, {}, [])}
        torch.save(state, tmp_path / "state.pt")
        return torch.load(tmp_path / "state.pt", weights_only=True)

    full = run()["weights"]
    resumed = run(run(until=3))["weights"]
    assert torch.equal(resumed, full)
    assert not torch.equal(full, torch.zeros(3))


def test_cosine_schedule_warms_up_then_decays():
    # warm-up 2 of 6 epochs: 1/3, 2/3, then 0.5 (1 + cos(pi k / 4)) for k = 0..3
    factors = [lr_factor(e, "cosine", 2, 6) for e in range(6)]
    expected = [1 / 3, 2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert factors == pytest.approx(expected)
    assert [lr_factor(e, "none", 2, 6) for e in range(6)] == [1.0] * 6


def test_a_folder_holding_a_run_needs_resume(tmp_path):
    config = demo_config(tmp_path, "taken")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)
    with pytest.raises(FileExistsError, match="already holds a run"):
        build_trainer(config, manifest_path="unused.parquet", run_name="taken", storage_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(replace(config, run={"name": "never-started"}), resume=True)


def test_workers_this_ray_cannot_place_are_refused_before_any_folder(ray_session, tmp_path, monkeypatch):
    """Ray Train V2 would wait for them forever; the shared local Ray has 4 CPUs and no GPU."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = demo_config(tmp_path, "unplaceable")
    with pytest.raises(ValueError, match=r"2 Train workers need 2 GPU in all, and this Ray has 0 GPU"):
        train(replace(config, scale={"use_gpu": True}))
    with pytest.raises(ValueError, match=r"need 2 node7 in all, and this Ray has 0 node7"):
        train(replace(config, scale={"worker_resources": {"node7": 1}}))
    with pytest.raises(ValueError, match=r"need 6 CPU in all, and this Ray has 4 CPU"):
        train(replace(config, scale={"cpus_per_worker": 3}))
    assert not (tmp_path / "unplaceable").exists()


# ---------------------------------------------------------------------------------------------------
# slow: real TorchTrainer fits on a shared local Ray


def _alive_train_workers(ray) -> list[int]:
    from ray.util.state import list_actors

    # The address is explicit: other Ray instances may be running on this host.
    actors = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [actor.pid for actor in actors]


def _registered_epoch(run_dir: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has registered (0 before the first).

    A checkpoint folder can be complete on disk before the controller registers it; a worker lost in
    between sends the run back to the previous registered checkpoint (seen on Ray 2.60).
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get("epoch", 0))


@pytest.fixture(scope="module")
def demo_run(ray_session, tmp_path_factory):
    """configs/demo.yaml trained once, a Train worker SIGKILLed once the epoch-2 checkpoint is registered.

    Returns {config, summary, run_dir, seconds, history_at_kill}.
    """
    config = demo_config(tmp_path_factory.mktemp("runs"), "demo")
    run_dir = Path(config.run.storage_path) / "demo"
    outcome: dict = {}

    def fit():
        try:
            outcome["summary"] = train(config)
        except Exception as error:  # handed to the test thread below
            outcome["error"] = error

    started = time.perf_counter()
    driver = threading.Thread(target=fit)
    driver.start()
    deadline = time.time() + 600
    while _registered_epoch(run_dir) < 2:
        assert driver.is_alive() and time.time() < deadline, f"no epoch-2 checkpoint: {outcome}"
        time.sleep(0.2)
    history_at_kill = history_json(run_dir)  # the CSV may be one write behind at this instant
    victims = _alive_train_workers(ray_session)
    assert len(victims) == config.scale.num_workers
    os.kill(victims[0], signal.SIGKILL)
    driver.join(timeout=900)
    assert not driver.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in outcome, outcome.get("error")
    return {"config": config, "summary": outcome["summary"], "run_dir": run_dir,
            "seconds": time.perf_counter() - started, "history_at_kill": history_at_kill}


@pytest.mark.slow
def test_demo_preset_learns_the_synthetic_tumors(demo_run, tmp_path):
    from raysegm.checkpoint import load_training_state, save_checkpoint
    from raysegm.config import from_dict
    from raysegm.evaluate import evaluate_checkpoint
    from raysegm.models import create_model

    config, summary, run_dir = demo_run["config"], demo_run["summary"], demo_run["run_dir"]
    history = read_history(run_dir)
    assert history["train_loss"].iloc[-1] < 0.6 * history["train_loss"].iloc[0]
    assert json.loads((run_dir / "result.json").read_text()) == summary
    assert summary["best"][VAL_METRIC] == pytest.approx(history[VAL_METRIC].max())
    state = load_training_state(summary["latest_checkpoint"])
    assert state["epoch"] == config.train.epochs and sorted(state["history"]) == history["epoch"].tolist()

    # The same model before training, scored on the same validation patients.
    resolved = from_dict(json.loads((run_dir / "config.json").read_text()))
    torch.manual_seed(config.train.seed)
    save_checkpoint(tmp_path / "untrained", create_model(resolved.model), resolved)
    before = evaluate_checkpoint(tmp_path / "untrained", split="val")["per_patient"]["dice"]["mean"]
    after = evaluate_checkpoint(run_dir, split="val")  # the run folder: its best checkpoint
    print(f"demo: val per-patient Dice {before:.3f} untrained -> {after['per_patient']['dice']['mean']:.3f} "
          f"after {config.train.epochs} epochs; train() took {demo_run['seconds']:.0f} s")
    assert after["per_patient"]["dice"]["mean"] > 0.7
    assert after["per_patient"]["dice"]["mean"] > before + 0.3
    # evaluate reproduces the training loop's own validation of the best epoch (64 px in, 64 px model)
    assert after["per_patient"]["dice"]["mean"] == pytest.approx(summary["best"][VAL_METRIC], abs=1e-3)
    assert after["pooled"]["dice"] == pytest.approx(summary["best"]["val_pooled_dice"], abs=1e-3)


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_checkpoint(demo_run):
    config, summary = demo_run["config"], demo_run["summary"]
    history = read_history(demo_run["run_dir"])
    assert history["epoch"].tolist() == list(range(1, config.train.epochs + 1))
    assert summary["epochs_completed"] == config.train.epochs
    # One restart, from a checkpoint of epoch 2 or later: the epoch counter did not go back to 0 ...
    assert len(summary["resumed_after"]) == 1
    resumed = summary["resumed_after"][0]
    assert 2 <= resumed < config.train.epochs
    # ... the epochs up to that checkpoint were not trained again (their rows are those of before the
    # kill; a later epoch whose checkpoint had not been registered yet is redone and replaced) ...
    before_kill = demo_run["history_at_kill"].iloc[:resumed]
    assert len(before_kill) >= 2
    pd.testing.assert_frame_equal(history.iloc[:len(before_kill)], before_kill, check_dtype=False)
    # ... and the model went on from its trained weights: the loss after the restart is nearer epoch 2's
    # than epoch 1's (a restart from scratch, same seed, would repeat epoch 1's loss)
    first, second = history["train_loss"].iloc[0], history["train_loss"].iloc[1]
    print(f"train loss: epoch 1 {first:.4f}, epoch 2 {second:.4f}, after the restart "
          f"{history['train_loss'].iloc[resumed]:.4f} (epoch {resumed + 1})")
    assert history["train_loss"].iloc[resumed] < (first + second) / 2


@pytest.mark.slow
def test_a_finished_run_resumes_from_its_storage_path(demo_run, tmp_path):
    """A copy of the demo run's folder, continued for one more epoch by a new trainer."""
    config, run_dir = demo_run["config"], demo_run["run_dir"]
    shutil.copytree(run_dir, tmp_path / "demo")
    more = replace(demo_config(tmp_path, "demo"), train={"epochs": config.train.epochs + 1},
                   data={"manifest": str(tmp_path / "demo" / "data" / "manifest.parquet")})
    with pytest.raises(FileExistsError, match="--resume"):
        train(more)
    resumed = train(more, resume=True)
    history = read_history(tmp_path / "demo")
    assert history["epoch"].tolist() == list(range(1, config.train.epochs + 2))
    assert resumed["resumed_after"] == [*demo_run["summary"]["resumed_after"], config.train.epochs]
    assert resumed["epochs_completed"] == config.train.epochs + 1
    # the finished epochs came back from the checkpoint, they were not trained again ...
    pd.testing.assert_frame_equal(history.iloc[:-1], read_history(run_dir))
    # ... and the new epoch trained on from the restored weights and optimizer, not from scratch
    assert history["train_loss"].iloc[-1] < 0.6 * history["train_loss"].iloc[0]


@pytest.mark.slow
def test_bf16_channels_last_trains_like_fp32(demo_run, tmp_path):
    """The CPU speed switches of cpu-small (bf16 autocast, NHWC) change the arithmetic, not the training:
    the same seed gives the fp32 run's epoch-1 loss, and the checkpoint is a plain one."""
    from safetensors.torch import load_file

    from raysegm.checkpoint import WEIGHTS, load_model
    from raysegm.evaluate import evaluate_checkpoint

    fast = replace(demo_config(tmp_path, "bf16-nhwc"), train={"epochs": 2, "precision": "bf16", "channels_last": True})
    summary = train(fast)
    history = read_history(tmp_path / "bf16-nhwc")
    fp32 = demo_run["history_at_kill"]  # the fp32 run's first epochs, before its worker was killed
    print(f"epoch-1 train loss: fp32 {fp32['train_loss'].iloc[0]:.4f}, bf16 + channels_last "
          f"{history['train_loss'].iloc[0]:.4f}")
    assert history["train_loss"].iloc[0] == pytest.approx(fp32["train_loss"].iloc[0], rel=0.03)
    # what the loop's forward passes returned: autocast ran in bf16, and the fp32 run did not
    assert history["compute_dtype"].tolist() == ["bfloat16", "bfloat16"]
    assert set(fp32["compute_dtype"]) == {"float32"}
    assert history["train_loss"].iloc[1] < history["train_loss"].iloc[0]
    latest = Path(summary["latest_checkpoint"])
    weights = load_file(str(latest / WEIGHTS))
    # plain fp32 weights on disk: autocast computed in bf16 but never changed what is stored
    assert {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()} == {torch.float32}
    model, config = load_model(latest)
    assert config.train.channels_last and next(model.parameters()).dtype == torch.float32
    # evaluate (fp32, NCHW) reproduces the loop's own bf16 validation of that epoch, to bf16's rounding
    scored = evaluate_checkpoint(latest, split="val")
    assert scored["per_patient"]["dice"]["mean"] == pytest.approx(history[VAL_METRIC].iloc[-1], abs=0.02)
