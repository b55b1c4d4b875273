"""Preprocessing, augmentation and the Ray Data pipeline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysegm.config import DataSettings
from raysegm.data.context import with_context
from raysegm.data.discover import prepare
from raysegm.data.io import DataError, read_image, read_mask
from raysegm.data.pipeline import (
    ReadCache,
    build_dataset,
    load_slice,
    load_slices,
    oversample_tumor,
    read_cache_key,
    read_resized,
)
from raysegm.data.preprocess import (
    augment,
    augment_intensity,
    build_augmenter,
    preprocess_image,
    preprocess_mask,
    resize_image,
    scale_image,
    volume_stats,
)

# ---------------------------------------------------------------------------------------------------
# preprocessing, against hand-computed values


def test_scale_divides_uint8_by_255_and_moves_channels_first():
    image = np.array([[[0, 51, 255], [102, 0, 0]]], dtype=np.uint8)  # (1, 2, 3)
    out = scale_image(image, DataSettings(), None)
    assert out.shape == (3, 1, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [0.0, 0.2, 1.0])
    np.testing.assert_allclose(out[:, 0, 1], [0.4, 0.0, 0.0])


def test_scale_min_max_scales_volume_values_with_the_volume_statistics():
    image = np.array([[[-100.0], [0.0], [250.0], [900.0]]], dtype=np.float32)  # (1, 4, 1)
    stats = {"norm_low": [0.0], "norm_high": [500.0], "norm_mean": [0.0], "norm_std": [1.0]}
    out = scale_image(image, DataSettings(), stats)
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0])


def test_volume_zscore_clips_then_standardizes():
    image = np.array([[[-100.0, 10.0], [0.0, 20.0], [250.0, 30.0], [900.0, 40.0]]], dtype=np.float32)
    stats = {"norm_low": [0.0, 10.0], "norm_high": [500.0, 30.0], "norm_mean": [100.0, 20.0],
             "norm_std": [50.0, 10.0]}
    out = scale_image(image, DataSettings(normalize="volume_zscore"), stats)
    np.testing.assert_allclose(out[0, 0], [-2.0, -2.0, 3.0, 8.0])
    np.testing.assert_allclose(out[1, 0], [-1.0, 0.0, 1.0, 1.0])


def test_imagenet_scales_then_standardizes_each_slice_with_imagenets_mean_and_std():
    image = np.array([[[0, 255, 51], [255, 0, 102]]], dtype=np.uint8)  # (1, 2, 3)
    out = scale_image(image, DataSettings(normalize="imagenet"), None)
    np.testing.assert_allclose(out[:, 0, 0], [-0.485 / 0.229, 0.544 / 0.224, -0.206 / 0.225], rtol=1e-5)
    np.testing.assert_allclose(out[:, 0, 1], [0.515 / 0.229, -0.456 / 0.224, -0.006 / 0.225], rtol=1e-4)
    stacked = scale_image(np.concatenate([image] * 3, axis=-1), DataSettings(normalize="imagenet"), None)
    np.testing.assert_allclose(stacked, np.concatenate([out] * 3), rtol=1e-6)  # 2.5D: per stacked slice
    volume = np.array([[[-100.0, 0.0, 250.0]]], dtype=np.float32)  # a float slice: min-max first
    stats = {"norm_low": [0.0] * 3, "norm_high": [500.0] * 3, "norm_mean": [0.0] * 3, "norm_std": [1.0] * 3}
    np.testing.assert_allclose(scale_image(volume, DataSettings(normalize="imagenet"), stats)[:, 0, 0],
                               [-0.485 / 0.229, -0.456 / 0.224, 0.094 / 0.225], rtol=1e-4)
    with pytest.raises(ValueError, match="ImageNet's mean and std are for 3 channels a slice, got an image of 1"):
        scale_image(image[..., :1], DataSettings(normalize="imagenet"), None)


def test_unknown_normalization_is_an_error():
    with pytest.raises(ValueError, match="normalize"):
        scale_image(np.zeros((2, 2, 3), np.uint8), DataSettings(normalize="minmax"), None)


def test_volume_stats_by_hand():
    images = np.zeros((2, 10, 10, 1))
    images[0, :, :, 0] = np.arange(100).reshape(10, 10)
    images[1, :, :, 0] = np.arange(100, 200).reshape(10, 10)
    stats = volume_stats(images, (0.5, 99.5))
    values = np.arange(200.0)
    low, high = np.percentile(values, [0.5, 99.5])
    assert stats["norm_low"] == pytest.approx([low]) and stats["norm_high"] == pytest.approx([high])
    assert stats["norm_mean"] == pytest.approx([np.clip(values, low, high).mean()])
    assert stats["norm_std"] == pytest.approx([np.clip(values, low, high).std()])
    listed = volume_stats([images[0], images[1][:5]], (0.0, 100.0))  # slices of different sizes
    assert listed["norm_low"] == [0.0] and listed["norm_high"] == [149.0]


def test_preprocess_shrinks_images_by_area_and_masks_by_area_fraction():
    import cv2

    image = np.full((128, 96, 3), 255, np.uint8)
    image[:, :49] = 0  # an edge off the 1.5x grid: output column 32 averages source columns 48 and half of 49
    out = preprocess_image(image, DataSettings(size=64), None)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, :, :32], 0.0)
    np.testing.assert_allclose(out[:, :, 32], (0 * 1.0 + 255 * 0.5) / 1.5 / 255)  # area; nearest gives 0
    np.testing.assert_allclose(out[:, :, 33:], 1.0)
    mask = (np.random.default_rng(0).random((128, 96)) < 0.5).astype(np.uint8)
    small = preprocess_mask(mask, 64)
    assert small.shape == (1, 64, 64) and small.dtype == np.float32
    assert set(np.unique(small)) <= {0.0, 1.0}
    # each output pixel is tumor where at least half of the source area under it is, as the image averages it
    area = cv2.resize(mask.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(small[0], (area >= 0.5).astype(np.float32))
    # by hand, a 2x shrink: a 2x2 block with two tumor pixels is tumor, one with one is not
    blocks = np.zeros((4, 4), np.uint8)
    blocks[0, 0] = blocks[0, 1] = 1  # top-left block: 2 of 4
    blocks[3, 3] = 1  # bottom-right block: 1 of 4
    np.testing.assert_array_equal(preprocess_mask(blocks, 2)[0], [[1, 0], [0, 0]])
    # nearest neighbour took each block's top-left pixel, (0, 0) here: it labelled this block background,
    # and every label sat half a source pixel up and left of its image
    lone = np.zeros((4, 4), np.uint8)
    lone[1, 1] = lone[1, 0] = 1
    np.testing.assert_array_equal(preprocess_mask(lone, 2)[0], [[1, 0], [0, 0]])


def test_a_shrunk_mask_stays_on_its_image():
    # the image is the mask itself: after preprocessing, the mask is where the image is brighter than half
    rng = np.random.default_rng(1)
    mask = np.zeros((256, 256), np.uint8)
    for _ in range(6):
        top, left, side = rng.integers(10, 200, 2).tolist() + [int(rng.integers(5, 40))]
        mask[top:top + side, left:left + side + 3] = 1
    image = np.repeat(mask[..., None] * 255, 3, axis=2).astype(np.uint8)
    out = preprocess_image(image, DataSettings(size=128), None)
    small = preprocess_mask(mask, 128)[0]
    np.testing.assert_array_equal(small, (out[0] >= 0.5).astype(np.float32))
    assert resize_image(np.zeros((20, 20, 1), np.float32), 8).shape == (8, 8, 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("shape", [(240, 240, 9), (250, 230, 15), (256, 256, 9), (100, 100, 9)])
def test_a_2_5d_stack_resizes_channel_by_channel(shape, dtype):
    # OpenCV's INTER_AREA refuses more than 4 channels at a fractional factor (240 -> 128)
    import cv2

    image = (np.random.default_rng(0).random(shape) * 255).astype(dtype)
    out = resize_image(image, 128)
    assert out.shape == (128, 128, shape[2]) and out.dtype == dtype
    method = cv2.INTER_AREA if 128 < min(shape[:2]) else cv2.INTER_LINEAR
    for channel in range(shape[2]):  # each channel alone, as a 1-channel image
        np.testing.assert_array_equal(out[..., channel],
                                      cv2.resize(np.ascontiguousarray(image[..., channel]), (128, 128),
                                                 interpolation=method))


# ---------------------------------------------------------------------------------------------------
# augmentation


def _shape_pair(size=64):
    """An asymmetric L-shape drawn into every image channel and into the mask."""
    mask = np.zeros((size, size), np.uint8)
    mask[14:44, 18:28] = 1
    mask[34:44, 28:46] = 1
    image = np.repeat((mask * 200)[..., None], 3, axis=-1).astype(np.uint8)
    return image, mask


@pytest.mark.parametrize("seed", range(8))
def test_augment_keeps_image_and_mask_aligned_and_changes_them(seed):
    image, mask = _shape_pair()
    out_image, out_mask = augment(image, mask, build_augmenter(DataSettings(size=64), seed=seed))
    assert out_image.shape == image.shape and out_mask.shape == mask.shape
    assert set(np.unique(out_mask)) <= {0, 1}
    shape = out_image[..., 1] > 100
    iou = (shape & (out_mask > 0)).sum() / (shape | (out_mask > 0)).sum()
    assert iou > 0.95
    assert not np.array_equal(out_mask, mask) and not np.array_equal(out_image, image)


def test_the_flip_is_drawn_independently_of_the_shift():
    """albumentations' Compose seeds every transform alike, which made the flip's coin the affine's first
    draw: a slice was flipped when it was shifted left (in 95% of seeds). Two marker columns in separate
    channels give the flip and the shift before it; with independent draws they agree about half the time."""
    size, n = 64, 300
    data = DataSettings(size=size, rotate_limit=0.0, zoom_limit=0.0, shear_limit=0.0)
    image = np.zeros((size, size, 3), np.float32)
    image[:, 24, 0] = image[:, 40, 1] = 1.0
    columns = np.arange(size)
    agree = flipped_count = 0
    for seed in range(n):
        out, _ = augment(image, np.zeros((size, size), np.uint8), build_augmenter(data, seed=seed))
        a, b = ((out[..., c].sum(0) * columns).sum() / out[..., c].sum() for c in (0, 1))
        flipped = a > b
        shift = (size - 1 - a - 24) if flipped else (a - 24)
        flipped_count += flipped
        agree += flipped == (shift < 0)
    assert 0.4 < flipped_count / n < 0.6
    assert 0.4 < agree / n < 0.6, agree / n  # about 0.5; 0.95 when the two shared one stream


FROZEN = dict(rotate_limit=0.0, shift_limit=0.0, zoom_limit=0.0, shear_limit=0.0, hflip=False)


def test_augment_with_every_limit_at_zero_is_the_identity():
    image, mask = _shape_pair()
    out_image, out_mask = augment(image, mask, build_augmenter(DataSettings(**FROZEN), seed=0))
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_array_equal(out_image, image)


def _drawn_affine(data: DataSettings, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The affine map one draw applied, recovered exactly: (A, shift of the centre) with dst = A src + b.

    The image's channels are each pixel's own column and row (+1000, so the zero border stands out);
    linear interpolation of a linear function is exact, so each output pixel holds the source
    coordinates it was read from, and a least-squares fit over the pixels inside gives the map.
    """
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.stack([cols + 1000, rows + 1000, np.full_like(cols, 1000)], axis=-1)
    out, _ = augment(image, np.zeros((size, size), np.uint8), build_augmenter(data, seed=seed))
    # pixels read wholly from inside: a border pixel with weight w on the zero fill holds 1000 (1 - w), and
    # its coordinates are off by about 1000 w, so w must stay under the fit's 0.01 tolerance / 1000
    rr, cc = np.nonzero(out[..., 2] > 999.995)
    design = np.stack([cc, rr, np.ones_like(cc)], axis=1).astype(np.float64)
    source = out[rr, cc, :2].astype(np.float64) - 1000
    coef, *_ = np.linalg.lstsq(design, source, rcond=None)  # source = [col row 1] @ coef
    assert np.abs(design @ coef - source).max() < 0.01, "the draw is not one affine map"
    forward = np.linalg.inv(coef[:2].T)
    centre = np.full(2, (size - 1) / 2)
    return forward, forward @ (centre - coef[2]) - centre


DRAWS = range(20)


def test_rotation_alone_stays_within_its_limit_and_uses_it():
    angles = []
    for seed in DRAWS:
        forward, shift = _drawn_affine(DataSettings(**{**FROZEN, "rotate_limit": 40.0}), seed)
        np.testing.assert_allclose(forward.T @ forward, np.eye(2), atol=1e-3)  # a rotation, nothing else
        np.testing.assert_allclose(shift, 0, atol=0.01)
        angles.append(np.degrees(np.arctan2(forward[1, 0], forward[0, 0])))
    assert max(abs(a) for a in angles) <= 40.0 + 0.01
    assert min(angles) < -25 and max(angles) > 25


def test_shift_alone_stays_within_its_fraction_of_the_side_and_uses_it():
    shifts = []
    for seed in DRAWS:
        forward, shift = _drawn_affine(DataSettings(**{**FROZEN, "shift_limit": 0.2}), seed)
        np.testing.assert_allclose(forward, np.eye(2), atol=1e-3)
        shifts.append(shift)
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 0.2 * 64 + 0.5
    assert (shifts.min(axis=0) < -6).all() and (shifts.max(axis=0) > 6).all()  # both axes, both ways


def test_zoom_alone_stays_within_its_limit_and_uses_it():
    scales = []
    for seed in DRAWS:
        forward, shift = _drawn_affine(DataSettings(**{**FROZEN, "zoom_limit": 0.2}), seed)
        np.testing.assert_allclose(forward - np.diag(np.diag(forward)), 0, atol=1e-3)
        np.testing.assert_allclose(shift, 0, atol=0.01)
        scales.extend(np.diag(forward))
    assert 0.8 - 1e-3 <= min(scales) < 0.9 and 1.1 < max(scales) <= 1.2 + 1e-3


def test_shear_alone_stays_within_its_limit_and_uses_it():
    shears = []
    for seed in DRAWS:
        forward, shift = _drawn_affine(DataSettings(**{**FROZEN, "shear_limit": 10.0}), seed)
        np.testing.assert_allclose(np.diag(forward), 1, atol=1e-3)
        np.testing.assert_allclose(shift, 0, atol=0.01)
        shears.extend(np.degrees(np.arctan([forward[0, 1], forward[1, 0]])))
    assert max(abs(a) for a in shears) <= 10.0 + 0.01
    assert min(shears) < -6 and max(shears) > 6


def test_hflip_alone_mirrors_about_half_the_draws():
    flipped = []
    for seed in DRAWS:
        forward, _ = _drawn_affine(DataSettings(**{**FROZEN, "hflip": True}), seed)
        np.testing.assert_allclose(np.abs(forward), np.eye(2), atol=1e-3)
        flipped.append(forward[0, 0] < 0)
    assert 4 <= sum(flipped) <= 16


def _scaled_stack(slices=1, seed=0):
    """A z-scored-looking (3 * slices, 16, 16) image whose three sequences differ."""
    rng = np.random.default_rng(seed)
    offsets = np.tile([0.0, 1.0, -1.0], slices)[:, None, None]
    return (rng.normal(size=(3 * slices, 16, 16)) + offsets).astype(np.float32)


def test_intensity_augment_off_is_the_identity_and_never_writes_into_its_input():
    image = _scaled_stack()
    kept = image.copy()
    out = augment_intensity(image, DataSettings(), np.random.default_rng(0))
    np.testing.assert_array_equal(out, kept)
    augment_intensity(image, DataSettings(intensity_augment=1.0, sequence_dropout=1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(image, kept)


def test_brightness_scales_each_sequence_by_one_factor_in_every_stacked_slice():
    image = _scaled_stack(slices=3)  # 2.5D: three slices of three sequences
    data = DataSettings(intensity_augment=1.0, contrast_limit=0.0, gamma_limit=(1.0, 1.0), brightness_limit=0.25)
    out = augment_intensity(image, data, np.random.default_rng(1))
    x, y = image.reshape(3, 3, -1), out.reshape(3, 3, -1)  # (slice, sequence, pixel)
    factors = []
    for sequence in range(3):
        factor = float((x[:, sequence] * y[:, sequence]).sum() / (x[:, sequence] ** 2).sum())  # least squares
        np.testing.assert_allclose(y[:, sequence], factor * x[:, sequence], atol=1e-5)
        assert 0.75 <= factor <= 1.25
        factors.append(factor)
    assert len({round(f, 4) for f in factors}) == 3, "one draw per sequence"


def test_gamma_by_hand_on_the_sequence_range():
    image = _scaled_stack(slices=2)
    data = DataSettings(intensity_augment=1.0, brightness_limit=0.0, contrast_limit=0.0, gamma_limit=(2.0, 2.0))
    out = augment_intensity(image, data, np.random.default_rng(0))
    stack = image.reshape(2, 3, 16, 16)
    for sequence in range(3):
        x = stack[:, sequence].astype(np.float64)
        lo, hi = x.min(), x.max()
        expected = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** 2
        np.testing.assert_allclose(out.reshape(2, 3, 16, 16)[:, sequence], expected, rtol=1e-5, atol=1e-5)


def test_contrast_scales_deviations_from_the_mean_within_the_range():
    image = _scaled_stack()
    data = DataSettings(intensity_augment=1.0, brightness_limit=0.0, gamma_limit=(1.0, 1.0), contrast_limit=0.5)
    for seed in range(6):
        out = augment_intensity(image, data, np.random.default_rng(seed))
        for sequence in range(3):
            x, y = image[sequence], out[sequence]
            inside = (y > x.min()) & (y < x.max())  # not clipped
            dx, dy = (x - x.mean())[inside], (y - x.mean())[inside]
            factor = float((dx * dy).sum() / (dx**2).sum())  # least squares
            np.testing.assert_allclose(dy, factor * dx, atol=1e-5)
            assert 0.5 <= factor <= 1.5
            assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6


def test_sequence_dropout_copies_flair_into_pre_and_post_contrast():
    image = _scaled_stack(slices=3)
    out = augment_intensity(image, DataSettings(sequence_dropout=1.0), np.random.default_rng(0)).reshape(3, 3, 16, 16)
    stack = image.reshape(3, 3, 16, 16)
    for sequence in range(3):
        np.testing.assert_array_equal(out[:, sequence], stack[:, 1])
    # at 0.5 each sequence is dropped on its own: all four outcomes occur, FLAIR itself always kept
    outcomes = set()
    for seed in range(40):
        out = augment_intensity(image, DataSettings(sequence_dropout=0.5), np.random.default_rng(seed)).reshape(3, 3, 16, 16)
        np.testing.assert_array_equal(out[:, 1], stack[:, 1])
        outcomes.add(tuple(bool(np.array_equal(out[:, q], stack[:, 1])) for q in (0, 2)))
    assert outcomes == {(False, False), (False, True), (True, False), (True, True)}
    with pytest.raises(ValueError, match="in_channels 1"):
        augment_intensity(image[:1], DataSettings(in_channels=1, sequence_dropout=0.5), np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------------
# tumor oversampling (pure pandas)


def test_oversample_tumor_counts():
    rows = pd.DataFrame({"volume_id": ["a"] * 6, "slice_index": range(6),
                         "has_tumor": [True, False, True, True, False, True]})
    assert oversample_tumor(rows, 1.0) is rows
    doubled = oversample_tumor(rows, 2.0)
    assert Counter(doubled["slice_index"]) == {0: 2, 1: 1, 2: 2, 3: 2, 4: 1, 5: 2}
    halves = [Counter(oversample_tumor(rows, 1.5, seed=s)["slice_index"]) for s in range(40)]
    for counts in halves:
        assert counts[1] == counts[4] == 1 and all(counts[k] in (1, 2) for k in (0, 2, 3, 5))
    extra = np.mean([sum(c.values()) - 6 for c in halves]) / 4
    assert 0.3 < extra < 0.7  # each tumor slice gets its extra copy about half the time
    with pytest.raises(ValueError):
        oversample_tumor(rows, 0.5)


# ---------------------------------------------------------------------------------------------------
# the Ray Data pipeline


def _collect(dataset):
    batches = list(dataset.iter_batches(batch_size=4, batch_format="numpy"))
    for batch in batches:
        assert len(batch["image"]) <= 4
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


@pytest.fixture(scope="module")
def synth_manifest(synth_dir, tmp_path_factory):
    manifest, _ = prepare(synth_dir, tmp_path_factory.mktemp("pipe") / "manifest.parquet")
    return manifest


# ---------------------------------------------------------------------------------------------------
# the read cache of the read workers


def test_read_cache_keeps_the_most_recently_used_entries_within_its_budget():
    cache = ReadCache(max_bytes=250)
    entry = {name: (np.full(100, i, np.uint8),) for i, name in enumerate("abcd")}
    reads = []

    def get(name):
        return cache.get(name, lambda: (reads.append(name), entry[name])[1])

    get("a"), get("b"), get("a")  # a is now the most recently used
    get("c")  # 300 bytes > 250: b, the least recently used, goes
    assert (cache.hits, cache.misses, cache.nbytes) == (1, 3, 200)
    get("a"), get("b"), get("a")  # a hit; b is read again and c, now the oldest, goes; a hit
    assert reads == ["a", "b", "c", "b"] and (cache.hits, cache.nbytes) == (3, 200)
    big = cache.get("big", lambda: (np.zeros(251, np.uint8),))  # larger than the budget: returned, not kept
    assert big[0].size == 251 and cache.nbytes == 200 and "big" not in cache._entries
    with pytest.raises(ValueError, match="read-only"):
        get("a")[0][0] = 7  # an entry cannot be changed by whoever reads it


def test_read_cache_returns_what_reading_returns_on_real_25d_rows(lgg_sample, tmp_path):
    manifest, _ = prepare(lgg_sample, tmp_path / "manifest.parquet")
    data = DataSettings(size=64, context_slices=1, normalize="volume_zscore", intensity_augment=0.5,
                        sequence_dropout=0.2)
    records = with_context(manifest.reset_index(drop=True), 1).iloc[::7].to_dict("records")
    cache = ReadCache(max_bytes=2**30)
    for epoch in range(2):  # the second pass is all hits, through the same augmentation draws
        plain_aug, cached_aug = build_augmenter(data, seed=epoch), build_augmenter(data, seed=epoch)
        plain_rng, cached_rng = np.random.default_rng(epoch), np.random.default_rng(epoch)
        for record in records:
            plain = load_slice(record, data, plain_aug, plain_rng)
            cached = load_slice(record, data, cached_aug, cached_rng, cache)
            np.testing.assert_array_equal(cached[0], plain[0])
            np.testing.assert_array_equal(cached[1], plain[1])
        assert (cache.misses, cache.hits) == (len(records), epoch * len(records))
    image, mask = read_resized(records[0], data)
    assert image.shape == (64, 64, 9) and mask.shape == (64, 64) and image.dtype == mask.dtype == np.uint8
    assert cache.nbytes == len(records) * (image.nbytes + mask.nbytes)


def test_read_cache_reads_a_changed_file_again_and_keeps_nothing_unreadable(synth_manifest, tmp_path):
    import os
    import shutil

    import tifffile

    record = synth_manifest[synth_manifest["has_tumor"]].iloc[0].to_dict()
    for column in ("image_path", "mask_path"):  # a private copy: the fixture's files stay as they are
        record[column] = shutil.copy(record[column], tmp_path)
    data = DataSettings(size=32)
    cache = ReadCache(max_bytes=2**20)
    before = load_slice(record, data, cache=cache)[0]
    tifffile.imwrite(record["image_path"], 255 - tifffile.imread(record["image_path"]), photometric="rgb")
    status = os.stat(record["image_path"])
    os.utime(record["image_path"], ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    after = load_slice(record, data, cache=cache)[0]
    assert cache.misses == 2 and not np.array_equal(after, before)
    np.testing.assert_array_equal(after, load_slice(record, data)[0])
    Path(record["image_path"]).write_bytes(b"not a tif")
    for _ in range(2):  # the error is raised each time: nothing was kept for it
        with pytest.raises(DataError, match=record["image_path"]):
            load_slice(record, data, cache=cache)
    assert len(cache._entries) == 2 and read_cache_key(record, data) not in cache._entries


def test_read_cache_on_per_modality_nifti_files_and_on_rows_it_cannot_key(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    for modality in range(3):  # nnU-Net's CASE_0000..CASE_0002: image_path joins the three files by |
        volume = rng.integers(0, 3000, size=(40, 30, 5)).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / f"case_{modality:04d}.nii.gz")
    mask = np.zeros((40, 30, 5), np.uint8)
    mask[10:20, 5:15, 1:3] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "case_seg.nii.gz")
    manifest, _ = prepare(tmp_path, tmp_path / "out" / "manifest.parquet")
    rows = with_context(manifest.reset_index(drop=True), 1)
    assert rows["image_path"].str.count("[|]").eq(2).all()
    data = DataSettings(size=32, context_slices=1, normalize="volume_zscore")
    cache = ReadCache(max_bytes=2**30)
    for _ in range(2):
        for record in rows.to_dict("records"):
            cached = load_slice(record, data, cache=cache)
            np.testing.assert_array_equal(cached[0], load_slice(record, data)[0])
            np.testing.assert_array_equal(cached[1], load_slice(record, data)[1])
    assert (cache.misses, cache.hits) == (len(rows), len(rows))
    # a row the cache cannot key is read as without it, and fails as that read does
    record = rows.iloc[0].to_dict()
    missing = {**record, "context_paths": [str(tmp_path / "gone_0000.nii.gz")] * 3}
    with pytest.raises(DataError, match="gone_0000"):
        load_slice(missing, data, cache=cache)
    no_context = {key: value for key, value in record.items() if key not in ("context_paths", "context_slices")}
    with pytest.raises(ValueError, match="no context columns"):
        load_slice(no_context, data, cache=cache)
    assert (cache.misses, cache.hits) == (len(rows), len(rows))


def test_lgg_validation_split_streams_every_slice_once_preprocessed(ray_session, lgg_sample, tmp_path):
    manifest, _ = prepare(lgg_sample, tmp_path / "manifest.parquet")
    data = DataSettings(size=64, intensity_augment=1.0, sequence_dropout=1.0)  # training-only: never here
    rows = manifest[manifest["split"] == "val"].reset_index(drop=True)
    out = _collect(build_dataset(manifest, "val", data, augment=True))
    assert out["image"].shape == (len(rows), 3, 64, 64) and out["image"].dtype == np.float32
    assert out["mask"].shape == (len(rows), 1, 64, 64) and out["mask"].dtype == np.float32
    assert out["slice_index"].dtype == np.int32
    assert list(zip(out["volume_id"], out["slice_index"])) == list(zip(rows["volume_id"], rows["slice_index"]))
    assert set(np.unique(out["mask"])) <= {0.0, 1.0}
    for i in (0, len(rows) // 2, len(rows) - 1):  # validation is exactly the shared preprocessing
        record = rows.iloc[i].to_dict()
        np.testing.assert_array_equal(out["image"][i], preprocess_image(read_image(record), data, record))
        np.testing.assert_array_equal(out["mask"][i], preprocess_mask(read_mask(record), 64))
    assert (out["mask"].reshape(len(rows), -1).max(axis=1) > 0).tolist() == rows["has_tumor"].tolist()


def test_train_split_oversamples_shuffles_and_augments_per_epoch(ray_session, synth_manifest):
    rows = synth_manifest[synth_manifest["split"] == "train"]
    tumor = {(r.volume_id, r.slice_index) for r in rows.itertuples() if r.has_tumor}
    assert 0 < len(tumor) < len(rows)
    data = DataSettings(size=64, tumor_oversample=2.0)
    dataset = build_dataset(synth_manifest, "train", data, augment=True, seed=0)
    epochs = [_collect(dataset) for _ in range(2)]
    for out in epochs:
        assert out["image"].shape == (len(rows) + len(tumor), 3, 64, 64)
        assert out["mask"].shape == (len(rows) + len(tumor), 1, 64, 64)
        assert set(np.unique(out["mask"])) <= {0.0, 1.0}
        counts = Counter(zip(out["volume_id"].tolist(), out["slice_index"].tolist()))
        assert {key: n for key, n in counts.items() if n == 2}.keys() == tumor
        assert set(counts.values()) == {1, 2}
    first, second = ([(v, s) for v, s in zip(o["volume_id"], o["slice_index"])] for o in epochs)
    assert first != second, "a new order each epoch"
    # the same slice comes out differently augmented in the two epochs
    key = (rows["volume_id"].iloc[0], rows["slice_index"].iloc[0])
    images = [o["image"][[(v, s) == key for v, s in zip(o["volume_id"], o["slice_index"])]][0] for o in epochs]
    assert not np.array_equal(images[0], images[1])


def test_the_training_batches_get_sequence_dropout_and_evaluation_batches_do_not(synth_manifest):
    rows = synth_manifest[synth_manifest["split"] == "train"].head(6)
    data = DataSettings(size=64, sequence_dropout=1.0)
    # with or without the geometric augmentation (data.augment: false keeps the intensity kinds)
    for geometric in (True, False):
        dropped = load_slices(rows, data, augment=geometric, intensity=True)["image"]
        np.testing.assert_array_equal(dropped[:, 0], dropped[:, 1])
        np.testing.assert_array_equal(dropped[:, 2], dropped[:, 1])
    for geometric in (True, False):  # evaluation batches: intensity off
        plain = load_slices(rows, data, augment=geometric, intensity=False)["image"]
        assert not np.array_equal(plain[:, 0], plain[:, 1]) and not np.array_equal(plain[:, 2], plain[:, 1])


def test_the_train_split_gets_sequence_dropout_with_data_augment_off_and_val_does_not(ray_session, synth_manifest):
    data = DataSettings(size=64, sequence_dropout=1.0, augment=False)
    train = _collect(build_dataset(synth_manifest, "train", data, augment=data.augment))
    np.testing.assert_array_equal(train["image"][:, 0], train["image"][:, 1])  # pre-contrast is FLAIR
    np.testing.assert_array_equal(train["image"][:, 2], train["image"][:, 1])  # post-contrast too
    val = _collect(build_dataset(synth_manifest, "val", data, augment=False))
    assert not np.array_equal(val["image"][:, 0], val["image"][:, 1])


def test_train_split_without_augmentation_is_the_plain_preprocessing(ray_session, synth_manifest):
    data = DataSettings(size=64)
    out = _collect(build_dataset(synth_manifest, "train", data, augment=False))
    rows = synth_manifest[synth_manifest["split"] == "train"].set_index(["volume_id", "slice_index"])
    assert len(out["image"]) == len(rows)
    for i in range(0, len(out["image"]), 9):
        record = rows.loc[(out["volume_id"][i], out["slice_index"][i])].to_dict()
        record["slice_index"] = out["slice_index"][i]
        np.testing.assert_array_equal(out["image"][i], preprocess_image(read_image(record), data, record))


def test_load_slice_on_an_int16_nifti_volume_uses_its_statistics(tmp_path):
    import nibabel as nib

    volume = np.random.default_rng(0).integers(-500, 4000, size=(40, 30, 6, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "case.nii.gz")
    mask = np.zeros((40, 30, 6), np.uint8)
    mask[10:20, 5:15, 2] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "case_mask.nii.gz")
    manifest, _ = prepare(tmp_path, tmp_path / "out" / "manifest.parquet")
    record = manifest[manifest["slice_index"] == 2].iloc[0].to_dict()
    for normalize in ("scale", "volume_zscore"):
        data = DataSettings(size=32, normalize=normalize)
        image, mask_out = load_slice(record, data)
        np.testing.assert_array_equal(image, preprocess_image(read_image(record), data, record))
        assert image.shape == (3, 32, 32) and mask_out.shape == (1, 32, 32)
        assert mask_out.sum() > 0
    pixels = volume.reshape(-1, 3).astype(float)
    np.testing.assert_allclose(record["norm_low"], np.percentile(pixels, 0.5, axis=0))
    np.testing.assert_allclose(record["norm_high"], np.percentile(pixels, 99.5, axis=0))
    scaled, _ = load_slice(record, DataSettings(size=40, normalize="scale"))
    assert scaled.min() >= 0.0 and scaled.max() <= 1.0
    # uniform int16 values over [-500, 4000): min-max scaling leaves a mean near one half
    assert abs(scaled.mean() - 0.5) < 0.05


def test_unlabeled_slices_are_left_out_but_stay_neighbours(ray_session, synth_manifest, capsys):
    data = DataSettings(size=64, context_slices=1)
    rows = synth_manifest[synth_manifest["split"] == "val"].sort_values(["volume_id", "slice_index"])
    missing = (rows["volume_id"].iloc[0], int(rows["slice_index"].iloc[3]))  # a mask gone from one slice
    unlabeled = synth_manifest.copy()
    gone = (unlabeled["volume_id"] == missing[0]) & (unlabeled["slice_index"] == missing[1])
    unlabeled.loc[gone, ["labeled", "mask_path"]] = [False, None]
    out = _collect(build_dataset(unlabeled, "val", data, augment=False))
    assert "split 'val': 1 unlabeled slices have no mask" in capsys.readouterr().out
    keys = list(zip(out["volume_id"], out["slice_index"].tolist()))
    assert missing not in keys and len(keys) == len(rows) - 1
    whole = _collect(build_dataset(synth_manifest, "val", data, augment=False))
    by_key = dict(zip(zip(whole["volume_id"], whole["slice_index"].tolist()), whole["image"]))
    for i, key in enumerate(keys):  # the slices beside the unlabeled one still see it as a neighbour
        np.testing.assert_array_equal(out["image"][i], by_key[key])


def test_grayscale_slices_train_as_one_channel_and_never_as_three(tmp_path):
    from PIL import Image

    root = tmp_path / "gray" / "case"
    root.mkdir(parents=True)
    image = np.arange(20 * 20, dtype=np.uint8).reshape(20, 20)
    mask = np.zeros((20, 20), np.uint8)
    mask[4:9, 6:12] = 255
    for k in (1, 2):
        Image.fromarray(image + k).save(root / f"img_{k}.png")
        Image.fromarray(mask).save(root / f"img_{k}_mask.png")
    manifest, rejects = prepare(root.parent, tmp_path / "manifest.parquet")
    assert rejects.empty and manifest["channels"].tolist() == [1, 1]
    manifest["split"] = "train"
    with pytest.raises(ValueError, match=r"split 'train': 2 slices have \[1\] channels, data.in_channels is 3 "
                                         r"\(first: .*img_1.png\)"):
        build_dataset(manifest, "train", DataSettings(size=16), augment=False)
    pixels, target = load_slice(manifest.iloc[0].to_dict(), DataSettings(size=20, in_channels=1))
    np.testing.assert_allclose(pixels, (image + 1)[None] / np.float32(255), rtol=1e-6)  # at its size: no resize
    np.testing.assert_array_equal(target[0], mask // 255)


def test_bad_splits_are_errors(synth_manifest):
    with pytest.raises(ValueError, match="no slices"):
        build_dataset(synth_manifest, "holdout", DataSettings(size=64), augment=False)
    unlabeled = synth_manifest.copy()
    unlabeled[["labeled", "mask_path"]] = [False, None]
    with pytest.raises(ValueError, match="split 'val' has no labeled slice"):
        build_dataset(unlabeled, "val", DataSettings(size=64), augment=False)
    with pytest.raises(ValueError, match="clip_percentiles"):
        build_dataset(synth_manifest, "train", DataSettings(normalize="volume_zscore", clip_percentiles=(1.0, 99.0)),
                      augment=False)
