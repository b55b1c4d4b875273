"""Losses on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from raysegm.losses import make_loss

LOGIT = 20.0  # sigmoid(20) = 1 - 2e-9: "certain" for hand arithmetic


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on busy shared cores two threads stall each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bce_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.0, 3.0]).reshape(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
    p = [1 / (1 + math.exp(-x)) for x in (2.0, -1.0, 0.0, 3.0)]
    expected = -(math.log(p[0]) + math.log(1 - p[1]) + math.log(p[2]) + math.log(1 - p[3])) / 4
    assert make_loss("bce")(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_by_hand():
    # p = 0.5 everywhere on 8 pixels with 2 tumor pixels: sum p = 4, sum g = 2, sum pg = 1
    logits = torch.zeros(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    target[0, 0, 0, 0] = target[1, 0, 1, 1] = 1
    assert make_loss("dice")(logits, target).item() == pytest.approx(1 - (2 * 1 + 1) / (4 + 2 + 1), rel=1e-6)
    assert make_loss("bce_dice")(logits, target).item() == pytest.approx(math.log(2) + 4 / 7, rel=1e-6)


def test_dice_sums_over_the_whole_batch_not_per_image():
    # image 0: 4 tumor pixels predicted exactly; image 1: no tumor, 2 pixels predicted
    logits = torch.full((2, 1, 2, 2), -LOGIT)
    target = torch.zeros(2, 1, 2, 2)
    logits[0] = LOGIT
    target[0] = 1
    logits[1, 0, 0, :] = LOGIT
    batch = 1 - (2 * 4 + 1) / ((4 + 2) + 4 + 1)  # 1 - 9/11
    per_image_mean = ((1 - 9 / 9) + (1 - 1 / 3)) / 2
    loss = make_loss("dice")(logits, target).item()
    assert loss == pytest.approx(batch, abs=1e-6)
    assert abs(loss - per_image_mean) > 0.1


def test_topk_bce_by_hand():
    # 20 pixels: the 10% hardest are 2, the two confident mistakes; the 18 right pixels drop out
    logits = torch.full((1, 1, 4, 5), -3.0)
    target = torch.zeros(1, 1, 4, 5)
    logits[0, 0, 0, 0], logits[0, 0, 1, 1] = 2.0, 4.0  # predicted tumor on background
    target[0, 0, 2, 2], logits[0, 0, 2, 2] = 1.0, 3.0  # tumor, predicted right: an easy pixel
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  (BCE of logit x on background)
    expected = (softplus(2.0) + softplus(4.0)) / 2
    assert make_loss("topk_bce")(logits, target).item() == pytest.approx(expected, rel=1e-6)
    plain = make_loss("bce")(logits, target).item()
    assert plain < expected / 5  # the plain mean dilutes the same mistakes over all 20 pixels
    dice = make_loss("dice")(logits, target).item()
    assert make_loss("topk_bce_dice")(logits, target).item() == pytest.approx(expected + dice, rel=1e-6)


def test_topk_bce_keeps_at_least_one_pixel():
    logits = torch.tensor([1.0, -2.0, 0.5]).reshape(1, 1, 1, 3)
    target = torch.zeros(1, 1, 1, 3)
    assert make_loss("topk_bce")(logits, target).item() == pytest.approx(math.log1p(math.exp(1.0)), rel=1e-6)


@pytest.mark.parametrize("name", ["dice", "bce_dice", "topk_bce_dice"])
def test_a_batch_without_tumor_still_pays_for_predicted_tumor(name):
    target = torch.zeros(2, 1, 8, 8)
    everywhere = make_loss(name)(torch.full_like(target, LOGIT), target).item()
    nowhere = make_loss(name)(torch.full_like(target, -LOGIT), target).item()
    assert nowhere == pytest.approx(0.0, abs=1e-6)
    assert everywhere > 0.99
    assert everywhere > nowhere


def test_smp_dice_loss_is_blind_on_a_batch_without_tumor():
    """Why `dice` is ours: smp's DiceLoss skips classes absent from the batch, so it scores both as 0."""
    target = torch.zeros(2, 1, 8, 8)
    smp_dice = smp.losses.DiceLoss(mode="binary", from_logits=True)
    assert smp_dice(torch.full_like(target, LOGIT), target).item() == 0.0
    assert smp_dice(torch.full_like(target, -LOGIT), target).item() == 0.0


@pytest.mark.parametrize("name", ["bce", "dice", "bce_dice", "topk_bce", "topk_bce_dice"])
def test_losses_compute_in_float32_under_autocast(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16).bfloat16()
    target = (torch.rand(2, 1, 16, 16) > 0.7).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = make_loss(name)(logits, target)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(make_loss(name)(logits.float(), target).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["bce_dice", "topk_bce_dice"])
def test_losses_fall_as_logits_fit_the_target(name):
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 8, 8) > 0.7).float()
    logits = torch.zeros_like(target, requires_grad=True)
    loss_fn = make_loss(name)
    optimizer = torch.optim.Adam([logits], lr=0.5)
    first = loss_fn(logits, target).item()
    for _ in range(50):
        optimizer.zero_grad()
        loss = loss_fn(logits, target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
    assert torch.equal(logits.detach() > 0, target.bool())


def test_unknown_loss_and_shape_mismatch_are_errors():
    with pytest.raises(ValueError, match="bce, dice, bce_dice"):
        make_loss("focal")
    with pytest.raises(ValueError, match="differ in shape"):
        make_loss("dice")(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))


def _worker_share_gradient(rank: int, world_size: int, folder: str, name: str, logits, target):
    """One data-parallel worker: its half of the batch, a real gloo process group."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank, world_size=world_size)
    try:
        share = slice(rank * len(logits) // world_size, (rank + 1) * len(logits) // world_size)
        mine = logits[share].clone().requires_grad_(True)
        loss = make_loss(name)(mine, target[share])
        loss.backward()
        # DDP averages the workers' gradients: each worker's share of that average
        np.save(f"{folder}/grad-{rank}.npy", (mine.grad / world_size).numpy())
        np.save(f"{folder}/loss-{rank}.npy", np.float64(loss.item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["dice", "bce_dice"])
def test_two_workers_train_on_the_dice_of_the_whole_batch(tmp_path, name):
    # the contract's Dice is over the whole batch: 2 workers with half a batch each must produce the
    # gradient one process computes on the whole batch (the split puts the tumor on one worker only)
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 6, 6, generator=generator)
    target = torch.zeros(4, 1, 6, 6)
    target[0, 0, 1:4, 1:5] = 1  # worker 0's share holds all the tumor, worker 1's none
    whole = logits.clone().requires_grad_(True)
    expected_loss = make_loss(name)(whole, target)
    expected_loss.backward()

    # spawned, never forked: a fork of a process that runs a Ray driver copies its live connections
    mp.spawn(_worker_share_gradient, args=(2, str(tmp_path), name, logits, target), nprocs=2)
    gradient = torch.from_numpy(np.concatenate([np.load(tmp_path / f"grad-{rank}.npy") for rank in (0, 1)]))
    torch.testing.assert_close(gradient, whole.grad, rtol=1e-5, atol=1e-7)
    if name == "dice":  # every worker's loss is the whole batch's Dice loss
        losses = [float(np.load(tmp_path / f"loss-{rank}.npy")) for rank in (0, 1)]
        assert losses[0] == pytest.approx(expected_loss.item()) == losses[1]
    # the old per-worker Dice: half-batch sums, a different gradient
    halves = [logits[:2].clone().requires_grad_(True), logits[2:].clone().requires_grad_(True)]
    for half, truth in zip(halves, (target[:2], target[2:])):
        make_loss(name)(half, truth).backward()
    per_worker = torch.cat([h.grad for h in halves]) / 2
    assert (per_worker - whole.grad).abs().max() > 1e-3
