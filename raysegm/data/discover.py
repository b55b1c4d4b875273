"""Find every slice under a data folder, validate it, split by patient, and write the manifest.

Layouts:
- `kaggle_3m`: patient folders `<PREFIX>_<inst>_<patient>_<date>/` holding `<folder>_<k>.tif` and
  `<folder>_<k>_mask.tif`; volume_id is the folder name, institution its second token, slice_index
  the 1-based `k` (sorted numerically; of two files with one `k`, `_1` and `_01`, the zero-padded one
  is rejected). A folder is `kaggle_3m` when its name has that shape and at least one image in it is
  named `<folder>_<k>.tif`; other slice files in it are rejected by name.
- `image`: any other folder of 2D images (tif, tiff, png), each optionally with a `<stem>_mask` twin.
  volume_id is the folder's path relative to the data folder (the data folder's own name for images
  at its top), so one folder is one volume. slice_index is the trailing number of each file stem when
  every image of the folder has a distinct one that fits the manifest's int32 (a timestamp-like
  `img_20230101120000` does not), otherwise the 0-based position in natural name order (digit runs
  compared as numbers: `case_2` before `case_10`).
- Both 2D layouts: a volume has one channel count and one slice size, the ones most of its readable
  slices have (ties: the earliest slice's); a slice with another count or size is rejected.
- `nifti`: `.nii`/`.nii.gz` cases (suffix in any case), one 4D file (modalities last) or 3D file per
  case, or nnU-Net per-modality files `CASE_0000`, `CASE_0001`, `CASE_0002` (pre-contrast, FLAIR,
  post-contrast; files of one folder ending in `_<4 digits>` are one case's modalities when none has a
  mask of its own and their numbers include 0000, or include 0001 and are all at most 0002; otherwise
  each is a case of its own, so that `TCGA_CS_4942.nii.gz` is a case; a
  missing pre- or post-contrast file is replaced by FLAIR, as `kaggle_3m` does; a case without its
  FLAIR file is rejected; a per-modality file or mask may carry a trailing axis of size 1); mask
  `CASE_mask` or `CASE_seg`. volume_id is CASE, slice_index the 0-based index along the last spatial
  axis; image_path is one path or the modality paths joined by `|` (see raysegm.data.io).

Every file is read once. A bad file is logged on one line naming it and the reason, listed in the
rejects table, and its slice (or, for a volume file, its case) is left out; the rest still flows.
Sidecar files (.csv, .json, .txt, .md, .yaml, .parquet) and hidden files are skipped; any other file
is rejected as unsupported. Symlinked folders are followed; a folder reached a second time (a symlink
loop, a second link to one folder) is rejected, not read twice. Images without a mask are kept as
unlabeled slices; the reason given for a rejected image names its mask, left out with it.

Splits are by volume (`assign_splits`), saved in the manifest's `split` column and, with the settings
that made them, in the Parquet file's metadata, so a manifest is reused, never re-split differently.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from raysegm.config import DataSettings
from raysegm.data.io import (
    NIFTI_SUFFIXES,
    PATH_SEPARATOR,
    SLICE_SUFFIXES,
    DataError,
    as_three_channels,
    binary_mask,
    nifti_stem,
    read_mask_file,
    read_nifti_volume,
    read_slice_file,
)
from raysegm.data.preprocess import volume_stats
from raysegm.storage import replace_atomically

log = logging.getLogger("raysegm.data")

SIDECAR_SUFFIXES = (".csv", ".json", ".txt", ".md", ".yaml", ".yml", ".parquet")
KAGGLE_FOLDER = re.compile(r"^[A-Za-z0-9]+_([A-Za-z0-9]+)_[A-Za-z0-9_]+$")
MODALITY = re.compile(r"^(.+)_(\d{4})$")
TRAILING_NUMBER = re.compile(r"(\d+)$")
MAX_SLICE_INDEX = np.iinfo(np.int32).max  # slice_index is int32 in the manifest and the Parquet output
STATS_PERCENTILES = tuple(DataSettings.clip_percentiles)  # the default; the manifest stores these
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = [
    "volume_id", "slice_index", "split", "image_path", "mask_path", "source_format", "labeled",
    "has_tumor", "institution", "height", "width", "channels",
    "norm_low", "norm_high", "norm_mean", "norm_std",
]
METADATA_KEY = b"raysegm.manifest"
SPLIT_KEYS = ("split_seed", "val_fraction", "test_fraction", "folds", "fold")


class _Rejects:
    """Collects rejected files and logs each on one line as it is found. Each row names the volume the
    file belongs to and its slice_index (-1 where the file has none: a whole NIfTI case, a name without
    a usable number), so that inference reports it where discovery would have put it."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, path, reason: str, volume_id: str, slice_index: int = -1) -> None:
        log.warning("rejected %s: %s", path, reason)
        self.rows.append({"path": str(path), "reason": reason, "volume_id": volume_id,
                          "slice_index": int(slice_index)})

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows, columns=["path", "reason", "volume_id", "slice_index"])
        return frame.astype({"slice_index": np.int32}).sort_values("path", ignore_index=True)


def _volume_rows(volume_id, source_format, institution, slices, pixels) -> list[dict]:
    """Manifest rows of one volume, with the per-volume statistics of its accepted slices."""
    if not slices:
        return []
    stats = volume_stats(pixels, STATS_PERCENTILES)
    return [{"volume_id": volume_id, "source_format": source_format, "institution": institution,
             **record, **stats} for record in slices]


# ---------------------------------------------------------------------------------------------------
# 2D slice folders (kaggle_3m and image)


def _slice_numbers(folder: Path, images: dict[str, Path], masks: dict[str, Path], volume_id: str,
                   kaggle: bool, rejects: _Rejects) -> tuple[dict, bool]:
    """(stem -> slice_index for the images of one folder, whether the numbers come from the names);
    see the module docstring. A rejected image's mask is named in its reason."""
    if kaggle:
        pattern = re.compile(rf"^{re.escape(folder.name)}_(\d+)$")
        numbers, taken = {}, {}  # stem -> k, k -> the file that has it
        for stem, path in sorted(images.items(), key=lambda item: (len(item[0]), item[0])):
            match = pattern.match(stem)
            number = int(match.group(1)) if match else None
            if not (match and path.suffix.lower() in (".tif", ".tiff")):
                reason = f"name does not follow the kaggle_3m pattern {folder.name}_<k>.tif"
            elif number > MAX_SLICE_INDEX:
                reason = f"slice number {number} is beyond the manifest's int32 slice_index"
            elif number in taken:  # _1 and _01
                reason = f"slice number {number} is also {taken[number].name}"
            else:
                numbers[stem], taken[number] = number, path
                continue
            mask = masks.get(stem)
            rejects.add(path, reason + (f"; its mask {mask.name} is left out with it" if mask else ""), volume_id)
        return numbers, True
    trailing = {stem: TRAILING_NUMBER.search(stem) for stem in images}
    if all(trailing.values()):
        numbers = {stem: int(match.group(1)) for stem, match in trailing.items()}
        if len(set(numbers.values())) == len(images) and max(numbers.values(), default=0) <= MAX_SLICE_INDEX:
            return numbers, True
    return {stem: position for position, stem in enumerate(sorted(images, key=natural_key))}, False


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: `case_2` before `case_10`."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def _folder_volume(folder: Path, image_stems, data_dir: Path) -> tuple[str, str | None, str]:
    """(volume_id, institution, source_format) of a folder of 2D slices (see the module docstring)."""
    folder_match = KAGGLE_FOLDER.match(folder.name)
    if folder_match and any(re.fullmatch(rf"{re.escape(folder.name)}_\d+", stem) for stem in image_stems):
        return folder.name, folder_match.group(1), "kaggle_3m"
    relative = folder.relative_to(data_dir).as_posix()
    return (data_dir.name if relative == "." else relative), None, "image"


def _most_common(votes: list[tuple[str, object]]) -> tuple[object, str | None, int]:
    """(value, first stem that has it, how many have it) of the value most (stem, value) pairs have; of
    values tied, the one that comes first. (None, None, 0) without votes."""
    counts = Counter(value for _, value in votes)  # in order of first appearance, which max keeps on ties
    if not counts:
        return None, None, 0
    value = max(counts, key=counts.get)
    return value, next(stem for stem, v in votes if v == value), counts[value]


def _discover_folder(folder: Path, files: list[Path], data_dir: Path, rejects: _Rejects) -> list[dict]:
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    duplicates = []
    for path in files:
        stem = path.stem
        target, key = (masks, stem[: -len("_mask")]) if stem.endswith("_mask") else (images, stem)
        if key in target:
            duplicates.append((path, key, f"duplicate slice name (also {target[key].name})"))
            continue
        target[key] = path
    volume_id, institution, source_format = _folder_volume(folder, images, data_dir)
    numbers, by_name = _slice_numbers(folder, images, masks, volume_id, source_format == "kaggle_3m", rejects)
    for path, key, reason in duplicates:
        rejects.add(path, reason, volume_id, numbers.get(key, -1))
    for key, mask_path in masks.items():
        if key not in images:
            number = TRAILING_NUMBER.search(key) if by_name else None
            rejects.add(mask_path, f"mask without image (no {key}.tif/.png beside it)", volume_id,
                        int(number.group(1)) if number else -1)

    readable = []  # (stem, image) of the slices whose image could be read, in slice order
    for stem in sorted(numbers, key=numbers.get):
        mask_path = masks.get(stem)
        try:
            readable.append((stem, read_slice_file(images[stem])))
        except DataError as error:
            rejects.add(error.path, error.reason + (f"; slice left out with its mask {mask_path.name}"
                                                    if mask_path else ""), volume_id, numbers[stem])
    # one volume, one channel count and one slice size (2.5D input stacks a slice with its neighbours):
    # the ones most of its slices have, so that one stray export, even the first slice, is the one left
    # out; channels first, and only the slices that have the volume's count vote on its size
    channels, channels_from, channels_votes = _most_common(
        [(stem, image.shape[2]) for stem, image in readable])
    voters = [(stem, image.shape[:2]) for stem, image in readable if image.shape[2] == channels]
    size, size_from, size_votes = _most_common(voters)
    slices, pixels = [], []
    for stem, image in readable:
        image_path, mask_path = images[stem], masks.get(stem)
        with_mask = f" with its mask {mask_path.name}" if mask_path else ""
        if image.shape[2] != channels:
            rejects.add(image_path, f"{image.shape[2]} channels where the volume has {channels} ({channels_votes} "
                                    f"of its {len(readable)} slices, e.g. {images[channels_from].name}); "
                                    "slice left out" + with_mask, volume_id, numbers[stem])
            continue
        if image.shape[:2] != size:
            rejects.add(image_path, f"size {image.shape[0]}x{image.shape[1]} where the volume is {size[0]}x{size[1]} "
                                    f"({size_votes} of its {len(voters)} slices, e.g. {images[size_from].name}); "
                                    "slice left out" + with_mask,
                        volume_id, numbers[stem])
            continue
        mask = None
        if mask_path is not None:
            try:
                mask = read_mask_file(mask_path)
            except DataError as error:
                rejects.add(error.path, f"{error.reason}; slice {image_path.name} left out", volume_id,
                            numbers[stem])
                continue
            if mask.shape != image.shape[:2]:
                rejects.add(mask_path, f"mask size {mask.shape[0]}x{mask.shape[1]} differs from image "
                                       f"{image_path.name} {image.shape[0]}x{image.shape[1]}; slice left out",
                            volume_id, numbers[stem])
                continue
        slices.append({
            "slice_index": numbers[stem], "image_path": str(image_path),
            "mask_path": str(mask_path) if mask is not None else None,
            "labeled": mask is not None, "has_tumor": bool(mask is not None and mask.any()),
            "height": image.shape[0], "width": image.shape[1], "channels": image.shape[2],
        })
        pixels.append(image)
    return _volume_rows(volume_id, source_format, institution, slices, pixels)


# ---------------------------------------------------------------------------------------------------
# NIfTI cases


def _case_channels(case: str, whole: Path | None, modalities: dict[int, Path]) -> list[Path]:
    """The files of one case in channel order (pre-contrast, FLAIR, post-contrast), or a DataError."""
    if whole is not None and modalities:
        raise DataError(whole, f"case {case} has both a whole file and per-modality files")
    if whole is not None:
        return [whole]
    unexpected = sorted(set(modalities) - {0, 1, 2})
    if unexpected:
        raise DataError(modalities[unexpected[0]], f"modality _{unexpected[0]:04d} unexpected "
                                                   "(expected _0000, _0001, _0002; separate cases need "
                                                   "names that do not end in _0000, _0001, ...)")
    if 1 not in modalities:
        raise DataError(next(iter(modalities.values())), f"case {case} has no FLAIR file (_0001)")
    return [modalities.get(0, modalities[1]), modalities[1], modalities.get(2, modalities[1])]


def _read_case(paths: list[Path]) -> np.ndarray:
    """(X, Y, Z, 3) float32 of a case whose files are in channel order."""
    volumes = {}
    for path in dict.fromkeys(paths):
        volume = read_nifti_volume(path)
        if len(paths) > 1 and volume.ndim == 4:
            if volume.shape[-1] != 1:
                raise DataError(path, f"per-modality file is 4D {volume.shape} (expected 3D)")
            volume = volume[..., 0]
        volumes[path] = volume
    if len(paths) == 1:
        volume = volumes[paths[0]]
        return as_three_channels(paths[0], volume if volume.ndim == 4 else volume[..., None])
    reference = paths[1]
    for path, volume in volumes.items():
        if volume.shape != volumes[reference].shape:
            raise DataError(path, f"shape {volume.shape} differs from {reference.name} {volumes[reference].shape}")
    return np.stack([volumes[p] for p in paths], axis=-1)


def _discover_case(case: str, paths: list[Path], mask_path: Path | None, rejects: _Rejects) -> list[dict]:
    every_file = list(dict.fromkeys(paths)) + ([mask_path] if mask_path else [])
    try:
        volume = _read_case(paths)
        mask = None
        if mask_path is not None:
            mask = read_nifti_volume(mask_path)
            if mask.ndim == 4 and mask.shape[-1] == 1:
                mask = mask[..., 0]
            if mask.shape != volume.shape[:3]:
                raise DataError(mask_path, f"mask shape {mask.shape} differs from image {volume.shape[:3]}")
            mask = binary_mask(mask_path, mask)
    except DataError as error:
        for path in every_file:
            reason = error.reason if str(path) == error.path else f"case left out: {Path(error.path).name}: {error.reason}"
            rejects.add(path, reason, case)
        return []
    height, width, depth = volume.shape[:3]
    image_path = PATH_SEPARATOR.join(str(p) for p in paths)
    slices = [{
        "slice_index": k, "image_path": image_path,
        "mask_path": str(mask_path) if mask is not None else None,
        "labeled": mask is not None, "has_tumor": bool(mask is not None and mask[:, :, k].any()),
        "height": height, "width": width, "channels": 3,
    } for k in range(depth)]
    # statistics only need the voxels, so the (X, Y, Z, 3) layout is used as it is
    return _volume_rows(case, "nifti", None, slices, volume)


def nifti_cases(stems, masked=frozenset()) -> dict[str, tuple[str, int | None]]:
    """stem -> (case, modality number, or None for a whole-case file) for the image files of one folder.

    Stems ending in `_<4 digits>` with one prefix are that case's nnU-Net modality files when none of
    them has a mask of its own beside it (`masked`: the stems that do) and their numbers include 0, or
    include 1 (FLAIR) and are all at most 2; otherwise each such file is a whole case of its own
    (`TCGA_CS_4942`, `patient_0002` alone, or `patient_0001` ... `patient_0005`).
    """
    groups: dict[str, dict[str, int]] = {}
    for stem in stems:
        match = MODALITY.match(stem)
        if match:
            groups.setdefault(match.group(1), {})[stem] = int(match.group(2))
    cases = {stem: (stem, None) for stem in stems}
    for case, numbers in groups.items():
        values = set(numbers.values())
        if not set(numbers) & set(masked) and (0 in values or (1 in values and max(values) <= 2)):
            cases.update({stem: (case, number) for stem, number in numbers.items()})
    return cases


def _discover_nifti(files: list[Path], rejects: _Rejects) -> list[tuple[str, list[dict]]]:
    """(origin, rows) per NIfTI case; origin is the case's folder and name, for duplicate checks."""
    wholes: dict[tuple, Path] = {}
    modalities: dict[tuple, dict[int, Path]] = {}
    masks: dict[tuple, Path] = {}
    images: dict[Path, dict[str, Path]] = {}  # folder -> stem -> image file
    duplicates = []
    for path in files:
        stem = nifti_stem(path)
        for suffix in ("_mask", "_seg"):
            if stem.endswith(suffix):
                key = (path.parent, stem[: -len(suffix)])
                if key in masks:
                    rejects.add(path, f"second mask for case {key[1]} (also {masks[key].name})", key[1])
                else:
                    masks[key] = path
                break
        else:
            folder = images.setdefault(path.parent, {})
            if stem in folder:
                duplicates.append((path, stem, f"duplicate case name (also {folder[stem].name})"))
            else:
                folder[stem] = path
    for folder, stems in images.items():
        case_of = nifti_cases(stems, masked={case for where, case in masks if where == folder})
        for path, stem, reason in duplicates:
            if path.parent == folder:
                rejects.add(path, reason, case_of[stem][0])
        for stem, (case, number) in case_of.items():
            if number is None:
                wholes[(folder, case)] = stems[stem]
            else:
                modalities.setdefault((folder, case), {})[number] = stems[stem]
    cases = []
    for key in sorted(set(wholes) | set(modalities)):
        try:
            paths = _case_channels(key[1], wholes.get(key), modalities.get(key, {}))
        except DataError as error:
            files_of_case = [wholes.get(key), *modalities.get(key, {}).values(), masks.get(key)]
            for path in filter(None, files_of_case):
                rejects.add(path, error.reason, key[1])
            continue
        cases.append((str(key[0] / key[1]), _discover_case(key[1], paths, masks.get(key), rejects)))
    for key, mask_path in sorted(masks.items()):
        if key not in wholes and key not in modalities:
            rejects.add(mask_path, f"mask without image (no {key[1]}.nii.gz or {key[1]}_0000.nii.gz beside it)",
                        key[1])
    return cases


# ---------------------------------------------------------------------------------------------------
# discovery


def _nulls_as_none(frame: pd.DataFrame) -> pd.DataFrame:
    """Optional string columns as objects holding None where absent (pandas would make them NaN)."""
    for column in ("mask_path", "institution"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _walk(data_dir: Path, rejects: _Rejects) -> list[Path]:
    """Every file under `data_dir`, sorted, hidden files and folders left out, symlinked folders followed.

    Path.rglob (Python 3.11) does not descend into a symlinked folder, so a subset made of links to
    patient folders (`ln -s /data/kaggle_3m/TCGA_* subset/`) would be found empty. A folder whose real
    path was already walked (a symlink loop, or a second link to one folder) is not walked again but
    rejected: read twice, one patient would be two volumes, maybe in two splits.
    """
    walked = {os.path.realpath(data_dir): data_dir}  # real path -> the path it was walked under
    files = []
    for top, folders, names in os.walk(data_dir, followlinks=True):
        top = Path(top)
        kept = []
        for name in sorted(folders):  # sorted, so that the same link wins on every run
            folder = top / name
            if name.startswith("."):
                continue
            real = os.path.realpath(folder)
            if real in walked:
                first = walked[real]
                why = "a symlink loop" if first in folder.parents else "a second path to one folder"
                rejects.add(folder, f"folder links to {real}, already walked as {first} ({why}); not read twice",
                            folder.relative_to(data_dir).as_posix())
                continue
            walked[real] = folder
            kept.append(name)
        folders[:] = kept  # os.walk descends only into these
        files += [top / name for name in names if not name.startswith(".")]
    return sorted(files)


def discover(data_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every slice under `data_dir`, validated: (slices, rejects).

    slices: one row per accepted slice, sorted by (volume_id, slice_index), with volume_id,
    slice_index (int32), image_path, mask_path (None when unlabeled), source_format, labeled,
    has_tumor, institution (None unless the layout names one), height, width, channels (int32) and
    the per-volume, per-channel statistics norm_low, norm_high (0.5 and 99.5 percentiles), norm_mean,
    norm_std (of the clipped volume) as lists of floats.
    rejects: one row per bad file: path, reason (also logged, one line each), and the volume_id and
    slice_index (int32, -1 where none) it belongs to.
    """
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder not found: {data_dir}")
    rejects = _Rejects()
    folders: dict[Path, list[Path]] = {}
    unsupported: dict[Path, list[Path]] = {}
    nifti_files = []
    for path in _walk(data_dir, rejects):
        if _is_nifti(path):
            nifti_files.append(path)
        elif path.suffix.lower() in SLICE_SUFFIXES:
            folders.setdefault(path.parent, []).append(path)
        elif path.suffix.lower() in SIDECAR_SUFFIXES:
            continue
        else:
            unsupported.setdefault(path.parent, []).append(path)
    for folder, paths in sorted(unsupported.items()):
        volume_id = _folder_volume(folder, [p.stem for p in folders.get(folder, [])], data_dir)[0]
        for path in paths:
            if path.is_symlink() and not path.exists():  # e.g. a link to a patient folder that has moved
                rejects.add(path, f"broken symbolic link to {os.readlink(path)}", volume_id)
                continue
            rejects.add(path, f"unsupported file type {path.suffix or '(no extension)'!r} "
                              "(expected .tif, .tiff, .png, .nii or .nii.gz)", volume_id)
    origins: dict[str, str] = {}  # volume_id -> where it was found: one volume_id, one source
    rows = []
    volumes = [(str(folder), _discover_folder(folder, files, data_dir, rejects))
               for folder, files in sorted(folders.items())]
    for origin, volume_rows in volumes + _discover_nifti(nifti_files, rejects):
        if not volume_rows:
            continue
        volume_id = volume_rows[0]["volume_id"]
        if volume_id in origins:
            for path in dict.fromkeys(row["image_path"] for row in volume_rows):
                rejects.add(path, f"duplicate volume_id {volume_id!r} (also found in {origins[volume_id]})", volume_id)
            continue
        origins[volume_id] = origin
        rows += volume_rows
    slices = pd.DataFrame(rows, columns=[c for c in MANIFEST_COLUMNS if c != "split"])
    slices = slices.sort_values(["volume_id", "slice_index"], ignore_index=True)
    for column in ("slice_index", "height", "width", "channels"):
        slices[column] = slices[column].astype(np.int32)
    for column in ("labeled", "has_tumor"):
        slices[column] = slices[column].astype(bool)
    return _nulls_as_none(slices), rejects.frame()


# ---------------------------------------------------------------------------------------------------
# splits


def assign_splits(volume_ids, *, seed: int = DataSettings.split_seed, val_fraction: float = DataSettings.val_fraction,
                  test_fraction: float = DataSettings.test_fraction, folds: int = DataSettings.folds,
                  fold: int = DataSettings.fold) -> dict[str, str]:
    """volume_id -> "train" / "val" / "test", by volume, a function of the seed and the set of ids alone.

    The distinct ids are sorted, then permuted by numpy's PCG64 Generator seeded with `seed`, so the
    result does not depend on the input order or the machine.
    Plain split (folds=0): the first round(n * test_fraction) permuted volumes are "test", the next
    round(n * val_fraction) "val", the rest "train"; a split whose fraction is above 0 gets at least one
    volume when n >= 3 (val already when n >= 2), and train always keeps one.
    k-fold (folds=k >= 2): the permuted volumes are dealt into k folds in turn (volume j to fold j % k);
    fold `fold` is "val" and the other k-1 folds "train"; there is no "test" split.
    """
    ids = sorted({str(v) for v in volume_ids})
    count = len(ids)
    if count == 0:
        raise ValueError("assign_splits: no volumes")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(count)]
    if folds:
        if not 2 <= folds <= count:
            raise ValueError(f"assign_splits: folds must be between 2 and the {count} volumes, got {folds}")
        if not 0 <= fold < folds:
            raise ValueError(f"assign_splits: fold must be in 0..{folds - 1}, got {fold}")
        return {volume_id: "val" if j % folds == fold else "train" for j, volume_id in enumerate(order)}
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"assign_splits: need 0 <= val_fraction, test_fraction and val + test < 1, "
                         f"got {val_fraction} and {test_fraction}")
    sizes = {"test": int(np.floor(count * test_fraction + 0.5)), "val": int(np.floor(count * val_fraction + 0.5))}
    if count >= 2 and val_fraction > 0:
        sizes["val"] = max(sizes["val"], 1)
    if count >= 3 and test_fraction > 0:
        sizes["test"] = max(sizes["test"], 1)
    while sizes["test"] + sizes["val"] > count - 1:
        larger = "test" if sizes["test"] >= sizes["val"] else "val"
        sizes[larger] -= 1
    labels = ["test"] * sizes["test"] + ["val"] * sizes["val"]
    labels += ["train"] * (count - len(labels))
    return dict(zip(order, labels))


# ---------------------------------------------------------------------------------------------------
# manifest


def _write_parquet(frame: pd.DataFrame, out: Path, settings: dict) -> None:
    """Write atomically (temporary name, then rename) with the settings in the file's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[METADATA_KEY] = json.dumps(settings).encode()
    table = table.replace_schema_metadata(metadata)
    replace_atomically(out, lambda temporary: pq.write_table(table, temporary))


def manifest_settings(path) -> dict:
    """The settings a manifest was prepared with (data_dir and the split keys), from its metadata."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path}: not a raysegm manifest (no {METADATA_KEY.decode()} metadata)")
    return json.loads(metadata[METADATA_KEY])


def prepare(data_dir, out, *, split_seed: int = DataSettings.split_seed, val_fraction: float = DataSettings.val_fraction,
            test_fraction: float = DataSettings.test_fraction, folds: int = DataSettings.folds,
            fold: int = DataSettings.fold, strict: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Discover and validate `data_dir`, split by volume, write the manifest: (manifest, rejects).

    Writes the manifest Parquet at `out` (split settings in its metadata) and the rejects beside it as
    `<stem>.rejects.csv`; prints one summary line. strict=True raises ValueError listing every reject
    (and writes nothing) when any file was rejected.
    """
    out = Path(out)
    slices, rejects = discover(data_dir)
    if strict and len(rejects):
        listing = "\n".join(f"  {row.path}: {row.reason}" for row in rejects.itertuples())
        raise ValueError(f"{len(rejects)} file(s) rejected under {data_dir} (strict):\n{listing}")
    if slices.empty:
        raise ValueError(f"no usable slices under {data_dir} ({len(rejects)} file(s) rejected)")
    splits = assign_splits(slices["volume_id"], seed=split_seed, val_fraction=val_fraction,
                           test_fraction=test_fraction, folds=folds, fold=fold)
    slices.insert(2, "split", slices["volume_id"].map(splits))
    manifest = slices[MANIFEST_COLUMNS]
    settings = {"data_dir": str(Path(data_dir).resolve()), "split_seed": split_seed,
                "val_fraction": val_fraction, "test_fraction": test_fraction, "folds": folds, "fold": fold}
    out.parent.mkdir(parents=True, exist_ok=True)
    # the rejects first, both atomically: a manifest on disk (which a rerun reuses) always has its rejects
    rejects_csv = out.with_name(out.stem + ".rejects.csv")
    replace_atomically(rejects_csv, lambda temporary: rejects.to_csv(temporary, index=False))
    _write_parquet(manifest, out, settings)
    volumes = manifest.groupby("split")["volume_id"].nunique()
    slice_counts = manifest["split"].value_counts()
    split_text = ", ".join(f"{name} {volumes.get(name, 0)} volumes/{slice_counts.get(name, 0)} slices"
                           for name in SPLITS if name in volumes)
    print(f"prepared {out}: {manifest['volume_id'].nunique()} volumes, {len(manifest)} slices "
          f"({int(manifest['has_tumor'].sum())} with tumor, {int((~manifest['labeled']).sum())} unlabeled), "
          f"{len(rejects)} rejected; {split_text}")
    return load_manifest(out), rejects


def load_manifest(path) -> pd.DataFrame:
    """A manifest written by `prepare`; its settings are in `.attrs["raysegm"]`. Missing paths are None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    manifest = pd.read_parquet(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"{path}: not a raysegm manifest (missing columns {missing})")
    unknown = set(manifest["split"].unique()) - set(SPLITS)
    if unknown:
        raise ValueError(f"{path}: unknown split values {sorted(unknown)}")
    manifest = _nulls_as_none(manifest)
    manifest.attrs["raysegm"] = manifest_settings(path)
    return manifest


def is_own_manifest(manifest, run_name: str) -> bool:
    """True for the manifest a run or study named `run_name` prepared for itself with `manifest_for`
    (`<run_name>/data/manifest.parquet`), also where its folder was moved or copied since."""
    return bool(manifest) and Path(manifest).parts[-3:] == (run_name, "data", "manifest.parquet")


def manifest_for(data: DataSettings, work_dir) -> pd.DataFrame:
    """The manifest a run uses, from its DataSettings.

    - data.manifest set: that manifest, with its saved split.
    - else data.data_dir set: prepared into work_dir/manifest.parquet with the DataSettings split keys;
      an existing one there is reused when it was prepared from the same folder with the same split
      settings, and is an error otherwise.
    - else: a synthetic dataset (data.synthetic_patients x data.synthetic_slices at data.size px,
      seed data.split_seed) generated under work_dir and prepared the same way.
    """
    if data.manifest:
        return load_manifest(data.manifest)
    work_dir = Path(work_dir)
    if data.data_dir:
        data_dir = Path(data.data_dir)
    else:
        data_dir = work_dir / (f"synthetic-{data.synthetic_patients}x{data.synthetic_slices}-"
                               f"{data.size}px-seed{data.split_seed}")
    wanted = {"data_dir": str(data_dir.resolve()), **{key: getattr(data, key) for key in SPLIT_KEYS}}
    target = work_dir / "manifest.parquet"
    if target.exists():
        saved = manifest_settings(target)
        if {key: saved.get(key) for key in wanted} != wanted:
            raise ValueError(f"{target} was prepared with {saved}, but this run asks for {wanted}: "
                             "use another work folder or delete that manifest")
        return load_manifest(target)
    if not data.data_dir:
        from raysegm.data.synth import generate_dataset

        generate_dataset(data_dir, patients=data.synthetic_patients, slices=data.synthetic_slices,
                         size=data.size, seed=data.split_seed)
    manifest, _ = prepare(data_dir, target, split_seed=data.split_seed, val_fraction=data.val_fraction,
                          test_fraction=data.test_fraction, folds=data.folds, fold=data.fold)
    return manifest
