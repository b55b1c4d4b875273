"""Preprocessing shared by training, evaluation and inference, and the training augmentation.

`preprocess_image` is the one function that turns a read slice into model input, so inference does
exactly what training did: resize to `data.size`, then scale intensities.

- normalize="scale": uint8 slices / 255; float (volume) slices min-max scaled with the volume's
  `norm_low`/`norm_high` into [0, 1].
- normalize="volume_zscore": clip each channel to [norm_low, norm_high], then (x - norm_mean) / norm_std.
- normalize="imagenet": "scale", then (x - mean) / std with ImageNet's per-channel mean and std, the
  input an ImageNet-pretrained encoder was trained on (segmentation-models-pytorch's
  `get_preprocessing_params`); for 3-sequence slices (pre-contrast, FLAIR, post-contrast as R, G, B).

The statistics are per volume and per channel (`volume_stats`); discovery stores them in the manifest,
and inference computes them the same way on a volume it reads. Without statistics a slice is scaled
with its own (a single-slice volume).

Augmentation (paper 4.1) runs between the resize and the scaling, on raw intensities, so the constant
fill of the affine border is the raw background value 0 under either normalization. The intensity
augmentation and the sequence dropout (`augment_intensity`, off by default) run after the scaling, on
what the model sees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from raysegm.config import DataSettings

MAX_STATS_PIXELS = 1 << 21  # per channel; larger volumes are subsampled with a fixed stride
NORMALIZATIONS = ("scale", "volume_zscore", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm/torchvision ResNet weights, as smp's get_preprocessing_params
IMAGENET_STD = (0.229, 0.224, 0.225)


def volume_stats(images: np.ndarray | Sequence[np.ndarray], clip_percentiles=DataSettings.clip_percentiles) -> dict:
    """Per-channel intensity statistics of one volume.

    images: (S, H, W, C), or a sequence of (H, W, C) slices that may differ in size.
    Returns lists of C floats: `norm_low`, `norm_high` (the clip percentiles over the volume's voxels,
    from at most MAX_STATS_PIXELS voxels taken with a fixed stride) and `norm_mean`, `norm_std`
    (mean and standard deviation of the volume clipped to [norm_low, norm_high]).
    """
    if isinstance(images, np.ndarray):
        channels = images.shape[-1]
        pixels = images.reshape(-1, channels)
    else:
        channels = images[0].shape[-1]
        pixels = np.concatenate([np.asarray(s).reshape(-1, channels) for s in images])
    stride = max(1, -(-len(pixels) // MAX_STATS_PIXELS))
    pixels = pixels[::stride].astype(np.float64)
    low, high = np.percentile(pixels, clip_percentiles, axis=0)
    clipped = np.clip(pixels, low, high)
    return {
        "norm_low": low.tolist(),
        "norm_high": high.tolist(),
        "norm_mean": clipped.mean(axis=0).tolist(),
        "norm_std": clipped.std(axis=0).tolist(),
    }


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (size, size, C), same dtype; INTER_AREA when shrinking, INTER_LINEAR when growing."""
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    interpolation = cv2.INTER_AREA if size < min(height, width) else cv2.INTER_LINEAR
    # OpenCV's INTER_AREA takes at most 4 channels unless the factor is a whole number: a 2.5D stack
    # (9 channels) goes through in groups of up to 4
    resized = [cv2.resize(image[..., start:start + 4], (size, size), interpolation=interpolation)
               .reshape(size, size, -1) for start in range(0, image.shape[2], 4)]
    return np.concatenate(resized, axis=2) if len(resized) > 1 else resized[0]


def scale_image(image: np.ndarray, data: DataSettings, stats: Mapping | None) -> np.ndarray:
    """(H, W, C) raw -> (C, H, W) float32 scaled per `data.normalize` (see the module docstring)."""
    if data.normalize not in NORMALIZATIONS:
        raise ValueError(f"data.normalize: unknown {data.normalize!r} (expected one of {NORMALIZATIONS})")
    channels = image.shape[-1]
    if data.normalize == "imagenet" and channels % 3:
        raise ValueError(f"data.normalize imagenet: ImageNet's mean and std are for 3 channels a slice, "
                         f"got an image of {channels}")
    pixels = image.astype(np.float32)
    if data.normalize != "volume_zscore" and image.dtype == np.uint8:
        scaled = pixels / 255.0
    else:
        if stats is None:
            stats = volume_stats(image[None], data.clip_percentiles)
        low, high = _per_channel(stats, "norm_low", image), _per_channel(stats, "norm_high", image)
        clipped = np.clip(pixels, low, high)
        if data.normalize == "volume_zscore":
            mean, std = _per_channel(stats, "norm_mean", image), _per_channel(stats, "norm_std", image)
            scaled = (clipped - mean) / np.where(std > 1e-6, std, 1.0)
        else:
            scaled = (clipped - low) / np.maximum(high - low, 1e-6)
    if data.normalize == "imagenet":  # each stacked slice's three sequences as R, G, B
        mean = np.tile(np.float32(IMAGENET_MEAN), channels // 3)
        scaled = (scaled - mean) / np.tile(np.float32(IMAGENET_STD), channels // 3)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1), dtype=np.float32)


def _per_channel(stats: Mapping, key: str, image: np.ndarray) -> np.ndarray:
    """stats[key] for each channel of `image`; a 2.5D stack (raysegm.data.context) repeats the volume's
    per-slice statistics once per stacked slice."""
    values = np.asarray(stats[key], dtype=np.float32).reshape(-1)
    channels = image.shape[-1]
    if channels % len(values):
        raise ValueError(f"{key}: {len(values)} per-channel values for an image of {channels} channels")
    return np.tile(values, channels // len(values))


def preprocess_image(image: np.ndarray, data: DataSettings, stats: Mapping | None = None) -> np.ndarray:
    """A read slice (H, W, C) -> model input (C, data.size, data.size) float32.

    stats: a mapping with norm_low, norm_high, norm_mean, norm_std (a manifest row will do), or None.
    """
    return scale_image(resize_image(image, data.size), data, stats)


def preprocess_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) {0, 1} -> (1, size, size) float32 {0, 1}: resized as the image is (`resize_image`), as the
    fraction of tumor under each output pixel, which is tumor where that fraction is at least one half.

    The contract's "masks by nearest neighbour" keeps masks binary, as this does, but OpenCV's nearest
    neighbour takes each block's top-left source pixel where the image averages the whole block: at
    256 -> 128 px every label sat half a source pixel above and left of its image (a perfect 128 px mask
    scored back at 256 px: per-patient Dice 0.966 that way, 0.972 this way, over the 40 LGG patients).
    """
    if mask.shape != (size, size):
        fraction = resize_image((mask > 0).astype(np.float32)[..., None], size)[..., 0]
        return (fraction >= 0.5).astype(np.float32)[None]
    return (mask > 0).astype(np.float32)[None]


def build_augmenter(data: DataSettings, seed: int | None = None):
    """Paper 4.1 augmentation, image and mask together (albumentations).

    Affine: rotation +-data.rotate_limit deg, translation +-data.shift_limit of the side, zoom
    1 +- data.zoom_limit, shear +-data.shear_limit deg, on every call; horizontal flip with p = 0.5 when
    data.hflip, drawn independently of the affine. The image is interpolated linearly, the mask by
    nearest neighbour (it stays binary); the border is filled with 0 in both. Returns an albumentations
    Compose.
    """
    # albumentations imports torch, so only augmenting workers pay for it; and it would ask PyPI for a
    # newer version of itself on import, from every Ray worker, unless told not to
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A

    transforms = [
        A.Affine(
            rotate=(-data.rotate_limit, data.rotate_limit),
            translate_percent={"x": (-data.shift_limit, data.shift_limit),
                               "y": (-data.shift_limit, data.shift_limit)},
            scale=(1.0 - data.zoom_limit, 1.0 + data.zoom_limit),
            shear=(-data.shear_limit, data.shear_limit),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=0,
            p=1.0,
        )
    ]
    if data.hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    augmenter = A.Compose(transforms, seed=seed)
    if seed is not None:
        # Compose seeds every transform with the same number, so the flip's coin would be the affine's
        # first draw (a slice flipped exactly when it is shifted left): each gets its own stream instead.
        own_seeds = np.random.SeedSequence(seed).generate_state(len(transforms))
        for transform, own in zip(augmenter.transforms, own_seeds):
            transform.set_random_seed(int(own))
    return augmenter


def augment(image: np.ndarray, mask: np.ndarray, augmenter) -> tuple[np.ndarray, np.ndarray]:
    """One random draw of `augmenter` applied to image (H, W, C) and mask (H, W) together."""
    out = augmenter(image=image, mask=mask)
    return out["image"], out["mask"]


FLAIR = 1  # channel order of a slice (kaggle_3m, and NIfTI cases): pre-contrast, FLAIR, post-contrast


def augment_intensity(image: np.ndarray, data: DataSettings, rng: np.random.Generator) -> np.ndarray:
    """Random intensity changes of a scaled training image (C, H, W), per sequence; a new array.

    The channels are (2k + 1) stacked slices of data.in_channels sequences each (raysegm.data.context);
    one draw per sequence acts on that sequence in every stacked slice. With x one sequence, m its mean
    and [lo, hi] its range, each step runs with probability data.intensity_augment:

        brightness  x <- b x,                                 b ~ U(1 - brightness_limit, 1 + brightness_limit)
        contrast    x <- clip(m + c (x - m), lo, hi),         c ~ U(1 - contrast_limit, 1 + contrast_limit)
        gamma       x <- lo + (hi - lo) ((x - lo) / (hi - lo))^g,   g ~ U(gamma_limit)

    Then sequence dropout: with probability data.sequence_dropout each, the pre-contrast and the
    post-contrast sequence are replaced by FLAIR, which is what kaggle_3m stores for a missing sequence
    (and, since scaling is per channel, exactly what a patient missing that sequence looks like after it;
    under normalize "imagenet" only up to ImageNet's per-channel mean and std).
    """
    if data.sequence_dropout and data.in_channels != 3:
        raise ValueError(f"data.sequence_dropout needs 3 sequences per slice (pre-contrast, FLAIR, "
                         f"post-contrast), got data.in_channels {data.in_channels}")
    stack = image.reshape(-1, data.in_channels, *image.shape[1:]).astype(np.float32)  # a copy
    p = data.intensity_augment
    for sequence in range(data.in_channels):
        x = stack[:, sequence]
        if rng.random() < p:
            x *= rng.uniform(1 - data.brightness_limit, 1 + data.brightness_limit)
        if rng.random() < p:
            lo, hi, mean = x.min(), x.max(), x.mean()
            factor = rng.uniform(1 - data.contrast_limit, 1 + data.contrast_limit)
            np.clip(mean + factor * (x - mean), lo, hi, out=x)
        if rng.random() < p:
            lo, hi = x.min(), x.max()
            if hi > lo:
                gamma = rng.uniform(*data.gamma_limit)
                x[...] = lo + (hi - lo) * ((x - lo) / (hi - lo)) ** gamma
    if data.sequence_dropout:
        for sequence in (0, 2):
            if rng.random() < data.sequence_dropout:
                stack[:, sequence] = stack[:, FLAIR]
    return stack.reshape(image.shape)
