"""ONNX Runtime dynamic INT8 on an exported, trained MLP: smaller file, same accuracy, convolutions untouched."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from robopt.domain.analysis import AnalysisReport
from robopt.tools.onnx_analysis import profile_onnx
from robopt.tools.onnx_module import OnnxModule
from robopt.tools.registry import ApplyContext, get_technique
from tests.tools.technique_models import DigitsCNN, DigitsMLP, accuracy, as_images, load_digits_split, train


def export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return path


def analysis_of(path: Path) -> AnalysisReport:
    p = profile_onnx(path)
    return AnalysisReport(
        format="onnx",
        source=str(path),
        param_count=p.param_count,
        size_on_disk_bytes=path.stat().st_size,
        size_in_memory_bytes=p.size_in_memory_bytes,
        layer_census=p.layer_census,
        params_by_layer_type=p.params_by_layer_type,
        architecture=p.architecture,
    )


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def test_quantizes_gemm_weights_and_keeps_accuracy(tmp_path, digits):
    mlp = train(DigitsMLP(256), digits.x_train, digits.y_train, steps=300)
    path = export(mlp, digits.x_test[:1], tmp_path / "mlp.onnx")
    technique = get_technique("onnx_dynamic_int8")
    analysis = analysis_of(path)
    assert technique.applicable(analysis).applicable
    estimate = technique.estimate(analysis, technique.default_config())
    work = tmp_path / "work"
    work.mkdir()
    result = technique.apply(OnnxModule(path), technique.default_config(), ApplyContext(analysis, workdir=work))
    assert result.onnx_path is not None and result.onnx_path.parent == work
    ratio = result.onnx_path.stat().st_size / path.stat().st_size
    assert ratio < 0.3 and ratio == pytest.approx(estimate.size_ratio, abs=0.05)
    ops = {n.op_type for n in onnx.load(str(result.onnx_path)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    assert accuracy(result.model, digits.x_test, digits.y_test) >= accuracy(mlp, digits.x_test, digits.y_test) - 0.01
    # the result is itself an ONNX model that is already quantized: the technique no longer applies to it
    assert not technique.applicable(analysis_of(result.onnx_path)).applicable


def test_convolutions_stay_float(tmp_path, digits):
    cnn = train(DigitsCNN(), as_images(digits.x_train), digits.y_train, steps=100)
    path = export(cnn, as_images(digits.x_test[:1]), tmp_path / "cnn.onnx")
    work = tmp_path / "work"
    work.mkdir()
    technique = get_technique("onnx_dynamic_int8")
    result = technique.apply(
        OnnxModule(path), technique.default_config(), ApplyContext(analysis_of(path), workdir=work)
    )
    ops = {n.op_type for n in onnx.load(str(result.onnx_path)).graph.node}
    assert "Conv" in ops and "ConvInteger" not in ops


def test_not_for_pytorch_models():
    analysis = AnalysisReport(
        format="torch-module",
        source="x",
        param_count=10,
        size_on_disk_bytes=40,
        size_in_memory_bytes=40,
        params_by_layer_type={"Linear": 10},
    )
    assert not get_technique("onnx_dynamic_int8").applicable(analysis).applicable
