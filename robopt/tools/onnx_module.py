"""An ONNX Runtime session behind the nn.Module call interface, so evaluators treat all models alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class OnnxModule(nn.Module):
    """Runs `path` with onnxruntime's CPU provider; takes and returns torch tensors."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        self.path = str(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        arrays = (np.ascontiguousarray(x.detach().cpu().numpy()) for x in inputs)
        feeds = dict(zip(self.input_names, arrays, strict=True))
        outputs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
