"""Tiny real models for technique tests: an MLP and a CNN trained briefly on scikit-learn's 8x8 digits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0) -> Digits:
    """1,797 8x8 digit images scaled to [0, 1], 80/20 stratified split, as (N, 64) float tensors."""
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data / 16.0, data.target, test_size=0.2, random_state=seed, stratify=data.target
    )

    def as_x(a):
        return torch.tensor(a, dtype=torch.float32)

    def as_y(a):
        return torch.tensor(a, dtype=torch.long)

    return Digits(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden/2 -> 10 classifier; `input_spec` mimics the attribute robopt keeps on models."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU())
        self.head = nn.Linear(hidden // 2, 10)
        self.input_spec = {"inputs": [{"name": "x", "shape": [1, 64]}]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DigitsCNN(nn.Module):
    """Two conv blocks on 1x8x8 images and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)
        self.input_spec = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8]}]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class RecurrentPolicy(nn.Module):
    """An LSTM over a short observation history and a linear action head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def as_images(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 8, 8)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int = 0) -> nn.Module:
    """Mini-batch Adam on cross-entropy with a fixed seed; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()
