"""Ablation studies with Ray Tune: model variant x batch size x loss (and any extra axes), one table.

`run_study` resolves the manifest once (every trial trains and is tested on the same patients), then
runs a grid search in which each Tune trial builds and fits one Ray Train `TorchTrainer`
(raysegm.train.build_trainer) whose run name is `trial-<Tune trial id>`: the id survives a restart, so
a resumed study finds each trial's Train run and continues it from its latest checkpoint. Validation
per-patient Dice (raysegm.train.VAL_METRIC) is Tune's metric, and ASHA's when early stopping is on.

After the search, each trial's best checkpoint (by validation per-patient Dice) is scored on the test
split with raysegm.evaluate, and the study folder `run.storage_path/run.name` gets:

    config.json          the resolved config (the manifest filled in)
    data/                the manifest (when the study prepared or generated it)
    tune/                Ray Tune's experiment: per trial progress.csv, result.json and TensorBoard events
    trials/trial-<id>/   each trial's Ray Train run (checkpoints, history)
    launches.jsonl       one line each time a trial started training, or reused a finished run
    trials.json          every trial's id, parameters, status and error
    evaluation/trial-<id>/  per_patient.csv and summary.json on the test split
    curves.csv           learning curves: trial_id, epoch, train loss, validation Dice...
    per_patient.csv      test per-patient metrics of every trial
    results.csv/json/md  one row per trial
    summary.csv/md       per variant: the trial chosen by validation, and the mean over trials
    paired.csv/md        per-patient Dice differences to the variant without ResNet encoder/attention
    paper.md             the paper's Table 5 beside ours, with why the two cannot be compared

The study folder is a filesystem path every node can reach (local disk, or a shared mount on a cluster).
With ASHA on, Tune kills the trials it stops early, and Ray Train's placement-group cleaner frees their
workers' CPUs. The cleaner finds its cluster through RAY_ADDRESS or RAY_API_SERVER_ADDRESS in the nodes'
environment, or as the only Ray instance on the host; on a host running several Ray instances without
those variables, a trial stopped early keeps its CPUs until the study ends.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd

from raysegm.config import SCORED_RUN_ONLY, ExperimentConfig, from_dict, replace, save_json, to_dict
from raysegm.storage import replace_atomically
from raysegm.train import VAL_METRIC, absolute_paths, absolute_saved_paths, by_address, check_worker_resources

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
EVALUATION_DIR = "evaluation"
LAUNCHES = "launches.jsonl"
MAIN_AXES = ("model.variant", "train.batch_size", "train.loss")
# Below this many test patients a percentile bootstrap has too few distinct resamples to bound a mean
# difference, so a pair gets no verdict.
MIN_PATIENTS_FOR_VERDICT = 5
# Keys that may change when a study is resumed: where and how it runs, not what it measures. The data
# and infer ones of SCORED_RUN_ONLY (read workers, their cache; inference batches, replicas, threads,
# threshold), as `raysegm cv` allows, are applied to the resumed study; not infer.tta or
# infer.postprocess, which score its trials. data.manifest may be left out or differ, and the study
# keeps the one it resolved at its start. Tune's own (trials at once, trial CPUs, MLflow tracking) may
# not change: Tuner.restore reloads them from the experiment state as the study started, and each
# restored trial keeps its resource request.
RESUMED_RUN_ONLY = ("data", "infer")
RESUMABLE_KEYS = ("scale.", "run.", "data.manifest",
                  *(f"{section}.{key}" for section in RESUMED_RUN_ONLY for key in SCORED_RUN_ONLY[section]))
# The paper's Table 5 as printed (accuracy, Dice, IoU, loss).
PAPER_TABLE5 = [
    ("Baseline Model (Dattangire et al.)", 0.95, 0.85, 0.75, None),
    ("U-Net Model", 0.991, 0.0667, 0.4960, 0.0353),
    ("U-Net with Attention", 0.940, 0.1733, 0.4960, 0.1580),
    ("U-Net with ResNet50", 0.9919, 1.0, 0.4960, 1.0),
    ("Combined Model", 0.9921, 0.1635, 0.4959, 0.072),
]
PAPER_VARIANTS = {"U-Net Model": "unet", "U-Net with Attention": "unet_attention",
                  "U-Net with ResNet50": "unet_resnet50", "Combined Model": "unet_resnet50_attention"}


# ---------------------------------------------------------------------------------------------------
# the search space


def grid_axes(config: ExperimentConfig) -> dict[str, list]:
    """Every grid axis as "section.key" -> values: the three main axes, then tune.extra_axes."""
    t = config.tune
    axes = {"model.variant": list(t.variants), "train.batch_size": list(t.batch_sizes),
            "train.loss": list(t.losses)}
    for key, values in t.extra_axes.items():
        if key in MAIN_AXES:
            raise ValueError(f"tune.extra_axes: {key} is already an axis (tune.variants, tune.batch_sizes, "
                             f"tune.losses set it)")
        if key.count(".") != 1:
            raise ValueError(f"tune.extra_axes: {key!r} must name one config key as section.key, e.g. train.lr")
        if not isinstance(values, list) or not values:
            raise ValueError(f"tune.extra_axes: {key} needs a non-empty list of values, got {values!r}")
        axes[key] = list(values)
    for key, values in axes.items():
        if not values:
            raise ValueError(f"the study has no values for {key}")
    return axes


def _nested(flat: dict) -> dict:
    nested: dict = {}
    for key, value in flat.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return nested


def trial_config(base: ExperimentConfig, params: dict) -> ExperimentConfig:
    """The base config with one trial's parameters ({"model": {"variant": ...}, "train": {...}}) applied."""
    return replace(base, **params)


def check_study(config: ExperimentConfig) -> list[dict]:
    """Every grid point as trial parameters, each checked the way training will check it (fail before Ray)."""
    from raysegm.losses import LOSSES
    from raysegm.models import REGISTRY
    from raysegm.train import check_settings

    axes = grid_axes(config)
    for variant in axes["model.variant"]:
        if variant not in REGISTRY:
            raise ValueError(f"tune.variants: unknown variant {variant!r}; choose from {', '.join(REGISTRY)}")
    for loss in axes["train.loss"]:
        if loss not in LOSSES:
            raise ValueError(f"tune.losses: unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    if config.tune.asha and not 1 <= config.tune.asha_grace_epochs <= config.train.epochs:
        raise ValueError(f"tune.asha_grace_epochs must be between 1 and train.epochs ({config.train.epochs}), "
                         f"got {config.tune.asha_grace_epochs}")
    if config.train.ensemble != 1:
        raise ValueError(f"train.ensemble {config.train.ensemble}: a study's trial trains one model; set "
                         "train.ensemble=1 (raysegm cv measures an ensemble)")
    if config.tune.max_concurrent_trials < 1:
        raise ValueError(f"tune.max_concurrent_trials must be at least 1 (trials at once), got "
                         f"{config.tune.max_concurrent_trials}")
    if not config.tune.trial_cpus > 0:
        raise ValueError(f"tune.trial_cpus must be above 0 (Ray refuses 0), got {config.tune.trial_cpus}")
    grid = []
    for values in product(*axes.values()):
        params = _nested(dict(zip(axes, values)))
        try:
            check_settings(trial_config(config, params))
        except ValueError as error:
            raise ValueError(f"trial {dict(zip(axes, values))}: {error}") from error
        grid.append(params)
    return grid


def search_space(config: ExperimentConfig) -> dict:
    """Tune's param_space: one `tune.grid_search` per axis, nested by config section."""
    from ray import tune

    return _nested({key: tune.grid_search(values) for key, values in grid_axes(config).items()})


# ---------------------------------------------------------------------------------------------------
# the driver


def run_study(config: ExperimentConfig, resume: bool = False) -> Path:
    """Run (or with `resume`, continue) the ablation study and write its tables; returns the study folder.

    A folder that already holds a study is a FileExistsError without `resume`. With it, finished
    trials are kept as they are, unfinished and errored ones continue from their Train run's latest
    checkpoint; the study's config.json is authoritative, and a config that changes anything but scale,
    run, infer and the data read settings is a ValueError. ASHA's rungs are not part of Tune's saved
    state: after a resume, trials are compared only with results reported since.
    """
    study_dir = Path(config.run.storage_path).expanduser().resolve() / config.run.name
    tune_dir = study_dir / TUNE_DIR
    if resume:
        if not (study_dir / "config.json").is_file():
            raise FileNotFoundError(f"nothing to resume: {study_dir} holds no study")
        config = _resumed_config(study_dir, absolute_paths(config))
    elif study_dir.exists() and any(study_dir.iterdir()):
        raise FileExistsError(f"{study_dir} already holds a study: continue it with --resume (resume=True) "
                              f"or choose another run.name")
    grid = check_study(config)
    callbacks = _tune_callbacks(config)
    _ensure_ray(config.scale)
    check_worker_resources(config.scale)
    _check_data_can_run(config, trials=len(grid))

    if not resume:
        study_dir.mkdir(parents=True, exist_ok=True)
        config = replace(absolute_paths(config), data={"manifest": _resolve_manifest(config, study_dir)},
                         run={"storage_path": str(study_dir.parent)})
        save_json(config, study_dir / "config.json")
    axes = " x ".join(f"{len(values)} {key}" for key, values in grid_axes(config).items())
    print(f"study {study_dir}: {len(grid)} trials ({axes}){', resumed' if resume else ''}", flush=True)
    tuner = _tuner(config, study_dir, callbacks, restore=resume and _can_restore(tune_dir))
    result_grid = tuner.fit()
    _write_json(study_dir / "trials.json", _trial_records(result_grid))
    results = write_results(study_dir)
    print((study_dir / "results.md").read_text(), flush=True)
    errors = results[results["status"] == "error"]
    if len(errors) == len(results):
        raise RuntimeError(f"every trial of {study_dir} failed (see trials.json); the first: "
                           f"{errors['error'].iloc[0]}")
    if len(errors):
        print(f"{len(errors)} of {len(results)} trials failed: {', '.join(errors['trial_id'])} (see trials.json)",
              flush=True)
    return study_dir


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "extra_axes":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _resumed_config(study_dir: Path, config: ExperimentConfig) -> ExperimentConfig:
    saved = from_dict(absolute_saved_paths(json.loads((study_dir / "config.json").read_text())))
    before, after = _flat(to_dict(saved)), _flat(to_dict(config))
    changed = sorted(key for key in before
                     if before[key] != after.get(key) and not key.startswith(RESUMABLE_KEYS))
    if changed:
        raise ValueError(f"cannot resume {study_dir} with a different experiment: "
                         + ", ".join(f"{key} {before[key]!r} -> {after.get(key)!r}" for key in changed))
    operational = {"scale": to_dict(config)["scale"]}
    for section in RESUMED_RUN_ONLY:
        operational[section] = {key: getattr(getattr(config, section), key)
                                for key in SCORED_RUN_ONLY[section]}
    return replace(saved, **operational)


def _can_restore(tune_dir: Path) -> bool:
    from ray import tune

    return tune_dir.is_dir() and tune.Tuner.can_restore(str(tune_dir))


def _ensure_ray(scale) -> None:
    import ray
    from ray.data import DataContext

    quiet = not sys.stdout.isatty()
    if not ray.is_initialized():
        if by_address(scale):
            ray.init(address=scale.ray_address or None)
        else:
            _start_local_ray(scale.local_num_cpus, quiet)
    if quiet:
        DataContext.get_current().enable_progress_bars = False


def _start_local_ray(num_cpus: int, quiet: bool) -> None:
    """A local Ray with its dashboard on, which Ray Train needs to free the placement group of a trial
    that Tune stops.

    The cleaner that frees it reaches the dashboard through RAY_API_SERVER_ADDRESS where more than one
    Ray runs on the host; the nodes started here, and so every worker, inherit the variable. `quiet`
    turns Ray Data's progress bars off in the workers too (bars from many processes garble a log file).
    """
    import socket

    import ray

    options = {"num_cpus": num_cpus, "include_dashboard": True}
    if quiet:
        options["runtime_env"] = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}
    if not os.environ.get("RAY_API_SERVER_ADDRESS"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            options["dashboard_port"] = probe.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{options['dashboard_port']}"
    ray.init(**options)


def _check_data_can_run(config: ExperimentConfig, trials: int) -> None:
    """Ray Data's random_shuffle of the training split runs 1-CPU tasks: they wait forever when the
    trials' Train workers and Tune functions leave less than one CPU of the cluster free. An error on
    a Ray reached without an address (it will not grow), a warning on a cluster (it may)."""
    import ray

    s, t = config.scale, config.tune
    at_once = min(t.max_concurrent_trials, trials)
    held = at_once * (t.trial_cpus + s.num_workers * s.cpus_per_worker)
    free = ray.cluster_resources().get("CPU", 0.0) - held
    if free < 1:
        message = (f"{at_once} trial(s) at once hold {held:g} of the cluster's "
                   f"{ray.cluster_resources().get('CPU', 0.0):g} CPUs, leaving {free:g}: the training data's "
                   f"shuffle tasks need 1 CPU (lower scale.cpus_per_worker or tune.max_concurrent_trials, or "
                   f"start Ray with more logical CPUs)")
        if not by_address(s):
            raise ValueError(message)
        print(f"warning: {message}; they will wait until the cluster grows", file=sys.stderr, flush=True)


def _resolve_manifest(config: ExperimentConfig, study_dir: Path) -> str:
    """Prepare (or load) the manifest once for every trial; the test split must not be empty."""
    from raysegm.data.discover import manifest_for
    from raysegm.data.pipeline import check_channels

    work_dir = study_dir / "data"
    manifest = manifest_for(config.data, work_dir)
    manifest_path = config.data.manifest or str(work_dir / "manifest.parquet")
    if not (manifest["split"] == "test").any():
        raise ValueError(f"{manifest_path}: the study needs test patients, the manifest has none")
    check_channels(manifest, config.data, manifest_path)  # here, not in every trial
    return str(Path(manifest_path).resolve())


def _tune_callbacks(config: ExperimentConfig) -> list:
    """Tune's CSV/JSON loggers, TensorBoard (required, not best effort) and MLflow when configured."""
    import importlib.util

    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    callbacks = [CSVLoggerCallback(), JsonLoggerCallback(), TBXLoggerCallback()]
    uri = config.tune.mlflow_tracking_uri
    if uri:
        if importlib.util.find_spec("mlflow") is None:
            raise ValueError(f"tune.mlflow_tracking_uri is set ({uri}) but mlflow is not installed: "
                              f"pip install 'raysegm[mlflow]', or leave tune.mlflow_tracking_uri empty")
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=config.run.name))
    return callbacks


def _trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"


def scheduler(config: ExperimentConfig):
    """ASHA over epochs where tune.asha is on, else None (every trial runs its epochs)."""
    from ray.tune.schedulers import ASHAScheduler

    if not config.tune.asha:
        return None
    # Epochs, not Tune iterations: a trial resumed from its Train checkpoint keeps its epoch count.
    # A trial that survives every rung ends by itself: Tune stopping it would kill its Train
    # controller mid-shutdown, leaving the worker group's placement group to Ray Train's cleaner.
    return ASHAScheduler(time_attr="epoch", max_t=config.train.epochs,
                         grace_period=config.tune.asha_grace_epochs, stop_last_trials=False)


def tune_config(config: ExperimentConfig):
    """Tune's settings: trials ranked (and ASHA's rungs cut) on validation per-patient Dice, higher better."""
    from ray import tune

    return tune.TuneConfig(metric=VAL_METRIC, mode="max", scheduler=scheduler(config),
                           max_concurrent_trials=config.tune.max_concurrent_trials,
                           trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname)


def _tuner(config: ExperimentConfig, study_dir: Path, callbacks: list, restore: bool):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(config), manifest_path=config.data.manifest,
                             study_dir=str(study_dir)),
        {"CPU": config.tune.trial_cpus},
    )
    if restore:
        # Tune's own experiment state: finished trials stay finished, the rest continue.
        return tune.Tuner.restore(str(study_dir / TUNE_DIR), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=search_space(config),
        tune_config=tune_config(config),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(study_dir), callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


# ---------------------------------------------------------------------------------------------------
# one trial (runs in a Tune actor)


def run_trial(params: dict, *, base: dict, manifest_path: str, study_dir: str) -> None:
    """Tune function: fit one TorchTrainer named after the trial id, its reports forwarded to Tune.

    A trial whose Train run already trained every epoch (the study driver died before Tune recorded
    it as finished) is not trained again: its last epoch is reported from the saved history.
    """
    from ray import tune
    from ray.data import DataContext
    from ray.tune.integration.ray_train import TuneReportCallback

    from raysegm.train import build_trainer

    config = trial_config(from_dict(base), params)
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(study_dir) / TRIALS_DIR / f"trial-{trial_id}"
    outcome = trial_outcome(run_dir)
    finished = outcome is not None and outcome["epochs_completed"] >= config.train.epochs
    _log_launch(Path(study_dir), trial_id, params, "reuse" if finished else "train")
    if finished:
        tune.report(outcome["history"][outcome["epochs_completed"]])
        return
    # The trial's datasets are built here, in its actor: its log is a file, where progress bars are noise
    # (the driver's setting does not reach the actors of a cluster started elsewhere)
    DataContext.get_current().enable_progress_bars = False
    trainer = build_trainer(config, manifest_path=manifest_path, run_name=run_dir.name,
                            storage_path=str(run_dir.parent), callbacks=[TuneReportCallback()], resume_ok=True)
    trainer.fit()


def _log_launch(study_dir: Path, trial_id: str, params: dict, action: str) -> None:
    line = json.dumps({"trial_id": trial_id, "action": action, "params": params, "pid": os.getpid(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    # One short line in append mode: concurrent trials never interleave within a line.
    with open(study_dir / LAUNCHES, "a") as launches:
        launches.write(line + "\n")


def read_launches(study_dir: str | Path) -> pd.DataFrame:
    """launches.jsonl as a table: trial_id, action ("train" or "reuse"), params, pid, time."""
    path = Path(study_dir) / LAUNCHES
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return pd.DataFrame(rows, columns=["trial_id", "action", "params", "pid", "time"])


def trial_outcome(run_dir: Path) -> dict | None:
    """A Train run's checkpoints and history, or None before its first checkpoint.

    Returns {history: {epoch: row}, epochs_completed, best_epoch, best_checkpoint, latest_checkpoint}:
    the history is the latest checkpoint's (keyed by epoch, a redone epoch replaced), and the best
    checkpoint is the kept one with the highest validation per-patient Dice (the earlier on a tie).
    Checkpoint folders with a file missing or cut short (an interrupted upload), or whose own epoch is
    not the one in that history (left by a failed attempt whose epoch was redone), are passed over, named.
    """
    from raysegm.checkpoint import UnreadableTrainingState, load_training_state, training_checkpoint_problem

    kept = {}
    for folder in sorted(Path(run_dir).glob("checkpoint_*")):
        problem = training_checkpoint_problem(folder)
        try:
            state = None if problem else load_training_state(folder)  # read once; a pickled one is refused
        except UnreadableTrainingState as error:
            problem = str(error)
        if problem:
            print(f"{folder}: passed over: {problem}", flush=True)
            continue
        kept[int(state["epoch"])] = (folder, state)
    if not kept:
        return None
    latest_epoch = max(kept)
    history = {int(epoch): dict(row) for epoch, row in kept[latest_epoch][1]["history"].items()}
    for epoch, (folder, state) in sorted(kept.items()):
        own = {int(e): dict(row) for e, row in state["history"].items()}.get(epoch)
        if own != history.get(epoch):  # left by an attempt that failed and was redone from an earlier epoch
            print(f"{folder}: passed over: its epoch {epoch} is not the one the run's history kept "
                  f"(the epoch was redone)", flush=True)
            del kept[epoch]
    best_epoch = max(sorted(kept), key=lambda epoch: history[epoch][VAL_METRIC])
    return {"history": history, "epochs_completed": latest_epoch, "best_epoch": best_epoch,
            "best_checkpoint": str(kept[best_epoch][0]), "latest_checkpoint": str(kept[latest_epoch][0])}


def read_per_patient(path: Path) -> pd.DataFrame:
    """A per_patient.csv with its volume_ids as written: "001" stays "001", not the number 1."""
    return pd.read_csv(path, dtype={"volume_id": str})


def _trial_id_of(result) -> str:
    """The Tune trial id of a result: from its metrics, else from its folder `trial-<id>`, where a restored
    study may have added a suffix (`trial-<id>_<4 hex>`) because the trial's first folder already existed."""
    if result.metrics and result.metrics.get("trial_id"):
        return str(result.metrics["trial_id"])
    name = Path(result.path).name.removeprefix("trial-")
    match = re.fullmatch(r"([0-9a-f]+_\d{5})(_[0-9a-f]{4})?", name)
    return match.group(1) if match else name


def _trial_records(result_grid) -> list[dict]:
    records = []
    for result in result_grid:
        error = result.error
        records.append({"trial_id": _trial_id_of(result), "params": result.config,
                        "error": f"{type(error).__name__}: {error}"[:2000] if error is not None else None})
    return sorted(records, key=lambda record: record["trial_id"])


# ---------------------------------------------------------------------------------------------------
# after the search: evaluation and tables


def write_results(study_dir: str | Path) -> pd.DataFrame:
    """Score each trial's best checkpoint on the test split and write every table; returns the results.

    Each is scored with the study's infer.tta and infer.postprocess, as `raysegm cv` scores its folds.
    Reads config.json and trials.json; can be run again on a finished study.
    """
    from raysegm.checkpoint import load_model
    from raysegm.evaluate import evaluate_checkpoint
    from raysegm.models import count_parameters, model_name

    study_dir = Path(study_dir)
    config = from_dict(json.loads((study_dir / "config.json").read_text()))
    trials = json.loads((study_dir / "trials.json").read_text())
    extra_keys = list(config.tune.extra_axes)
    rows, curves, per_patient = [], [], []
    for trial in trials:
        trial_id = trial["trial_id"]
        cfg = trial_config(config, trial["params"])
        flat = _flat(trial["params"])
        row = {"trial_id": trial_id, "status": "error" if trial["error"] else "completed",
               "variant": cfg.model.variant, "model": model_name(cfg.model), "encoder": _encoder_label(cfg),
               "batch_size": cfg.train.batch_size, "loss": cfg.train.loss,
               **{key: flat[key] for key in extra_keys}}
        outcome = trial_outcome(study_dir / TRIALS_DIR / f"trial-{trial_id}")
        if outcome is None:
            rows.append({**row, "status": "error", "error": trial["error"] or "no checkpoint was saved"})
            continue
        if row["status"] == "completed" and outcome["epochs_completed"] < cfg.train.epochs:
            row["status"] = "stopped early"
        history = [outcome["history"][epoch] for epoch in sorted(outcome["history"])]
        curves += [{"trial_id": trial_id, "model": row["model"], "batch_size": row["batch_size"],
                    "loss": row["loss"], **epoch_row} for epoch_row in history]
        out = study_dir / EVALUATION_DIR / f"trial-{trial_id}"
        summary = evaluate_checkpoint(outcome["best_checkpoint"], manifest=config.data.manifest, split="test",
                                      out=out, tta=config.infer.tta, postprocess=config.infer.postprocess)
        patients = read_per_patient(out / "per_patient.csv")
        per_patient.append(patients.assign(trial_id=trial_id, variant=row["variant"], model=row["model"]))
        total, trainable = count_parameters(load_model(outcome["best_checkpoint"])[0])
        best = outcome["history"][outcome["best_epoch"]]
        dice, pp = summary["per_patient"]["dice"], summary["per_patient"]
        rows.append({
            **row,
            "epochs_completed": outcome["epochs_completed"],
            "best_epoch": outcome["best_epoch"],
            "val_dice": best[VAL_METRIC],
            "dice_mean": dice["mean"], "dice_ci_low": dice["ci_low"], "dice_ci_high": dice["ci_high"],
            "dice_median": dice["median"],
            "iou_mean": pp["iou"]["mean"],
            "pooled_dice": summary["pooled"]["dice"],
            "per_slice_mean_dice": summary["per_slice_mean_dice"],
            "pixel_accuracy": summary["pooled"]["accuracy"],
            "precision": pp["precision"]["mean"],
            "recall": pp["recall"]["mean"],
            "specificity": pp["specificity"]["mean"],
            "hd95": pp["hd95"]["mean"],
            "train_time_s": float(sum(epoch_row["epoch_time_s"] for epoch_row in history)),
            "params_total": total, "params_trainable": trainable,
            "test_patients": summary["n_patients"], "tumor_free_patients": summary["tumor_free_patients"],
            "checkpoint": outcome["best_checkpoint"],
            "error": trial["error"],
        })
    results = pd.DataFrame(rows)
    per_patient_table = pd.concat(per_patient, ignore_index=True) if per_patient else pd.DataFrame()
    note = scoring_note(config.infer.tta, config.infer.postprocess)
    _write_table(study_dir, "results", results, results_markdown(results, extra_keys, note))
    _write_json(study_dir / "results.json", json.loads(results.to_json(orient="records")))
    pd.DataFrame(curves).to_csv(study_dir / "curves.csv", index=False)
    per_patient_table.to_csv(study_dir / "per_patient.csv", index=False)
    summary_table = variant_summary(results)
    _write_table(study_dir, "summary", summary_table, summary_markdown(summary_table, results, note))
    paired = paired_differences(results, per_patient_table, extra_keys)
    _write_table(study_dir, "paired", paired, paired_markdown(paired))
    (study_dir / "paper.md").write_text(paper_comparison(summary_table))
    return results


def _encoder_label(config: ExperimentConfig) -> str:
    from raysegm.models import components

    if "ResNet encoder" not in components(config.model.variant):
        return f"conv, width {config.model.unet_width}"
    return config.model.encoder


def _write_json(path: Path, value) -> None:
    text = json.dumps(value, indent=2, default=str) + "\n"
    replace_atomically(path, lambda temporary: temporary.write_text(text))  # never seen half-written


def _write_table(study_dir: Path, name: str, table: pd.DataFrame, markdown: str) -> None:
    table.to_csv(study_dir / f"{name}.csv", index=False)
    (study_dir / f"{name}.md").write_text(markdown)


def _has_metrics(results: pd.DataFrame) -> pd.DataFrame:
    if "dice_mean" not in results:
        return results.iloc[0:0]
    return results[results["dice_mean"].notna()]


def variant_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per variant: the trial with the best validation per-patient Dice (chosen without the test set),
    its test numbers, and the mean, min and max of the per-patient test Dice over the variant's scored
    trials; `trials` counts those, `trials_failed` the variant's trials that ended without a score."""
    rows = []
    scored = _has_metrics(results)
    for variant, trials in scored.groupby("variant", sort=False):
        chosen = trials.loc[trials["val_dice"].idxmax()]
        rows.append({
            "variant": variant, "model": chosen["model"], "trials": len(trials),
            "trials_failed": int((results["variant"] == variant).sum()) - len(trials),
            "chosen_trial": chosen["trial_id"], "chosen_batch_size": chosen["batch_size"],
            "chosen_loss": chosen["loss"], "val_dice": chosen["val_dice"],
            "dice_mean": chosen["dice_mean"], "dice_ci_low": chosen["dice_ci_low"],
            "dice_ci_high": chosen["dice_ci_high"], "iou_mean": chosen["iou_mean"],
            "pooled_dice": chosen["pooled_dice"], "pixel_accuracy": chosen["pixel_accuracy"],
            "hd95": chosen["hd95"], "params_total": chosen["params_total"],
            "mean_dice_over_trials": trials["dice_mean"].mean(),
            "min_dice_over_trials": trials["dice_mean"].min(), "max_dice_over_trials": trials["dice_mean"].max(),
        })
    return pd.DataFrame(rows)


def paired_differences(results: pd.DataFrame, per_patient: pd.DataFrame, extra_keys=()) -> pd.DataFrame:
    """Per-patient test Dice of each trial minus that of the trial lacking some of its components.

    Pairs share batch size, loss and every extra axis, and differ in variant, where the reference's
    components (raysegm.models.components: ResNet encoder, attention) are a strict subset of the trial's: e.g.
    unet_attention - unet isolates attention, unet_resnet50_attention - unet_resnet50 isolates attention
    on the ResNet U-Net. Mean difference over the same test patients with a paired bootstrap 95% CI
    (raysegm.metrics.paired_bootstrap_diff).
    """
    from raysegm.metrics import paired_bootstrap_diff
    from raysegm.models import components

    columns = ["effect", "trial_id", "variant", "reference_trial", "reference_variant", "batch_size", "loss",
               *extra_keys, "patients", "dice_diff_mean", "dice_diff_ci_low", "dice_diff_ci_high", "verdict"]
    scored = _has_metrics(results)
    shared = ["batch_size", "loss", *extra_keys]
    rows = []
    for _, trial in scored.iterrows():
        mine = components(trial["variant"])
        for _, reference in scored.iterrows():
            theirs = components(reference["variant"])
            if not theirs < mine or any(trial[k] != reference[k] for k in shared):
                continue
            a = _patient_dice(per_patient, trial["trial_id"])
            b = _patient_dice(per_patient, reference["trial_id"])
            if set(a) != set(b):
                raise ValueError(f"trials {trial['trial_id']} and {reference['trial_id']} were tested on "
                                 f"different patients")
            diff = paired_bootstrap_diff(a, b)
            rows.append({
                "effect": " + ".join(sorted(mine - theirs)), "trial_id": trial["trial_id"],
                "variant": trial["variant"], "reference_trial": reference["trial_id"],
                "reference_variant": reference["variant"], **{k: trial[k] for k in shared}, "patients": len(a),
                "dice_diff_mean": diff["mean"], "dice_diff_ci_low": diff["ci_low"],
                "dice_diff_ci_high": diff["ci_high"], "verdict": _verdict(diff, len(a)),
            })
    return pd.DataFrame(rows, columns=columns)


def _patient_dice(per_patient: pd.DataFrame, trial_id: str) -> dict[str, float]:
    rows = per_patient[per_patient["trial_id"] == trial_id]
    return dict(zip(rows["volume_id"].astype(str), rows["dice"].astype(float)))


def _verdict(diff: dict, patients: int) -> str:
    if patients < MIN_PATIENTS_FOR_VERDICT:
        return f"too few patients (< {MIN_PATIENTS_FOR_VERDICT})"
    if diff["ci_low"] > 0:
        return "better"
    if diff["ci_high"] < 0:
        return "worse"
    return "no clear difference"


# ---------------------------------------------------------------------------------------------------
# Markdown


def _cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if abs(value) < 1e4 else f"{float(value):.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; floats with 3 decimals, missing values as an em dash."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _with_ci(mean, low, high) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _get(row, key):
    value = row.get(key) if hasattr(row, "get") else None
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


METRIC_NOTE = (
    "Per-patient Dice: each test patient's slices stacked as one volume; mean over patients with a 95% "
    "percentile bootstrap interval (2000 resamples), and the median. IoU, precision, recall, "
    "specificity and HD95 (pixels) are per-patient means; pooled Dice and pixel accuracy sum every pixel "
    "of the test split. Each trial is scored with its checkpoint of best validation per-patient Dice. Tumor-free patients "
    "score 1 or 0 and are counted beside the means.\n"
)


def scoring_note(tta: bool, postprocess: str) -> str:
    """METRIC_NOTE with the inference settings the trials' test masks were made with."""
    return (METRIC_NOTE + f"Test masks made with TTA {'on' if tta else 'off'} and post-processing {postprocess} "
            "(the study's infer.tta and infer.postprocess).\n")


def results_markdown(results: pd.DataFrame, extra_keys=(), note: str = METRIC_NOTE) -> str:
    """results.md: one row per trial."""
    header = ["trial", "status", "model", "encoder", "batch", "loss", *extra_keys,
              "per-patient Dice [95% CI]", "median", "IoU", "pooled Dice", "pixel acc.", "precision",
              "recall", "specificity", "HD95", "best epoch", "epochs", "train time (s)", "params (total/trainable)",
              "test patients (tumor-free)"]
    rows = []
    for _, row in results.iterrows():
        params = (f"{int(row['params_total']):,} / {int(row['params_trainable']):,}"
                  if _get(row, "params_total") is not None else None)
        patients = (f"{int(row['test_patients'])} ({int(row['tumor_free_patients'])})"
                    if _get(row, "test_patients") is not None else None)
        rows.append([row["trial_id"], row["status"], row["model"], row["encoder"], row["batch_size"], row["loss"],
                     *[row[k] for k in extra_keys],
                     _with_ci(_get(row, "dice_mean"), _get(row, "dice_ci_low"), _get(row, "dice_ci_high")),
                     *[_get(row, k) for k in ("dice_median", "iou_mean", "pooled_dice", "pixel_accuracy",
                                              "precision", "recall", "specificity", "hd95", "best_epoch",
                                              "epochs_completed")],
                     None if _get(row, "train_time_s") is None else f"{row['train_time_s']:.1f}",
                     params, patients])
    return "# Ablation results (test split)\n\n" + markdown_table(header, rows) + "\n" + note


def summary_markdown(summary: pd.DataFrame, results: pd.DataFrame, note: str = METRIC_NOTE) -> str:
    """summary.md: per variant, the trial chosen by validation and the spread over trials; a variant
    whose every trial failed is named below the table."""
    header = ["variant", "model", "trials scored (failed)", "chosen trial (batch, loss)",
              "val per-patient Dice", "test per-patient Dice [95% CI]", "per-patient IoU", "pooled Dice",
              "per-patient HD95", "params", "per-patient Dice, mean over trials", "min", "max"]
    rows = [[row["variant"], row["model"], f"{row['trials']} ({row['trials_failed']})",
             f"{row['chosen_trial']} ({row['chosen_batch_size']}, {row['chosen_loss']})", row["val_dice"],
             _with_ci(row["dice_mean"], row["dice_ci_low"], row["dice_ci_high"]), row["iou_mean"],
             row["pooled_dice"], row["hd95"], f"{int(row['params_total']):,}", row["mean_dice_over_trials"],
             row["min_dice_over_trials"], row["max_dice_over_trials"]] for _, row in summary.iterrows()]
    unscored = [v for v in dict.fromkeys(results.get("variant", [])) if v not in set(summary.get("variant", []))]
    failed = ("\nNo trial of " + ", ".join(f"{v} ({int((results['variant'] == v).sum())} failed)" for v in unscored)
              + " was scored; results.md gives each error.\n" if unscored else "")
    return ("# Per-variant summary\n\nEach variant's trial is chosen by validation per-patient Dice; the test "
            "numbers are reported for it, never used to choose it.\n\n" + markdown_table(header, rows)
            + failed + "\n" + note)


def paired_markdown(paired: pd.DataFrame) -> str:
    """paired.md: does the ResNet encoder help, does attention help (per-patient Dice differences)."""
    head = ("# Paired differences on the same test patients\n\nPer-patient Dice of a trial minus that of "
            "the trial with the same batch size and loss that lacks the named component; mean with a "
            "paired bootstrap 95% CI. \"better\"/\"worse\" only when the interval excludes 0, and only "
            f"with at least {MIN_PATIENTS_FOR_VERDICT} test patients.\n\n")
    if paired.empty:
        return head + ("No pairs: no two variants of the study differ only by the ResNet encoder or "
                       "attention (with the same batch size and loss).\n")
    header = ["effect", "trial", "reference", "batch", "loss", "patients", "Dice difference [95% CI]", "verdict"]
    rows = [[row["effect"], f"{row['trial_id']} ({row['variant']})",
             f"{row['reference_trial']} ({row['reference_variant']})", row["batch_size"], row["loss"],
             row["patients"], _with_ci(row["dice_diff_mean"], row["dice_diff_ci_low"], row["dice_diff_ci_high"]),
             row["verdict"]] for _, row in paired.iterrows()]
    return head + markdown_table(header, rows)


def paper_comparison(summary: pd.DataFrame) -> str:
    """paper.md: the paper's Table 5 as printed beside our numbers, and why they cannot be compared."""
    paper = markdown_table(["model (paper)", "accuracy", "Dice", "IoU", "loss"],
                           [list(row) for row in PAPER_TABLE5])
    ours_by_variant = {row["variant"]: row for _, row in summary.iterrows()}
    rows = []
    for name, accuracy, dice, iou, loss in PAPER_TABLE5[1:]:
        ours = ours_by_variant.get(PAPER_VARIANTS[name])
        rows.append([name, accuracy, dice, iou, loss,
                     None if ours is None else ours["model"],
                     None if ours is None else ours["pixel_accuracy"],
                     None if ours is None else _with_ci(ours["dice_mean"], ours["dice_ci_low"], ours["dice_ci_high"]),
                     None if ours is None else ours["iou_mean"],
                     None if ours is None else ours["pooled_dice"]])
    beside = markdown_table(["paper model", "paper accuracy", "paper Dice", "paper IoU", "paper loss",
                             "our model", "our pixel accuracy", "our per-patient Dice [95% CI]",
                             "our per-patient IoU", "our pooled Dice"], rows)
    return (
        "# The paper's Table 5 beside ours\n\n"
        "## Table 5 as printed\n\n" + paper + "\n## Beside our study (our trial per variant chosen by "
        "validation)\n\n" + beside + "\n"
        "## Why these numbers cannot be compared\n\n"
        "- An accuracy of 0.99 with a Dice of 0.07 (U-Net Model) is what a model that predicts background "
        "everywhere scores: tumor is about 1% of the pixels, so pixel accuracy says nothing here.\n"
        "- A Dice of 1 with a loss of 1 (U-Net with ResNet50) cannot both be true of one model on one "
        "split; one of the two is a bug in the evaluation.\n"
        "- IoU never exceeds Dice on the same predictions (IoU = Dice / (2 - Dice) <= Dice for every mask "
        "pair, hence for any average of pairs), yet the table prints IoU 0.496 beside Dice 0.067, and the "
        "same IoU of about 0.496 for every model: the columns were not computed on the same predictions.\n"
        "- The paper states neither how the data were split (by slice or by patient) nor how Dice was "
        "averaged (per slice, per batch, over all pixels), and gives no intervals.\n"
        "- Ours: per-patient Dice over held-out patients (a patient-level split, so no patient's slices "
        "are in both training and test), with 95% bootstrap intervals, pooled Dice and pixel accuracy "
        "beside it. Our data, image size, encoder and epochs are in config.json; they differ from the "
        "paper's, so even honest numbers would not be a reproduction.\n"
    )
