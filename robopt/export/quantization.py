"""Which quantization libraries a model's layers and weights come from: each export format can hold only some."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Top-level packages whose layers or tensor subclasses mean "quantized by that library".
_LIBRARIES = (
    "torchao",
    "bitsandbytes",
    "hqq",
    "auto_round",
    "auto_gptq",
    "gptqmodel",
    "awq",
    "optimum",
    "compressed_tensors",
    "nncf",
)
TORCH_AO = "torch.ao"
_TORCH_AO_PREFIXES = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


@dataclass
class QuantizationCensus:
    """Library -> names of the layers (or weights) it quantized; `hf_quantizer` when transformers manages it."""

    libraries: dict[str, list[str]] = field(default_factory=dict)
    hf_quantizer: str | None = None

    @property
    def quantized(self) -> bool:
        return bool(self.libraries)

    def describe(self) -> str:
        parts = [f"{lib} ({len(names)} layers, e.g. {names[0]})" for lib, names in self.libraries.items()]
        return ", ".join(parts) or "none"


def _library_of(cls: type) -> str | None:
    module = cls.__module__ or ""
    if module.startswith(_TORCH_AO_PREFIXES):
        return TORCH_AO
    top = module.split(".")[0]
    return top if top in _LIBRARIES else None


def quantization_census(model: nn.Module) -> QuantizationCensus:
    """Scan layer classes and weight tensor types (torchao keeps nn.Linear but swaps the weight's class)."""
    census = QuantizationCensus()
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        census.hf_quantizer = type(quantizer).__name__
    for name, module in model.named_modules():
        library = _library_of(type(module))
        if library is not None:
            census.libraries.setdefault(library, []).append(name or "<root>")
            continue
        for pname, param in module.named_parameters(recurse=False):
            if type(param) in (nn.Parameter, torch.Tensor) and type(param.data) is torch.Tensor:
                continue
            library = _library_of(type(param)) or _library_of(type(param.data)) or type(param).__module__.split(".")[0]
            census.libraries.setdefault(library, []).append(f"{name}.{pname}" if name else pname)
    return census


UNQUANTIZED_PARENT_HINT = (
    "export the unquantized parent artifact (`robopt history SESSION` lists it) and quantize on the target, or "
    "use a technique whose output exports: quantize_dynamic_int8 (torchscript, state-dict) or onnx_dynamic_int8 (onnx)"
)


def is_hf_model(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (checked without importing transformers when it is not loaded)."""
    import sys

    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)
