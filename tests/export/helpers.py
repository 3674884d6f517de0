"""Test helpers: artifacts made by robopt's own techniques, and loading an export in a process without robopt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.domain.records import ArtifactRef, InputSpec
from robopt.memory.artifacts import ArtifactStore
from robopt.tools.registry import ApplyContext, TechniqueResult, get_technique

# The same guard robopt's verification uses, written independently: the test must not trust the code it checks.
_BLOCK_ROBOPT = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "robopt" or name.startswith("robopt."):
            raise ImportError("robopt must not be needed to load an export")
sys.meta_path.insert(0, _Block())
"""


def minimal_analysis(model: nn.Module) -> AnalysisReport:
    params = sum(p.numel() for p in model.parameters())
    return AnalysisReport(
        format="torch-pickle",
        source="test",
        param_count=params,
        size_on_disk_bytes=4 * params,
        size_in_memory_bytes=4 * params,
    )


def apply_technique(
    name: str,
    model: nn.Module,
    example: tuple[torch.Tensor, ...],
    workdir: Path | None = None,
    analysis: AnalysisReport | None = None,
) -> TechniqueResult:
    """Run one of robopt's registered techniques with its default config."""
    technique = get_technique(name)
    context = ApplyContext(analysis=analysis or minimal_analysis(model), example_inputs=example, workdir=workdir)
    return technique.apply(model, technique.default_config(), context)


def store_module(
    store: ArtifactStore, model: nn.Module, spec: InputSpec, technique: str | None = None, parent: str | None = None
) -> ArtifactRef:
    return store.put_module(model, input_spec=spec, technique=technique, parent=parent)


def robopt_outputs(store: ArtifactStore, ref: ArtifactRef, *inputs: torch.Tensor) -> torch.Tensor:
    """The artifact's primary output as robopt loads and runs it."""
    from robopt.tools.outputs import first_tensor

    with torch.no_grad():
        return first_tensor(store.load(ref)(*inputs))


def run_without_robopt(snippet: str, program: str, inputs: dict[str, np.ndarray], workdir: Path) -> np.ndarray:
    """Run a load snippet plus `program` (which sets `result`) in a fresh Python that cannot import robopt."""
    np.savez(workdir / "test_inputs.npz", **inputs)
    script = (
        _BLOCK_ROBOPT
        + "import numpy as np\n"
        + f"data = dict(np.load({str(workdir / 'test_inputs.npz')!r}))\n"
        + snippet
        + "\n"
        + program
        + f"\nnp.save({str(workdir / 'test_result.npy')!r}, np.asarray(result, dtype=np.float32))\n"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(workdir / "test_result.npy")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
