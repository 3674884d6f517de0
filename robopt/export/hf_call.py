"""Hugging Face models behind a positional, tensor-only call: what tracers (TorchScript, ONNX) need to record them."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from robopt.tools.outputs import first_tensor


class PrimaryOutput(nn.Module):
    """Calls a transformers model with keyword inputs (no KV cache) and returns its primary tensor (logits or
    last hidden state). Traced graphs store their own code, so loading them does not need this class."""

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.no_cache = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        if self.no_cache:
            kwargs["use_cache"] = False
        return first_tensor(self.model(**kwargs))
