"""The classification evaluator on real models: a trained digits CNN (eager, TorchScript, ONNX) and degenerate ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from robopt.errors import EvaluationError
from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, build_evaluator, list_evaluators
from robopt.evaluation.datasets import digits_split
from robopt.progress import Progress
from robopt.tools.onnx_module import OnnxModule
from robopt.zoo.digits_cnn import DigitsCNN, train_digits_cnn

DIGITS = EvaluatorSpec(name="classification", dataset="digits")


class AlwaysClassZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 0] = 1.0
        return logits


class NaNOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 10), float("nan"))


class OnlyBatchOne(nn.Module):
    """Like a model exported with a fixed batch of 1: any other batch size raises."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise RuntimeError(f"expected batch 1, got {x.shape[0]}")
        return self.inner(x)


def _evaluate(model: nn.Module, spec: EvaluatorSpec = DIGITS, setup: EvaluationSetup | None = None, **kw) -> dict:
    return build_evaluator(spec, setup or EvaluationSetup()).evaluate(model, kw.get("progress", Progress()))


@pytest.fixture(scope="module")
def trained() -> DigitsCNN:
    return train_digits_cnn(0, Progress(), {"hidden": 64, "dropout": 0.25, "classes": 10}, epochs=3)


def test_registered() -> None:
    assert "classification" in list_evaluators()
    evaluator = build_evaluator(DIGITS, EvaluationSetup())
    assert evaluator.primary_metric == "accuracy" and evaluator.higher_is_better


def test_constant_model_scores_the_class_share() -> None:
    y_test = digits_split()[3]
    share = int((y_test == 0).sum()) / len(y_test)
    metrics = _evaluate(AlwaysClassZero())
    assert metrics["accuracy"] == share
    assert metrics["samples"] == 450.0 and metrics["nonfinite_outputs"] == 0.0
    # logits (1, 0, ..., 0): cross-entropy is log(e + 9) minus 1 for the class-0 samples
    assert metrics["loss"] == pytest.approx(math.log(math.e + 9) - share, rel=1e-6)


def test_nan_outputs_are_reported_not_raised() -> None:
    metrics = _evaluate(NaNOutputs())
    assert metrics["nonfinite_outputs"] == 1.0
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert "loss" not in metrics  # NaN is not a measurement a judge can compare


def test_trained_model_progress_and_limit(trained) -> None:
    events: list[dict] = []
    progress = Progress(emit=events.append, min_interval_s=0)
    spec = EvaluatorSpec(name="classification", dataset="digits", options={"batch_size": 100})
    metrics = _evaluate(trained, spec, progress=progress)
    assert metrics["accuracy"] > 0.9
    assert [(e["stage"], e["current"], e["total"]) for e in events] == [("evaluate", i, 5) for i in range(6)]
    limited = _evaluate(trained, EvaluatorSpec(name="classification", dataset="digits", options={"limit": 50}))
    assert limited["samples"] == 50.0
    x, y = digits_split()[2:]
    with torch.no_grad():
        expected = int((trained(x[:50]).argmax(1) == y[:50]).sum()) / 50
    assert limited["accuracy"] == expected


def test_dropout_is_off_during_evaluation(trained) -> None:
    trained.train()
    first, second = _evaluate(trained), _evaluate(trained)
    assert first == second and not trained.training


def test_torchscript_and_fixed_batch_onnx_agree_with_eager(trained, tmp_path) -> None:
    eager = _evaluate(trained)
    scripted = _evaluate(torch.jit.script(trained))
    assert scripted["accuracy"] == eager["accuracy"]
    path = tmp_path / "digits.onnx"
    torch.onnx.export(trained, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["input"])
    onnx_model = OnnxModule(path)
    assert onnx_model.session.get_inputs()[0].shape[0] == 1  # fixed batch: 256 at once would fail
    onnx_metrics = _evaluate(onnx_model)
    assert onnx_metrics["samples"] == 450.0
    assert abs(onnx_metrics["accuracy"] - eager["accuracy"]) <= 1 / 450
    assert onnx_metrics["loss"] == pytest.approx(eager["loss"], rel=1e-4)


def test_falls_back_to_the_input_spec_batch_size(trained) -> None:
    eager = _evaluate(trained)
    setup = EvaluationSetup(input_spec=DigitsCNN.input_spec)
    metrics = _evaluate(OnlyBatchOne(trained), setup=setup)
    assert metrics["accuracy"] == eager["accuracy"] and metrics["samples"] == 450.0


def test_npz_user_data_round_trip(trained, tmp_path) -> None:
    _, _, x, y = digits_split()
    path = tmp_path / "digits_test.npz"
    np.savez(path, x=x.numpy(), y=y.numpy())
    from_file = _evaluate(trained, EvaluatorSpec(name="classification", dataset=str(path)))
    assert from_file == _evaluate(trained)


def test_pt_user_data(trained, tmp_path) -> None:
    _, _, x, y = digits_split()
    path = tmp_path / "digits_test.pt"
    torch.save({"x": x[:100], "y": y[:100]}, path)
    metrics = _evaluate(trained, EvaluatorSpec(name="classification", dataset=str(path)))
    assert metrics["samples"] == 100.0


def test_labels_out_of_range(trained, tmp_path) -> None:
    path = tmp_path / "labels.npz"
    np.savez(path, x=np.zeros((4, 1, 8, 8), dtype=np.float32), y=np.array([0, 1, 12, 3]))
    with pytest.raises(EvaluationError, match="labels go up to 12 but the model outputs 10 classes"):
        _evaluate(trained, EvaluatorSpec(name="classification", dataset=str(path)))


def test_outputs_must_be_n_by_classes() -> None:
    class Flat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten()

    with pytest.raises(EvaluationError, match=r"must return \[N, classes\]") as err:
        _evaluate(Flat())
    assert "output-fidelity" in (err.value.hint or "")


def test_model_failure_is_an_evaluation_error() -> None:
    wrong_input = nn.Linear(3, 10)
    with pytest.raises(EvaluationError, match=r"the model failed on inputs of shape \[256, 1, 8, 8\]"):
        _evaluate(wrong_input)


def test_bad_specs() -> None:
    with pytest.raises(EvaluationError, match="needs a labeled dataset"):
        build_evaluator(EvaluatorSpec(name="classification"), EvaluationSetup())
    with pytest.raises(EvaluationError, match="invalid options") as err:
        build_evaluator(EvaluatorSpec(name="classification", dataset="digits", options={"batch": 3}), EvaluationSetup())
    assert "batch_size" in (err.value.hint or "")
    with pytest.raises(EvaluationError, match="invalid options"):
        build_evaluator(
            EvaluatorSpec(name="classification", dataset="digits", options={"batch_size": 0}), EvaluationSetup()
        )
    with pytest.raises(EvaluationError, match="no evaluator named 'accuracy'"):
        build_evaluator(EvaluatorSpec(name="accuracy"), EvaluationSetup())
