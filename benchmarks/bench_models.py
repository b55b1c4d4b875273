"""Parameter counts and CPU forward time per slice of each variant at the paper's settings.

    python benchmarks/bench_models.py [--size 256] [--batch 4] [--repeats 3] [--threads 2]

Each registry variant is built with the paper's settings (classic U-Net width 64, depth 4; ResNet50
encoder at depth 4, decoder 512-256-128-64) and timed in eval mode under no_grad, beside a bare smp.Unet
with the same encoder and decoder: the ratio is what our wrapping and dual attention cost. The bare
smp.Unet still holds ResNet50's conv5_x, which never runs at depth 4 (hence its larger count).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import segmentation_models_pytorch as smp
import torch

from raysegm.config import ModelSettings
from raysegm.models import REGISTRY, count_parameters, create_model

PAPER = ModelSettings(encoder="resnet50", encoder_depth=4, decoder_channels=(512, 256, 128, 64),
                      unet_width=64, unet_depth=4)


def seconds_per_slice(model: torch.nn.Module, size: int, batch: int, repeats: int) -> tuple[float, float]:
    """Median wall time and CPU time (all threads) of one forward pass over `batch` slices, per slice.

    CPU time barely moves when other processes share the cores; wall time does, so both are reported.
    """
    model.eval()
    images = torch.randn(batch, 3, size, size)
    wall, cpu = [], []
    with torch.no_grad():
        model(images)  # warm-up: allocator and kernel selection
        for _ in range(repeats):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            model(images)
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) / batch, statistics.median(cpu) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    bare = smp.Unet(PAPER.encoder, encoder_depth=PAPER.encoder_depth, decoder_channels=PAPER.decoder_channels,
                    encoder_weights=None, in_channels=3, classes=1)
    models = {"smp.Unet bare": bare}
    models.update({variant: create_model(dataclasses.replace(PAPER, variant=variant)) for variant in REGISTRY})
    baselines = {"unet": "unet", "unet_attention": "unet", "unet_resnet50": "smp.Unet bare",
                 "unet_resnet50_attention": "smp.Unet bare"}

    timings = {name: seconds_per_slice(model, args.size, args.batch, args.repeats) for name, model in models.items()}
    print(f"{args.size}x{args.size}, batch {args.batch}, eval + no_grad, {args.threads} torch threads, "
          f"median of {args.repeats}")
    print(f"| {'model':<24} | {'parameters':>11} | {'trainable':>11} | wall ms/slice | CPU ms/slice | CPU vs baseline |")
    print(f"|{'-' * 26}|{'-' * 13}|{'-' * 13}|---------------|--------------|-----------------|")
    for name, model in models.items():
        total, trainable = count_parameters(model)
        wall, cpu = timings[name]
        baseline = baselines.get(name)
        ratio = f"{cpu / timings[baseline][1]:.2f}x {baseline}" if baseline and baseline != name else ""
        print(f"| {name:<24} | {total:>11,} | {trainable:>11,} | {1000 * wall:>13.0f} | {1000 * cpu:>12.0f} | {ratio} |")


if __name__ == "__main__":
    main()
