"""evaluate_checkpoint against numbers computed by hand on the same slices and predictions."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
import torch.nn.functional as F

from raysegm.checkpoint import load_model, save_checkpoint
from raysegm.config import from_dict
from raysegm.data.discover import load_manifest, prepare
from raysegm.data.preprocess import preprocess_image
from raysegm.evaluate import evaluate_checkpoint
from raysegm.models import create_model

MODEL_SIZE = 32  # the synthetic slices are 64 px: predictions are resized back before scoring


@pytest.fixture(scope="module")
def all_test_manifest(synth_dir, tmp_path_factory):
    """The 6 synthetic patients, every one of them in the test split (one tumor-free among them)."""
    folder = tmp_path_factory.mktemp("manifest")
    prepare(synth_dir, folder / "prepared.parquet")
    table = pq.read_table(folder / "prepared.parquet")  # keeps the manifest's metadata
    split = table.schema.get_field_index("split")
    table = table.set_column(split, "split", pa.array(["test"] * len(table)))
    path = folder / "all-test.parquet"
    pq.write_table(table, path)
    return path


def make_checkpoint(directory, manifest_path, head_bias=None, in_channels=3, centred_on=None, **data):
    """A tiny U-Net checkpoint at MODEL_SIZE px with random weights.

    head_bias: the logits become that constant everywhere. centred_on: model inputs (B, 3, S, S) whose
    median logit is moved to 0, so that about half of their pixels are predicted tumor.
    """
    config = from_dict({"data": {"size": MODEL_SIZE, "manifest": str(manifest_path), "in_channels": in_channels,
                                 **data},
                        "model": {"variant": "unet", "unet_width": 4, "unet_depth": 2}})
    torch.manual_seed(0)
    model = create_model(config.model, in_channels=in_channels).eval()
    with torch.no_grad():
        if head_bias is not None:
            model.head.weight.zero_()
            model.head.bias.fill_(head_bias)
        if centred_on is not None:
            model.head.bias -= model(centred_on).median()
    save_checkpoint(directory, model, config)
    return directory


def truth_by_patient(manifest_path) -> dict[str, np.ndarray]:
    """volume_id -> (S, H, W) bool masks read straight from the tif files."""
    manifest = load_manifest(manifest_path).sort_values(["volume_id", "slice_index"])
    return {volume_id: np.stack([tifffile.imread(path) > 0 for path in rows["mask_path"]])
            for volume_id, rows in manifest.groupby("volume_id")}


def test_predicting_tumor_everywhere_scores_as_computed_by_hand(all_test_manifest, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "everywhere", all_test_manifest, head_bias=10.0)
    summary = evaluate_checkpoint(checkpoint, split="test", out=tmp_path / "scores")
    table = pd.read_csv(tmp_path / "scores" / "per_patient.csv").set_index("volume_id")
    truth = truth_by_patient(all_test_manifest)
    assert sorted(table.index) == sorted(truth)
    for volume_id, masks in truth.items():
        tumor, voxels = int(masks.sum()), masks.size
        # P = every voxel: TP = |G|, FP = N - |G|, FN = 0, so Dice = 2|G| / (N + |G|), IoU = |G| / N
        assert table.loc[volume_id, "dice"] == pytest.approx(2 * tumor / (voxels + tumor))
        assert table.loc[volume_id, "iou"] == pytest.approx(tumor / voxels)
        assert table.loc[volume_id, "tumor_pixels"] == tumor
        assert table.loc[volume_id, "predicted_pixels"] == voxels  # at 64 px, not the model's 32
        if tumor == 0:  # exactly one mask empty: HD95 is the image's diagonal in the input's own pixels
            assert table.loc[volume_id, "hd95"] == pytest.approx(math.sqrt(64**2 + 64**2))
    all_tumor = sum(int(m.sum()) for m in truth.values())
    all_voxels = sum(m.size for m in truth.values())
    assert summary["pooled"]["dice"] == pytest.approx(2 * all_tumor / (all_voxels + all_tumor))
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(table["dice"].mean())
    assert summary["tumor_free_patients"] == sum(int(not m.any()) for m in truth.values()) >= 1
    assert summary["n_slices"] == sum(len(m) for m in truth.values())
    assert json.loads((tmp_path / "scores" / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_predicting_nothing_scores_only_the_tumor_free_patients(all_test_manifest, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "nothing", all_test_manifest, head_bias=-10.0)
    table = evaluate_checkpoint(checkpoint, split="test", out=tmp_path / "scores")
    per_patient = pd.read_csv(tmp_path / "scores" / "per_patient.csv").set_index("volume_id")
    for volume_id, masks in truth_by_patient(all_test_manifest).items():
        assert per_patient.loc[volume_id, "dice"] == (0.0 if masks.any() else 1.0)
        assert per_patient.loc[volume_id, "hd95"] == pytest.approx(math.sqrt(64**2 + 64**2) if masks.any() else 0.0)
    assert table["pooled"]["recall"] == 0.0


def centred_model(manifest_path, directory):
    """(manifest sorted by slice, volume_id -> model inputs, a random checkpoint predicting about half of
    the pixels tumor), for checks against predictions recomputed by hand."""
    manifest = load_manifest(manifest_path).sort_values(["volume_id", "slice_index"])
    data = from_dict({"data": {"size": MODEL_SIZE}}).data
    inputs = {volume_id: torch.from_numpy(np.stack([preprocess_image(tifffile.imread(r["image_path"]), data, r)
                                                    for r in rows.to_dict("records")]))
              for volume_id, rows in manifest.groupby("volume_id")}
    checkpoint = make_checkpoint(directory, manifest_path, centred_on=torch.cat(list(inputs.values())))
    return manifest, inputs, checkpoint


def test_a_model_scores_as_the_meter_computed_by_hand(all_test_manifest, tmp_path):
    manifest, inputs, checkpoint = centred_model(all_test_manifest, tmp_path / "random")
    summary = evaluate_checkpoint(checkpoint, manifest=all_test_manifest, split="test", out=tmp_path / "scores")
    table = pd.read_csv(tmp_path / "scores" / "per_patient.csv").set_index("volume_id")

    model, _ = load_model(checkpoint)
    counts = {}
    for volume_id, rows in manifest.groupby("volume_id"):
        with torch.no_grad():
            probabilities = torch.sigmoid(model(inputs[volume_id]))
        pred = (F.interpolate(probabilities, size=(64, 64), mode="bilinear") > 0.5).numpy()[:, 0]
        truth = np.stack([tifffile.imread(path) > 0 for path in rows["mask_path"]])
        counts[volume_id] = ((pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum())
    predicted = sum(tp + fp for tp, fp, _ in counts.values())
    assert 0.2 < predicted / (len(manifest) * 64 * 64) < 0.8, "the check needs a prediction neither empty nor full"
    for volume_id, (tp, fp, fn) in counts.items():
        expected = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        assert table.loc[volume_id, "dice"] == pytest.approx(expected)
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    assert summary["pooled"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(table["dice"].mean())


def test_data_dir_is_split_with_the_checkpoints_own_settings(synth_dir, all_test_manifest, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", all_test_manifest, head_bias=10.0, split_seed=1)
    summary = evaluate_checkpoint(checkpoint, data_dir=synth_dir, split="val", out=tmp_path / "scores")
    scored = set(pd.read_csv(tmp_path / "scores" / "per_patient.csv")["volume_id"])
    expected, _ = prepare(synth_dir, tmp_path / "seed1.parquet", split_seed=1)  # the checkpoint's split
    default, _ = prepare(synth_dir, tmp_path / "seed0.parquet")
    assert scored == set(expected.query("split == 'val'")["volume_id"])
    assert scored != set(default.query("split == 'val'")["volume_id"])  # so the seed was not the default's
    assert summary["n_slices"] == int((expected["split"] == "val").sum())


def test_unlabeled_slices_are_counted_not_scored(all_test_manifest, tmp_path, capsys):
    table = pq.read_table(all_test_manifest)
    masks = table.column("mask_path").to_pylist()
    masks[0] = None
    path = tmp_path / "one-unlabeled.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("mask_path"), "mask_path", pa.array(masks)), path)
    checkpoint = make_checkpoint(tmp_path / "ckpt", path, head_bias=10.0)
    summary = evaluate_checkpoint(checkpoint, split="test")
    assert summary["unlabeled_slices"] == 1
    assert summary["n_slices"] == len(masks) - 1
    assert "1 unlabeled slices of split 'test'" in capsys.readouterr().out


def test_bad_requests_are_clear_errors(all_test_manifest, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", all_test_manifest, head_bias=10.0)
    with pytest.raises(ValueError, match="no slices in split 'val'"):
        evaluate_checkpoint(checkpoint, split="val")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate_checkpoint(tmp_path / "absent")
    one_channel = make_checkpoint(tmp_path / "gray", all_test_manifest, in_channels=1)
    with pytest.raises(ValueError, match="3 channels, the model was trained on 1 per slice"):
        evaluate_checkpoint(one_channel, split="test")


def test_a_run_folder_is_scored_with_its_best_checkpoint(all_test_manifest, tmp_path):
    best = make_checkpoint(tmp_path / "run" / "best", all_test_manifest, head_bias=10.0)
    make_checkpoint(tmp_path / "run" / "latest", all_test_manifest, head_bias=-10.0)
    result = tmp_path / "run" / "result.json"
    result.write_text(json.dumps({"best_checkpoint": str(best)}))
    everywhere = evaluate_checkpoint(best, split="test")
    assert evaluate_checkpoint(tmp_path / "run", split="test") == everywhere
    result.write_text(json.dumps({"best_checkpoint": None}))
    with pytest.raises(ValueError, match="names no best checkpoint"):
        evaluate_checkpoint(tmp_path / "run", split="test")


@pytest.mark.parametrize("tta, postprocess", [(True, "none"), (False, "lcc"), (True, "lcc"), (False, "fill_holes"),
                                              (True, "lcc+fill_holes"), (True, "lcc_slices+fill_holes")])
def test_tta_and_postprocessing_score_as_computed_by_hand(all_test_manifest, tmp_path, tta, postprocess):
    from scipy import ndimage

    from raysegm.infer import largest_connected_component

    manifest, inputs, checkpoint = centred_model(all_test_manifest, tmp_path / "random")
    plain = evaluate_checkpoint(checkpoint, manifest=all_test_manifest, split="test")
    summary = evaluate_checkpoint(checkpoint, manifest=all_test_manifest, split="test", out=tmp_path / "scores",
                                  tta=tta, postprocess=postprocess)
    table = pd.read_csv(tmp_path / "scores" / "per_patient.csv").set_index("volume_id")

    model, _ = load_model(checkpoint)
    components_removed = holes_filled = 0
    for volume_id, rows in manifest.groupby("volume_id"):
        x = inputs[volume_id]
        with torch.no_grad():
            probabilities = torch.sigmoid(model(x))
            if tta:  # p = (sigmoid(f(x)) + flip(sigmoid(f(flip(x))))) / 2, flip along the width
                probabilities = (probabilities + torch.flip(torch.sigmoid(model(torch.flip(x, [-1]))), [-1])) / 2
        pred = (F.interpolate(probabilities, size=(64, 64), mode="bilinear") > 0.5).numpy()[:, 0]
        if postprocess.startswith("lcc"):
            kept = largest_connected_component(pred, by="slices" if "slices" in postprocess else "voxels")
            components_removed += int(pred.sum() - kept.sum())
            pred = kept
        if postprocess.endswith("fill_holes"):  # each slice on its own, 2D, after lcc
            filled = np.stack([ndimage.binary_fill_holes(mask) for mask in pred])
            holes_filled += int(filled.sum() - pred.sum())
            pred = filled
        truth = np.stack([tifffile.imread(path) > 0 for path in rows["mask_path"]])
        tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
        expected = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        assert table.loc[volume_id, "dice"] == pytest.approx(expected)
    if "lcc" in postprocess:
        assert components_removed > 0, "the check needs predictions with more than one component"
    if "fill_holes" in postprocess:
        assert holes_filled > 0, "the check needs predictions with holes"
    assert summary["tta"] is tta and summary["postprocess"] == postprocess
    assert summary["per_patient"]["dice"]["mean"] != pytest.approx(plain["per_patient"]["dice"]["mean"])


def test_a_checkpoint_is_scored_with_its_own_infer_settings_unless_told_otherwise(all_test_manifest, tmp_path,
                                                                                  capsys):
    from raysegm.cli import main
    from raysegm.config import replace

    _, _, plain_checkpoint = centred_model(all_test_manifest, tmp_path / "random")
    model, config = load_model(plain_checkpoint)
    preset = save_checkpoint(tmp_path / "preset", model,
                             replace(config, infer={"tta": True, "postprocess": "lcc+fill_holes"}))
    shipped = evaluate_checkpoint(preset, manifest=all_test_manifest, split="test", out=tmp_path / "shipped")
    told = evaluate_checkpoint(plain_checkpoint, manifest=all_test_manifest, split="test", tta=True,
                               postprocess="lcc+fill_holes")
    raw = evaluate_checkpoint(preset, manifest=all_test_manifest, split="test", tta=False, postprocess="none")
    plain = evaluate_checkpoint(plain_checkpoint, manifest=all_test_manifest, split="test")
    assert (shipped["tta"], shipped["postprocess"]) == (True, "lcc+fill_holes")
    assert (raw["tta"], raw["postprocess"]) == (plain["tta"], plain["postprocess"]) == (False, "none")
    assert shipped["per_patient"] == told["per_patient"] and raw["per_patient"] == plain["per_patient"]
    assert shipped["per_patient"]["dice"]["mean"] != pytest.approx(raw["per_patient"]["dice"]["mean"])
    # The CLI: no flag keeps the checkpoint's settings; --no-tta --postprocess none scores the raw model.
    common = ["evaluate", "--checkpoint", str(preset), "--manifest", str(all_test_manifest), "--split", "test"]
    assert main([*common, "--out", str(tmp_path / "cli-shipped")]) == 0
    assert main([*common, "--no-tta", "--postprocess", "none", "--out", str(tmp_path / "cli-raw")]) == 0
    capsys.readouterr()
    for folder, expected in (("cli-shipped", shipped), ("cli-raw", raw)):
        written = json.loads((tmp_path / folder / "summary.json").read_text())
        assert (written["tta"], written["postprocess"]) == (expected["tta"], expected["postprocess"])
        assert written["per_patient"] == json.loads(json.dumps(expected["per_patient"]))


def test_unknown_postprocess_is_refused(all_test_manifest, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt", all_test_manifest, head_bias=10.0)
    with pytest.raises(ValueError, match="postprocess must be one of"):
        evaluate_checkpoint(checkpoint, split="test", postprocess="largest")


def test_an_ensemble_averages_its_members_probabilities(all_test_manifest, tmp_path):
    manifest, inputs, centred = centred_model(all_test_manifest, tmp_path / "random")
    model, _ = load_model(centred)
    with torch.no_grad():
        first = {volume_id: torch.sigmoid(model(x)) for volume_id, x in inputs.items()}
    # A second member predicting c = 1 - q everywhere, q the first member's lower quartile: the average
    # passes 0.5 where the first member's probability passes q, so the ensemble marks about 3/4 of the
    # pixels, more than the first member alone (about 1/2) and less than the second (all of them).
    q = float(torch.quantile(torch.cat([p.flatten() for p in first.values()]), 0.25))
    constant = make_checkpoint(tmp_path / "constant", all_test_manifest, head_bias=math.log((1 - q) / q))
    summary = evaluate_checkpoint([centred, constant], manifest=all_test_manifest, split="test",
                                  out=tmp_path / "scores")
    table = pd.read_csv(tmp_path / "scores" / "per_patient.csv").set_index("volume_id")

    second, _ = load_model(constant)
    predicted = predicted_alone = 0
    for volume_id, rows in manifest.groupby("volume_id"):
        with torch.no_grad():  # p = (p_1 + p_2) / 2, p_2 = 1 - q up to float32 rounding
            probabilities = (first[volume_id] + torch.sigmoid(second(inputs[volume_id]))) / 2
        pred = (F.interpolate(probabilities, size=(64, 64), mode="bilinear") > 0.5).numpy()[:, 0]
        predicted_alone += int((F.interpolate(first[volume_id], size=(64, 64), mode="bilinear") > 0.5).sum())
        truth = np.stack([tifffile.imread(path) > 0 for path in rows["mask_path"]])
        tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
        assert table.loc[volume_id, "dice"] == pytest.approx(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        assert table.loc[volume_id, "predicted_pixels"] == tp + fp
        predicted += tp + fp
    assert predicted_alone < predicted < len(manifest) * 64 * 64, "the ensemble must differ from each member"
    assert summary["checkpoint"] == [str(centred), str(constant)]
    assert summary["model_id"].count("+") == 1
    # An ensemble of one checkpoint twice is that checkpoint.
    alone = evaluate_checkpoint(centred, manifest=all_test_manifest, split="test")
    twice = evaluate_checkpoint([centred, centred], manifest=all_test_manifest, split="test")
    assert twice["per_patient"] == alone["per_patient"] and twice["pooled"] == alone["pooled"]


def test_an_ensemble_of_differently_preprocessed_members_is_refused(all_test_manifest, tmp_path):
    three = make_checkpoint(tmp_path / "three", all_test_manifest, head_bias=1.0)
    one = make_checkpoint(tmp_path / "one", all_test_manifest, head_bias=1.0, in_channels=1)
    with pytest.raises(ValueError, match="must share their input settings; its data.in_channels"):
        evaluate_checkpoint([three, one], manifest=all_test_manifest, split="test")
    with pytest.raises(ValueError, match="empty list"):
        evaluate_checkpoint([], manifest=all_test_manifest, split="test")


def test_the_cli_scores_an_ensemble_given_by_repeated_checkpoints(all_test_manifest, tmp_path, capsys):
    from raysegm.cli import main

    _, _, centred = centred_model(all_test_manifest, tmp_path / "random")
    constant = make_checkpoint(tmp_path / "constant", all_test_manifest, head_bias=0.0)
    expected = evaluate_checkpoint([centred, constant], manifest=all_test_manifest, split="test")
    assert main(["evaluate", "--checkpoint", str(centred), "--checkpoint", str(constant), "--manifest",
                 str(all_test_manifest), "--split", "test", "--out", str(tmp_path / "scores")]) == 0
    capsys.readouterr()
    written = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert written["checkpoint"] == [str(centred), str(constant)]
    assert written["per_patient"] == json.loads(json.dumps(expected["per_patient"]))


def test_nifti_cases_get_hd95_in_mm_from_their_headers(tmp_path):
    import nibabel as nib

    from raysegm.metrics import hd95

    root = tmp_path / "nifti"
    root.mkdir()
    rng = np.random.default_rng(0)
    truths = {}
    for case, zooms in (("a", (2.0, 0.5, 3.0)), ("b", (1.0, 1.0, 1.0))):
        image = nib.Nifti1Image(rng.integers(0, 1000, size=(12, 10, 6)).astype(np.int16), np.eye(4))
        image.header.set_zooms(zooms)
        nib.save(image, root / f"{case}.nii.gz")
        mask = np.zeros((12, 10, 6), np.uint8)
        mask[3:7, 2:5, 1:4] = 1
        nib.save(nib.Nifti1Image(mask, np.eye(4)), root / f"{case}_mask.nii.gz")
        truths[case] = (np.moveaxis(mask, 2, 0).astype(bool), (zooms[2], zooms[0], zooms[1]))
    prepare(root, tmp_path / "prepared.parquet")
    table = pq.read_table(tmp_path / "prepared.parquet")
    table = table.set_column(table.schema.get_field_index("split"), "split", pa.array(["test"] * len(table)))
    pq.write_table(table, tmp_path / "all-test.parquet")
    checkpoint = make_checkpoint(tmp_path / "everywhere", tmp_path / "all-test.parquet", head_bias=10.0)
    summary = evaluate_checkpoint(checkpoint, split="test", out=tmp_path / "scores")
    scores = pd.read_csv(tmp_path / "scores" / "per_patient.csv").set_index("volume_id")
    for case, (truth, spacing) in truths.items():
        everywhere = np.ones_like(truth)  # (slice, row, column) = (Z, X, Y)
        assert scores.loc[case, "hd95"] == pytest.approx(hd95(everywhere, truth))
        assert scores.loc[case, "hd95_mm"] == pytest.approx(hd95(everywhere, truth, spacing))
    swapped = hd95(np.ones_like(truths["a"][0]), truths["a"][0], (2.0, 0.5, 3.0))  # the header's order
    assert scores.loc["a", "hd95_mm"] != pytest.approx(swapped)
    assert summary["per_patient"]["hd95_mm"]["mean"] == pytest.approx(scores["hd95_mm"].mean())
