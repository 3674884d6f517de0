"""ONNX export for ONNX Runtime: an ONNX artifact (QDQ or dynamic INT8 included) is copied with its external data;
a torch module is exported with torch.onnx (the TorchScript-based exporter, then the dynamo exporter if that fails)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from robopt.export.errors import NotExportableError
from robopt.export.hf_call import PrimaryOutput
from robopt.export.job import ExportJob, Written
from robopt.export.quantization import TORCH_AO, UNQUANTIZED_PARENT_HINT, is_hf_model
from robopt.memory.artifacts import MANIFEST
from robopt.tools.outputs import iter_tensors

MODEL_FILE = "model.onnx"
MIN_OPSET = 17
DYNAMO_MIN_OPSET = 18
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
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


def _export(module: torch.nn.Module, job: ExportJob, path: Path, dynamo: bool, n_outputs: int) -> None:
    names = job.input_names
    outputs = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]
    kwargs: dict[str, object] = {"input_names": names, "output_names": outputs}
    if dynamo:
        kwargs["opset_version"] = max(job.opset, DYNAMO_MIN_OPSET)
    else:
        kwargs["opset_version"] = job.opset
        batch = {0: "batch"}
        batched = [n for n, t in zip(names, job.trace_inputs, strict=True) if t.dim() > 0]
        kwargs["dynamic_axes"] = dict.fromkeys([*batched, *outputs], batch)
    with torch.no_grad(), _silenced_output(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, job.trace_inputs, str(path), dynamo=dynamo, **kwargs)


@contextlib.contextmanager
def _silenced_output() -> Iterator[None]:
    """The exporters print progress on stdout (the CLI's --json channel) and, on failure, dump the whole IR graph
    to stderr from C++ (torch 2.13 enables its ONNX log unconditionally): the error we raise says what failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()):
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


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


def write_onnx(job: ExportJob, folder: Path) -> Written:
    """Copy an ONNX artifact, or export the torch module (HF models: their primary output) with opset >= 17."""
    if job.opset < MIN_OPSET:
        raise NotExportableError(f"ONNX opset {job.opset} is too old", f"use opset {MIN_OPSET} or newer")
    if job.ref.format == "onnx":
        return _copy_onnx_artifact(job, folder)
    _refuse_unsupported(job)
    hf = is_hf_model(job.model)
    module = PrimaryOutput(job.model, job.input_names) if hf else job.model
    with torch.no_grad():
        n_outputs = len(list(iter_tensors(module(*job.trace_inputs))))
    path = folder / MODEL_FILE
    errors = []
    for dynamo in (False, True):
        try:
            _export(module, job, path, dynamo, n_outputs)
            break
        except Exception as e:  # both exporters raise many types on unsupported ops; each is reported
            exporter = "dynamo" if dynamo else "TorchScript-based"
            message = _ANSI.sub("", str(e)).strip().split("\n")[0]
            errors.append(f"{exporter} exporter: {type(e).__name__}: {message}")
            for leftover in folder.glob(f"{MODEL_FILE}*"):
                leftover.unlink()
    else:
        raise NotExportableError(
            f"not exportable as ONNX: {'; '.join(errors)}",
            UNQUANTIZED_PARENT_HINT if job.census.quantized else "use --format torchscript" + (" or hf" if hf else ""),
        )
    notes = [
        f"exported with torch.onnx ({'dynamo' if dynamo else 'TorchScript-based'} exporter), opset "
        f"{max(job.opset, DYNAMO_MIN_OPSET) if dynamo else job.opset}"
    ]
    if errors:
        notes.append(f"the TorchScript-based exporter failed first: {errors[0]}")
    if not dynamo:
        notes.append("the batch dimension is dynamic; other dimensions are fixed at the traced shapes")
    if hf:
        notes.append("Hugging Face model exported without KV cache; the graph returns only its primary output")
    if (note := _dequantized_note(job, path)) is not None:
        notes.append(note)
    return Written(snippet(job.input_names), runner="onnx", compare="first" if hf else "all", notes=notes)
