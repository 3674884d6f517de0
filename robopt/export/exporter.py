"""export_artifact: write one artifact in a deployable format, verify it without robopt, then move it into place.

Artifacts are never touched: the model is loaded from the store (hash-checked) and written to a fresh folder
beside `out_dir`, which is renamed to `out_dir` only after the verification passed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from robopt import __version__
from robopt.domain.records import ArtifactRef, InputSpec
from robopt.export.errors import ExportError
from robopt.export.job import ArchitectureHint, ExportJob, Written
from robopt.export.quantization import QuantizationCensus, is_hf_model, quantization_census
from robopt.export.readme import render_readme
from robopt.export.reference import zoo_architecture_hint
from robopt.export.result import (
    DEFAULT_TOLERANCE,
    FORMATS,
    MANIFEST_FILE,
    ExportFormat,
    ExportManifest,
    ExportResult,
    VerificationSpec,
    render_snippet,
)
from robopt.export.to_hf import write_hf
from robopt.export.to_onnx import write_onnx
from robopt.export.to_state_dict import write_state_dict
from robopt.export.to_torchscript import write_torchscript
from robopt.export.verify import output_arrays, run_verification, save_verification_data
from robopt.memory.artifacts import MANIFEST, ArtifactStore
from robopt.progress import Progress
from robopt.tools.example_inputs import make_example_inputs

Writer = Callable[[ExportJob, Path], Written]
WRITERS: dict[str, Writer] = {
    "torchscript": write_torchscript,
    "state-dict": write_state_dict,
    "hf": write_hf,
    "onnx": write_onnx,
}
_STAGES = 4


def artifact_from_path(path: str | Path) -> tuple[ArtifactRef, ArtifactStore]:
    """An artifact given by its directory or payload file (e.g. OptimizationResult.artifact)."""
    path = Path(path).expanduser()
    directory = path if path.is_dir() else path.parent
    if not (directory / MANIFEST).is_file():
        raise ExportError(
            f"{path} is not a robopt artifact (no {MANIFEST} beside it)",
            "give an artifact sha256 (prefix), a session id, or the path of a result's artifact",
        )
    store = ArtifactStore(directory.parent)
    return store.get(directory.name), store


def choose_format(
    fmt: str, ref: ArtifactRef, model: torch.nn.Module, census: QuantizationCensus
) -> tuple[ExportFormat, str | None]:
    """The format for `fmt` ("auto": onnx for ONNX artifacts, hf for transformers models it can hold,
    torchscript otherwise) and, when auto passed over the obvious one, why."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}", f"choose one of: {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt, None  # type: ignore[return-value]
    if ref.format == "onnx":
        return "onnx", None
    if is_hf_model(model):
        if not census.quantized or census.hf_quantizer:
            return "hf", None
        why = f"format auto chose torchscript: transformers cannot reload layers quantized by {census.describe()}"
        return "torchscript", why
    return "torchscript", None


def check_out_dir(out_dir: Path) -> None:
    """The output folder must not exist, or be an empty directory: an export never writes over files."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(
            f"{out_dir} already exists and is not an empty folder",
            "choose a new output folder (robopt never writes into or over existing files), or remove it first",
        )


@contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A fresh folder beside `out_dir`, renamed to it on success and removed on any failure."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    try:
        yield tmp
        check_out_dir(out_dir)  # again: something may have appeared there while we worked
        os.replace(tmp, out_dir)  # atomic; replaces an empty directory
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _reference_outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list:
    try:
        with torch.no_grad():
            return output_arrays(model(*inputs))
    except Exception as e:  # the model's own code may raise anything; reported with the inputs it got
        raise ExportError(
            f"the artifact fails on its own example inputs: {type(e).__name__}: {e}",
            "check the artifact's input spec (`robopt analyze artifact:SHA`)",
        ) from e


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _job(
    ref: ArtifactRef,
    store: ArtifactStore,
    spec: InputSpec,
    architecture: ArchitectureHint | None,
    tokenizer_dir: str | Path | None,
    seed: int,
    opset: int,
) -> ExportJob:
    model = store.load(ref).eval()  # hash-verified; a fresh object, the stored artifact stays untouched
    if architecture is None and ref.format == "torch-module" and not is_hf_model(model):
        architecture = zoo_architecture_hint(model)
    return ExportJob(
        ref=ref,
        model=model,
        input_spec=spec,
        trace_inputs=make_example_inputs(spec, seed),
        census=quantization_census(model),
        architecture=architecture,
        tokenizer_dir=Path(tokenizer_dir) if tokenizer_dir else None,
        opset=opset,
    )


def _manifest(job: ExportJob, fmt: ExportFormat, written: Written, tolerance: float, seed: int) -> ExportManifest:
    return ExportManifest(
        format=fmt,
        artifact=job.ref.sha256,
        technique=job.ref.technique,
        load_snippet=written.snippet,
        verification=VerificationSpec(
            runner=written.runner,
            input_names=job.input_names,
            input_dtypes=[t.dtype for t in job.input_spec.inputs],
            compare=written.compare,
            tolerance=tolerance,
            seed=seed,
        ),
        notes=written.notes,
        robopt_version=__version__,
    )


def export_artifact(
    artifact: ArtifactRef | str | Path,
    out_dir: str | Path,
    fmt: str = "auto",
    *,
    store: ArtifactStore | None = None,
    architecture: ArchitectureHint | None = None,
    tokenizer_dir: str | Path | None = None,
    input_spec: InputSpec | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    opset: int = 17,
    verify: bool = True,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a stored artifact to `out_dir` as torchscript, state-dict, hf or onnx ("auto" picks one).

    `artifact` is an ArtifactRef (with `store`, or found from its path) or the path of an artifact's directory
    or payload. The export is loaded in a fresh Python process that cannot import robopt, run on inputs made
    from the artifact's input spec (another seed than the trace/export inputs), and compared with the artifact
    as robopt loads it: above `tolerance` (relative to max(1, max |output|)) an ExportVerificationError is
    raised and nothing is left at `out_dir`. Formats that cannot hold the model raise NotExportableError
    naming one that can. `verify=False` skips the check (the result and README then say so).
    """
    progress = progress or Progress(node="export")
    if isinstance(artifact, ArtifactRef):
        ref, store = artifact, store or ArtifactStore(Path(artifact.path).parent.parent)
    else:
        ref, store = artifact_from_path(artifact)
    out = Path(out_dir).expanduser().absolute()
    check_out_dir(out)
    spec = input_spec or ref.input_spec
    if spec is None:
        raise ExportError(
            f"artifact {ref.sha256[:12]} has no input spec, so robopt cannot make inputs to verify the export",
            "pass input_spec=InputSpec(...) to export_artifact",
        )
    progress.update("export", 0, _STAGES, f"loading artifact {ref.sha256[:12]}")
    job = _job(ref, store, spec, architecture, tokenizer_dir, seed, opset)
    chosen, why = choose_format(fmt, ref, job.model, job.census)
    verify_inputs = make_example_inputs(spec, seed + 1)
    with staging_dir(out) as folder:
        progress.update("export", 1, _STAGES, f"writing {chosen}")
        written = WRITERS[chosen](job, folder)
        if why:
            written.notes.insert(0, why)
        # The reference is a second fresh load, run only now, so the writer's model and the reference do not
        # share state: some layers repack their weights on their first forward (bitsandbytes 4-bit on CPU).
        expected = _reference_outputs(store.load(ref, verify=False).eval(), verify_inputs)
        save_verification_data(folder, verify_inputs, expected)
        manifest = _manifest(job, chosen, written, tolerance, seed + 1)
        if verify:
            progress.update("export", 2, _STAGES, "verifying in a fresh process without robopt")
            manifest.max_abs_diff = run_verification(folder, manifest)
        progress.update("export", 3, _STAGES, "writing README and manifest")
        (folder / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        (folder / "README.md").touch()  # so the README lists itself among the files
        (folder / "README.md").write_text(render_readme(manifest, _files(folder)))
        files = _files(folder)
    progress.update("export", _STAGES, _STAGES, f"exported to {out}")
    return ExportResult(
        path=str(out),
        format=chosen,
        files=files,
        load_snippet=render_snippet(written.snippet, out),
        verified=verify,
        max_abs_diff=manifest.max_abs_diff,
        tolerance=tolerance,
        artifact=ref.sha256,
        notes=written.notes,
    )
