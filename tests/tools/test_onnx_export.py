"""robopt.tools.onnx_export: the one torch -> ONNX exporter (dynamo and TorchScript-based, tried in order) behind the
static INT8 techniques and `robopt export --format onnx`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.tools.onnx_export import OnnxExportFailed, export_onnx
from robopt.tools.onnx_module import OnnxModule


class TokenModel(nn.Module):
    """Token ids [batch, tokens] -> a dict of two tensors (named outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.embed(ids)
        return {"logits": self.head(hidden), "pooled": hidden.mean(1)}


class Spectrum(nn.Module):
    """torch.fft.rfft: the TorchScript-based exporter has no ONNX form for it at opset 17, the dynamo one does."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.fft.rfft(x).abs())


class Eigen(nn.Module):
    """Complex eigenvalues: neither exporter can write them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x @ x.transpose(-1, -2)).real


def seeded(module: nn.Module) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for p in module.parameters():
            nn.init.normal_(p, std=0.5)
    return module.eval()


def run_onnx(path: Path, **feeds: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: t.numpy() for name, t in feeds.items()})


def test_dynamo_export_keeps_batch_and_sequence_dynamic_and_names_dict_outputs(tmp_path, capfd):
    model = seeded(TokenModel())
    export = export_onnx(model, (torch.zeros(1, 6, dtype=torch.int64),), tmp_path / "m.onnx", input_names=["ids"])
    assert export.used == "dynamo" and export.failures == [] and export.opset >= 18
    assert export.dynamic_axes == {"ids": [0, 1]} and export.output_names == ["logits", "pooled"]
    assert "dynamo=True" in export.exporter
    assert capfd.readouterr().out == ""  # the exporter's progress lines do not reach stdout (the CLI's --json)
    ids = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1))  # other batch and length
    logits, pooled = run_onnx(export.path, ids=ids)
    with torch.no_grad():
        expected = model(ids)
    np.testing.assert_allclose(logits, expected["logits"].numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled, expected["pooled"].numpy(), atol=1e-5)


def test_torchscript_exporter_writes_the_opset_asked_with_a_dynamic_batch(tmp_path):
    model = seeded(nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2)))
    export = export_onnx(model, (torch.zeros(1, 10),), tmp_path / "m.onnx", exporters=("torchscript",), opset=17)
    assert export.used == "torchscript" and export.opset == 17 and "dynamo=False" in export.exporter
    assert export.input_names == ["input"] and export.output_names == ["output"]
    assert export.dynamic_axes == {"input": [0]}
    assert onnx.load(str(export.path)).graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = torch.randn(7, 10, generator=torch.Generator().manual_seed(2))
    (got,) = run_onnx(export.path, input=x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)


def test_a_failed_exporter_falls_through_to_the_next_and_is_reported(tmp_path):
    model = seeded(Spectrum())
    export = export_onnx(
        model, (torch.randn(1, 16),), tmp_path / "m.onnx", exporters=("torchscript", "dynamo"), opset=17
    )
    assert export.used == "dynamo" and export.opset == 18  # max(asked, the dynamo exporter's minimum)
    (failure,) = export.failures
    assert failure.startswith("TorchScript-based exporter: UnsupportedOperatorError") and "fft_rfft" in failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # nothing left over from the failed try
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    (got,) = run_onnx(export.path, input=x)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


def test_when_every_exporter_fails_each_reason_is_raised_and_no_file_is_left(tmp_path):
    with pytest.raises(OnnxExportFailed) as error:
        export_onnx(Eigen(), (torch.randn(1, 4, 4),), tmp_path / "m.onnx", exporters=("torchscript", "dynamo"))
    assert isinstance(error.value, TechniqueFailedError) and error.value.hint
    assert [f.split(":")[0] for f in error.value.failures] == ["TorchScript-based exporter", "dynamo exporter"]
    assert "linalg_eigvals" in error.value.message
    assert not list(tmp_path.iterdir())


def test_torchscript_modules_need_the_torchscript_exporter_and_onnx_modules_are_refused(tmp_path):
    scripted = torch.jit.script(seeded(nn.Sequential(nn.Linear(4, 3), nn.ReLU())))
    with pytest.raises(TechniqueNotApplicableError, match="RecursiveScriptModule"):
        export_onnx(scripted, (torch.randn(1, 4),), tmp_path / "a.onnx")
    export = export_onnx(scripted, (torch.randn(1, 4),), tmp_path / "b.onnx", exporters=("torchscript", "dynamo"))
    assert export.used == "torchscript" and export.failures == []
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    (got,) = run_onnx(export.path, input=x)
    np.testing.assert_allclose(got, scripted(x).detach().numpy(), atol=1e-6)
    with pytest.raises(TechniqueNotApplicableError, match="OnnxModule"):
        export_onnx(OnnxModule(export.path), (torch.randn(1, 4),), tmp_path / "c.onnx")
