"""The three jobs through `ray job submit` on a real two-node Ray cluster with token auth, and a lost node.

One private cluster (tests/raycluster.py) for the module: a head and a second node that carries the
custom resource `node2`. Jobs are submitted with `--working-dir` set to a clean copy of the project's
files (what Ray would upload from a checkout), so they run the way a user's jobs run on a cluster.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from raycluster import RAY_BIN, LocalRayCluster

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Small enough for 2 busy cores: a few 64 px synthetic patients (the presets' models are tiny already).
SMALL_DATA = ["--set", "data.size=64", "--set", "data.synthetic_patients=6", "--set", "data.synthetic_slices=8"]


class SeparateDisksCluster(LocalRayCluster):
    """A LocalRayCluster whose added nodes keep their session files under their own temp dir.

    Nodes started on one host otherwise share the head's session folder, and a node that first sets up
    a job's working_dir deletes and unpacks it again in place: the folder that is the current directory
    of the job's driver on the head, whose next os.getcwd() then fails. Machines of a real cluster
    never share that folder; with this, neither do these nodes.
    """

    def add_node(self, name: str, *args, **kwargs) -> None:
        self._adding = name
        super().add_node(name, *args, **kwargs)

    def _run(self, args: list[str]) -> None:
        if args[1] == "start" and "--head" not in args:
            args = [*args, f"--temp-dir={self.temp_dir / self._adding}"]
        super()._run(args)


def _start_cluster() -> SeparateDisksCluster:
    """Head plus `node2`. On a saturated host the GCS can miss `ray start`'s deadline: one more try."""
    for last_attempt in (False, True):
        ray_cluster = SeparateDisksCluster(head_cpus=2, memory_gb=6, object_store_gb=0.5)
        try:
            ray_cluster.start()
            ray_cluster.add_node("node2", num_cpus=2, resources={"node2": 1})
            return ray_cluster
        except BaseException as failure:
            ray_cluster.shutdown()  # a head that failed to start leaves processes too
            if last_attempt or not isinstance(failure, (RuntimeError, TimeoutError, subprocess.TimeoutExpired)):
                raise


@pytest.fixture(scope="module")
def cluster():
    ray_cluster = _start_cluster()
    yield ray_cluster
    ray_cluster.shutdown()


@pytest.fixture(scope="module")
def working_dir(tmp_path_factory) -> Path:
    """The project's files as a checkout has them: tracked plus untracked-but-not-ignored, nothing else."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    copy = tmp_path_factory.mktemp("checkout")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    assert (copy / "jobs" / "ablate.py").is_file() and (copy / "raysegm" / "__init__.py").is_file()
    return copy


def _job(cluster: LocalRayCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY_BIN, "job", *args, "--address", cluster.dashboard_url], env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)


def _readable(output: str, lines: int = 80) -> str:
    """The job's last lines without terminal control codes and progress-bar redraws, for failure messages."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]|\[A", "", output)
    kept = [line.rstrip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return "\n".join(kept[-lines:])


def _succeeded(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in output, _readable(output)
    return output


def test_wrong_token_is_refused(cluster, working_dir, tmp_path):
    marker = tmp_path / "ran"
    proc = cluster.submit(["python", "-c", f"open({str(marker)!r}, 'w')"], working_dir=str(tmp_path),
                          token=secrets.token_hex(16), timeout=120)
    assert proc.returncode != 0
    assert "Authentication failed" in proc.stdout + proc.stderr
    assert not marker.exists()
    listing = _job(cluster, "list")
    assert listing.returncode == 0, listing.stderr


def test_a_relative_output_in_a_submitted_job_is_refused(cluster, working_dir):
    """The driver runs in a temporary copy of the working directory: a relative run folder or output
    would land there, on the head only. Each job says so and exits 2 before anything runs."""
    for entrypoint, named in ((["python", "jobs/train.py", "--config", "configs/demo.yaml"],
                               "run.storage_path 'runs'"),
                              (["python", "jobs/ablate.py", "--set", "run.storage_path=studies"],
                               "run.storage_path 'studies'"),
                              (["python", "jobs/infer.py", "--checkpoint", "/nowhere", "--input", "/nowhere",
                                "--output", "masks"], "--output 'masks'")):
        proc = cluster.submit(entrypoint, working_dir=str(working_dir), timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, _readable(output)
        assert f"{named} is relative, and this job runs in a temporary copy of its working directory" in output
        assert "Traceback" not in output  # refused by the job itself, exit 2, before any Ray work


def test_a_relative_input_left_out_of_the_working_dir_is_named(cluster, working_dir, tmp_path):
    """paper.yaml's data_dir, data/kaggle_3m, is relative and .gitignore'd: the job's copy has no such
    folder, and the job says why, rather than 'data folder not found' under a temporary path."""
    for entrypoint, named in ((["python", "jobs/train.py", "--config", "configs/paper.yaml",
                                "--set", f"run.storage_path={tmp_path}"], "data.data_dir 'data/kaggle_3m'"),
                              (["python", "jobs/infer.py", "--checkpoint", "runs/paper", "--input", "/nowhere",
                                "--output", str(tmp_path / "masks")], "--checkpoint 'runs/paper'")):
        proc = cluster.submit(entrypoint, working_dir=str(working_dir), timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, _readable(output)
        assert f"{named} is relative and not in this job's copy of its working directory" in output, _readable(output)
        assert "Traceback" not in output


@pytest.fixture(scope="module")
def ablation_study(cluster, working_dir, tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("runs")
    proc = cluster.submit(
        ["python", "jobs/ablate.py", "--config", "configs/ablation-demo.yaml", *SMALL_DATA,
         "--set", "tune.variants=[unet, unet_attention]", "--set", "tune.batch_sizes=[4]",
         "--set", "tune.losses=[dice]", "--set", "train.epochs=1",
         "--set", f"run.storage_path={storage}", "--set", "run.name=ablation"],
        working_dir=str(working_dir), timeout=1200)
    _succeeded(proc)
    return storage / "ablation"


def test_ablation_job_writes_the_results_table(ablation_study):
    results = pd.read_csv(ablation_study / "results.csv")
    assert sorted(results["variant"]) == ["unet", "unet_attention"]
    assert set(results["loss"]) == {"dice"} and set(results["batch_size"]) == {4}
    assert set(results["status"]) == {"completed"}
    assert results["dice_mean"].between(0, 1).all()
    assert (results["dice_ci_low"] <= results["dice_mean"]).all()
    assert (results["dice_mean"] <= results["dice_ci_high"]).all()
    table = (ablation_study / "results.md").read_text()
    assert all(trial_id in table for trial_id in results["trial_id"])
    for checkpoint in results["checkpoint"]:
        assert (Path(checkpoint) / "model.safetensors").is_file()


def test_inference_job_writes_one_row_per_slice(cluster, working_dir, ablation_study, tmp_path):
    from raysegm.data.synth import generate_dataset
    from raysegm.infer import decode_mask_png

    holdout = generate_dataset(tmp_path / "holdout", patients=2, slices=5, size=64, seed=7)
    checkpoint = pd.read_csv(ablation_study / "results.csv")["checkpoint"].iloc[0]
    output = tmp_path / "masks"
    proc = cluster.submit(["python", "jobs/infer.py", "--checkpoint", checkpoint, "--input", str(holdout),
                           "--output", str(output)], working_dir=str(working_dir), timeout=900)
    _succeeded(proc)
    rows = pd.read_parquet(output)
    assert len(rows) == 10
    assert not rows.duplicated(["volume_id", "slice_index"]).any()
    assert sorted(rows["slice_index"].unique()) == [1, 2, 3, 4, 5]
    assert set(rows["status"]) == {"ok"}
    for row in rows.itertuples():
        mask = decode_mask_png(row.mask_png)
        assert mask.shape == (row.height, row.width) == (64, 64)
        assert int(mask.sum()) == row.tumor_pixels


def _status(cluster: LocalRayCluster, submission_id: str) -> str:
    """PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED, as `ray job status` words it (UNKNOWN if it failed)."""
    proc = _job(cluster, "status", submission_id)
    output = proc.stdout + proc.stderr
    ended = re.search(rf"Job '{submission_id}' (succeeded|failed|was stopped)", output)
    if ended:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[ended.group(1)]
    running = re.search(rf"Status for job '{submission_id}': (\w+)", output)
    return running.group(1) if running else "UNKNOWN"


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _registered_checkpoint(run_dir: Path) -> bool:
    """Ray Train has registered a checkpoint of the run (its own snapshot says so).

    A checkpoint folder on disk is not enough: a run that loses its workers before the controller has
    registered the upload restarts from the previous checkpoint, here from scratch (seen on Ray 2.60).
    """
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(snapshot.get("latest_checkpoint_result"))


def test_training_survives_the_loss_of_its_node(cluster, working_dir, tmp_path):
    """Train workers pinned to `node2`; the node dies after the first checkpoint; a replacement joins."""
    epochs = 5
    submission_id = f"raysegm-fault-{secrets.token_hex(4)}"
    run_dir = tmp_path / "runs" / "fault"
    submit = subprocess.run(
        [RAY_BIN, "job", "submit", "--no-wait", "--submission-id", submission_id, "--address",
         cluster.dashboard_url, "--working-dir", str(working_dir), "--",
         # demo.yaml's 12 patients: epochs of several seconds, so the node is lost mid-run
         "python", "jobs/train.py", "--config", "configs/demo.yaml", "--set", f"train.epochs={epochs}",
         "--set", "scale.num_workers=2", "--set", "scale.worker_resources={node2: 0.5}",
         "--set", f"run.storage_path={run_dir.parent}", "--set", "run.name=fault"],
        env=cluster.env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    def first_checkpoint():
        if _registered_checkpoint(run_dir):
            return True
        if _status(cluster, submission_id) in ("FAILED", "STOPPED", "SUCCEEDED"):
            logs = _job(cluster, "logs", submission_id).stdout
            raise AssertionError(f"job ended before its node was lost:\n{_readable(logs)}")
        return False

    _wait_for(first_checkpoint, timeout=600, what="the first checkpoint")
    cluster.kill_node("node2")
    assert not (run_dir / "result.json").exists(), "the run finished before its node was lost"
    # What an autoscaler does: a new node of the same type, carrying the same custom resource.
    cluster.add_node("node3", num_cpus=2, resources={"node2": 1})

    def ended():
        status = _status(cluster, submission_id)
        return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None

    final = _wait_for(ended, timeout=900, what="the job to end", interval=2)
    logs = _job(cluster, "logs", submission_id).stdout
    assert final == "SUCCEEDED", _readable(logs)

    history = json.loads((run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs_completed"] == epochs
    # Resumed from a checkpoint after the loss, not restarted from epoch 0.
    assert result["resumed_after"] and 1 <= result["resumed_after"][0] < epochs
    assert re.search(r"resumed from the checkpoint of epoch [1-9]", logs)
