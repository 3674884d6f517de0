"""An ONNX artifact (robopt's onnx_dynamic_int8 on an ONNX reacher policy) exports as ONNX, byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from robopt.export import NotExportableError, export_artifact
from robopt.tools.onnx_module import OnnxModule
from tests.export.conftest import Stored
from tests.export.helpers import apply_technique, robopt_outputs, run_without_robopt


@pytest.fixture(scope="module")
def reacher_onnx_int8(reacher_fp32: Stored, tmp_path_factory) -> Stored:
    """reacher-policy exported to ONNX, then quantized by robopt's onnx_dynamic_int8 technique."""
    work = tmp_path_factory.mktemp("onnx-work")
    model = reacher_fp32.store.load(reacher_fp32.ref)
    source = work / "reacher.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 10),),
        str(source),
        dynamo=False,
        input_names=["observation"],
        dynamic_axes={"observation": {0: "batch"}},
    )
    store = reacher_fp32.store
    parent = store.put_onnx(onnx.load(str(source)), input_spec=reacher_fp32.spec)
    result = apply_technique("onnx_dynamic_int8", OnnxModule(source), (torch.zeros(1, 10),), workdir=work)
    quantized = onnx.load(str(result.onnx_path))
    ref = store.put_onnx(quantized, parent=parent.sha256, technique="onnx_dynamic_int8", input_spec=reacher_fp32.spec)
    return Stored(ref, store, reacher_fp32.spec)


def test_onnx_artifact_is_copied_and_reproduces_in_onnxruntime(reacher_onnx_int8, tmp_path):
    stored = reacher_onnx_int8
    result = export_artifact(stored.ref, tmp_path / "out", "auto", store=stored.store)
    assert result.format == "onnx" and result.verified and result.max_abs_diff <= 1e-6
    assert (tmp_path / "out" / "model.onnx").read_bytes() == Path(stored.ref.path).read_bytes()
    ops = {node.op_type for node in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops  # still the INT8 model robopt evaluated
    observations = torch.randn(16, 10, generator=torch.Generator().manual_seed(5))
    program = "result = session.run(None, {'observation': data['obs']})[0]\n"
    got = run_without_robopt(result.load_snippet, program, {"obs": observations.numpy()}, tmp_path)
    want = robopt_outputs(stored.store, stored.ref, observations).numpy()
    assert got.shape == (16, 2) and np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("fmt", ["torchscript", "state-dict", "hf"])
def test_onnx_artifact_refuses_torch_formats(reacher_onnx_int8, tmp_path, fmt):
    with pytest.raises(NotExportableError) as error:
        export_artifact(reacher_onnx_int8.ref, tmp_path / "out", fmt, store=reacher_onnx_int8.store)
    assert "onnx" in error.value.message.lower() and "--format onnx" in error.value.hint
    assert not (tmp_path / "out").exists()
