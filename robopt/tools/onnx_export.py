"""Export an eager torch model to ONNX with torch's exporter (torch.export based, `dynamo=True`).

The batch axis of every input, and the sequence axis of 2-D integer inputs (token ids), are exported as dynamic
(`Dim.AUTO`: dynamic where the model allows it, fixed where its code pins the size), so the file serves batched
evaluation and sentences of any length. TorchScript's legacy exporter is not used: it is deprecated and fails on
transformers 5 models.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError

MIN_OPSET = 17
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot hold a single message above 2 GB
_NOISY_WARNINGS = ("isinstance(treespec, LeafSpec)", "torchvision is not installed")


@dataclass(frozen=True)
class OnnxExport:
    """The written file and what the exporter was asked for."""

    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    exporter: str = ""


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
) -> OnnxExport:
    """Write `model` as ONNX (opset >= 17) to `path`; weights inline below ~1.8 GB, else in `path.data`.

    Raises TechniqueNotApplicableError for models ONNX cannot represent here (TorchScript, ONNX-backed) and
    TechniqueFailedError, with the exporter's reason, when torch.onnx.export fails.
    """
    from robopt.tools.onnx_module import OnnxModule

    if isinstance(model, (torch.jit.ScriptModule, OnnxModule)):
        raise TechniqueNotApplicableError(
            f"cannot export a {type(model).__name__} to ONNX with torch.export",
            "pass the eager PyTorch model (pickle, safetensors or HF folder), or the ONNX file itself",
        )
    inputs = tuple(example_inputs)
    names = list(input_names) if input_names and len(input_names) == len(inputs) else _default_names(len(inputs))
    dynamic = {name: _dynamic_dims(x) for name, x in zip(names, inputs, strict=True)}
    path = Path(path)
    model.eval()
    _disable_kv_cache(model)
    with torch.no_grad():
        outputs = _output_names(model(*inputs))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        with warnings.catch_warnings():
            for message in _NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=f".*{re.escape(message)}")
            torch.onnx.export(
                model,
                inputs,
                str(path),
                dynamo=True,
                input_names=names,
                output_names=outputs or None,
                dynamic_shapes=tuple(dict.fromkeys(dims, torch.export.Dim.AUTO) for dims in dynamic.values()),
                external_data=param_bytes > _EXTERNAL_DATA_BYTES,
                optimize=True,
                verbose=False,
            )
    except Exception as e:  # torch.export/onnxscript raise many error types; the reason is passed on
        raise TechniqueFailedError(
            f"torch.onnx.export could not export {type(model).__name__}: {type(e).__name__}: {_first_line(e)}",
            "export the model to ONNX yourself (opset >= 17, dynamic batch axis) and give robopt the .onnx file",
        ) from e
    opset, graph_outputs = _graph_signature(path)
    if opset < MIN_OPSET:  # torch's exporter writes opset 18+; guard against an older torch
        raise TechniqueFailedError(f"the exported graph has opset {opset}, below {MIN_OPSET}", "upgrade torch")
    return OnnxExport(
        path=path,
        opset=opset,
        input_names=names,
        output_names=graph_outputs,
        dynamic_axes=dynamic,
        exporter=f"torch {torch.__version__} torch.onnx.export(dynamo=True)",
    )


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
    """Names for the graph outputs: the keys of a dict/ModelOutput, else output / output_i; [] when nested."""
    if isinstance(output, torch.Tensor):
        return ["output"]
    if isinstance(output, Mapping):
        items = [(str(k), v) for k, v in output.items() if v is not None]
        return [k for k, _ in items] if all(isinstance(v, torch.Tensor) for _, v in items) else []
    if isinstance(output, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in output):
        return [f"output_{i}" for i in range(len(output))]
    return []


def _graph_signature(path: Path) -> tuple[int, list[str]]:
    """(default-domain opset, output names) of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return opset, [o.name for o in model.graph.output]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:400] if text else type(error).__name__
