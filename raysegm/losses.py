"""Training losses on logits (B, 1, H, W) against float {0, 1} targets of the same shape -> scalar.

Computed in float32 even under autocast: sums over a whole batch of 256x256 slices overflow bf16's
precision long before they overflow its range.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _float32(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.shape != target.shape:
        raise ValueError(f"loss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    return logits.float(), target.float()


class BCELoss(nn.Module):
    """Binary cross-entropy on logits, the mean over every pixel of the batch."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            logits, target = _float32(logits, target)
            return F.binary_cross_entropy_with_logits(logits, target)


class DiceLoss(nn.Module):
    """Soft Dice over the whole batch (as Buda et al.): 1 - (2 sum(p g) + 1) / (sum p + sum g + 1), p = sigmoid.

    Summing over the batch rather than per image means a batch without tumor still pays for predicted
    tumor (smp's DiceLoss skips classes absent from the batch and returns 0 there).

    Data-parallel training: each Train worker holds train.batch_size / scale.num_workers slices of the
    global batch. Where a torch.distributed process group of several workers is running, the three sums
    are added over the workers (torch's differentiable functional `all_reduce`, which carries the gradient
    back to every worker's share), so every worker computes the Dice of the whole global batch. Its
    backward returns each worker num_workers times its share's gradient, and DDP's average of the
    workers' gradients then equals one process's gradient on the whole batch. Every worker must call it
    the same number of times (the training set is split equally across workers).
    """

    smooth = 1.0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            logits, target = _float32(logits, target)
            prob = torch.sigmoid(logits)
            overlap, predicted, truth = _global_sums((prob * target).sum(), prob.sum(), target.sum())
            return 1 - (2 * overlap + self.smooth) / (predicted + truth + self.smooth)


def _global_sums(*sums: torch.Tensor) -> torch.Tensor:
    """This worker's sums, added over the workers of a running process group (see DiceLoss)."""
    stacked = torch.stack(sums)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # torch's differentiable all-reduce (torch.distributed.nn.functional's is deprecated for it):
        # its backward all-reduces the gradient, a sum of the workers' identical ones
        from torch.distributed._functional_collectives import all_reduce

        stacked = all_reduce(stacked, "sum", dist.group.WORLD)
    return stacked


class BCEDiceLoss(nn.Module):
    """`bce` + `dice`, unweighted."""

    bce_term = BCELoss

    def __init__(self):
        super().__init__()
        self.bce = self.bce_term()
        self.dice = DiceLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, target) + self.dice(logits, target)


class TopKBCELoss(nn.Module):
    """BCE averaged over the hardest `fraction` of the batch's pixels only (nnU-Net's TopK10 cross-entropy).

    top_k(l, k) with l_i = -g_i log p_i - (1 - g_i) log(1 - p_i), k = max(1, floor(fraction * pixels)): the
    many background pixels already right drop out of the mean, so confident mistakes carry the loss.
    """

    fraction = 0.10

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            logits, target = _float32(logits, target)
            per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten()
            k = max(1, int(per_pixel.numel() * self.fraction))
            return per_pixel.topk(k, sorted=False).values.mean()


class TopKBCEDiceLoss(BCEDiceLoss):
    """`topk_bce` + `dice`, unweighted (nnU-Net's DC_and_topk_loss)."""

    bce_term = TopKBCELoss


LOSSES = {"bce": BCELoss, "dice": DiceLoss, "bce_dice": BCEDiceLoss,
          "topk_bce": TopKBCELoss, "topk_bce_dice": TopKBCEDiceLoss}


def make_loss(name: str) -> nn.Module:
    """The loss called `name` (one of LOSSES): module(logits, target) -> scalar float32 tensor."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]()
