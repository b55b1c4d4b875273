"""Discovery, validation, splits and the manifest, on the LGG sample, planted faults, images and NIfTI."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from raysegm.config import DataSettings
from raysegm.data.discover import (
    MANIFEST_COLUMNS,
    assign_splits,
    discover,
    load_manifest,
    manifest_for,
    manifest_settings,
    prepare,
)
from raysegm.data.io import DataError, read_image, read_mask

# ---------------------------------------------------------------------------------------------------
# the shared LGG sample


@pytest.fixture(scope="module")
def lgg_manifest(lgg_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("lgg") / "manifest.parquet"
    manifest, rejects = prepare(lgg_sample, out)
    return out, manifest, rejects


def test_lgg_sample_lists_92_slices_of_4_patients(lgg_manifest, lgg_sample):
    out, manifest, rejects = lgg_manifest
    assert rejects.empty
    assert len(manifest) == 92
    assert manifest["volume_id"].nunique() == 4
    assert int(manifest["has_tumor"].sum()) == 30
    assert manifest["labeled"].all()
    assert set(manifest["source_format"]) == {"kaggle_3m"}
    assert sorted(manifest["institution"].unique()) == ["CS", "DU", "FG", "HT"]
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert (manifest[["height", "width", "channels"]].drop_duplicates().to_numpy() == [[256, 256, 3]]).all()
    assert manifest["slice_index"].dtype == np.int32
    # numeric order: slice 10 comes after 9, and each row's k is its file's k
    for volume_id, group in manifest.groupby("volume_id"):
        assert group["slice_index"].tolist() == list(range(1, len(group) + 1))
        for row in group.itertuples():
            assert row.image_path.endswith(f"{volume_id}/{volume_id}_{row.slice_index}.tif")
            assert row.mask_path == row.image_path[:-4] + "_mask.tif"
    assert out.with_name("manifest.rejects.csv").is_file()


def test_lgg_has_tumor_and_stats_match_the_files(lgg_manifest):
    _, manifest, _ = lgg_manifest
    volume_id = manifest["volume_id"].iloc[0]
    rows = manifest[manifest["volume_id"] == volume_id]
    images = np.stack([tifffile.imread(p) for p in rows["image_path"]])
    masks = np.stack([tifffile.imread(p) for p in rows["mask_path"]])
    assert rows["has_tumor"].tolist() == [bool(m.any()) for m in masks]
    pixels = images.reshape(-1, 3).astype(float)
    low, high = np.percentile(pixels, [0.5, 99.5], axis=0)
    clipped = np.clip(pixels, low, high)
    np.testing.assert_allclose(rows["norm_low"].iloc[0], low)
    np.testing.assert_allclose(rows["norm_high"].iloc[0], high)
    np.testing.assert_allclose(rows["norm_mean"].iloc[0], clipped.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(rows["norm_std"].iloc[0], clipped.std(axis=0), rtol=1e-6)
    row = rows.iloc[5].to_dict()
    np.testing.assert_array_equal(read_image(row), images[5])
    np.testing.assert_array_equal(read_mask(row), masks[5] // 255)


def test_manifest_round_trip_keeps_split_and_settings(lgg_manifest, lgg_sample):
    out, manifest, _ = lgg_manifest
    again = load_manifest(out)
    pd.testing.assert_frame_equal(again, manifest)
    assert manifest_settings(out) == {"data_dir": str(lgg_sample.resolve()), "split_seed": 0,
                                      "val_fraction": 0.2, "test_fraction": 0.2, "folds": 0, "fold": 0}
    assert again.attrs["raysegm"]["split_seed"] == 0
    assert (manifest.groupby("volume_id")["split"].nunique() == 1).all()
    assert sorted(manifest.groupby("volume_id")["split"].first()) == ["test", "train", "train", "val"]


# ---------------------------------------------------------------------------------------------------
# planted faults


def _plant_faults(root):
    """Copy two synthetic patients and break one file per fault kind; returns {path: reason fragment}."""
    volume = sorted(p for p in root.iterdir() if p.is_dir())[0]
    v = volume.name
    image = tifffile.imread(volume / f"{v}_1.tif")
    faults = {}

    data = (volume / f"{v}_1.tif").read_bytes()
    (volume / f"{v}_1.tif").write_bytes(data[: len(data) // 2])
    faults[volume / f"{v}_1.tif"] = "truncated"

    (volume / f"{v}_2.tif").write_bytes(b"")
    faults[volume / f"{v}_2.tif"] = "empty file (0 bytes)"

    tifffile.imwrite(volume / f"{v}_3.tif", np.zeros((*image.shape[:2], 4), np.uint8), photometric="rgb",
                     extrasamples=[0])
    faults[volume / f"{v}_3.tif"] = "wrong channel count 4"

    tifffile.imwrite(volume / f"{v}_4.tif", image.astype(np.uint16) * 200, photometric="rgb")
    faults[volume / f"{v}_4.tif"] = "dtype uint16"

    (volume / f"{v}_5.tif").unlink()
    faults[volume / f"{v}_5_mask.tif"] = "mask without image"

    mask = tifffile.imread(volume / f"{v}_6_mask.tif")
    mask[0, :3] = 7
    tifffile.imwrite(volume / f"{v}_6_mask.tif", mask)
    faults[volume / f"{v}_6_mask.tif"] = "mask values [7]"

    tifffile.imwrite(volume / f"{v}_7_mask.tif", np.zeros((image.shape[0] // 2, image.shape[1] // 2), np.uint8))
    faults[volume / f"{v}_7_mask.tif"] = "differs from image"

    (volume / f"{v}_99.tif").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(3000)))
    faults[volume / f"{v}_99.tif"] = "unreadable tif"

    shutil.copy(volume / f"{v}_8.tif", volume / f"{v}_08.tif")
    shutil.copy(volume / f"{v}_8_mask.tif", volume / f"{v}_08_mask.tif")
    faults[volume / f"{v}_08.tif"] = f"slice number 8 is also {v}_8.tif; its mask {v}_08_mask.tif is left out with it"

    (volume / "notes.bin").write_bytes(b"\x00\x01garbage")
    faults[volume / "notes.bin"] = "unsupported file type"
    return faults


@pytest.fixture
def faulty_dir(synth_dir, tmp_path):
    root = tmp_path / "faulty"
    root.mkdir()
    for volume in sorted(p for p in synth_dir.iterdir() if p.is_dir())[:2]:
        shutil.copytree(volume, root / volume.name)
    shutil.copy(synth_dir / "data.csv", root / "data.csv")
    return root, _plant_faults(root)


def test_planted_faults_are_named_and_good_slices_kept(faulty_dir, caplog):
    root, faults = faulty_dir
    with caplog.at_level(logging.WARNING, logger="raysegm.data"):
        slices, rejects = discover(root)
    assert sorted(rejects["path"]) == sorted(str(p.resolve()) for p in faults)
    for path, fragment in faults.items():
        reason = rejects.loc[rejects["path"] == str(path.resolve()), "reason"].item()
        assert fragment in reason, (path.name, reason)
        assert any(str(path.resolve()) in line and fragment in line for line in caplog.messages)
    # each reject names its volume and the slice it took out (-1: a file with no slice of its own)
    volume = next(iter(faults)).parent.name
    numbers = {Path(p).name: k for p, k in zip(rejects["path"], rejects["slice_index"])}
    assert (rejects["volume_id"] == volume).all()
    assert numbers == {**{f"{volume}_{k}.tif": k for k in (1, 2, 3, 4, 99)},
                       **{f"{volume}_{k}_mask.tif": k for k in (5, 6, 7)},
                       f"{volume}_08.tif": -1, "notes.bin": -1}
    # 2 volumes x 12 slices; slices 1-7 of the first are lost, slice 99 never existed as a good one
    assert len(slices) == 24 - 7
    first, second = sorted(slices["volume_id"].unique())
    assert slices.loc[slices["volume_id"] == first, "slice_index"].tolist() == list(range(8, 13))
    assert slices.loc[slices["volume_id"] == second, "slice_index"].tolist() == list(range(1, 13))
    assert slices["labeled"].all()


def test_strict_prepare_lists_every_reject_and_writes_nothing(faulty_dir, tmp_path):
    root, faults = faulty_dir
    out = tmp_path / "strict" / "manifest.parquet"
    with pytest.raises(ValueError) as error:
        prepare(root, out, strict=True)
    for path in faults:
        assert str(path.resolve()) in str(error.value)
    assert not out.exists()
    manifest, rejects = prepare(root, out)
    assert len(manifest) == 17 and len(rejects) == len(faults)
    assert len(pd.read_csv(out.with_name("manifest.rejects.csv"))) == len(faults)


def test_readers_raise_a_value_error_naming_the_file(faulty_dir):
    root, faults = faulty_dir
    truncated = next(p for p, reason in faults.items() if reason == "truncated")
    with pytest.raises(ValueError, match="truncated") as error:
        read_image({"image_path": str(truncated), "slice_index": 1, "source_format": "kaggle_3m"})
    assert isinstance(error.value, DataError) and str(truncated) in str(error.value)
    sevens = next(p for p, reason in faults.items() if "7" in reason)
    with pytest.raises(ValueError, match=r"mask values \[7\]"):
        read_mask({"mask_path": str(sevens), "slice_index": 6, "source_format": "kaggle_3m"})


# ---------------------------------------------------------------------------------------------------
# a plain folder of 2D images


def test_image_folder_layout(tmp_path):
    root = tmp_path / "pngs"
    (root / "caseA").mkdir(parents=True)
    (root / "caseB").mkdir()
    gray = (np.arange(24 * 20, dtype=np.uint8).reshape(24, 20))
    for k in (3, 10, 7):
        Image.fromarray(gray + k).save(root / "caseA" / f"img_{k}.png")
    mask = np.zeros((24, 20), np.uint8)
    mask[5:9, 4:8] = 255
    Image.fromarray(mask).save(root / "caseA" / "img_7_mask.png")
    rgb = np.stack([gray, gray // 2, gray // 3], axis=-1)
    for name in ("beta", "alpha"):
        tifffile.imwrite(root / "caseB" / f"{name}.tif", rgb, photometric="rgb")
    slices, rejects = discover(root)
    assert rejects.empty
    a = slices[slices["volume_id"] == "caseA"]
    assert a["slice_index"].tolist() == [3, 7, 10]  # trailing numbers, sorted numerically
    assert a["labeled"].tolist() == [False, True, False]
    assert a["has_tumor"].tolist() == [False, True, False]
    assert a["mask_path"].iloc[0] is None
    b = slices[slices["volume_id"] == "caseB"]
    assert b["slice_index"].tolist() == [0, 1]  # no numbers: sorted position
    assert b["image_path"].str.endswith(".tif").tolist() and b["image_path"].iloc[0].endswith("alpha.tif")
    assert set(slices["source_format"]) == {"image"} and slices["institution"].isna().all()
    row = a.iloc[1].to_dict()
    image = read_image(row)
    assert image.shape == (24, 20, 1) and image.dtype == np.uint8  # grayscale stays one channel
    np.testing.assert_array_equal(image[..., 0], gray + 7)
    assert a["channels"].tolist() == [1, 1, 1] and b["channels"].tolist() == [3, 3]
    np.testing.assert_array_equal(read_mask(row), mask // 255)
    assert read_mask(a.iloc[0].to_dict()) is None
    np.testing.assert_array_equal(read_image(b.iloc[0].to_dict()), rgb)


def test_a_volume_mixing_grayscale_and_rgb_slices_keeps_the_majority_count(tmp_path):
    root = tmp_path / "scans"
    (root / "stray").mkdir(parents=True)
    (root / "tie").mkdir()
    gray = np.full((8, 8), 40, np.uint8)
    rgb = np.stack([gray] * 3, axis=-1)
    # a stray grayscale export as slice 1 of an RGB volume: slice 1 is the one left out, not 2 and 3
    Image.fromarray(gray).save(root / "stray" / "img_1.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "stray" / "img_1_mask.png")
    Image.fromarray(rgb).save(root / "stray" / "img_2.png")
    Image.fromarray(rgb).save(root / "stray" / "img_3.png")
    # one of each: the first slice decides
    Image.fromarray(gray).save(root / "tie" / "img_1.png")
    Image.fromarray(rgb).save(root / "tie" / "img_2.png")
    slices, rejects = discover(root)
    stray = slices[slices["volume_id"] == "stray"]
    assert stray["slice_index"].tolist() == [2, 3] and stray["channels"].tolist() == [3, 3]
    tie = slices[slices["volume_id"] == "tie"]
    assert tie["slice_index"].tolist() == [1] and tie["channels"].tolist() == [1]
    rows = {Path(p).relative_to(root).as_posix(): (reason, volume_id, int(k)) for p, reason, volume_id, k
            in zip(rejects["path"], rejects["reason"], rejects["volume_id"], rejects["slice_index"])}
    assert rows == {
        "stray/img_1.png": ("1 channels where the volume has 3 (2 of its 3 slices, e.g. img_2.png); slice left "
                            "out with its mask img_1_mask.png", "stray", 1),
        "tie/img_2.png": ("3 channels where the volume has 1 (1 of its 2 slices, e.g. img_1.png); slice left out",
                          "tie", 2),
    }


def _kaggle_patient(folder: Path, sizes: dict[int, tuple[int, int]]) -> None:
    """A kaggle_3m patient folder: slice k an RGB tif of sizes[k], with a 0/255 mask of the same size."""
    folder.mkdir(parents=True)
    for k, (height, width) in sizes.items():
        image = np.full((height, width, 3), 10 * k, np.uint8)
        tifffile.imwrite(folder / f"{folder.name}_{k}.tif", image, photometric="rgb")
        mask = np.zeros((height, width), np.uint8)
        mask[:2, :2] = 255
        tifffile.imwrite(folder / f"{folder.name}_{k}_mask.tif", mask)


def test_a_slice_of_another_size_than_its_volume_is_rejected(tmp_path):
    """2.5D input stacks a slice with its neighbours, so one volume has one size: the odd slice (here the
    first, with a mask of its own size) is rejected at discovery, not in a training task mid-epoch."""
    from raysegm.data.context import read_input, with_context

    root = tmp_path / "kaggle_3m"
    volume = "TCGA_XX_1234_20000101"
    _kaggle_patient(root / volume, {1: (16, 12), 2: (8, 8), 3: (8, 8), 4: (8, 8)})
    slices, rejects = discover(root)
    assert slices["slice_index"].tolist() == [2, 3, 4]
    assert (slices["height"] == 8).all() and (slices["width"] == 8).all()
    assert rejects[["volume_id", "slice_index"]].to_dict("records") == [{"volume_id": volume, "slice_index": 1}]
    assert rejects["path"].item() == str(root.resolve() / volume / f"{volume}_1.tif")
    assert rejects["reason"].item() == (f"size 16x12 where the volume is 8x8 (3 of its 4 slices, e.g. {volume}_2.tif); "
                                        f"slice left out with its mask {volume}_1_mask.tif")
    data = DataSettings(context_slices=1)
    for record in with_context(slices, 1).to_dict("records"):
        assert read_input(record, data).shape == (8, 8, 9)


def test_symlinked_patient_folders_are_discovered_and_loops_rejected(tmp_path):
    """A subset made of links to patient folders (`ln -s archive/TCGA_* subset/`) reads like the folders."""
    archive = tmp_path / "archive" / "kaggle_3m"
    volumes = ["TCGA_XX_1234_20000101", "TCGA_YY_5678_20010202"]
    for volume in volumes:
        _kaggle_patient(archive / volume, {1: (8, 8), 2: (8, 8), 3: (8, 8)})
    subset = tmp_path / "subset"
    subset.mkdir()
    for volume in volumes:
        (subset / volume).symlink_to(archive / volume, target_is_directory=True)
    (subset / "again").symlink_to(archive / volumes[0], target_is_directory=True)  # one folder, two links
    (subset / "loop").symlink_to(subset, target_is_directory=True)
    slices, rejects = discover(subset)
    assert sorted(slices["volume_id"].unique()) == volumes
    assert slices.groupby("volume_id")["slice_index"].apply(list).to_dict() == {v: [1, 2, 3] for v in volumes}
    assert slices["labeled"].all() and set(slices["source_format"]) == {"kaggle_3m"}
    assert slices["image_path"].map(lambda p: Path(p).parent.parent).eq(subset.resolve()).all()
    reasons = dict(zip(rejects["path"].map(lambda p: Path(p).name), rejects["reason"]))
    assert reasons == {
        "again": f"folder links to {archive.resolve() / volumes[0]}, already walked as "
                 f"{subset.resolve() / volumes[0]} (a second path to one folder); not read twice",
        "loop": f"folder links to {subset.resolve()}, already walked as {subset.resolve()} (a symlink loop); "
                "not read twice",
    }
    assert (rejects["slice_index"] == -1).all() and sorted(rejects["volume_id"]) == ["again", "loop"]


def test_a_broken_link_to_a_patient_folder_is_named_as_one(tmp_path):
    subset = tmp_path / "subset"
    _kaggle_patient(subset / "TCGA_XX_1234_20000101", {1: (8, 8)})
    (subset / "TCGA_YY_5678_20010202").symlink_to(tmp_path / "moved" / "TCGA_YY_5678_20010202")
    slices, rejects = discover(subset)
    assert slices["volume_id"].unique().tolist() == ["TCGA_XX_1234_20000101"]
    assert rejects["path"].item().endswith("subset/TCGA_YY_5678_20010202")
    assert rejects["reason"].item() == f"broken symbolic link to {tmp_path / 'moved' / 'TCGA_YY_5678_20010202'}"


def test_image_folder_without_distinct_numbers_takes_natural_order(tmp_path):
    root = tmp_path / "scan"
    root.mkdir()
    for index, name in enumerate(("case_10", "cover", "case_2", "case_1")):
        Image.fromarray(np.full((8, 8), index, np.uint8)).save(root / f"{name}.png")
    slices, rejects = discover(root)
    assert rejects.empty
    order = slices.sort_values("slice_index")["image_path"].map(lambda p: Path(p).stem).tolist()
    assert order == ["case_1", "case_2", "case_10", "cover"]  # not case_1, case_10, case_2
    assert slices["slice_index"].tolist() == [0, 1, 2, 3]


def test_numbers_beyond_int32_are_positions_in_an_image_folder_and_rejected_in_kaggle_3m(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    # timestamp-like names: as int32 the last would wrap to 805155840, the first's and the second's
    names = ("img_20230101120000", "img_20230101120001", "img_5100123136")
    for index, name in enumerate(names):
        Image.fromarray(np.full((8, 8), index, np.uint8)).save(root / f"{name}.png")
    slices, rejects = discover(root)
    assert rejects.empty
    assert slices["slice_index"].tolist() == [0, 1, 2]  # natural name order, numbers compared whole
    assert [Path(p).stem for p in slices["image_path"]] == ["img_5100123136", *names[:2]]

    folder = tmp_path / "kaggle_3m" / "TCGA_CS_4941_19960909"
    folder.mkdir(parents=True)
    for k in (1, 2, 4294967297):  # 2**32 + 1 would wrap to 1
        tifffile.imwrite(folder / f"{folder.name}_{k}.tif", np.full((8, 8, 3), k % 250, np.uint8), photometric="rgb")
    slices, rejects = discover(tmp_path / "kaggle_3m")
    assert slices["slice_index"].tolist() == [1, 2]
    assert rejects["path"].map(lambda p: Path(p).name).tolist() == [f"{folder.name}_4294967297.tif"]
    assert "beyond the manifest's int32 slice_index" in rejects["reason"].iloc[0]


def test_planar_rgb_tifs_read_as_rgb_and_multi_page_tifs_are_named(tmp_path):
    from raysegm.data.io import read_slice_file

    rgb = np.random.default_rng(0).integers(0, 255, size=(12, 10, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_slice_file(tmp_path / "planar.tif"), rgb)
    tifffile.imwrite(tmp_path / "stack.tif", np.moveaxis(rgb, -1, 0), photometric="minisblack")  # 3 pages
    with pytest.raises(DataError, match=r"stack.tif: multi-page tif \(3 images\)"):
        read_slice_file(tmp_path / "stack.tif")


# ---------------------------------------------------------------------------------------------------
# NIfTI volumes


def _save(array, path):
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


@pytest.fixture
def nifti_dir(tmp_path):
    """Four cases: 4D int16 with mask, per-modality float with _seg, FLAIR-only 3D, FLAIR-only _0001."""
    root = tmp_path / "nifti"
    root.mkdir()
    rng = np.random.default_rng(0)
    shape = (12, 10, 5)
    volumes = {}
    four_d = rng.integers(-200, 3000, size=(*shape, 3)).astype(np.int16)
    _save(four_d, root / "case4d.nii.gz")
    mask = np.zeros(shape, np.uint8)
    mask[2:5, 3:6, 1:3] = 1
    _save(mask, root / "case4d_mask.nii.gz")
    volumes["case4d"] = (four_d.astype(np.float32), mask)

    modalities = [rng.normal(100 * (m + 1), 20, size=shape).astype(np.float32) for m in range(3)]
    for m, volume in enumerate(modalities):
        _save(volume, root / f"multi_{m:04d}.nii.gz")
    seg = np.zeros(shape, np.uint8)
    seg[6:9, 1:4, 4] = 255
    _save(seg, root / "multi_seg.nii")
    volumes["multi"] = (np.stack(modalities, axis=-1), seg // 255)

    flair = rng.integers(0, 1000, size=shape).astype(np.int16)
    _save(flair, root / "flaironly.nii")
    volumes["flaironly"] = (np.repeat(flair[..., None], 3, axis=-1).astype(np.float32), None)

    single = rng.integers(0, 500, size=shape).astype(np.int16)
    _save(single, root / "solo_0001.nii.gz")
    volumes["solo"] = (np.repeat(single[..., None], 3, axis=-1).astype(np.float32), None)
    return root, volumes


def test_nifti_cases_are_found_and_read_slice_by_slice(nifti_dir):
    root, volumes = nifti_dir
    slices, rejects = discover(root)
    assert rejects.empty
    assert sorted(slices["volume_id"].unique()) == sorted(volumes)
    assert set(slices["source_format"]) == {"nifti"}
    for volume_id, (volume, mask) in volumes.items():
        rows = slices[slices["volume_id"] == volume_id]
        assert rows["slice_index"].tolist() == [0, 1, 2, 3, 4]
        assert (rows["height"] == 12).all() and (rows["width"] == 10).all() and (rows["channels"] == 3).all()
        assert rows["labeled"].all() == (mask is not None)
        expected_tumor = [bool(mask[:, :, k].any()) if mask is not None else False for k in range(5)]
        assert rows["has_tumor"].tolist() == expected_tumor
        pixels = volume.reshape(-1, 3).astype(float)
        np.testing.assert_allclose(rows["norm_low"].iloc[0], np.percentile(pixels, 0.5, axis=0), rtol=1e-5)
        np.testing.assert_allclose(rows["norm_high"].iloc[0], np.percentile(pixels, 99.5, axis=0), rtol=1e-5)
        for k in (0, 3):
            record = rows.iloc[k].to_dict()
            image = read_image(record)
            assert image.dtype == np.float32 and image.shape == (12, 10, 3)
            np.testing.assert_allclose(image, volume[:, :, k], rtol=1e-6)
            if mask is None:
                assert read_mask(record) is None
            else:
                np.testing.assert_array_equal(read_mask(record), mask[:, :, k])
    multi = slices[slices["volume_id"] == "multi"]["image_path"].iloc[0]
    assert [p.rsplit("/", 1)[1] for p in multi.split("|")] == [f"multi_{m:04d}.nii.gz" for m in range(3)]


def test_bad_nifti_cases_are_rejected_whole(tmp_path):
    root = tmp_path / "badnifti"
    root.mkdir()
    _save(np.zeros((8, 8, 4), np.int16), root / "good.nii.gz")
    _save(np.zeros((8, 8, 4), np.int16), root / "shape.nii.gz")
    _save(np.zeros((8, 6, 4), np.uint8), root / "shape_mask.nii.gz")
    _save(np.zeros((8, 8, 4), np.int16), root / "values.nii.gz")
    values = np.zeros((8, 8, 4), np.uint8)
    values[1, 1, 1] = 3
    _save(values, root / "values_seg.nii.gz")
    _save(np.zeros((8, 8, 4, 2), np.int16), root / "twochannel.nii.gz")
    full = np.random.default_rng(1).integers(0, 30000, size=(16, 16, 8)).astype(np.int16)
    _save(full, root / "cut.nii.gz")
    data = (root / "cut.nii.gz").read_bytes()
    (root / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    _save(np.zeros((8, 8, 4), np.uint8), root / "orphan_mask.nii.gz")
    slices, rejects = discover(root)
    assert slices["volume_id"].unique().tolist() == ["good"]
    reasons = dict(zip(rejects["path"].map(lambda p: p.rsplit("/", 1)[1]), rejects["reason"]))
    assert "mask shape (8, 6, 4) differs from image (8, 8, 4)" in reasons["shape_mask.nii.gz"]
    assert "case left out" in reasons["shape.nii.gz"]
    assert "mask values [3]" in reasons["values_seg.nii.gz"]
    assert "wrong channel count 2" in reasons["twochannel.nii.gz"]
    assert "unreadable NIfTI" in reasons["cut.nii.gz"]
    assert "mask without image" in reasons["orphan_mask.nii.gz"]
    assert len(reasons) == 7


def test_empty_non_finite_and_flairless_nifti_cases_are_rejected(tmp_path):
    root = tmp_path / "nifti"
    root.mkdir()
    _save(np.zeros((8, 8, 4), np.int16), root / "good.nii.gz")
    _save(np.zeros((8, 8, 0), np.int16), root / "empty.nii.gz")
    nan = np.zeros((8, 8, 4), np.float32)
    nan[1, 2, 3], nan[0, 0, 0] = np.nan, np.inf
    _save(nan, root / "nan.nii.gz")
    _save(np.zeros((8, 8, 4), np.int16), root / "lonely_0000.nii.gz")  # pre-contrast alone, no FLAIR
    slices, rejects = discover(root)
    assert slices["volume_id"].unique().tolist() == ["good"]
    reasons = dict(zip(rejects["path"].map(lambda p: p.rsplit("/", 1)[1]), rejects["reason"]))
    assert reasons == {"empty.nii.gz": "no voxels (shape (8, 8, 0))",
                       "nan.nii.gz": "2 non-finite voxels (NaN or inf)",
                       "lonely_0000.nii.gz": "case lonely has no FLAIR file (_0001)"}


def test_a_trailing_axis_of_one_reads_as_discovered(tmp_path):
    """Per-modality files and a mask of shape (X, Y, Z, 1): discovery and the slice readers agree."""
    root = tmp_path / "nifti"
    root.mkdir()
    rng = np.random.default_rng(2)
    modalities = [rng.normal(100 * (m + 1), 20, size=(12, 10, 5, 1)).astype(np.float32) for m in range(3)]
    for m, volume in enumerate(modalities):
        _save(volume, root / f"case_{m:04d}.nii.gz")
    mask = np.zeros((12, 10, 5, 1), np.uint8)
    mask[3:6, 2:7, 2] = 1
    _save(mask, root / "case_mask.nii.gz")
    slices, rejects = discover(root)
    assert rejects.empty and slices["slice_index"].tolist() == [0, 1, 2, 3, 4]
    record = slices.iloc[2].to_dict()
    np.testing.assert_allclose(read_image(record), np.concatenate(modalities, axis=-1)[:, :, 2], rtol=1e-6)
    np.testing.assert_array_equal(read_mask(record), mask[:, :, 2, 0])


# ---------------------------------------------------------------------------------------------------
# splits


def test_splits_are_deterministic_order_free_and_seed_dependent():
    ids = [f"P{i:02d}" for i in range(20)]
    first = assign_splits(ids, seed=5)
    shuffled = list(ids)
    random.Random(1).shuffle(shuffled)
    assert assign_splits(shuffled, seed=5) == first
    assert assign_splits(ids + ids[:3], seed=5) == first  # one volume listed per slice is the same volume
    assert assign_splits(ids, seed=6) != first
    counts = pd.Series(first).value_counts().to_dict()
    assert counts == {"train": 12, "val": 4, "test": 4}
    assert set(first) == set(ids)


@pytest.mark.parametrize("seed", range(6))
def test_every_split_gets_a_volume_with_three(seed):
    assert sorted(assign_splits(["a", "b", "c"], seed=seed).values()) == ["test", "train", "val"]


def test_small_sets_keep_a_training_volume():
    assert sorted(assign_splits(["a", "b"], seed=0).values()) == ["train", "val"]
    assert assign_splits(["a"], seed=0) == {"a": "train"}
    assert sorted(assign_splits(["a", "b", "c", "d"], seed=0, test_fraction=0.0).values()) == [
        "train", "train", "train", "val"]


def test_k_fold_partitions_the_volumes():
    ids = [f"V{i}" for i in range(12)]
    validation = []
    for fold in range(5):
        splits = assign_splits(ids, seed=3, folds=5, fold=fold)
        assert set(splits.values()) == {"train", "val"}
        validation.append({v for v, s in splits.items() if s == "val"})
    assert set().union(*validation) == set(ids)
    assert sum(len(v) for v in validation) == len(ids)
    assert sorted(len(v) for v in validation) == [2, 2, 2, 3, 3]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"folds": 13}, "folds must be between 2 and the 12 volumes, got 13"),
    ({"folds": 1}, "folds must be between 2 and the 12 volumes, got 1"),
    ({"folds": 3, "fold": 3}, r"fold must be in 0\.\.2, got 3"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val \+ test < 1, got 0\.5 and 0\.5"),
    ({"val_fraction": -0.1}, "got -0.1 and 0.2"),
])
def test_bad_split_settings_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        assign_splits([f"V{i}" for i in range(12)], **kwargs)


# ---------------------------------------------------------------------------------------------------
# manifest_for


def test_manifest_for_synthetic_reuse_and_mismatch(tmp_path):
    data = DataSettings(synthetic_patients=4, synthetic_slices=3, size=32)
    manifest = manifest_for(data, tmp_path)
    assert manifest["volume_id"].nunique() == 4 and len(manifest) == 12
    assert set(manifest["split"]) == {"train", "val", "test"}
    stamp = (tmp_path / "manifest.parquet").stat().st_mtime_ns
    again = manifest_for(data, tmp_path)
    pd.testing.assert_frame_equal(again, manifest)
    assert (tmp_path / "manifest.parquet").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(ValueError, match="prepared with"):
        manifest_for(DataSettings(synthetic_patients=4, synthetic_slices=3, size=32, split_seed=1), tmp_path)
    loaded = manifest_for(DataSettings(manifest=str(tmp_path / "manifest.parquet"), split_seed=9), tmp_path / "x")
    pd.testing.assert_frame_equal(loaded, manifest)


def test_manifest_for_data_dir_with_k_fold(synth_dir, tmp_path):
    data = DataSettings(data_dir=str(synth_dir), folds=3, fold=1)
    manifest = manifest_for(data, tmp_path)
    assert len(manifest) == 72 and set(manifest["split"]) == {"train", "val"}
    assert manifest.groupby("split")["volume_id"].nunique().to_dict() == {"train": 4, "val": 2}
    assert manifest_settings(tmp_path / "manifest.parquet")["folds"] == 3
    with pytest.raises(ValueError, match="prepared with"):
        manifest_for(DataSettings(data_dir=str(synth_dir), folds=3, fold=2), tmp_path)


def test_nifti_names_ending_in_four_digits_are_cases_unless_they_number_modalities(tmp_path):
    root = tmp_path / "nifti"
    root.mkdir()
    _save(np.zeros((8, 8, 4, 3), np.int16), root / "TCGA_CS_4942.nii.gz")  # a 4D case, not modality 4942
    _save(np.zeros((8, 8, 4), np.uint8), root / "TCGA_CS_4942_mask.nii.gz")
    for k in range(1, 6):  # five subjects numbered from 1: five cases
        _save(np.full((8, 8, 3), k, np.int16), root / f"subject_{k:04d}.nii.gz")
    for m in range(4):  # four modalities numbered from 0: one case, whose _0003 is refused
        _save(np.zeros((8, 8, 3), np.int16), root / f"brats_{m:04d}.nii.gz")
    _save(np.zeros((8, 8, 3), np.int16), root / "upper.nii.gz")
    _save(np.ones((8, 8, 3), np.uint8), root / "upper_mask.NII.GZ")  # the suffix in capitals
    _save(np.zeros((8, 8, 3), np.int16), root / "twice.nii")
    _save(np.zeros((8, 8, 3), np.int16), root / "twice.nii.gz")
    slices, rejects = discover(root)
    cases = sorted(slices["volume_id"].unique())
    assert cases == ["TCGA_CS_4942", *[f"subject_{k:04d}" for k in range(1, 6)], "twice", "upper"]
    assert slices.loc[slices["volume_id"] == "TCGA_CS_4942", "labeled"].all()
    assert slices.loc[slices["volume_id"] == "upper", "labeled"].all()
    reasons = dict(zip(rejects["path"].map(lambda p: p.rsplit("/", 1)[1]), rejects["reason"]))
    assert set(reasons) == {*(f"brats_{m:04d}.nii.gz" for m in range(4)), "twice.nii.gz"}
    assert "modality _0003 unexpected" in reasons["brats_0000.nii.gz"]
    assert "separate cases need names" in reasons["brats_0000.nii.gz"]
    assert reasons["twice.nii.gz"] == "duplicate case name (also twice.nii)"
    # each reject names the case it belongs to, for inference's error rows
    cases = dict(zip(rejects["path"].map(lambda p: p.rsplit("/", 1)[1]), rejects["volume_id"]))
    assert cases == {**{f"brats_{m:04d}.nii.gz": "brats" for m in range(4)}, "twice.nii.gz": "twice"}
    assert (rejects["slice_index"] == -1).all()


def test_numbered_nifti_cases_with_masks_of_their_own_are_cases(tmp_path):
    root = tmp_path / "nifti"
    (root / "p1").mkdir(parents=True)
    (root / "p2").mkdir()
    for k in (1, 2):  # two cases numbered 0001 and 0002 in one folder, each with its mask
        _save(np.full((8, 8, 3), k, np.int16), root / f"x_{k:04d}.nii.gz")
        _save(np.ones((8, 8, 3), np.uint8), root / f"x_{k:04d}_mask.nii.gz")
    for k in (1, 2):  # one case a folder, with its segmentation
        _save(np.full((8, 8, 3), k, np.int16), root / f"p{k}" / f"patient_{k:04d}.nii.gz")
        _save(np.ones((8, 8, 3), np.uint8), root / f"p{k}" / f"patient_{k:04d}_seg.nii.gz")
    _save(np.zeros((8, 8, 3), np.int16), root / "lone_0002.nii.gz")  # no FLAIR number: a case, not a modality
    slices, rejects = discover(root)
    assert rejects.empty, rejects.to_dict("records")
    assert sorted(slices["volume_id"].unique()) == ["lone_0002", "patient_0001", "patient_0002", "x_0001", "x_0002"]
    labeled = slices.groupby("volume_id")["labeled"].all()
    assert labeled.drop("lone_0002").all() and not labeled["lone_0002"]
    second = slices[slices["volume_id"] == "x_0002"].iloc[0].to_dict()
    np.testing.assert_array_equal(read_image(second), np.full((8, 8, 3), 2.0, np.float32))  # its own pixels
