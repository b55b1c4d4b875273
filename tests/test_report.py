"""The study report: Markdown and HTML with valid PNG figures, from a hand-built study (fast) and from
a Ray Tune study (slow, shared with test_tune.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_tune import ablation_study, tiny_config

from raysegm.config import replace, save_json
from raysegm.report import markdown_to_html, write_report
from raysegm.tune import write_results

CHROMIUM = Path("/usr/bin/chromium")


def referenced_images(study_dir: Path) -> tuple[list[str], list[str]]:
    page = (study_dir / "report.html").read_text()
    markdown = (study_dir / "report.md").read_text()
    return re.findall(r'<img [^>]*src="([^"]+)"', page), re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def check_report(study_dir: Path) -> list[str]:
    """Every image either file references exists and is a valid PNG; both reference the same ones."""
    in_html, in_markdown = referenced_images(study_dir)
    assert in_html == in_markdown and in_html
    for source in in_html:
        path = study_dir / source
        assert path.is_file(), source
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
    return in_html


def test_markdown_becomes_html_tables_lists_and_images():
    page = markdown_to_html("# Title <1>\n\nText with `code`.\n\n- one\n- two\n\n| a | b \\| c |\n|---|---|\n"
                            "| 1 | x |\n\n![plot](figures/p.png)\n", title="t")
    assert "<h1>Title &lt;1&gt;</h1>" in page
    assert "<p>Text with <code>code</code>.</p>" in page
    assert "<ul><li>one</li><li>two</li></ul>" in page
    assert "<thead><tr><th>a</th><th>b | c</th></tr></thead><tbody><tr><td>1</td><td>x</td></tr></tbody>" in page
    assert '<img alt="plot" src="figures/p.png">' in page
    # a line starting with # that is no heading is text (it once looped forever); quotes stay inside alt
    page = markdown_to_html("#tag here\n####### deep\n![a\"b & c](x.png)\n", title="t")
    assert "<p>#tag here ####### deep " in page
    assert '<img alt="a&quot;b &amp; c" src="x.png">' in page


def test_a_report_needs_a_finished_study(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        write_report(tmp_path)


@pytest.fixture
def hand_built_study(tmp_path):
    """A study folder as raysegm.tune leaves it, without Tune: two trials' checkpoints saved by hand
    (untrained tiny U-Nets with a made-up history) on a small synthetic manifest. t1 is the better trial by
    validation and the worse on test: its head is biased to predict nothing, t0's to predict everything."""
    from raysegm.checkpoint import save_checkpoint
    from raysegm.data.discover import manifest_for
    from raysegm.models import create_model

    study_dir = tmp_path / "hand"
    study_dir.mkdir()
    config = tiny_config(tmp_path, "hand", "data.synthetic_patients=6", "data.synthetic_slices=4",
                         "tune.variants=[unet, unet_attention]", "tune.losses=[bce]")
    manifest_for(config.data, study_dir / "data")
    config = replace(config, data={"manifest": str(study_dir / "data" / "manifest.parquet")})
    save_json(config, study_dir / "config.json")
    trials = []
    for index, variant in enumerate(("unet", "unet_attention")):
        params = {"model": {"variant": variant}, "train": {"batch_size": 4, "loss": "bce"}}
        trial_config = replace(config, **params)
        history = {e: {"epoch": e, "train_loss": 0.8 - 0.1 * e, "val_per_patient_dice": 0.2 * e + 0.1 * index,
                       "val_pooled_dice": 0.2 * e, "val_per_slice_mean_dice": 0.5, "lr": 0.003,
                       "epoch_time_s": 1.5, "train_images_per_s": 10.0} for e in (1, 2)}
        torch.manual_seed(index)
        model = create_model(trial_config.model)
        torch.nn.init.constant_(model.head.bias, -20.0 if variant == "unet_attention" else 20.0)
        save_checkpoint(study_dir / "trials" / f"trial-t{index}" / "checkpoint_0", model,
                        trial_config, training_state={"epoch": 2, "history": history})
        trials.append({"trial_id": f"t{index}", "params": params, "error": None})
    (study_dir / "trials.json").write_text(json.dumps(trials))
    return study_dir


def test_a_hand_built_study_gets_its_tables_and_report(hand_built_study):
    results = write_results(hand_built_study)
    assert results["trial_id"].tolist() == ["t0", "t1"]
    assert results["best_epoch"].tolist() == [2, 2] and results["train_time_s"].tolist() == [3.0, 3.0]
    assert results["val_dice"].tolist() == pytest.approx([0.4, 0.5])
    assert results["dice_mean"].tolist()[0] > 0.0 == results["dice_mean"].tolist()[1]  # t0 is better on test
    html_path = write_report(hand_built_study)
    assert html_path == hand_built_study / "report.html"
    images = check_report(hand_built_study)
    assert {Path(source).name for source in images} >= {"learning_curves.png", "per_patient_dice.png",
                                                         "overlay_best.png"}
    markdown = (hand_built_study / "report.md").read_text()
    assert "- Data: synthetic, 6 patients x 4 slices, resized to" in markdown
    # The best trial is chosen by validation (t1), and its overlays name its test patients.
    assert "The best trial by validation is t1 (unet_attention" in markdown
    per_patient = pd.read_csv(hand_built_study / "per_patient.csv", dtype={"trial_id": str})
    best_patient = per_patient[per_patient["trial_id"] == "t1"].sort_values(["dice", "volume_id"]).iloc[-1]
    assert f"Best: {best_patient['volume_id']}" in markdown
    for heading in ("## Ablation results", "## Per-variant summary", "## Paired differences",
                    "## The paper's Table 5 beside ours", "### Why these numbers cannot be compared"):
        assert heading in markdown


def test_a_trial_is_scored_by_its_best_checkpoint_not_its_latest(hand_built_study):
    """t0 goes on to a third epoch that validates worse (0.05) and predicts nothing: its test figures
    must still be its best (epoch 2) checkpoint's, which predicts tumor everywhere."""
    from raysegm.checkpoint import load_model, load_training_state, save_checkpoint

    trial = hand_built_study / "trials" / "trial-t0"
    model, config = load_model(trial / "checkpoint_0")
    history = load_training_state(trial / "checkpoint_0")["history"]
    history[3] = {**history[2], "epoch": 3, "val_per_patient_dice": 0.05}
    torch.nn.init.constant_(model.head.bias, -20.0)
    save_checkpoint(trial / "checkpoint_1", model, config, training_state={"epoch": 3, "history": history})
    results = write_results(hand_built_study).set_index("trial_id")
    assert results.loc["t0", "epochs_completed"] == 3 and results.loc["t0", "best_epoch"] == 2
    assert results.loc["t0", "checkpoint"] == str(trial / "checkpoint_0")
    assert results.loc["t0", "val_dice"] == pytest.approx(0.4)
    assert results.loc["t0", "dice_mean"] > 0.0 == results.loc["t1", "dice_mean"]  # predicts tumor: > 0


def test_a_study_copied_from_where_it_ran_gets_its_report_without_overlays(hand_built_study, tmp_path):
    write_results(hand_built_study)
    copy = tmp_path / "copied"
    shutil.copytree(hand_built_study, copy)
    shutil.rmtree(hand_built_study)  # its checkpoints and manifest, which results.json names, are gone
    write_report(copy)
    markdown = (copy / "report.md").read_text()
    assert "No overlays:" in markdown and "not found here (the study was run elsewhere)" in markdown
    assert "- Data: synthetic, 6 patients x 4 slices, resized to" in markdown
    assert "## Ablation results" in markdown and not (copy / "figures" / "overlay_best.png").exists()


def test_the_overlays_show_the_masks_the_study_scored(hand_built_study):
    """With the study's infer.tta and infer.postprocess on, the overlays predict with them too: each test
    patient's Dice over predict_patient's masks is the one in per_patient.csv."""
    from raysegm.checkpoint import load_model, load_training_state, save_checkpoint
    from raysegm.data.context import read_input
    from raysegm.data.discover import load_manifest
    from raysegm.data.preprocess import preprocess_image
    from raysegm.metrics import confusion_counts, scores
    from raysegm.report import predict_patient

    config = json.loads((hand_built_study / "config.json").read_text())
    config["infer"].update(tta=True, postprocess="lcc+fill_holes")
    (hand_built_study / "config.json").write_text(json.dumps(config))
    # t1, the best trial by validation, becomes a random U-Net predicting about half of the pixels tumor
    checkpoint = hand_built_study / "trials" / "trial-t1" / "checkpoint_0"
    model, trial_config = load_model(checkpoint)
    state = load_training_state(checkpoint)
    manifest = load_manifest(config["data"]["manifest"])
    inputs = torch.from_numpy(np.stack([preprocess_image(read_input(r, trial_config.data), trial_config.data, r)
                                         for r in manifest.to_dict("records")]))
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=1.0)
        model.head.bias.zero_()
        model.head.bias -= model(inputs).median()
    save_checkpoint(checkpoint, model, trial_config, training_state=state)
    write_results(hand_built_study)
    assert "made with TTA on and post-processing lcc+fill_holes" in (hand_built_study / "results.md").read_text()
    per_patient = pd.read_csv(hand_built_study / "per_patient.csv", dtype={"trial_id": str, "volume_id": str})
    differs = 0
    for row in per_patient[per_patient["trial_id"] == "t1"].itertuples():
        shown = predict_patient(str(checkpoint), config["data"]["manifest"], row.volume_id, tta=True,
                                postprocess="lcc+fill_holes")
        raw = predict_patient(str(checkpoint), config["data"]["manifest"], row.volume_id)
        counts = sum(confusion_counts(s["prediction"], s["truth"]) for s in shown)
        assert scores(counts)["dice"] == pytest.approx(row.dice), row.volume_id
        differs += any((a["prediction"] != b["prediction"]).any() for a, b in zip(shown, raw))
    assert differs, "TTA and post-processing must change some patient's masks for this check to mean anything"
    write_report(hand_built_study)
    check_report(hand_built_study)
    assert "as the study scored it (TTA on, post-processing lcc+fill_holes)" in (hand_built_study / "report.md").read_text()


def test_a_study_cut_short_before_its_per_patient_table_gets_a_note(hand_built_study):
    write_results(hand_built_study)
    (hand_built_study / "per_patient.csv").unlink()  # killed between results.csv and per_patient.csv
    write_report(hand_built_study)
    markdown = (hand_built_study / "report.md").read_text()
    assert "None: the study has no per-patient table (per_patient.csv)." in markdown
    assert "## Ablation results" in markdown


@pytest.mark.slow
def test_the_report_of_a_tune_study_renders(tmp_path_factory):
    study = ablation_study(tmp_path_factory)
    write_report(study)
    images = check_report(study)
    assert {Path(source).name for source in images} == {"learning_curves.png", "per_patient_dice.png",
                                                         "overlay_best.png", "overlay_worst.png"}
    results = pd.read_csv(study / "results.csv", dtype={"trial_id": str})
    markdown = (study / "report.md").read_text()
    assert all(trial_id in markdown for trial_id in results["trial_id"])


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not found")
def test_the_report_renders_in_headless_chromium(tmp_path_factory, tmp_path):
    study = ablation_study(tmp_path_factory)
    if not (study / "report.html").is_file():
        write_report(study)
    screenshot = tmp_path / "report.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={screenshot}",
                    "--window-size=1280,4000", (study / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(screenshot) as image:
        image.verify()
        assert image.format == "PNG" and image.size == (1280, 4000)
    with Image.open(screenshot) as image:  # a page with text and figures, not a blank or an error page
        grey = np.asarray(image.convert("L"), dtype=np.float32)
    assert grey.std() > 10 and (grey < 128).mean() > 0.01
