"""Training throughput: the Ray Train path against a bare PyTorch loop on the same model and data.

    python benchmarks/bench_train.py --config configs/demo.yaml --epochs 3

Ray Train: `raysegm.train.train` as users run it (Ray Data streaming decode + augment, DDP workers);
images/s is each epoch's training images over rank 0's training-loop time (validation excluded), the
median over epochs after the first (which pays for worker and pipeline start-up).
Bare loop: one process with as many torch threads as the Ray run uses in total
(num_workers x torch_threads), the same model, loss, optimizer, autocast (train.precision), memory
format (train.channels_last), global batch and oversampled, shuffled training rows; each batch is read
and augmented inline by the very function Ray Data runs (raysegm.data.pipeline.load_slices), then one
optimizer step. Both sides decode every slice on every epoch (data.read_cache_mb=0): the bare loop's
one process would otherwise hit its cache on every slice after the first epoch, where Ray's read
workers each hold only the rows that happened to land on them. "compute only" repeats the steps on batches prepared beforehand, the ceiling for any
data pipeline, and once more on one thread: on a machine whose cores are oversubscribed, OpenMP threads
waiting on each other can make several threads slower than one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysegm.config import ExperimentConfig, load_config, replace  # noqa: E402


def ray_train_throughput(config: ExperimentConfig) -> tuple[float, float]:
    """(steady images/s, wall seconds of train())."""
    import ray

    from raysegm.train import train

    ray.init(num_cpus=config.scale.local_num_cpus, object_store_memory=int(1e9), include_dashboard=True)  # Train's PG cleaner queries the state API
    started = time.perf_counter()
    summary = train(config)
    wall = time.perf_counter() - started
    ray.shutdown()
    history = pd.read_csv(Path(summary["run_dir"]) / "history.csv")
    steady = history["train_images_per_s"].iloc[1:] if len(history) > 1 else history["train_images_per_s"]
    return float(statistics.median(steady)), wall


def bare_throughput(config: ExperimentConfig, epochs: int) -> tuple[float, float, float]:
    """Images/s, medians over epochs: with inline data loading, of the optimizer steps alone, and of the
    steps alone on one thread (on an oversubscribed machine, several OpenMP threads can be slower)."""
    from raysegm.data.context import context_columns, with_context
    from raysegm.data.discover import load_manifest
    from raysegm.data.pipeline import READ_COLUMNS, load_slices, oversample_tumor
    from raysegm.losses import make_loss
    from raysegm.models import create_model
    from raysegm.train import OPTIMIZERS, autocast, memory_format_of

    threads = config.scale.num_workers * config.scale.torch_threads
    torch.set_num_threads(threads)
    torch.manual_seed(config.train.seed)
    t = config.train
    memory_format = memory_format_of(t.channels_last)
    model = create_model(config.model, in_channels=config.data.model_channels).train().to(memory_format=memory_format)
    optimizer = OPTIMIZERS[t.optimizer](model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loss_fn = make_loss(t.loss)
    manifest = load_manifest(config.data.manifest)
    k = config.data.context_slices
    rows = with_context(manifest[manifest["split"] == "train"].reset_index(drop=True), k)
    rows = oversample_tumor(rows, config.data.tumor_oversample, t.seed)[READ_COLUMNS + context_columns(k)]
    rng = np.random.default_rng(t.seed)

    def step(images: torch.Tensor, masks: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(t.precision, torch.device("cpu")):
            loss = loss_fn(model(images.contiguous(memory_format=memory_format)), masks)
        loss.backward()
        optimizer.step()

    with_data, compute_only = [], []
    for _ in range(epochs):
        order = rows.iloc[rng.permutation(len(rows))]
        batches = []
        started = time.perf_counter()
        for start in range(0, len(order), t.batch_size):
            batch = load_slices(order.iloc[start:start + t.batch_size], config.data,
                                augment=config.data.augment, intensity=True)
            images, masks = torch.from_numpy(batch["image"]), torch.from_numpy(batch["mask"])
            step(images, masks)
            batches.append((images, masks))
        with_data.append(len(order) / (time.perf_counter() - started))
        started = time.perf_counter()
        for images, masks in batches:
            step(images, masks)
        compute_only.append(len(order) / (time.perf_counter() - started))
    torch.set_num_threads(1)
    step(*batches[0])  # untimed: the first step on one thread
    started = time.perf_counter()
    for images, masks in batches:
        step(images, masks)
    one_thread = len(order) / (time.perf_counter() - started)
    steady = with_data[1:] or with_data  # as on the Ray side: the first epoch pays for cold kernels and files
    return float(statistics.median(steady)), float(statistics.median(compute_only)), one_thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch pays for start-up and is left out")
    from raysegm.data.discover import manifest_for
    from raysegm.train import check_settings

    with tempfile.TemporaryDirectory(prefix="bench-train-") as storage:
        config = replace(load_config(args.config, args.overrides), train={"epochs": args.epochs},
                         data={"read_cache_mb": 0}, run={"name": "bench", "storage_path": storage})
        if config.scale.use_gpu:
            parser.error("the bare loop runs on the CPU: give a CPU config (or --set scale.use_gpu=false)")
        check_settings(config)  # before the bare loop, so a bad setting fails at once
        manifest_for(config.data, Path(storage) / "data")  # both paths train on this one manifest
        manifest = config.data.manifest or str(Path(storage) / "data" / "manifest.parquet")
        config = replace(config, data={"manifest": manifest})
        s = config.scale
        print(f"{config.model.variant} at {config.data.size} px, global batch {config.train.batch_size}, "
              f"{config.train.precision}, channels_last {config.train.channels_last}, {args.epochs} epochs; "
              f"Ray: {s.num_workers} workers x {s.torch_threads} torch threads at {s.cpus_per_worker} CPU; "
              f"bare loop: {s.num_workers * s.torch_threads} threads; no read cache on either side; "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
        # The bare loop first: a Ray instance winding down would compete for the cores.
        bare_rate, compute_rate, one_thread_rate = bare_throughput(config, args.epochs)
        ray_rate, ray_wall = ray_train_throughput(config)
    print(f"Ray Train        {ray_rate:8.1f} images/s  (train() wall {ray_wall:.0f} s incl. start-up and validation)")
    print(f"bare PyTorch     {bare_rate:8.1f} images/s  (data read and augmented inline)")
    print(f"compute only     {compute_rate:8.1f} images/s  (optimizer steps on prepared batches)")
    print(f"  on 1 thread    {one_thread_rate:8.1f} images/s")
    print(f"ratio Ray / bare {ray_rate / bare_rate:8.2f}    Ray / compute only {ray_rate / compute_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
