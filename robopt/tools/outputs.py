"""Helpers for model outputs of any shape: tensors, tuples, dicts and Hugging Face ModelOutputs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch


def iter_tensors(output: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a model output, depth first."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from iter_tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from iter_tensors(value)


def first_tensor(output: Any) -> torch.Tensor:
    """The main output (logits/actions): the first tensor found."""
    for tensor in iter_tensors(output):
        return tensor
    raise TypeError(f"model output of type {type(output).__name__} contains no tensor")


def all_finite(output: Any) -> bool:
    """False when any floating-point output element is NaN or infinite."""
    return all(bool(torch.isfinite(t).all()) for t in iter_tensors(output) if t.is_floating_point())
