"""The whole raysegm path on synthetic data, on any laptop: ablation, then inference, then the report.

Nothing is downloaded and no GPU is needed. `run_demo` composes the same functions the commands use:

    run_study(configs/ablation-demo.yaml)    synthetic patients generated and split by patient; the four
                                             variants x both losses, tiny encoders at 64 px; every trial's
                                             best checkpoint scored on the test patients
    generate_dataset(seed HOLDOUT_SEED)      held-out volumes no trial has seen
    infer(best trial's best checkpoint)      their masks into Parquet, one row per slice
    write_report(study)                      report.html / report.md in the study folder

The best trial is chosen by validation per-patient Dice, never by the test numbers in the table.
The masks in the Parquet output are scored against the held-out truth, so the demo checks its own output.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raysegm.config import ExperimentConfig, load_config, replace

PRESET = Path(__file__).resolve().parents[1] / "configs" / "ablation-demo.yaml"
HOLDOUT_SEED = 1000  # the study's synthetic patients use data.split_seed; these are other patients
HOLDOUT_PATIENTS = 4
# `quick`: the same path with the least that still trains and tests something (used by the tests).
QUICK = {
    "data": {"synthetic_patients": 6, "synthetic_slices": 8},
    "train": {"epochs": 2},
    "tune": {"variants": ["unet", "unet_resnet50_attention"], "losses": ["bce_dice"]},
}
QUICK_HOLDOUT_PATIENTS = 2


def demo_config(out: Path, quick: bool = False) -> ExperimentConfig:
    """configs/ablation-demo.yaml with the study written to out/study (and QUICK applied when quick)."""
    if not PRESET.is_file():
        raise FileNotFoundError(f"{PRESET} not found: the demo runs from a checkout of the repository "
                                f"(pip install -e .)")
    config = replace(load_config(PRESET), run={"name": "study", "storage_path": str(out)})
    return replace(config, **QUICK) if quick else config


def best_trial(study_dir: Path) -> dict:
    """The completed trial with the highest validation per-patient Dice (results.json row)."""
    results = json.loads((study_dir / "results.json").read_text())
    completed = [row for row in results if row.get("checkpoint") and row.get("status") != "error"]
    if not completed:
        raise RuntimeError(f"{study_dir}: no trial produced a checkpoint (see trials.json)")
    return max(completed, key=lambda row: row["val_dice"])


def score_masks(masks_dir: Path, data_dir: Path) -> dict:
    """Per-patient Dice of the Parquet masks against the truth under `data_dir` (metric contract)."""
    import pandas as pd

    from raysegm.data.discover import discover
    from raysegm.data.io import read_mask
    from raysegm.infer import decode_mask_png
    from raysegm.metrics import SegmentationMeter

    rows = pd.read_parquet(masks_dir)
    truth, _ = discover(data_dir)
    merged = rows.merge(truth, on=["volume_id", "slice_index"], how="inner", validate="one_to_one")
    if len(merged) != len(truth) or (merged["status"] != "ok").any():
        raise RuntimeError(f"{masks_dir}: {len(rows)} rows, {int((rows['status'] != 'ok').sum())} errors, "
                           f"for {len(truth)} held-out slices")
    meter = SegmentationMeter()
    for row in merged.to_dict("records"):
        meter.update([row["volume_id"]], [row["slice_index"]], decode_mask_png(row["mask_png"])[None],
                     read_mask(row)[None].astype(bool))
    summary = meter.summary()
    dice = summary["per_patient"]["dice"]
    return {"patients": summary["n_patients"], "tumor_free_patients": summary["tumor_free_patients"],
            "slices": summary["n_slices"], "dice_mean": dice["mean"], "dice_ci_low": dice["ci_low"],
            "dice_ci_high": dice["ci_high"], "pooled_dice": summary["pooled"]["dice"]}


def run_demo(out="demo-output", quick: bool = False) -> dict:
    """Ablation, inference and report on synthetic data under `out`; prints where each output is.

    Returns {study_dir, results_table, report, masks, holdout, best_trial, best_checkpoint, inference
    (infer's summary), holdout_score (score_masks), wall_s}.
    """
    import ray
    from ray.data import DataContext

    from raysegm.data.synth import generate_dataset
    from raysegm.infer import infer
    from raysegm.report import write_report
    from raysegm.tune import run_study

    started = time.time()
    out = Path(out).expanduser().resolve()
    config = demo_config(out, quick)
    if (out / config.run.name).exists() or (out / "masks").exists():
        raise FileExistsError(f"{out} already holds a demo: delete it or pass --out with another folder")
    ray_was_running = ray.is_initialized()
    if not ray_was_running:
        # One local Ray for all three stages. Its workers keep Ray Data's progress bars off: bars from
        # many processes interleave into an unreadable log, and the stages print their own progress.
        ray.init(num_cpus=config.scale.local_num_cpus, include_dashboard=True,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
        DataContext.get_current().enable_progress_bars = False
    try:
        study_dir = run_study(config)
        best = best_trial(study_dir)
        holdout = generate_dataset(out / "holdout" / "kaggle_3m",
                                   patients=QUICK_HOLDOUT_PATIENTS if quick else HOLDOUT_PATIENTS,
                                   slices=config.data.synthetic_slices, size=config.data.size, seed=HOLDOUT_SEED)
        masks = out / "masks"
        inference = infer(best["checkpoint"], holdout, masks, config.infer)
        holdout_score = score_masks(masks, holdout)
        report = write_report(study_dir)
    finally:
        if not ray_was_running:
            ray.shutdown()
    summary = {
        "study_dir": str(study_dir), "results_table": str(study_dir / "results.md"), "report": str(report),
        "masks": str(masks), "holdout": str(holdout), "best_trial": best["trial_id"],
        "best_checkpoint": best["checkpoint"], "inference": inference, "holdout_score": holdout_score,
        "wall_s": round(time.time() - started, 1),
    }
    _print_summary(summary, best)
    return summary


def _print_summary(summary: dict, best: dict) -> None:
    score = summary["holdout_score"]
    print("\n" + (Path(summary["results_table"])).read_text())
    print(f"raysegm demo: done in {summary['wall_s']:.0f} s")
    print(f"  study folder     {summary['study_dir']}")
    print(f"  results table    {summary['results_table']}")
    print(f"  report           {summary['report']}")
    print(f"  masks (Parquet)  {summary['masks']}  ({summary['inference']['slices']} slices of "
          f"{summary['inference']['volumes']} held-out volumes, read with pandas.read_parquet)")
    print(f"  best trial       {summary['best_trial']} ({best['model']}, loss {best['loss']}, validation "
          f"per-patient Dice {best['val_dice']:.3f}): {summary['best_checkpoint']}")
    print(f"  held-out masks   per-patient Dice {score['dice_mean']:.3f} "
          f"[95% CI {score['dice_ci_low']:.3f}, {score['dice_ci_high']:.3f}], pooled Dice "
          f"{score['pooled_dice']:.3f}, over {score['patients']} volumes ({score['tumor_free_patients']} tumor-free)")
