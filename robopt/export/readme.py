"""README.md of an export folder: what it is, how to load it without robopt, how it was checked."""

from __future__ import annotations

from robopt.export.result import EXPECTED_FILE, INPUTS_FILE, MANIFEST_FILE, ExportManifest

_FILE_NOTES = {
    "model.ts": "TorchScript archive (graph + weights); `torch.jit.load` needs no Python class",
    "model.safetensors": "the weights (state dict) in safetensors format",
    "model_state.pt": "the INT8 state dict (torch.save; load with weights_only=True after architecture.quantize)",
    "architecture.py": "the architecture as plain PyTorch code (generated with torch.fx)",
    "architecture.json": "original class import path, its constructor kwargs when known, and the quantization recipe",
    "model.onnx": "the ONNX graph for ONNX Runtime",
    "model.onnx.data": "the ONNX graph's external weights (keep beside model.onnx)",
    "config.json": "Hugging Face model config (with quantization_config when quantized through transformers)",
    INPUTS_FILE: "the inputs robopt used to check this export",
    EXPECTED_FILE: "the outputs of the robopt artifact on those inputs: compare your runtime against them",
    MANIFEST_FILE: "export manifest; `robopt.export.verify_export(folder)` re-runs the check",
}


def render_readme(manifest: ExportManifest, files: list[str]) -> str:
    v = manifest.verification
    technique = f" (technique: {manifest.technique})" if manifest.technique else ""
    if manifest.max_abs_diff is None:
        check = "It was NOT verified after writing."
    else:
        check = (
            f"Verified after writing: loaded in a fresh Python process with robopt blocked, it reproduced the outputs "
            f"of the artifact robopt evaluated to max |diff| = {manifest.max_abs_diff:.3g} "
            f"(tolerance {v.tolerance:g} x max(1, max |output|); compared: "
            f"{'every output tensor' if v.compare == 'all' else 'the primary output'})."
        )
    lines = [
        f"# robopt export ({manifest.format})",
        "",
        f"Made from robopt artifact `{manifest.artifact[:12]}`{technique} by robopt {manifest.robopt_version}. {check}",
        "",
        "## Load it (robopt not needed)",
        "",
        "```python",
        'folder = "."  # this export folder',
        manifest.load_snippet.rstrip(),
        "```",
        "",
        "## Files",
        "",
    ]
    lines += [f"- `{f}`" + (f": {_FILE_NOTES[f]}" if f in _FILE_NOTES else "") for f in files]
    if manifest.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in manifest.notes]
    return "\n".join(lines) + "\n"
