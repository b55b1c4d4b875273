"""2.5D input: a slice read together with its neighbours, stacked as extra channels.

With data.context_slices = k, slice s of a volume becomes the channels of slices s-k, ..., s, ..., s+k
of the same volume, in that order, each with data.in_channels channels, so the model takes
(2k + 1) * in_channels channels (`DataSettings.model_channels`). Neighbours are taken by position among
the volume's slices sorted by slice_index; past either end the first or last slice repeats (edge
padding). The mask stays the centre slice's, and the neighbours share the volume's intensity
statistics. k = 0 is plain 2D input.

`with_context` runs once on the driver, over a table holding every slice of its volumes, and adds the
neighbours' `context_paths` and `context_slices` to each row; `read_input` reads one row's stack in a
task. Training (raysegm.data.pipeline), evaluation and inference all read through `read_input`, so
they stack slices the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from raysegm.config import DataSettings
from raysegm.data.io import DataError, read_image

CONTEXT_COLUMNS = ["context_paths", "context_slices"]


def context_columns(k: int) -> list[str]:
    """The columns `with_context(rows, k)` adds: CONTEXT_COLUMNS, or none for plain 2D input (k = 0)."""
    return CONTEXT_COLUMNS if k else []


def with_context(rows: pd.DataFrame, k: int) -> pd.DataFrame:
    """A copy of `rows` with CONTEXT_COLUMNS: the image_path and slice_index of slices s-k..s+k of each
    row's volume (by position in slice order, clamped at the ends). k = 0 returns `rows` unchanged.

    `rows` must hold each volume's slices once (call it before oversampling); a slice missing from
    `rows` is skipped over, so its neighbours become the next slices present.
    """
    if k < 0:
        raise ValueError(f"data.context_slices must be >= 0, got {k}")
    if k == 0:
        return rows
    if rows.duplicated(["volume_id", "slice_index"]).any():
        raise ValueError("with_context: a (volume_id, slice_index) appears twice; add context before oversampling")
    paths: dict = {}
    slices: dict = {}
    for _, volume in rows.groupby("volume_id", sort=False):
        ordered = volume.sort_values("slice_index", kind="stable")
        volume_paths = ordered["image_path"].astype(str).to_list()
        volume_slices = ordered["slice_index"].astype(int).to_list()
        last = len(ordered) - 1
        for position, label in enumerate(ordered.index):
            picks = np.clip(np.arange(position - k, position + k + 1), 0, last)
            paths[label] = [volume_paths[p] for p in picks]
            slices[label] = [volume_slices[p] for p in picks]
    rows = rows.copy()
    rows["context_paths"] = [paths[label] for label in rows.index]
    rows["context_slices"] = [slices[label] for label in rows.index]
    return rows


def read_input(record: Mapping, data: DataSettings) -> np.ndarray:
    """The raw model input of one row, before resizing: (H, W, model_channels), as read_image's dtype.

    Every slice read must have data.in_channels channels and the centre slice's height and width;
    otherwise a DataError names the file and the reason.
    """
    if data.context_slices == 0:
        sources = [(record["image_path"], record["slice_index"])]
    elif all(column in record for column in CONTEXT_COLUMNS):
        sources = list(zip(record["context_paths"], record["context_slices"]))
    else:
        raise ValueError(f"{record['image_path']}: data.context_slices is {data.context_slices} but the row "
                         "has no context columns (prepare the rows with raysegm.data.context.with_context)")
    sources = [(str(path), int(index)) for path, index in sources]
    reads = {}  # an edge slice repeats in the stack but is read once
    for path, index in sources:
        if (path, index) not in reads:
            reads[path, index] = read_image({**record, "image_path": path, "slice_index": index})
    centre = reads[str(record["image_path"]), int(record["slice_index"])]
    images = []
    for source in sources:
        image = reads[source]
        path = source[0]
        if image.shape[-1] != data.in_channels:
            raise DataError(path, f"{image.shape[-1]} channels, the model was trained on {data.in_channels} "
                                  "per slice")
        if image.shape[:2] != centre.shape[:2]:
            raise DataError(path, f"size {image.shape[:2]} differs from its neighbour {record['image_path']} "
                                  f"{centre.shape[:2]}; 2.5D input needs one size per volume")
        images.append(image)
    return images[0] if len(images) == 1 else np.concatenate(images, axis=-1)
