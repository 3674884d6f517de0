"""Helpers shared by the compression techniques: layer shares from an AnalysisReport, head detection, guards."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueNotApplicableError
from robopt.tools.registry import Applicability

# Formats that load as an eager nn.Module the techniques can rewrite (TorchScript/ONNX/TF cannot be).
EAGER_FORMATS = frozenset({"torch-pickle", "torch-module", "safetensors", "hf-folder"})

LINEAR_TYPES = ("Linear",)
CONV_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")
RNN_TYPES = ("LSTM", "GRU")

# Substrings (lower case) of layer class names that mark an already quantized layer: torch.ao
# (DynamicQuantizedLinear, QuantizedConv2d), bitsandbytes (Linear4bit, Linear8bitLt), quanto (QLinear),
# GPTQ/AWQ (QuantLinear, WQLinear_GEMM), HQQ (HQQLinear), ONNX integer ops.
_QUANTIZED_MARKERS = (
    "quantized",
    "4bit",
    "8bit",
    "qlinear",
    "quantlinear",
    "hqq",
    "int8",
    "int4",
    "nf4",
    "fp4",
    "integer",
    "dequantize",
)
_QUANTIZED_MODULE_PREFIXES = (
    "torch.ao.nn.quantized",
    "torch.ao.nn.intrinsic.quantized",
    "torch.nn.quantized",
    "bitsandbytes",
    "torchao",
    "optimum.quanto",
    "hqq",
    "auto_gptq",
    "gptqmodel",
    "awq",
)
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def params_of(analysis: AnalysisReport, layer_types: Iterable[str]) -> int:
    """Parameters held by leaf layers of the given class names."""
    return sum(analysis.params_by_layer_type.get(t, 0) for t in layer_types)


def linear_params(analysis: AnalysisReport) -> int:
    return params_of(analysis, LINEAR_TYPES)


def conv_params(analysis: AnalysisReport) -> int:
    return params_of(analysis, CONV_TYPES)


def share_of_params(analysis: AnalysisReport, params: int) -> float:
    return min(1.0, params / analysis.param_count) if analysis.param_count > 0 else 0.0


def memory_bytes(analysis: AnalysisReport) -> int:
    """Bytes of parameters and buffers; falls back to 4 bytes per parameter when not measured."""
    if analysis.size_in_memory_bytes > 0:
        return analysis.size_in_memory_bytes
    return max(4 * analysis.param_count, 1)


def bytes_per_param(analysis: AnalysisReport) -> float:
    """Average stored bytes per parameter (about 4 for fp32 models, 2 for fp16), clamped to [1, 8]."""
    if analysis.param_count <= 0:
        return 4.0
    return min(8.0, max(1.0, memory_bytes(analysis) / analysis.param_count))


INT8_BYTES_PER_PARAM = 1.05  # the int8 weight plus its share of scales, zero points and fp32 bias


def size_ratio_after(analysis: AnalysisReport, params: int, stored_bytes_per_param: float) -> float:
    """Expected size after / before when `params` weights get `stored_bytes_per_param` and the rest is kept."""
    before = memory_bytes(analysis)
    after = before - params * (bytes_per_param(analysis) - stored_bytes_per_param)
    return max(after, 1.0) / before


def amdahl_speedup(share: float, layer_speedup: float) -> float:
    """Whole-model speedup when a `share` of the work runs `layer_speedup` times faster."""
    return 1.0 / ((1.0 - share) + share / layer_speedup)


def quantized_layer_types(analysis: AnalysisReport) -> list[str]:
    """Census entries that look like already quantized layers."""
    return sorted(t for t in analysis.layer_census if any(m in t.lower() for m in _QUANTIZED_MARKERS))


def not_eager_reason(analysis: AnalysisReport) -> str | None:
    if analysis.format in EAGER_FORMATS:
        return None
    return (
        f"the model is in {analysis.format!r} format; this technique rewrites an eager PyTorch nn.Module "
        f"(formats: {', '.join(sorted(EAGER_FORMATS))})"
    )


def already_quantized_reason(analysis: AnalysisReport) -> str | None:
    found = quantized_layer_types(analysis)
    return f"the model is already quantized (layers: {', '.join(found)})" if found else None


def linear_quantization_applicability(analysis: AnalysisReport) -> Applicability:
    """The shared rule of the Linear quantizers: an eager, not yet quantized model with Linear weights."""
    reason = not_eager_reason(analysis) or already_quantized_reason(analysis)
    if reason:
        return Applicability(False, reason)
    if linear_params(analysis) <= 0:
        return Applicability(False, "the model has no Linear parameters to quantize")
    return Applicability(True)


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of submodules that are quantized (by their library or by a non-float/tensor-subclass weight)."""
    names = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith(_QUANTIZED_MODULE_PREFIXES):
            names.append(name or cls.__name__)
            continue
        for p in module.parameters(recurse=False):
            if type(p) not in _PLAIN_TENSOR_TYPES or not p.dtype.is_floating_point:
                names.append(name or cls.__name__)
                break
    return names


def require_eager_float_module(model: nn.Module, technique: str) -> None:
    """Raise TechniqueNotApplicableError for TorchScript/ONNX models or ones that are already quantized."""
    from robopt.tools.onnx_module import OnnxModule

    if isinstance(model, (torch.jit.ScriptModule, OnnxModule)):
        raise TechniqueNotApplicableError(
            f"{technique} needs an eager nn.Module, got {type(model).__name__}",
            "load the model from its PyTorch source (pickle, safetensors or HF folder) instead of TorchScript/ONNX",
        )
    quantized = quantized_modules(model)
    if quantized:
        raise TechniqueNotApplicableError(
            f"{technique} needs a float model, but these layers are already quantized: {', '.join(quantized[:5])}",
            "apply it to the float model before quantizing",
        )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weighted_layers(model: nn.Module, kinds: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule of the given kinds that owns a `weight` parameter, in registration order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, kinds) and isinstance(getattr(m, "weight", None), nn.Parameter)
    ]


def flatten_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output: tensors, tuples/lists, dicts and HF ModelOutputs."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_tensors(v)]
    return []


def output_shapes(model: nn.Module, example_inputs: tuple[Any, ...]) -> list[list[int]]:
    with torch.no_grad():
        return [list(t.shape) for t in flatten_tensors(model(*example_inputs))]


def find_head_layers(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None = None,
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd),
) -> list[nn.Module]:
    """The layers that produce the model's outputs (classifier / action head).

    With example inputs: the layers whose output tensor is returned by the model as is, plus the last
    layer to run when some output comes out of an activation instead (e.g. tanh on actions). Without:
    the last layer of `kinds` in registration order.
    """
    layers = weighted_layers(model, kinds)
    if not layers:
        return []
    if example_inputs is None:
        return [layers[-1][1]]
    ran: list[tuple[nn.Module, torch.Tensor]] = []

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            ran.append((module, output))

    hooks = [m.register_forward_hook(record) for _, m in layers]
    try:
        with torch.no_grad():
            outputs = flatten_tensors(model(*example_inputs))
    finally:
        for h in hooks:
            h.remove()
    heads: list[nn.Module] = []
    unmatched = False
    for out in outputs:
        producers = [m for m, t in ran if t is out]
        if producers:
            heads.extend(m for m in producers if all(m is not h for h in heads))
        else:
            unmatched = True
    if (unmatched or not heads) and ran and all(ran[-1][0] is not h for h in heads):
        heads.append(ran[-1][0])
    return heads or [layers[-1][1]]
