"""`raysegm demo`: the whole path on synthetic data, as a new user runs it."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from raysegm.checkpoint import model_id
from raysegm.cli import main

RAYSEGM = str(Path(sys.executable).with_name("raysegm"))


def _printed(stdout: str, label: str) -> str:
    found = re.search(rf"^  {re.escape(label)}\s+(\S+)", stdout, flags=re.MULTILINE)
    assert found, f"the demo did not print its {label}:\n{stdout[-4000:]}"
    return found.group(1)


def _per_patient_dice(rows: pd.DataFrame, truth_dir: Path) -> float:
    """Mean over volumes of 2|P n G| / (|P| + |G|) on the stacked slices; 1 when both are empty."""
    dices = []
    for volume_id, volume in rows.groupby("volume_id"):
        overlap = predicted = true = 0
        for row in volume.itertuples():
            with Image.open(io.BytesIO(row.mask_png)) as png:
                prediction = np.asarray(png) == 255
            truth = tifffile.imread(truth_dir / volume_id / f"{volume_id}_{row.slice_index}_mask.tif") == 255
            overlap += int((prediction & truth).sum())
            predicted += int(prediction.sum())
            true += int(truth.sum())
        dices.append(1.0 if predicted + true == 0 else 2 * overlap / (predicted + true))
    return float(np.mean(dices))


@pytest.mark.slow
def test_quick_demo_runs_and_prints_where_its_outputs_are(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([RAYSEGM, "demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=1500, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-8000:]
    stdout = proc.stdout

    study, table, report, masks = (Path(_printed(stdout, label)) for label in
                                   ("study folder", "results table", "report", "masks (Parquet)"))
    assert study == out / "study" and study.is_dir()
    assert table == study / "results.md"
    assert report == study / "report.html"
    assert masks == out / "masks"

    # The results table: printed, and one row per trial of the quick grid (2 variants x 1 loss).
    results = pd.read_csv(study / "results.csv", dtype={"trial_id": str})
    assert sorted(results["variant"]) == ["unet", "unet_resnet50_attention"]
    assert set(results["status"]) == {"completed"}
    assert table.read_text().strip() in stdout
    # The masks come from the best trial by validation, whatever its test figures
    printed_best = re.search(r"best trial\s+(\S+) \(", stdout)
    assert printed_best, stdout[-4000:]
    assert printed_best.group(1) == results.loc[results["val_dice"].idxmax(), "trial_id"]

    # The report references only images that exist.
    html = report.read_text()
    images = re.findall(r'src="([^"]+\.png)"', html)
    assert images and all((study / image).is_file() for image in images)

    # The masks: one row per held-out slice (2 volumes x 8 slices), all decoded at the input's size.
    holdout = out / "holdout" / "kaggle_3m"
    rows = pd.read_parquet(masks)
    assert len(rows) == 16 and set(rows["status"]) == {"ok"}
    best_checkpoint = results.loc[results["val_dice"].idxmax(), "checkpoint"]
    assert set(rows["model"]) == {model_id(best_checkpoint)}  # written by that trial's checkpoint
    assert rows["volume_id"].nunique() == 2
    assert set(rows["volume_id"]) == {p.name for p in holdout.iterdir() if p.is_dir()}

    # The held-out Dice the demo prints is the one computed here by hand from the Parquet and the truth.
    printed = re.search(r"held-out masks\s+per-patient Dice (\d\.\d{3})", stdout)
    assert printed, stdout[-4000:]
    assert float(printed.group(1)) == pytest.approx(_per_patient_dice(rows, holdout), abs=6e-4)


def test_demo_refuses_a_folder_that_holds_a_demo(tmp_path, capsys):
    (tmp_path / "study").mkdir()
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"raysegm demo: error: {tmp_path} already holds a demo" in error
