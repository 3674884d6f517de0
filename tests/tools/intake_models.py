"""Tiny architectures for the intake tests, importable as `tests.tools.intake_models:ClassName`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class TinyNet(nn.Module):
    """An MLP with a BatchNorm (so state dicts carry buffers too)."""

    def __init__(self, in_features: int = 8, hidden: int = 16, out_features: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class TinyNetWithSpec(TinyNet):
    """TinyNet that declares its own input shape through an `input_spec` attribute."""

    input_spec: ClassVar[dict[str, Any]] = {"inputs": [{"name": "obs", "shape": [2, 8]}]}


def tiny_net_factory(hidden: int = 16) -> nn.Module:
    """A factory function (not a class) is a valid architecture too."""
    return TinyNet(hidden=hidden)


NOT_A_MODULE = 42


class NotAModule:
    def __init__(self) -> None:
        self.weight = torch.zeros(1)


def make_tiny_net(seed: int = 0, **kwargs: int) -> TinyNet:
    """A TinyNet with seeded weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = TinyNet(**kwargs)
    with torch.no_grad():
        net.norm.running_mean.uniform_(-0.5, 0.5)
        net.norm.running_var.uniform_(0.5, 1.5)
    return net.eval()
