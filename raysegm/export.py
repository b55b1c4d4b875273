"""Turn inference Parquet into files people and tools open: mask PNGs, overlays, NIfTI volumes.

- "png": each slice's mask as written by inference (8-bit, 255 tumor), at
  `<out>/<volume_id>/<volume_id>_<slice_index>_mask.png`.
- "overlay": the FLAIR channel of the source slice in grey, the mask tinted red and its outline in
  full red, at `<out>/<volume_id>/<volume_id>_<slice_index>_overlay.png`. Needs the source images: from
  each row's `source`, or, when the archive has moved, under `source_root` (the part of `source` below
  the input folder recorded in the output's `_raysegm.json`, else `<volume_id>/<file name>`, else
  `<file name>`).
- "nifti": one `<out>/<volume_id>.nii.gz` per volume, masks (uint8, 1 tumor) stacked along the last
  axis in slice order. Where the source is NIfTI, the mask takes the source volume's affine, depth
  (slice k at index k) and header (qform/sform codes, units, voxel sizes; data type uint8, no scaling),
  and its in-plane shape must be the source's; otherwise the affine is the identity and the slices are
  stacked in order.

A `volume_id` holding `/` (image folders nested in the input) becomes nested folders for png/overlay
and `_` in NIfTI file names. Error rows have no mask: they are counted and printed, never exported as
empty masks, except inside a NIfTI volume, where their slices are zero (printed by name).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from scipy import ndimage

from raysegm.data.io import NIFTI_SUFFIXES, PATH_SEPARATOR
from raysegm.infer import METADATA, decode_mask_png
from raysegm.storage import filesystem, replace_atomically

FORMATS = ("png", "overlay", "nifti")
TINT = np.array([255.0, 0.0, 0.0])  # red
TINT_ALPHA = 0.35


def read_output(parquet) -> tuple[pd.DataFrame, dict]:
    """(rows, metadata) of an inference output folder or one of its Parquet files (local path or URI)."""
    fs, path = filesystem(str(parquet))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"inference output not found: {parquet}")
    metadata = {}
    if info.type == pafs.FileType.Directory:
        meta_path = f"{path.rstrip('/')}/{METADATA}"
        if fs.get_file_info(meta_path).type == pafs.FileType.File:
            with fs.open_input_stream(meta_path) as stream:
                metadata = json.loads(stream.read())
    rows = pq.read_table(path, filesystem=fs).to_pandas()
    missing = {"volume_id", "slice_index", "source", "height", "width", "mask_png", "status"} - set(rows.columns)
    if missing:
        raise ValueError(f"{parquet}: not an inference output (missing columns {sorted(missing)})")
    return rows.sort_values(["volume_id", "slice_index"], kind="stable").reset_index(drop=True), metadata


def _file_name(volume_id: str) -> str:
    return volume_id.replace("/", "_")


class _Sources:
    """Finds a row's source files locally: as recorded, under source_root, or fetched from a URI."""

    def __init__(self, source_root, input_root: str | None):
        self.source_root = Path(source_root) if source_root else None
        self.input_root = input_root.rstrip("/") if input_root else None
        self.staging = Path(tempfile.mkdtemp(prefix="raysegm-export-"))
        self.fetched: dict[str, Path] = {}

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def _one(self, source: str, volume_id: str) -> Path:
        if self.source_root is not None:
            candidates = []
            if self.input_root and source.startswith(self.input_root + "/"):
                candidates.append(self.source_root / source[len(self.input_root) + 1:])
            name = source.rsplit("/", 1)[-1]
            candidates += [self.source_root / volume_id / name, self.source_root / name]
            for candidate in candidates:
                if candidate.is_file():
                    return candidate
            raise FileNotFoundError(f"source {source} not found under --source-root {self.source_root} "
                                    f"(tried {', '.join(str(c) for c in candidates)})")
        if "://" not in source:
            if not Path(source).is_file():
                raise FileNotFoundError(f"source {source} not found (pass source_root if the archive moved)")
            return Path(source)
        if source not in self.fetched:
            fs, path = pafs.FileSystem.from_uri(source)
            local = self.staging / f"{len(self.fetched)}-{source.rsplit('/', 1)[-1]}"
            pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            self.fetched[source] = local
        return self.fetched[source]

    def local(self, source: str, volume_id: str) -> list[Path]:
        """The local file(s) of a source (several for a per-modality NIfTI case)."""
        return [self._one(part, volume_id) for part in source.split(PATH_SEPARATOR)]


def _is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def flair_grey(paths: list[Path], slice_index: int) -> np.ndarray:
    """The FLAIR channel (channel 1; a grayscale file's only one) of a source slice as (H, W) uint8.

    2D slices are uint8 already; volume slices are scaled from their 0.5 and 99.5 percentiles.
    """
    from raysegm.data.io import read_nifti_image_slice, read_slice_file

    if _is_nifti(paths[0]):
        flair = read_nifti_image_slice(PATH_SEPARATOR.join(str(p) for p in paths), slice_index)[..., 1]
        low, high = np.percentile(flair, (0.5, 99.5))
        return np.clip((flair - low) / max(high - low, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    image = read_slice_file(paths[0])
    return image[..., 1 if image.shape[-1] == 3 else 0]


def overlay(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8 grey and (H, W) bool mask -> (H, W, 3) uint8: tumor tinted, its outline in full tint."""
    rgb = np.repeat(grey[..., None].astype(np.float64), 3, axis=-1)
    rgb[mask] = (1 - TINT_ALPHA) * rgb[mask] + TINT_ALPHA * TINT
    outline = mask & ~ndimage.binary_erosion(mask)
    rgb[outline] = TINT
    return rgb.round().astype(np.uint8)


def _export_slices(rows: pd.DataFrame, out: Path, to: str, sources: _Sources | None) -> int:
    written = 0
    for row in rows.itertuples(index=False):
        folder = out / row.volume_id
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{_file_name(row.volume_id)}_{row.slice_index}"
        if to == "png":
            replace_atomically(folder / f"{stem}_mask.png", partial(Path.write_bytes, data=row.mask_png))
        else:
            mask = decode_mask_png(row.mask_png)
            paths = sources.local(row.source, row.volume_id)
            grey = flair_grey(paths, int(row.slice_index))
            if grey.shape != mask.shape:
                raise ValueError(f"{row.source}: slice {row.slice_index} is {grey.shape[0]}x{grey.shape[1]}, "
                                 f"its mask {mask.shape[0]}x{mask.shape[1]}: not the image the mask was made of")
            image = Image.fromarray(overlay(grey, mask), mode="RGB")
            replace_atomically(folder / f"{stem}_overlay.png", image.save)
        written += 1
    return written


def _export_nifti(rows: pd.DataFrame, out: Path, sources: _Sources) -> int:
    import nibabel

    names: dict[str, str] = {}
    for volume_id in sorted(set(rows["volume_id"])):
        other = names.setdefault(_file_name(volume_id), volume_id)
        if other != volume_id:
            raise ValueError(f"export: volumes {other!r} and {volume_id!r} would both be written to "
                             f"{_file_name(volume_id)}.nii.gz; export them as png, or to separate folders")
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for volume_id, volume in rows.groupby("volume_id", sort=True):
        ok = volume[volume["status"] == "ok"]
        if ok.empty:
            print(f"export: {volume_id}: no slice was segmented, no NIfTI written")
            continue
        sizes = set(zip(ok["height"], ok["width"]))
        if len(sizes) > 1:
            raise ValueError(f"export: {volume_id}: slices differ in size {sorted(sizes)}, cannot stack a volume")
        height, width = sizes.pop()
        first_source = ok["source"].iloc[0]
        reference = None
        if _is_nifti(first_source.split(PATH_SEPARATOR)[0]):
            reference_path = sources.local(first_source, volume_id)[0]
            reference = nibabel.load(reference_path)
            in_plane = tuple(int(n) for n in reference.shape[:2])
            if in_plane != (int(height), int(width)):
                raise ValueError(f"export: {volume_id}: its masks are {height}x{width}, its source {reference_path} "
                                 f"is {in_plane[0]}x{in_plane[1]} in plane: not the volume the masks were made of")
            affine, depth = reference.affine, reference.shape[2]
            positions = {int(k): int(k) for k in volume["slice_index"] if k >= 0}
        else:
            affine, depth = np.eye(4), int((volume["slice_index"] >= 0).sum())
            positions = {int(k): p for p, k in enumerate(sorted(k for k in volume["slice_index"] if k >= 0))}
        beyond = sorted(k for k in positions if positions[k] >= depth)
        if beyond:
            raise ValueError(f"export: {volume_id}: slices {beyond} lie beyond the {depth} slices of its "
                             f"source {first_source.split(PATH_SEPARATOR)[0]}")
        masks = np.zeros((height, width, depth), dtype=np.uint8)
        for row in ok.itertuples(index=False):
            masks[:, :, positions[int(row.slice_index)]] = decode_mask_png(row.mask_png)
        failed = sorted(int(k) for k in volume.loc[volume["status"] != "ok", "slice_index"])
        if failed:
            print(f"export: {volume_id}: slices {failed} have no mask (error rows), written as zeros")
        if reference is None:
            image = nibabel.Nifti1Image(masks, affine)
        else:  # the source's header: its qform/sform codes, units and voxel sizes stay; uint8, no scaling
            header = reference.header.copy()
            header.set_data_dtype(np.uint8)
            header.set_slope_inter(1.0, 0.0)
            header["cal_min"], header["cal_max"] = 0, 1
            image = nibabel.Nifti1Image(masks, affine, header)
        replace_atomically(out / f"{_file_name(volume_id)}.nii.gz", partial(nibabel.save, image))
        written += 1
    return written


def _check_out(out: Path, parquet, input_root: str | None, source_root) -> None:
    """Refuse an `out` inside the inference output (read_parquet would meet the exported files there) or
    inside the input archive (the next discovery would read exported masks as its slices or truth)."""
    resolved = out.expanduser().resolve()
    places = [("the inference output", parquet), ("the input archive", input_root),
              ("the source root", source_root)]
    for what, place in places:
        if place is None or "://" in str(place):
            continue
        place = Path(place).expanduser().resolve()
        folder = place if place.is_dir() or place.suffix != ".parquet" else place.parent
        if resolved == folder or resolved.is_relative_to(folder):
            raise ValueError(f"export: --out {out} is inside {what} {folder}; choose a folder outside it")


def export(parquet, to: str, out, source_root=None) -> Path:
    """Write the masks of an inference output (folder or Parquet file) as `to` ("png", "overlay",
    "nifti") under `out`; returns `out`. See the module docstring for names and geometry."""
    if to not in FORMATS:
        raise ValueError(f"export: unknown format {to!r} (expected one of {FORMATS})")
    rows, metadata = read_output(parquet)
    out = Path(out)
    _check_out(out, parquet, metadata.get("input"), source_root)
    ok = rows[rows["status"] == "ok"]
    sources = _Sources(source_root, metadata.get("input")) if to in ("overlay", "nifti") else None
    try:
        if to == "nifti":
            written = _export_nifti(rows, out, sources)
        else:
            written = _export_slices(ok, out, to, sources)
    finally:
        if sources is not None:
            sources.close()
    unit = "volumes" if to == "nifti" else "slices"
    print(f"export: {written} {unit} written to {out} as {to}; {len(rows) - len(ok)} error rows have no mask")
    return out
