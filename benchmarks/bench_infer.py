"""Bulk inference: slices/s of the Ray Data path against a bare PyTorch loop, and the job's peak memory.

For N and 4N synthetic input slices (same model, same files), in one invocation:
- ray: `raysegm.infer.infer` on a local Ray started here (ray.init(num_cpus=4, object_store_memory=1e9));
- bare: one separate process doing the same work in a plain loop (discovery, the input fingerprints, read,
  preprocess, predict, resize, threshold, PNG, one Parquet file per volume) with as many torch threads as
  the Ray job uses in total (replicas x torch_threads).
Both timings include discovery, which reads every file once in both paths, and loading the model; the
Ray time also includes starting its worker processes, which import torch, pandas and pyarrow, where the
bare loop's timer starts after its own imports (so the ratio at N leans against Ray; 4N dilutes it).

Peak memory of the Ray job: the resident memory (RSS) of the driver plus every Ray worker process
(the raylet's `ray::` children), summed, sampled every 0.2 s with psutil while the job runs, and the
object store's bytes in use from the raylet's memory report, less what it held before the job (it
includes the checkpoint shipped to the replicas). RSS counts object-store pages a worker has mapped, so
the sum overstates what the machine really holds; it is a bound to compare across N. The bare loop's
peak is its one process's maximum RSS (getrusage), the baseline the Ray sum is divided by. The sampler
runs in the driver while Ray is timed (a psutil scan and a memory RPC every 0.2 s), which the bare loop
does not pay.

    python benchmarks/bench_infer.py --slices 200 --size 128
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil

SLICES_PER_VOLUME = 20


class MemorySampler:
    """Peak summed RSS of the driver and Ray's worker processes, and peak object-store use, every 0.2 s."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_rss = 0
        self.peak_store = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _workers(self) -> list[psutil.Process]:
        import ray

        node = ray._private.worker._global_node
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        workers = []
        for process in raylet.children(recursive=True):
            try:  # a worker may exit between the listing and these calls
                if process.name().startswith("ray::") or "default_worker.py" in " ".join(process.cmdline()):
                    workers.append(process)
            except psutil.Error:
                continue
        return workers

    def _store_bytes(self) -> int:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.object_store_bytes_used)

    def _run(self) -> None:
        driver = psutil.Process()
        while not self._stop.is_set():
            rss = driver.memory_info().rss
            for process in self._workers():
                try:
                    rss += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_store = max(self.peak_store, self._store_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self.store_before = self._store_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bare_loop(checkpoint: Path, input_dir: Path, output: Path, batch_size: int,
              threads: int) -> tuple[int, float, int]:
    """The same work as the Ray path, in one process: (slices written, seconds, peak RSS in bytes).

    Batches run over the slices in (volume_id, slice_index) order across volume boundaries, as Ray
    Data's map_batches does, so both sides make the same forward passes."""
    import resource

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from raysegm.config import InferSettings
    from raysegm.data.discover import discover
    from raysegm.infer import (
        FINGERPRINT_KEY,
        SCHEMA,
        SegmentationPredictor,
        part_name,
        read_slices,
        volume_fingerprints,
    )

    started = time.perf_counter()
    torch.set_num_threads(threads)
    predictor = SegmentationPredictor(checkpoint, InferSettings(), device="cpu")
    data = predictor.config.data.__dict__
    slices, rejects = discover(input_dir)
    fingerprints = volume_fingerprints(slices, rejects, Path(input_dir).resolve())
    slices = slices.sort_values(["volume_id", "slice_index"], kind="stable").reset_index(drop=True)
    slices["source"] = slices["image_path"]
    output.mkdir(parents=True)
    parts = [predictor(read_slices(slices.iloc[start:start + batch_size], data))
             for start in range(0, len(slices), batch_size)]
    written = 0
    for volume_id, rows in pd.concat(parts, ignore_index=True).groupby("volume_id", sort=True):
        rows = rows.assign(error=rows["error"].where(rows["error"] != "", None))
        table = pa.Table.from_pandas(rows, schema=SCHEMA, preserve_index=False)
        table = table.replace_schema_metadata({**table.schema.metadata, FINGERPRINT_KEY: fingerprints[volume_id].encode()})
        pq.write_table(table, output / part_name(volume_id))
        written += len(rows)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return written, time.perf_counter() - started, peak_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200, help="N; the benchmark runs N and 4N")
    parser.add_argument("--size", type=int, default=128, help="slice side, also the model's input size")
    parser.add_argument("--width", type=int, default=16, help="classic U-Net width (a small model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()

    import ray
    import torch

    from raysegm.checkpoint import save_checkpoint
    from raysegm.config import ExperimentConfig, InferSettings, replace
    from raysegm.data.synth import generate_dataset
    from raysegm.infer import infer
    from raysegm.models import create_model

    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    try:
        config = replace(ExperimentConfig(), data={"size": args.size}, model={"variant": "unet", "unet_width": args.width})
        torch.manual_seed(0)
        checkpoint = save_checkpoint(work / "checkpoint", create_model(config.model, 3), config)
        settings = InferSettings(batch_size=args.batch_size, replicas=args.replicas, torch_threads=args.torch_threads)
        threads = args.replicas * args.torch_threads
        ray.init(num_cpus=4, object_store_memory=int(1e9), include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        results = {}
        for count in (args.slices, 4 * args.slices):
            volumes = max(1, count // SLICES_PER_VOLUME)
            data = generate_dataset(work / f"data-{count}", patients=volumes, slices=count // volumes,
                                    size=args.size, seed=count)
            with multiprocessing.get_context("spawn").Pool(1) as pool:  # its memory stays out of the driver's
                written, bare_s, bare_rss = pool.apply(bare_loop, (checkpoint, data, work / f"bare-{count}",
                                                         args.batch_size, threads))
            gc.collect()  # the previous run's objects (its shipped checkpoint) leave the store
            time.sleep(2)
            with MemorySampler() as sampler:
                summary = infer(checkpoint, data, work / f"ray-{count}", settings)
            assert summary["slices"] == written, (summary, written)
            results[count] = {
                "slices": written, "bare_s": bare_s, "ray_s": summary["wall_s"],
                "bare_rate": written / bare_s, "ray_rate": written / summary["wall_s"],
                "peak_rss": sampler.peak_rss, "peak_store": sampler.peak_store - sampler.store_before,
                "bare_rss": bare_rss,
            }
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmodel unet width {args.width} at {args.size} px, batch {args.batch_size}, "
          f"{args.replicas} replica(s) x {args.torch_threads} torch threads; bare loop {threads} threads")
    print(f"{'slices':>7} {'bare sl/s':>10} {'ray sl/s':>9} {'ray/bare sl/s':>14} {'bare RSS MiB':>13} "
          f"{'ray RSS MiB':>12} {'ray/bare RSS':>13} {'peak store MiB':>15}")
    for r in results.values():
        print(f"{r['slices']:>7} {r['bare_rate']:>10.1f} {r['ray_rate']:>9.1f} {r['ray_rate'] / r['bare_rate']:>14.2f} "
              f"{r['bare_rss'] / 2**20:>13.0f} {r['peak_rss'] / 2**20:>12.0f} {r['peak_rss'] / r['bare_rss']:>13.2f} "
              f"{r['peak_store'] / 2**20:>15.1f}")
    small, large = results[args.slices], results[4 * args.slices]
    print(f"peak RSS 4N/N: {large['peak_rss'] / small['peak_rss']:.2f}; "
          f"peak object store 4N/N: {large['peak_store'] / max(small['peak_store'], 1):.2f}; "
          f"ray/bare at 4N: {large['ray_rate'] / large['bare_rate']:.2f}")


if __name__ == "__main__":
    main()
