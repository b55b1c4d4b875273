"""Checkpoints: a folder that rebuilds its model with nothing else, and never unpickles arbitrary objects.

    model.safetensors    the weights (a plain state dict; `model.pt` loaded with weights_only is read too)
    config.json          the resolved ExperimentConfig (raysegm.config.to_dict), plus "variant",
                         "model_name", "encoder", "in_channels", "size", "normalize" at the top level
    training_state.pt    optional: epoch, optimizer, scheduler, RNG states...; tensors, numbers,
                         strings, lists and dicts only, so `torch.load(weights_only=True)` reads it

Each file is written under a temporary name and renamed, so a killed save leaves no half file behind.
A training run's folder (it holds result.json) stands for its best checkpoint wherever a checkpoint is
asked for (raysegm.storage.best_checkpoint_of).

A seed ensemble is one checkpoint too (`save_ensemble`): config.json is its first member's with
train.ensemble = n, and model.safetensors holds every member under `members.<m>.`; `load_model` rebuilds
it as a raysegm.models.ensemble.SeedEnsemble, so inference and scoring need nothing else, and its
`model_id` names the ensemble as a whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raysegm.config import ExperimentConfig, from_dict, replace, to_dict
from raysegm.models import create_model, model_name
from raysegm.models.ensemble import SeedEnsemble
from raysegm.storage import replace_atomically

WEIGHTS = "model.safetensors"
TORCH_WEIGHTS = "model.pt"
CONFIG = "config.json"
TRAINING_STATE = "training_state.pt"
SUMMARY_KEYS = ("variant", "model_name", "encoder", "in_channels", "size", "normalize")  # for humans
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
INPUT_SETTINGS = ("size", "in_channels", "context_slices", "normalize", "clip_percentiles")  # data.* a model sees


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = next((getattr(model, name) for name in ("module", "_orig_mod")
                      if isinstance(getattr(model, name, None), nn.Module)), None)
        if inner is None:
            return model
        model = inner


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on CPU with wrapper prefixes removed from every key."""
    state = {}
    for key, value in unwrap(model).state_dict().items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        state[key] = value.detach().cpu().contiguous()
    return state


def save_checkpoint(
    directory: str | Path, model: nn.Module, config: ExperimentConfig, training_state: dict | None = None
) -> Path:
    """Write `model`'s weights, `config` and the optional training state into `directory`; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    in_channels = getattr(unwrap(model), "in_channels", config.data.model_channels)
    if in_channels != config.data.model_channels:
        raise ValueError(
            f"save_checkpoint: the model takes {in_channels} input channels, config.data says "
            f"{config.data.model_channels} ({config.data.in_channels} per slice, "
            f"{config.data.context_slices} context slices each side)"
        )
    if training_state is not None:
        check_weights_only(training_state)
    replace_atomically(directory / WEIGHTS, lambda path: save_file(plain_state_dict(model), str(path)))
    summary = {
        "variant": config.model.variant,
        "model_name": model_name(config.model),
        "encoder": config.model.encoder,
        "in_channels": in_channels,
        "size": config.data.size,
        "normalize": config.data.normalize,
    }
    text = json.dumps({**summary, **to_dict(config)}, indent=2) + "\n"
    replace_atomically(directory / CONFIG, lambda path: path.write_text(text))
    state_path = directory / TRAINING_STATE
    if training_state is not None:
        replace_atomically(state_path, lambda path: torch.save(training_state, path))
    elif state_path.exists():
        state_path.unlink()  # a stale state from an earlier save would not belong to these weights
    return directory


def load_config_of(directory: str | Path) -> tuple[ExperimentConfig, dict]:
    """The checkpoint's ExperimentConfig and its top-level summary (variant, in_channels, size, ...)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"not a checkpoint: {path} is missing")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    summary = {key: raw.pop(key) for key in SUMMARY_KEYS if key in raw}
    try:
        return from_dict(raw), summary
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def _weights_path(directory: Path) -> Path:
    for name in (WEIGHTS, TORCH_WEIGHTS):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"not a checkpoint: {directory} holds neither {WEIGHTS} nor {TORCH_WEIGHTS}")


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ExperimentConfig]:
    """Rebuild the model from the folder alone, load its weights strictly; returned on `device` in eval mode.

    The encoder is built without pretrained weights (the checkpoint holds them), so loading never
    needs the network or the original weights file.
    """
    directory = Path(directory)
    config, summary = load_config_of(directory)
    in_channels = summary.get("in_channels", config.data.model_channels)
    settings = dataclasses.replace(config.model, encoder_weights="none")
    model = create_model(settings, in_channels=in_channels)
    if config.train.ensemble > 1:
        model = SeedEnsemble([model] + [create_model(settings, in_channels=in_channels)
                                        for _ in range(config.train.ensemble - 1)])
    path = _weights_path(directory)
    try:
        if path.name == WEIGHTS:
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: refused, it holds objects other than tensors ({error})") from error
    except Exception as error:  # truncated or empty: whatever safetensors or torch raise, name the file
        raise ValueError(f"{path}: unreadable weights ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = f"a {type(state).__name__}" if not isinstance(state, dict) else "a dict with values other than tensors"
        raise ValueError(f"{path}: not a state dict (parameter name -> tensor): it holds {found}")
    head = state.get("segmentation_head.0.weight")
    if head is not None and tuple(head.shape[-2:]) == (3, 3):
        raise ValueError(f"{path}: a {model_name(config.model)} with a 3x3 head, written before the ResNet "
                         f"variants took the paper's 1x1 head (4.3.3); train it again with this version")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit {model_name(config.model)}: {error}") from error
    return model.to(device).eval(), config


def input_settings_differ(config: ExperimentConfig, other: ExperimentConfig) -> list[str]:
    """The data.* settings (INPUT_SETTINGS) in which two checkpoints' inputs differ: [] when one preprocessing serves both."""
    return [f"data.{key}" for key in INPUT_SETTINGS if getattr(other.data, key) != getattr(config.data, key)]


def save_ensemble(directory: str | Path, members: list[str | Path]) -> Path:
    """Write the seed ensemble of the checkpoint folders `members` as one checkpoint into `directory`.

    The members must be single models of one variant with the same model settings and input settings
    (they differ in their seeds); the ensemble's config is the first member's with train.ensemble = n.
    """
    if len(members) < 2:
        raise ValueError(f"save_ensemble: an ensemble needs at least 2 members, got {len(members)}")
    models, configs = zip(*(load_model(member) for member in members))
    for member, config in zip(members, configs):
        if config.train.ensemble != 1:
            raise ValueError(f"{member}: already an ensemble of {config.train.ensemble}; give its members instead")
        differ = input_settings_differ(configs[0], config)
        if config.model != configs[0].model:
            differ.append("model.*")
        if differ:
            raise ValueError(f"{member}: an ensemble's members must share their model and input settings; "
                             f"its {', '.join(differ)} differ from those of {members[0]}")
    config = replace(configs[0], train={"ensemble": len(members)})
    return save_checkpoint(directory, SeedEnsemble(list(models)), config)


class UnreadableTrainingState(ValueError):
    """A training state file that cannot be read: empty or cut short (an interrupted upload)."""


def training_checkpoint_problem(directory: str | Path) -> str | None:
    """Why a training checkpoint folder cannot be used (a file missing, or its weights or config cut
    short by an interrupted upload), or None when they read. The training state itself is checked where
    it is read: load_training_state raises UnreadableTrainingState for one cut short."""
    from safetensors import safe_open

    directory = Path(directory)
    missing = [name for name in (WEIGHTS, CONFIG, TRAINING_STATE) if not (directory / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        with safe_open(str(directory / WEIGHTS), framework="pt"):  # checks the header covers the file
            pass
        json.loads((directory / CONFIG).read_text())
    except Exception as error:
        return f"unreadable ({type(error).__name__}: {error})"
    return None


def load_training_state(directory: str | Path) -> dict | None:
    """The training state saved beside the weights, or None; read with weights_only=True (no pickled objects)."""
    path = Path(directory) / TRAINING_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused: it holds pickled objects that torch.load(weights_only=True) does not allow "
            f"(only tensors, numbers, strings, lists and dicts are loaded): {error}"
        ) from error
    except Exception as error:  # truncated or empty
        raise UnreadableTrainingState(
            f"{path}: unreadable training state ({type(error).__name__}: {error})") from error


def model_id(directory: str | Path) -> str:
    """The first 16 hex digits of the SHA-256 of the checkpoint's weights file."""
    digest = hashlib.sha256()
    with _weights_path(Path(directory)).open("rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_weights_only(value, where: str = "training_state") -> None:
    """Raise ValueError naming the first value torch.load(weights_only=True) could not read back."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"{where}: key {key!r} must be a string or an integer")
            check_weights_only(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_weights_only(item, f"{where}[{index}]")
    elif not isinstance(value, (torch.Tensor, bool, int, float, str, type(None))):
        raise ValueError(
            f"{where}: a {type(value).__name__} cannot be loaded with weights_only=True; store tensors, "
            f"numbers, strings, lists or dicts (capture_rng_state converts RNG states)"
        )


def capture_rng_state() -> dict:
    """Python, numpy and torch (and CUDA) RNG states in a weights_only-safe form."""
    keys, position, has_gauss, cached_gaussian = np.random.get_state()[1:]
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Undo capture_rng_state: reset the Python, numpy, torch (and CUDA) generators."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
