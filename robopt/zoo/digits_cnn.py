"""digits-cnn: a small Linear-heavy CNN trained offline on scikit-learn's 8x8 digits (the demo model)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from robopt.domain.records import InputSpec, TensorSpec
from robopt.evaluation.base import EvaluatorSpec
from robopt.evaluation.datasets import digits_split
from robopt.progress import Progress
from robopt.tools.threads import torch_threads
from robopt.zoo.cards import ZooEntry, register_entry

EPOCHS = 15
BATCH_SIZE = 32
LEARNING_RATE = 2e-3


class DigitsCNN(nn.Module):
    """Conv(1->16)-Conv(16->32)-MaxPool-Linear(512->hidden)-Linear(hidden->10); most parameters sit in the Linears."""

    input_spec: ClassVar[InputSpec] = InputSpec(inputs=[TensorSpec(name="input", shape=[1, 1, 8, 8])], source="zoo")

    def __init__(self, hidden: int = 256, dropout: float = 0.25, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_digits_cnn(
    seed: int, progress: Progress, architecture_kwargs: dict[str, Any], epochs: int = EPOCHS
) -> DigitsCNN:
    """Train on the fixed digits train split with Adam; reports progress per epoch. Global RNG state is preserved."""
    x_train, y_train, _, _ = digits_split()
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(seed)
        model = DigitsCNN(**architecture_kwargs)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        order = torch.Generator().manual_seed(seed)
        model.train()
        progress.update("train", 0, epochs)
        for epoch in range(1, epochs + 1):
            for idx in torch.randperm(len(x_train), generator=order).split(BATCH_SIZE):
                optimizer.zero_grad()
                F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                optimizer.step()
            progress.update("train", epoch, epochs)
    return model.eval()


register_entry(
    ZooEntry(
        name="digits-cnn",
        description="Small CNN classifying scikit-learn's 8x8 handwritten digits (10 classes); "
        "most of its weights sit in Linear layers, which INT8 quantization shrinks 4x.",
        architecture=f"{DigitsCNN.__module__}:{DigitsCNN.__qualname__}",
        architecture_kwargs={"hidden": 256, "dropout": 0.25, "classes": 10},
        family="cnn",
        input_spec=DigitsCNN.input_spec,
        evaluator=EvaluatorSpec(name="classification", dataset="digits"),
        suggested_criteria={"max_size": "33%", "max_accuracy_drop": "1%"},
        seed=0,
        train=train_digits_cnn,
    )
)
