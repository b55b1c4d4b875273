"""The metric contract: per-patient headline numbers, pooled and per-slice ones.

A prediction P is `probability > threshold` (0.5) or a boolean mask; G is the {0, 1} truth.

    Dice = 2TP / (2TP + FP + FN)     IoU = TP / (TP + FP + FN)
    precision = TP / (TP + FP)       recall = TP / (TP + FN)
    specificity = TN / (TN + FP)     accuracy = (TP + TN) / (TP + FP + FN + TN)

A ratio whose denominator is 0 is 1 when P and G agree (FP = FN = 0, e.g. both empty), else 0.
Per-patient: each metric on all slices of one volume at once; mean, median and a 95% percentile
bootstrap interval over patients. Pooled: every pixel of the split summed. Per-slice mean Dice is
reported as such (an empty slice predicted empty scores 1, which flatters it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

BOOTSTRAP_SAMPLES = 2000  # resamples behind every 95% interval; seed 0, so a table is reproducible

METRICS = ("dice", "iou", "precision", "recall", "specificity", "accuracy")


def ratio(numerator: int, denominator: int, agree: bool) -> float:
    """numerator / denominator, or 1.0 / 0.0 for a zero denominator when P and G agree / disagree."""
    if denominator == 0:
        return 1.0 if agree else 0.0
    return numerator / denominator


def scores(counts: Sequence[int]) -> dict[str, float]:
    """The six overlap metrics from confusion counts (TP, FP, FN, TN)."""
    tp, fp, fn, tn = (int(c) for c in counts)
    agree = fp == 0 and fn == 0
    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn, agree),
        "iou": ratio(tp, tp + fp + fn, agree),
        "precision": ratio(tp, tp + fp, agree),
        "recall": ratio(tp, tp + fn, agree),
        "specificity": ratio(tn, tn + fp, agree),
        "accuracy": ratio(tp + tn, tp + fp + fn + tn, agree),
    }


def confusion_counts(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(TP, FP, FN, TN) as int64 over the last two axes of boolean arrays: shape (..., 4)."""
    axes = (-2, -1)
    tp = (pred & target).sum(axis=axes)
    fp = (pred & ~target).sum(axis=axes)
    fn = (~pred & target).sum(axis=axes)
    tn = (~pred & ~target).sum(axis=axes)
    return np.stack([tp, fp, fn, tn], axis=-1).astype(np.int64)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    # border_value=0: a mask touching the image edge has its surface there
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two boolean masks.

    max(p95 of distances from P's surface voxels to G's surface, p95 of G's surface to P's), with
    Euclidean distance transforms. Works on a slice (H, W) or a stacked volume (S, H, W); distances are
    in voxels of the input's own resolution, or in the units of `spacing` (one value per axis, e.g. mm).
    0 when both masks are empty; the image's diagonal when exactly one is (the contract): sqrt(H^2 + W^2)
    pixels of one slice, each side times its spacing, whether the masks are a slice or a volume, so the
    penalty for a missed or invented lesion does not grow with the patient's number of slices.
    """
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"hd95: prediction {pred.shape} and truth {target.shape} differ in shape")
    spacing = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    if spacing.shape != (pred.ndim,):
        raise ValueError(f"hd95: spacing needs {pred.ndim} values, got {spacing.tolist()}")
    has_pred, has_target = pred.any(), target.any()
    if not has_pred and not has_target:
        return 0.0
    if has_pred != has_target:
        return float(np.sqrt(np.sum((np.array(pred.shape[-2:]) * spacing[-2:]) ** 2)))
    pred_surface, target_surface = _surface(pred), _surface(target)
    to_target = ndimage.distance_transform_edt(~target_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    return float(max(np.percentile(to_target[pred_surface], 95), np.percentile(to_pred[target_surface], 95)))


def bootstrap_ci(values: Sequence[float], n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the values (patients) with replacement."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap_ci: expected a non-empty 1-D sequence, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("bootstrap_ci: values must be finite (got NaN or inf)")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def paired_bootstrap_diff(
    a: Sequence[float] | Mapping[str, float],
    b: Sequence[float] | Mapping[str, float],
    n_boot: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Mean of the per-patient differences a - b with its bootstrap interval (patients resampled in pairs).

    Mappings (volume_id -> value) are aligned by key and must hold the same patients.
    """
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)) or set(a) != set(b):
            raise ValueError("paired_bootstrap_diff: both sides must be mappings over the same volume_ids")
        keys = sorted(a)
        a, b = [a[k] for k in keys], [b[k] for k in keys]
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap_diff: {a.shape} and {b.shape} values are not pairs")
    difference = a - b
    low, high = bootstrap_ci(difference, n_boot=n_boot, seed=seed, level=level)
    return {"mean": float(difference.mean()), "ci_low": low, "ci_high": high}


def describe(values: Sequence[float], n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, float]:
    """mean, median, ci_low, ci_high of per-patient values."""
    low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"mean": float(np.mean(values)), "median": float(np.median(values)), "ci_low": low, "ci_high": high}


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):
        array = array.detach().float().cpu() if array.is_floating_point() else array.detach().cpu()
    return np.asarray(array)


def _as_masks(array, name: str) -> np.ndarray:
    array = _as_numpy(array)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"SegmentationMeter: {name} must be (B, H, W) or (B, 1, H, W), got {array.shape}")
    return array


class SegmentationMeter:
    """Accumulates confusion counts per slice, and optionally the masks, over batches and workers.

    `update` takes a batch of predictions (probabilities in [0, 1], thresholded at `threshold`, or
    booleans) and {0, 1} truths, shaped (B, H, W) or (B, 1, H, W), with each slice's volume_id and
    slice_index. A slice seen twice is an error. `state()` is plain numpy/python (picklable for a Ray
    gather); `from_states` / `merge` combine meters so that batches and data-parallel workers add up
    to the same numbers as one meter fed everything. With `keep_masks=True` the binary masks are kept
    (bit-packed) so HD95 is computed per patient on the stacked volume. `set_spacing` records a volume's
    voxel size (slice, row, column), e.g. from a NIfTI header; the per-patient table then adds `hd95_mm`
    (NaN for volumes without one), summarised over the volumes that have it.
    """

    def __init__(self, keep_masks: bool = False, threshold: float = 0.5):
        self.keep_masks = keep_masks
        self.threshold = threshold
        self._counts: dict[tuple[str, int], np.ndarray] = {}
        self._masks: dict[tuple[str, int], tuple[tuple[int, int], np.ndarray, np.ndarray]] = {}
        self.spacing: dict[str, tuple[float, float, float]] = {}

    def set_spacing(self, volume_id: str, spacing) -> None:
        """Record a volume's voxel size (slice, row, column); a different one for the same volume is an error."""
        values = _spacing_of(spacing, str(volume_id))
        if self.spacing.setdefault(str(volume_id), values) != values:
            raise ValueError(f"SegmentationMeter: volume {volume_id!r} has spacings {self.spacing[str(volume_id)]} "
                             f"and {values}")

    def _add(self, key: tuple[str, int], counts: np.ndarray, masks=None) -> None:
        if key in self._counts:
            raise ValueError(f"SegmentationMeter: slice {key[1]} of volume {key[0]!r} was added twice")
        self._counts[key] = np.asarray(counts, dtype=np.int64)
        if self.keep_masks:
            self._masks[key] = masks

    def update(self, volume_ids: Sequence[str], slice_indices: Sequence[int], pred, target) -> None:
        """Add a batch; see the class docstring for shapes and values."""
        pred, target = _as_masks(pred, "pred"), _as_masks(target, "target")
        if pred.shape != target.shape:
            raise ValueError(f"SegmentationMeter: pred {pred.shape} and target {target.shape} differ in shape")
        if not len(volume_ids) == len(slice_indices) == len(pred):
            raise ValueError(
                f"SegmentationMeter: {len(volume_ids)} volume_ids, {len(slice_indices)} slice_indices "
                f"for a batch of {len(pred)}"
            )
        if len(pred) == 0:
            return
        if pred.dtype != bool:
            if np.isnan(pred).any() or pred.min() < 0 or pred.max() > 1:
                raise ValueError("SegmentationMeter: pred must be probabilities in [0, 1] (logits given?)")
            pred = pred > self.threshold
        if target.dtype != bool:
            if not np.isin(target, (0, 1)).all():
                raise ValueError("SegmentationMeter: target must hold only 0 and 1")
            target = target == 1
        counts = confusion_counts(pred, target)
        for row, (volume_id, slice_index) in enumerate(zip(volume_ids, slice_indices)):
            masks = None
            if self.keep_masks:
                masks = (pred.shape[1:], np.packbits(pred[row]), np.packbits(target[row]))
            self._add((str(volume_id), int(slice_index)), counts[row], masks)

    def state(self) -> dict:
        """Everything accumulated, as plain numpy arrays and python values."""
        keys = sorted(self._counts)
        return {
            "keep_masks": self.keep_masks,
            "threshold": self.threshold,
            "volume_ids": [key[0] for key in keys],
            "slice_indices": [key[1] for key in keys],
            "counts": np.array([self._counts[key] for key in keys], dtype=np.int64).reshape(-1, 4),
            "masks": [self._masks[key] for key in keys] if self.keep_masks else None,
            "spacing": dict(self.spacing),
        }

    def merge(self, states: Iterable[dict]) -> SegmentationMeter:
        """Add the slices of other meters' states (e.g. gathered from workers); returns self."""
        for state in states:
            if state["keep_masks"] != self.keep_masks or state["threshold"] != self.threshold:
                raise ValueError("SegmentationMeter.merge: states differ in keep_masks or threshold")
            masks = state["masks"] or [None] * len(state["counts"])
            for volume_id, slice_index, counts, mask in zip(
                state["volume_ids"], state["slice_indices"], state["counts"], masks
            ):
                self._add((str(volume_id), int(slice_index)), counts, mask)
            for volume_id, spacing in state.get("spacing", {}).items():
                self.set_spacing(volume_id, spacing)
        return self

    @classmethod
    def from_states(cls, states: Sequence[dict]) -> SegmentationMeter:
        """One meter holding the slices of every state."""
        if not states:
            raise ValueError("SegmentationMeter.from_states: no states given")
        return cls(keep_masks=states[0]["keep_masks"], threshold=states[0]["threshold"]).merge(states)

    def per_slice_table(self) -> pd.DataFrame:
        """One row per slice: volume_id, slice_index, tp, fp, fn, tn, dice."""
        rows = [
            {"volume_id": v, "slice_index": s, **dict(zip(("tp", "fp", "fn", "tn"), c.tolist())),
             "dice": scores(c)["dice"]}
            for (v, s), c in sorted(self._counts.items())
        ]
        return pd.DataFrame(rows, columns=["volume_id", "slice_index", "tp", "fp", "fn", "tn", "dice"])

    def _volume(self, volume_id: str, slice_keys: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
        shapes = {self._masks[key][0] for key in slice_keys}
        if len(shapes) > 1:
            raise ValueError(f"SegmentationMeter: volume {volume_id!r} has slices of different sizes {sorted(shapes)}")
        height, width = shapes.pop()
        size = height * width
        pred = np.stack([np.unpackbits(self._masks[k][1], count=size) for k in slice_keys])
        target = np.stack([np.unpackbits(self._masks[k][2], count=size) for k in slice_keys])
        shape = (len(slice_keys), height, width)
        return pred.reshape(shape).astype(bool), target.reshape(shape).astype(bool)

    def per_patient_table(self, spacing=None) -> pd.DataFrame:
        """One row per volume: volume_id, n_slices, the six metrics, hd95, tumor_pixels, predicted_pixels, has_tumor.

        hd95 is in voxels of the input's resolution (slices stacked in slice_index order, one voxel
        apart) and NaN unless the meter keeps masks. With `spacing` (slice, row, column), one tuple
        for all volumes or a mapping volume_id -> tuple, or else with the meter's own `spacing`, an
        `hd95_mm` column is added (NaN for a volume the meter has no spacing for).
        """
        volumes: dict[str, list[tuple[str, int]]] = {}
        for key in sorted(self._counts):
            volumes.setdefault(key[0], []).append(key)
        own = spacing is None and bool(self.spacing)
        if own:
            spacing = self.spacing
        rows = []
        for volume_id, slice_keys in volumes.items():
            counts = np.sum([self._counts[key] for key in slice_keys], axis=0)
            row = {"volume_id": volume_id, "n_slices": len(slice_keys), **scores(counts), "hd95": math.nan}
            if self.keep_masks:
                pred, target = self._volume(volume_id, slice_keys)
                row["hd95"] = hd95(pred, target)
                if own and volume_id not in spacing:
                    row["hd95_mm"] = math.nan
                elif spacing is not None:
                    row["hd95_mm"] = hd95(pred, target, _spacing_of(spacing, volume_id))
            row["tumor_pixels"] = int(counts[0] + counts[2])
            row["predicted_pixels"] = int(counts[0] + counts[1])
            row["has_tumor"] = bool(row["tumor_pixels"] > 0)
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self, spacing=None, n_boot: int = BOOTSTRAP_SAMPLES, seed: int = 0, table: pd.DataFrame | None = None) -> dict:
        """Headline per-patient statistics, pooled metrics and per-slice mean Dice, as a JSON-able dict.

        per_patient: {metric: {mean, median, ci_low, ci_high}} for the six metrics and hd95 (and
        hd95_mm with a spacing) when masks are kept; pooled: the six metrics on summed counts;
        per_slice_mean_dice; n_patients, n_slices, tumor_free_patients (each scores Dice 1 or 0).
        `table`: this meter's `per_patient_table(spacing)` where the caller has built it already (HD95
        is the costly part).
        """
        if not self._counts:
            raise ValueError("SegmentationMeter.summary: no slices were added")
        table = self.per_patient_table(spacing) if table is None else table
        names = list(METRICS) + (["hd95"] if self.keep_masks else []) + (["hd95_mm"] if "hd95_mm" in table else [])
        slice_dice = [scores(counts)["dice"] for counts in self._counts.values()]
        return {
            "per_patient": {name: describe(table[name].dropna().to_numpy() if name == "hd95_mm" else
                                           table[name].to_numpy(), n_boot, seed) for name in names},
            "pooled": scores(np.sum(list(self._counts.values()), axis=0)),
            "per_slice_mean_dice": float(np.mean(slice_dice)),
            "n_patients": len(table),
            "n_slices": len(self._counts),
            "tumor_free_patients": int((~table["has_tumor"]).sum()),
        }


def _spacing_of(spacing, volume_id: str) -> tuple[float, float, float]:
    if isinstance(spacing, Mapping):
        if volume_id not in spacing:
            raise ValueError(f"spacing: no entry for volume {volume_id!r}")
        spacing = spacing[volume_id]
    values = tuple(float(s) for s in spacing)
    if len(values) != 3:
        raise ValueError(f"spacing: expected (slice, row, column), got {values}")
    return values
