"""What an export wrote and how it was checked: the manifest kept beside the files, and the result returned."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ExportFormat = Literal["torchscript", "state-dict", "hf", "onnx"]
FormatChoice = Literal["auto", "torchscript", "state-dict", "hf", "onnx"]
FORMATS: tuple[str, ...] = ("auto", "torchscript", "state-dict", "hf", "onnx")
Runner = Literal["torch", "hf", "onnx"]

MANIFEST_FILE = "robopt-export.json"
VERIFY_DIR = "verification"
INPUTS_FILE = f"{VERIFY_DIR}/inputs.npz"
EXPECTED_FILE = f"{VERIFY_DIR}/expected_outputs.npz"
DEFAULT_TOLERANCE = 1e-4


class VerificationSpec(BaseModel):
    """How the export is loaded and run without robopt, and how its outputs are compared."""

    model_config = ConfigDict(extra="forbid")

    runner: Runner = Field(description="torch: call model(*inputs); hf: model(**inputs); onnx: an ORT session.")
    input_names: list[str]
    input_dtypes: list[str]
    compare: Literal["all", "first"] = Field(
        description="all: every output tensor; first: the primary output (Hugging Face logits / hidden states)."
    )
    tolerance: float = Field(description="Largest |export - artifact|, relative to max(1, max |artifact output|).")
    seed: int = Field(description="Seed of the verification inputs (the trace/export inputs use another seed).")


class ExportManifest(BaseModel):
    """Written to robopt-export.json in the export folder: enough to re-run the verification later."""

    model_config = ConfigDict(extra="forbid")

    format: ExportFormat
    artifact: str = Field(description="sha256 of the robopt artifact this export was made from.")
    technique: str | None = None
    load_snippet: str = Field(description="Python that loads the export into `model` (or `session`) from `folder`.")
    verification: VerificationSpec
    max_abs_diff: float | None = None
    notes: list[str] = Field(default_factory=list)
    robopt_version: str


class ExportResult(BaseModel):
    """A finished export: where it is, what it holds, how to load it, and the measured verification."""

    model_config = ConfigDict(extra="forbid")

    path: str
    format: ExportFormat
    files: list[str] = Field(description="Files in the export folder, relative to it.")
    load_snippet: str = Field(description="Python (no robopt) that loads the export; `folder` is set to `path`.")
    verified: bool = Field(description="True when the export was loaded in a fresh process without robopt and matched.")
    max_abs_diff: float | None = Field(description="Largest |export - artifact| on the verification inputs.")
    tolerance: float
    artifact: str
    notes: list[str] = Field(default_factory=list)


def render_snippet(body: str, folder: Path | str) -> str:
    """The load snippet with `folder` bound to a concrete path."""
    return f"folder = {str(folder)!r}\n{body}"
