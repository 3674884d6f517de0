"""ONNX export for ONNX Runtime: an ONNX artifact (QDQ or dynamic INT8 included) is copied with its external data;
a torch module is exported by robopt.tools.onnx_export (the TorchScript-based exporter, then the dynamo exporter if
that fails). This module keeps what is specific to the export command: the file name, refusals and notes."""

from __future__ import annotations

import shutil
from pathlib import Path

from robopt.export.errors import NotExportableError
from robopt.export.hf_call import PrimaryOutput
from robopt.export.job import ExportJob, Written
from robopt.export.quantization import TORCH_AO, UNQUANTIZED_PARENT_HINT, is_hf_model
from robopt.memory.artifacts import MANIFEST
from robopt.tools.onnx_export import EXPORTER_LABELS, MIN_OPSET, OnnxExport, OnnxExportFailed, export_onnx

MODEL_FILE = "model.onnx"
_INT_TYPES = {2, 3, 5, 6, 7, 12, 13}  # onnx.TensorProto UINT8, INT8, INT16, INT32, INT64, UINT32, UINT64


def snippet(input_names: list[str]) -> str:
    return (
        "import onnxruntime as ort\n\n"
        f'session = ort.InferenceSession(f"{{folder}}/{MODEL_FILE}", providers=["CPUExecutionProvider"])\n'
        f"# outputs = session.run(None, {{{', '.join(f'{n!r}: ...' for n in input_names)}}})  # numpy arrays\n"
    )


def _copy_onnx_artifact(job: ExportJob, folder: Path) -> Written:
    """The artifact directory holds model.onnx and, for large models, model.onnx.data: copy them all."""
    source = Path(job.ref.path).parent
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            target = folder / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)  # copyfile: the store's read-only mode bits stay behind
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return Written(snippet(names), runner="onnx", notes=["the ONNX artifact was copied unchanged"])


def _refuse_unsupported(job: ExportJob) -> None:
    if job.ref.format == "torchscript":
        return
    if TORCH_AO in job.census.libraries:
        raise NotExportableError(
            "not exportable as ONNX: torch.onnx has no ONNX form for torch.ao dynamic INT8 layers "
            "(quantized::linear_dynamic)",
            "export the unquantized parent artifact as onnx and quantize it with robopt's onnx_dynamic_int8 "
            "technique (ONNX Runtime INT8), or use --format torchscript",
        )


def _dequantized_note(job: ExportJob, path: Path) -> str | None:
    """torch.onnx bakes torchao's quantized weights as float: say so, the file is not smaller than fp32."""
    if not job.census.quantized:
        return None
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(init.data_type in _INT_TYPES and len(init.dims) >= 2 for init in model.graph.initializer):
        return None
    return (
        f"the weights quantized by {', '.join(job.census.libraries)} were exported dequantized (float "
        "initializers): this ONNX model is not smaller than the fp32 one; quantize it with ONNX Runtime instead"
    )


def _notes(job: ExportJob, export: OnnxExport, hf: bool) -> list[str]:
    notes = [f"exported with torch.onnx ({EXPORTER_LABELS[export.used]} exporter), opset {export.opset}"]
    notes += [f"the {failure.replace(' exporter:', ' exporter failed first:', 1)}" for failure in export.failures]
    if export.used == "torchscript":
        notes.append("the batch dimension is dynamic; other dimensions are fixed at the traced shapes")
    else:
        dynamic = [f"{name} {dims}" for name, dims in export.dynamic_axes.items() if dims]
        notes.append(f"dynamic axes where the model allows them: {', '.join(dynamic) or 'none'}")
    if hf:
        notes.append("Hugging Face model exported without KV cache; the graph returns only its primary output")
    if (note := _dequantized_note(job, export.path)) is not None:
        notes.append(note)
    return notes


def write_onnx(job: ExportJob, folder: Path) -> Written:
    """Copy an ONNX artifact, or export the torch module (HF models: their primary output) with opset >= 17."""
    if job.opset < MIN_OPSET:
        raise NotExportableError(f"ONNX opset {job.opset} is too old", f"use opset {MIN_OPSET} or newer")
    if job.ref.format == "onnx":
        return _copy_onnx_artifact(job, folder)
    _refuse_unsupported(job)
    hf = is_hf_model(job.model)
    module = PrimaryOutput(job.model, job.input_names) if hf else job.model
    try:
        export = export_onnx(
            module,
            job.trace_inputs,
            folder / MODEL_FILE,
            input_names=job.input_names,
            exporters=("torchscript", "dynamo"),
            opset=job.opset,
        )
    except OnnxExportFailed as e:
        raise NotExportableError(
            f"not exportable as ONNX: {'; '.join(e.failures)}",
            UNQUANTIZED_PARENT_HINT if job.census.quantized else "use --format torchscript" + (" or hf" if hf else ""),
        ) from e
    return Written(
        snippet(job.input_names), runner="onnx", compare="first" if hf else "all", notes=_notes(job, export, hf)
    )
