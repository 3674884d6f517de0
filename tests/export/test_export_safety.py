"""Exports never touch artifacts, never write over files, leave nothing half-written, and their verification
catches exports that do not reproduce the artifact (tampered files, traces that missed a branch, robopt imports)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from robopt.domain.records import InputSpec, TensorSpec
from robopt.export import ArchitectureHint, ExportError, ExportVerificationError, export_artifact, verify_export
from robopt.memory.artifacts import hash_payload
from robopt.tools.example_inputs import make_example_inputs
from tests.export.helpers import store_module
from tests.export.models import Branchy

REPO = Path(__file__).resolve().parents[2]


def test_out_dir_must_be_new_or_empty(digits_fp32, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError) as error:
        export_artifact(digits_fp32.ref, taken, "torchscript", store=digits_fp32.store)
    assert "already exists" in error.value.message and error.value.hint
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and (taken / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ExportError):
        export_artifact(digits_fp32.ref, a_file, "torchscript", store=digits_fp32.store)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = export_artifact(digits_fp32.ref, empty, "torchscript", store=digits_fp32.store)
    assert result.path == str(empty) and (empty / "model.ts").is_file()


def test_artifacts_are_untouched_and_repeat_exports_match(digits_fp32, tmp_path):
    directory = Path(digits_fp32.ref.path).parent
    before = sorted(p.name for p in directory.iterdir())
    first = export_artifact(digits_fp32.ref, tmp_path / "one", "state-dict", store=digits_fp32.store)
    second = export_artifact(digits_fp32.ref, tmp_path / "two", "state-dict", store=digits_fp32.store)
    assert hash_payload(directory) == digits_fp32.ref.sha256
    assert sorted(p.name for p in directory.iterdir()) == before
    for name in ("model.safetensors", "architecture.py", "architecture.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert first.files == second.files
    assert not list(tmp_path.glob(".*partial"))


def test_verification_catches_tampered_weights_and_truncated_files(digits_fp32, tmp_path):
    from safetensors.torch import load_file, save_file

    export_artifact(digits_fp32.ref, tmp_path / "sd", "state-dict", store=digits_fp32.store)
    assert verify_export(tmp_path / "sd") == 0.0  # re-checking an intact export passes
    weights = load_file(str(tmp_path / "sd" / "model.safetensors"))
    weights["classifier.4.bias"] = weights["classifier.4.bias"] + 0.5
    save_file(weights, str(tmp_path / "sd" / "model.safetensors"))
    with pytest.raises(ExportVerificationError) as wrong:
        verify_export(tmp_path / "sd")
    assert "differs from the artifact by up to 0.5" in wrong.value.message

    export_artifact(digits_fp32.ref, tmp_path / "ts", "torchscript", store=digits_fp32.store)
    model_file = tmp_path / "ts" / "model.ts"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    with pytest.raises(ExportVerificationError) as broken:
        verify_export(tmp_path / "ts")
    assert "does not load or run without robopt" in broken.value.message


def test_verification_blocks_robopt_in_the_loading_process(digits_fp32, tmp_path):
    export_artifact(digits_fp32.ref, tmp_path / "out", "torchscript", store=digits_fp32.store)
    manifest_path = tmp_path / "out" / "robopt-export.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["load_snippet"] = "import robopt.zoo\n" + manifest["load_snippet"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ExportVerificationError) as error:
        verify_export(tmp_path / "out")
    assert "robopt is blocked" in error.value.message


def test_a_trace_that_missed_a_branch_fails_and_leaves_nothing(export_store, tmp_path):
    spec = InputSpec(inputs=[TensorSpec(name="x", shape=[1, 4])], source="caller")
    trace_sum, verify_sum = (float(make_example_inputs(spec, seed)[0].sum()) for seed in (0, 1))
    assert (trace_sum > 0) != (verify_sum > 0)  # the tracing and the verification inputs take different branches
    torch.manual_seed(0)
    ref = store_module(export_store, Branchy(threshold=0.0).eval(), spec)
    with pytest.raises(ExportVerificationError) as error:
        export_artifact(ref, tmp_path / "out", "torchscript", store=export_store)
    assert "differs from the artifact" in error.value.message and "control flow" in error.value.hint
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    # ONNX tracing records one branch too; the state-dict path refuses (torch.fx cannot trace the condition)
    with pytest.raises(ExportVerificationError):
        export_artifact(ref, tmp_path / "onnx", "onnx", store=export_store)
    with pytest.raises(ExportError) as fx:
        export_artifact(ref, tmp_path / "sd", "state-dict", store=export_store)
    assert "torch.fx cannot trace Branchy" in fx.value.message
    assert not list(tmp_path.iterdir())


def test_an_untraceable_class_outside_robopt_exports_by_its_import_path(export_store, tmp_path, monkeypatch):
    spec = InputSpec(inputs=[TensorSpec(name="x", shape=[1, 4])], source="caller")
    torch.manual_seed(0)
    ref = store_module(export_store, Branchy(threshold=0.0).eval(), spec)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the user's package is importable where they load the export
    hint = ArchitectureHint("tests.export.models:Branchy", {"threshold": 0.0}, "the caller")
    result = export_artifact(ref, tmp_path / "out", "state-dict", store=export_store, architecture=hint)
    assert result.verified and result.max_abs_diff <= 1e-6  # the class's own forward: both branches are right
    arch = json.loads((tmp_path / "out" / "architecture.json").read_text())
    assert arch["class"] == "tests.export.models:Branchy" and arch["kwargs"] == {"threshold": 0.0}
    assert arch["plain_pytorch"] is None and "architecture.py" not in result.files
    assert any("importable" in n for n in result.notes)


def test_bad_requests_are_typed_errors(digits_fp32, tmp_path):
    with pytest.raises(ExportError) as unknown:
        export_artifact(digits_fp32.ref, tmp_path / "out", "tflite", store=digits_fp32.store)
    assert "tflite" in unknown.value.message and "torchscript" in unknown.value.hint
    with pytest.raises(ExportError) as not_artifact:
        export_artifact(tmp_path, tmp_path / "out", "auto")
    assert "not a robopt artifact" in not_artifact.value.message
