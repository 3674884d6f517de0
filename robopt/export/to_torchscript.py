"""TorchScript export: torch.jit.trace on the artifact's example inputs (fp32, pruned and torch.ao INT8 modules)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from robopt.export.errors import NotExportableError
from robopt.export.hf_call import PrimaryOutput
from robopt.export.job import ExportJob, Written, shapes_note
from robopt.export.quantization import UNQUANTIZED_PARENT_HINT, is_hf_model

MODEL_FILE = "model.ts"
SNIPPET = f'import torch\n\nmodel = torch.jit.load(f"{{folder}}/{MODEL_FILE}", map_location="cpu").eval()\n'
_MAX_TRACER_NOTES = 3

# Measured here (torch 2.13, torchao 0.18): torch.jit.trace accepts torchao's quantized weight tensors, but
# torch.jit.save then kills the process with a segmentation fault, so it is refused before tracing.
_TORCHAO_REASON = (
    "torch.jit.save crashes (segmentation fault) on torchao's quantized weight tensors (torch 2.13, torchao 0.18)"
)


def _refuse_known_failures(job: ExportJob) -> None:
    if job.ref.format == "onnx":
        raise NotExportableError(
            "not exportable as TorchScript: the artifact is an ONNX graph; TorchScript is made from PyTorch modules",
            "use --format onnx (copies the ONNX model as robopt evaluated it)",
        )
    if "torchao" in job.census.libraries:
        onnx = "--format onnx (the weights are exported dequantized to float, so the file is not smaller)"
        hint = f"use {onnx}"
        if job.census.hf_quantizer:
            hint = f"use --format hf (transformers reloads its own torchao quantization), or {onnx}"
        raise NotExportableError(f"not exportable as TorchScript: {_TORCHAO_REASON}", hint)


def _hint_for(job: ExportJob) -> str:
    if job.census.hf_quantizer:
        return "use --format hf: transformers saves and reloads its own quantization (quantization_config)"
    if job.census.quantized:
        return f"try --format onnx; otherwise {UNQUANTIZED_PARENT_HINT}"
    return "try --format onnx, or --format state-dict with the model's Python class"


def _first_sentence(message: object) -> str:
    text = str(message).strip().splitlines()[0]
    return text.split(". ")[0].rstrip(".")


def write_torchscript(job: ExportJob, folder: Path) -> Written:
    """Copy a TorchScript artifact, or trace the module (HF models: their primary output) and save it."""
    _refuse_known_failures(job)
    target = folder / MODEL_FILE
    hf = is_hf_model(job.model)
    if job.ref.format == "torchscript":
        shutil.copyfile(job.ref.path, target)
        return Written(SNIPPET, runner="torch", notes=["the TorchScript artifact was copied unchanged"])
    module = PrimaryOutput(job.model, job.input_names) if hf else job.model
    module.requires_grad_(False)  # an inference graph; traced weights that require grad cannot become constants
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(module, job.trace_inputs, check_trace=True)
        except Exception as e:  # tracing runs the model's own code, which may raise anything; reported, not hidden
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            quantized = f" (quantized layers: {job.census.describe()})" if job.census.quantized else ""
            raise NotExportableError(
                f"not exportable as TorchScript: torch.jit.trace failed on {type(job.model).__name__}{quantized}: "
                f"{type(e).__name__}: {first}",
                _hint_for(job),
            ) from e
    torch.jit.save(traced, str(target))
    notes = [
        f"traced with inputs {shapes_note(job.trace_inputs)}: a trace records the code path of those inputs "
        "(the verification ran other values of the same shape)"
    ]
    if hf:
        notes.append("Hugging Face model traced without KV cache; the TorchScript returns only its primary output")
    tracer = sorted({_first_sentence(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    notes += [f"tracer warning: {m}" for m in tracer[:_MAX_TRACER_NOTES]]
    return Written(SNIPPET, runner="torch", compare="first" if hf else "all", notes=notes)
