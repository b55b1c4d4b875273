"""Ablation studies: the search space, the tables' logic, a study run with ASHA, and a study whose
driver is killed mid-run and resumed."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysegm.config import load_config, replace, save_json
from raysegm.metrics import bootstrap_ci, paired_bootstrap_diff
from raysegm.tune import (
    _resumed_config,
    check_study,
    paired_differences,
    read_launches,
    read_per_patient,
    run_study,
    summary_markdown,
    trial_outcome,
    tune_config,
    variant_summary,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # 64 px, a few tiny patients, 2 epochs, one Train worker per trial
    "data.size=64", "data.synthetic_patients=8", "data.synthetic_slices=6", "data.tumor_oversample=2.0",
    "model.unet_width=8", "model.unet_depth=3", "model.encoder=resnet18", "model.decoder_channels=[32, 16, 8, 8]",
    "train.epochs=2", "train.batch_size=4", "train.lr=0.003",
    "scale.num_workers=1", "scale.cpus_per_worker=0.5",
    "tune.batch_sizes=[4]", "tune.losses=[bce, dice]",
]


def tiny_config(storage: Path, name: str, *overrides: str):
    return load_config(None, [*TINY, f"run.storage_path={storage}", f"run.name={name}", *overrides])


@contextlib.contextmanager
def private_cluster():
    """A LocalRayCluster with 4 logical CPUs, shut down by PID even when its start fails.

    One more try when `ray start` times out: on a loaded shared host the raylet can miss its deadline.
    """
    from raycluster import LocalRayCluster

    for attempt in range(2):
        cluster = LocalRayCluster(head_cpus=4)
        try:
            cluster.start()
            break
        except RuntimeError:
            cluster.shutdown()
            if attempt:
                raise
    try:
        yield cluster
    finally:
        cluster.shutdown()


def driver_command(entry: list[str], *overrides: str) -> list[str]:
    return [sys.executable, *entry, *[f"--set={item}" for item in [*TINY, *overrides]]]


def ablation_study(tmp_path_factory) -> Path:
    """One small study per test session, made once (test_report.py reuses it): unet and
    unet_resnet50[resnet18] x batch 4 x bce/dice, 2 epochs, ASHA with a grace of 1 epoch, submitted
    through jobs/ablate.py to a private Ray cluster (4 logical CPUs)."""
    storage = tmp_path_factory.getbasetemp() / "shared-studies"
    study_dir = storage / "asha"
    if (study_dir / "results.json").is_file():
        return study_dir
    storage.mkdir(exist_ok=True)
    command = driver_command(["jobs/ablate.py"], "tune.variants=[unet, unet_resnet50]", "tune.asha=true",
                             "tune.asha_grace_epochs=1", f"run.storage_path={storage}", "run.name=asha")
    with private_cluster() as cluster, open(storage / "asha.log", "w") as log:
        driver = subprocess.run(command, env=cluster.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                timeout=1500)
    assert driver.returncode == 0, (storage / "asha.log").read_text()[-5000:]
    return study_dir


# ---------------------------------------------------------------------------------------------------
# fast: no Ray


def test_grid_spans_every_axis_and_the_extra_axes(tmp_path):
    config = tiny_config(tmp_path, "grid", "tune.variants=[unet, unet_attention]", "tune.batch_sizes=[4, 8]",
                         'tune.extra_axes={"train.lr": [0.001, 0.003], "data.augment": [true, false]}')
    grid = check_study(config)
    assert len(grid) == 2 * 2 * 2 * 2 * 2
    points = {json.dumps(params, sort_keys=True) for params in grid}
    assert len(points) == len(grid)
    assert {p["model"]["variant"] for p in grid} == {"unet", "unet_attention"}
    assert {(p["train"]["lr"], p["data"]["augment"]) for p in grid} == {(0.001, True), (0.001, False),
                                                                        (0.003, True), (0.003, False)}


def test_the_default_grid_is_the_designs_24_trials():
    assert len(check_study(load_config(None, ["scale.num_workers=1"]))) == 4 * 3 * 2


@pytest.mark.parametrize(("overrides", "message"), [
    (["tune.variants=[unet, unet_transformer]"], "unknown variant 'unet_transformer'"),
    (["tune.losses=[bce, focal]"], "unknown loss 'focal'"),
    (['tune.extra_axes={"lr": [0.001]}'], "must name one config key as section.key"),
    (['tune.extra_axes={"train.loss": ["bce"]}'], "already an axis"),
    (['tune.extra_axes={"train.lr": []}'], "non-empty list"),
    (['tune.extra_axes={"train.epochs": ["three"]}'], "train.epochs: expected an integer"),
    (['tune.extra_axes={"train.nope": [1]}'], "unknown config key"),
    (["scale.num_workers=2", "tune.batch_sizes=[4, 5]"], "must split evenly across scale.num_workers 2"),
    (["tune.asha=true", "tune.asha_grace_epochs=3"], "asha_grace_epochs must be between 1 and train.epochs"),
    (["train.ensemble=2"], "a study's trial trains one model"),
    (["tune.max_concurrent_trials=0"], "max_concurrent_trials must be at least 1"),
])
def test_a_study_that_cannot_run_is_refused_before_ray(tmp_path, overrides, message):
    config = tiny_config(tmp_path, "refused", *overrides)
    with pytest.raises(ValueError, match=message):
        run_study(config)
    assert not (tmp_path / "refused").exists()


def test_asha_stops_trials_by_epoch_on_validation_dice(tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from raysegm.tune import scheduler

    assert scheduler(tiny_config(tmp_path, "plain")) is None
    asha = scheduler(tiny_config(tmp_path, "asha", "tune.asha=true", "tune.asha_grace_epochs=1", "train.epochs=4"))
    assert isinstance(asha, ASHAScheduler)
    assert (asha._time_attr, asha._max_t, asha._reduction_factor) == ("epoch", 4, 4)
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [4, 1]  # rungs at epochs 1 and 4
    settings = tune_config(tiny_config(tmp_path, "asha", "tune.asha=true", "train.epochs=4"))
    assert (settings.metric, settings.mode) == ("val_per_patient_dice", "max")  # cut the worst, not the best
    assert isinstance(settings.scheduler, ASHAScheduler)


def test_an_existing_study_needs_resume_and_resume_needs_the_same_experiment(tmp_path):
    config = tiny_config(tmp_path, "held")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run_study(config, resume=True)
    (tmp_path / "held").mkdir()
    save_json(config, tmp_path / "held" / "config.json")
    with pytest.raises(FileExistsError, match="already holds a study"):
        run_study(config)
    changed = replace(config, train={"epochs": 5})
    with pytest.raises(ValueError, match=r"train.epochs 2 -> 5"):
        run_study(changed, resume=True)


def test_a_resumed_study_takes_new_read_settings_and_keeps_what_it_measures(tmp_path):
    config = tiny_config(tmp_path, "held")
    (tmp_path / "held").mkdir()
    save_json(config, tmp_path / "held" / "config.json")
    # Read workers and their cache change how trials run, not what they train: taken and applied.
    faster = replace(config, data={"read_cpus": 0.5, "read_tasks": 4, "read_cache_mb": 0},
                     scale={"torch_threads": 2})
    resumed = _resumed_config(tmp_path / "held", faster)
    assert (resumed.data.read_cpus, resumed.data.read_tasks, resumed.data.read_cache_mb) == (0.5, 4, 0)
    assert resumed.scale.torch_threads == 2
    assert resumed.data.size == config.data.size == 64
    # Nor how its trials are scored after the search.
    with pytest.raises(ValueError, match=r"infer.postprocess 'none' -> 'lcc', infer.tta False -> True"):
        _resumed_config(tmp_path / "held", replace(faster, infer={"tta": True, "postprocess": "lcc"}))
    wider = _resumed_config(tmp_path / "held", replace(faster, infer={"batch_size": 64, "replicas": 2,
                                                                      "threshold": 0.4}))
    assert (wider.infer.batch_size, wider.infer.replicas, wider.infer.threshold) == (64, 2, 0.4)
    # The data that is trained on is not: a new size or context is refused, naming each setting.
    other = replace(faster, data={"size": 32, "context_slices": 1})
    with pytest.raises(ValueError, match=r"data.context_slices 0 -> 1, data.size 64 -> 32"):
        _resumed_config(tmp_path / "held", other)
    # Nor are Tune's own settings, which Tuner.restore takes from its saved state whatever we pass
    fewer = replace(faster, tune={"max_concurrent_trials": config.tune.max_concurrent_trials + 1,
                                  "trial_cpus": 0.5})
    with pytest.raises(ValueError, match=r"tune.max_concurrent_trials .*, tune.trial_cpus"):
        _resumed_config(tmp_path / "held", fewer)


def test_a_study_saved_with_absolute_paths_resumes_from_the_same_relative_ones(tmp_path, monkeypatch):
    from raysegm.train import absolute_paths

    monkeypatch.chdir(tmp_path)
    # an invalid setting that only the check after the resume comparison refuses: proof it was passed
    config = tiny_config(tmp_path, "relative", "model.encoder_weights=w.safetensors", "tune.max_concurrent_trials=0")
    (tmp_path / "relative").mkdir()
    save_json(absolute_paths(config), tmp_path / "relative" / "config.json")  # as a new study saves it
    with pytest.raises(ValueError, match="max_concurrent_trials must be at least 1"):
        run_study(config, resume=True)
    with pytest.raises(ValueError, match=r"cannot resume .* model.encoder_weights"):
        run_study(replace(config, model={"encoder_weights": "other.safetensors"}), resume=True)


def test_trials_that_leave_the_data_no_cpu_are_refused_on_a_local_ray(ray_session, tmp_path, monkeypatch):
    """6 trials at once hold 6 x (0.01 + 0.5) of the shared local Ray's 4 CPUs: the shuffle's 1-CPU
    tasks would wait forever on a Ray that will not grow."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = tiny_config(tmp_path, "crowded", "tune.max_concurrent_trials=6")
    with pytest.raises(ValueError, match=r"6 trial\(s\) at once hold 3.06 of the cluster's 4 CPUs, leaving 0.94"):
        run_study(config)
    assert not (tmp_path / "crowded").exists()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_an_mlflow_uri_without_mlflow_is_a_clear_error(tmp_path):
    config = tiny_config(tmp_path, "mlflow", "tune.mlflow_tracking_uri=file:///tmp/mlruns")
    with pytest.raises(ValueError, match=r"mlflow is not installed: pip install 'raysegm\[mlflow\]'"):
        run_study(config)


def _results(rows):
    columns = ["trial_id", "variant", "model", "batch_size", "loss", "val_dice", "dice_mean", "dice_ci_low",
               "dice_ci_high", "iou_mean", "pooled_dice", "pixel_accuracy", "hd95", "params_total"]
    return pd.DataFrame([dict(zip(columns, row)) for row in rows])


def _per_patient(dice_by_trial):
    return pd.DataFrame([{"trial_id": trial_id, "volume_id": f"P{i}", "dice": dice}
                         for trial_id, values in dice_by_trial.items() for i, dice in enumerate(values)])


def test_paired_differences_isolate_attention_and_the_resnet_encoder():
    results = _results([
        ("a", "unet", "unet", 8, "bce", 0.5, 0.5, 0.4, 0.6, 0.4, 0.5, 0.99, 5.0, 100),
        ("b", "unet_attention", "unet_attention", 8, "bce", 0.6, 0.6, 0.5, 0.7, 0.5, 0.6, 0.99, 4.0, 110),
        ("c", "unet_resnet50_attention", "unet_resnet50_attention[resnet18]", 8, "bce", 0.7, 0.7, 0.6, 0.8,
         0.6, 0.7, 0.99, 3.0, 900),
        ("d", "unet", "unet", 8, "dice", 0.4, 0.4, 0.3, 0.5, 0.3, 0.4, 0.99, 6.0, 100),
        ("e", "unet_attention", "unet_attention", 16, "dice", 0.4, 0.4, 0.3, 0.5, 0.3, 0.4, 0.99, 6.0, 110),
    ])
    per_patient = _per_patient({"a": [0.2, 0.5, 0.8, 0.4, 0.6], "b": [0.3, 0.6, 1.0, 0.5, 0.7],
                                "c": [0.6, 0.4, 0.9, 0.5, 0.7], "d": [0.1] * 5, "e": [0.9] * 5})
    paired = paired_differences(results, per_patient)
    pairs = {(row.trial_id, row.reference_trial): row for row in paired.itertuples()}
    # e has no reference of its batch size and loss; d is the plain U-Net itself.
    assert set(pairs) == {("b", "a"), ("c", "a"), ("c", "b")}
    assert pairs[("b", "a")].effect == "attention"
    assert pairs[("c", "a")].effect == "ResNet encoder + attention"
    assert pairs[("c", "b")].effect == "ResNet encoder"
    # b - a = (0.1, 0.1, 0.2, 0.1, 0.1): mean 0.12; c - b = (0.3, -0.2, -0.1, 0, 0): mean 0;
    # c - a = (0.4, -0.1, 0.1, 0.1, 0.1): mean 0.12
    assert pairs[("b", "a")].dice_diff_mean == pytest.approx(0.12)
    assert pairs[("c", "b")].dice_diff_mean == pytest.approx(0.0)
    assert pairs[("c", "a")].dice_diff_mean == pytest.approx(0.12)
    expected = paired_bootstrap_diff([0.6, 0.4, 0.9, 0.5, 0.7], [0.3, 0.6, 1.0, 0.5, 0.7])
    assert (pairs[("c", "b")].dice_diff_ci_low, pairs[("c", "b")].dice_diff_ci_high) == pytest.approx(
        (expected["ci_low"], expected["ci_high"]))
    assert pairs[("b", "a")].verdict == "better"  # every resampled mean of the differences is >= 0.1
    assert pairs[("b", "a")].dice_diff_ci_low >= 0.1 - 1e-12
    assert pairs[("c", "b")].verdict == "no clear difference"
    assert all(row.patients == 5 for row in pairs.values())
    # With fewer test patients the interval is still given, but no verdict.
    few = paired_differences(results, per_patient[per_patient["volume_id"] != "P4"])
    assert set(few["verdict"]) == {"too few patients (< 5)"}


def test_paired_differences_refuse_different_test_patients():
    results = _results([("a", "unet", "unet", 8, "bce", 0.5, 0.5, 0.4, 0.6, 0.4, 0.5, 0.99, 5.0, 100),
                        ("b", "unet_attention", "unet_attention", 8, "bce", 0.6, 0.6, 0.5, 0.7, 0.5, 0.6, 0.99,
                         4.0, 110)])
    per_patient = _per_patient({"a": [0.2, 0.5], "b": [0.3, 0.5, 1.0]})
    with pytest.raises(ValueError, match="different patients"):
        paired_differences(results, per_patient)


def test_the_variant_summary_chooses_by_validation_not_by_test():
    results = _results([
        ("a", "unet", "unet", 8, "bce", 0.80, 0.50, 0.4, 0.6, 0.4, 0.5, 0.99, 5.0, 100),
        ("b", "unet", "unet", 8, "dice", 0.60, 0.90, 0.8, 1.0, 0.8, 0.9, 0.99, 2.0, 100),
        ("c", "unet_attention", "unet_attention", 8, "bce", 0.70, 0.70, 0.6, 0.8, 0.6, 0.7, 0.99, 3.0, 110),
        # failed trials: no scores
        ("d", "unet", "unet", 32, "bce", *[None] * 9),
        ("e", "resnet_unet", "resnet50", 8, "bce", *[None] * 9),
    ])
    summary = variant_summary(results).set_index("variant")
    assert summary.loc["unet", "chosen_trial"] == "a"  # best validation, though b tests better
    assert summary.loc["unet", "dice_mean"] == 0.50
    assert summary.loc["unet", "trials"] == 2 and summary.loc["unet", "trials_failed"] == 1
    assert summary.loc["unet_attention", "trials_failed"] == 0
    markdown = summary_markdown(summary.reset_index(), results)
    assert "| unet | unet | 2 (1) |" in markdown
    assert "No trial of resnet_unet (1 failed) was scored" in markdown
    assert "Per-patient Dice: each test patient" in markdown  # the metric note labels every column
    assert summary.loc["unet", "mean_dice_over_trials"] == pytest.approx(0.70)
    assert (summary.loc["unet", "min_dice_over_trials"], summary.loc["unet", "max_dice_over_trials"]) == (0.5, 0.9)
    assert summary.loc["unet_attention", "chosen_trial"] == "c"


def test_trial_outcome_reads_the_kept_checkpoints(tmp_path):
    from raysegm.checkpoint import save_checkpoint
    from raysegm.models import create_model

    config = tiny_config(tmp_path, "outcome")
    model = create_model(config.model)
    history = {e: {"epoch": e, "train_loss": 1.0 / e, "val_per_patient_dice": dice, "epoch_time_s": 2.0}
               for e, dice in ((1, 0.2), (2, 0.7), (3, 0.5))}
    run_dir = tmp_path / "trial-x"
    assert trial_outcome(run_dir) is None
    # Kept by Ray Train: the best (epoch 2) and the latest (epoch 3); epoch 4's upload was cut short.
    for epoch in (2, 3):
        state = {"epoch": epoch, "history": {e: history[e] for e in history if e <= epoch}}
        save_checkpoint(run_dir / f"checkpoint_{epoch}", model, config, training_state=state)
    save_checkpoint(run_dir / "checkpoint_4", model, config)
    # epochs 5 and 6 have all three files, one of them cut short
    for epoch, cut in ((5, "model.safetensors"), (6, "training_state.pt")):
        state = {"epoch": epoch, "history": {e: {**history[3], "epoch": e} for e in range(1, epoch + 1)}}
        save_checkpoint(run_dir / f"checkpoint_{epoch}", model, config, training_state=state)
        data = (run_dir / f"checkpoint_{epoch}" / cut).read_bytes()
        (run_dir / f"checkpoint_{epoch}" / cut).write_bytes(data[: len(data) // 2])
    outcome = trial_outcome(run_dir)
    assert outcome["epochs_completed"] == 3
    assert outcome["best_epoch"] == 2
    assert outcome["best_checkpoint"] == str(run_dir / "checkpoint_2")
    assert outcome["latest_checkpoint"] == str(run_dir / "checkpoint_3")
    assert sorted(outcome["history"]) == [1, 2, 3]
    assert outcome["history"][3]["val_per_patient_dice"] == 0.5


def test_a_checkpoint_left_by_a_redone_epoch_is_not_the_best(tmp_path):
    """An attempt saved epoch 1 and failed; Ray redid epoch 1 from scratch (val Dice 0.9), kept epoch 2
    (0.7) and deleted the redo's folder. The leftover folder's weights scored 0.1: they are not the
    run's best, whatever the run's history says of epoch 1."""
    from raysegm.checkpoint import save_checkpoint
    from raysegm.models import create_model

    config = tiny_config(tmp_path, "outcome")
    model = create_model(config.model)
    row = {"train_loss": 1.0, "epoch_time_s": 2.0}
    failed = {1: {**row, "epoch": 1, "val_per_patient_dice": 0.1}}
    redone = {1: {**row, "epoch": 1, "val_per_patient_dice": 0.9}, 2: {**row, "epoch": 2, "val_per_patient_dice": 0.7}}
    run_dir = tmp_path / "trial-y"
    save_checkpoint(run_dir / "checkpoint_a", model, config, training_state={"epoch": 1, "history": failed})
    save_checkpoint(run_dir / "checkpoint_b", model, config, training_state={"epoch": 2, "history": redone})
    outcome = trial_outcome(run_dir)
    assert outcome["best_checkpoint"] == outcome["latest_checkpoint"] == str(run_dir / "checkpoint_b")
    assert outcome["best_epoch"] == 2 and outcome["history"][1]["val_per_patient_dice"] == 0.9


def test_per_patient_tables_keep_numeric_looking_volume_ids(tmp_path):
    from raysegm.metrics import SegmentationMeter

    meter = SegmentationMeter()
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 1, 1] = True
    for volume_id in ("001", "010", "1"):
        meter.update([volume_id], [0], mask, mask)
    meter.per_patient_table().to_csv(tmp_path / "per_patient.csv", index=False)
    assert read_per_patient(tmp_path / "per_patient.csv")["volume_id"].tolist() == ["001", "010", "1"]


# ---------------------------------------------------------------------------------------------------
# slow: studies


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Path:
    return ablation_study(tmp_path_factory)


@pytest.mark.slow
def test_a_study_writes_one_complete_row_per_trial(study):
    config = json.loads((study / "config.json").read_text())
    results = pd.read_csv(study / "results.csv", dtype={"trial_id": str})
    per_patient = pd.read_csv(study / "per_patient.csv", dtype={"trial_id": str, "volume_id": str})
    curves = pd.read_csv(study / "curves.csv", dtype={"trial_id": str})
    manifest = pd.read_parquet(config["data"]["manifest"])
    test_patients = sorted(manifest.loc[manifest["split"] == "test", "volume_id"].unique())

    assert len(results) == 4 and results["trial_id"].is_unique
    assert sorted(zip(results["variant"], results["loss"])) == [
        ("unet", "bce"), ("unet", "dice"), ("unet_resnet50", "bce"), ("unet_resnet50", "dice")]
    assert set(results["model"]) == {"unet", "unet_resnet50[resnet18]"}
    due = results.drop(columns=["error"])
    assert not due.isna().any().any(), due.isna().sum()[due.isna().sum() > 0]
    assert (results["dice_ci_low"] <= results["dice_mean"]).all()
    assert (results["dice_mean"] <= results["dice_ci_high"]).all()
    assert (results["test_patients"] == len(test_patients)).all()
    assert (results["params_total"] >= results["params_trainable"]).all()
    assert (results["params_trainable"] > 0).all()
    # ASHA may stop a trial after its grace epoch; the status says so.
    assert set(results["status"]) <= {"completed", "stopped early"}
    assert ((results["status"] == "completed") == (results["epochs_completed"] == 2)).all()

    for row in results.itertuples():
        patients = per_patient[per_patient["trial_id"] == row.trial_id]
        assert sorted(patients["volume_id"]) == test_patients
        # The table's headline numbers are the per-patient values summarised as the contract says.
        assert row.dice_mean == pytest.approx(patients["dice"].mean())
        assert row.dice_median == pytest.approx(patients["dice"].median())
        assert (row.dice_ci_low, row.dice_ci_high) == pytest.approx(bootstrap_ci(patients["dice"].to_numpy()))
        assert row.tumor_free_patients == int((~patients["has_tumor"]).sum())
        for metric in ("recall", "specificity", "precision", "hd95"):  # the contract's others, as means
            assert getattr(row, metric) == pytest.approx(patients[metric].mean())
        assert row.iou_mean == pytest.approx(patients["iou"].mean())
        trial_curve = curves[curves["trial_id"] == row.trial_id].sort_values("epoch")
        assert trial_curve["epoch"].tolist() == list(range(1, row.epochs_completed + 1))
        assert row.train_time_s == pytest.approx(trial_curve["epoch_time_s"].sum())
        assert row.val_dice == pytest.approx(trial_curve["val_per_patient_dice"].max())
        assert math.isfinite(row.hd95) and row.hd95 >= 0
        # Tune's TensorBoard logger wrote the trial's events into the study folder.
        assert list((study / "tune" / f"trial-{row.trial_id}").glob("events.out.tfevents.*"))

    paired = pd.read_csv(study / "paired.csv", dtype={"trial_id": str, "reference_trial": str})
    assert sorted(paired["loss"]) == ["bce", "dice"]
    assert set(paired["effect"]) == {"ResNet encoder"} and set(paired["reference_variant"]) == {"unet"}
    assert (paired["patients"] == len(test_patients)).all()
    for row in paired.itertuples():
        a = per_patient[per_patient["trial_id"] == row.trial_id].set_index("volume_id")["dice"]
        b = per_patient[per_patient["trial_id"] == row.reference_trial].set_index("volume_id")["dice"]
        assert row.dice_diff_mean == pytest.approx((a - b.loc[a.index]).mean())
        assert row.dice_diff_ci_low <= row.dice_diff_mean <= row.dice_diff_ci_high

    assert len(json.loads((study / "results.json").read_text())) == 4
    for name in ("results.md", "summary.md", "paired.md", "paper.md"):
        assert (study / name).read_text().count("\n|") >= 2, name
    launches = read_launches(study)
    assert (launches.groupby("trial_id").size() == 1).all() and set(launches["action"]) == {"train"}


@pytest.mark.slow
def test_trials_are_scored_with_the_studys_infer_settings(study, tmp_path):
    import shutil

    from raysegm.evaluate import evaluate_checkpoint
    from raysegm.tune import write_results

    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    config = json.loads((copy / "config.json").read_text())
    config["infer"].update(tta=True, postprocess="lcc+fill_holes")
    (copy / "config.json").write_text(json.dumps(config))
    write_results(copy)
    for trial in json.loads((copy / "results.json").read_text()):
        scored = json.loads((copy / "evaluation" / f"trial-{trial['trial_id']}" / "summary.json").read_text())
        assert (scored["tta"], scored["postprocess"]) == (True, "lcc+fill_holes")
        # The trial's checkpoint was saved with the study's original infer settings (no TTA, none).
        best = trial_outcome(copy / "trials" / f"trial-{trial['trial_id']}")["best_checkpoint"]
        expected = evaluate_checkpoint(best, manifest=config["data"]["manifest"], split="test", tta=True,
                                       postprocess="lcc+fill_holes")
        assert scored["per_patient"] == json.loads(json.dumps(expected["per_patient"]))
        assert trial["dice_mean"] == pytest.approx(expected["per_patient"]["dice"]["mean"])
    for table in ("results.md", "summary.md"):
        assert "made with TTA on and post-processing lcc+fill_holes" in (copy / table).read_text()


def _wait_for(predicate, timeout: float, what: str, process=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the driver exited ({process.returncode}) before {what}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _checkpoint_stamps(run_dir: Path) -> dict:
    return {str(path.relative_to(run_dir)): path.stat().st_mtime_ns
            for path in sorted(run_dir.rglob("*")) if path.is_file() and path.parent.name.startswith("checkpoint_")}


@pytest.mark.slow
def test_a_killed_study_driver_resumes_without_repeating_finished_trials(tmp_path):
    command = driver_command(["-m", "raysegm", "tune"], "tune.variants=[unet]", f"run.storage_path={tmp_path}",
                             "run.name=killed")
    study_dir = tmp_path / "killed"
    with private_cluster() as cluster:
        with open(tmp_path / "first.log", "w") as log:
            driver = subprocess.Popen(command, env=cluster.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                # The second trial starts only once the first has finished (one trial at a time).
                _wait_for(lambda: read_launches(study_dir)["trial_id"].nunique() == 2, 600,
                          "the second trial to start", driver)
            finally:
                driver.send_signal(signal.SIGKILL)
                driver.wait(30)
        launches = read_launches(study_dir)
        first, second = launches["trial_id"].tolist()
        first_run = study_dir / "trials" / f"trial-{first}"
        stamps = _checkpoint_stamps(first_run)
        assert stamps and not (study_dir / "results.csv").exists()

        resumed = subprocess.run([*command, "--resume"], env=cluster.env, cwd=ROOT, capture_output=True,
                                 text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    launches = read_launches(study_dir)
    trained = launches[launches["action"] == "train"].groupby("trial_id").size().to_dict()
    assert trained == {first: 1, second: 2}  # the finished trial was not trained again
    assert _checkpoint_stamps(first_run) == stamps
    results = pd.read_csv(study_dir / "results.csv", dtype={"trial_id": str})
    assert sorted(results["trial_id"]) == sorted([first, second])
    assert not results.drop(columns=["error"]).isna().any().any()
    assert (results["status"] == "completed").all() and (results["epochs_completed"] == 2).all()
    assert np.isfinite(results["dice_mean"]).all()


def test_trial_id_survives_the_folder_suffix_of_a_restored_study():
    from types import SimpleNamespace

    from raysegm.tune import _trial_id_of

    # A restored study can give a trial a second folder, `trial-<id>_<4 hex>`, when its first one exists.
    assert _trial_id_of(SimpleNamespace(metrics={}, path="/s/tune/trial-f6fa8_00001_7ccc")) == "f6fa8_00001"
    assert _trial_id_of(SimpleNamespace(metrics=None, path="/s/tune/trial-f6fa8_00001")) == "f6fa8_00001"
    assert _trial_id_of(SimpleNamespace(metrics={"trial_id": "f6fa8_00002"},
                                        path="/s/tune/trial-f6fa8_00002_0a1b")) == "f6fa8_00002"
