"""Distributed data-parallel training with Ray Train: one run is one `TorchTrainer` fit.

The driver (`train`) resolves the run folder and the manifest once, then `build_trainer` wires Ray:
the training split is streamed, augmented and split across the workers; the validation split reaches
every worker whole and rank 0 scores every slice of every validation patient. Each epoch rank 0
reports the metrics together with a checkpoint in the contract's format (raysegm.checkpoint), whose
training state (epoch, optimizer, schedule, RNG, history) lets a run continue after a lost worker or
an explicit `resume=True`. Per-patient Dice (`VAL_METRIC`) selects the best checkpoint.

The run folder `storage_path/name` is a filesystem path every node can reach (local disk, or a shared
mount on a cluster); besides Ray's checkpoints it holds config.json, data/ (the manifest),
history.csv, history.json and result.json.

With train.ensemble = n > 1 a run is a seed ensemble: n such runs, one after another, in
`storage_path/name/seed-<s>/` (s = train.seed, train.seed + 1, ...), then each member's best and latest
checkpoints combined into one checkpoint each (raysegm.checkpoint.save_ensemble) in `ensemble-best/` and
`ensemble-latest/`, beside config.json and result.json. A resume keeps finished members and continues
an unfinished one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raysegm.config import (
    RUN_ONLY,
    ExperimentConfig,
    changed_settings,
    from_dict,
    replace,
    save_json,
    to_dict,
)
from raysegm.storage import replace_atomically

VAL_METRIC = "val_per_patient_dice"  # mean over validation patients of the per-patient Dice
HISTORY_COLUMNS = ("epoch", "train_loss", "val_per_patient_dice", "val_pooled_dice",
                   "val_per_slice_mean_dice", "lr", "epoch_time_s", "train_images_per_s", "compute_dtype")
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("none", "cosine")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Worker lines go through logging: Ray Train tees a worker's print() to both stdout and its log (twice).
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# driver


def train(config: ExperimentConfig, resume: bool = False) -> dict:
    """Train one run to `train.epochs` and return where its results are.

    Returns {run_dir, best_checkpoint, latest_checkpoint, best (the best epoch's metrics), history,
    epochs_completed, resumed_after}. A run name that already holds a run is a FileExistsError unless
    `resume` is true, which continues it from its latest checkpoint (also with more epochs); a resume
    may change train.epochs and how the run runs (scale, RUN_ONLY), not what it trains.
    """
    check_settings(config)
    config = absolute_paths(config)
    storage_path = Path(config.run.storage_path).expanduser().resolve()
    run_dir = storage_path / config.run.name
    if resume and not holds_run(run_dir):
        raise FileNotFoundError(f"nothing to resume: {run_dir} holds no run")
    if resume and (run_dir / "config.json").is_file():
        _check_resumable(json.loads((run_dir / "config.json").read_text()), config, run_dir / "config.json")
    if not resume and holds_run(run_dir):
        raise FileExistsError(f"{run_dir} already holds a run: continue it with --resume "
                              f"(resume=True) or choose another run.name")
    ensure_ray(config.scale)
    check_worker_resources(config.scale)  # before any folder is made
    if config.train.ensemble > 1:
        return _train_ensemble(config, run_dir)
    from raysegm.data.discover import manifest_for

    work_dir = run_dir / "data"
    manifest_for(config.data, work_dir)
    manifest_path = config.data.manifest or str(work_dir / "manifest.parquet")
    trainer = build_trainer(config, manifest_path=manifest_path, run_name=config.run.name,
                            storage_path=str(storage_path), resume_ok=resume)
    result = trainer.fit()
    summary = _write_result(result, run_dir)
    print(f"run {config.run.name}: best {VAL_METRIC} {summary['best'].get(VAL_METRIC, float('nan')):.4f} "
          f"at epoch {summary['best'].get('epoch')}; best checkpoint {summary['best_checkpoint']}", flush=True)
    return summary


def check_settings(config: ExperimentConfig) -> None:
    """Refuse settings the loop cannot honour before any Ray resource is taken."""
    from raysegm.data.preprocess import NORMALIZATIONS
    from raysegm.losses import LOSSES
    from raysegm.models import REGISTRY

    t, s, d, m = config.train, config.scale, config.data, config.model
    for key, value, choices in (("model.variant", m.variant, REGISTRY), ("train.loss", t.loss, LOSSES),
                                ("data.normalize", d.normalize, NORMALIZATIONS)):
        if value not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
    for key, value in (("train.batch_size", t.batch_size), ("data.in_channels", d.in_channels),
                       ("data.size", d.size)):
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    if "resnet" not in m.variant and d.size % 2**m.unet_depth:  # smp's decoder matches any size to the skips
        raise ValueError(f"data.size {d.size} must be divisible by {2**m.unet_depth} for {m.variant} "
                         f"(model.unet_depth {m.unet_depth} poolings)")
    if d.normalize == "imagenet" and d.in_channels != 3:
        raise ValueError(f"data.normalize imagenet needs 3 sequences a slice (ImageNet's R, G, B), "
                         f"got data.in_channels {d.in_channels}")
    low, high = d.clip_percentiles
    if not 0 <= low < high <= 100:
        raise ValueError(f"data.clip_percentiles must be 0 <= low < high <= 100, got {list(d.clip_percentiles)}")
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {sorted(OPTIMIZERS)}, got {t.optimizer!r}")
    if t.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {t.schedule!r}")
    if t.precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {list(PRECISIONS)}, got {t.precision!r}")
    if t.precision == "fp16" and not s.use_gpu:
        raise ValueError("train.precision fp16 needs CUDA workers (scale.use_gpu: true); use bf16 or fp32 on CPU")
    if t.ensemble < 1:
        raise ValueError(f"train.ensemble is the number of models trained (seeds seed, seed + 1, ...), "
                         f"at least 1, got {t.ensemble}")
    for key, value in (("scale.num_workers", s.num_workers), ("train.epochs", t.epochs)):
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    if "://" in config.run.storage_path:
        raise ValueError(f"run.storage_path must be a filesystem path every node can reach (a shared mount), "
                         f"got the URI {config.run.storage_path!r}")
    if t.warmup_epochs < 0 or (t.schedule != "none" and t.warmup_epochs >= t.epochs):
        raise ValueError(f"train.warmup_epochs must be >= 0 and, with a schedule, below train.epochs "
                         f"{t.epochs}; got {t.warmup_epochs}")
    if t.batch_size % s.num_workers:
        raise ValueError(f"train.batch_size {t.batch_size} is the global batch and must split evenly "
                         f"across scale.num_workers {s.num_workers}")
    if config.data.context_slices < 0:
        raise ValueError(f"data.context_slices must be >= 0, got {config.data.context_slices}")
    if not config.data.read_cache_mb >= 0:  # NaN too
        raise ValueError(f"data.read_cache_mb must be >= 0 (0: off), got {config.data.read_cache_mb}")
    for key in ("intensity_augment", "sequence_dropout"):
        if not 0 <= getattr(config.data, key) <= 1:
            raise ValueError(f"data.{key} is a probability in [0, 1], got {getattr(config.data, key)}")
    if config.data.sequence_dropout and config.data.in_channels != 3:
        raise ValueError("data.sequence_dropout needs the three sequences pre-contrast, FLAIR, post-contrast "
                         f"(data.in_channels 3), got {config.data.in_channels}")
    _check_numbers(config)
    _check_model(config)


def _check_numbers(config: ExperimentConfig) -> None:
    """Ranges of the numeric settings that Ray, Ray Data or torch would only refuse inside a worker."""
    t, s, d, r = config.train, config.scale, config.data, config.run
    rules = [
        ("train.lr", t.lr, t.lr > 0, "above 0"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "at least 0"),
        ("scale.torch_threads", s.torch_threads, s.torch_threads >= 1, "at least 1"),
        ("scale.cpus_per_worker", s.cpus_per_worker, s.cpus_per_worker > 0, "above 0"),
        ("scale.gpus_per_worker", s.gpus_per_worker, s.gpus_per_worker > 0 or not s.use_gpu,
         "above 0 with scale.use_gpu"),
        ("data.read_cpus", d.read_cpus, d.read_cpus > 0, "above 0"),
        ("data.read_tasks", d.read_tasks, d.read_tasks >= 0, "at least 0 (0: no cap)"),
        ("data.tumor_oversample", d.tumor_oversample, d.tumor_oversample >= 1, "at least 1"),
        ("data.val_fraction", d.val_fraction, 0 <= d.val_fraction < 1, "in [0, 1)"),
        ("data.test_fraction", d.test_fraction, 0 <= d.test_fraction < 1 - d.val_fraction,
         "in [0, 1 - data.val_fraction)"),
        ("data.folds", d.folds, d.folds == 0 or d.folds >= 2, "0 (a plain split) or at least 2"),
        ("data.fold", d.fold, 0 <= d.fold < max(d.folds, 1), "in 0..data.folds - 1"),
        ("run.num_to_keep", r.num_to_keep, r.num_to_keep >= 1, "at least 1"),
        ("run.max_failures", r.max_failures, r.max_failures >= -1, "at least 0, or -1 for no limit"),
    ]
    for key, value, ok, expected in rules:
        if not ok:
            raise ValueError(f"{key} must be {expected}, got {value}")
    for name, amount in s.worker_resources.items():
        if name in ("CPU", "GPU") or isinstance(amount, bool) or not isinstance(amount, (int, float)) \
                or not amount > 0:
            raise ValueError(f"scale.worker_resources maps custom resource names to amounts above 0 (CPUs "
                             f"and GPUs are scale.cpus_per_worker and use_gpu), got {name}: {amount!r}")
    if not r.name or r.name in (".", "..") or "/" in r.name or "\\" in r.name:
        raise ValueError(f"run.name must be one folder name under run.storage_path, got {r.name!r}")


def _check_model(config: ExperimentConfig) -> None:
    """Build the model once on the driver (without downloading weights): a model setting that cannot
    work is refused here, naming it, instead of failing in every Train worker."""
    weights = config.model.encoder_weights
    if weights not in ("", "none", "imagenet") and not Path(weights).expanduser().is_file():
        raise ValueError(f"model.encoder_weights: file not found: {weights}")
    if "resnet" in config.model.variant and config.model.freeze_stages > 0 and weights in ("", "none"):
        raise ValueError(f"model.freeze_stages {config.model.freeze_stages} would keep randomly initialised "
                         f"encoder stages fixed (model.encoder_weights none): set encoder_weights to imagenet "
                         f"or a weights file, or freeze_stages 0")
    problem = _model_problem(dataclasses.replace(config.model, encoder_weights="none"), config.data.model_channels)
    if problem:
        raise ValueError(f"model settings {config.model.variant}: {problem}")


@functools.lru_cache(maxsize=32)
def _model_problem(model, in_channels: int) -> str:
    """The empty string when create_model builds `model`, else the reason (cached: a study checks each
    trial)."""
    from raysegm.models import create_model

    try:
        create_model(model, in_channels=in_channels)
    except Exception as error:  # the reason is the message; the model code raises what it raises
        return f"{type(error).__name__}: {error}"
    return ""


def _train_ensemble(config: ExperimentConfig, run_dir: Path) -> dict:
    """Train the members of a seed ensemble (or finish them, on resume), then write its two checkpoints."""
    from raysegm.checkpoint import save_ensemble
    from raysegm.evaluate import score_checkpoint

    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(config, run_dir / "config.json")
    members = []
    for seed in range(config.train.seed, config.train.seed + config.train.ensemble):
        member = replace(config, train={"seed": seed, "ensemble": 1},
                         run={"name": f"seed-{seed}", "storage_path": str(run_dir)})
        state = run_state(run_dir / f"seed-{seed}", config.train.epochs)
        print(f"run {config.run.name}, member seed-{seed} of {config.train.ensemble}: {state}", flush=True)
        if state == "finished":
            members.append(json.loads((run_dir / f"seed-{seed}" / "result.json").read_text()))
        else:
            members.append(train(member, resume=state == "unfinished"))
    best = save_ensemble(run_dir / "ensemble-best", [m["best_checkpoint"] for m in members])
    latest = save_ensemble(run_dir / "ensemble-latest", [m["latest_checkpoint"] for m in members])
    # The ensemble's own validation figures, measured as each epoch's are (no TTA, no post-processing).
    manifest = config.data.manifest or Path(members[0]["run_dir"]) / "data" / "manifest.parquet"
    _, meter = score_checkpoint(best, manifest=manifest, split="val", tta=False, postprocess="none")
    scores = meter.summary()
    summary = {
        "run_dir": str(run_dir),
        "best_checkpoint": str(best),
        "latest_checkpoint": str(latest),
        "best": {VAL_METRIC: scores["per_patient"]["dice"]["mean"], "val_pooled_dice": scores["pooled"]["dice"],
                 "val_per_slice_mean_dice": scores["per_slice_mean_dice"]},
        "members": [m["run_dir"] for m in members],
        "epochs_completed": min(m["epochs_completed"] for m in members),
        "resumed_after": sorted({epoch for m in members for epoch in m["resumed_after"]}),
    }
    _write_atomic(run_dir / "result.json", json.dumps(summary, indent=2) + "\n")
    print(f"run {config.run.name}: an ensemble of {len(members)} seeds, {VAL_METRIC} of its members' best "
          f"checkpoints averaged {summary['best'][VAL_METRIC]:.4f}; best checkpoint {best}", flush=True)
    return summary


# The settings that name a local file, and the values of each that do not: made absolute on the driver.
PATH_SETTINGS = {("data", "manifest"): ("",), ("model", "encoder_weights"): ("", "none", "imagenet")}


def _absolute(value: str, not_paths: tuple[str, ...]) -> str:
    return value if value in not_paths else str(Path(value).expanduser().resolve())


def absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """data.manifest and a local model.encoder_weights file made absolute, as the driver sees them: Ray
    Train runs each worker in a folder of its own, where a relative path names nothing."""
    changes: dict[str, dict] = {}
    for (section, key), not_paths in PATH_SETTINGS.items():
        changes.setdefault(section, {})[key] = _absolute(getattr(getattr(config, section), key), not_paths)
    return replace(config, **changes)


def absolute_saved_paths(saved: dict) -> dict:
    """A saved config.json's PATH_SETTINGS made absolute the same way (a folder saved before they were),
    so that a resume compares like with like."""
    saved = {name: dict(values) if isinstance(values, dict) else values for name, values in saved.items()}
    for (section, key), not_paths in PATH_SETTINGS.items():
        if isinstance(saved.get(section), dict) and isinstance(saved[section].get(key), str):
            saved[section][key] = _absolute(saved[section][key], not_paths)
    return saved


def run_state(run_dir: Path, epochs: int) -> str:
    """"finished" (result.json says every epoch ran), "unfinished" (a run was started) or "new"."""
    result = run_dir / "result.json"
    if result.is_file() and json.loads(result.read_text()).get("epochs_completed", 0) >= epochs:
        return "finished"
    return "unfinished" if holds_run(run_dir) else "new"


def _check_resumable(saved: dict, config: ExperimentConfig, path: Path) -> None:
    # The run fills in data.manifest with its own (<run>/data/manifest.parquet, of a data_dir or the
    # synthetic set), also found in a run folder moved since: only another manifest counts as a change.
    from raysegm.data.discover import is_own_manifest

    saved = absolute_saved_paths(saved)
    saved_manifest = saved.get("data", {}).get("manifest", "")
    if not config.data.manifest or all(is_own_manifest(m, config.run.name)
                                       for m in (saved_manifest, config.data.manifest)):
        config = replace(config, data={"manifest": saved_manifest})
    allowed = {**RUN_ONLY, "train": ("epochs", "channels_last")}  # length, and a memory layout
    changed = changed_settings(saved, config, sections=("data", "model", "train"), allowed=allowed)
    if changed:
        raise ValueError(f"{path}: the run was started with other settings ({', '.join(changed)}); resume it "
                         f"with those (--set) or choose another run.name; train.epochs and scale may change")


def holds_run(run_dir: Path) -> bool:
    """True where a run (ours or Ray Train's bookkeeping) was already started in this folder."""
    return (run_dir / "config.json").is_file() or (run_dir / "checkpoint_manager_snapshot.json").is_file()


def by_address(scale) -> bool:
    """Whether Ray is reached by address (scale.ray_address or RAY_ADDRESS): a cluster that may grow,
    rather than a local Ray started or found without one."""
    return bool(scale.ray_address or os.environ.get("RAY_ADDRESS"))


def ensure_ray(scale) -> None:
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        if by_address(scale):
            ray.init(address=scale.ray_address or None)
        else:
            ray.init(num_cpus=scale.local_num_cpus)
    if not sys.stdout.isatty():
        # Progress bars and execution plans written to a log are noise per epoch; our epoch lines say enough.
        DataContext.get_current().enable_progress_bars = False
        DataContext.get_current().print_on_execution_start = False


def check_worker_resources(scale) -> None:
    """Refuse Train workers that the Ray reached without an address can never place: Ray Train V2 would
    wait for them forever (its controller retries a placement timeout without limit). A cluster reached
    by address (scale.ray_address, RAY_ADDRESS) may grow, so it is left to Ray."""
    import ray

    if by_address(scale):
        return
    per_worker = {"CPU": scale.cpus_per_worker, **scale.worker_resources}
    if scale.use_gpu:
        per_worker["GPU"] = scale.gpus_per_worker
    have = ray.cluster_resources()
    short = {key: value * scale.num_workers for key, value in per_worker.items()
             if have.get(key, 0.0) < value * scale.num_workers}
    if short:
        wanted = ", ".join(f"{value:g} {key}" for key, value in short.items())
        held = ", ".join(f"{have.get(key, 0.0):g} {key}" for key in short)
        raise ValueError(f"{scale.num_workers} Train workers need {wanted} in all, and this Ray has {held} "
                         f"(scale.use_gpu asks for GPUs; scale.worker_resources for custom resources): "
                         f"lower scale.num_workers or the per-worker request, or give scale.ray_address "
                         f"of a cluster that has them")


def build_trainer(config: ExperimentConfig, *, manifest_path: str, run_name: str, storage_path: str,
                  callbacks=(), resume_ok: bool = False):
    """A `TorchTrainer` for one run whose folder is `storage_path/run_name`.

    `callbacks` are Ray Train `UserCallback`s (e.g. Tune's `TuneReportCallback`). With `resume_ok`
    false, a folder that already holds a run is a FileExistsError; with it true, Ray continues from the
    run's latest registered checkpoint. The resolved config (manifest and run folder filled in) is saved
    as run_dir/config.json and travels to the workers as a plain dict.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysegm.data.discover import load_manifest
    from raysegm.data.pipeline import build_dataset

    check_settings(config)
    if config.train.ensemble != 1:
        raise ValueError(f"train.ensemble {config.train.ensemble}: one Ray Train run trains one model; "
                         "raysegm.train.train and raysegm cv train an ensemble's members one by one")
    run_dir = Path(storage_path) / run_name
    if holds_run(run_dir) and not resume_ok:
        raise FileExistsError(f"{run_dir} already holds a run; pass resume to continue it")
    config = replace(config, data={"manifest": str(manifest_path)},
                     run={"name": run_name, "storage_path": str(storage_path)})
    manifest = load_manifest(manifest_path)
    datasets = {
        "train": build_dataset(manifest, "train", config.data, augment=config.data.augment, seed=config.train.seed),
        # Validation is the same every epoch: read it once into the object store, not once per epoch.
        "val": build_dataset(manifest, "val", config.data, augment=False, seed=config.train.seed).materialize(),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(config, run_dir / "config.json")
    scale = config.scale
    resources = {"CPU": scale.cpus_per_worker, **scale.worker_resources}
    if scale.use_gpu:
        resources["GPU"] = scale.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "manifest_path": str(manifest_path), "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(num_workers=scale.num_workers, use_gpu=scale.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.num_to_keep,
                                                         checkpoint_score_attribute=VAL_METRIC,
                                                         checkpoint_score_order="max"),
            callbacks=list(callbacks),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not Ray Train's INFO chatter
        ),
        datasets=datasets,
        # Only the training split is sharded: an equal split of the validation set drops rows.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _write_result(result, run_dir: Path) -> dict:
    from raysegm.checkpoint import load_training_state

    kept = result.best_checkpoints or []
    best_checkpoint, best_metrics = max(kept, key=lambda pair: pair[1].get(VAL_METRIC, -math.inf),
                                        default=(None, {}))
    latest = result.checkpoint
    state = load_training_state(latest.path) if latest is not None else None
    summary = {
        "run_dir": str(run_dir),
        "best_checkpoint": best_checkpoint.path if best_checkpoint is not None else None,
        "latest_checkpoint": latest.path if latest is not None else None,
        "best": {key: best_metrics[key] for key in HISTORY_COLUMNS if key in best_metrics},
        "history": str(run_dir / "history.csv"),
        "epochs_completed": int(state["epoch"]) if state else 0,
        "resumed_after": list(state["resumed_after"]) if state else [],
    }
    _write_atomic(run_dir / "result.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _write_atomic(path: Path, text: str) -> None:
    replace_atomically(path, lambda temporary: temporary.write_text(text))  # never seen half-written


# ---------------------------------------------------------------------------------------------------
# worker


def lr_factor(epoch_index: int, schedule: str, warmup_epochs: int, epochs: int) -> float:
    """Multiplier of train.lr for the 0-based epoch.

    cosine: linear warm-up (e + 1) / (w + 1) for e < w, then 0.5 (1 + cos(pi (e - w) / (E - w))).
    """
    if schedule == "none":
        return 1.0
    if epoch_index < warmup_epochs:
        return (epoch_index + 1) / (warmup_epochs + 1)
    progress = (epoch_index - warmup_epochs) / max(1, epochs - warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker: epochs of data-parallel training; rank 0 validates, reports, checkpoints.

    loop_config: {"config": to_dict(ExperimentConfig), "manifest_path": str, "run_dir": str}.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from raysegm.checkpoint import load_model, load_training_state, save_checkpoint, unwrap
    from raysegm.data.discover import load_manifest
    from raysegm.losses import make_loss
    from raysegm.models import create_model

    config = from_dict(loop_config["config"])
    t = config.train
    torch.set_num_threads(config.scale.torch_threads)
    _quiet_report_lines()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)

    model = create_model(config.model, in_channels=config.data.model_channels)
    memory_format = memory_format_of(t.channels_last)
    state, restored_from = None, ray.train.get_checkpoint()
    if restored_from is not None:
        with restored_from.as_directory() as checkpoint_dir:
            restored_model, _ = load_model(checkpoint_dir, device="cpu")
            model.load_state_dict(restored_model.state_dict())
            state = load_training_state(checkpoint_dir)
    model = ray.train.torch.prepare_model(model.to(memory_format=memory_format))
    network = unwrap(model)
    optimizer = OPTIMIZERS[t.optimizer]([p for p in model.parameters() if p.requires_grad],
                                        lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, t.schedule, t.warmup_epochs, t.epochs))
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    loss_fn = make_loss(t.loss)

    start_epoch, history, resumed_after = 0, {}, []
    if state is not None:
        start_epoch, history, resumed_after = _restore(state, optimizer, scheduler, scaler, t)
        resumed_after = [*resumed_after, start_epoch]
        if rank == 0:
            log.info(f"resumed from the checkpoint of epoch {start_epoch}")

    val_counts = (load_manifest(loop_config["manifest_path"]).query("split == 'val' and labeled")
                  .groupby("volume_id").size().to_dict())
    per_worker_batch = t.batch_size // world_size
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch + 1, t.epochs + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of per-image loss, images) for the global mean
        compute_dtype = ""  # of the model's output in training: what autocast really ran (history only)
        for batch in train_shard.iter_batches(batch_size=per_worker_batch, batch_format="numpy"):
            # A copy (Ray's arrays are read-only), in the model's memory format.
            images = torch.tensor(batch["image"], device=device).contiguous(memory_format=memory_format)
            masks = torch.tensor(batch["mask"], device=device)
            with autocast(t.precision, device):
                logits = model(images)
                loss = loss_fn(logits, masks)
            compute_dtype = str(logits.dtype).removeprefix("torch.")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            loss_sum += torch.tensor([loss.item() * len(images), len(images)], dtype=torch.float64)
        scheduler.step()
        if dist.is_available() and dist.is_initialized():
            totals = loss_sum.to(device)  # NCCL reduces only CUDA tensors
            dist.all_reduce(totals)
            loss_sum = totals.cpu()
        train_time = time.perf_counter() - started
        train_loss = float(loss_sum[0] / max(loss_sum[1], 1))

        if rank != 0:
            ray.train.report({"epoch": epoch, "train_loss": train_loss})
            continue
        val = validate(network, val_shard, val_counts, batch_size=t.batch_size, device=device,
                       precision=t.precision, memory_format=memory_format)
        row = {"epoch": epoch, "train_loss": train_loss, **val, "lr": lr,
               "epoch_time_s": time.perf_counter() - started,
               "train_images_per_s": float(loss_sum[1]) / max(train_time, 1e-9)}
        history[epoch] = {**row, "compute_dtype": compute_dtype}  # a redone epoch replaces its row
        log.info(f"epoch {epoch}/{t.epochs}  loss {train_loss:.4f}  val per-patient Dice {row[VAL_METRIC]:.4f}  "
                 f"pooled {row['val_pooled_dice']:.4f}  per-slice mean {row['val_per_slice_mean_dice']:.4f}  "
                 f"{row['epoch_time_s']:.1f} s")
        _write_history(Path(loop_config["run_dir"]), history)
        training_state = _training_state(epoch, optimizer, scheduler, scaler, history, resumed_after)
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            save_checkpoint(checkpoint_dir, network, config, training_state=training_state)
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))
    if rank == 0 and start_epoch >= t.epochs:
        log.info(f"nothing to train: the run already completed {start_epoch} of {t.epochs} epochs "
                 f"(raise train.epochs to continue it)")


def _quiet_report_lines() -> None:
    # Ray 2.60 logs every report (metrics and checkpoint path, per worker) at INFO under a logger named
    # after its source file, which LoggingConfig(log_level) does not reach.
    suffix = os.path.join("ray", "train", "v2", "_internal", "execution", "context.py")
    for name in list(logging.Logger.manager.loggerDict):
        if name.endswith(suffix):
            logging.getLogger(name).setLevel(logging.WARNING)


def memory_format_of(channels_last: bool) -> torch.memory_format:
    """torch.channels_last (NHWC) when train.channels_last, else PyTorch's default NCHW layout."""
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(precision: str, device: torch.device):
    """The autocast context of train.precision (none for fp32) on `device`."""
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def validate(network: torch.nn.Module, val_shard, val_counts: dict[str, int], *, batch_size: int,
             device: torch.device, precision: str = "fp32",
             memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """Score every slice of every validation patient (metric contract) -> headline numbers.

    `val_counts` maps volume_id -> number of its slices in the manifest: a patient that arrives
    incomplete or not at all is an error, so the selection metric never rests on partial patients.
    """
    from raysegm.metrics import SegmentationMeter

    meter = SegmentationMeter()
    network.eval()
    with torch.no_grad():
        for batch in val_shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            images = torch.tensor(batch["image"], device=device).contiguous(memory_format=memory_format)
            with autocast(precision, device):
                probabilities = torch.sigmoid(network(images).float())
            meter.update([str(v) for v in batch["volume_id"]], batch["slice_index"].tolist(),
                         probabilities.cpu(), batch["mask"])
    seen = dict(Counter(meter.state()["volume_ids"]))
    if seen != val_counts:
        raise RuntimeError(f"validation saw {sum(seen.values())} slices of {len(seen)} patients, the manifest "
                           f"lists {sum(val_counts.values())} of {len(val_counts)}")
    summary = meter.summary(n_boot=200)
    return {"val_per_patient_dice": float(summary["per_patient"]["dice"]["mean"]),
            "val_pooled_dice": float(summary["pooled"]["dice"]),
            "val_per_slice_mean_dice": float(summary["per_slice_mean_dice"])}


def _training_state(epoch, optimizer, scheduler, scaler, history, resumed_after) -> dict:
    """Everything a worker needs to continue, in types torch.load(weights_only=True) accepts."""
    from raysegm.checkpoint import capture_rng_state

    return {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng_state(),
        "history": {int(e): dict(row) for e, row in history.items()},
        "resumed_after": list(resumed_after),
    }


def _restore(state: dict, optimizer, scheduler, scaler, t) -> tuple[int, dict, list]:
    """Load a training state; the next epoch's rate follows the current schedule of `t` (TrainSettings).

    The saved optimizer holds the rate its own schedule gave; a resume that lengthens the run
    (train.epochs) would otherwise train one epoch at it (0 at the end of a cosine run).
    """
    from raysegm.checkpoint import restore_rng_state

    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    factor = lr_factor(scheduler.last_epoch, t.schedule, t.warmup_epochs, t.epochs)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    return int(state["epoch"]), {int(e): row for e, row in state["history"].items()}, list(state["resumed_after"])


def _write_history(run_dir: Path, history: dict) -> None:
    rows = [history[epoch] for epoch in sorted(history)]
    _write_atomic(run_dir / "history.json", json.dumps(rows, indent=2) + "\n")
    _write_atomic(run_dir / "history.csv", pd.DataFrame(rows, columns=list(HISTORY_COLUMNS)).to_csv(index=False))
