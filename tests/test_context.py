"""2.5D input (raysegm.data.context): neighbours by hand, and the pipeline, evaluation and inference
reading the same stacks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from raysegm.checkpoint import load_config_of, save_checkpoint
from raysegm.config import DataSettings, InferSettings, from_dict
from raysegm.data.context import read_input, with_context
from raysegm.data.discover import prepare
from raysegm.data.io import DataError, read_mask
from raysegm.data.pipeline import build_dataset
from raysegm.data.preprocess import preprocess_image
from raysegm.evaluate import evaluate_checkpoint
from raysegm.infer import decode_mask_png, infer
from raysegm.metrics import confusion_counts, scores
from raysegm.models import create_model

SIZE = 64


def _rows(slices: dict[str, list[int]]) -> pd.DataFrame:
    pairs = [(volume, index) for volume, indices in slices.items() for index in indices]
    return pd.DataFrame({"volume_id": [v for v, _ in pairs], "slice_index": [s for _, s in pairs],
                         "image_path": [f"{v}/{v}_{s}.tif" for v, s in pairs]},
                        index=range(100, 100 + len(pairs)))


def _context(rows: pd.DataFrame, volume: str, index: int) -> list[int]:
    row = rows[(rows["volume_id"] == volume) & (rows["slice_index"] == index)].iloc[0]
    assert row["context_paths"] == [f"{volume}/{volume}_{s}.tif" for s in row["context_slices"]]
    return row["context_slices"]


def test_neighbours_follow_slice_order_and_repeat_at_the_ends():
    rows = _rows({"A": [3, 1, 4, 2], "B": [7]})  # out of order on purpose
    one = with_context(rows, 1)
    assert [_context(one, "A", s) for s in (1, 2, 3, 4)] == [[1, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    assert _context(one, "B", 7) == [7, 7, 7]
    assert list(one.index) == list(rows.index) and "context_paths" not in rows.columns  # a copy, same rows
    two = with_context(rows, 2)
    assert _context(two, "A", 2) == [1, 1, 2, 3, 4] and _context(two, "A", 4) == [2, 3, 4, 4, 4]
    gap = with_context(_rows({"A": [1, 2, 5, 6]}), 1)  # slices 3 and 4 absent: neighbours by position
    assert _context(gap, "A", 2) == [1, 2, 5] and _context(gap, "A", 5) == [2, 5, 6]
    assert with_context(rows, 0) is rows


def test_bad_context_requests_are_errors():
    with pytest.raises(ValueError, match="context_slices must be >= 0"):
        with_context(_rows({"A": [1]}), -1)
    with pytest.raises(ValueError, match="appears twice"):
        with_context(pd.concat([_rows({"A": [1, 2]})] * 2), 1)
    with pytest.raises(ValueError, match="no context columns"):
        read_input({"image_path": "A/A_1.tif", "slice_index": 1, "source_format": "kaggle_3m"},
                   DataSettings(context_slices=1))


def test_read_input_stacks_the_neighbours_channels_in_order(synth_dir, tmp_path):
    manifest, _ = prepare(synth_dir, tmp_path / "context-manifest.parquet")
    volume = manifest[manifest["volume_id"] == manifest["volume_id"].iloc[0]].sort_values("slice_index")
    rows = with_context(volume, 1).to_dict("records")
    files = [tifffile.imread(record["image_path"]) for record in rows]  # (H, W, 3) each, by hand
    data = DataSettings(context_slices=1)
    for position in (0, 5, len(rows) - 1):
        stack = read_input(rows[position], data)
        previous, following = max(position - 1, 0), min(position + 1, len(rows) - 1)
        expected = np.concatenate([files[previous], files[position], files[following]], axis=-1)
        assert stack.shape == (SIZE, SIZE, 9) and stack.dtype == np.uint8
        np.testing.assert_array_equal(stack, expected)
    np.testing.assert_array_equal(read_input(rows[3], DataSettings()), files[3])  # k = 0: the slice alone


def test_a_neighbour_of_another_size_is_an_error_naming_it(tmp_path):
    for index, side in ((1, 32), (2, 40)):
        tifffile.imwrite(tmp_path / f"P_{index}.tif", np.zeros((side, side, 3), np.uint8))
    rows = with_context(pd.DataFrame({"volume_id": ["P", "P"], "slice_index": [1, 2], "source_format": "kaggle_3m",
                                      "image_path": [str(tmp_path / "P_1.tif"), str(tmp_path / "P_2.tif")]}), 1)
    with pytest.raises(DataError, match=r"P_2\.tif: size \(40, 40\) differs from its neighbour .*P_1\.tif"):
        read_input(rows.iloc[0].to_dict(), DataSettings(context_slices=1))


def test_a_stack_is_scaled_with_the_volume_statistics_of_each_slice():
    rng = np.random.default_rng(0)
    slices = [rng.normal(100, 30, size=(8, 8, 3)).astype(np.float32) for _ in range(3)]
    stats = {"norm_low": [50.0, 60.0, 70.0], "norm_high": [150.0, 160.0, 170.0],
             "norm_mean": [100.0, 101.0, 102.0], "norm_std": [20.0, 25.0, 30.0]}
    for normalize in ("scale", "volume_zscore"):
        data = DataSettings(size=8, normalize=normalize, context_slices=1)
        stacked = preprocess_image(np.concatenate(slices, axis=-1), data, stats)
        apart = np.concatenate([preprocess_image(s, DataSettings(size=8, normalize=normalize), stats) for s in slices])
        np.testing.assert_array_equal(stacked, apart)
    z = (np.clip(slices[1][..., 2], 70, 170) - 102) / 30  # channel 5 = the centre slice's third channel
    np.testing.assert_allclose(stacked[5], z, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="3 per-channel values for an image of 4 channels"):
        preprocess_image(np.zeros((8, 8, 4), np.float32), DataSettings(size=8, normalize="volume_zscore"), stats)


def test_the_pipeline_streams_each_slice_with_its_neighbours(ray_session, synth_dir, tmp_path):
    manifest, _ = prepare(synth_dir, tmp_path / "manifest.parquet")
    data = DataSettings(size=SIZE, normalize="volume_zscore", context_slices=1)
    batches = list(build_dataset(manifest, "val", data, augment=False).iter_batches(batch_size=None))
    out = {key: np.concatenate([b[key] for b in batches]) for key in ("image", "volume_id", "slice_index")}
    rows = manifest[manifest["split"] == "val"].sort_values(["volume_id", "slice_index"])
    assert out["image"].shape == (len(rows), 9, SIZE, SIZE)
    plain = DataSettings(size=SIZE, normalize="volume_zscore")
    by_key = {(r["volume_id"], r["slice_index"]): r for r in rows.to_dict("records")}
    for i in range(len(rows)):
        volume, index = out["volume_id"][i], int(out["slice_index"][i])
        indices = sorted(s for v, s in by_key if v == volume)
        position = indices.index(index)
        for block, neighbour in enumerate((max(position - 1, 0), position, min(position + 1, len(indices) - 1))):
            record = by_key[(volume, indices[neighbour])]
            # each block is that slice preprocessed alone, with the (shared) statistics of the volume
            expected = preprocess_image(tifffile.imread(record["image_path"]), plain, by_key[(volume, index)])
            np.testing.assert_array_equal(out["image"][i, 3 * block:3 * block + 3], expected)


@pytest.mark.slow
def test_a_2_5d_checkpoint_is_scored_and_segmented_from_the_same_stacks(ray_session, synth_dir, tmp_path):
    manifest_path = tmp_path / "manifest.parquet"
    manifest, _ = prepare(synth_dir, manifest_path)
    config = from_dict({"data": {"size": SIZE, "manifest": str(manifest_path), "context_slices": 1},
                        "model": {"variant": "unet", "unet_width": 4, "unet_depth": 2}})
    test_rows = with_context(manifest, 1)
    test_rows = test_rows[test_rows["split"] == "test"].sort_values(["volume_id", "slice_index"])
    # the inputs by hand: three slice files side by side, then the 2D preprocessing with tiled statistics
    inputs = torch.from_numpy(np.stack([
        preprocess_image(np.concatenate([tifffile.imread(p) for p in record["context_paths"]], axis=-1),
                         config.data, record)
        for record in test_rows.to_dict("records")]))
    torch.manual_seed(0)
    model = create_model(config.model, in_channels=9).eval()
    with torch.no_grad():
        model.head.bias -= model(inputs).median()  # about half of the pixels tumor
        probs = torch.sigmoid(model(inputs))[:, 0]
    checkpoint = save_checkpoint(tmp_path / "ckpt", model, config)
    assert load_config_of(checkpoint)[1]["in_channels"] == 9

    output = tmp_path / "masks"
    infer(checkpoint, synth_dir, output, InferSettings(batch_size=8, cpus_per_replica=0.5, torch_threads=1))
    masks = pd.read_parquet(output).set_index(["volume_id", "slice_index"])
    assert len(masks) == len(manifest) and (masks["status"] == "ok").all()
    for position, record in enumerate(test_rows.to_dict("records")):
        mask = decode_mask_png(masks.loc[(record["volume_id"], record["slice_index"]), "mask_png"])
        decided = (probs[position] - 0.5).abs().numpy() > 1e-5
        np.testing.assert_array_equal(mask[decided], (probs[position] > 0.5).numpy()[decided])

    summary = evaluate_checkpoint(checkpoint, split="test", out=tmp_path / "scores")
    table = pd.read_csv(tmp_path / "scores" / "per_patient.csv").set_index("volume_id")
    for volume_id, rows in test_rows.groupby("volume_id"):
        predicted = np.stack([decode_mask_png(masks.loc[(volume_id, s), "mask_png"]) > 0
                              for s in rows["slice_index"]])
        truth = np.stack([read_mask(record) > 0 for record in rows.to_dict("records")])
        dice = scores(confusion_counts(predicted, truth).sum(axis=0))["dice"]
        assert 0 < dice < 1 and table.loc[volume_id, "dice"] == pytest.approx(dice, abs=1e-3)
    assert summary["n_patients"] == test_rows["volume_id"].nunique()
