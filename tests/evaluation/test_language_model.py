"""The language-model evaluators on the real tiny-lm: perplexity (HF, quantized, bare-logits models) and the local
multiple-choice task run end to end through lm-eval."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from robopt import zoo
from robopt.errors import CancelledError, EvaluationError
from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, build_evaluator, list_evaluators
from robopt.evaluation.language_model import LM_TASK_NAME, LM_TASKS_DIR, fill_model_dir, write_task_dir
from robopt.evaluation.text_corpus import heldout_sources
from robopt.progress import Progress
from robopt.tools.loading import load_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(data_dir):
    """(folder, card, model): the zoo's tiny-lm, built once per test session and loaded as robopt loads it."""
    folder, card = zoo.resolve("tiny-lm", data_dir / "zoo")
    return folder, card, load_model(folder).module


def _perplexity(folder: Path, **options) -> object:
    spec = EvaluatorSpec(name="perplexity", dataset="stdlib-heldout", options={"model_dir": str(folder), **options})
    return build_evaluator(spec, EvaluationSetup())


def _lm_eval(folder: Path, **options) -> object:
    return build_evaluator(
        EvaluatorSpec(name="lm-eval", options={"model_dir": str(folder), **options}), EvaluationSetup()
    )


class LogitsOnly(nn.Module):
    """A bare module that returns the logits tensor itself (like an exported model would)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids).logits


def test_registered() -> None:
    evaluators = list_evaluators()
    assert "perplexity" in evaluators and "lm-eval" in evaluators


def test_perplexity_is_deterministic_and_counts_its_windows(tiny) -> None:
    folder, card, model = tiny
    evaluator = _perplexity(folder, windows=16, window_length=32)
    assert evaluator.primary_metric == "perplexity" and evaluator.higher_is_better is False
    events: list[dict] = []
    first = evaluator.evaluate(model, Progress(emit=events.append, min_interval_s=0))
    assert first == evaluator.evaluate(model, Progress())
    assert first["tokens"] == 16 * 31 and first["nonfinite_outputs"] == 0.0
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]), rel=1e-12)
    assert [e["current"] for e in events if e["stage"] == "perplexity"] == [0, 1, 2]  # 16 windows, batches of 8
    # the default options are the card's: the same model measures the same number
    assert _perplexity(folder).evaluate(model, Progress())["perplexity"] == pytest.approx(card.metrics["perplexity"])


def test_perplexity_gets_worse_for_a_noised_model(tiny) -> None:
    folder, _, model = tiny
    evaluator = _perplexity(folder, windows=16)
    noised = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in noised.modules():
            if isinstance(module, nn.Linear):
                module.weight += 0.5 * module.weight.std() * torch.randn(module.weight.shape, generator=generator)
    clean, worse = evaluator.evaluate(model, Progress()), evaluator.evaluate(noised, Progress())
    assert worse["perplexity"] > 1.2 * clean["perplexity"]


def test_perplexity_of_quantized_and_bare_logits_models(tiny) -> None:
    folder, _, model = tiny
    evaluator = _perplexity(folder, windows=16)
    reference = evaluator.evaluate(model, Progress())["perplexity"]
    assert evaluator.evaluate(LogitsOnly(model), Progress())["perplexity"] == pytest.approx(reference, rel=1e-9)
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    int8 = evaluator.evaluate(quantized, Progress())["perplexity"]
    assert int8 != reference and int8 == pytest.approx(reference, rel=0.05)


def test_perplexity_on_a_text_file(tiny, tmp_path) -> None:
    folder, _, model = tiny
    text = tmp_path / "code.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    spec = EvaluatorSpec(name="perplexity", dataset=str(text), options={"model_dir": str(folder), "windows": 4})
    repetitive = build_evaluator(spec, EvaluationSetup()).evaluate(model, Progress())
    assert repetitive["perplexity"] < _perplexity(folder, windows=4).evaluate(model, Progress())["perplexity"]


def test_perplexity_errors_say_what_to_do(tiny, tmp_path) -> None:
    folder, _, _ = tiny
    with pytest.raises(EvaluationError, match="model_dir") as missing:
        build_evaluator(EvaluatorSpec(name="perplexity", dataset="stdlib-heldout"), EvaluationSetup())
    assert "model_dir" in missing.value.hint
    with pytest.raises(EvaluationError, match="no tokenizer"):
        _perplexity(tmp_path)
    with pytest.raises(EvaluationError, match="unknown text dataset"):
        build_evaluator(
            EvaluatorSpec(name="perplexity", dataset="wikitext", options={"model_dir": str(folder)}), EvaluationSetup()
        )
    with pytest.raises(EvaluationError, match="invalid options"):
        _perplexity(folder, windows=0)
    evaluator = _perplexity(folder, windows=2)
    with pytest.raises(EvaluationError, match="failed on input_ids") as not_an_lm:
        evaluator.evaluate(nn.Linear(4, 4), Progress())
    assert not_an_lm.value.hint
    with pytest.raises(EvaluationError, match=r"logits \[batch, sequence, vocab"):
        evaluator.evaluate(nn.Embedding(4096, 8), Progress())  # takes input_ids, but returns no vocabulary logits


def test_lm_eval_scores_the_trained_model_above_chance(tiny) -> None:
    folder, _, model = tiny
    evaluator = _lm_eval(folder)
    assert evaluator.primary_metric == "acc" and evaluator.higher_is_better
    events: list[dict] = []
    metrics = evaluator.evaluate(model, Progress(emit=events.append, min_interval_s=0))
    assert metrics["samples"] == 150
    assert metrics["acc"] > 0.35  # chance is 0.25 (4 choices); the untrained model scores about 0.2
    assert 0 <= metrics["acc_norm"] <= 1
    assert [e for e in events if e["stage"] == "lm-eval"]  # one event per forward pass


def test_lm_eval_limit_is_deterministic_and_follows_the_model(tiny) -> None:
    folder, _, model = tiny
    evaluator = _lm_eval(folder, limit=24)
    rng_state = torch.random.get_rng_state()
    first = evaluator.evaluate(model, Progress())
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # lm-eval's global seeding does not leak out
    assert first["samples"] == 24 and first == evaluator.evaluate(model, Progress())
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    assert abs(evaluator.evaluate(quantized, Progress())["acc"] - first["acc"]) <= 0.1


@pytest.mark.parametrize("evaluator", ["perplexity", "lm-eval"])
def test_cancelling_stops_the_evaluation(tiny, evaluator) -> None:
    folder, _, model = tiny
    progress = Progress(min_interval_s=0)
    progress.emit = lambda event: progress.cancel.set() if event.get("current") else None  # cancel after one step
    runner = _perplexity(folder) if evaluator == "perplexity" else _lm_eval(folder, limit=40)
    with pytest.raises(CancelledError):
        runner.evaluate(model, progress)


def test_fill_model_dir_only_fills_language_model_evaluators(tmp_path) -> None:
    filled = fill_model_dir(EvaluatorSpec(name="lm-eval", options={"limit": 5}), tmp_path)
    assert filled.options == {"limit": 5, "model_dir": str(tmp_path)}
    given = EvaluatorSpec(name="perplexity", options={"model_dir": "elsewhere"})
    assert fill_model_dir(given, tmp_path) == given
    assert fill_model_dir(EvaluatorSpec(name="classification"), tmp_path).options == {}


def test_lm_eval_refuses_models_it_cannot_run(tiny) -> None:
    folder, _, model = tiny
    with pytest.raises(EvaluationError, match="Hugging Face causal LMs") as refused:
        _lm_eval(folder, limit=2).evaluate(LogitsOnly(model), Progress())
    assert "perplexity" in refused.value.hint
    with pytest.raises(EvaluationError, match="model_dir"):
        build_evaluator(EvaluatorSpec(name="lm-eval"), EvaluationSetup())
    with pytest.raises(EvaluationError, match="unknown lm-eval task"):
        build_evaluator(
            EvaluatorSpec(name="lm-eval", dataset="hellaswag", options={"model_dir": str(folder)}), EvaluationSetup()
        )


def test_task_files_ship_and_point_lm_eval_at_the_data(tmp_path) -> None:
    config = yaml.safe_load((write_task_dir(tmp_path) / f"{LM_TASK_NAME}.yaml").read_text())
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data == (LM_TASKS_DIR / f"{LM_TASK_NAME}.jsonl").resolve()
    items = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(items) == 150 and len({item["id"] for item in items}) == 150
    held_out_lines = {line for source in heldout_sources().values() for line in source.split("\n")}
    for item in items:
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        started = item["context"].rsplit("\n", 1)[1]  # the context ends with the start of the line to complete
        assert started.endswith(" ") and started + item["choices"][item["label"]] in held_out_lines


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the task was generated from Python 3.11's stdlib")
def test_task_generator_reproduces_the_shipped_jsonl(tmp_path) -> None:
    out = tmp_path / "task.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_lm_task.py"), "--out", str(out)], check=True, cwd=REPO)
    assert out.read_bytes() == (LM_TASKS_DIR / f"{LM_TASK_NAME}.jsonl").read_bytes()
