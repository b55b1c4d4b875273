"""The synthetic dataset: layout, determinism, realism (not one-threshold separable) and learnability."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
import tifffile
from scipy.ndimage import binary_dilation

from raysegm.data.synth import generate_dataset


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _images(files: dict[str, bytes]) -> set[bytes]:
    """The decoded pixels of every image (not mask) file."""
    return {tifffile.imread(io.BytesIO(data)).tobytes() for name, data in files.items()
            if name.endswith(".tif") and not name.endswith("_mask.tif")}


def _load(root):
    """(volume_ids, images (N, H, W, 3) uint8, masks (N, H, W) bool, per-slice volume index)."""
    volume_ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, masks, owner = [], [], []
    for v, volume_id in enumerate(volume_ids):
        slices = sorted((root / volume_id).glob(f"{volume_id}_*[0-9].tif"),
                        key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        for path in slices:
            images.append(tifffile.imread(path))
            masks.append(tifffile.imread(path.with_name(path.stem + "_mask.tif")) > 0)
            owner.append(v)
    return volume_ids, np.stack(images), np.stack(masks), np.array(owner)


def _best_threshold_dice(channel: np.ndarray, truth: np.ndarray) -> float:
    """Best pooled Dice of `channel >= t` or `channel <= t` over every uint8 threshold t."""
    best = 0.0
    values, counts = channel.ravel(), truth.ravel()
    inside = np.bincount(values[counts], minlength=256)
    total = np.bincount(values, minlength=256)
    positives = counts.sum()
    for above in (True, False):
        order = slice(None, None, -1) if above else slice(None)
        tp = np.cumsum(inside[order])
        predicted = np.cumsum(total[order])
        best = max(best, float((2 * tp / (predicted + positives)).max()))
    return best


def test_layout_and_kaggle_naming(tmp_path):
    root = generate_dataset(tmp_path / "kaggle_3m", patients=7, slices=5, size=32, seed=3)
    volume_ids = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(volume_ids) == 7
    for volume_id in volume_ids:
        assert re.fullmatch(r"SYN_(CS|DU|EZ|FG|HT)_\d{4}_(19|20)\d{6}", volume_id)
        names = sorted(p.name for p in (root / volume_id).iterdir())
        expected = sorted([f"{volume_id}_{k}.tif" for k in range(1, 6)] + [f"{volume_id}_{k}_mask.tif" for k in range(1, 6)])
        assert names == expected
        image = tifffile.imread(root / volume_id / f"{volume_id}_3.tif")
        mask = tifffile.imread(root / volume_id / f"{volume_id}_3_mask.tif")
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert mask.shape == (32, 32) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
    with open(root / "data.csv", newline="") as handle:
        patients = [row["Patient"] for row in csv.DictReader(handle)]
    assert sorted(patients) == sorted(v.rsplit("_", 1)[0] for v in volume_ids)
    assert len({v.split("_")[1] for v in volume_ids}) == 5  # every institution code is used


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = _files(generate_dataset(tmp_path / "a", patients=3, slices=4, size=32, seed=7))
    again = _files(generate_dataset(tmp_path / "b", patients=3, slices=4, size=32, seed=7))
    other = _files(generate_dataset(tmp_path / "c", patients=3, slices=4, size=32, seed=8))
    assert first == again
    assert len(first) == 3 * 4 * 2 + 1
    # not just other names (they come from the seed): other pixels
    assert not _images(first) & _images(other)


def test_tumor_free_patients_and_slices_and_contiguous_tumors(synth_dir):
    volume_ids, _, masks, owner = _load(synth_dir)
    per_slice = masks.any(axis=(1, 2))
    tumor_slices = [per_slice[owner == v] for v in range(len(volume_ids))]
    assert sum(not s.any() for s in tumor_slices) == 1  # 1 in 6 patients is tumor-free
    areas = []
    for flags, volume_masks in zip(tumor_slices, (masks[owner == v] for v in range(len(volume_ids)))):
        if not flags.any():
            continue
        present = np.flatnonzero(flags)
        assert (np.diff(present) == 1).all(), "tumor slices are contiguous"
        assert not flags.all(), "some slices of a tumor patient are tumor-free"
        areas.append(volume_masks.sum(axis=(1, 2)).max())
    assert max(areas) > 1.5 * min(areas), "tumor size varies between patients"


def test_no_single_threshold_separates_the_tumor_but_it_is_visible(synth_dir):
    _, images, masks, _ = _load(synth_dir)
    for channel in range(3):
        assert _best_threshold_dice(images[..., channel], masks) < 0.5
    # the tumor is still plainly visible on FLAIR against the brain around it
    flair = images[..., 1].astype(float)
    ring = np.stack([binary_dilation(m, iterations=3) & ~binary_dilation(m, iterations=1) for m in masks])
    ring &= flair > 0
    contrast = (flair[masks].mean() - flair[ring].mean()) / flair[ring].std()
    assert contrast > 1.5


def test_best_threshold_dice_is_hand_checked():
    channel = np.array([[10, 200], [210, 50]], dtype=np.uint8)
    truth = np.array([[False, True], [True, False]])
    assert _best_threshold_dice(channel, truth) == pytest.approx(1.0)
    truth = np.array([[False, True], [False, False]])
    # ">= 200" takes {200, 210}: 2*1/(2+1); ">= 210" takes {210}: 0; "<= 200" takes three pixels: 2/4
    assert _best_threshold_dice(channel, truth) == pytest.approx(2 / 3)


@pytest.mark.slow
def test_a_small_cnn_learns_it_at_64px(synth_dir):
    """A three-level conv net (8 filters) reaches a pooled Dice above 0.6 on held-out patients in 9 epochs."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(2)
    volume_ids, images, masks, owner = _load(synth_dir)
    inputs = torch.tensor(images.transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)
    targets = torch.tensor(masks[:, None], dtype=torch.float32)
    tumor_patients = [v for v in range(len(volume_ids)) if masks[owner == v].any()]
    held_out = torch.tensor(np.isin(owner, tumor_patients[:2]))

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    class TinyUNet(nn.Module):
        def __init__(self, w=8):
            super().__init__()
            self.e1, self.e2, self.e3 = block(3, w), block(w, 2 * w), block(2 * w, 4 * w)
            self.u2, self.d2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2), block(4 * w, 2 * w)
            self.u1, self.d1 = nn.ConvTranspose2d(2 * w, w, 2, 2), block(2 * w, w)
            self.head = nn.Conv2d(w, 1, 1)

        def forward(self, x):
            a = self.e1(x)
            b = self.e2(nn.functional.max_pool2d(a, 2))
            c = self.e3(nn.functional.max_pool2d(b, 2))
            d = self.d2(torch.cat([self.u2(c), b], 1))
            return self.head(self.d1(torch.cat([self.u1(d), a], 1)))

    model = TinyUNet()
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    train_x, train_y = inputs[~held_out], targets[~held_out]
    for _ in range(9):
        model.train()
        for batch in torch.randperm(len(train_x)).split(8):
            logits = model(train_x[batch])
            p = torch.sigmoid(logits)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, train_y[batch])
            loss = loss + 1 - (2 * (p * train_y[batch]).sum() + 1) / (p.sum() + train_y[batch].sum() + 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = (model(inputs[held_out]) > 0).float()
    truth = targets[held_out]
    dice = (2 * (predicted * truth).sum() / (predicted.sum() + truth.sum())).item()
    assert dice > 0.6
