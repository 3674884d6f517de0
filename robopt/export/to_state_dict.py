"""State-dict export: weights (safetensors; torch.save for torch.ao INT8 packed weights) plus the architecture.

The architecture is written twice: architecture.json names the original class and its constructor kwargs (when
known, e.g. from the zoo card), and architecture.py rebuilds the same layers in plain PyTorch (torch.fx), so the
weights reload with torch alone. When torch.fx cannot trace the model, a class that lives outside robopt is
used by its import path instead; robopt's own classes are never needed to load an export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robopt.errors import RoboptError
from robopt.export.architecture_code import ArchitectureCode, generate_architecture_code, instantiate
from robopt.export.errors import ExportError, NotExportableError
from robopt.export.job import ArchitectureHint, ExportJob, Written
from robopt.export.quantization import TORCH_AO, UNQUANTIZED_PARENT_HINT, is_hf_model

ARCHITECTURE_JSON = "architecture.json"
ARCHITECTURE_PY = "architecture.py"
SAFETENSORS_FILE = "model.safetensors"
QUANTIZED_STATE_FILE = "model_state.pt"


def _refuse_unsupported(job: ExportJob) -> None:
    if job.ref.format in ("onnx", "torchscript"):
        raise NotExportableError(
            f"not exportable as a state dict: the artifact is {job.ref.format}, a graph without a Python class to "
            "load weights into",
            f"use --format {job.ref.format} (copies the artifact as robopt evaluated it)",
        )
    if is_hf_model(job.model):
        raise NotExportableError(
            "not exportable as a bare state dict: a Hugging Face model's weights belong with its config.json",
            "use --format hf (a save_pretrained folder: safetensors weights + config, loaded by from_pretrained)",
        )
    others = sorted(set(job.census.libraries) - {TORCH_AO})
    if others:
        names = ", ".join(others)
        raise NotExportableError(
            f"not exportable as a state dict: the weights are quantized by {names}; a plain state dict cannot hold "
            "those packed tensors, and only that library's own loading code can rebuild the layers",
            "use --format hf for a Hugging Face model quantized through transformers; otherwise "
            + UNQUANTIZED_PARENT_HINT,
        )


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}:{type(model).__qualname__}"


def _kwargs_fit(hint: ArchitectureHint | None, class_path: str, skeleton: nn.Module) -> bool | None:
    """Do the known kwargs rebuild layers of the exported shapes? (Pruning changes them; the card does not know.)"""
    if hint is None or hint.class_path != class_path or hint.kwargs is None:
        return None
    from robopt.tools.architectures import build_architecture

    try:
        original = build_architecture(hint.class_path, hint.kwargs)
    except RoboptError:
        return False
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in original.state_dict().items()}
    return want == have


def _architecture_json(
    job: ExportJob, code: ArchitectureCode | None, weights: str, fit: bool | None, class_path: str
) -> dict[str, Any]:
    hint = job.architecture if job.architecture and job.architecture.class_path == class_path else None
    quantization = None
    if code is not None and code.needs_quantization:
        quantization = {
            "library": "torch.ao.quantization",
            "method": "quantize_dynamic, qint8 weights, activations quantized at run time",
            "layers": code.quantized_layers,
            "recipe": "architecture.quantize(model) before load_state_dict: the INT8 weights only fit quantized layers",
        }
    return {
        "class": class_path,
        "kwargs": hint.kwargs if hint else None,
        "kwargs_source": hint.source if hint else "unknown",
        "kwargs_fit_weights": fit,
        "plain_pytorch": f"{ARCHITECTURE_PY}:{code.class_name}" if code else None,
        "weights": weights,
        "quantization": quantization,
    }


def _save_safetensors(state: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _fx_snippet(code: ArchitectureCode, weights: str) -> str:
    names = f"{code.class_name}, quantize" if code.needs_quantization else code.class_name
    build = f"quantize({code.class_name}().eval())" if code.needs_quantization else f"{code.class_name}().eval()"
    load = (
        f'torch.load(f"{{folder}}/{weights}", weights_only=True)'
        if code.needs_quantization
        else f'load_file(f"{{folder}}/{weights}")'
    )
    imports = "import sys\n\nimport torch\n"
    if not code.needs_quantization:
        imports += "from safetensors.torch import load_file\n"
    return (
        f"{imports}\nsys.path.insert(0, folder)\n"
        f"from architecture import {names}  # plain PyTorch, written by robopt\n\n"
        f"model = {build}\nmodel.load_state_dict({load})\n"
    )


_IMPORT_SNIPPET = f"""import importlib
import json

from safetensors.torch import load_file

with open(f"{{folder}}/{ARCHITECTURE_JSON}") as f:
    arch = json.load(f)
module_name, _, class_name = arch["class"].partition(":")
model_class = getattr(importlib.import_module(module_name), class_name)
model = model_class(**(arch["kwargs"] or {{}})).eval()
model.load_state_dict(load_file(f"{{folder}}/{SAFETENSORS_FILE}"))
"""


def _write_by_import_path(job: ExportJob, folder: Path, fx_error: NotExportableError) -> Written:
    """torch.fx could not trace the model: use its own class, when it is importable without robopt."""
    from robopt.tools.architectures import build_architecture
    from robopt.tools.loading import load_state_dict_strict

    class_path = _class_path(job.model)
    module_name = type(job.model).__module__
    if module_name.split(".")[0] in ("robopt", "__main__") or "<locals>" in type(job.model).__qualname__:
        raise fx_error
    if job.census.quantized:
        raise NotExportableError(
            f"{fx_error.message}; a quantized model can only be rebuilt from generated code", fx_error.hint
        )
    hint = job.architecture if job.architecture and job.architecture.class_path == class_path else None
    kwargs = hint.kwargs if hint and hint.kwargs is not None else {}
    state = job.model.state_dict()
    try:
        load_state_dict_strict(build_architecture(class_path, kwargs), state, "the artifact")
    except RoboptError as e:
        raise NotExportableError(
            f"{fx_error.message}; and {class_path}(**{kwargs}) does not rebuild it: {e.message}",
            "pass architecture=ArchitectureHint(class_path, kwargs, ...) to export_artifact, or " + str(fx_error.hint),
        ) from e
    _save_safetensors(state, folder / SAFETENSORS_FILE)
    arch = _architecture_json(job, None, SAFETENSORS_FILE, True, class_path)
    if hint is None:
        arch["kwargs"] = {}
    (folder / ARCHITECTURE_JSON).write_text(json.dumps(arch, indent=2) + "\n")
    notes = [f"{fx_error.message}: loading needs the class {class_path} importable (installed or on PYTHONPATH)"]
    return Written(_IMPORT_SNIPPET, runner="torch", notes=notes)


def write_state_dict(job: ExportJob, folder: Path) -> Written:
    """Weights + architecture.json + architecture.py (plain PyTorch), loadable with torch alone."""
    _refuse_unsupported(job)
    try:
        code = generate_architecture_code(job.model)
    except NotExportableError as fx_error:
        return _write_by_import_path(job, folder, fx_error)
    rebuilt = instantiate(code)
    try:
        rebuilt.load_state_dict(code.state, strict=True)
    except (RuntimeError, KeyError) as e:
        raise ExportError(
            f"the generated architecture does not take the model's weights: {e}",
            "use --format torchscript; please report this with the artifact sha256",
        ) from e
    class_path = _class_path(job.model)
    fit = _kwargs_fit(job.architecture, class_path, instantiate(code, quantize=False))
    notes = []
    if code.needs_quantization:
        weights = QUANTIZED_STATE_FILE
        torch.save(code.state, folder / weights)
        notes.append(
            f"{len(code.quantized_layers)} torch.ao dynamic INT8 Linear layers: their packed weights are saved with "
            f"torch.save ({weights}, loads with weights_only=True) and only fit after architecture.quantize(model), "
            "the quantization recipe"
        )
    else:
        weights = SAFETENSORS_FILE
        _save_safetensors(code.state, folder / weights)
    if fit is False:
        notes.append(
            f"the {job.architecture.source if job.architecture else 'known'} kwargs build different layer shapes than "
            "these weights (e.g. after structured pruning): load them into architecture.py's class"
        )
    (folder / ARCHITECTURE_PY).write_text(code.source)
    arch = _architecture_json(job, code, weights, fit, class_path)
    (folder / ARCHITECTURE_JSON).write_text(json.dumps(arch, indent=2) + "\n")
    return Written(_fx_snippet(code, weights), runner="torch", notes=notes)
