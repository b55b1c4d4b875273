"""Slices per second the data pipeline delivers to a trainer, against bare baselines, in one run.

    python benchmarks/bench_pipeline.py [--data-dir DIR] [--size 128] [--context-slices 0] [--epochs 3]
        [--batch-size 16] [--num-cpus 4]

On the training split of the data (default: a synthetic 12-patient set at 128 px written to a
temporary folder), with and without augmentation, four ways:
- ray: build_dataset(...).iter_torch_batches, as a Ray Train worker iterates its shard, with the read
  workers' cache of decoded slices (data.read_cache_mb, the default);
- ray, no cache: the same with data.read_cache_mb = 0, so every pass decodes every file again;
- loop: the same load_slice function (decode, resize, augment, scale) in a plain Python loop;
- torch DataLoader: the same function in a torch Dataset, 2 persistent worker processes.
Each is timed over --epochs passes (at least 2); the rate is the mean over the passes after the first,
so start-up (Ray Data's workers, the DataLoader's processes) is left out. The cache is per read worker:
after the first pass each worker holds the rows it happened to read, so later passes still miss on
some. The baselines decode every file on every pass, so they are compared with Ray without the cache
(ray/DataLoader is the like-for-like ratio: two processes each; the loop is one); the cache's own gain
is printed apart.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from raysegm.config import DataSettings
from raysegm.data.context import with_context
from raysegm.data.discover import prepare
from raysegm.data.pipeline import build_dataset, load_slice, tensor_collate
from raysegm.data.preprocess import build_augmenter
from raysegm.data.synth import generate_dataset


class SliceDataset(torch.utils.data.Dataset):
    """The manifest rows of one split through `load_slice`, for the torch DataLoader baseline."""

    def __init__(self, records: list[dict], data: DataSettings, augment: bool):
        self.records, self.data, self.augment = records, data, augment
        self.augmenter = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        if self.augment and self.augmenter is None:  # one per worker process, freshly seeded
            self.augmenter = build_augmenter(self.data, seed=int(np.random.SeedSequence().generate_state(1)[0]))
        image, mask = load_slice(self.records[index], self.data, self.augmenter)
        return torch.from_numpy(image), torch.from_numpy(mask)


def timed_passes(run_pass, epochs: int) -> list[tuple[int, float]]:
    """[(slices, seconds)] for each pass."""
    results = []
    for _ in range(epochs):
        start = time.perf_counter()
        slices = run_pass()
        results.append((slices, time.perf_counter() - start))
    return results


def rate(passes: list[tuple[int, float]]) -> float:
    later = passes[1:] or passes
    return sum(n for n, _ in later) / sum(s for _, s in later)


def compare(manifest, records: list[dict], data: DataSettings, augment: bool, batch_size: int, epochs: int) -> None:
    """Time the four ways over the training split and print slices/s and the ratios."""
    dataset = build_dataset(manifest, "train", data, augment=augment)
    uncached = build_dataset(manifest, "train", replace(data, read_cache_mb=0), augment=augment)

    collate = tensor_collate()

    def ray_pass(dataset=dataset):
        return sum(len(b["image"]) for b in dataset.iter_torch_batches(batch_size=batch_size, collate_fn=collate))

    def loop_pass():
        augmenter = build_augmenter(data, seed=None) if augment else None
        count = 0
        for start in range(0, len(records), batch_size):
            batch = [load_slice(r, data, augmenter) for r in records[start:start + batch_size]]
            torch.from_numpy(np.stack([image for image, _ in batch]))
            count += len(batch)
        return count

    loader = torch.utils.data.DataLoader(SliceDataset(records, data, augment), batch_size=batch_size,
                                         shuffle=True, num_workers=2, persistent_workers=True)

    def loader_pass():
        return sum(len(images) for images, _ in loader)

    uncached_passes = timed_passes(lambda: ray_pass(uncached), epochs)
    ray_passes = timed_passes(ray_pass, epochs)
    loop_passes = timed_passes(loop_pass, epochs)
    loader_passes = timed_passes(loader_pass, epochs)
    ray_rate, loop_rate, loader_rate = rate(ray_passes), rate(loop_passes), rate(loader_passes)
    uncached_rate = rate(uncached_passes)
    label = "augment" if augment else "no augment"
    print(f"[{label}] every file decoded every pass: ray {uncached_rate:.1f} slices/s | loop {loop_rate:.1f} | "
          f"torch DataLoader(2 workers) {loader_rate:.1f} | ray (2 read tasks)/serial loop "
          f"{uncached_rate / loop_rate:.2f} | ray/DataLoader(2 workers), like for like {uncached_rate / loader_rate:.2f}")
    print(f"[{label}] ray with the read cache {ray_rate:.1f} slices/s | with/without {ray_rate / uncached_rate:.2f} | "
          f"first pass without the cache {uncached_passes[0][0] / uncached_passes[0][1]:.1f} slices/s "
          + ("(includes Ray Data's start-up)" if not augment else "(Ray already running)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="dataset in any supported layout (default: synthetic 128 px)")
    parser.add_argument("--size", type=int, default=128, help="slice side after resizing (the synthetic "
                        "default is 128 px; real kaggle_3m slices are 256)")
    parser.add_argument("--context-slices", type=int, default=0, help="2.5D neighbours on each side")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the local ray.init")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first pass pays for start-up and is left out")
    torch.set_num_threads(1)

    import ray

    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    data_dir = args.data_dir or generate_dataset(scratch / "kaggle_3m", patients=12, slices=16, size=128)
    manifest, _ = prepare(data_dir, scratch / "manifest.parquet")
    rows = manifest[manifest["split"] == "train"]
    records = with_context(rows.reset_index(drop=True), args.context_slices).to_dict("records")
    data = DataSettings(size=args.size, context_slices=args.context_slices)
    ray.init(num_cpus=args.num_cpus, object_store_memory=int(1e9), include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"{len(rows)} training slices of {rows['volume_id'].nunique()} volumes from {data_dir}; "
          f"size {args.size}, context_slices {args.context_slices}, batch {args.batch_size}, {args.epochs} passes each, "
          f"read_cpus {DataSettings().read_cpus}, read_cache_mb {DataSettings().read_cache_mb}, "
          f"ray num_cpus {args.num_cpus}")

    try:
        for augment in (False, True):
            compare(manifest, records, data, augment, args.batch_size, args.epochs)
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
