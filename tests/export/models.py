"""Small models for export edge cases (importable, so the artifact store can pickle them)."""

from __future__ import annotations

import torch
from torch import nn


class Branchy(nn.Module):
    """Input-dependent control flow: a trace records only the branch its example input took."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        self.scale = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > self.threshold:
            return self.scale(x) * 2
        return -self.scale(x)
