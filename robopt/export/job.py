"""What a format writer gets (the loaded artifact and what is known about it) and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from robopt.domain.records import ArtifactRef, InputSpec
from robopt.export.quantization import QuantizationCensus
from robopt.export.result import Runner


@dataclass
class ArchitectureHint:
    """The model's Python class and constructor kwargs, when known (from a zoo card or the caller)."""

    class_path: str
    kwargs: dict[str, Any] | None
    source: str  # where they came from, e.g. "zoo card digits-cnn"


@dataclass
class ExportJob:
    """One export: the artifact as robopt loads it, its inputs, and what robopt knows about where it came from."""

    ref: ArtifactRef
    model: nn.Module
    input_spec: InputSpec
    trace_inputs: tuple[torch.Tensor, ...]
    census: QuantizationCensus
    architecture: ArchitectureHint | None = None
    tokenizer_dir: Path | None = None
    opset: int = 17

    @property
    def input_names(self) -> list[str]:
        return unique_names([t.name for t in self.input_spec.inputs])


@dataclass
class Written:
    """A writer's result: the load snippet (uses `folder`), how to run it, and what the user should know."""

    snippet: str
    runner: Runner
    compare: Literal["all", "first"] = "all"
    notes: list[str] = field(default_factory=list)


def unique_names(names: list[str]) -> list[str]:
    """Input names made unique and non-empty (ONNX graphs and keyword calls need distinct names)."""
    seen: set[str] = set()
    result = []
    for i, name in enumerate(names):
        candidate = name or f"input_{i}"
        while candidate in seen:
            candidate = f"{candidate}_{i}"
        seen.add(candidate)
        result.append(candidate)
    return result


def shapes_note(inputs: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
