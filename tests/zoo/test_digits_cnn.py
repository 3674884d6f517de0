"""The digits-cnn zoo entry: an offline, deterministic, cached build whose card metrics are measured."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from robopt import zoo
from robopt.errors import ModelNotFoundError
from robopt.evaluation.base import EvaluationSetup, build_evaluator
from robopt.progress import Progress
from robopt.tools.example_inputs import make_example_inputs
from robopt.zoo import ModelCard, load_card_model
from robopt.zoo.digits_cnn import DigitsCNN


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    zoo_dir = tmp_path_factory.mktemp("zoo")
    events: list[dict] = []
    weights, card = zoo.build("digits-cnn", zoo_dir, progress=Progress(emit=events.append, min_interval_s=0))
    return zoo_dir, weights, card, events


def test_listed() -> None:
    assert "digits-cnn" in zoo.list_entries()


def test_build_reports_training_progress(built) -> None:
    _, _, _, events = built
    train = [(e["current"], e["total"]) for e in events if e["stage"] == "train"]
    assert train[0] == (0, train[0][1]) and train[-1] == (train[0][1], train[0][1])
    assert len(train) == train[0][1] + 1  # one event per epoch, plus the start
    assert any(e["stage"] == "evaluate" for e in events)


def test_card_describes_the_cached_files(built) -> None:
    zoo_dir, weights, card, _ = built
    assert weights == zoo_dir / "digits-cnn" / "model.safetensors"
    assert ModelCard.model_validate_json((weights.parent / "card.json").read_text()) == card
    assert card.architecture == "robopt.zoo.digits_cnn:DigitsCNN"
    assert card.family == "cnn" and card.input_spec.source == "zoo"
    assert card.input_spec.inputs[0].shape == [1, 1, 8, 8]
    assert card.evaluator.name == "classification" and card.evaluator.dataset == "digits"
    assert card.suggested_criteria["max_accuracy_drop"] == "1%"
    assert card.build_seconds > 0
    assert not [p.name for p in weights.parent.iterdir() if p.name.endswith(".tmp")]
    # a plain state dict of the card's architecture, nothing pickled
    state = load_file(str(weights))
    assert set(state) == set(DigitsCNN(**card.architecture_kwargs).state_dict())


def test_accuracy_is_measured_and_matches_the_card(built) -> None:
    _, weights, card, _ = built
    model = load_card_model(weights, card)
    evaluator = build_evaluator(card.evaluator, EvaluationSetup(reference=model, input_spec=card.input_spec))
    metrics = evaluator.evaluate(model, Progress())
    assert metrics["accuracy"] >= 0.97
    assert metrics["accuracy"] == card.metrics["accuracy"]
    assert metrics["loss"] == pytest.approx(card.metrics["loss"], rel=1e-5)
    assert card.metrics["samples"] == 450.0 and card.metrics["nonfinite_outputs"] == 0.0
    assert model(*make_example_inputs(card.input_spec)).shape == (1, 10)


def test_linear_layers_hold_most_weights(built) -> None:
    _, weights, card, _ = built
    model = load_card_model(weights, card)
    linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    assert linear / sum(p.numel() for p in model.parameters()) > 0.9


def test_resolve_uses_the_cache(built) -> None:
    zoo_dir, weights, card, _ = built
    mtime = weights.stat().st_mtime_ns
    events: list[dict] = []
    resolved_weights, resolved_card = zoo.resolve("digits-cnn", zoo_dir, Progress(emit=events.append, min_interval_s=0))
    assert resolved_weights == weights and resolved_card == card
    assert weights.stat().st_mtime_ns == mtime
    assert events == []  # nothing was trained or evaluated


def test_forced_build_is_deterministic(built, tmp_path) -> None:
    _, weights, _, _ = built
    (tmp_path / "digits-cnn").mkdir()
    (tmp_path / "digits-cnn" / "card.json").write_text("{}")  # stale leftovers are replaced
    events: list[dict] = []
    forced_weights, card = zoo.build("digits-cnn", tmp_path, force=True, progress=Progress(emit=events.append))
    assert any(e["stage"] == "train" for e in events)
    assert forced_weights.read_bytes() == weights.read_bytes()
    assert card.metrics["accuracy"] >= 0.97


def test_unreadable_card_is_rebuilt(built, tmp_path) -> None:
    _, weights, card, _ = built
    directory = tmp_path / "digits-cnn"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(weights.read_bytes())
    (directory / "card.json").write_text("{not json")
    _rebuilt_weights, rebuilt = zoo.resolve("digits-cnn", tmp_path)
    assert rebuilt.metrics["accuracy"] == card.metrics["accuracy"]
    assert ModelCard.model_validate_json((directory / "card.json").read_text()) == rebuilt


def test_unknown_name(tmp_path) -> None:
    for call in (zoo.build, zoo.resolve):
        with pytest.raises(ModelNotFoundError, match="no zoo model named 'resnet-9000'") as err:
            call("resnet-9000", tmp_path)
        assert "digits-cnn" in (err.value.hint or "")
    assert not (tmp_path / "resnet-9000").exists()
