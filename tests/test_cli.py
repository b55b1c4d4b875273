"""The `raysegm` console script: every sub-command of the contract, and clear errors for bad --set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysegm.cli import main

RAYSEGM = str(Path(sys.executable).with_name("raysegm"))
CONTRACT_COMMANDS = ["synth", "prepare", "train", "tune", "evaluate", "infer", "report", "demo"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([RAYSEGM, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_every_contract_command():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert set(CONTRACT_COMMANDS) <= set(listed)
    for command in CONTRACT_COMMANDS:
        sub = run_cli(command, "--help")
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.startswith(f"usage: raysegm {command}")


def test_python_dash_m_is_the_same_cli():
    proc = subprocess.run([sys.executable, "-m", "raysegm", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout == run_cli("--help").stdout  # the same parser: the same sub-commands, word for word


@pytest.mark.parametrize(("override", "message"), [
    ("train.epochs=three", "train.epochs: expected an integer, got 'three'"),
    ("train.epochs=2.5", "train.epochs: expected an integer, got 2.5"),
    ("data.augment=maybe", "data.augment: expected true/false, got 'maybe'"),
    ("tune.losses=bce", "tune.losses: expected a list, got 'bce'"),
    ("train.epoch=3", "unknown config key(s): train.epoch"),
    ("trian.epochs=3", "unknown config key(s): trian"),
    ("train.epochs", "--set expects key=value, got 'train.epochs'"),
    ("data.read_cache_mb=.nan", "data.read_cache_mb: expected a finite number, got nan"),
    ("train.lr=1e999", "train.lr: expected a finite number, got '1e999'"),
])
def test_bad_override_exits_with_a_clear_error(override, message, capsys):
    # In-process: the handler imports torch and Ray before it reads the config, once per process.
    assert main(["train", "--set", override]) == 2
    assert f"raysegm train: error: {message}" in capsys.readouterr().err


def test_numbers_in_scientific_notation_are_numbers():
    # YAML 1.1 (yaml.safe_load) reads 1e-4 as a string; a setting typed float takes it as the number
    from raysegm.config import load_config

    config = load_config(None, ["train.lr=1e-4", "train.weight_decay=-2.5E+1", "tune.extra_axes={train.lr: [3e-4]}"])
    assert config.train.lr == 1e-4 and config.train.weight_decay == -25.0
    assert config.tune.extra_axes == {"train.lr": ["3e-4"]}  # checked per trial, where it becomes 3e-4
    assert load_config(None, ["train.lr=0.5"]).train.lr == 0.5


def test_an_override_replaces_a_mapping_setting_whole(tmp_path):
    from raysegm.config import load_config

    preset = tmp_path / "preset.yaml"
    preset.write_text("scale:\n  worker_resources: {node2: 0.5}\n  num_workers: 4\n")
    assert load_config(preset, ["scale.worker_resources={}"]).scale.worker_resources == {}
    assert load_config(preset, ["scale.worker_resources={node3: 1}"]).scale.worker_resources == {"node3": 1}
    kept = load_config(preset, ["scale.num_workers=2"]).scale  # other keys of the section stay
    assert (kept.num_workers, kept.worker_resources) == (2, {"node2": 0.5})


def test_bad_override_from_the_console_script():
    proc = run_cli("train", "--config", "configs/demo.yaml", "--set", "train.lr=fast")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("raysegm train: error: train.lr: expected a finite number, got 'fast'")
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_named(capsys):
    assert main(["train", "--config", "configs/no-such-preset.yaml"]) == 2
    assert "config file not found: configs/no-such-preset.yaml" in capsys.readouterr().err


def test_infer_job_names_a_missing_checkpoint(tmp_path):
    # The job script as `ray job submit` runs it: a clear error and exit status 2, not a traceback.
    missing = tmp_path / "no-such-run"
    proc = subprocess.run([sys.executable, "jobs/infer.py", "--checkpoint", str(missing), "--input", str(tmp_path),
                           "--output", str(tmp_path / "masks")], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("jobs/infer.py: error:") and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_working_dir_job_refuses_relative_outputs_and_names_inputs_it_cannot_see(tmp_path, monkeypatch, capsys):
    import importlib.util

    from raysegm.storage import check_job_inputs, check_job_outputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "present").mkdir()
    check_job_outputs(out="runs")  # a local run: anything goes
    check_job_inputs(data="absent")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "."}}')
    for relative in ("runs", ""):  # "" resolves to the job's temporary copy too
        with pytest.raises(ValueError, match=f"out {relative!r} is relative, and this job runs in a temporary copy"):
            check_job_outputs(out=relative)
    check_job_outputs(out="/mnt/shared/runs", uri="s3://bucket/runs")
    check_job_inputs(data="present", none="", absolute="/mnt/shared/absent", uri="s3://bucket/data")
    with pytest.raises(ValueError, match=r"data 'absent' is relative and not in this job's copy .*\.gitignore"):
        check_job_inputs(data="absent", other="present")
    # jobs/train.py reads a given manifest, not the preset's relative data_dir (paper.yaml: data/kaggle_3m)
    spec = importlib.util.spec_from_file_location("train_job", Path(__file__).resolve().parents[1] / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    preset = str(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    assert job.main(["--config", preset, "--set", f"run.storage_path={tmp_path / 'runs'}"]) == 2
    assert "data.data_dir 'data/kaggle_3m' is relative and not in this job's copy" in capsys.readouterr().err
    assert job.main(["--config", preset, "--set", f"run.storage_path={tmp_path / 'runs'}",
                     "--set", f"data.manifest={tmp_path / 'absent.parquet'}", "--set", "train.epochs=0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("jobs/train.py: error:") and "is relative" not in error, error


def test_a_bad_preset_is_named_with_its_reason(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: [3\n")
    assert main(["train", "--config", str(broken)]) == 2
    assert f"raysegm train: error: {broken}:3:1: not valid YAML (expected ',' or ']'" in capsys.readouterr().err
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  epochs: 3\ntrain:\n  epochs: 5\n")  # plain YAML would keep the 5
    assert main(["train", "--config", str(twice)]) == 2
    assert f"raysegm train: error: {twice}:3:1: not valid YAML (key 'train' given twice)" in capsys.readouterr().err
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("train:\n  lr: !!python/object/apply:os.getcwd []\n")  # safe loading builds no objects
    assert main(["train", "--config", str(tagged)]) == 2
    assert "could not determine a constructor for the tag" in capsys.readouterr().err
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text("train:\n  epoch: 3\n")
    assert main(["train", "--config", str(misspelt)]) == 2
    assert (f"raysegm train: error: {misspelt}: unknown config key(s): train.epoch (did you mean train.epochs?)"
            in capsys.readouterr().err)
    assert main(["train", "--set", "train.lr=[1e-3"]) == 2
    assert "raysegm train: error: --set 'train.lr=[1e-3': the value is not valid YAML (" in capsys.readouterr().err


def test_infer_tta_can_be_turned_on_or_off_or_left_to_the_config():
    from raysegm.cli import build_parser

    parse = build_parser().parse_args
    base = ["infer", "--checkpoint", "c", "--input", "i", "--output", "o"]
    assert parse(base).tta is None
    assert parse([*base, "--tta"]).tta is True
    assert parse([*base, "--no-tta"]).tta is False
