"""A synthetic brain-MRI dataset in the `kaggle_3m` layout: the project's embedded default data.

Each patient is a stack of axial slices of one simulated head:
- an elliptical brain whose size follows the slice position (small at the ends of the stack), with a
  smooth grey/white-matter texture, two dark ventricles on the middle slices, and a scalp rim;
- three channels of different contrast, in the LGG order pre-contrast, FLAIR, post-contrast;
- a FLAIR-bright tumor (the FLAIR abnormality the masks mark) spanning contiguous slices, whose size,
  irregular outline, elongation and position vary per patient; it is slightly dark on pre-contrast and
  enhances on post-contrast only in some patients. Every sixth patient has no tumor, and slices outside
  the tumor's extent have none;
- distractors so that no single threshold on one channel finds the tumor: the scalp rim and the
  periventricular caps are FLAIR-bright too, and a smooth multiplicative bias field plus noise make
  tumor and brain intensities overlap across the slice. Tumor and distractors still differ in shape,
  place and the other two channels, which is what a model learns.

Everything is drawn from `numpy.random.default_rng([seed, patient, ...])`: the same seed writes the
same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from raysegm.config import DataSettings

INSTITUTIONS = ("CS", "DU", "EZ", "FG", "HT")
TUMOR_FREE_EVERY = 6  # patient numbers 6, 12, 18, ... have no tumor

# Mean tissue intensities per channel (pre-contrast, FLAIR, post-contrast), as fractions of full scale.
BRAIN = np.array([0.55, 0.42, 0.45])
CSF = np.array([0.18, 0.10, 0.14])
RIM = np.array([0.80, 0.74, 0.62])
CAPS = np.array([0.50, 0.74, 0.72])
TUMOR = np.array([0.42, 0.78, 0.47])
ENHANCING = np.array([0.0, 0.0, 0.30])  # added to post-contrast in enhancing tumors
NOISE_SIGMA = 0.035
FULL_SCALE = 230.0


def _smooth_noise(rng: np.random.Generator, size: int, sigma_fraction: float) -> np.ndarray:
    """Zero-mean, unit-std noise smoothed over about sigma_fraction of the side."""
    field = gaussian_filter(rng.standard_normal((size, size)), sigma=max(1.0, sigma_fraction * size))
    return (field - field.mean()) / (field.std() + 1e-9)


def _patient_plan(seed: int, patient: int) -> dict:
    """Per-patient anatomy and tumor parameters (everything not drawn per slice)."""
    rng = np.random.default_rng([seed, patient, 0])
    has_tumor = (patient + 1) % TUMOR_FREE_EVERY != 0
    angle = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(0.15, 0.45)  # of the brain's semi-axes: the tumor starts inside the brain
    return {
        "institution": INSTITUTIONS[patient % len(INSTITUTIONS)],
        "number": 1000 + 37 * patient + int(rng.integers(0, 37)),
        "date": f"{int(rng.integers(1995, 2012))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "brain_axes": (rng.uniform(0.60, 0.70), rng.uniform(0.70, 0.80)),  # (x, y) semi-axes
        "brain_center": rng.uniform(-0.05, 0.05, size=2),
        "brain_tilt": rng.uniform(-0.2, 0.2),
        "bias_coefficients": rng.uniform(-0.28, 0.28, size=5),
        "has_tumor": has_tumor,
        "tumor_center": radius * np.array([np.cos(angle), np.sin(angle)]),
        "tumor_drift": rng.uniform(-0.08, 0.08, size=2),
        "tumor_z": rng.uniform(0.35, 0.65),
        "tumor_half_extent": rng.uniform(0.15, 0.35),
        "tumor_radius": rng.uniform(0.14, 0.40),
        "tumor_elongation": rng.uniform(0.65, 1.35),
        "tumor_rotation": rng.uniform(0, np.pi),
        "tumor_harmonics": rng.uniform(0.0, 0.18, size=3),
        "tumor_phases": rng.uniform(0, 2 * np.pi, size=3),
        "tumor_enhancing": bool(rng.random() < 0.35),
    }


def _slice(plan: dict, seed: int, patient: int, slice_number: int, slices: int, size: int):
    """One slice: (size, size, 3) uint8 image and (size, size) uint8 0/255 mask."""
    rng = np.random.default_rng([seed, patient, slice_number])
    t = (slice_number - 0.5) / slices  # 0..1 along the stack
    grid = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(grid, grid, indexing="ij")
    pixel = 2.0 / size

    # Brain: a tilted ellipse, largest in the middle of the stack, with a wobbly outline.
    extent = 0.45 + 0.55 * np.sin(np.pi * (0.08 + 0.84 * t))
    cx, cy = plan["brain_center"]
    cos_t, sin_t = np.cos(plan["brain_tilt"]), np.sin(plan["brain_tilt"])
    bx, by = (x - cx) * cos_t + (y - cy) * sin_t, -(x - cx) * sin_t + (y - cy) * cos_t
    ax, ay = plan["brain_axes"]
    theta = np.arctan2(by, bx)
    wobble = 1.0 + 0.03 * np.cos(3 * theta + plan["brain_tilt"] * 7) + 0.02 * np.sin(5 * theta)
    rho = np.sqrt((bx / (ax * extent)) ** 2 + (by / (ay * extent)) ** 2) / wobble
    brain = rho < 1.0
    rim = (rho > 1.05) & (rho < 1.05 + 0.13 / extent)

    tissue = np.zeros((size, size, 3))
    texture = 0.06 * _smooth_noise(rng, size, 0.04) + 0.03 * _smooth_noise(rng, size, 0.01)
    tissue[brain] = BRAIN + texture[brain, None]
    rim_texture = 0.05 * _smooth_noise(rng, size, 0.02)
    tissue[rim] = RIM + rim_texture[rim, None]

    # Ventricles (dark) with FLAIR-bright caps at their tips, on the middle slices.
    if 0.3 < t < 0.75:
        ventricle_scale = extent * np.sin(np.pi * (t - 0.3) / 0.45)
        for offset in (-0.11, 0.11):
            vx, vy = (bx - offset * ventricle_scale) / (0.06 * ventricle_scale + 1e-6), by / (0.22 * ventricle_scale + 1e-6)
            ventricle = (vx ** 2 + vy ** 2 < 1.0) & brain
            tissue[ventricle] = CSF
            for tip in (-1.0, 1.0):
                cap_distance = (bx - offset * ventricle_scale) ** 2 + (by - tip * 0.24 * ventricle_scale) ** 2
                cap = (cap_distance < (0.055 * ventricle_scale + pixel) ** 2) & brain
                tissue[cap] = CAPS

    # Tumor: an irregular, elongated blob whose radius follows the slice position.
    mask = np.zeros((size, size), dtype=bool)
    offset_z = (t - plan["tumor_z"]) / plan["tumor_half_extent"]
    if plan["has_tumor"] and abs(offset_z) < 1.0:
        radius = plan["tumor_radius"] * extent * np.sqrt(1.0 - offset_z ** 2)
        center = (plan["tumor_center"] + plan["tumor_drift"] * offset_z) * extent
        tx, ty = bx - center[0] * ax, by - center[1] * ay
        cos_r, sin_r = np.cos(plan["tumor_rotation"]), np.sin(plan["tumor_rotation"])
        ux = (tx * cos_r + ty * sin_r) / plan["tumor_elongation"]
        uy = (-tx * sin_r + ty * cos_r) * plan["tumor_elongation"]
        phi = np.arctan2(uy, ux)
        outline = radius * (1.0 + sum(a * np.cos((j + 2) * phi + p) for j, (a, p) in
                                      enumerate(zip(plan["tumor_harmonics"], plan["tumor_phases"]))))
        inside = 1.0 / (1.0 + np.exp(-(outline - np.sqrt(ux ** 2 + uy ** 2)) / (0.7 * pixel)))
        inside = inside * brain
        mask = inside > 0.5
        if mask.sum() < 3:
            mask[:] = False
        else:
            lesion = TUMOR + np.array([0.0, 0.07, 0.0]) * _smooth_noise(rng, size, 0.03)[..., None]
            if plan["tumor_enhancing"]:
                lesion = lesion + ENHANCING * (_smooth_noise(rng, size, 0.02)[..., None] > 0.3)
            tissue = tissue * (1.0 - inside[..., None]) + lesion * inside[..., None]

    # Scanner: a smooth bias field shared by the channels (slightly different per channel), and noise.
    c = plan["bias_coefficients"]
    bias = np.exp(c[0] * x + c[1] * y + c[2] * x * y + c[3] * (x ** 2 - 0.3) + c[4] * t * y)
    channel_bias = bias[..., None] ** np.array([0.9, 1.0, 1.1])
    noisy = tissue * channel_bias + NOISE_SIGMA * rng.standard_normal((size, size, 3)) * (tissue > 0)
    image = np.clip(np.round(noisy * FULL_SCALE), 0, 255).astype(np.uint8)
    return image, mask.astype(np.uint8) * 255


def generate_dataset(out_dir, patients: int = DataSettings.synthetic_patients,
                     slices: int = DataSettings.synthetic_slices, size: int = 128,
                     seed: int = DataSettings.split_seed) -> Path:
    """Write `patients` synthetic patients of `slices` slices at `size` px in the kaggle_3m layout.

    out_dir/SYN_<inst>_<NNNN>_<date>/SYN_<inst>_<NNNN>_<date>_<k>.tif   (size, size, 3) uint8, k 1-based
    out_dir/SYN_<inst>_<NNNN>_<date>/SYN_<inst>_<NNNN>_<date>_<k>_mask.tif   (size, size) uint8 0/255
    out_dir/data.csv   one row per patient: Patient (SYN_<inst>_<NNNN>), institution, has_tumor
    Returns out_dir. Deterministic: the same arguments write identical bytes.
    """
    import tifffile

    if patients < 1 or slices < 1:
        raise ValueError(f"generate_dataset: patients and slices must be >= 1, got {patients} and {slices}")
    if size < 16:
        raise ValueError(f"generate_dataset: size must be >= 16 px, got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ["Patient,institution,has_tumor"]
    for patient in range(patients):
        plan = _patient_plan(seed, patient)
        patient_id = f"SYN_{plan['institution']}_{plan['number']:04d}"
        volume_id = f"{patient_id}_{plan['date']}"
        folder = out_dir / volume_id
        folder.mkdir(exist_ok=True)
        for k in range(1, slices + 1):
            image, mask = _slice(plan, seed, patient, k, slices, size)
            tifffile.imwrite(folder / f"{volume_id}_{k}.tif", image, photometric="rgb")
            tifffile.imwrite(folder / f"{volume_id}_{k}_mask.tif", mask, photometric="minisblack")
        rows.append(f"{patient_id},{plan['institution']},{int(plan['has_tumor'])}")
    (out_dir / "data.csv").write_text("\n".join(rows) + "\n")
    return out_dir
