"""Model cards (what a zoo model is, how to judge it, what it measured) and the registry of zoo entries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from robopt.domain.analysis import ArchitectureFamily
from robopt.domain.records import InputSpec
from robopt.errors import CorruptModelError, ModelNotFoundError
from robopt.evaluation.base import EvaluatorSpec
from robopt.progress import Progress
from robopt.tools.architectures import build_architecture

WEIGHTS_FILE = "model.safetensors"
HF_FOLDER = "hf"
CARD_FILE = "card.json"

ZooKind = Literal["module", "hf-folder", "shape-only"]


class ModelCard(BaseModel):
    """A built zoo model: its architecture (import path + kwargs), inputs, evaluator, and build-time metrics."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    kind: ZooKind = Field(
        default="module",
        description="module: safetensors state dict + architecture; hf-folder: a save_pretrained folder; "
        "shape-only: an architecture with no weights (analysis and predictions only).",
    )
    architecture: str = Field(description="Import path of the nn.Module class, e.g. 'robopt.zoo.digits_cnn:DigitsCNN'.")
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    family: ArchitectureFamily
    input_spec: InputSpec
    evaluator: EvaluatorSpec = Field(description="The evaluator and dataset that fit this model.")
    suggested_criteria: dict[str, str] = Field(
        default_factory=dict, description="CLI criteria that make a good demo, e.g. {'max_size': '33%'}."
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="Measured by the evaluator at build time.")
    seed: int
    build_seconds: float

    def instantiate(self) -> nn.Module:
        """A fresh (untrained) instance of the card's architecture."""
        return build_architecture(self.architecture, self.architecture_kwargs)


def load_card_model(weights_path: Path, card: ModelCard) -> nn.Module:
    """The card's architecture with the state dict from `weights_path` (safetensors), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = card.instantiate()
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise CorruptModelError(
            f"cannot read zoo weights {str(weights_path)!r}: {e}",
            f"rebuild it: robopt zoo build {card.name} --force",
        ) from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CorruptModelError(
            f"zoo weights {str(weights_path)!r} do not fit {card.architecture}: {e}",
            f"rebuild it: robopt zoo build {card.name} --force",
        ) from e
    return model.eval()


TrainFn = Callable[[int, Progress, dict[str, Any]], nn.Module]  # (seed, progress, architecture_kwargs)
FolderFn = Callable[[int, Progress, Path], None]  # (seed, progress, directory to write a save_pretrained folder in)


@dataclass(frozen=True)
class ZooEntry:
    """How to build one zoo model: everything on its card except the measured fields, plus the training function."""

    name: str
    description: str
    architecture: str
    family: ArchitectureFamily
    input_spec: InputSpec
    evaluator: EvaluatorSpec
    train: TrainFn | None = field(default=None, repr=False)
    kind: ZooKind = "module"
    build_folder: FolderFn | None = field(default=None, repr=False)
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    suggested_criteria: dict[str, str] = field(default_factory=dict)
    seed: int = 0


_ENTRIES: dict[str, ZooEntry] = {}


def register_entry(entry: ZooEntry) -> ZooEntry:
    _ENTRIES[entry.name] = entry
    return entry


def get_entry(name: str) -> ZooEntry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise ModelNotFoundError(
            f"no zoo model named {name!r}", f"zoo models: {', '.join(sorted(_ENTRIES)) or '(none)'}"
        ) from None


def entry_names() -> list[str]:
    return sorted(_ENTRIES)
