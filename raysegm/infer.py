"""Bulk offline segmentation: every slice of an archive through a checkpoint, masks to Parquet.

The unit of work is one volume (all slices of one `volume_id`): a volume's rows are committed together
as one Parquet file, so the largest 3D connected component (Buda et al.'s post-processing) can be taken
over the whole volume while the job still streams. The plan:

    discover(input)                       driver: every file validated once; rejects become error rows
    -> ray.data.from_pandas(slice rows)   blocks of `batch_size` slices, ordered by volume, then slice
    -> read_slices                        Ray tasks (num_cpus = read_cpus, at most read_tasks at once):
                                          read, decode, preprocess
                                          exactly as training did (a 2.5D checkpoint reads each slice
                                          with its neighbours, raysegm.data.context); an unreadable
                                          slice becomes an error row here and the job goes on
    -> SegmentationPredictor              map_batches on an actor pool (one model replica per actor,
                                          `replicas` actors with cpus/gpus_per_replica): probabilities
                                          (optionally averaged with the horizontally flipped input),
                                          resized back to each slice's own size, P = prob > threshold,
                                          encoded as an 8-bit PNG (255 tumor)
    -> driver                             iter_batches in input order (preserve_order); when a volume's
                                          last slice arrives: infer.postprocess, commit, one progress line

The job's object-store budget (`object_store_budget`) is what keeps memory flat as archives grow: without
it the reads run ahead of the model and Ray Data buffers preprocessed slices up to its default limit
(a large share of the object store). With it and preserve_order, the driver holds the volumes in flight.

Commit (exactly once per volume): the volume's rows are written to `.tmp-<uuid>-part-...` and renamed to
`part-<volume_id>-<sha1(volume_id)[:8]>.parquet`, one file per volume (volumes hold tens to hundreds of
slices, so parts stay between tens of kB and a few MB). The driver commits, not the Ray tasks: it is the
one place that sees every row of a volume, so it knows when a volume is complete, and one process
renaming keeps the rule "a final name only ever holds a whole volume" simple. A rerun into the same
output skips every volume whose part exists and whose input files are unchanged, removes leftover
temporary files (the `.` prefix also hides them from pyarrow's dataset discovery), and finishes the
rest. Each part records the sha1 of its volume's input files (`volume_fingerprints`: every image file
discovered or rejected for it, by name and bytes) in its Parquet metadata; a volume whose files changed
since (a slice added, replaced or fixed) is segmented again and its part replaced in one rename, and
committed volumes no longer in the input are named and kept. A committed part that holds error rows
(a read or a prediction that failed, perhaps only once) is done again on every rerun, its input changed
or not, and replaced in the same one rename; a reject that is deterministic comes back as the same row.
`_raysegm.json` (model id, checkpoint, input, the settings that change the masks, the arithmetic, the
checkpoint's input settings raysegm.checkpoint.INPUT_SETTINGS) is written before any part; pyarrow
ignores `_`-prefixed files, so `pandas.read_parquet(output)` reads the parts alone. Output of another
checkpoint, of another input, or of the same ones with other tta/postprocess/threshold, arithmetic
(bf16 on GPU replicas with precision auto, else fp32) or input settings (a checkpoint's config.json
edited: the model id hashes its weights only) in the folder is an error; parts written before parts
recorded their input's fingerprint are kept as they are (unless they hold error rows). Two jobs must
not write into one output at the same time.

The replicas' device is chosen on the driver (`replica_device`: CUDA when infer.gpus_per_replica gives
them GPUs, else CPU) and passed to each: Ray 2.60 does not hide a node's GPUs from an actor given none.

Rows follow the contract's "Inference output" schema (`SCHEMA`). Error rows carry status "error", the
reason naming the file, a null `mask_png` and `max_prob`, 0 tumor pixels, and the slice's size where
discovery knew it (else 0). A discovery reject carries the `(volume_id, slice_index)` discovery gave
it (raysegm.data.discover): a bad image, or a bad mask that takes its slice out, gives that slice an
error row; a NIfTI file gives its case and slice -1 (the whole case is out); a file with no usable
slice number gives -1.

An input whose channel count differs from the checkpoint's `in_channels` stops the whole job before any
work (a ValueError): it is a mismatch between the archive and the model, not a fault of one file, and
a folder of error rows would hide it.

Input: a local path, or a URI pyarrow reads (`s3://`, `gs://`, `file://`, ...). A URI input is copied
whole to a local staging folder first (discovery validates every byte anyway), and its read tasks are
pinned to the driver's node where that copy lives (asking for no CPU where that node offers tasks
none, as `cluster.yaml`'s head; infer.read_tasks bounds them, 0 does not); `source` names the URI.
A local input must be visible at the same path on every node (a shared mount) on a multi-node cluster.
Output: a local path or a URI (written through pyarrow.fs; on object stores the "rename" is a copy of a
whole object, which is never visible half-written). The checkpoint's files are shipped to the model
replicas by value, so it needs to exist on the driver's machine only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from scipy import ndimage

from raysegm.config import POSTPROCESS, DataSettings, InferSettings, from_dict, to_dict
from raysegm.data.context import context_columns, read_input, with_context
from raysegm.storage import best_checkpoint_of, filesystem

SCHEMA = pa.schema([
    pa.field("volume_id", pa.string(), nullable=False),
    pa.field("slice_index", pa.int32(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("mask_png", pa.binary()),  # null on error rows
    pa.field("tumor_pixels", pa.int64(), nullable=False),
    pa.field("max_prob", pa.float32()),  # null on error rows
    pa.field("model", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),  # null when status is "ok"
])
METADATA = "_raysegm.json"
PART_PREFIX = "part-"
TEMP_PREFIX = ".tmp-"
PRECISIONS = ("auto", "fp32")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.pt")
MASK_OUTPUTS = ("tta", "postprocess", "threshold")  # settings that change the masks in an output folder
FINGERPRINT_KEY = b"raysegm.input_sha1"  # a part's Parquet metadata: the sha1 of its volume's input files


# ---------------------------------------------------------------------------------------------------
# Masks: PNG encoding and the per-volume post-processing


def encode_mask_png(mask: np.ndarray) -> bytes:
    """(H, W) bool -> 8-bit single-channel PNG bytes, 255 tumor, 0 background."""
    buffer = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """PNG bytes of `encode_mask_png` -> (H, W) bool."""
    with Image.open(io.BytesIO(data)) as png:
        return np.asarray(png.convert("L")) > 127


def largest_connected_component(masks: np.ndarray, by: str = "voxels") -> np.ndarray:
    """(Z, H, W) bool -> the largest 3D connected component alone (face connectivity, scipy.ndimage.label).

    Buda et al.'s post-processing: tumor outside the biggest blob is taken for false positives. Empty in,
    empty out; the result is a subset of the input (it never adds tumor); ties keep the lowest label.
    by: "voxels" keeps the component with the most voxels (Buda et al.); "slices" the one that spans the
    most slices (from the first slice it touches to the last), ties broken by voxels. A glioma is a
    volume; a bright structure the model takes for tumor (a periventricular rim, say) can hold as many
    voxels in fewer slices, and then wins on voxels alone.
    """
    if by not in ("voxels", "slices"):
        raise ValueError(f"by: unknown {by!r} (expected 'voxels' or 'slices')")
    labels, count = ndimage.label(masks)
    if count <= 1:
        return masks.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    score = sizes
    if by == "slices":
        spans = np.array([box[0].stop - box[0].start for box in ndimage.find_objects(labels)], dtype=np.int64)
        score = spans * (int(sizes.max()) + 1) + sizes  # the span first, then the voxels
    return labels == 1 + int(np.argmax(score))


def fill_holes(masks: np.ndarray) -> np.ndarray:
    """(Z, H, W) bool -> every slice with its holes filled (scipy.ndimage.binary_fill_holes, in 2D).

    A hole is background that no path of face neighbours joins to the slice's border. The reference
    masks outline a lesion with its core: in lgg-dev-40 filling their holes adds 399 of 1.1M tumor
    pixels. A model that finds a bright rim but not the dark core it encloses (a cystic lesion) leaves
    such a hole. The result is a superset of the input (it never removes tumor).
    """
    return np.stack([ndimage.binary_fill_holes(mask) for mask in masks]) if len(masks) else masks.astype(bool)


def postprocess_volume(masks: np.ndarray, postprocess: str) -> np.ndarray:
    """(Z, H, W) bool masks of one volume, in slice order -> the masks after `postprocess` (POSTPROCESS).

    Its steps, joined by "+", run left to right: the component is chosen before its holes are filled.
    """
    if postprocess not in POSTPROCESS:
        raise ValueError(f"postprocess: unknown {postprocess!r} (expected one of {POSTPROCESS})")
    steps = {"none": lambda m: m, "lcc": largest_connected_component, "fill_holes": fill_holes,
             "lcc_slices": lambda m: largest_connected_component(m, by="slices")}
    for step in postprocess.split("+"):
        masks = steps[step](masks)
    return masks.astype(bool)


def postprocess_slices(masks: list[np.ndarray], postprocess: str) -> list[np.ndarray]:
    """One volume's (H, W) bool masks in slice order -> after `postprocess`, in the same order.

    Slices of one volume that differ in size (image folders only) cannot be stacked: the slices of each
    size are post-processed as a volume of their own.
    """
    out = list(masks)
    for shape in {mask.shape for mask in masks}:
        group = [k for k, mask in enumerate(masks) if mask.shape == shape]
        for k, mask in zip(group, postprocess_volume(np.stack([masks[k] for k in group]), postprocess)):
            out[k] = mask
    return out


def probabilities(model, inputs, tta: bool = False):
    """(B, C, S, S) -> tumor probabilities (B, 1, S, S), under the caller's grad and autocast context.

    With tta: p = (sigmoid(f(x)) + flip(sigmoid(f(flip(x))))) / 2, flip along the width.
    """
    import torch

    probs = torch.sigmoid(model(inputs).float())
    if tta:
        flipped = torch.sigmoid(model(torch.flip(inputs, dims=[-1])).float())
        probs = (probs + torch.flip(flipped, dims=[-1])) / 2
    return probs


# ---------------------------------------------------------------------------------------------------
# The model replica


def _materialize_checkpoint(files: Mapping[str, bytes]) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="raysegm-ckpt-"))
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


class SegmentationPredictor:
    """One model replica: a batch of preprocessed slices -> the contract's mask columns.

    checkpoint: a checkpoint folder, or its files as {name: bytes} (how infer() ships it to replicas).
    settings: InferSettings or its dict (tta, threshold, precision are read).
    device: "cuda", "cpu", or None for CUDA when this process sees a GPU, else CPU. infer() always passes
    it (`replica_device`): Ray 2.60 does not hide a node's GPUs from an actor given none (it leaves
    CUDA_VISIBLE_DEVICES alone unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1), so None in a replica would
    use GPUs Ray never scheduled, in an arithmetic the output does not record. On CUDA with precision
    "auto" the forward pass runs under bf16 autocast; a GPU without bf16 is a ValueError (set
    infer.precision=fp32), so the arithmetic an output records is the one that ran. Probabilities are
    always computed in float32.

    __call__(batch) takes a mapping of numpy arrays: `image` (B, C, S, S) float32 as preprocess_image
    makes it, `height`, `width` (B,) the slices' own sizes, `status` (B,) ("ok", or "error" for slices
    that could not be read, which are passed through), `error`, `volume_id`, `slice_index`, `source`.
    It returns a DataFrame with volume_id, slice_index, source, height, width, mask_png (b"" on error
    rows), tumor_pixels, max_prob, model, status, error ("" when ok). Usable without Ray.
    """

    def __init__(self, checkpoint, settings: InferSettings | Mapping, device: str | None = None,
                 torch_threads: int | None = None):
        import torch

        from raysegm.checkpoint import load_model, model_id

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.settings = settings if isinstance(settings, InferSettings) else InferSettings(**settings)
        if self.settings.precision not in PRECISIONS:
            raise ValueError(f"infer.precision: unknown {self.settings.precision!r} (expected {PRECISIONS})")
        shipped = not isinstance(checkpoint, (str, Path))
        directory = _materialize_checkpoint(checkpoint) if shipped else Path(checkpoint)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast_dtype = None
        if self.device.type == "cuda" and self.settings.precision == "auto":
            if not torch.cuda.is_bf16_supported():
                raise ValueError(
                    f"infer.precision=auto computes in bf16, which {torch.cuda.get_device_name(self.device)} "
                    f"does not support; set infer.precision=fp32"
                )
            self.autocast_dtype = torch.bfloat16
        try:
            self.model, self.config = load_model(directory, device=self.device)
            self.model_id = model_id(directory)
        finally:
            if shipped:
                shutil.rmtree(directory, ignore_errors=True)

    def probabilities(self, images: np.ndarray):
        """(B, C, S, S) float32 -> tumor probabilities (B, S, S) float32 on the device (see `probabilities`)."""
        import torch

        inputs = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            probs = probabilities(self.model, inputs, tta=self.settings.tta)
        return probs[:, 0].float()

    def masks(self, images: np.ndarray, sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, float]]:
        """Per slice: (mask (H, W) bool at the slice's own size, max probability), P = prob > threshold."""
        import torch.nn.functional as F

        probs = self.probabilities(images)
        results: list = [None] * len(sizes)
        for size in set(sizes):
            indices = [i for i, s in enumerate(sizes) if s == size]
            group = probs[indices][:, None]
            if tuple(group.shape[-2:]) != size:
                group = F.interpolate(group, size=size, mode="bilinear", align_corners=False)
            group = group[:, 0]
            above = (group > self.settings.threshold).cpu().numpy()
            peaks = group.amax(dim=(1, 2)).cpu().numpy()
            for position, index in enumerate(indices):
                results[index] = (above[position], float(peaks[position]))
        return results

    def __call__(self, batch: Mapping) -> pd.DataFrame:
        status = [str(s) for s in batch["status"]]
        error = [str(e) for e in batch["error"]]
        height = np.asarray(batch["height"], dtype=np.int32)
        width = np.asarray(batch["width"], dtype=np.int32)
        mask_png = [b""] * len(status)
        tumor_pixels = np.zeros(len(status), dtype=np.int64)
        max_prob = np.full(len(status), np.nan, dtype=np.float32)
        readable = [i for i, s in enumerate(status) if s == "ok"]
        # One failing slice must not take its batch down: on an error, retry the slices one by one.
        groups = [readable] if readable else []
        while groups:
            indices = groups.pop()
            try:
                results = self.masks(batch["image"][indices], [(int(height[i]), int(width[i])) for i in indices])
            except Exception as failure:
                if len(indices) > 1:
                    groups.extend([i] for i in indices)
                    continue
                index = indices[0]
                status[index] = "error"
                error[index] = f"{batch['source'][index]}: prediction failed ({type(failure).__name__}: {failure})"
                continue
            for index, (mask, peak) in zip(indices, results):
                mask_png[index] = encode_mask_png(mask)
                tumor_pixels[index] = int(mask.sum())
                max_prob[index] = peak
        return pd.DataFrame({
            "volume_id": [str(v) for v in batch["volume_id"]],
            "slice_index": np.asarray(batch["slice_index"], dtype=np.int32),
            "source": [str(s) for s in batch["source"]],
            "height": height,
            "width": width,
            "mask_png": mask_png,
            "tumor_pixels": tumor_pixels,
            "max_prob": max_prob,
            "model": self.model_id,
            "status": status,
            "error": error,
        })


# ---------------------------------------------------------------------------------------------------
# The read stage (Ray tasks)


def read_slices(batch: pd.DataFrame, data: Mapping) -> dict:
    """Slice rows of the discovered table -> model inputs, exactly as training preprocesses them.

    data: the checkpoint's DataSettings as a dict. Returns numpy columns: image (B, C, S, S) float32,
    volume_id, slice_index, source, height, width, status ("ok"/"error"), error (the reason, naming the
    file, or ""). An unreadable slice gets a zero image and status "error".
    """
    from raysegm.data.io import PATH_SEPARATOR, DataError
    from raysegm.data.preprocess import preprocess_image

    settings = from_dict({"data": dict(data)}).data
    images = np.zeros((len(batch), settings.model_channels, settings.size, settings.size), dtype=np.float32)
    status, error = ["ok"] * len(batch), [""] * len(batch)
    height = batch["height"].to_numpy(dtype=np.int32, copy=True)
    width = batch["width"].to_numpy(dtype=np.int32, copy=True)
    for position, record in enumerate(batch.to_dict("records")):
        try:
            image = read_input(record, settings)
            stats = {key: record[key] for key in ("norm_low", "norm_high", "norm_mean", "norm_std")}
            images[position] = preprocess_image(image, settings, stats)
            height[position], width[position] = image.shape[:2]
        except Exception as failure:
            status[position] = "error"
            reason = failure.reason if isinstance(failure, DataError) else f"{type(failure).__name__}: {failure}"
            own = str(record["image_path"])
            if isinstance(failure, DataError) and failure.path not in (own, *own.split(PATH_SEPARATOR)):
                reason = f"its neighbour slice {failure.path}: {reason}"  # a 2.5D stack's other file
            error[position] = f"{record['source']}: {reason}"
    return {
        "image": images,
        "volume_id": batch["volume_id"].astype(str).to_numpy(),
        "slice_index": batch["slice_index"].to_numpy(dtype=np.int32),
        "source": batch["source"].astype(str).to_numpy(),
        "height": height,
        "width": width,
        "status": np.asarray(status),
        "error": np.asarray(error),
    }


# ---------------------------------------------------------------------------------------------------
# The output folder: metadata, committed parts, the atomic commit


def part_name(volume_id: str) -> str:
    """`part-<readable volume_id>-<sha1 prefix>.parquet`: one file per volume, unique per volume_id."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", volume_id)[:80]
    return f"{PART_PREFIX}{readable}-{hashlib.sha1(volume_id.encode()).hexdigest()[:8]}.parquet"


class OutputFolder:
    """The Parquet output of one checkpoint: a local path or a URI, written through pyarrow.fs."""

    def __init__(self, location: str):
        self.location = location
        self.fs, self.base = filesystem(location)

    def _path(self, name: str) -> str:
        return f"{self.base.rstrip('/')}/{name}"

    def _names(self) -> list[str]:
        info = self.fs.get_file_info(self.base)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type != pafs.FileType.Directory:
            raise ValueError(f"{self.location}: the output exists and is not a folder")
        return [entry.base_name for entry in self.fs.get_file_info(pafs.FileSelector(self.base))]

    def open(self, metadata: dict) -> set[str]:
        """Check or write the metadata, remove leftover temporary files; returns the committed part names."""
        names = self._names()
        if METADATA in names:
            with self.fs.open_input_stream(self._path(METADATA)) as stream:
                existing = json.loads(stream.read())
            if existing.get("model") != metadata["model"]:
                raise ValueError(
                    f"{self.location}: holds the output of model {existing.get('model')} "
                    f"(checkpoint {existing.get('checkpoint')}), not of {metadata['model']} "
                    f"({metadata['checkpoint']}); write into another folder"
                )
            if "input" in existing and existing["input"] != metadata.get("input"):
                # the committed parts are skipped by volume_id: another archive's volumes of the same
                # name would be silently left out
                raise ValueError(
                    f"{self.location}: holds the masks of input {existing['input']}, not of "
                    f"{metadata.get('input')}; write into another folder"
                )
            if existing.get("arithmetic", metadata.get("arithmetic")) != metadata.get("arithmetic"):
                raise ValueError(
                    f"{self.location}: its masks were computed in {existing['arithmetic']}, this run computes "
                    f"in {metadata.get('arithmetic')} (infer.precision and GPUs); write into another folder"
                )
            recorded = existing.get("data")  # outputs written before it was recorded are not checked
            if recorded is not None:
                asked = json.loads(json.dumps(metadata.get("data", {})))  # tuples as JSON has them: lists
                for key in sorted(set(recorded) | set(asked)):
                    if recorded.get(key) != asked.get(key):
                        raise ValueError(
                            f"{self.location}: its masks were made with the checkpoint's data.{key}="
                            f"{recorded.get(key)!r}, checkpoint {metadata.get('checkpoint')} now says data.{key}="
                            f"{asked.get(key)!r} (its config.json changed); write into another folder"
                        )
            for key in MASK_OUTPUTS:
                if existing.get("settings", {}).get(key) != metadata["settings"][key]:
                    raise ValueError(
                        f"{self.location}: its masks were made with {key}={existing.get('settings', {}).get(key)!r}, "
                        f"this run asks for {key}={metadata['settings'][key]!r}; write into another folder"
                    )
        else:
            foreign = [n for n in names if not n.startswith(TEMP_PREFIX)]
            if foreign:
                raise ValueError(f"{self.location}: not empty and not a raysegm inference output "
                                 f"(no {METADATA}; found {', '.join(sorted(foreign)[:5])})")
            self.fs.create_dir(self.base, recursive=True)
            self._write_atomically(METADATA, lambda stream: stream.write(
                (json.dumps(metadata, indent=2) + "\n").encode()))
        for name in names:
            if name.startswith(TEMP_PREFIX):
                self.fs.delete_file(self._path(name))
        return {n for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet")}

    def _write_atomically(self, name: str, write) -> None:
        temporary = self._path(f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
        with self.fs.open_output_stream(temporary) as stream:
            write(stream)
        self.fs.move(temporary, self._path(name))

    def commit(self, volume_id: str, rows: pd.DataFrame, fingerprint: str = "") -> None:
        """Write one volume's rows under a temporary name, then rename it to its final part name (an
        earlier part of the volume is replaced whole); `fingerprint` goes into the Parquet metadata."""
        table = pa.Table.from_pandas(rows[SCHEMA.names], schema=SCHEMA, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), FINGERPRINT_KEY: fingerprint.encode()})
        self._write_atomically(part_name(volume_id), lambda stream: pq.write_table(table, stream))

    def part_state(self, name: str) -> tuple[str, int]:
        """(input fingerprint, "" for a part without one; its number of error rows) of a committed part.
        Reads the footer and the small `status` column only."""
        with self.fs.open_input_file(self._path(name)) as file:
            parquet = pq.ParquetFile(file)
            metadata = parquet.schema_arrow.metadata or {}
            status = parquet.read(columns=["status"]).column("status").to_pylist()
        return metadata.get(FINGERPRINT_KEY, b"").decode(), sum(value != "ok" for value in status)


# ---------------------------------------------------------------------------------------------------
# Input: staging a URI, discovery, rejects as error rows


def saved_infer_choices(checkpoint) -> dict:
    """{"tta", "postprocess"} saved in a checkpoint's config.json (a run folder: its best checkpoint's), the
    defaults `raysegm infer` layers under its --config; {} where there is none to read (infer then names
    what is missing)."""
    fs, base = filesystem(best_checkpoint_of(str(checkpoint)))
    path = f"{base.rstrip('/')}/config.json"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return {}
    with fs.open_input_stream(path) as stream:
        saved = json.loads(stream.read()).get("infer", {})
    return {key: saved[key] for key in ("tta", "postprocess") if key in saved}


def _read_checkpoint(checkpoint: str) -> dict[str, bytes]:
    """The checkpoint folder's files (local path or URI) as {name: bytes}, to ship to the replicas.

    A training run's folder stands for its best checkpoint (raysegm.storage.best_checkpoint_of)."""
    fs, base = filesystem(best_checkpoint_of(checkpoint))
    files = {}
    for name in CHECKPOINT_FILES:
        path = f"{base.rstrip('/')}/{name}"
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as stream:
                files[name] = stream.read()
    missing = [name for name, there in (("config.json", "config.json" in files),
                                         ("model.safetensors (or model.pt)", {"model.safetensors", "model.pt"} & set(files)))
               if not there]
    if missing:
        raise FileNotFoundError(f"not a checkpoint: {checkpoint} has no {' and no '.join(missing)}")
    return files


def _stage(input_location: str, staging: Path) -> tuple[Path, str]:
    """(local root to discover, prefix that `source` names): a URI is copied into `staging` first."""
    if "://" not in input_location:
        root = Path(input_location).resolve()
        if not root.exists():
            raise FileNotFoundError(f"input not found: {input_location}")
        return root, str(root)
    fs, path = pafs.FileSystem.from_uri(input_location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {input_location}")
    # Under the folder's own name, so images at its top get the volume_id a local path gives them.
    root = staging / (PurePosixPath(path.rstrip("/")).name or "input")
    root.mkdir(parents=True)  # copy_files makes the folders below the destination, not the destination
    print(f"infer: copying {input_location} to {root} (URI inputs are staged locally)", flush=True)
    pafs.copy_files(path, str(root), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return root.resolve(), input_location.rstrip("/")


def _source(path: str, root: Path, prefix: str) -> str:
    """A discovered local path (or `|`-joined NIfTI modality paths) as the input names it."""
    from raysegm.data.io import PATH_SEPARATOR

    parts = []
    for part in str(path).split(PATH_SEPARATOR):
        # discovery's paths lie under the resolved input, through any symlinked folder by its link's name:
        # resolving them first would name a linked patient by its archive path, outside the input
        part_path = Path(part)
        if not part_path.is_relative_to(root):
            part_path = part_path.resolve()
        try:
            parts.append(f"{prefix}/{part_path.relative_to(root).as_posix()}")
        except ValueError:
            parts.append(part)
    return PATH_SEPARATOR.join(parts)


def volume_fingerprints(slices: pd.DataFrame, rejects: pd.DataFrame, root: Path) -> dict[str, str]:
    """{volume_id: sha1 over its input files' names (relative to the input) and bytes}.

    A volume's files are the images discovery found for it (every modality file of a NIfTI case) and the
    files it rejected as that volume's. Masks are left out, since inference never reads them, except the
    rejected ones: a mask fixed brings its slice back. Discovery has just read every file, so hashing
    them again mostly reads the page cache.
    """
    from raysegm.data.io import PATH_SEPARATOR

    files: dict[str, set[str]] = defaultdict(set)
    for volume_id, paths in zip(slices["volume_id"], slices["image_path"]):
        files[volume_id].update(str(paths).split(PATH_SEPARATOR))
    for volume_id, paths in zip(rejects["volume_id"], rejects["path"]):  # a NIfTI case's files come joined
        files[volume_id].update(str(paths).split(PATH_SEPARATOR))
    root = root.resolve()
    fingerprints = {}
    for volume_id, paths in files.items():
        digest = hashlib.sha1()
        for path in sorted(paths):
            name = Path(path).resolve()
            digest.update(f"{name.relative_to(root) if name.is_relative_to(root) else name}\0".encode())
            content = hashlib.sha1()
            try:
                with open(path, "rb") as file:
                    while chunk := file.read(1 << 20):
                        content.update(chunk)
            except OSError as error:  # rejected as unreadable or missing: its state is the error
                content.update(f"unreadable: {type(error).__name__}".encode())
            digest.update(content.digest())
        fingerprints[volume_id] = digest.hexdigest()
    return fingerprints


def _error_rows(rejects: pd.DataFrame, slices: pd.DataFrame, root: Path, prefix: str, model: str) -> pd.DataFrame:
    """Discovery rejects as error rows: one per slice (its reasons joined), one per NIfTI case (slice -1),
    one per other file whose slice is unknown (slice -1). A bad mask whose slice was still discovered
    is printed, not turned into a second row for that slice (inference does not need the mask)."""
    known = set(zip(slices["volume_id"], slices["slice_index"].astype(int)))
    rows: dict[tuple[str, int, str], tuple[str, str]] = {}
    for path, reason, volume_id, slice_index in zip(rejects["path"], rejects["reason"], rejects["volume_id"],
                                                    rejects["slice_index"].astype(int)):
        if (volume_id, slice_index) in known:
            if re.search(r"_(mask|seg)$", Path(path).stem):
                print(f"infer: note: {path}: {reason} (a mask file, which inference does not read; "
                      f"slice {slice_index} of {volume_id} is segmented from its own image)", file=sys.stderr)
                continue
            slice_index = -1
        nifti = str(path).lower().endswith((".nii", ".nii.gz"))
        key = (volume_id, slice_index, "" if slice_index >= 0 or nifti else str(path))
        source = _source(str(path), root, prefix)
        message = f"{source}: {reason}"
        rows[key] = (rows[key][0], f"{rows[key][1]}; {message}") if key in rows else (source, message)
    return pd.DataFrame({
        "volume_id": [k[0] for k in rows],
        "slice_index": np.asarray([k[1] for k in rows], dtype=np.int32),
        "source": [source for source, _ in rows.values()],
        "height": np.zeros(len(rows), dtype=np.int32),
        "width": np.zeros(len(rows), dtype=np.int32),
        "mask_png": [b""] * len(rows),
        "tumor_pixels": np.zeros(len(rows), dtype=np.int64),
        "max_prob": np.full(len(rows), np.nan, dtype=np.float32),
        "model": model,
        "status": "error",
        "error": [message for _, message in rows.values()],
    })


# ---------------------------------------------------------------------------------------------------
# The job


def _finish_volume(rows: pd.DataFrame, postprocess: str) -> pd.DataFrame:
    """Order a volume's rows by slice, apply the optional post-processing, turn placeholders into nulls."""
    rows = rows.sort_values("slice_index", kind="stable").reset_index(drop=True)
    if postprocess != "none":
        ok = rows.index[rows["status"] == "ok"]
        masks = [decode_mask_png(data) for data in rows.loc[ok, "mask_png"]]
        for index, before, after in zip(ok, masks, postprocess_slices(masks, postprocess)):
            if (before != after).any():
                rows.at[index, "mask_png"] = encode_mask_png(after)
                rows.at[index, "tumor_pixels"] = int(after.sum())
    rows["mask_png"] = [data if data else None for data in rows["mask_png"]]
    rows["error"] = [text if text else None for text in rows["error"]]
    return rows


def _init_ray(address: str | None, settings: InferSettings) -> bool:
    """Join `address` (or RAY_ADDRESS), or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=settings.local_num_cpus)
    return True


def _check_settings(settings: InferSettings) -> None:
    if settings.postprocess not in POSTPROCESS:
        raise ValueError(f"infer.postprocess: unknown {settings.postprocess!r} (expected one of {POSTPROCESS})")
    if settings.precision not in PRECISIONS:
        raise ValueError(f"infer.precision: unknown {settings.precision!r} (expected one of {PRECISIONS})")
    s = settings
    for key, value, ok, expected in (
        ("batch_size", s.batch_size, s.batch_size >= 1, "at least 1"),
        ("replicas", s.replicas, s.replicas >= 1, "at least 1"),
        ("torch_threads", s.torch_threads, s.torch_threads >= 1, "at least 1"),
        ("read_tasks", s.read_tasks, s.read_tasks >= 0, "at least 0 (0: Ray decides)"),
        ("read_cpus", s.read_cpus, s.read_cpus > 0, "above 0"),
        ("cpus_per_replica", s.cpus_per_replica, s.cpus_per_replica > 0, "above 0"),
        ("gpus_per_replica", s.gpus_per_replica, s.gpus_per_replica >= 0, "at least 0"),
        ("object_store_mb", s.object_store_mb, s.object_store_mb >= 0, "at least 0 (0: automatic)"),
        ("threshold", s.threshold, 0.0 <= s.threshold < 1.0, "in [0, 1)"),
    ):
        if not ok:
            raise ValueError(f"infer.{key} must be {expected}, got {value}")


def replica_device(settings: InferSettings) -> str:
    """The model replicas' device: "cuda" when infer.gpus_per_replica gives them GPUs, else "cpu".

    Chosen on the driver and passed to every replica, never guessed there: Ray 2.60 leaves
    CUDA_VISIBLE_DEVICES alone in an actor given no GPU (ray._private.utils.set_visible_accelerator_ids,
    unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1), so a replica on a GPU node would see the node's GPUs."""
    return "cuda" if settings.gpus_per_replica else "cpu"


def arithmetic_of(settings: InferSettings) -> str:
    """What the replicas compute in, as `_raysegm.json` records it: "bf16" (autocast) on CUDA replicas with
    precision "auto", else "fp32". A few pixels may differ between the two, so one output holds one."""
    return "bf16" if settings.precision == "auto" and replica_device(settings) == "cuda" else "fp32"


def predictor_kwargs(files: Mapping[str, bytes], settings: InferSettings) -> dict:
    """SegmentationPredictor's constructor arguments in every replica (map_batches' fn_constructor_kwargs)."""
    return {"checkpoint": files, "settings": dataclasses.asdict(settings), "torch_threads": settings.torch_threads,
            "device": replica_device(settings)}


def object_store_budget(settings: InferSettings, data: DataSettings) -> int:
    """Bytes of object store one job may fill: settings.object_store_mb, or 8 preprocessed batches per
    replica and at least 32 MiB, enough to keep every replica fed while the reads wait."""
    if settings.object_store_mb > 0:
        return settings.object_store_mb * 2**20
    batch_bytes = settings.batch_size * data.model_channels * data.size * data.size * 4
    return max(32 * 2**20, 8 * settings.replicas * batch_bytes)


def _node_cpus(node_id: str) -> float:
    """The CPUs a live Ray node offers to tasks (0 where it offers none)."""
    import ray

    return next((node["Resources"].get("CPU", 0.0) for node in ray.nodes()
                 if node["NodeID"] == node_id and node["Alive"]), 0.0)


def _dataset(slices: pd.DataFrame, files: dict, data: DataSettings, settings: InferSettings, pin_reads: bool):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    columns = ["volume_id", "slice_index", "image_path", "source_format", "source", "height", "width",
               "norm_low", "norm_high", "norm_mean", "norm_std"]
    columns += context_columns(data.context_slices)
    table = slices[columns]
    chunks = [table.iloc[start:start + settings.batch_size] for start in range(0, len(table), settings.batch_size)]
    dataset = ray.data.from_pandas(chunks)
    # volumes come out in input order, so the driver holds at most the volumes in flight
    dataset.context.execution_options.preserve_order = True
    # without a budget the reads run ahead of the model and the object store fills with the whole archive
    dataset.context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=object_store_budget(settings, data))
    dataset.context.enable_progress_bars = sys.stderr.isatty()
    read_args = {"num_cpus": settings.read_cpus}
    if pin_reads:  # a staged URI input lies on the driver's node only
        node = ray.get_runtime_context().get_node_id()
        read_args["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        if not _node_cpus(node):  # cluster.yaml's head: it runs the drivers and offers tasks no CPU
            read_args["num_cpus"] = 0
    return (
        dataset
        .map_batches(read_slices, fn_kwargs={"data": to_dict(data)}, batch_size=None, batch_format="pandas",
                     compute=ray.data.TaskPoolStrategy(size=settings.read_tasks or None), **read_args)
        .map_batches(SegmentationPredictor, batch_size=settings.batch_size, batch_format="numpy",
                     fn_constructor_kwargs=predictor_kwargs(files, settings),
                     compute=ray.data.ActorPoolStrategy(size=settings.replicas),
                     num_cpus=settings.cpus_per_replica, num_gpus=settings.gpus_per_replica or None)
    )


def infer(checkpoint, input, output, settings: InferSettings, *, tta: bool | None = None,
          postprocess: str | None = None, ray_address: str | None = None) -> dict:
    """Segment every slice under `input` with `checkpoint` into Parquet under `output` (see the module doc).

    tta, postprocess: None keeps the settings' value. ray_address: None joins RAY_ADDRESS or starts a
    local Ray with settings.local_num_cpus logical CPUs. Returns a summary: volumes, volumes_skipped
    (already committed, input unchanged, no error rows), volumes_changed (committed, input changed since:
    done again), volumes_retried (committed with error rows, input unchanged: done again),
    volumes_not_in_input (committed parts whose volume the input no longer has: kept), volumes_written,
    slices (rows written this run), ok, errors, wall_s, slices_per_s, model, output.
    """
    from raysegm.checkpoint import INPUT_SETTINGS, load_config_of, model_id
    from raysegm.data.discover import discover

    started = time.time()
    settings = dataclasses.replace(
        settings,
        tta=settings.tta if tta is None else tta,
        postprocess=settings.postprocess if postprocess is None else postprocess,
    )
    _check_settings(settings)
    files = _read_checkpoint(str(checkpoint))
    staging = Path(tempfile.mkdtemp(prefix="raysegm-infer-"))
    started_ray = False
    try:
        local_checkpoint = _materialize_checkpoint(files)
        config, summary = load_config_of(local_checkpoint)
        model = model_id(local_checkpoint)
        shutil.rmtree(local_checkpoint, ignore_errors=True)
        # the summary names the model's input channels; a 2.5D model takes 2k + 1 slices of them
        slices_per_input = 2 * config.data.context_slices + 1
        in_channels = int(summary.get("in_channels", config.data.model_channels)) // slices_per_input
        data = dataclasses.replace(config.data, in_channels=in_channels)

        root, prefix = _stage(str(input), staging / "input")
        slices, rejects = discover(root)
        if slices.empty and rejects.empty:
            raise ValueError(f"{input}: no slices found (expected kaggle_3m, an image folder or NIfTI volumes)")
        mismatched = slices[slices["channels"].astype(int) != in_channels]
        if len(mismatched):
            found = sorted(set(mismatched["channels"].astype(int)))
            raise ValueError(
                f"{input}: {len(mismatched)} slices have {found} channels but checkpoint {checkpoint} was "
                f"trained on {in_channels} (e.g. {mismatched['image_path'].iloc[0]}); channels are never "
                f"converted silently"
            )
        slices = slices.sort_values(["volume_id", "slice_index"], kind="stable").reset_index(drop=True)
        slices["source"] = [_source(path, root, prefix) for path in slices["image_path"]]
        slices = with_context(slices, data.context_slices)  # before any volume is skipped: whole volumes
        errors = _error_rows(rejects, slices, root, prefix, model)

        out = OutputFolder(str(output))
        committed = out.open({
            "model": model, "checkpoint": str(checkpoint), "input": prefix, "arithmetic": arithmetic_of(settings),
            "model_name": summary.get("model_name", config.model.variant), "settings": to_dict(settings),
            # the checkpoint's preprocessing: its config.json may change while its weights (the model id) do not
            "data": {key: getattr(data, key) for key in INPUT_SETTINGS},
        })
        volume_ids = sorted(set(slices["volume_id"]) | set(errors["volume_id"]))
        fingerprints = volume_fingerprints(slices, rejects, root)
        states = {v: out.part_state(part_name(v)) for v in volume_ids if part_name(v) in committed}
        # a part written before parts recorded their input ("") is taken as it is, unless it holds error rows
        changed = [v for v, (recorded_as, _) in states.items() if recorded_as and recorded_as != fingerprints[v]]
        # error rows may come of a transient failure (a read or a prediction that failed once) on unchanged
        # input: such volumes are done again on every rerun (a deterministic reject is redone cheaply)
        retried = [v for v, (_, failed) in states.items() if failed and v not in changed]
        redo = set(changed) | set(retried)
        todo = [v for v in volume_ids if v not in states or v in redo]
        skipped = len(volume_ids) - len(todo)
        gone = sorted(committed - {part_name(v) for v in volume_ids})
        if changed:
            print(f"infer: {len(changed)} committed volumes have changed input files and are done again: "
                  f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}", flush=True)
        if retried:
            print(f"infer: {len(retried)} committed volumes hold error rows and are done again: "
                  f"{', '.join(retried[:5])}{' ...' if len(retried) > 5 else ''}", flush=True)
        if gone:
            print(f"infer: {len(gone)} committed parts hold volumes the input no longer has (kept): "
                  f"{', '.join(gone[:5])}{' ...' if len(gone) > 5 else ''}", flush=True)
        todo_set = set(todo)
        slices = slices[slices["volume_id"].isin(todo_set)]
        errors = errors[errors["volume_id"].isin(todo_set)]
        expected = slices.groupby("volume_id").size().to_dict()
        errors_by_volume = {v: rows for v, rows in errors.groupby("volume_id")}
        total = len(slices) + len(errors)
        print(f"infer: {len(volume_ids)} volumes, {skipped} already committed, {len(todo)} to do "
              f"({total} slices, {len(errors)} rejected by discovery); model {model}", flush=True)

        counts = {"ok": 0, "error": 0}
        written = 0

        def commit(volume_id: str, parts: list[pd.DataFrame]) -> None:
            nonlocal written
            rows = _finish_volume(pd.concat(parts, ignore_index=True), settings.postprocess)
            out.commit(volume_id, rows, fingerprints[volume_id])
            written += 1
            done = sum(counts.values()) + len(rows)
            for status, count in rows["status"].value_counts().items():
                counts[status] = counts.get(status, 0) + int(count)
            elapsed = max(time.time() - started, 1e-9)
            print(f"infer: {done}/{total} slices ({done / elapsed:.1f} slices/s), {written}/{len(todo)} "
                  f"volumes committed ({volume_id})", flush=True)

        for volume_id in [v for v in todo if v not in expected]:
            commit(volume_id, [errors_by_volume[volume_id]])
        if expected:
            started_ray = _init_ray(ray_address, settings)
            dataset = _dataset(slices, files, data, settings, pin_reads="://" in str(input))
            buffers: dict[str, list[pd.DataFrame]] = defaultdict(list)
            received: dict[str, int] = defaultdict(int)
            for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
                for volume_id, rows in batch.groupby("volume_id", sort=False):
                    buffers[volume_id].append(rows)
                    received[volume_id] += len(rows)
                    if received[volume_id] == expected[volume_id]:
                        extra = [errors_by_volume[volume_id]] if volume_id in errors_by_volume else []
                        commit(volume_id, buffers.pop(volume_id) + extra)
            if buffers:
                raise RuntimeError(f"infer: incomplete volumes after the stream ended: {sorted(buffers)[:5]}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if started_ray:
            import ray

            ray.shutdown()
    wall = time.time() - started
    written_slices = sum(counts.values())
    result = {
        "output": str(output), "model": model, "volumes": len(volume_ids), "volumes_skipped": skipped,
        "volumes_changed": len(changed), "volumes_retried": len(retried), "volumes_not_in_input": len(gone),
        "volumes_written": written, "slices": written_slices, "ok": counts.get("ok", 0),
        "errors": counts.get("error", 0), "wall_s": round(wall, 2),
        "slices_per_s": round(written_slices / wall, 2) if wall > 0 else 0.0,
    }
    print(f"infer: done: {json.dumps(result)}", flush=True)
    return result
