"""Export a torch model to ONNX with torch.onnx: the one exporter behind the static INT8 techniques and
`robopt export --format onnx`.

Two torch exporters, tried in the order the caller gives (the next runs only when the one before failed):
- "dynamo" (torch.export based, opset 18+): the batch axis of every input, and the sequence axis of 2-D integer
  inputs (token ids), are exported as dynamic (`Dim.AUTO`: dynamic where the model allows it, fixed where its code
  pins the size), so the file serves batched evaluation and sentences of any length.
- "torchscript" (the legacy, tracing exporter; any opset from 17): the batch axis of inputs and outputs is dynamic,
  other axes are fixed at the traced shapes. It is deprecated and fails on transformers 5 models, but it is the only
  one that exports TorchScript modules, and it writes opset 17 graphs for older runtimes.

Weights are stored inline below ~1.8 GB, else in `path.data`. The exporters print progress on stdout and, on
failure, dump their IR graph to stderr from C++: both are silenced, the raised error says what failed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.tools.outputs import iter_tensors

Exporter = Literal["dynamo", "torchscript"]
EXPORTER_LABELS: dict[str, str] = {"dynamo": "dynamo", "torchscript": "TorchScript-based"}
MIN_OPSET = 17
DYNAMO_MIN_OPSET = 18
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot hold a single message above 2 GB
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class OnnxExport:
    """The written file, what the exporter was asked for, and which exporter wrote it."""

    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    exporter: str = ""  # torch version and call, for the record
    used: Exporter = "dynamo"
    failures: list[str] = field(default_factory=list)  # "<exporter> exporter: <error>" of those tried before


class OnnxExportFailed(TechniqueFailedError):
    """Every exporter asked for failed; `failures` holds each one's reason."""

    def __init__(self, message: str, hint: str, failures: list[str]) -> None:
        super().__init__(message, hint)
        self.failures = failures


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    exporters: Sequence[Exporter] = ("dynamo",),
    opset: int | None = None,
) -> OnnxExport:
    """Write `model`, traced on `example_inputs`, as ONNX (opset >= 17) to `path`, trying `exporters` in order.

    `opset`: the torchscript exporter's opset (default 17); the dynamo exporter uses max(opset, 18), or its own
    default when None. Raises TechniqueNotApplicableError for models no requested exporter can take (ONNX-backed
    modules; TorchScript modules without the torchscript exporter) and OnnxExportFailed, with every exporter's
    reason, when all of them fail.
    """
    from robopt.tools.onnx_module import OnnxModule

    if isinstance(model, OnnxModule) or (isinstance(model, torch.jit.ScriptModule) and "torchscript" not in exporters):
        raise TechniqueNotApplicableError(
            f"cannot export a {type(model).__name__} to ONNX with torch.export",
            "pass the eager PyTorch model (pickle, safetensors or HF folder), or the ONNX file itself",
        )
    if isinstance(model, torch.jit.ScriptModule):
        exporters = ("torchscript",)  # torch.export cannot read TorchScript
    inputs = tuple(example_inputs)
    names = list(input_names) if input_names and len(input_names) == len(inputs) else _default_names(len(inputs))
    path = Path(path)
    model.eval()
    _disable_kv_cache(model)
    with torch.no_grad():
        outputs = _output_names(model(*inputs))
    failures: list[str] = []
    for exporter in exporters:
        try:
            with torch.no_grad(), _silenced_output(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    dynamic = _export_dynamo(model, inputs, path, names, outputs, opset)
                else:
                    dynamic = _export_torchscript(model, inputs, path, names, outputs, opset)
            break
        except Exception as e:  # both exporters raise many error types on unsupported ops; each is reported
            failures.append(f"{EXPORTER_LABELS[exporter]} exporter: {type(e).__name__}: {_first_line(e)}")
            for leftover in path.parent.glob(f"{path.name}*"):
                leftover.unlink()
    else:
        raise OnnxExportFailed(
            f"torch.onnx.export could not export {type(model).__name__}: {'; '.join(failures)}",
            "export the model to ONNX yourself (opset >= 17, dynamic batch axis) and give robopt the .onnx file",
            failures,
        )
    written_opset, graph_outputs = _graph_signature(path)
    if written_opset < MIN_OPSET:  # torch's exporters write what they are asked; guard against an older torch
        raise TechniqueFailedError(f"the exported graph has opset {written_opset}, below {MIN_OPSET}", "upgrade torch")
    return OnnxExport(
        path=path,
        opset=written_opset,
        input_names=names,
        output_names=graph_outputs,
        dynamic_axes=dynamic,
        exporter=f"torch {torch.__version__} torch.onnx.export(dynamo={exporter == 'dynamo'})",
        used=exporter,
        failures=failures,
    )


def _export_dynamo(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    names: list[str],
    outputs: list[str],
    opset: int | None,
) -> dict[str, list[int]]:
    dynamic = {name: _dynamic_dims(x) for name, x in zip(names, inputs, strict=True)}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.onnx.export(
        model,
        inputs,
        str(path),
        dynamo=True,
        input_names=names,
        output_names=outputs or None,
        opset_version=max(opset, DYNAMO_MIN_OPSET) if opset is not None else None,
        dynamic_shapes=tuple(dict.fromkeys(dims, torch.export.Dim.AUTO) for dims in dynamic.values()),
        external_data=param_bytes > _EXTERNAL_DATA_BYTES,
        optimize=True,
        verbose=False,
    )
    return dynamic


def _export_torchscript(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    names: list[str],
    outputs: list[str],
    opset: int | None,
) -> dict[str, list[int]]:
    batched = [name for name, x in zip(names, inputs, strict=True) if x.ndim > 0]
    dynamic = {name: [0] for name in [*batched, *outputs]}
    torch.onnx.export(
        model,
        inputs,
        str(path),
        dynamo=False,
        input_names=names,
        output_names=outputs or None,
        opset_version=opset or MIN_OPSET,
        dynamic_axes={name: {0: "batch"} for name in dynamic},
    )
    return {name: dims for name, dims in dynamic.items() if name in names}


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


def _default_names(count: int) -> list[str]:
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _dynamic_dims(x: torch.Tensor) -> list[int]:
    """Batch always; the sequence axis too for [batch, tokens] integer inputs."""
    if x.ndim == 0:
        return []
    if x.ndim == 2 and not x.dtype.is_floating_point and x.dtype != torch.bool:
        return [0, 1]
    return [0]


def _disable_kv_cache(model: nn.Module) -> None:
    """HF decoders would return a KV cache object the exporter cannot flatten; a single forward does not need it."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False


def _output_names(output: Any) -> list[str]:
    """Names for the graph outputs: the keys of a dict/ModelOutput of tensors, else output / output_i over every
    tensor (depth first, as the exporters flatten them)."""
    if isinstance(output, Mapping):
        items = [(str(k), v) for k, v in output.items() if v is not None]
        if items and all(isinstance(v, torch.Tensor) for _, v in items):
            return [k for k, _ in items]
    count = len(list(iter_tensors(output)))
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _graph_signature(path: Path) -> tuple[int, list[str]]:
    """(default-domain opset, output names) of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return opset, [o.name for o in model.graph.output]


def _first_line(error: BaseException) -> str:
    text = _ANSI.sub("", str(error)).strip()
    return text.splitlines()[0][:400] if text else type(error).__name__
