"""Export of inference Parquet: mask PNGs, overlays on the FLAIR channel, NIfTI volumes with the source's geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from raysegm.checkpoint import save_checkpoint
from raysegm.config import ExperimentConfig, InferSettings, replace
from raysegm.data.discover import discover
from raysegm.data.io import read_slice_file
from raysegm.data.synth import generate_dataset
from raysegm.export import TINT_ALPHA, export
from raysegm.infer import SCHEMA, OutputFolder, decode_mask_png, encode_mask_png, infer, read_slices
from raysegm.models import create_model
from raysegm.storage import replace_atomically

SIZE = 32


def _square_mask(k: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[8 + k:20, 6:18 + k] = True
    return mask


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("src") / "kaggle_3m", patients=1, slices=4, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def output(source, tmp_path_factory) -> tuple[Path, str, dict]:
    """An inference output written by hand: slices 1, 2 and 4 with known masks, slice 3 an error row."""
    volume_id = next(p.name for p in source.iterdir() if p.is_dir())
    masks = {k: _square_mask(k) for k in (1, 2, 4)}
    rows = pd.DataFrame({
        "volume_id": volume_id,
        "slice_index": np.array([1, 2, 3, 4], dtype=np.int32),
        "source": [str(source / volume_id / f"{volume_id}_{k}.tif") for k in (1, 2, 3, 4)],
        "height": np.array([SIZE, SIZE, 0, SIZE], dtype=np.int32),
        "width": np.array([SIZE, SIZE, 0, SIZE], dtype=np.int32),
        "mask_png": [encode_mask_png(masks[1]), encode_mask_png(masks[2]), None, encode_mask_png(masks[4])],
        "tumor_pixels": np.array([masks[1].sum(), masks[2].sum(), 0, masks[4].sum()], dtype=np.int64),
        "max_prob": np.array([0.9, 0.8, np.nan, 0.7], dtype=np.float32),
        "model": "0123456789abcdef",
        "status": ["ok", "ok", "error", "ok"],
        "error": [None, None, "x.tif: truncated tif", None],
    })
    folder = tmp_path_factory.mktemp("infer") / "masks"
    out = OutputFolder(str(folder))
    out.open({"model": "0123456789abcdef", "checkpoint": "c", "input": str(source),
              "settings": {"tta": False, "postprocess": "none", "threshold": 0.5}})
    out.commit(volume_id, rows[SCHEMA.names])
    return folder, volume_id, masks


def test_png_export_writes_every_mask_and_skips_error_rows(output, tmp_path):
    folder, volume_id, masks = output
    assert export(folder, to="png", out=tmp_path / "png") == tmp_path / "png"
    written = sorted(p.name for p in (tmp_path / "png" / volume_id).iterdir())
    assert written == [f"{volume_id}_{k}_mask.png" for k in (1, 2, 4)]
    for k, mask in masks.items():
        with Image.open(tmp_path / "png" / volume_id / f"{volume_id}_{k}_mask.png") as png:
            assert png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), np.where(mask, 255, 0))


def test_overlay_tints_the_mask_on_the_flair_channel(output, source, tmp_path):
    folder, volume_id, masks = output
    export(folder, to="overlay", out=tmp_path / "overlay")
    assert len(list((tmp_path / "overlay" / volume_id).iterdir())) == 3
    grey = read_slice_file(source / volume_id / f"{volume_id}_2.tif")[..., 1].astype(float)
    with Image.open(tmp_path / "overlay" / volume_id / f"{volume_id}_2_overlay.png") as png:
        assert png.mode == "RGB"
        rgb = np.asarray(png).astype(int)
    mask = masks[2]
    outside = ~mask
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel][outside], grey[outside])
    inside = np.zeros_like(mask)
    inside[11:19, 7:19] = True  # the mask's interior, away from its one-pixel outline
    np.testing.assert_array_equal(rgb[..., 0][inside], np.round((1 - TINT_ALPHA) * grey[inside] + TINT_ALPHA * 255))
    np.testing.assert_array_equal(rgb[..., 1][inside], np.round((1 - TINT_ALPHA) * grey[inside]))
    np.testing.assert_array_equal(rgb[10, 6:20], np.tile([255, 0, 0], (14, 1)))  # top outline row


def test_overlay_finds_moved_sources_under_source_root(output, source, tmp_path):
    folder, volume_id, _ = output
    moved = tmp_path / "moved"
    shutil.copytree(source, moved)
    original = source.with_name("kaggle_3m.away")
    source.rename(original)
    try:
        with pytest.raises(FileNotFoundError, match="source_root"):
            export(folder, to="overlay", out=tmp_path / "o1")
        export(folder, to="overlay", out=tmp_path / "o2", source_root=moved)
        assert len(list((tmp_path / "o2" / volume_id).glob("*_overlay.png"))) == 3
    finally:
        original.rename(source)


def test_export_refuses_to_write_into_the_output_or_the_input_archive(output, source, tmp_path):
    folder, volume_id, _ = output
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    for out, place in ((folder, "inference output"), (folder / "png", "inference output"),
                       (source, "input archive"), (source / volume_id, "input archive")):
        with pytest.raises(ValueError, match=f"is inside the {place}"):
            export(folder, to="png", out=out)
    with pytest.raises(ValueError, match="is inside the source root"):
        export(folder, to="overlay", out=tmp_path / "moved" / "o", source_root=tmp_path / "moved")
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before  # no mask written there
    assert len(pd.read_parquet(folder)) == 4  # the output still reads whole


def test_nifti_from_2d_slices_stacks_in_order_with_identity_affine(output, tmp_path, capsys):
    folder, volume_id, masks = output
    export(folder, to="nifti", out=tmp_path / "nii")
    image = nibabel.load(tmp_path / "nii" / f"{volume_id}.nii.gz")
    np.testing.assert_array_equal(image.affine, np.eye(4))
    data = np.asarray(image.dataobj)
    assert data.shape == (SIZE, SIZE, 4) and data.dtype == np.uint8
    for position, k in enumerate((1, 2, 3, 4)):
        expected = masks[k] if k in masks else np.zeros((SIZE, SIZE), dtype=bool)
        np.testing.assert_array_equal(data[..., position], expected.astype(np.uint8))
    assert "slices [3] have no mask" in capsys.readouterr().out


def test_a_write_that_fails_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    """Every exported file (and checkpoint, manifest) is written by replace_atomically."""
    target = tmp_path / "v_1_mask.png"
    target.write_bytes(b"old mask")

    def crash(path):
        path.write_bytes(b"half a ma")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, crash)
    assert target.read_bytes() == b"old mask"
    assert [p.name for p in tmp_path.iterdir()] == ["v_1_mask.png"]
    replace_atomically(target, lambda path: path.write_bytes(b"new mask"))
    assert target.read_bytes() == b"new mask"
    assert [p.name for p in tmp_path.iterdir()] == ["v_1_mask.png"]


def test_unknown_format_is_an_error(output, tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        export(output[0], to="jpeg", out=tmp_path)


def test_nifti_export_puts_each_mask_on_its_source_voxels(tmp_path):
    """Asymmetric masks on slices 0, 2 and 4 of a 24 x 40 x 5 NIfTI source, slice 1 an error row: each lands
    on its own slice, unflipped and untransposed (H is the volume's first axis), the rest is zeros."""
    affine = np.array([[0.0, -0.9, 0.0, 100.0], [1.1, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.5], [0, 0, 0, 1]])
    source = tmp_path / "cases" / "CASE7.nii.gz"
    source.parent.mkdir()
    scan = nibabel.Nifti1Image(np.zeros((24, 40, 5), np.int16), affine)
    scan.header.set_qform(affine, code=1)  # scanner coordinates, not nibabel's default "aligned" / none
    scan.header.set_sform(affine, code=1)
    scan.header.set_xyzt_units("mm", "sec")
    nibabel.save(scan, source)
    masks = {}
    for k in (0, 2, 4):
        masks[k] = np.zeros((24, 40), dtype=bool)
        masks[k][2 + k:9 + k, 5:30 - 3 * k] = True  # an L: a bar plus a foot in one corner
        masks[k][9 + k:12 + k, 5:8] = True
    rows = pd.DataFrame({
        "volume_id": "CASE7",
        "slice_index": np.array([0, 1, 2, 4], dtype=np.int32),
        "source": str(source),
        "height": np.array([24, 0, 24, 24], dtype=np.int32),
        "width": np.array([40, 0, 40, 40], dtype=np.int32),
        "mask_png": [encode_mask_png(masks[0]), None, encode_mask_png(masks[2]), encode_mask_png(masks[4])],
        "tumor_pixels": np.array([masks[0].sum(), 0, masks[2].sum(), masks[4].sum()], dtype=np.int64),
        "max_prob": np.array([0.9, np.nan, 0.8, 0.7], dtype=np.float32),
        "model": "0123456789abcdef",
        "status": ["ok", "error", "ok", "ok"],
        "error": [None, "CASE7.nii.gz: slice 1 unreadable", None, None],
    })
    out = OutputFolder(str(tmp_path / "masks"))
    out.open({"model": "0123456789abcdef", "checkpoint": "c", "input": str(source.parent),
              "settings": {"tta": False, "postprocess": "none", "threshold": 0.5}})
    out.commit("CASE7", rows[SCHEMA.names])
    export(tmp_path / "masks", to="nifti", out=tmp_path / "nii")
    image = nibabel.load(tmp_path / "nii" / "CASE7.nii.gz")
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    data = np.asarray(image.dataobj)
    assert data.shape == (24, 40, 5) and data.dtype == np.uint8
    for k in range(5):
        np.testing.assert_array_equal(data[..., k], masks[k] if k in masks else 0, err_msg=f"slice {k}")
    # the source's header is kept: its qform/sform codes, units and voxel sizes; uint8 without scaling
    header = image.header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    assert header.get_xyzt_units() == ("mm", "sec") and header.get_data_dtype() == np.uint8
    np.testing.assert_allclose(header.get_zooms(), nibabel.load(source).header.get_zooms())
    assert header.get_slope_inter() in ((None, None), (1.0, 0.0))


def test_nifti_export_refuses_a_source_of_another_in_plane_shape(tmp_path):
    source = tmp_path / "cases" / "CASE3.nii.gz"
    source.parent.mkdir()
    nibabel.save(nibabel.Nifti1Image(np.zeros((5, 4, 3), np.int16), np.eye(4)), source)
    folder = _commit(tmp_path / "masks", source.parent, {"CASE3": ([0, 1], str(source))})  # 4x4 masks
    with pytest.raises(ValueError, match=r"CASE3: its masks are 4x4, its source .*CASE3\.nii\.gz is 5x4 in plane"):
        export(folder, to="nifti", out=tmp_path / "nii")
    assert not (tmp_path / "nii" / "CASE3.nii.gz").exists()


def _commit(folder: Path, input: Path, volumes: dict[str, tuple[list[int], str]]) -> Path:
    """An inference output by hand: each volume's slices (all ok, a 4x4 mask each) from one source file."""
    out = OutputFolder(str(folder))
    out.open({"model": "0123456789abcdef", "checkpoint": "c", "input": str(input),
              "settings": {"tta": False, "postprocess": "none", "threshold": 0.5, "precision": "auto"}})
    png = encode_mask_png(np.eye(4, dtype=bool))
    for volume_id, (indices, source) in volumes.items():
        n = len(indices)
        out.commit(volume_id, pd.DataFrame({
            "volume_id": volume_id, "slice_index": np.array(indices, dtype=np.int32), "source": source,
            "height": np.full(n, 4, np.int32), "width": np.full(n, 4, np.int32), "mask_png": [png] * n,
            "tumor_pixels": np.full(n, 4, np.int64), "max_prob": np.full(n, 0.9, np.float32),
            "model": "0123456789abcdef", "status": "ok", "error": None,
        })[SCHEMA.names])
    return folder


def test_nifti_export_refuses_two_volumes_of_one_file_name(tmp_path):
    archive = tmp_path / "archive"
    folder = _commit(tmp_path / "masks", archive, {"a/b": ([0], str(archive / "a" / "b" / "0.png")),
                                                   "a_b": ([0], str(archive / "a_b" / "0.png"))})
    with pytest.raises(ValueError, match="volumes 'a/b' and 'a_b' would both be written to a_b.nii.gz"):
        export(folder, to="nifti", out=tmp_path / "nii")
    assert not (tmp_path / "nii").exists()
    export(folder, to="png", out=tmp_path / "png")  # nested folders: no clash
    assert (tmp_path / "png" / "a" / "b" / "a_b_0_mask.png").is_file()
    assert (tmp_path / "png" / "a_b" / "a_b_0_mask.png").is_file()


def test_nifti_export_names_a_slice_beyond_its_source(tmp_path):
    source = tmp_path / "cases" / "CASE3.nii.gz"
    source.parent.mkdir()
    nibabel.save(nibabel.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.eye(4)), source)
    folder = _commit(tmp_path / "masks", source.parent, {"CASE3": ([0, 5], str(source))})
    with pytest.raises(ValueError, match=r"CASE3: slices \[5\] lie beyond the 3 slices of its source .*CASE3.nii.gz"):
        export(folder, to="nifti", out=tmp_path / "nii")


@pytest.mark.slow
def test_nifti_source_through_inference_keeps_its_affine(ray_session, tmp_path):
    """A FLAIR-only int16 NIfTI case segmented by a (tiny, untrained) model, exported back to NIfTI."""
    rng = np.random.default_rng(0)
    affine = np.array([[0.0, -0.9, 0.0, 100.0], [1.1, 0.0, 0.0, -20.0], [0.0, 0.0, 3.0, 5.5], [0, 0, 0, 1]])
    volume = (rng.normal(300, 80, size=(24, 40, 5))).astype(np.int16)
    (tmp_path / "cases").mkdir()
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "cases" / "CASE7.nii.gz")
    torch.manual_seed(0)
    config = replace(ExperimentConfig(), data={"size": SIZE}, model={"unet_width": 4, "unet_depth": 2})
    slices, _ = discover(tmp_path / "cases")
    slices = slices.sort_values("slice_index").reset_index(drop=True)
    slices["source"] = slices["image_path"]
    inputs = torch.from_numpy(read_slices(slices, config.data.__dict__)["image"])  # as the read stage does
    model = create_model(config.model, 3).eval()
    with torch.no_grad():  # logits centred and spread: about half of the pixels tumor, few near 0.5
        model.head.bias -= model(inputs).median()
        model.head.weight *= 300
        model.head.bias *= 300
        probs = torch.sigmoid(model(inputs))
    # the masks by hand, in the source's own orientation: probabilities resized to 24 x 40, then > 0.5
    probs = torch.nn.functional.interpolate(probs, size=(24, 40), mode="bilinear", align_corners=False)[:, 0].numpy()
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, config)
    summary = infer(checkpoint, tmp_path / "cases", tmp_path / "out", InferSettings(batch_size=8, torch_threads=1))
    assert summary["ok"] == 5
    rows = pd.read_parquet(tmp_path / "out").sort_values("slice_index")
    assert rows["slice_index"].tolist() == [0, 1, 2, 3, 4] and (rows["volume_id"] == "CASE7").all()
    assert (rows["height"] == 24).all() and (rows["width"] == 40).all()
    export(tmp_path / "out", to="nifti", out=tmp_path / "nii")
    image = nibabel.load(tmp_path / "nii" / "CASE7.nii.gz")
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    data = np.asarray(image.dataobj)
    assert data.shape == volume.shape and 0.2 < data.mean() < 0.8  # not all one value: a flip would show
    for row in rows.itertuples():
        k = row.slice_index
        np.testing.assert_array_equal(data[..., k], decode_mask_png(row.mask_png).astype(np.uint8))
        decided = np.abs(probs[k] - 0.5) > 1e-4
        assert decided.mean() > 0.9
        np.testing.assert_array_equal(data[..., k][decided], (probs[k] > 0.5)[decided], err_msg=f"slice {k}")
        for flipped in (data[::-1, :, k], data[:, ::-1, k]):  # the check would catch a flip
            assert (flipped[decided] != (probs[k] > 0.5)[decided]).mean() > 0.05
    export(tmp_path / "out", to="overlay", out=tmp_path / "overlay")
    assert len(list((tmp_path / "overlay" / "CASE7").glob("CASE7_*_overlay.png"))) == 5
