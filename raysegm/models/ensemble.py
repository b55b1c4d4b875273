"""A seed ensemble as one model: n copies of one variant whose tumor probabilities are averaged.

    p(x) = (1/n) sum_m sigmoid(f_m(x)),   returned as the logit log(p / (1 - p))

so sigmoid of the output is the mean probability, and everything that takes logits (inference, TTA,
scoring) treats the ensemble as one checkpoint. For inference only: it is built from trained members
(raysegm.checkpoint.save_ensemble), never trained as a whole.
"""

from __future__ import annotations

import torch
from torch import nn


class SeedEnsemble(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("SeedEnsemble: no members")
        self.members = nn.ModuleList(members)
        self.in_channels = getattr(members[0], "in_channels", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probability = torch.stack([torch.sigmoid(member(x).float()) for member in self.members]).mean(0)
        # +-inf wherever every member's float32 sigmoid rounds to 1 or 0 (logits beyond about +-17, common):
        # sigmoid maps it back to 1 or 0, but a loss on these logits would be NaN
        return torch.logit(probability)
