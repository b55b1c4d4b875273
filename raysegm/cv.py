"""Patient-level k-fold cross-validation: every patient is scored once, by a model that never saw it.

The patients are dealt into k folds (raysegm.data.discover.assign_splits with data.folds = k). Fold i
is one Ray Train run (raysegm.train.train) that trains on the other k - 1 folds; its held-out fold is
its validation split, watched each epoch but never used to choose: the fold's out-of-fold score comes
from the run's *final* checkpoint, so no patient both chose a model and scored it. Each run uses the
whole cluster (data-parallel workers), and the folds run one after another. With train.ensemble = n, a
fold is n runs that differ only in train.seed (seed, seed + 1, ...), scored as one ensemble: their
probabilities averaged before the threshold (raysegm.evaluate.score_checkpoint).

After the folds, every held-out patient is scored with the metric contract (raysegm.evaluate, with
the config's infer.tta and infer.postprocess), and the cross-validation folder
`run.storage_path/run.name` holds:

    config.json        the resolved config, folds included
    fold-<i>/          fold i's Ray Train run (manifest in data/, checkpoints, history.csv)
    fold-<i>-seed-<s>/ with train.ensemble > 1, its other members' runs
    per_patient.csv    one row per patient: fold, volume_id, Dice, IoU, ..., HD95 (pixels)
    summary.json/md    per-patient Dice mean, median and 95% CI over all out-of-fold patients; the
                       pooled and per-slice figures beside them, each labelled as such; per fold too

A rerun with `resume` keeps finished folds, continues an unfinished one from its latest checkpoint and
starts the rest. Running some folds only (`only`, `raysegm cv --fold i`) trains those; the tables then
score every finished fold, so they never describe fewer patients than are done.
"""

from __future__ import annotations

import json
from pathlib import Path

from raysegm.config import SCORED_RUN_ONLY, ExperimentConfig, changed_settings, replace, save_json

DEFAULT_FOLDS = 5  # k when neither --folds nor data.folds gives one


def run_cv(config: ExperimentConfig, folds: int | None = None, only: list[int] | None = None,
           resume: bool = False) -> dict:
    """Train `folds` folds (or those listed in `only`), then score every finished fold; returns the summary.

    folds: None takes data.folds where the config sets it, else on a resume the k the cross-validation
    was started with, else DEFAULT_FOLDS."""
    from raysegm.data.discover import manifest_for
    from raysegm.train import check_settings, check_worker_resources, ensure_ray, run_state, train

    if config.data.manifest:
        raise ValueError("cross-validation splits the patients itself: give data.data_dir (or no data for "
                         "synthetic data), not data.manifest")
    cv_dir = Path(config.run.storage_path).expanduser().resolve() / config.run.name  # made further down
    saved = cv_dir / "config.json"
    started = json.loads(saved.read_text()) if saved.is_file() else None
    if folds is None:  # a resume keeps the k it was started with
        folds = config.data.folds or (resume and started and started["data"]["folds"]) or DEFAULT_FOLDS
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if config.train.ensemble < 1:
        raise ValueError(f"train.ensemble is the number of models per fold, at least 1, got {config.train.ensemble}")
    selected = sorted(set(range(folds) if only is None else only))
    if not selected or not all(0 <= i < folds for i in selected):
        raise ValueError(f"folds to run must lie in 0..{folds - 1}, got {only}")
    check_settings(config)  # before any folder is made (a URI storage_path would become a local one)
    config = replace(config, data={"folds": folds})
    if started is not None:
        if not resume:
            raise FileExistsError(f"{cv_dir} already holds a cross-validation: continue it with --resume "
                                  f"or choose another run.name")
        _check_same(started, config, saved)
    elif resume:
        raise FileNotFoundError(f"nothing to resume: {cv_dir} holds no cross-validation")
    ensure_ray(config.scale)
    check_worker_resources(config.scale)  # before the folder: Train workers this Ray can never place
    cv_dir.mkdir(parents=True, exist_ok=True)
    save_json(config, saved)

    for fold in selected:
        for name, seed in members(fold, config):
            member = replace(config, data={"fold": fold}, train={"seed": seed, "ensemble": 1},
                             run={"name": name, "storage_path": str(cv_dir)})
            state = run_state(cv_dir / name, config.train.epochs)
            print(f"fold {fold} of 0-{folds - 1}, seed {seed} ({name}): {state}", flush=True)
            if state != "finished":
                manifest_for(member.data, cv_dir / name / "data")  # the one train() reads
                fold_patients(cv_dir)  # before training: its patients are every other fold's
                train(member, resume=state == "unfinished")
    finished = [fold for fold in range(folds)  # those run now and any finished before (--fold runs some)
                if all(run_state(cv_dir / name, config.train.epochs) == "finished"
                       for name, _ in members(fold, config))]
    return write_summary(cv_dir, finished, config)


def fold_patients(cv_dir: Path) -> set[str]:
    """The patients of the cross-validation, checked to be the same in every fold's manifest.

    Each fold prepares its own manifest from data.data_dir, and the fold split is a function of the seed
    and the set of patients alone: a set that changed between folds (a patient added or unreadable, the
    data folder edited or resolved elsewhere on a resume) would deal other folds, so some patients would
    be held out twice and others never. That is an error here, before any training on it.
    """
    from raysegm.data.discover import load_manifest, manifest_settings

    first, first_path = None, None
    for path in sorted(cv_dir.glob("fold-*/data/manifest.parquet")):
        source = Path(manifest_settings(path)["data_dir"])
        if source.is_relative_to(path.parent):  # synthetic data, generated inside each fold's folder
            source = Path(source.name)
        found = (str(source), set(load_manifest(path)["volume_id"].astype(str)))
        if first is None:
            first, first_path = found, path
            continue
        if found[0] != first[0]:
            raise ValueError(f"{path} was prepared from {found[0]}, {first_path} from {first[0]}: every fold "
                             f"of a cross-validation reads the same data folder")
        if found[1] != first[1]:
            only_here, only_there = sorted(found[1] - first[1]), sorted(first[1] - found[1])
            raise ValueError(f"{path} holds other patients than {first_path} (only in the first: "
                             f"{only_here[:5]}; only in the second: {only_there[:5]}): the folds would not "
                             f"partition the patients; the data folder changed between folds")
    return set() if first is None else first[1]


def members(fold: int, config: ExperimentConfig) -> list[tuple[str, int]]:
    """(run folder name, train.seed) of each model of `fold`: fold-<i> first, then fold-<i>-seed-<s>."""
    seeds = [config.train.seed + m for m in range(config.train.ensemble)]
    return [(f"fold-{fold}" if m == 0 else f"fold-{fold}-seed-{seed}", seed) for m, seed in enumerate(seeds)]


def _check_same(saved: dict, config: ExperimentConfig, path: Path) -> None:
    # Where and how it runs may change on resume (scale, run, SCORED_RUN_ONLY); what it measures may not.
    changed = changed_settings(saved, config, allowed=SCORED_RUN_ONLY)
    if changed:
        raise ValueError(f"{path}: the cross-validation was started with other settings ({', '.join(changed)}); "
                         f"resume it with the same config or choose another run.name")


def write_summary(cv_dir: Path, folds_run: list[int], config: ExperimentConfig) -> dict:
    """Score each fold's final checkpoint on its held-out patients, pool them, write the tables."""
    from raysegm.evaluate import score_checkpoint
    from raysegm.metrics import SegmentationMeter

    states, fold_of, checkpoints = [], {}, {}
    for fold in folds_run:
        finals = [json.loads((cv_dir / name / "result.json").read_text())["latest_checkpoint"]
                  for name, _ in members(fold, config)]
        scored, meter = score_checkpoint(finals, manifest=cv_dir / f"fold-{fold}" / "data" / "manifest.parquet",
                                         split="val", tta=config.infer.tta, postprocess=config.infer.postprocess)
        state = meter.state()
        states.append(state)
        fold_of.update({volume_id: fold for volume_id in state["volume_ids"]})
        checkpoints[fold] = scored["checkpoint"]
    pooled = SegmentationMeter.from_states(states)  # a patient held out by two folds is an error there
    table = pooled.per_patient_table()
    if folds_run == list(range(config.data.folds)):
        missed = sorted(fold_patients(cv_dir) - set(table["volume_id"]))
        if missed:
            raise ValueError(f"{cv_dir}: {len(missed)} patients held out by no fold: {missed[:5]}")
    table.insert(0, "fold", table["volume_id"].map(fold_of))
    headline = pooled.summary(table=table)
    per_fold = [{"fold": fold, "patients": int((table["fold"] == fold).sum()),
                 "per_patient_dice_mean": float(table.loc[table["fold"] == fold, "dice"].mean()),
                 "checkpoint": checkpoints[fold]} for fold in folds_run]
    summary = {
        "folds": config.data.folds,
        "folds_scored": folds_run,
        "checkpoint_choice": "final epoch of each fold (the held-out patients chose nothing)",
        "ensemble": config.train.ensemble,
        "tta": config.infer.tta,
        "postprocess": config.infer.postprocess,
        **headline,
        "per_fold": per_fold,
    }
    table.sort_values(["fold", "volume_id"]).to_csv(cv_dir / "per_patient.csv", index=False)
    (cv_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (cv_dir / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary), flush=True)
    return summary


def summary_markdown(summary: dict) -> str:
    dice = summary["per_patient"]["dice"]
    scope = (f"all {summary['folds']} folds" if len(summary["folds_scored"]) == summary["folds"]
             else f"fold(s) {', '.join(str(f) for f in summary['folds_scored'])} of {summary['folds']}")
    lines = [
        f"# Cross-validation: {scope}, {summary['n_patients']} out-of-fold patients "
        f"({summary['tumor_free_patients']} tumor-free, each scoring Dice 1 or 0), {summary['n_slices']} slices",
        "",
        "Scored with each fold's final-epoch checkpoint"
        + (f" (an ensemble of {summary['ensemble']} seeds)" if summary["ensemble"] > 1 else "")
        + f"; TTA {'on' if summary['tta'] else 'off'}, "
        f"post-processing {summary['postprocess']}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| per-patient Dice, mean [95% CI] | {dice['mean']:.4f} [{dice['ci_low']:.4f}, {dice['ci_high']:.4f}] |",
        f"| per-patient Dice, median | {dice['median']:.4f} |",
        f"| per-patient IoU, mean | {summary['per_patient']['iou']['mean']:.4f} |",
        f"| per-patient HD95 (pixels), median | {summary['per_patient']['hd95']['median']:.2f} |",
        *([f"| per-patient HD95 (mm, from the NIfTI headers), median | "
           f"{summary['per_patient']['hd95_mm']['median']:.2f} |"] if "hd95_mm" in summary["per_patient"] else []),
        f"| pooled Dice (every pixel of every patient) | {summary['pooled']['dice']:.4f} |",
        f"| per-slice mean Dice (empty slices predicted empty score 1) | {summary['per_slice_mean_dice']:.4f} |",
        "",
        "| fold | patients | per-patient Dice mean |",
        "|---|---|---|",
        *(f"| {row['fold']} | {row['patients']} | {row['per_patient_dice_mean']:.4f} |" for row in summary["per_fold"]),
        "",
    ]
    return "\n".join(lines)
