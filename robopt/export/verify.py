"""Load an export in a fresh Python process that cannot import robopt, run it, and compare with the artifact's outputs.

The child runs exactly the load snippet the user is given, with robopt blocked on the import path, so an export
that silently depends on robopt (a pickled robopt class, an import in generated code) fails here and not later.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from robopt.export.errors import ExportError, ExportVerificationError
from robopt.export.result import EXPECTED_FILE, INPUTS_FILE, MANIFEST_FILE, VERIFY_DIR, ExportManifest
from robopt.tools.outputs import iter_tensors

TIMEOUT_S = 900
_REASON_CHARS = 600

_PRELUDE = '''
import sys, json
class _NoRobopt:
    """Blocks robopt on the import path: the export must load with torch/transformers/onnxruntime only."""
    def find_spec(self, name, path=None, target=None):
        if name == "robopt" or name.startswith("robopt."):
            raise ImportError(f"{name} is blocked: an export must load without robopt")
        return None
sys.meta_path.insert(0, _NoRobopt())
folder, spec, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
import numpy as np
_arrays = np.load(f"{folder}/verification/inputs.npz")
inputs = [_arrays[f"input_{i}"] for i in range(len(spec["input_names"]))]
'''

_TORCH_INPUTS = """
import torch
def _flat(o):
    if isinstance(o, torch.Tensor):
        yield o
    elif isinstance(o, dict):
        for v in o.values():
            yield from _flat(v)
    elif isinstance(o, (tuple, list)):
        for v in o:
            yield from _flat(v)
_dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
tensors = [torch.from_numpy(a).to(_dtypes[d]) for a, d in zip(inputs, spec["input_dtypes"])]
"""

_RUNNERS = {
    "torch": _TORCH_INPUTS + "with torch.no_grad():\n    raw = model(*tensors)\n",
    "hf": _TORCH_INPUTS + "with torch.no_grad():\n    raw = model(**dict(zip(spec['input_names'], tensors)))\n",
    "onnx": "raw = session.run(None, dict(zip([i.name for i in session.get_inputs()], inputs)))\n",
}

_COLLECT = {
    "torch": "outputs = [t.detach().float().numpy() for t in _flat(raw)]\n",
    "hf": "outputs = [t.detach().float().numpy() for t in _flat(raw)]\n",
    "onnx": "outputs = [np.asarray(o, dtype=np.float32) for o in raw]\n",
}

_EPILOGUE = """
leaked = sorted(m for m in sys.modules if m == "robopt" or m.startswith("robopt."))
assert not leaked, f"robopt modules were imported: {leaked}"
np.savez(out_path, *outputs)
"""


def child_script(runner: str, snippet_body: str) -> str:
    """The program the fresh process runs: block robopt, read inputs, the user's load snippet, run, save."""
    return _PRELUDE + snippet_body + "\n" + _RUNNERS[runner] + _COLLECT[runner] + _EPILOGUE


def output_arrays(output: object) -> list[np.ndarray]:
    """Every tensor of a model output (depth first), as float32 numpy arrays."""
    return [t.detach().float().cpu().numpy() for t in iter_tensors(output)]


def save_verification_data(folder: Path, inputs: tuple[torch.Tensor, ...], expected: list[np.ndarray]) -> None:
    """inputs.npz and expected_outputs.npz: what the artifact gave robopt, for this check and for the user's own."""
    (folder / VERIFY_DIR).mkdir(exist_ok=True)
    arrays = {f"input_{i}": (t.float() if t.dtype == torch.bfloat16 else t).numpy() for i, t in enumerate(inputs)}
    np.savez(folder / INPUTS_FILE, **arrays)
    np.savez(folder / EXPECTED_FILE, *expected)


def _run_child(folder: Path, manifest: ExportManifest, out_path: Path) -> None:
    spec = manifest.verification
    script = child_script(spec.runner, manifest.load_snippet)
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env = {**os.environ, **offline, "PYTHONDONTWRITEBYTECODE": "1"}  # no __pycache__ in the export
    try:
        proc = subprocess.run(
            [sys.executable, "-B", "-c", script, str(folder), spec.model_dump_json(), str(out_path)],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        raise ExportVerificationError(
            f"loading and running the {manifest.format} export took longer than {TIMEOUT_S} s",
            "the model may be too large for this machine's memory; try another format",
        ) from e
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1][:_REASON_CHARS] if lines else f"exit code {proc.returncode}, no error output"
        raise ExportVerificationError(
            f"the {manifest.format} export does not load or run without robopt: {reason}",
            "the files are incomplete or depend on robopt; try another --format (torchscript and onnx carry "
            "their own graph)",
        )


def compare_outputs(expected: list[np.ndarray], actual: list[np.ndarray], manifest: ExportManifest) -> float:
    """Max |actual - expected| over the compared outputs; raises ExportVerificationError when off or too far."""
    spec = manifest.verification
    if spec.compare == "first":
        expected, actual = expected[:1], actual[:1]
    if len(expected) != len(actual) or not expected:
        raise ExportVerificationError(
            f"the {manifest.format} export returns {len(actual)} output tensors, the artifact {len(expected)}",
            "the export changed the model's outputs: report this with the artifact sha256",
        )
    worst, scale = 0.0, 1.0
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        if e.shape != a.shape:
            raise ExportVerificationError(
                f"output {i} of the {manifest.format} export has shape {list(a.shape)}, the artifact's {list(e.shape)}",
                "the export changed the model's outputs: report this with the artifact sha256",
            )
        if not np.isfinite(a).all() and np.isfinite(e).all():
            raise ExportVerificationError(f"output {i} of the {manifest.format} export holds NaN or inf values")
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64)), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(e), initial=0.0)))
    if worst > spec.tolerance * scale:
        raise ExportVerificationError(
            f"the {manifest.format} export, loaded without robopt, differs from the artifact by up to {worst:.3g} "
            f"(allowed: {spec.tolerance:g} x {scale:.3g})",
            "the exported files do not reproduce the model robopt evaluated: do not deploy them; try another --format "
            "(a traced export can miss input-dependent control flow)",
        )
    return worst


def run_verification(folder: Path, manifest: ExportManifest) -> float:
    """Run the export in a fresh process without robopt on the stored inputs; the max abs diff to the artifact."""
    out_path = folder / VERIFY_DIR / ".actual_outputs.npz"
    try:
        _run_child(folder, manifest, out_path)
        with np.load(out_path) as got, np.load(folder / EXPECTED_FILE) as want:
            actual = [got[f"arr_{i}"] for i in range(len(got.files))]
            expected = [want[f"arr_{i}"] for i in range(len(want.files))]
    finally:
        out_path.unlink(missing_ok=True)
    return compare_outputs(expected, actual, manifest)


def verify_export(folder: str | Path) -> float:
    """Re-check an existing export folder (after copying it, or to detect tampering); returns the max abs diff."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ExportError(
            f"{folder} has no {MANIFEST_FILE}: it is not a robopt export folder", "export it with `robopt export`"
        )
    manifest = ExportManifest.model_validate(json.loads(manifest_path.read_text()))
    return run_verification(folder, manifest)
