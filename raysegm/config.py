"""Every default of raysegm, in one place, with one comment each.

An experiment is a frozen dataclass tree (`ExperimentConfig`). Presets are YAML files in `configs/`
(read with yaml's safe loader, a key given twice refused); the command line overrides single keys
with `--set train.epochs=3`.
At the Ray boundary the tree becomes a plain dict (`to_dict`) and is rebuilt with `from_dict`.
Our names end in `Settings` so they never shadow Ray's `ScalingConfig`, `DataConfig`, `TuneConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class DataSettings:
    data_dir: str = ""  # dataset root in any supported layout (kaggle_3m, image folder, NIfTI)
    manifest: str = ""  # prepared manifest (Parquet); built from data_dir when empty
    synthetic_patients: int = 12  # used when neither data_dir nor manifest is given: synthetic data
    synthetic_slices: int = 16  # slices per synthetic patient
    size: int = 256  # square side the slices are resized to (paper 4.3: 256x256; 4.1 says 250x250)
    in_channels: int = 3  # per slice: pre-contrast, FLAIR, post-contrast
    context_slices: int = 0  # 2.5D: k neighbouring slices on each side as extra channels (raysegm.data.context)
    normalize: str = "scale"  # "scale": uint8/255, volumes min-max; "volume_zscore": per-volume clip + z-score;
    # "imagenet": "scale", then ImageNet's mean/std (for encoder_weights: imagenet)
    clip_percentiles: tuple[float, float] = (0.5, 99.5)  # for volume_zscore, per channel over the volume
    augment: bool = True  # paper 4.1 augmentation on the training split only
    rotate_limit: float = 40.0  # degrees
    shift_limit: float = 0.2  # fraction of the side
    zoom_limit: float = 0.2  # +-20%
    shear_limit: float = 10.0  # degrees (the paper gives no value)
    hflip: bool = True
    intensity_augment: float = 0.0  # training only: chance of each of brightness, contrast, gamma, per sequence
    brightness_limit: float = 0.25  # intensities multiplied by 1 +- this
    contrast_limit: float = 0.25  # deviations from the sequence's mean multiplied by 1 +- this
    gamma_limit: tuple[float, float] = (0.7, 1.5)  # gamma drawn from this range, on the sequence's own range
    sequence_dropout: float = 0.0  # training only: chance that pre- or post-contrast (each alone) becomes FLAIR
    split_seed: int = 0  # the patient-level split is a function of this seed alone
    val_fraction: float = 0.2  # 60/20/20 by patient
    test_fraction: float = 0.2
    folds: int = 0  # k for k-fold cross-validation; 0 = plain split
    fold: int = 0  # which fold is the validation fold when folds > 0
    tumor_oversample: float = 1.0  # sampling weight of tumor slices relative to tumor-free ones
    read_cpus: float = 0.25  # CPUs per Ray Data decode/augment task
    read_tasks: int = 2  # most decode/augment tasks at once (0: no cap); few stay warm across epochs
    read_cache_mb: float = 512  # per decode/augment worker process: decoded, resized slices kept across epochs (0: off)

    @property
    def model_channels(self) -> int:
        """Input channels of the model: in_channels for each of the 2 * context_slices + 1 slices."""
        return self.in_channels * (2 * self.context_slices + 1)


@dataclass(frozen=True)
class ModelSettings:
    variant: str = "unet"  # registry key: unet, unet_attention, unet_resnet50, unet_resnet50_attention
    encoder: str = "resnet50"  # encoder of the ResNet variants (resnet18/34 for CPU runs)
    encoder_weights: str = "none"  # none, imagenet, or a local weights file
    encoder_depth: int = 4  # skips at conv1, conv2_x, conv3_x, bridge at conv4_x (paper 4.3.3)
    decoder_channels: tuple[int, ...] = (512, 256, 128, 64)  # paper 4.3.3-4.3.4
    freeze_stages: int = 0  # 0: train all; N >= 1 freezes the stem and the first N-1 residual stages
    unet_width: int = 64  # filters of the classic U-Net's first level (paper 4.3.1), doubling per level
    unet_depth: int = 4  # poolings of the classic U-Net
    upsample: str = "transpose"  # classic U-Net up path: "transpose" or "bilinear"
    attention_mode: str = "parallel"  # dual attention: "parallel" (paper 3.2) or "sequential" (CBAM)
    attention_reduction: int = 16  # channel attention reduction ratio r (paper 4.3.2)
    attention_kernel: int = 7  # spatial attention kernel size k (paper 4.3.2)


@dataclass(frozen=True)
class TrainSettings:
    loss: str = "bce"  # bce, dice, bce_dice, topk_bce, topk_bce_dice (raysegm/losses.py)
    optimizer: str = "adam"  # adam or adamw
    lr: float = 1e-4  # paper 4.3
    weight_decay: float = 0.0
    schedule: str = "none"  # none or cosine (with warm-up)
    warmup_epochs: int = 0
    epochs: int = 20  # paper 4.3.1
    batch_size: int = 16  # global batch, split across workers (paper 4.3.1)
    precision: str = "fp32"  # fp32, bf16 or fp16 autocast (fp16 only on CUDA)
    channels_last: bool = False  # NHWC model and batches (torch.channels_last): faster convolutions on CPU and CUDA
    seed: int = 0  # model init, tumor-slice oversampling and the shuffle (augmentation draws fresh entropy)
    ensemble: int = 1  # models trained (seeds seed, seed + 1, ...) whose probabilities are averaged: one checkpoint


@dataclass(frozen=True)
class ScaleSettings:
    num_workers: int = 2  # Ray Train data-parallel workers
    use_gpu: bool = False  # one GPU per worker when true
    cpus_per_worker: float = 0.5  # fractional so Ray Data tasks still fit on 2 cores
    gpus_per_worker: float = 1.0  # only read when use_gpu
    worker_resources: dict = field(default_factory=dict)  # custom resources per Train worker, e.g. {"node2": 0.5}
    torch_threads: int = 1  # torch intra-op threads per worker; Ray sets OMP_NUM_THREADS=1 at 0.5 CPU
    ray_address: str = ""  # "" starts or joins a local Ray; "auto" joins a running cluster
    local_num_cpus: int = 4  # logical CPUs for a local ray.init (Ray's scheduling units; may exceed the cores)


@dataclass(frozen=True)
class RunSettings:
    name: str = "run"  # run folder under storage_path; an existing one needs --resume
    storage_path: str = "runs"  # a filesystem path every node can reach (a shared mount on a cluster)
    num_to_keep: int = 1  # best checkpoints kept by per-patient Dice (the latest is always kept too)
    max_failures: int = 2  # worker failures a run survives (Ray Train FailureConfig)


@dataclass(frozen=True)
class TuneSettings:
    variants: tuple[str, ...] = ("unet", "unet_attention", "unet_resnet50", "unet_resnet50_attention")
    batch_sizes: tuple[int, ...] = (10, 16, 32)  # the paper's three batch sizes
    losses: tuple[str, ...] = ("bce", "dice")
    extra_axes: dict = field(default_factory=dict)  # more grid axes, e.g. {"train.lr": [1e-4, 3e-4]}
    asha: bool = False  # early stopping on validation per-patient Dice; off reproduces the full grid
    asha_grace_epochs: int = 2
    max_concurrent_trials: int = 1  # trials at once; each holds num_workers Train workers
    trial_cpus: float = 0.01  # the Tune function only drives a TorchTrainer (0 is refused)
    mlflow_tracking_uri: str = ""  # log trials to MLflow here (needs the mlflow extra); "" = off


# infer.postprocess, raysegm.infer.postprocess_volume: steps joined by "+", applied left to right
POSTPROCESS = ("none", "lcc", "lcc_slices", "fill_holes", "lcc+fill_holes", "lcc_slices+fill_holes")


@dataclass(frozen=True)
class InferSettings:
    batch_size: int = 16  # slices per map_batches call
    replicas: int = 1  # model replicas (actors): one per GPU on a cluster
    cpus_per_replica: float = 0.5  # fractional so read tasks still fit on 2 cores
    gpus_per_replica: float = 0.0  # 1 on a GPU cluster
    torch_threads: int = 2  # torch intra-op threads per replica
    tta: bool = False  # horizontal-flip test-time augmentation
    # none, lcc (the 3D component with the most voxels), lcc_slices (the one spanning the most slices),
    # fill_holes (per slice), lcc+fill_holes or lcc_slices+fill_holes
    postprocess: str = "none"
    threshold: float = 0.5  # tumor where probability > threshold (the metric contract)
    precision: str = "auto"  # auto: bf16 (fp16 where unsupported) autocast on CUDA, fp32 on CPU; or fp32
    read_cpus: float = 0.25  # CPUs per Ray Data read+decode+preprocess task
    read_tasks: int = 2  # most read tasks at once (each a worker process that imports the stack); 0: Ray decides
    local_num_cpus: int = 4  # logical CPUs for a local ray.init (Ray's scheduling units; may exceed the cores)
    object_store_mb: int = 0  # object-store budget of the job (reads wait beyond it); 0: 8 batches per replica, >= 32


# Settings that change how a run runs (processes, memory, batching of the scoring, tracking), not what it
# trains or measures: `raysegm cv --resume` and `train --resume` let them change, `tune --resume` the data
# and infer ones (Tune restores its own as the study started them).
RUN_ONLY = {"data": ("read_cpus", "read_tasks", "read_cache_mb"),
            "infer": ("batch_size", "replicas", "cpus_per_replica", "gpus_per_replica", "torch_threads",
                      "read_cpus", "read_tasks", "local_num_cpus", "object_store_mb"),
            "tune": ("max_concurrent_trials", "trial_cpus", "mlflow_tracking_uri")}
# What a scored study (`raysegm cv`, `tune`) may change on resume besides: its scores threshold at the
# metric contract's 0.5, so infer.threshold (the output masks') is free too.
SCORED_RUN_ONLY = {**RUN_ONLY, "infer": (*RUN_ONLY["infer"], "threshold")}


def changed_settings(saved: dict, config: ExperimentConfig, sections: tuple[str, ...] = ("data", "model", "train", "infer"),
                     allowed: dict[str, tuple[str, ...]] = RUN_ONLY) -> list[str]:
    """`section.key saved -> now` for each setting of `sections` where `config` differs from `saved` (a
    run's config.json), less those in `allowed`; keys added since `saved` was written take their defaults."""
    current, saved = to_dict(config), to_dict(from_dict(saved))
    return [f"{section}.{key} {saved[section][key]!r} -> {current[section][key]!r}"
            for section in sections for key in current[section]
            if key not in allowed.get(section, ()) and saved[section][key] != current[section][key]]


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    scale: ScaleSettings = field(default_factory=ScaleSettings)
    run: RunSettings = field(default_factory=RunSettings)
    tune: TuneSettings = field(default_factory=TuneSettings)
    infer: InferSettings = field(default_factory=InferSettings)


# ---------------------------------------------------------------------------------------------------
# dict <-> dataclass, YAML presets and --set overrides


def to_dict(config) -> dict:
    """The config as plain JSON-able types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value, annotation, key: str):
    """Check and convert one value against a field's type; a wrong type is an error, not a string."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):  # YAML 1.1 reads 1e-4 as a string
            number = float(value)
        if number is None or not math.isfinite(number):  # .nan, .inf and 1e999 are no setting
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item_type = args[0]
        if len(args) == 2 and args[1] is not Ellipsis:
            if len(value) != 2:
                raise ValueError(f"{key}: expected 2 values, got {value!r}")
            return tuple(_coerce(v, t, key) for v, t in zip(value, args))
        return tuple(_coerce(v, item_type, key) for v in value)
    if annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{key}: expected a mapping, got {value!r}")
    raise TypeError(f"{key}: unsupported field type {annotation!r}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        hints_text = "".join(f" (did you mean {prefix}{close[0]}?)" for close in
                             [difflib.get_close_matches(k, names, n=1) for k in sorted(unknown)] if close)
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in sorted(unknown))}{hints_text}")
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name}: expected a mapping, got {value!r}")
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, annotation, prefix + name)
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def from_dict(values: dict) -> ExperimentConfig:
    """Rebuild the tree from a (possibly partial) dict; unknown keys and wrong types raise ValueError."""
    return _build(ExperimentConfig, values or {})


def _merge(base: dict, update: dict) -> dict:
    """Sections merge key by key; a key's value, a mapping such as scale.worker_resources too, is
    replaced whole (so `--set scale.worker_resources={}` clears it)."""
    merged = dict(base)
    for section, values in update.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def parse_override(text: str) -> tuple[list[str], object]:
    """`train.epochs=3` -> (["train", "epochs"], 3); the value is parsed as YAML (safe_load)."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ValueError(f"--set {text!r}: the value is not valid YAML ({error})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> ExperimentConfig:
    """Defaults, then `base` (sections a caller layers under the preset, such as a checkpoint's own infer
    choices), then the YAML preset at `path`, then each `key=value` override, checked by type."""
    values: dict = dict(base or {})
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}" + (" (a folder)" if path.is_dir() else ""))
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ValueError(f"{where}: not valid YAML ({error.problem or error.context})") from None
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read it as YAML ({type(error).__name__}: {error})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of sections")
        try:
            from_dict(loaded)  # the preset's own keys and types, checked before the overrides
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        values = _merge(values, loaded)
    for text in overrides:
        keys, value = parse_override(text)
        update: dict = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            update = {key: update}
        values = _merge(values, update)
    return from_dict(values)


def replace(config: ExperimentConfig, **sections) -> ExperimentConfig:
    """`replace(cfg, train={"epochs": 3})`: a copy with some keys of some sections changed."""
    return from_dict(_merge(to_dict(config), sections))


def save_json(config: ExperimentConfig, path: str | Path) -> None:
    """Write the config as JSON; a crash leaves the old file or the new one, never a cut one."""
    from raysegm.storage import replace_atomically

    replace_atomically(path, lambda temporary: temporary.write_text(json.dumps(to_dict(config), indent=2) + "\n"))
