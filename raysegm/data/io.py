"""Reading and validating slice files and NIfTI volumes.

Every reader raises `DataError` (a ValueError) whose message names the file and the reason, so a bad
file is reported the same way by discovery, by the Ray Data pipeline and by inference.

What a reader returns:
- 2D slice files (tif, png; the `kaggle_3m` and `image` layouts): (H, W, C) uint8 with C = 3 (RGB) or
  1 (grayscale), as stored: a grayscale file is never copied into three channels, so a model trained
  on three refuses it rather than segmenting a converted image. Other channel counts and other dtypes
  are errors.
- NIfTI volumes: slice `k` along the last spatial axis, as (H, W, 3) float32 raw values (int16 and float
  volumes are scaled later by the preprocessing, never rejected). H is the volume's first axis, W its
  second, so stacking the masks of slices 0..Z-1 on the last axis gives back the volume's geometry.
  A manifest's `image_path` for NIfTI is one path (a 4D file with modalities on the last axis, or a 3D
  FLAIR-only file) or several paths joined by `|` in channel order pre-contrast, FLAIR, post-contrast
  (nnU-Net's `CASE_0000|CASE_0001|CASE_0002`).
- Masks: (H, W) uint8 in {0, 1}; a stored mask must hold only {0, 1} or only {0, 255}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

SLICE_SUFFIXES = (".tif", ".tiff", ".png")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PATH_SEPARATOR = "|"  # joins the per-modality files of one NIfTI case in `image_path`


class DataError(ValueError):
    """A file that cannot be used, with the reason; `str()` is `"<path>: <reason>"`."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_missing(value) -> bool:
    """True for an absent path in a manifest row (None, NaN from Parquet, or an empty string)."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def nifti_stem(path: str | Path) -> str:
    """The file name without `.nii.gz` or `.nii`, in any case (as `_is_nifti` in discover matches)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


# ---------------------------------------------------------------------------------------------------
# 2D slice files


def _check_size(path: Path) -> None:
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")


def _decode_2d(path: Path) -> np.ndarray:
    """The stored pixel array of a tif or png, before any check of its shape or dtype."""
    _check_size(path)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                # say "truncated" plainly, rather than relay a short read from deep inside tifffile
                end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
                if end > path.stat().st_size:
                    raise DataError(path, f"truncated tif (pixel data ends at byte {end}, the file has "
                                          f"{path.stat().st_size} bytes)")
                pages = sum(not page.is_reduced for page in tif.pages)  # thumbnails aside
                if pages > 1:  # asarray() would read the first image alone
                    raise DataError(path, f"multi-page tif ({pages} images): one 2D slice per file expected")
                pixels, axes = tif.asarray(), tif.series[0].axes
                # planar RGB (planarconfig separate) decodes samples first, (3, H, W): as contiguous
                return np.moveaxis(pixels, 0, -1) if axes == "SYX" else pixels
        except DataError:
            raise
        except Exception as error:  # tifffile raises many kinds on garbage bytes
            raise DataError(path, f"unreadable tif ({type(error).__name__}: {error})") from None
    if suffix == ".png":
        from PIL import Image

        try:
            with Image.open(path) as png:
                png.load()
                if png.mode == "P":
                    raise DataError(path, "palette png (expected grayscale or RGB)")
                return np.asarray(png)
        except DataError:
            raise
        except Exception as error:
            raise DataError(path, f"unreadable png ({type(error).__name__}: {error})") from None
    raise DataError(path, f"unsupported file type {suffix!r} (expected .tif, .tiff or .png)")


def read_slice_file(path: str | Path) -> np.ndarray:
    """One 2D image file as (H, W, C) uint8: C = 3 for RGB, 1 for grayscale (never converted)."""
    path = Path(path)
    pixels = _decode_2d(path)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3:
        raise DataError(path, f"wrong dimensions {pixels.shape} (expected H x W or H x W x 3)")
    if pixels.shape[-1] not in (1, 3):
        raise DataError(path, f"wrong channel count {pixels.shape[-1]} (expected 1 or 3)")
    if pixels.dtype != np.uint8:
        raise DataError(path, f"dtype {pixels.dtype} (2D slice files must be uint8)")
    return np.ascontiguousarray(pixels)


def binary_mask(path: str | Path, values: np.ndarray) -> np.ndarray:
    """Stored mask values {0, 1} or {0, 255} -> uint8 {0, 1}; anything else is an error naming the odd values."""
    present = np.unique(values)
    if np.isin(present, (0, 1)).all() or np.isin(present, (0, 255)).all():
        return (values > 0).astype(np.uint8)
    odd = [int(v) if float(v).is_integer() else float(v) for v in present if v not in (0, 1, 255)][:5]
    if not odd:
        raise DataError(path, "mask mixes values 1 and 255 (expected only {0, 1} or only {0, 255})")
    raise DataError(path, f"mask values {odd} outside {{0, 1}} or {{0, 255}}")


def read_mask_file(path: str | Path) -> np.ndarray:
    """One 2D mask file as (H, W) uint8 in {0, 1}."""
    path = Path(path)
    pixels = _decode_2d(path)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise DataError(path, f"wrong mask dimensions {pixels.shape} (expected H x W)")
    return binary_mask(path, pixels)


# ---------------------------------------------------------------------------------------------------
# NIfTI volumes


def _load_nifti(path: Path):
    import nibabel

    _check_size(path)
    try:
        return nibabel.load(path)
    except Exception as error:
        raise DataError(path, f"unreadable NIfTI ({type(error).__name__}: {error})") from None


def read_nifti_volume(path: str | Path) -> np.ndarray:
    """A whole NIfTI file as float32: (X, Y, Z) or (X, Y, Z, M); reading it all checks every byte."""
    path = Path(path)
    image = _load_nifti(path)
    if len(image.shape) not in (3, 4):
        raise DataError(path, f"wrong dimensions {image.shape} (expected 3D, or 4D with modalities last)")
    try:
        volume = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:
        raise DataError(path, f"unreadable NIfTI data ({type(error).__name__}: {error})") from None
    if volume.ndim != len(image.shape) or 0 in volume.shape:  # an (X, Y, 0) file reads back as shape (0,)
        raise DataError(path, f"no voxels (shape {image.shape})")
    if not np.isfinite(volume).all():
        raise DataError(path, f"{int((~np.isfinite(volume)).sum())} non-finite voxels (NaN or inf)")
    return volume


def nifti_spacing(path: str | Path) -> tuple[float, float, float] | None:
    """(slice, row, column) voxel size from the header (mm in practice): the last spatial axis, then the
    first two, matching a case's slices stacked along the last axis; None where the header gives no
    positive size. (nibabel reads a pixdim of 0 as 1, with a warning, so such a file reads as 1 mm.)"""
    zooms = _load_nifti(Path(path)).header.get_zooms()
    if len(zooms) < 3 or not all(np.isfinite(zooms[:3])) or min(zooms[:3]) <= 0:
        return None
    return float(zooms[2]), float(zooms[0]), float(zooms[1])


def _nifti_slice(path: Path, slice_index: int) -> np.ndarray:
    """(H, W), or (H, W, M) for a 4D file of M > 1 modalities: an (X, Y, Z, 1) file reads as 3D, as
    discovery reads it."""
    image = _load_nifti(path)
    shape = image.shape
    if len(shape) not in (3, 4):
        raise DataError(path, f"wrong dimensions {shape} (expected 3D, or 4D with modalities last)")
    if not 0 <= slice_index < shape[2]:
        raise DataError(path, f"slice {slice_index} outside 0..{shape[2] - 1}")
    try:
        pixels = np.asarray(image.dataobj[:, :, slice_index, ...], dtype=np.float32)
    except Exception as error:
        raise DataError(path, f"unreadable NIfTI data ({type(error).__name__}: {error})") from None
    return pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels


def as_three_channels(path: str | Path, pixels: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1) -> FLAIR copied into 3 channels; (H, W, 3) unchanged; else an error."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] == 1:
        return np.repeat(pixels, 3, axis=-1)
    if pixels.shape[-1] != 3:
        raise DataError(path, f"wrong channel count {pixels.shape[-1]} (expected 1 or 3 modalities)")
    return pixels


def read_nifti_image_slice(image_path: str, slice_index: int) -> np.ndarray:
    """Slice `slice_index` of a NIfTI case (one path, or modality paths joined by `|`): (H, W, 3) float32."""
    paths = [Path(p) for p in image_path.split(PATH_SEPARATOR)]
    if len(paths) == 1:
        return np.ascontiguousarray(as_three_channels(paths[0], _nifti_slice(paths[0], slice_index)))
    if len(paths) != 3:
        raise DataError(image_path, f"{len(paths)} modality files (expected 3: _0000, _0001, _0002)")
    channels = [_nifti_slice(p, slice_index) for p in paths]
    for path, channel in zip(paths, channels):
        if channel.shape != channels[0].shape or channel.ndim != 2:
            raise DataError(path, f"slice shape {channel.shape} differs from {paths[0].name} {channels[0].shape}")
    return np.ascontiguousarray(np.stack(channels, axis=-1))


# ---------------------------------------------------------------------------------------------------
# Manifest records


def read_image(record: Mapping) -> np.ndarray:
    """The image of one manifest row (image_path, slice_index, source_format) as (H, W, C).

    uint8 for 2D slice files (C = 3, or 1 for a grayscale file), float32 raw values for NIfTI volume
    slices (C = 3).
    """
    if record["source_format"] == "nifti":
        return read_nifti_image_slice(str(record["image_path"]), int(record["slice_index"]))
    return read_slice_file(record["image_path"])


def read_mask(record: Mapping) -> np.ndarray | None:
    """The mask of one manifest row as (H, W) uint8 in {0, 1}, or None for an unlabeled slice."""
    mask_path = record.get("mask_path")
    if is_missing(mask_path):
        return None
    if record["source_format"] == "nifti":
        pixels = _nifti_slice(Path(mask_path), int(record["slice_index"]))
        if pixels.ndim != 2:
            raise DataError(mask_path, f"wrong mask dimensions {pixels.shape} (expected a 3D volume)")
        return binary_mask(mask_path, pixels)
    return read_mask_file(mask_path)
