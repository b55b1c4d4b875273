"""The metric contract (raysegm.metrics) on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysegm.metrics import SegmentationMeter, bootstrap_ci, hd95, paired_bootstrap_diff, scores


def square(size: int, row: int, col: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[row:row + side, col:col + side] = True
    return mask


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        # TP, FP, FN, TN -> dice, iou, precision, recall, specificity, accuracy
        ((3, 1, 2, 10), (6 / 9, 3 / 6, 3 / 4, 3 / 5, 10 / 11, 13 / 16)),
        ((0, 0, 0, 16), (1, 1, 1, 1, 1, 1)),  # both empty: every ratio agrees
        ((0, 3, 0, 13), (0, 0, 0, 0, 13 / 16, 13 / 16)),  # empty truth, tumor predicted
        ((0, 0, 4, 12), (0, 0, 0, 0, 1, 12 / 16)),  # tumor missed entirely
        ((4, 0, 0, 0), (1, 1, 1, 1, 1, 1)),  # all tumor, all found: specificity's 0/0 agrees
        ((2, 0, 2, 0), (4 / 6, 2 / 4, 1, 2 / 4, 0, 2 / 4)),  # no background, half missed: 0/0 disagrees
    ],
)
def test_scores_by_hand(counts, expected):
    got = scores(counts)
    assert [got[k] for k in ("dice", "iou", "precision", "recall", "specificity", "accuracy")] == pytest.approx(expected)


def test_per_patient_dice_differs_from_per_slice_mean():
    # slice 0: a 10x10 tumor found exactly; slice 1: a 1-pixel tumor missed; slice 2: empty, predicted empty
    truth = np.stack([square(16, 2, 2, 10), square(16, 0, 0, 1), np.zeros((16, 16), bool)])
    pred = np.stack([square(16, 2, 2, 10), np.zeros((16, 16), bool), np.zeros((16, 16), bool)])
    meter = SegmentationMeter()
    meter.update(["A"] * 3, [0, 1, 2], pred, truth)
    summary = meter.summary(n_boot=50)
    assert summary["per_slice_mean_dice"] == pytest.approx((1 + 0 + 1) / 3)
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(2 * 100 / (100 + 101))
    assert summary["n_slices"] == 3 and summary["n_patients"] == 1 and summary["tumor_free_patients"] == 0


def test_tumor_free_patients_are_counted_and_scored_one_or_zero():
    empty = np.zeros((2, 8, 8), dtype=bool)
    spot = empty.copy()
    spot[1, 3, 3] = True
    tumor = empty.copy()
    tumor[0, 2:4, 2:4] = True
    meter = SegmentationMeter()
    meter.update(["clean", "clean"], [0, 1], empty, empty)  # tumor-free, predicted tumor-free
    meter.update(["false_alarm", "false_alarm"], [0, 1], spot, empty)  # tumor-free, one false pixel
    meter.update(["found", "found"], [0, 1], tumor, tumor)
    table = meter.per_patient_table().set_index("volume_id")
    assert table.loc["clean", "dice"] == 1 and table.loc["false_alarm", "dice"] == 0
    assert table.loc["found", "tumor_pixels"] == 4 and table.loc["false_alarm", "predicted_pixels"] == 1
    assert table["has_tumor"].tolist() == [False, False, True]
    summary = meter.summary(n_boot=50)
    assert summary["tumor_free_patients"] == 2
    assert summary["per_patient"]["dice"]["mean"] == pytest.approx(2 / 3)
    # pooled: TP 4, FP 1, FN 0 over 6 slices of 64 pixels
    assert summary["pooled"]["dice"] == pytest.approx(8 / 9)
    assert summary["pooled"]["accuracy"] == pytest.approx(383 / 384)


def random_batch(rng, count, size=8):
    prob = rng.random((count, 1, size, size)).astype(np.float32)
    truth = (rng.random((count, 1, size, size)) > 0.6).astype(np.float32)
    return prob, truth


def test_batches_and_workers_add_up_to_everything_at_once():
    rng = np.random.default_rng(0)
    volume_ids = ["A"] * 5 + ["B"] * 4 + ["C"] * 3
    slice_indices = [10, 11, 12, 13, 14, 0, 1, 2, 3, 7, 8, 9]
    prob, truth = random_batch(rng, 12)

    at_once = SegmentationMeter(keep_masks=True)
    at_once.update(volume_ids, slice_indices, prob, truth)

    batched = SegmentationMeter(keep_masks=True)  # patient A split across batches
    for start, stop in [(0, 3), (3, 7), (7, 12)]:
        batched.update(volume_ids[start:stop], slice_indices[start:stop], prob[start:stop], truth[start:stop])

    workers = [SegmentationMeter(keep_masks=True), SegmentationMeter(keep_masks=True)]
    for row in range(12):  # round-robin: every patient split across both workers
        workers[row % 2].update(volume_ids[row:row + 1], slice_indices[row:row + 1], prob[row:row + 1],
                                truth[row:row + 1])
    states = [worker.state() for worker in workers]
    for state in states:  # what a Ray gather carries: plain numpy and python values only
        assert isinstance(state["counts"], np.ndarray) and state["counts"].dtype == np.int64
        assert all(isinstance(v, str) for v in state["volume_ids"])
        assert all(isinstance(s, int) for s in state["slice_indices"])
    gathered = SegmentationMeter.from_states(states)

    expected = at_once.summary(n_boot=200)
    assert at_once.summary(n_boot=200, table=at_once.per_patient_table()) == expected
    for meter in (batched, gathered):
        assert np.array_equal(meter.state()["counts"], at_once.state()["counts"])
        assert meter.summary(n_boot=200) == expected
        assert meter.per_patient_table().equals(at_once.per_patient_table())
    per_volume_tp = at_once.per_slice_table().groupby("volume_id")["tp"].sum()
    assert per_volume_tp["A"] == int(((prob[:5] > 0.5) & (truth[:5] == 1)).sum())


def test_torch_tensors_and_thresholds_are_accepted():
    prob = torch.tensor([[[[0.2, 0.5], [0.51, 0.9]]]], dtype=torch.bfloat16)
    truth = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    meter = SegmentationMeter()
    meter.update(["A"], [0], prob, truth)  # P = prob > 0.5: 0.5 itself is background
    assert meter.per_slice_table()[["tp", "fp", "fn", "tn"]].iloc[0].tolist() == [2, 0, 1, 1]
    lower = SegmentationMeter(threshold=0.3)
    lower.update(["A"], [0], prob, truth)  # P = prob > 0.3: 0.5 is tumor now, 0.2 still not
    assert lower.per_slice_table()[["tp", "fp", "fn", "tn"]].iloc[0].tolist() == [3, 0, 0, 1]


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        (np.full((1, 4, 4), 3.0), np.zeros((1, 4, 4)), "logits"),
        (np.zeros((1, 4, 4)), np.full((1, 4, 4), 255.0), "only 0 and 1"),
        (np.zeros((1, 4, 4)), np.zeros((1, 4, 5)), "differ in shape"),
        (np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 4, 4)), r"\(B, H, W\)"),
    ],
)
def test_bad_batches_are_clear_errors(pred, target, message):
    with pytest.raises(ValueError, match=message):
        SegmentationMeter().update(["A"], [0], pred, target)


def test_a_slice_added_twice_is_an_error():
    meter = SegmentationMeter()
    meter.update(["A"], [3], np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="slice 3 of volume 'A' was added twice"):
        SegmentationMeter.from_states([meter.state(), meter.state()])
    with pytest.raises(ValueError, match="2 volume_ids"):
        meter.update(["A", "B"], [4], np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))


# ---------------------------------------------------------------------------------------------------
# HD95


def test_hd95_by_hand():
    point_a, point_b = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    point_a[2, 2], point_b[2, 5] = True, True
    assert hd95(point_a, point_b) == pytest.approx(3.0)
    assert hd95(point_a, point_b, spacing=(2.0, 0.5)) == pytest.approx(1.5)  # 3 columns of 0.5 mm
    # a 3x3 square against itself shifted by one column: surface distances are 0 or 1, p95 is 1
    assert hd95(square(8, 2, 2, 3), square(8, 2, 3, 3)) == pytest.approx(1.0)
    # 5x5 square vs the pixel at its centre: P's 16 surface pixels lie at 2, sqrt(5) or sqrt(8) from it
    distances = sorted(math.hypot(r - 2, c - 2) for r in range(5) for c in range(5) if r in (0, 4) or c in (0, 4))
    assert hd95(square(9, 2, 2, 5), square(9, 4, 4, 1)) == pytest.approx(np.percentile(distances, 95))
    # the 95th percentile, not the maximum: one stray pixel among 37 surface pixels does not move it,
    # though the plain Hausdorff distance to it is hypot(17, 17) = 24.0
    stray = square(32, 2, 2, 10)
    stray[28, 28] = True
    assert hd95(stray, square(32, 2, 2, 10)) == 0.0
    assert hd95(square(32, 2, 2, 10), stray) == 0.0
    # surfaces, not whole masks: a filled 7x7 square and its one-pixel ring share their surface, though
    # the square's 25 inner pixels lie 1 to 3 pixels inside the ring
    ring = square(11, 2, 2, 7)
    ring[3:8, 3:8] = False
    assert hd95(square(11, 2, 2, 7), ring) == 0.0
    assert hd95(ring, square(11, 2, 2, 7)) == 0.0


def test_hd95_with_empty_masks():
    empty = np.zeros((2, 8, 8), bool)
    spot = empty.copy()
    spot[0, 1, 1] = True
    assert hd95(empty, empty) == 0.0
    assert hd95(spot, empty) == pytest.approx(math.sqrt(8**2 + 8**2))  # the image's (a slice's) diagonal
    assert hd95(empty, spot, spacing=(3.0, 0.5, 2.0)) == pytest.approx(math.sqrt(4**2 + 16**2))
    assert hd95(spot[0], empty[0]) == pytest.approx(math.sqrt(8**2 + 8**2))  # a slice alone: the same


def test_hd95_is_computed_on_the_stacked_patient_in_slice_order():
    empty = np.zeros((8, 8), bool)
    spot = empty.copy()
    spot[4, 4] = True
    meter = SegmentationMeter(keep_masks=True)
    # added out of order: slices 3, 4, 5 stacked; truth on slice 3, prediction on slice 5 -> 2 voxels apart
    meter.update(["A", "A"], [5, 3], np.stack([spot, empty]), np.stack([empty, spot]))
    meter.update(["A"], [4], empty[None], empty[None])
    meter.update(["B"], [0], spot[None], spot[None])
    table = meter.per_patient_table(spacing={"A": (3.0, 1.0, 1.0), "B": (1.0, 1.0, 1.0)}).set_index("volume_id")
    assert table.loc["A", "hd95"] == pytest.approx(2.0)
    assert table.loc["A", "hd95_mm"] == pytest.approx(6.0)
    assert table.loc["B", "hd95"] == 0.0
    summary = meter.summary(spacing=(3.0, 1.0, 1.0), n_boot=50)
    assert summary["per_patient"]["hd95"]["mean"] == pytest.approx(1.0)
    assert summary["per_patient"]["hd95_mm"]["mean"] == pytest.approx(3.0)
    # the meter's own spacings, carried through its state: B has none (a 2D volume beside a NIfTI one)
    meter.set_spacing("A", (3.0, 1.0, 1.0))
    merged = SegmentationMeter.from_states([meter.state()])
    table = merged.per_patient_table().set_index("volume_id")
    assert table.loc["A", "hd95_mm"] == pytest.approx(6.0) and math.isnan(table.loc["B", "hd95_mm"])
    assert merged.summary(n_boot=50)["per_patient"]["hd95_mm"]["mean"] == pytest.approx(6.0)  # A's alone
    with pytest.raises(ValueError, match="has spacings"):
        merged.set_spacing("A", (1.0, 1.0, 1.0))


def test_without_kept_masks_hd95_is_absent_from_the_summary():
    meter = SegmentationMeter()
    meter.update(["A"], [0], np.ones((1, 4, 4), bool), np.ones((1, 4, 4), bool))
    assert "hd95" not in meter.summary(n_boot=10)["per_patient"]
    assert math.isnan(meter.per_patient_table()["hd95"].iloc[0])


# ---------------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = [0.2, 0.4, 0.9, 0.7, 0.5, 0.85, 0.1]
    low, high = bootstrap_ci(values, n_boot=2000, seed=0)
    assert low < np.mean(values) < high
    assert (low, high) == bootstrap_ci(values, n_boot=2000, seed=0)
    assert (low, high) != bootstrap_ci(values, n_boot=2000, seed=1)
    # a 95% interval of the mean: about 2 * 1.96 standard errors wide (a 90% one would be 18% narrower)
    assert high - low == pytest.approx(2 * 1.96 * np.std(values) / math.sqrt(len(values)), rel=0.1)
    wider = bootstrap_ci(values, n_boot=2000, seed=0, level=0.99)
    assert wider[0] < low and wider[1] > high
    assert bootstrap_ci([0.6, 0.6, 0.6]) == pytest.approx((0.6, 0.6))
    assert bootstrap_ci([0.3]) == pytest.approx((0.3, 0.3))


@pytest.mark.parametrize("values", [[], [0.5, float("nan")]])
def test_bootstrap_ci_rejects_empty_or_nan(values):
    with pytest.raises(ValueError, match="bootstrap_ci"):
        bootstrap_ci(values)


def test_paired_bootstrap_diff():
    a = {"p1": 0.9, "p2": 0.8, "p3": 0.7, "p4": 0.6}
    b = {"p4": 0.5, "p3": 0.6, "p2": 0.7, "p1": 0.8}  # another order: aligned by volume_id
    result = paired_bootstrap_diff(a, b)
    assert result == pytest.approx({"mean": 0.1, "ci_low": 0.1, "ci_high": 0.1})
    mixed = paired_bootstrap_diff([0.9, 0.5, 0.7, 0.2], [0.8, 0.6, 0.4, 0.2], seed=3)
    assert mixed["mean"] == pytest.approx((0.1 - 0.1 + 0.3 + 0) / 4)
    assert mixed["ci_low"] < 0 < mixed["ci_high"]  # one loss among the gains: no clear winner
    with pytest.raises(ValueError, match="same volume_ids"):
        paired_bootstrap_diff(a, {"p1": 0.1})
    with pytest.raises(ValueError, match="not pairs"):
        paired_bootstrap_diff([0.1, 0.2], [0.1])
