"""Deployable exports that load without robopt: TorchScript, state dict + architecture, Hugging Face folders, ONNX.

    from robopt.export import export
    result = export("SESSION_OR_SHA", "out/digits", fmt="auto")   # -> ExportResult (verified)
    print(result.load_snippet)

Every export is loaded again in a fresh Python process that cannot import robopt and compared with the artifact
robopt evaluated; `verify_export(folder)` repeats that check on an existing export folder.
"""

from __future__ import annotations

from pathlib import Path

from robopt.export.errors import ExportError, ExportVerificationError, NotExportableError
from robopt.export.exporter import export_artifact
from robopt.export.job import ArchitectureHint
from robopt.export.reference import resolve_export_source
from robopt.export.result import DEFAULT_TOLERANCE, FORMATS, ExportFormat, ExportResult
from robopt.export.verify import verify_export
from robopt.graph.context import Context
from robopt.progress import Progress

__all__ = [
    "DEFAULT_TOLERANCE",
    "FORMATS",
    "ArchitectureHint",
    "ExportError",
    "ExportFormat",
    "ExportResult",
    "ExportVerificationError",
    "NotExportableError",
    "export",
    "export_artifact",
    "export_model",
    "verify_export",
]


def export(
    model: str,
    out_dir: str | Path,
    fmt: str = "auto",
    *,
    context: Context | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Progress | None = None,
) -> ExportResult:
    """Export an artifact (sha256 prefix, `artifact:SHA` or artifact path) or a session's best model to `out_dir`.

    fmt: "auto" (hf for transformers models, onnx for ONNX artifacts, torchscript otherwise), "torchscript",
    "state-dict", "hf" or "onnx". The result says where the files are, how to load them without robopt, and the
    measured max |export - artifact| of the verification.
    """
    context = context or Context()
    source = resolve_export_source(model, context)
    return export_artifact(
        source.ref,
        out_dir,
        fmt,
        store=source.store,
        architecture=source.architecture,
        tokenizer_dir=source.tokenizer_dir,
        tolerance=tolerance,
        seed=context.seed,
        progress=progress,
    )


export_model = export  # the name robopt's top-level API uses (`robopt.export` is this package)
