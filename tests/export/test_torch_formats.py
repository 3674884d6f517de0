"""PyTorch exports round trip: digits-cnn (fp32 and robopt's torch.ao INT8) as TorchScript and state dict,
reacher-policy as ONNX; each reloaded in a process without robopt and compared with the artifact on real data."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from robopt.evaluation.datasets import digits_split
from robopt.export import NotExportableError, export_artifact
from tests.export.helpers import apply_technique, read_json, robopt_outputs, run_without_robopt, store_module

RUN_ON_DATA = "import torch\nwith torch.no_grad():\n    result = model(torch.from_numpy(data['x'])).numpy()\n"


@pytest.fixture(scope="module")
def digits_test_images() -> torch.Tensor:
    return digits_split()[2]


def check_state_dict_files(which: str, stored, out, result) -> None:
    """fp32: safetensors equal to the artifact's weights; INT8: torch.save packed weights + the quantization recipe."""
    arch = read_json(out / "architecture.json")
    assert arch["class"] == "robopt.zoo.digits_cnn:DigitsCNN"
    assert arch["kwargs"] == {"hidden": 256, "dropout": 0.25, "classes": 10} and arch["kwargs_fit_weights"] is True
    assert "import robopt" not in (out / "architecture.py").read_text()
    if which == "digits_fp32":
        from safetensors.torch import load_file

        assert arch["quantization"] is None and "model_state.pt" not in result.files
        weights = load_file(str(out / "model.safetensors"))
        original = stored.store.load(stored.ref).state_dict()
        assert weights.keys() == original.keys() and all(torch.equal(weights[k], original[k]) for k in original)
    else:
        assert "model_state.pt" in result.files and "model.safetensors" not in result.files
        assert arch["quantization"]["layers"] == {"classifier.1": "per-channel", "classifier.4": "per-channel"}
        assert "quantize(" in result.load_snippet and "weights_only=True" in result.load_snippet
        assert any("quantization recipe" in n for n in result.notes)


@pytest.mark.parametrize("fmt", ["torchscript", "state-dict"])
@pytest.mark.parametrize("which", ["digits_fp32", "digits_int8"])
def test_digits_cnn_round_trip(which, fmt, request, tmp_path, digits_test_images):
    stored = request.getfixturevalue(which)
    result = export_artifact(stored.ref, tmp_path / "out", fmt, store=stored.store)
    assert result.verified and result.format == fmt
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    assert result.artifact == stored.ref.sha256
    assert "README.md" in result.files and "robopt-export.json" in result.files
    # Independently of robopt's own check: the user's snippet, robopt blocked, on all 450 test images.
    got = run_without_robopt(result.load_snippet, RUN_ON_DATA, {"x": digits_test_images.numpy()}, tmp_path)
    want = robopt_outputs(stored.store, stored.ref, digits_test_images).numpy()
    assert got.shape == want.shape == (len(digits_test_images), 10)
    assert np.abs(got - want).max() <= 1e-5
    assert (got.argmax(1) == want.argmax(1)).all()
    if fmt == "state-dict":
        check_state_dict_files(which, stored, tmp_path / "out", result)


def test_pruned_model_state_dict_says_the_card_kwargs_no_longer_fit(digits_fp32, tmp_path):
    model = digits_fp32.store.load(digits_fp32.ref)
    example = tuple(torch.randn(4, 1, 8, 8) for _ in range(1))
    pruned = apply_technique("prune_structured", copy.deepcopy(model), example).model
    ref = store_module(digits_fp32.store, pruned, digits_fp32.spec, technique="prune_structured")
    result = export_artifact(ref, tmp_path / "out", "state-dict", store=digits_fp32.store)
    assert result.verified and result.max_abs_diff <= 1e-5
    assert read_json(tmp_path / "out" / "architecture.json")["kwargs_fit_weights"] is False
    assert any("different layer shapes" in n for n in result.notes)


def test_reacher_policy_to_onnx_runs_in_onnxruntime_with_any_batch(reacher_fp32, tmp_path):
    result = export_artifact(reacher_fp32.ref, tmp_path / "out", "onnx", store=reacher_fp32.store)
    assert result.verified and result.max_abs_diff <= 1e-4
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert graph.opset_import[0].version >= 17
    assert [i.name for i in graph.graph.input] == ["observation"]
    observations = torch.randn(32, 10, generator=torch.Generator().manual_seed(3))
    program = "result = session.run(None, {'observation': data['obs']})[0]\n"
    got = run_without_robopt(result.load_snippet, program, {"obs": observations.numpy()}, tmp_path)
    want = robopt_outputs(reacher_fp32.store, reacher_fp32.ref, observations).numpy()
    assert got.shape == (32, 2) and np.abs(got - want).max() <= 1e-4


def test_int8_refuses_onnx_and_hf_with_working_alternatives(digits_int8, tmp_path):
    with pytest.raises(NotExportableError) as onnx_error:
        export_artifact(digits_int8.ref, tmp_path / "a", "onnx", store=digits_int8.store)
    assert "torch.ao dynamic INT8" in onnx_error.value.message
    assert "onnx_dynamic_int8" in onnx_error.value.hint and "torchscript" in onnx_error.value.hint
    with pytest.raises(NotExportableError) as hf_error:
        export_artifact(digits_int8.ref, tmp_path / "b", "hf", store=digits_int8.store)
    assert "not a transformers PreTrainedModel" in hf_error.value.message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_torchao_weights_are_refused_where_they_cannot_go(digits_fp32, tmp_path):
    model = digits_fp32.store.load(digits_fp32.ref)
    example = (torch.randn(2, 1, 8, 8),)
    quantized = apply_technique("weight_only_int8", copy.deepcopy(model), example).model
    ref = store_module(digits_fp32.store, quantized, digits_fp32.spec, technique="weight_only_int8")
    with pytest.raises(NotExportableError) as ts:
        export_artifact(ref, tmp_path / "ts", "torchscript", store=digits_fp32.store)
    assert "segmentation fault" in ts.value.message and "--format onnx" in ts.value.hint
    with pytest.raises(NotExportableError) as sd:
        export_artifact(ref, tmp_path / "sd", "state-dict", store=digits_fp32.store)
    assert "torchao" in sd.value.message
    # ONNX works, and says honestly that the weights went out dequantized
    result = export_artifact(ref, tmp_path / "onnx", "onnx", store=digits_fp32.store)
    assert result.verified and result.max_abs_diff <= 1e-4
    assert any("dequantized" in n for n in result.notes)
