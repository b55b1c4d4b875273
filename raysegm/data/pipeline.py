"""The Ray Data pipeline: manifest rows in, model-ready slices out, streamed.

    manifest rows of one split (paths only; small)
      -> with data.context_slices = k: each row names its 2k neighbours (raysegm.data.context)
      -> train: tumor oversampling, random_shuffle (a new order each epoch, from the seed), blocks
         of ROWS_PER_BLOCK rows
      -> map_batches(num_cpus=data.read_cpus, at most data.read_tasks at once):
         read (the slice, or its 2.5D stack) + resize + [augment] + scale + [intensity augment],
         in Ray tasks
      -> rows: image float32 (C, S, S) with C = data.model_channels, mask float32 (1, S, S),
         volume_id str, slice_index int32

Nothing reads the whole dataset into one process: the driver holds only the manifest, and each Ray
task decodes ROWS_PER_BLOCK slices. The dataset is re-executed on every pass (epoch), so the shuffle
order and the augmentation differ between epochs.

- Training split: paper 4.1 augmentation when `augment` is true (raysegm.data.preprocess), and, with
  it or without it, the intensity augmentation and sequence dropout where data.intensity_augment /
  sequence_dropout ask; tumor slices repeated floor(w) times plus once more with probability
  w - floor(w) for w = data.tumor_oversample > 1 (the extra copies are drawn once, from `seed`, when
  the dataset is built). The shuffle is Ray's random_shuffle seeded from `seed` and reseeded on each execution.
  Augmentation draws fresh entropy in each task: Ray runs tasks in parallel, so exact replay of an
  epoch is not offered.
- Validation and test splits: no augmentation, oversampling or shuffle; every slice exactly once, in
  manifest order.
- Decoding a slice (three tifs with 2.5D input) is most of a read task's time, and every epoch reads
  the same files. Each read worker process therefore keeps what it decoded and resized, up to
  data.read_cache_mb (`ReadCache`); augmentation and scaling still run on every pass.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pandas as pd

from raysegm.config import DataSettings
from raysegm.data.context import CONTEXT_COLUMNS, context_columns, read_input, with_context
from raysegm.data.discover import STATS_PERCENTILES
from raysegm.data.io import PATH_SEPARATOR, DataError, is_missing, read_mask
from raysegm.data.preprocess import augment as augment_pair
from raysegm.data.preprocess import (
    augment_intensity,
    build_augmenter,
    preprocess_mask,
    resize_image,
    scale_image,
)

ROWS_PER_BLOCK = 16  # slices per Ray task: small enough to stream, large enough to amortize a task
READ_COLUMNS = ["volume_id", "slice_index", "image_path", "mask_path", "source_format",
                "norm_low", "norm_high", "norm_mean", "norm_std"]


def oversample_tumor(rows: pd.DataFrame, factor: float, seed: int = 0) -> pd.DataFrame:
    """Repeat tumor slices: floor(factor) copies, plus one more with probability factor - floor(factor)."""
    if factor < 1:
        raise ValueError(f"data.tumor_oversample must be >= 1, got {factor}")
    if factor == 1:
        return rows
    whole = int(np.floor(factor))
    extra = np.random.default_rng(seed).random(len(rows)) < factor - whole
    repeats = np.where(rows["has_tumor"].to_numpy(), whole + extra, 1)
    return rows.loc[rows.index.repeat(repeats)].reset_index(drop=True)


class ReadCache:
    """Decoded, resized rows kept by one read worker process across epochs: a least-recently-used map
    from a row's files (path, size and modification time of each) and data.size to its resized image
    stack (S, S, C) and mask (S, S), at most `max_bytes` in all. Entries are read-only arrays.

    Ray re-executes the dataset on every epoch, and its read tasks land on the same few warm worker
    processes (data.read_tasks caps how many run at once), so from the second epoch on most rows cost
    their augmentation and scaling, not their decoding. A row hits only in a process that read it
    before, so each process builds its own copy: memory is up to `max_bytes` per process that has run
    a read task, outside Ray's object store. A hit returns exactly what reading and resizing returns; a
    file rewritten to another size or modification time is a new key; a worker that restarts starts
    empty.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = self.hits = self.misses = 0
        self._entries: OrderedDict = OrderedDict()

    def get(self, key, read: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        entry = read()
        for array in entry:
            array.flags.writeable = False
        size = sum(array.nbytes for array in entry)
        if size <= self.max_bytes:
            self._entries[key] = entry
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.nbytes -= sum(array.nbytes for array in dropped)
        return entry


_PROCESS_CACHE: ReadCache | None = None


def process_read_cache(max_mb: float) -> ReadCache | None:
    """This process's ReadCache at `max_mb` MB (None when 0), kept from one read task to the next."""
    global _PROCESS_CACHE
    if max_mb <= 0:
        return None
    max_bytes = int(max_mb * 2**20)
    if _PROCESS_CACHE is None or _PROCESS_CACHE.max_bytes != max_bytes:
        _PROCESS_CACHE = ReadCache(max_bytes)
    return _PROCESS_CACHE


def _file_key(path) -> tuple:
    """(path, size, mtime) of each file of a source; a NIfTI case names its modalities joined by |."""
    keys = []
    for part in str(path).split(PATH_SEPARATOR):
        status = os.stat(part)
        keys.append((part, status.st_size, status.st_mtime_ns))
    return tuple(keys)


def read_cache_key(record, data: DataSettings) -> tuple | None:
    """What a row's resized image and mask depend on: its files as they are now, and the settings.

    None where a file cannot be found or the row lacks its context columns: the row is then read
    without the cache, so the read raises its own error naming the file and the reason.
    """
    if data.context_slices and not all(column in record for column in CONTEXT_COLUMNS):
        return None
    paths = record["context_paths"] if data.context_slices else [record["image_path"]]
    slices = record["context_slices"] if data.context_slices else [record["slice_index"]]
    try:
        images = tuple((_file_key(path), int(index)) for path, index in zip(paths, slices))
        mask = None if is_missing(record.get("mask_path")) else _file_key(record["mask_path"])
    except OSError:
        return None
    return images, mask, int(record["slice_index"]), data.size, data.in_channels, data.context_slices


def read_resized(record, data: DataSettings) -> tuple[np.ndarray, np.ndarray]:
    """One manifest row -> image (S, S, C) as read_image's dtype and mask (S, S) uint8 in {0, 1}."""
    image = read_input(record, data)
    mask = read_mask(record)
    if mask is None:
        raise DataError(record["image_path"], "no mask: only labeled slices can be trained or validated on")
    return resize_image(image, data.size), preprocess_mask(mask, data.size)[0].astype(np.uint8)


def load_slice(record, data: DataSettings, augmenter=None, rng=None,
               cache: ReadCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One manifest row -> image (C, S, S) float32 and mask (1, S, S) float32 in {0, 1}, S = data.size,
    C = data.model_channels (the slice and its context slices, raysegm.data.context).

    The steps of `preprocess_image` / `preprocess_mask`, with the augmentation (when an augmenter from
    `build_augmenter` is given) between the resize and the scaling, and the intensity augmentation
    (`augment_intensity`, when a numpy Generator `rng` is given) after the scaling. With a `cache`, the
    read and resize come from it where it holds the row.
    """
    key = None if cache is None else read_cache_key(record, data)
    if key is None:
        image, mask = read_resized(record, data)
    else:
        image, mask = cache.get(key, lambda: read_resized(record, data))
    if augmenter is not None:
        image, mask = augment_pair(image, mask, augmenter)
    image = scale_image(image, data, record)
    if rng is not None:
        image = augment_intensity(image, data, rng)
    return image, mask[None].astype(np.float32)


def load_slices(batch: pd.DataFrame, data: DataSettings, augment: bool,
                intensity: bool = False) -> dict[str, np.ndarray]:
    """`load_slice` over a batch of manifest rows (the map_batches function).

    augment: the paper's geometric augmentation (`build_augmenter`); intensity: the intensity
    augmentation and sequence dropout where data.intensity_augment / data.sequence_dropout ask. The
    training split has intensity on whatever data.augment says. Returns image (B, C, S, S) float32, mask
    (B, 1, S, S) float32, volume_id (B,) str, slice_index (B,) int32. Each batch draws fresh entropy,
    one independent stream for each kind of augmentation.
    """
    augmenter = rng = None
    cache = process_read_cache(data.read_cache_mb)
    geometric_seed, intensity_seed = (int(s) for s in np.random.SeedSequence().generate_state(2))
    if augment:
        augmenter = build_augmenter(data, seed=geometric_seed)
    if intensity and (data.intensity_augment or data.sequence_dropout):
        rng = np.random.default_rng(intensity_seed)
    images = np.empty((len(batch), data.model_channels, data.size, data.size), dtype=np.float32)
    masks = np.empty((len(batch), 1, data.size, data.size), dtype=np.float32)
    for i, record in enumerate(batch.to_dict("records")):
        images[i], masks[i] = load_slice(record, data, augmenter, rng, cache)
    return {
        "image": images,
        "mask": masks,
        "volume_id": batch["volume_id"].to_numpy(dtype=str),
        "slice_index": batch["slice_index"].to_numpy(dtype=np.int32),
    }


def tensor_collate():
    """A collate_fn for `iter_torch_batches`: image, mask, slice_index as tensors, volume_id left out.

    Ray's default conversion fails on the string volume_id column; a trainer that needs volume_id
    (per-patient validation) iterates with `iter_batches` instead. The output is a dict of tensors,
    so Ray still moves it to the worker's device.
    """
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TensorCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict:
            # a copy: Ray hands out read-only views of the object store, which torch cannot own
            return {key: torch.from_numpy(np.array(batch[key])) for key in ("image", "mask", "slice_index")}

    return TensorCollate()


def check_channels(rows: pd.DataFrame, data: DataSettings, what: str) -> None:
    """Every slice must have data.in_channels channels: a grayscale slice never becomes three."""
    if "channels" not in rows.columns:
        return
    odd = rows[rows["channels"].astype(int) != data.in_channels]
    if len(odd):
        raise ValueError(f"{what}: {len(odd)} slices have {sorted(set(odd['channels'].astype(int)))} channels, "
                         f"data.in_channels is {data.in_channels} (first: {odd['image_path'].iloc[0]})")


def build_dataset(manifest: pd.DataFrame, split: str, data: DataSettings, *, augment: bool, seed: int = 0):
    """A streaming ray.data.Dataset of one split of the manifest (see the module docstring).

    Rows: image float32 (C, S, S), mask float32 (1, S, S), volume_id str, slice_index int32, with
    S = data.size and C = data.model_channels. `augment` applies to the "train" split only; callers pass
    data.augment. Unlabeled slices (an image without its mask) are left out with a printed note, as
    raysegm.evaluate leaves them out; they still serve as 2.5D neighbours. Raises ValueError for a split
    with no labeled slice, slices whose channel count is not data.in_channels, or data.clip_percentiles
    other than the manifest statistics' where those statistics are used.
    """
    import ray.data

    if "split" not in manifest.columns:
        raise ValueError("the manifest has no split column (prepare it with raysegm.data.discover.prepare)")
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise ValueError(f"split {split!r} has no slices (splits present: {sorted(manifest['split'].unique())})")
    labeled = rows["labeled"].astype(bool)
    if not labeled.any():
        raise ValueError(f"split {split!r} has no labeled slice (first: {rows['image_path'].iloc[0]}): "
                         "training and validation need masks")
    if not labeled.all():
        print(f"split {split!r}: {int((~labeled).sum())} unlabeled slices have no mask to learn or score "
              f"against and are left out (first: {rows.loc[~labeled, 'image_path'].iloc[0]}); they still "
              "serve as neighbours", flush=True)
    check_channels(rows, data, f"split {split!r}")
    uses_stats = data.normalize == "volume_zscore" or (rows["source_format"] == "nifti").any()
    if uses_stats and tuple(data.clip_percentiles) != STATS_PERCENTILES:
        raise ValueError(f"data.clip_percentiles {tuple(data.clip_percentiles)}: the manifest's volume "
                         f"statistics are at the {STATS_PERCENTILES} percentiles")
    rows = with_context(rows.reset_index(drop=True), data.context_slices)  # neighbours from every slice
    rows = rows[rows["labeled"].astype(bool)].reset_index(drop=True)
    training = split == "train"
    if training:
        rows = oversample_tumor(rows, data.tumor_oversample, seed)
    rows = rows[READ_COLUMNS + context_columns(data.context_slices)]
    if training:
        # The manifest rows are one small block: shuffling it is one cheap task per epoch, where a
        # shuffle of many blocks costs two tasks per block; the streaming repartition then cuts it up.
        shuffle_seed = ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True)
        dataset = (ray.data.from_pandas(rows).random_shuffle(seed=shuffle_seed)
                   .repartition(target_num_rows_per_block=ROWS_PER_BLOCK))
    else:
        blocks = [rows.iloc[start:start + ROWS_PER_BLOCK] for start in range(0, len(rows), ROWS_PER_BLOCK)]
        dataset = ray.data.from_pandas(blocks)
    dataset = dataset.map_batches(
        load_slices,
        batch_format="pandas",
        batch_size=ROWS_PER_BLOCK,
        num_cpus=data.read_cpus,
        # Ray kills idle workers beyond its soft limit after a second, so an uncapped pool re-spawns
        # workers (and re-imports albumentations and torch in each) on every epoch.
        compute=ray.data.TaskPoolStrategy(size=data.read_tasks) if data.read_tasks else None,
        fn_kwargs={"data": data, "augment": augment and training, "intensity": training},
    )
    if not training:
        dataset.context.execution_options.preserve_order = True
    return dataset
