"""Patient-level k-fold cross-validation: every patient scored once, by its fold's final checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from raysegm.config import RUN_ONLY, ExperimentConfig, load_config, replace, to_dict
from raysegm.cv import _check_same, run_cv
from raysegm.data.discover import load_manifest
from raysegm.evaluate import evaluate_checkpoint
from raysegm.train import run_state, train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(storage: Path, synth_dir: Path, name: str = "cv"):
    """configs/demo.yaml on the 6-patient synthetic set, 2 epochs of a width-4 U-Net."""
    return replace(load_config(ROOT / "configs" / "demo.yaml"),
                   data={"data_dir": str(synth_dir), "size": 32},
                   model={"unet_width": 4, "unet_depth": 2},
                   train={"epochs": 2, "batch_size": 4},
                   run={"name": name, "storage_path": str(storage)})


def test_bad_requests_fail_before_any_training(tmp_path, synth_dir):
    config = tiny_config(tmp_path, synth_dir)
    with pytest.raises(ValueError, match="at least 2"):
        run_cv(config, folds=1)
    with pytest.raises(ValueError, match=r"must lie in 0\.\.2"):
        run_cv(config, folds=3, only=[3])
    # no --folds: data.folds where the config sets it, else 5
    with pytest.raises(ValueError, match=r"must lie in 0\.\.3"):
        run_cv(replace(config, data={"folds": 4}), only=[4])
    with pytest.raises(ValueError, match=r"must lie in 0\.\.4"):
        run_cv(config, only=[5])
    with pytest.raises(ValueError, match="not data.manifest"):
        run_cv(replace(config, data={"manifest": str(tmp_path / "m.parquet")}), folds=3)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run_cv(config, folds=3, resume=True)
    with pytest.raises(ValueError, match="models per fold, at least 1"):
        run_cv(replace(config, train={"ensemble": 0}), folds=3)
    with pytest.raises(ValueError, match="at least 1"):
        train(replace(config, train={"ensemble": 0}))
    assert run_state(tmp_path / "cv" / "fold-0", 2) == "new"


def test_a_resume_may_change_how_it_runs_but_not_what_it_measures(tmp_path):
    config = ExperimentConfig()
    saved = to_dict(config)
    for section, keys in RUN_ONLY.items():
        for key in keys:
            assert hasattr(getattr(config, section), key), f"RUN_ONLY names no setting {section}.{key}"
    _check_same(saved, replace(config, data={"read_tasks": 1, "read_cache_mb": 0, "read_cpus": 0.5},
                               infer={"replicas": 2, "batch_size": 4, "threshold": 0.4}, scale={"num_workers": 1}),
                tmp_path)  # cv scores at the metric contract's 0.5 whatever infer.threshold says
    with pytest.raises(ValueError, match=r"\(data\.context_slices 0 -> 1, infer\.tta False -> True\)"):
        _check_same(saved, replace(config, data={"context_slices": 1, "read_tasks": 1}, infer={"tta": True}), tmp_path)


def test_workers_this_ray_cannot_place_are_refused_before_the_cv_folder(tmp_path, synth_dir, ray_session,
                                                                       monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ValueError, match=r"need 2 GPU in all, and this Ray has 0 GPU"):
        run_cv(replace(tiny_config(tmp_path, synth_dir), scale={"use_gpu": True}), folds=2)
    assert not (tmp_path / "cv").exists()


def test_a_uri_storage_path_is_refused_before_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = replace(load_config(ROOT / "configs" / "demo.yaml"), run={"storage_path": "s3://bucket/runs"})
    with pytest.raises(ValueError, match="run.storage_path must be a filesystem path"):
        run_cv(config, folds=2)
    assert not list(tmp_path.iterdir())  # no local folder named s3:


def _constant_checkpoint(directory: Path, manifest: Path, logit: float) -> str:
    """A width-4 U-Net at 32 px whose every logit is `logit`: all tumor (+) or all background (-)."""
    import torch

    from raysegm.checkpoint import save_checkpoint
    from raysegm.config import from_dict
    from raysegm.models import create_model

    config = from_dict({"data": {"size": 32, "manifest": str(manifest)},
                        "model": {"variant": "unet", "unet_width": 4, "unet_depth": 2}})
    model = create_model(config.model, in_channels=3).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(logit)
    return str(save_checkpoint(directory, model, config))


def test_each_fold_is_scored_by_its_final_checkpoint_not_its_best(tmp_path, synth_dir):
    """The fold's best checkpoint predicts tumor everywhere, its final one nowhere: the scores must be
    the final one's (per patient: 1 for a tumor-free patient, else 0)."""
    from raysegm.cv import write_summary
    from raysegm.data.discover import prepare
    from raysegm.data.io import read_mask

    config = replace(tiny_config(tmp_path, synth_dir), data={"folds": 2},
                     infer={"tta": False, "postprocess": "none"})
    expected = {}
    for fold in (0, 1):
        run = tmp_path / "cv" / f"fold-{fold}"
        manifest, _ = prepare(synth_dir, run / "data" / "manifest.parquet", folds=2, fold=fold)
        result = {"best_checkpoint": _constant_checkpoint(run / "best", run / "data" / "manifest.parquet", 10.0),
                  "latest_checkpoint": _constant_checkpoint(run / "latest", run / "data" / "manifest.parquet", -10.0)}
        (run / "result.json").write_text(json.dumps(result))
        for volume_id, rows in manifest[manifest["split"] == "val"].groupby("volume_id"):
            expected[volume_id] = 0.0 if any(read_mask(r).any() for r in rows.to_dict("records")) else 1.0
    assert len(expected) == 6
    summary = write_summary(tmp_path / "cv", [0, 1], config)
    table = pd.read_csv(tmp_path / "cv" / "per_patient.csv").set_index("volume_id")
    assert table["dice"].to_dict() == expected
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(sum(expected.values()) / 6)
    assert [row["checkpoint"] for row in summary["per_fold"]] == [
        str(tmp_path / "cv" / f"fold-{fold}" / "latest") for fold in (0, 1)]


@pytest.mark.slow
def test_three_folds_score_every_patient_once_and_resume_keeps_them(tmp_path, synth_dir, ray_session):
    config = tiny_config(tmp_path, synth_dir)
    summary = run_cv(config, folds=3)
    cv_dir = tmp_path / "cv"

    table = pd.read_csv(cv_dir / "per_patient.csv")
    all_patients = sorted(load_manifest(cv_dir / "fold-0" / "data" / "manifest.parquet")["volume_id"].unique())
    assert sorted(table["volume_id"]) == all_patients  # each of the 6 patients exactly once
    for fold in range(3):
        manifest = load_manifest(cv_dir / f"fold-{fold}" / "data" / "manifest.parquet")
        held_out = sorted(manifest.query("split == 'val'")["volume_id"].unique())
        assert sorted(table.query("fold == @fold")["volume_id"]) == held_out
        assert not set(held_out) & set(manifest.query("split == 'train'")["volume_id"])
        # the fold's score is its final checkpoint's, as evaluate computes it on the held-out patients
        result = json.loads((cv_dir / f"fold-{fold}" / "result.json").read_text())
        assert result["epochs_completed"] == 2
        alone = evaluate_checkpoint(result["latest_checkpoint"], split="val",
                                    manifest=cv_dir / f"fold-{fold}" / "data" / "manifest.parquet")
        assert summary["per_fold"][fold]["per_patient_dice_mean"] == pytest.approx(
            alone["per_patient"]["dice"]["mean"])
        assert summary["per_fold"][fold]["checkpoint"] == str(Path(result["latest_checkpoint"]))
    assert summary["n_patients"] == 6
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(table["dice"].mean())
    dice = summary["per_patient"]["dice"]
    assert dice["ci_low"] <= dice["mean"] <= dice["ci_high"]
    markdown = (cv_dir / "summary.md").read_text()
    for label in ("per-patient Dice, mean [95% CI]", "pooled Dice", "per-slice mean Dice"):
        assert label in markdown
    tumor_free = int((~table["has_tumor"].astype(bool)).sum())
    assert summary["tumor_free_patients"] == tumor_free
    assert f"({tumor_free} tumor-free, each scoring Dice 1 or 0)" in markdown

    # a rerun without resume is refused; with it, finished folds are kept as they are
    with pytest.raises(FileExistsError, match="--resume"):
        run_cv(config, folds=3)
    stamps = {fold: (cv_dir / f"fold-{fold}" / "history.csv").stat().st_mtime_ns for fold in range(3)}
    again = run_cv(config, folds=3, resume=True)
    assert {fold: (cv_dir / f"fold-{fold}" / "history.csv").stat().st_mtime_ns for fold in range(3)} == stamps
    assert again["per_patient"]["dice"]["mean"] == pytest.approx(dice["mean"])
    with pytest.raises(ValueError, match="other settings"):
        run_cv(replace(config, train={"lr": 0.1}), folds=3, resume=True)
    # how it runs may change: read workers, their cache, the scoring's batches; the scores stay the same
    rerun = replace(config, data={"read_tasks": 1, "read_cache_mb": 0}, infer={"batch_size": 3})
    assert run_cv(rerun, folds=3, resume=True)["per_patient"]["dice"]["mean"] == pytest.approx(dice["mean"])


@pytest.mark.slow
def test_an_ensemble_per_fold_trains_each_seed_and_scores_their_average(tmp_path, synth_dir, ray_session):
    config = replace(tiny_config(tmp_path, synth_dir, name="ens"), train={"ensemble": 2, "seed": 5})
    summary = run_cv(config, folds=2)
    cv_dir = tmp_path / "ens"
    assert summary["ensemble"] == 2 and "an ensemble of 2 seeds" in (cv_dir / "summary.md").read_text()
    for fold in range(2):
        runs = [cv_dir / f"fold-{fold}", cv_dir / f"fold-{fold}-seed-6"]
        saved = [json.loads((run / "config.json").read_text())["train"] for run in runs]
        assert [t["seed"] for t in saved] == [5, 6] and [t["ensemble"] for t in saved] == [1, 1]
        finals = [json.loads((run / "result.json").read_text())["latest_checkpoint"] for run in runs]
        assert (Path(finals[0]) / "model.safetensors").read_bytes() != (Path(finals[1]) / "model.safetensors").read_bytes()
        together = evaluate_checkpoint(finals, split="val", manifest=runs[0] / "data" / "manifest.parquet")
        assert summary["per_fold"][fold]["checkpoint"] == [str(Path(f)) for f in finals]
        assert summary["per_fold"][fold]["per_patient_dice_mean"] == pytest.approx(together["per_patient"]["dice"]["mean"])
    # the members' seeds are part of what a cross-validation measures: resuming with another count is refused
    with pytest.raises(ValueError, match="train.ensemble"):
        run_cv(replace(config, train={"ensemble": 3}), folds=2, resume=True)


@pytest.mark.slow
def test_a_relative_manifest_trains_an_ensemble_from_another_folder(tmp_path, synth_dir, ray_session, monkeypatch):
    """Ray Train runs each worker in a folder of its own: data.manifest relative to where the command
    runs must still be found, by every member, and by the ensemble's scoring."""
    from raysegm.data.discover import prepare

    prepare(synth_dir, tmp_path / "prepared" / "manifest.parquet")
    monkeypatch.chdir(tmp_path)
    config = replace(tiny_config(tmp_path, synth_dir, name="relative"), train={"ensemble": 2, "epochs": 1},
                     data={"data_dir": "", "manifest": "prepared/manifest.parquet"})
    result = train(config)
    manifest = str(tmp_path / "prepared" / "manifest.parquet")
    for seed in (0, 1):
        saved = json.loads((tmp_path / "relative" / f"seed-{seed}" / "config.json").read_text())
        assert saved["data"]["manifest"] == manifest
    scored = evaluate_checkpoint(result["best_checkpoint"], split="val", manifest=manifest)
    assert result["best"]["val_per_patient_dice"] == pytest.approx(scored["per_patient"]["dice"]["mean"], abs=1e-6)


@pytest.mark.slow
def test_a_training_run_with_an_ensemble_leaves_one_checkpoint_that_scores_as_its_members(tmp_path, synth_dir, ray_session):
    from raysegm.storage import best_checkpoint_of

    config = replace(tiny_config(tmp_path, synth_dir, name="pair"), train={"ensemble": 2, "seed": 3})
    result = train(config)
    run_dir = tmp_path / "pair"
    members = [json.loads((run_dir / f"seed-{seed}" / "result.json").read_text()) for seed in (3, 4)]
    assert [json.loads((run_dir / f"seed-{s}" / "config.json").read_text())["train"]["seed"] for s in (3, 4)] == [3, 4]
    assert best_checkpoint_of(run_dir) == result["best_checkpoint"] == str(run_dir / "ensemble-best")
    manifest = run_dir / "seed-3" / "data" / "manifest.parquet"
    alone = evaluate_checkpoint(run_dir, split="val", manifest=manifest)
    listed = evaluate_checkpoint([m["best_checkpoint"] for m in members], split="val", manifest=manifest)
    assert alone["per_patient"]["dice"]["mean"] == pytest.approx(listed["per_patient"]["dice"]["mean"], abs=1e-6)
    assert result["best"]["val_per_patient_dice"] == pytest.approx(alone["per_patient"]["dice"]["mean"], abs=1e-6)
    # the combined final checkpoint is the members' final checkpoints averaged, as the best one is theirs
    latest = evaluate_checkpoint(result["latest_checkpoint"], split="val", manifest=manifest)
    latest_listed = evaluate_checkpoint([m["latest_checkpoint"] for m in members], split="val", manifest=manifest)
    assert latest["per_patient"]["dice"]["mean"] == pytest.approx(latest_listed["per_patient"]["dice"]["mean"],
                                                                  abs=1e-6)
    assert latest["pooled"]["dice"] == pytest.approx(latest_listed["pooled"]["dice"], abs=1e-6)

    stamps = [(run_dir / f"seed-{s}" / "history.csv").stat().st_mtime_ns for s in (3, 4)]
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(config)
    again = train(config, resume=True)  # both members finished: nothing retrains, the ensemble is rebuilt alike
    assert [(run_dir / f"seed-{s}" / "history.csv").stat().st_mtime_ns for s in (3, 4)] == stamps
    assert again["best"] == result["best"]


def test_folds_prepared_from_other_patients_are_refused(tmp_path, synth_dir):
    """Every fold prepares its own manifest; a patient set that changed between folds would deal other
    folds (patients held out twice or never), so it is an error before training on it."""
    import shutil

    from raysegm.cv import fold_patients
    from raysegm.data.discover import prepare

    data = tmp_path / "data" / "kaggle_3m"
    shutil.copytree(synth_dir, data)
    cv_dir = tmp_path / "cv"
    prepare(data, cv_dir / "fold-0" / "data" / "manifest.parquet", folds=3, fold=0)
    prepare(data, cv_dir / "fold-1" / "data" / "manifest.parquet", folds=3, fold=1)
    patients = sorted(p.name for p in data.iterdir() if p.is_dir())
    assert fold_patients(cv_dir) == set(patients)

    shutil.rmtree(data / patients[-1])  # a patient gone (deleted, or unreadable this time) before fold 2
    prepare(data, cv_dir / "fold-2" / "data" / "manifest.parquet", folds=3, fold=2)
    with pytest.raises(ValueError, match=rf"holds other patients .*only in the second: \['{patients[-1]}'\]"):
        fold_patients(cv_dir)

    shutil.rmtree(cv_dir / "fold-2")  # the same patients, read from another folder
    prepare(synth_dir, cv_dir / "fold-2" / "data" / "manifest.parquet", folds=3, fold=2)
    with pytest.raises(ValueError, match="every fold of a cross-validation reads the same data folder"):
        fold_patients(cv_dir)


def test_a_resume_without_folds_keeps_the_k_it_started_with(tmp_path, synth_dir):
    from raysegm.config import save_json

    config = tiny_config(tmp_path, synth_dir)
    (tmp_path / "cv").mkdir()
    save_json(replace(config, data={"folds": 3}), tmp_path / "cv" / "config.json")
    with pytest.raises(ValueError, match=r"must lie in 0\.\.2"):  # k = 3 from the saved study, not 5
        run_cv(config, only=[4], resume=True)


def test_synthetic_folds_generated_in_each_fold_folder_agree(tmp_path):
    from raysegm.cv import fold_patients
    from raysegm.data.discover import manifest_for

    config = replace(load_config(ROOT / "configs" / "demo.yaml"),
                     data={"data_dir": "", "synthetic_patients": 4, "synthetic_slices": 4, "size": 32, "folds": 2})
    for fold in (0, 1):
        manifest_for(replace(config, data={"fold": fold}).data, tmp_path / f"fold-{fold}" / "data")
    assert len(fold_patients(tmp_path)) == 4


def test_running_one_fold_scores_every_finished_fold(tmp_path, synth_dir, ray_session):
    """`raysegm cv --fold 1` after fold 0 finished: the tables hold both folds' patients, not fold 1's."""
    from raysegm.config import save_json
    from raysegm.data.discover import prepare

    config = replace(tiny_config(tmp_path, synth_dir), data={"folds": 2})
    cv_dir = tmp_path / "cv"
    for fold in (0, 1):
        run = cv_dir / f"fold-{fold}"
        prepare(synth_dir, run / "data" / "manifest.parquet", folds=2, fold=fold)
        latest = _constant_checkpoint(run / "latest", run / "data" / "manifest.parquet", -10.0)
        (run / "result.json").write_text(json.dumps({"latest_checkpoint": latest, "epochs_completed": 2}))
    save_json(config, cv_dir / "config.json")
    summary = run_cv(config, only=[1], resume=True)  # finished: nothing trains
    assert summary["folds_scored"] == [0, 1]
    table = pd.read_csv(cv_dir / "per_patient.csv")
    assert sorted(table["volume_id"]) == sorted(p.name for p in synth_dir.iterdir() if p.is_dir())
    assert table.groupby("fold")["volume_id"].count().tolist() == [3, 3]
