"""What a calibration set is, as techniques see it.

A technique that calibrates calls `context.calibration(n)` (robopt.tools.registry.ApplyContext) and gets a
CalibrationSet; None there means the caller has no data, and the technique raises TechniqueNotApplicableError.
Recording what was used: the optimize node adds every set a technique drew ({samples, source, fingerprint,
cached}) to the step's `details["calibration"]`; a technique that wants to say more (e.g. which of two sets fed
which stage) puts its own `details["calibration"]`, which is then kept as it is. Sets come from
robopt.calibration.providers.calibration_source (by model type, or the user's --calibration FILE).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CalibrationSet:
    """Inputs for calibrating a model: each sample is one model call's positional inputs (batch 1), in the
    order and dtypes of the model's InputSpec. `source` says where they came from (printed in reports);
    `fingerprint` is a sha256 over the tensors, so the same set always has the same fingerprint."""

    samples: tuple[tuple[torch.Tensor, ...], ...]
    source: str

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for sample in self.samples:
            for tensor in sample:
                t = tensor.detach().contiguous().cpu()
                digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
                digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.samples)


CalibrationSource = Callable[[int], CalibrationSet]
"""`source(n)` -> a calibration set of (up to) n samples, deterministic for the run's seed."""
