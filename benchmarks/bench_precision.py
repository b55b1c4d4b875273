"""Training-step speed of autocast precision x memory format, against the plain fp32 NCHW step.

    python benchmarks/bench_precision.py --config configs/cpu-small.yaml [--batch 8] [--steps 8] [--threads 1]

The preset's model, loss and optimizer take the same optimizer steps on the same random batches
(bright squares a quarter of the side wide, in noise) in one process, four ways: fp32 or bf16 autocast
(train.precision), NCHW or NHWC (train.channels_last). Every way starts from the same initial weights;
the loss at the last timed step says whether the faster arithmetic still trains the same model. One
thread is what each Ray Train worker of the CPU presets runs (scale.torch_threads). bf16 is fast only on
CPUs with native bf16 instructions (avx512_bf16, AMX); elsewhere it can be slower than fp32.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raysegm.config import load_config  # noqa: E402
from raysegm.losses import make_loss  # noqa: E402
from raysegm.models import create_model  # noqa: E402
from raysegm.train import OPTIMIZERS, autocast, memory_format_of  # noqa: E402


def batches(n: int, batch: int, channels: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        masks = torch.zeros(batch, 1, size, size)
        for i in range(batch):
            y, x = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            masks[i, :, y:y + size // 4, x:x + size // 4] = 1
        images = torch.randn(batch, channels, size, size, generator=generator) + 2 * masks
        out.append((images, masks))
    return out


def run(initial: torch.nn.Module, config, data, precision: str, channels_last: bool) -> tuple[float, float]:
    """(median images/s over the timed steps, loss of the last step)."""
    t = config.train
    memory_format = memory_format_of(channels_last)
    model = copy.deepcopy(initial).train().to(memory_format=memory_format)
    optimizer = OPTIMIZERS[t.optimizer](model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loss_fn = make_loss(t.loss)
    rates, loss = [], torch.zeros(())
    for step, (images, masks) in enumerate(data):
        started = time.perf_counter()
        with autocast(precision, torch.device("cpu")):
            loss = loss_fn(model(images.contiguous(memory_format=memory_format)), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 2:  # the first steps pay for oneDNN's kernel selection
            rates.append(len(images) / (time.perf_counter() - started))
    return statistics.median(rates), loss.item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "cpu-small.yaml"))
    parser.add_argument("--batch", type=int, default=8, help="per-worker batch (cpu-small: 16 over 2 workers)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps, the first 2 untimed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error(f"--steps must be at least 3 (the first 2 are untimed), got {args.steps}")
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    torch.manual_seed(config.train.seed)
    initial = create_model(config.model, in_channels=config.data.model_channels)
    data = batches(args.steps, args.batch, config.data.model_channels, config.data.size)
    print(f"{config.model.variant} (width {config.model.unet_width}) at {config.data.size} px, batch {args.batch}, "
          f"{args.threads} thread(s), {args.steps} steps")
    base_rate = None
    for precision, channels_last in (("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)):
        rate, loss = run(initial, config, data, precision, channels_last)
        base_rate = base_rate or rate
        layout = "NHWC" if channels_last else "NCHW"
        print(f"{precision} {layout}  {rate:7.1f} images/s  x{rate / base_rate:4.2f}  loss at step "
              f"{args.steps} {loss:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
