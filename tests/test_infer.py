"""Bulk inference: a model trained here on synthetic data, run through Ray Data into Parquet and read back."""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import tifffile
import torch
from PIL import Image

from raysegm.checkpoint import load_model, model_id, save_checkpoint, save_ensemble
from raysegm.config import ExperimentConfig, InferSettings, replace
from raysegm.data.context import with_context
from raysegm.data.discover import discover
from raysegm.data.io import read_image, read_mask
from raysegm.data.preprocess import preprocess_image, preprocess_mask
from raysegm.data.synth import generate_dataset
from raysegm.infer import (
    METADATA,
    SCHEMA,
    TEMP_PREFIX,
    OutputFolder,
    SegmentationPredictor,
    _error_rows,
    _finish_volume,
    _read_checkpoint,
    _stage,
    arithmetic_of,
    decode_mask_png,
    encode_mask_png,
    fill_holes,
    infer,
    largest_connected_component,
    part_name,
    postprocess_slices,
    postprocess_volume,
    predictor_kwargs,
    read_slices,
    volume_fingerprints,
)
from raysegm.losses import make_loss
from raysegm.models import create_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
SETTINGS = InferSettings(batch_size=8, replicas=1, cpus_per_replica=0.5, torch_threads=1)


def tiny_config(in_channels: int = 3) -> ExperimentConfig:
    return replace(ExperimentConfig(), data={"size": SIZE, "in_channels": in_channels},
                   model={"variant": "unet", "unet_width": 8, "unet_depth": 3})


def _training_arrays(root: Path, config: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    slices, _ = discover(root)
    records = slices.to_dict("records")
    images = np.stack([preprocess_image(read_image(r), config.data, r) for r in records])
    masks = np.stack([preprocess_mask(read_mask(r), SIZE) for r in records])
    return images, masks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny U-Net trained for a few epochs on synthetic data (plain torch loop, well under a minute)."""
    work = tmp_path_factory.mktemp("train")
    config = tiny_config()
    images, masks = _training_arrays(generate_dataset(work / "data", patients=6, slices=12, size=SIZE, seed=0),
                                     config)
    torch.manual_seed(0)
    model = create_model(config.model, in_channels=3)
    loss_fn = make_loss("bce_dice")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, targets = torch.from_numpy(images), torch.from_numpy(masks)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core host more threads make each step many times slower
    try:
        for _ in range(10):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(inputs), 8):
                batch = order[start:start + 8]
                optimizer.zero_grad()
                loss_fn(model(inputs[batch]), targets[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return save_checkpoint(work / "checkpoint", model.eval(), config)


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    config = tiny_config()
    return save_checkpoint(tmp_path_factory.mktemp("untrained"), create_model(config.model, 3), config)


def _plant_blob(root: Path) -> tuple[str, int, tuple[slice, slice]]:
    """Copy a tumor, with a margin, to the place inside the head of its own slice farthest from it that no
    tumor of the volume touches: a false positive LCC must remove (the volume's real tumor spans several
    slices, so it is the larger 3D component). Returns (volume_id, slice_index, region of the copy)."""
    slices, _ = discover(root)
    records = slices[slices["has_tumor"]].to_dict("records")
    for record in sorted(records, key=lambda r: read_mask(r).sum()):
        if read_mask(record).sum() < 40:
            continue
        volume = slices[slices["volume_id"] == record["volume_id"]]
        union = np.any([read_mask(r) > 0 for r in volume.to_dict("records")], axis=0)
        rows, cols = np.nonzero(read_mask(record))
        top, left = max(rows.min() - 2, 0), max(cols.min() - 2, 0)
        height, width = min(rows.max() + 3, SIZE) - top, min(cols.max() + 3, SIZE) - left
        image = read_image(record)
        head = image.mean(axis=-1) > 20
        places = [(y, x) for y in range(1, SIZE - height - 1) for x in range(1, SIZE - width - 1)
                  if not union[y - 1:y + height + 1, x - 1:x + width + 1].any()
                  and head[y:y + height, x:x + width].all()]
        if places:
            y, x = max(places, key=lambda p: (p[0] - top) ** 2 + (p[1] - left) ** 2)
            image[y:y + height, x:x + width] = image[top:top + height, left:left + width].copy()
            tifffile.imwrite(record["image_path"], image, photometric="rgb")
            return record["volume_id"], int(record["slice_index"]), (slice(y, y + height), slice(x, x + width))
    raise AssertionError("no tumor-free place inside a head for the planted copy")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, tuple]:
    """Held-out synthetic patients (another seed) with one planted false-positive blob."""
    root = generate_dataset(tmp_path_factory.mktemp("heldout") / "kaggle_3m", patients=3, slices=10,
                            size=SIZE, seed=1)
    return root, _plant_blob(root)


def _truth(root: Path) -> pd.DataFrame:
    slices, _ = discover(root)
    slices["truth"] = [read_mask(r).astype(bool) for r in slices.to_dict("records")]
    return slices


def _pooled_dice(predicted: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """The contract's pooled Dice: every slice's confusion counts summed, then scored once."""
    from raysegm.metrics import confusion_counts, scores

    return scores(sum(confusion_counts(p, t) for p, t in zip(predicted, truth)))["dice"]


def _masks(output: Path) -> pd.DataFrame:
    rows = pd.read_parquet(output)
    rows["mask"] = [decode_mask_png(data) if data is not None else None for data in rows["mask_png"]]
    return rows


@pytest.fixture(scope="module")
def baseline(ray_session, checkpoint, archive, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "masks"
    summary = infer(checkpoint, archive[0], output, SETTINGS, ray_address=None)
    return output, summary


# ---------------------------------------------------------------------------------------------------
# The pieces, without Ray


def test_mask_png_is_8_bit_single_channel_255_tumor():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    data = encode_mask_png(mask)
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(data)) as png:
        assert (png.format, png.mode, png.size) == ("PNG", "L", (7, 5))
        assert set(np.unique(np.asarray(png))) == {0, 255}
    np.testing.assert_array_equal(decode_mask_png(data), mask)


def test_largest_connected_component_keeps_the_biggest_3d_blob():
    masks = np.zeros((4, 10, 10), dtype=bool)
    masks[0:3, 2:5, 2:5] = True  # 27 voxels across three slices
    masks[3, 8:10, 8:10] = True  # 4 voxels, far away
    masks[1, 6, 6] = True  # touches nothing (diagonal neighbours do not count)
    kept = largest_connected_component(masks)
    expected = np.zeros_like(masks)
    expected[0:3, 2:5, 2:5] = True
    np.testing.assert_array_equal(kept, expected)
    assert not (kept & ~masks).any()
    assert not largest_connected_component(np.zeros((2, 3, 3), dtype=bool)).any()
    diagonal = np.zeros((1, 3, 3), dtype=bool)
    diagonal[0, 0, 0] = diagonal[0, 1, 1] = True
    assert largest_connected_component(diagonal).sum() == 1


def test_lcc_by_slices_keeps_the_blob_spanning_most_slices():
    masks = np.zeros((6, 12, 12), dtype=bool)
    masks[1, 0:6, 0:6] = True  # 36 voxels in one slice: the most voxels
    masks[2:5, 8:11, 8:11] = True  # 27 voxels across slices 2-4: the most slices
    masks[0:3, 8, 0] = True  # 3 voxels across slices 0-2: as many slices as the 27, fewer voxels
    tall = np.zeros_like(masks)
    tall[2:5, 8:11, 8:11] = True
    np.testing.assert_array_equal(largest_connected_component(masks, by="slices"), tall)
    wide = np.zeros_like(masks)
    wide[1, 0:6, 0:6] = True
    np.testing.assert_array_equal(largest_connected_component(masks), wide)  # by voxels
    np.testing.assert_array_equal(postprocess_volume(masks, "lcc_slices"), tall)
    twins = np.zeros((2, 5, 5), dtype=bool)
    twins[:, 0, 0] = twins[:, 4, 4] = True  # the same span and voxels: the lowest label stays
    assert largest_connected_component(twins, by="slices")[:, 0, 0].all()
    assert largest_connected_component(twins, by="slices").sum() == 2
    with pytest.raises(ValueError, match="by: unknown 'area'"):
        largest_connected_component(masks, by="area")
    with pytest.raises(ValueError, match=r"postprocess: unknown 'lcc\+lcc'"):
        postprocess_volume(masks, "lcc+lcc")


def test_fill_holes_fills_each_slice_and_never_removes_tumor():
    masks = np.zeros((3, 9, 9), dtype=bool)
    masks[0, 1:6, 1:6] = True
    masks[0, 2:5, 2:5] = False  # a ring around a 3x3 hole
    masks[1, 0:4, 0:4] = True
    masks[1, 0:2, 0:2] = False  # a notch open to the border: not a hole
    masks[2, 2:5, 2:5] = True
    masks[2, 3, 3] = False  # a one-pixel hole
    masks[0, 7, 7] = True  # a speck: left as it is
    filled = fill_holes(masks)
    assert filled[0, 1:6, 1:6].all() and filled[0].sum() == 25 + 1
    np.testing.assert_array_equal(filled[1], masks[1])
    assert filled[2, 2:5, 2:5].all() and filled[2].sum() == 9
    assert not (masks & ~filled).any()
    assert not fill_holes(np.zeros((0, 4, 4), dtype=bool)).size
    diagonal_gap = np.ones((1, 5, 5), dtype=bool)
    diagonal_gap[0, 2, 2] = diagonal_gap[0, 1, 1] = diagonal_gap[0, 0, 0] = False
    # (0, 0) lies on the border; (1, 1) and (2, 2) touch it only diagonally, so they are holes
    expected = np.ones((5, 5), dtype=bool)
    expected[0, 0] = False
    np.testing.assert_array_equal(fill_holes(diagonal_gap)[0], expected)


def test_lcc_then_fill_holes_keeps_the_largest_blob_then_fills_its_holes():
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, 1:8, 1:8] = True
    masks[0, 3:6, 3:6] = False  # a ring of 40 pixels around a 9-pixel hole
    masks[0, 10:19, 10:15] = True  # a solid blob of 45 pixels
    masks[0, 11:13, 11:13] = False  # with a 4-pixel hole: 41 pixels
    expected = np.zeros_like(masks)
    expected[0, 10:19, 10:15] = True  # the blob (41 > 40) kept, then its hole filled
    np.testing.assert_array_equal(postprocess_volume(masks, "lcc+fill_holes"), expected)
    # the other order would fill the ring first (49 > 45) and keep it instead
    assert largest_connected_component(fill_holes(masks))[0, 4, 4]


def test_slices_of_two_sizes_are_post_processed_as_two_volumes():
    small = [np.zeros((8, 8), bool) for _ in range(2)]
    small[0][1:3, 1:3] = small[1][1:3, 1:3] = True  # 8 voxels through both slices
    small[1][6, 6] = True  # 1 voxel
    large = [np.zeros((12, 10), bool)]
    large[0][0, 0] = True  # 1 voxel
    large[0][5:7, 5:7] = True  # 4 voxels: kept, though stacked with the small slices it would lose to their 8
    masks = [small[0], large[0], small[1]]
    kept = postprocess_slices(masks, "lcc")
    assert [mask.shape for mask in kept] == [(8, 8), (12, 10), (8, 8)]
    np.testing.assert_array_equal(kept[0], small[0])
    assert kept[2].sum() == 4 and not kept[2][6, 6]
    assert kept[1].sum() == 4 and not kept[1][0, 0]


def test_committed_volume_has_its_holes_filled_and_error_rows_untouched():
    ring = np.zeros((6, 6), dtype=bool)
    ring[1:5, 1:5] = True
    ring[2:4, 2:4] = False
    rows = pd.DataFrame({
        "slice_index": [2, 1],
        "height": [6, 6], "width": [6, 6],
        "mask_png": [b"", encode_mask_png(ring)],
        "tumor_pixels": [0, int(ring.sum())],
        "status": ["error", "ok"],
        "error": ["x.tif: unreadable", ""],
    })
    finished = _finish_volume(rows, "fill_holes")
    assert finished["slice_index"].tolist() == [1, 2]
    filled = decode_mask_png(finished.loc[0, "mask_png"])
    assert filled[1:5, 1:5].all() and filled.sum() == 16 == finished.loc[0, "tumor_pixels"]
    assert finished.loc[1, "mask_png"] is None and finished.loc[1, "error"] == "x.tif: unreadable"
    assert decode_mask_png(_finish_volume(rows, "none").loc[0, "mask_png"]).sum() == 12


def test_part_names_are_unique_and_parquet_visible():
    names = {part_name(v) for v in ("a/b", "a_b", "TCGA_CS_4942_19970222", "x" * 300)}
    assert len(names) == 4
    assert all(n.startswith("part-") and n.endswith(".parquet") and "/" not in n for n in names)


def test_rejects_become_error_rows_on_the_slice_discovery_numbered(tmp_path):
    import nibabel as nib
    import tifffile
    from PIL import Image

    from raysegm.data.discover import discover

    root = tmp_path / "archive"
    image, small = np.full((16, 16), 90, np.uint8), np.zeros((8, 8), np.uint8)
    kaggle = root / "TCGA_CS_4942_19970222"
    kaggle.mkdir(parents=True)
    for k in (1, 2, 3):
        tifffile.imwrite(kaggle / f"{kaggle.name}_{k}.tif", np.stack([image] * 3, -1), photometric="rgb")
        tifffile.imwrite(kaggle / f"{kaggle.name}_{k}_mask.tif", np.zeros((16, 16), np.uint8))
    (kaggle / f"{kaggle.name}_2.tif").write_bytes(b"not a tif")
    tifffile.imwrite(kaggle / f"{kaggle.name}_3_mask.tif", small)  # a bad mask takes slice 3 out
    scans = root / "scans" / "patient3"  # numbered by position: localizer.png has no number
    scans.mkdir(parents=True)
    for name in ("IM_0001", "IM_0002", "IM_0003", "localizer"):
        Image.fromarray(image).save(scans / f"{name}.png")
    Image.fromarray(small).save(scans / "IM_0002_mask.png")  # slice 1 (by position), not 2
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(scans / "IM_0003_mask.png")
    Image.fromarray(small).save(scans / "IM_0003_mask.tif")  # a second mask: slice 2 keeps its first
    (scans / "notes.bin").write_bytes(b"\x00")
    site = root / "site" / "AB_cd_ef"  # named like a kaggle_3m folder, but its files are not
    site.mkdir(parents=True)
    Image.fromarray(image).save(site / "img_1.png")
    (site / "img_2.png").write_bytes(b"not a png")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), root / "CASE_002_0001.nii.gz")
    (root / "CASE_002_seg.nii").write_bytes(b"not nifti")

    slices, rejects = discover(root)
    errors = _error_rows(rejects, slices, root.resolve(), "archive", "m")
    found = {(v, int(k)): source for v, k, source in zip(errors["volume_id"], errors["slice_index"], errors["source"])}
    assert found == {
        (kaggle.name, 2): f"archive/{kaggle.name}/{kaggle.name}_2.tif",
        (kaggle.name, 3): f"archive/{kaggle.name}/{kaggle.name}_3_mask.tif",
        ("scans/patient3", 1): "archive/scans/patient3/IM_0002_mask.png",
        ("scans/patient3", -1): "archive/scans/patient3/notes.bin",
        ("site/AB_cd_ef", 2): "archive/site/AB_cd_ef/img_2.png",
        ("CASE_002", -1): "archive/CASE_002_0001.nii.gz",
    }
    # every slice discovery left out has its row, and no row doubles a slice that is segmented
    kept = set(zip(slices["volume_id"], slices["slice_index"].astype(int)))
    assert not kept & {key for key in found if key[1] >= 0}
    assert set(slices.loc[slices["volume_id"] == "scans/patient3", "slice_index"]) == {0, 2, 3}
    assert "IM_0003_mask.tif" in rejects["path"].str.rsplit("/", n=1).str[1].tolist()
    case = errors.set_index("volume_id").loc["CASE_002", "error"]
    assert "CASE_002_seg.nii" in case and "CASE_002_0001.nii.gz" in case  # one row for the case, both named


def _batch(images, sizes, status=None):
    count = len(images)
    return {
        "image": images.astype(np.float32),
        "height": np.array([s[0] for s in sizes], dtype=np.int32),
        "width": np.array([s[1] for s in sizes], dtype=np.int32),
        "status": np.array(status or ["ok"] * count),
        "error": np.array([""] * count),
        "volume_id": np.array(["v"] * count),
        "slice_index": np.arange(count, dtype=np.int32),
        "source": np.array([f"/x/v_{i}.tif" for i in range(count)]),
    }


def _assert_mask_is(mask: np.ndarray, probs: torch.Tensor) -> None:
    """mask == probs > 0.5 wherever a float32 rounding difference could not flip the pixel."""
    decided = (probs - 0.5).abs().numpy() > 1e-5
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(mask[decided], (probs > 0.5).numpy()[decided])


def test_predictor_without_ray_matches_the_model_by_hand(archive, tmp_path):
    images, _ = _training_arrays(archive[0], tiny_config())
    images = images[:4]
    torch.manual_seed(1)
    model = create_model(tiny_config().model, 3).eval()
    with torch.no_grad():  # logits centred and spread: about half of the pixels tumor, few near 0.5
        model.head.bias -= model(torch.from_numpy(images)).median()
        model.head.weight *= 300
        model.head.bias *= 300
        probs = torch.sigmoid(model(torch.from_numpy(images)))[:, 0]
        flipped = torch.flip(torch.sigmoid(model(torch.flip(torch.from_numpy(images), dims=[-1]))), dims=[-1])[:, 0]
    centred = save_checkpoint(tmp_path / "centred", model, tiny_config())
    assert 0.2 < float((probs > 0.5).float().mean()) < 0.8
    predictor = SegmentationPredictor(centred, InferSettings(), device="cpu")
    rows = predictor(_batch(images, [(SIZE, SIZE)] * 3 + [(100, 80)], status=["ok", "ok", "error", "ok"]))
    assert list(rows.columns) == SCHEMA.names
    assert (rows["model"] == model_id(centred)).all()
    for i in (0, 1):
        mask = decode_mask_png(rows["mask_png"][i])
        _assert_mask_is(mask, probs[i])
        assert rows["tumor_pixels"][i] == mask.sum()
        assert rows["max_prob"][i] == pytest.approx(float(probs[i].max()), abs=1e-5)
    assert rows["mask_png"][2] == b"" and np.isnan(rows["max_prob"][2]) and rows["status"][2] == "error"
    # back at the slice's own size: the probabilities resized (bilinear), then thresholded
    resized = torch.nn.functional.interpolate(probs[3][None, None], size=(100, 80), mode="bilinear")[0, 0]
    _assert_mask_is(decode_mask_png(rows["mask_png"][3]), resized)

    tta = SegmentationPredictor(centred, {**InferSettings().__dict__, "tta": True}, device="cpu")
    rows = tta(_batch(images[:1], [(SIZE, SIZE)]))
    averaged = (probs[0] + flipped[0]) / 2
    assert ((averaged > 0.5) != (probs[0] > 0.5)).float().mean() > 0.01  # the flip changes the mask
    _assert_mask_is(decode_mask_png(rows["mask_png"][0]), averaged)


def test_predictor_on_an_ensemble_checkpoint_averages_its_members(untrained_checkpoint, checkpoint, archive, tmp_path):
    images, _ = _training_arrays(archive[0], tiny_config())
    images = images[:3]
    with torch.no_grad():
        probs = sum(torch.sigmoid(load_model(member)[0](torch.from_numpy(images)))[:, 0]
                    for member in (checkpoint, untrained_checkpoint)) / 2
    ensemble = save_ensemble(tmp_path / "ensemble", [checkpoint, untrained_checkpoint])
    rows = SegmentationPredictor(ensemble, InferSettings(), device="cpu")(_batch(images, [(SIZE, SIZE)] * 3))
    assert (rows["model"] == model_id(ensemble)).all() and model_id(ensemble) != model_id(checkpoint)
    for i in range(3):
        _assert_mask_is(decode_mask_png(rows["mask_png"][i]), probs[i])
        assert rows["max_prob"][i] == pytest.approx(float(probs[i].max()), abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predictor_cuda_agrees_with_cpu(checkpoint, archive):
    images, _ = _training_arrays(archive[0], tiny_config())
    batch = _batch(images, [(SIZE, SIZE)] * len(images))
    cpu = SegmentationPredictor(checkpoint, InferSettings(), device="cpu")(batch)
    for precision in ("fp32", "auto"):
        gpu = SegmentationPredictor(checkpoint, InferSettings(precision=precision), device="cuda")(batch)
        cpu_masks = np.stack([decode_mask_png(d) for d in cpu["mask_png"]])
        gpu_masks = np.stack([decode_mask_png(d) for d in gpu["mask_png"]])
        assert (cpu_masks != gpu_masks).mean() < (1e-5 if precision == "fp32" else 1e-3)


def test_a_run_folder_stands_for_its_best_checkpoint(untrained_checkpoint, tmp_path):
    from raysegm.infer import _read_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")  # a run's config, not a checkpoint's
    (run_dir / "result.json").write_text(json.dumps({"best_checkpoint": str(untrained_checkpoint)}))
    assert _read_checkpoint(str(run_dir)) == _read_checkpoint(str(untrained_checkpoint))
    (run_dir / "result.json").write_text(json.dumps({"best_checkpoint": None}))
    with pytest.raises(ValueError, match="names no best checkpoint"):
        _read_checkpoint(str(run_dir))
    (run_dir / "result.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"run has no model.safetensors \(or model.pt\)$"):
        _read_checkpoint(str(run_dir))
    (run_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config.json and no model.safetensors \(or model.pt\)$"):
        _read_checkpoint(str(run_dir))


def test_a_uri_input_is_staged_under_its_own_name_flat_or_nested(tmp_path):
    """A flat folder of images (no subfolder) copies, and its volume_id is the folder's name as for a path."""
    root = tmp_path / "scans"
    (root / "a_sub").mkdir(parents=True)
    for folder in (root, root / "a_sub"):
        for k in range(3):
            Image.fromarray(np.full((8, 8), 10 * k, np.uint8)).save(folder / f"img_{k}.png")
    for input_root in (root / "a_sub", root):  # flat, then nested
        local, prefix = _stage(str(input_root), tmp_path / "unused")
        staged, uri = _stage(input_root.as_uri() + "/", tmp_path / f"staging-{input_root.name}")
        assert (prefix, uri) == (str(input_root), input_root.as_uri())
        by_path, by_uri = discover(local)[0], discover(staged)[0]
        assert len(by_path) == len(by_uri) > 0
        assert by_uri["volume_id"].tolist() == by_path["volume_id"].tolist()
        assert [Path(p).relative_to(staged) for p in by_uri["image_path"]] == \
            [Path(p).relative_to(local) for p in by_path["image_path"]]


def test_read_stage_turns_an_unreadable_file_into_an_error_row(tmp_path, archive):
    slices, _ = discover(archive[0])
    rows = slices.head(2).copy()
    rows["source"] = rows["image_path"]
    broken = tmp_path / "broken_1.tif"
    broken.write_bytes(b"not a tif at all")
    rows.loc[rows.index[1], ["image_path", "source"]] = str(broken)
    batch = read_slices(rows, tiny_config().data.__dict__)
    assert batch["image"].shape == (2, 3, SIZE, SIZE)
    assert list(batch["status"]) == ["ok", "error"]
    assert str(broken) in batch["error"][1] and "unreadable tif" in batch["error"][1]
    assert batch["image"][0].max() > 0 and batch["error"][0] == ""


def test_a_2_5d_row_whose_neighbour_is_unreadable_names_the_neighbour(tmp_path):
    root = generate_dataset(tmp_path / "kaggle_3m", patients=1, slices=4, size=SIZE, seed=6)
    slices, _ = discover(root)
    rows = with_context(slices.sort_values("slice_index").reset_index(drop=True), 1)
    rows["source"] = rows["image_path"]
    neighbour = Path(rows["image_path"].iloc[2])
    neighbour.write_bytes(b"not a tif at all")
    data = replace(tiny_config(), data={"context_slices": 1}).data.__dict__
    batch = read_slices(rows, data)
    assert list(batch["status"]) == ["ok", "error", "error", "error"]  # slices 2, 3, 4 read slice 3
    for k in (1, 3):
        assert batch["error"][k].startswith(f"{rows['source'].iloc[k]}: its neighbour slice {neighbour}: ")
        assert "unreadable tif" in batch["error"][k]
    assert batch["error"][2] == f"{neighbour}: " + batch["error"][2].split(": ", 1)[1]  # its own file
    assert "neighbour" not in batch["error"][2]


# ---------------------------------------------------------------------------------------------------
# Ray Data runs


@pytest.mark.slow
def test_infer_writes_one_row_per_slice_in_the_contract_schema(baseline, archive, checkpoint):
    output, summary = baseline
    truth = _truth(archive[0])
    rows = _masks(output)
    assert len(rows) == len(truth) == summary["slices"] == summary["ok"]
    assert summary["errors"] == 0 and summary["volumes_written"] == 3
    assert not rows.duplicated(["volume_id", "slice_index"]).any()
    schema = pads.dataset(output, format="parquet").schema
    for field in SCHEMA:
        assert schema.field(field.name).type == field.type, field.name
    assert schema.field("mask_png").type == pa.binary() and schema.field("slice_index").type == pa.int32()
    assert (rows["model"] == model_id(checkpoint)).all() and (rows["status"] == "ok").all()
    assert rows["error"].isna().all()
    merged = truth.merge(rows, on=["volume_id", "slice_index"], suffixes=("_in", ""))
    assert len(merged) == len(truth)
    assert all(m.shape == t.shape == (h, w) for m, t, h, w in
               zip(merged["mask"], merged["truth"], merged["height"], merged["width"]))
    assert (merged["tumor_pixels"] == [int(m.sum()) for m in merged["mask"]]).all()
    assert merged["source"].tolist() == merged["image_path"].tolist()
    dice = _pooled_dice(list(merged["mask"]), list(merged["truth"]))
    empty = _pooled_dice([np.zeros_like(t) for t in merged["truth"]], list(merged["truth"]))
    assert empty == 0.0 and dice > 0.5, dice


@pytest.mark.slow
def test_rerun_skips_committed_volumes(baseline, archive, checkpoint):
    output, _ = baseline
    before = sorted(p.name for p in output.iterdir())
    summary = infer(checkpoint, archive[0], output, SETTINGS)
    assert summary["volumes_skipped"] == 3 and summary["slices"] == 0
    assert sorted(p.name for p in output.iterdir()) == before


@pytest.mark.slow
def test_lcc_removes_the_planted_blob_and_never_adds_tumor(ray_session, baseline, archive, checkpoint, tmp_path):
    volume_id, slice_index, region = archive[1]
    plain = _masks(baseline[0]).set_index(["volume_id", "slice_index"])
    summary = infer(checkpoint, archive[0], tmp_path / "lcc", SETTINGS, postprocess="lcc")
    assert summary["ok"] == len(plain)
    lcc = _masks(tmp_path / "lcc").set_index(["volume_id", "slice_index"])
    planted = plain.loc[(volume_id, slice_index), "mask"][region]
    assert planted.sum() >= 10, "the model should take the planted copy of a tumor for tumor"
    assert lcc.loc[(volume_id, slice_index), "mask"][region].sum() == 0
    assert lcc.loc[(volume_id, slice_index), "tumor_pixels"] > 0  # the real tumor stays
    for key, row in lcc.iterrows():
        assert not (row["mask"] & ~plain.loc[key, "mask"]).any()
        assert row["tumor_pixels"] == row["mask"].sum() <= plain.loc[key, "tumor_pixels"]


@pytest.mark.slow
def test_tta_run_from_and_to_uris(ray_session, archive, checkpoint, tmp_path):
    source_uri = Path(archive[0]).resolve().as_uri()
    output_uri = (tmp_path / "tta").as_uri()
    # infer.tta from the settings (a preset's infer: tta: true); the tta= argument is None: "the config's"
    summary = infer(checkpoint, source_uri, output_uri, dataclasses.replace(SETTINGS, tta=True))
    rows = _masks(tmp_path / "tta")
    truth = _truth(archive[0])
    assert summary["ok"] == len(rows) == len(truth)
    assert rows["source"].str.startswith(source_uri + "/").all()
    merged = truth.merge(rows, on=["volume_id", "slice_index"])
    assert _pooled_dice(list(merged["mask"]), list(merged["truth"])) > 0.5
    assert '"tta": true' in (tmp_path / "tta" / METADATA).read_text()
    # the masks are the flip average, recomputed by hand, on every slice (discovery's order)
    images, _ = _training_arrays(archive[0], tiny_config())
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        x = torch.from_numpy(images)
        flipped = torch.flip(torch.sigmoid(model(torch.flip(x, dims=[-1]))), dims=[-1])
        probs = (torch.sigmoid(model(x)) + flipped)[:, 0] / 2
    by_slice = rows.set_index(["volume_id", "slice_index"])
    for i, key in enumerate(zip(truth["volume_id"], truth["slice_index"])):
        _assert_mask_is(by_slice.loc[key, "mask"], probs[i])


@pytest.mark.slow
def test_the_cli_infers_with_the_checkpoints_own_choices_unless_the_config_says(ray_session, untrained_checkpoint,
                                                                                tmp_path, capsys):
    from raysegm.cli import main
    from raysegm.infer import saved_infer_choices

    model, config = load_model(untrained_checkpoint)
    preset = save_checkpoint(tmp_path / "preset", model, replace(config, infer={"tta": True, "postprocess": "lcc"}))
    run_dir = tmp_path / "run"  # a run folder stands for its best checkpoint
    run_dir.mkdir()
    (run_dir / "result.json").write_text(json.dumps({"best_checkpoint": str(preset)}))
    assert saved_infer_choices(run_dir) == saved_infer_choices(preset) == {"tta": True, "postprocess": "lcc"}
    assert saved_infer_choices(tmp_path / "absent") == {}
    root = generate_dataset(tmp_path / "kaggle_3m", patients=1, slices=4, size=SIZE, seed=7)
    how = ["--set", "infer.batch_size=8", "--set", "infer.cpus_per_replica=0.5", "--set", "infer.torch_threads=1"]
    preset_yaml = tmp_path / "no-tta.yaml"
    preset_yaml.write_text("infer:\n  tta: false\n")
    for name, extra, expected in (
        ("saved", [], (True, "lcc")),  # nothing said: the checkpoint's
        ("yaml", ["--config", str(preset_yaml)], (False, "lcc")),  # the preset's tta, the checkpoint's lcc
        ("set", ["--set", "infer.postprocess=fill_holes"], (True, "fill_holes")),
        ("flags", ["--no-tta", "--postprocess", "none"], (False, "none")),
    ):
        output = tmp_path / name
        assert main(["infer", "--checkpoint", str(run_dir), "--input", str(root), "--output", str(output),
                     *how, *extra]) == 0, capsys.readouterr().err
        settings = json.loads((output / METADATA).read_text())["settings"]
        assert (settings["tta"], settings["postprocess"]) == expected, name
        assert len(pd.read_parquet(output)) == 4


def test_bad_files_become_error_rows_and_the_rest_flows(ray_session, untrained_checkpoint, tmp_path):
    root = generate_dataset(tmp_path / "kaggle_3m", patients=2, slices=6, size=SIZE, seed=3)
    good, _ = discover(root)
    volume = good["volume_id"].iloc[0]
    folder = root / volume
    truncated = folder / f"{volume}_2.tif"
    truncated.write_bytes(truncated.read_bytes()[:-4000])
    empty = folder / f"{volume}_3.tif"
    empty.write_bytes(b"")
    garbage = folder / f"{volume}_4.tif"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    notes = folder / "scanner-notes.bin"
    notes.write_bytes(b"\x00\x01")
    summary = infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)
    rows = pd.read_parquet(tmp_path / "out")
    assert len(rows) == len(good) + 1 and summary["errors"] == 4 and summary["ok"] == len(good) - 3
    errors = rows[rows["status"] == "error"].set_index("slice_index")
    assert set(errors.index) == {2, 3, 4, -1} and (errors["volume_id"] == volume).all()
    for k, path, reason in ((2, truncated, "truncated"), (3, empty, "empty"), (4, garbage, "unreadable"),
                            (-1, notes, "unsupported")):
        assert str(path) in errors.loc[k, "error"] and reason in errors.loc[k, "error"], errors.loc[k, "error"]
        assert errors.loc[k, "source"] == str(path) and errors.loc[k, "mask_png"] is None
    ok = rows[rows["status"] == "ok"]
    bad = {(volume, 2), (volume, 3), (volume, 4)}
    expected = {key for key in zip(good["volume_id"], good["slice_index"]) if key not in bad}
    assert set(zip(ok["volume_id"], ok["slice_index"])) == expected
    assert ok["mask_png"].notna().all() and ok["error"].isna().all()


def test_rerun_redoes_a_volume_whose_files_changed_and_names_one_no_longer_there(ray_session, untrained_checkpoint,
                                                                                tmp_path):
    root = generate_dataset(tmp_path / "kaggle_3m", patients=3, slices=4, size=SIZE, seed=5)
    changed, kept, gone = sorted(p.name for p in root.iterdir() if p.is_dir())
    broken = root / changed / f"{changed}_2.tif"
    whole = broken.read_bytes()
    broken.write_bytes(whole[:-2000])
    first = infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)
    assert first["errors"] == 1 and first["volumes_written"] == 3
    kept_part = (tmp_path / "out" / part_name(kept)).read_bytes()

    broken.write_bytes(whole)  # the file fixed, another volume taken out of the archive
    shutil.rmtree(root / gone)
    second = infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)
    assert (second["volumes_changed"], second["volumes_skipped"], second["volumes_not_in_input"]) == (1, 1, 1)
    assert second["volumes_written"] == 1 and (second["ok"], second["errors"]) == (4, 0)
    assert (tmp_path / "out" / part_name(kept)).read_bytes() == kept_part  # untouched
    rows = pd.read_parquet(tmp_path / "out")
    assert not rows.duplicated(["volume_id", "slice_index"]).any()
    assert (rows.loc[rows["volume_id"] == changed, "status"] == "ok").sum() == 4
    assert (rows["volume_id"] == gone).sum() == 4  # its part is kept, and said so

    third = infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)
    assert (third["volumes_changed"], third["volumes_skipped"], third["volumes_written"]) == (0, 2, 0)

    # a part from before parts recorded their input is kept as it is, whatever its files now hold
    old_part = pd.read_parquet(tmp_path / "out" / part_name(kept))
    OutputFolder(str(tmp_path / "out")).commit(kept, old_part)  # no fingerprint
    (root / kept / f"{kept}_1.tif").write_bytes(b"changed since")
    fourth = infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)
    assert (fourth["volumes_changed"], fourth["volumes_written"]) == (0, 0)


def test_rerun_redoes_a_volume_whose_part_holds_error_rows_on_unchanged_input(ray_session, untrained_checkpoint,
                                                                             tmp_path, capsys):
    """A read or a prediction that fails once (a network mount, a GPU out of memory) leaves error rows in a
    part whose input fingerprint is that of the input as it is: the rerun must do the volume again."""
    root = generate_dataset(tmp_path / "kaggle_3m", patients=2, slices=4, size=SIZE, seed=7)
    flaky, steady = sorted(p.name for p in root.iterdir() if p.is_dir())
    broken = root / flaky / f"{flaky}_2.tif"
    whole = broken.read_bytes()
    broken.write_bytes(whole[:-2000])
    first = infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)
    assert (first["ok"], first["errors"], first["volumes_written"]) == (7, 1, 2)
    failed = pd.read_parquet(tmp_path / "out" / part_name(flaky))
    assert failed.set_index("slice_index").loc[2, "status"] == "error"

    broken.write_bytes(whole)  # repaired; the part as a transient failure leaves it: the input's fingerprint now
    slices, rejects = discover(root)
    OutputFolder(str(tmp_path / "out")).commit(flaky, failed, volume_fingerprints(slices, rejects, root)[flaky])
    steady_part = (tmp_path / "out" / part_name(steady)).read_bytes()
    capsys.readouterr()
    second = infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)
    assert "1 committed volumes hold error rows and are done again: " + flaky in capsys.readouterr().out
    assert (second["volumes_retried"], second["volumes_changed"], second["volumes_skipped"]) == (1, 0, 1)
    assert (second["volumes_written"], second["ok"], second["errors"]) == (1, 4, 0)
    rows = pd.read_parquet(tmp_path / "out")
    assert len(rows) == 8 and (rows["status"] == "ok").all() and rows["error"].isna().all()
    assert not rows.duplicated(["volume_id", "slice_index"]).any()
    assert (tmp_path / "out" / part_name(steady)).read_bytes() == steady_part  # untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([METADATA, part_name(flaky),
                                                                         part_name(steady)])
    third = infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)
    assert (third["volumes_retried"], third["volumes_skipped"], third["volumes_written"]) == (0, 2, 0)


def test_replicas_compute_on_the_device_ray_gives_them_and_the_output_records_it(untrained_checkpoint):
    """Ray 2.60 leaves a node's GPUs visible to an actor given none: the driver names the replicas'
    device, so a CPU replica on a GPU node runs fp32 on the CPU, as `_raysegm.json` says."""
    files = _read_checkpoint(str(untrained_checkpoint))
    for gpus, precision, device, arithmetic in ((0, "auto", "cpu", "fp32"), (0, "fp32", "cpu", "fp32"),
                                                (1, "auto", "cuda", "bf16"), (0.5, "fp32", "cuda", "fp32")):
        settings = InferSettings(gpus_per_replica=gpus, precision=precision)
        kwargs = predictor_kwargs(files, settings)
        assert (kwargs["device"], arithmetic_of(settings)) == (device, arithmetic), (gpus, precision)
        assert kwargs["settings"]["precision"] == precision and kwargs["checkpoint"] is files
    predictor = SegmentationPredictor(**predictor_kwargs(files, SETTINGS))
    assert predictor.device.type == "cpu" and predictor.autocast_dtype is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_replicas_on_a_gpu_node_compute_in_fp32_on_the_cpu(ray_session, checkpoint, archive, tmp_path):
    """Real Ray on a GPU node, replicas given no GPU: the probabilities are the CPU's fp32 ones, not bf16."""
    summary = infer(checkpoint, archive[0], tmp_path / "out", SETTINGS)
    assert json.loads((tmp_path / "out" / METADATA).read_text())["arithmetic"] == "fp32"
    rows = pd.read_parquet(tmp_path / "out").sort_values(["volume_id", "slice_index"]).reset_index(drop=True)
    slices, _ = discover(archive[0])
    slices = slices.sort_values(["volume_id", "slice_index"]).reset_index(drop=True)
    slices["source"] = slices["image_path"]
    cpu = SegmentationPredictor(checkpoint, SETTINGS, device="cpu")(read_slices(slices, tiny_config().data.__dict__))
    assert summary["ok"] == len(rows) == len(cpu)
    np.testing.assert_allclose(rows["max_prob"], cpu["max_prob"], atol=1e-5)  # bf16 differs by ~1e-3


def test_a_checkpoint_whose_input_settings_changed_is_refused_on_its_output(ray_session, untrained_checkpoint,
                                                                             tmp_path):
    """The model id hashes the weights only: an edited config.json (size, normalize, ...) would silently mix
    two preprocessings in one output."""
    root = generate_dataset(tmp_path / "kaggle_3m", patients=1, slices=2, size=SIZE, seed=8)
    infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)
    metadata = json.loads((tmp_path / "out" / METADATA).read_text())
    assert metadata["arithmetic"] == "fp32"
    assert metadata["data"] == {"size": SIZE, "in_channels": 3, "context_slices": 0, "normalize": "scale",
                                "clip_percentiles": [0.5, 99.5]}
    for key, value, message in (
        ("size", 48, r"data\.size=64, checkpoint .*edited now says data\.size=48"),
        ("normalize", "volume_zscore", r"data\.normalize='scale', checkpoint .* now says data\.normalize='volume_zscore'"),
        ("clip_percentiles", [1.0, 99.0], r"data\.clip_percentiles=\[0\.5, 99\.5\], .* says .*=\[1\.0, 99\.0\]"),
    ):
        edited = tmp_path / "edited"
        shutil.rmtree(edited, ignore_errors=True)
        shutil.copytree(untrained_checkpoint, edited)
        config = json.loads((edited / "config.json").read_text())
        config["data"][key] = value
        config.update({key: value} if key in config else {})  # the summary's copy at the top level
        (edited / "config.json").write_text(json.dumps(config))
        assert model_id(edited) == model_id(untrained_checkpoint)
        with pytest.raises(ValueError, match=message):
            infer(edited, root, tmp_path / "out", SETTINGS)
    assert infer(untrained_checkpoint, root, tmp_path / "out", SETTINGS)["volumes_skipped"] == 1


def test_fingerprints_cover_joined_and_unreadable_rejects(tmp_path):
    import nibabel

    root = tmp_path / "in"
    for folder in ("a", "b"):  # one case twice: the second copy is rejected, its modality paths joined
        (root / folder).mkdir(parents=True)
        for k in range(3):
            nibabel.save(nibabel.Nifti1Image(np.full((8, 8, 2), k + 1, np.int16), np.eye(4)),
                         root / folder / f"CASE1_000{k}.nii.gz")
    (root / "c").mkdir()
    (root / "c" / "CASE2_0001.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")  # a broken link
    slices, rejects = discover(root)
    assert any("|" in str(path) for path in rejects["path"]), rejects
    first = volume_fingerprints(slices, rejects, root)
    assert set(first) == {"CASE1", "CASE2"}
    assert volume_fingerprints(slices, rejects, root) == first
    nibabel.save(nibabel.Nifti1Image(np.full((8, 8, 2), 9, np.int16), np.eye(4)), root / "b" / "CASE1_0002.nii.gz")
    assert volume_fingerprints(slices, rejects, root)["CASE1"] != first["CASE1"]  # the rejected copy counts


def test_output_of_another_checkpoint_or_other_settings_is_an_error(archive, untrained_checkpoint, tmp_path):
    settings = {"tta": False, "postprocess": "none", "threshold": 0.5, "precision": "auto"}
    OutputFolder(str(tmp_path / "other")).open({"model": "0123456789abcdef", "checkpoint": "elsewhere",
                                                 "settings": settings})
    with pytest.raises(ValueError, match="holds the output of model 0123456789abcdef"):
        infer(untrained_checkpoint, archive[0], tmp_path / "other", SETTINGS)
    OutputFolder(str(tmp_path / "same")).open({"model": model_id(untrained_checkpoint), "checkpoint": "c",
                                                "settings": settings})
    with pytest.raises(ValueError, match="tta=False"):
        infer(untrained_checkpoint, archive[0], tmp_path / "same", SETTINGS, tta=True)
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == [METADATA]
    # bf16 masks (precision auto on GPU replicas) and fp32 ones (CPU) may differ in a few pixels: not mixed
    OutputFolder(str(tmp_path / "gpu")).open({"model": model_id(untrained_checkpoint), "checkpoint": "c",
                                               "input": str(Path(archive[0]).resolve()), "arithmetic": "bf16",
                                               "settings": settings})
    with pytest.raises(ValueError, match="its masks were computed in bf16, this run computes in fp32"):
        infer(untrained_checkpoint, archive[0], tmp_path / "gpu", SETTINGS)
    # another archive into the same folder: its volumes of committed names would be skipped, so refused
    model = {"model": "0123456789abcdef", "checkpoint": "c", "settings": settings}
    OutputFolder(str(tmp_path / "one")).open({**model, "input": "/archive/a"})
    assert OutputFolder(str(tmp_path / "one")).open({**model, "input": "/archive/a"}) == set()
    with pytest.raises(ValueError, match="holds the masks of input /archive/a, not of /archive/b"):
        OutputFolder(str(tmp_path / "one")).open({**model, "input": "/archive/b"})


@pytest.mark.parametrize(("changes", "message"), [
    ({"torch_threads": 0}, "infer.torch_threads must be at least 1, got 0"),
    ({"replicas": 0}, "infer.replicas must be at least 1, got 0"),
    ({"read_cpus": 0.0}, "infer.read_cpus must be above 0, got 0.0"),
    ({"threshold": 1.0}, r"infer.threshold must be in \[0, 1\), got 1.0"),
])
def test_inference_settings_that_cannot_work_are_refused_before_any_output(untrained_checkpoint, archive, tmp_path,
                                                                          changes, message):
    with pytest.raises(ValueError, match=message):
        infer(untrained_checkpoint, archive[0], tmp_path / "out", InferSettings(**changes))
    assert not (tmp_path / "out").exists()


def test_channel_mismatch_is_an_error(archive, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(in_channels=1)
    single = save_checkpoint(tmp_path / "single", create_model(config.model, in_channels=1), config)
    with pytest.raises(ValueError, match=r"\[3\] channels but checkpoint .* trained on 1"):
        infer(single, archive[0], tmp_path / "out", SETTINGS)
    assert not (tmp_path / "out").exists()
    # a grayscale file is not copied into the three channels a 3-channel model takes
    from PIL import Image

    gray = tmp_path / "gray" / "case"
    gray.mkdir(parents=True)
    Image.fromarray(np.full((SIZE, SIZE), 90, np.uint8)).save(gray / "img_1.png")
    torch.manual_seed(0)
    three = save_checkpoint(tmp_path / "three", create_model(tiny_config().model, in_channels=3), tiny_config())
    with pytest.raises(ValueError, match=r"1 slices have \[1\] channels but checkpoint .* trained on 3 "
                                         r"\(e.g. .*img_1.png\)"):
        infer(three, gray.parent, tmp_path / "out", SETTINGS)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_an_inference_output_is_refused(archive, untrained_checkpoint, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.csv").write_text("a\n")
    with pytest.raises(ValueError, match="not a raysegm inference output"):
        infer(untrained_checkpoint, archive[0], tmp_path / "other", SETTINGS)


# ---------------------------------------------------------------------------------------------------
# Killed and run again, on a private cluster


def _parts(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet")) if output.is_dir() else []


@pytest.mark.slow
def test_killed_job_rerun_gives_every_slice_exactly_once(tmp_path):
    from raycluster import LocalRayCluster

    # a wider model at 128 px and one slice per batch: each volume takes long enough that the kill lands
    # between the first and the last commit
    config = replace(ExperimentConfig(), data={"size": 128}, model={"variant": "unet", "unet_width": 16})
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", create_model(config.model, 3), config)
    root = generate_dataset(tmp_path / "kaggle_3m", patients=10, slices=8, size=128, seed=4)
    output = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--input", str(root), "--output", str(output),
            "--set", "infer.batch_size=1", "--set", "infer.torch_threads=1"]
    with LocalRayCluster(head_cpus=2) as cluster:
        driver = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "infer.py"), *args], env=cluster.env,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while not _parts(output) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        log = driver.communicate()[0]
        committed = _parts(output)
        assert 1 <= len(committed) < 10, f"kill one part in, not after all of them:\n{log[-3000:]}"
        assert driver.returncode == -signal.SIGKILL
        visible = pd.read_parquet(output)  # readable at once: no partial file under a final name
        assert len(visible) == 8 * len(committed)
        (output / f"{TEMP_PREFIX}leftover-part-x.parquet").write_bytes(b"half a file")

        rerun = subprocess.run([sys.executable, "-m", "raysegm", "infer", *args], env=cluster.env, cwd=ROOT,
                               capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{len(committed)} already committed" in rerun.stdout
    rows = pd.read_parquet(output)
    good, _ = discover(root)
    assert len(rows) == len(good) == 80 and (rows["status"] == "ok").all()
    assert not rows.duplicated(["volume_id", "slice_index"]).any()
    assert set(zip(rows["volume_id"], rows["slice_index"])) == set(zip(good["volume_id"], good["slice_index"]))
    assert not [p for p in output.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(_parts(output)) == 10 and (output / METADATA).is_file()
    shutil.rmtree(output)


@pytest.mark.slow
def test_a_uri_input_is_read_on_a_driver_node_that_offers_no_cpus(untrained_checkpoint, tmp_path):
    """cluster.yaml's head offers no CPUs to tasks and runs the job drivers. A URI input is staged on the
    driver's node and read there, so its reads must not wait for CPUs that node will never offer."""
    from raycluster import LocalRayCluster

    root = generate_dataset(tmp_path / "kaggle_3m", patients=2, slices=4, size=SIZE, seed=5)
    output = tmp_path / "out"
    with LocalRayCluster(head_cpus=0) as cluster:
        cluster.add_node("worker", num_cpus=2)
        proc = subprocess.run([sys.executable, "-m", "raysegm", "infer", "--checkpoint", str(untrained_checkpoint),
                               "--input", root.as_uri(), "--output", str(output)],
                              env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "URI inputs are staged locally" in proc.stdout
    rows = pd.read_parquet(output)
    assert len(rows) == 8 and (rows["status"] == "ok").all()
    assert rows["source"].str.startswith(root.as_uri().rstrip("/") + "/").all()


def test_source_names_a_symlinked_patient_by_its_place_in_the_input(tmp_path):
    # a subset made of links to an archive's patient folders: rows name the link, under the input
    from raysegm.infer import _source

    archive = tmp_path / "archive" / "TCGA_XX_1234_20000101"
    archive.mkdir(parents=True)
    (archive / "TCGA_XX_1234_20000101_1.tif").write_bytes(b"")
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / archive.name).symlink_to(archive, target_is_directory=True)
    root = subset.resolve()
    linked = root / archive.name / "TCGA_XX_1234_20000101_1.tif"
    assert _source(str(linked), root, "/data/subset") == "/data/subset/TCGA_XX_1234_20000101/TCGA_XX_1234_20000101_1.tif"
    # the archive's own path, as a resolved path would name it, lies outside the input: kept as it is
    assert _source(str(linked.resolve()), root, "in") == str(linked.resolve())
    assert _source("/elsewhere/x.tif", root, "in") == "/elsewhere/x.tif"
