"""The embedding-fidelity evaluator on the zoo's all-MiniLM-L6-v2 and on its quantized and noised variants."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from robopt import zoo
from robopt.errors import EvaluationError
from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, build_evaluator, evaluator_needs_reference
from robopt.evaluation.embedding import SENTENCES_FILE, load_sentences
from robopt.progress import Progress
from robopt.tools.loading import load_model
from robopt.tools.onnx_module import OnnxModule


@pytest.fixture(scope="module")
def minilm(data_dir):
    folder, card = zoo.resolve("minilm", data_dir / "zoo")
    return folder, card, load_model(folder).module


@pytest.fixture(scope="module")
def evaluator(minilm):
    _, card, model = minilm
    return build_evaluator(card.evaluator, EvaluationSetup(reference=model, input_spec=card.input_spec))


@pytest.fixture(scope="module")
def original_metrics(evaluator, minilm):
    return evaluator.evaluate(minilm[2], Progress())


def _spec(folder: Path, **options) -> EvaluatorSpec:
    return EvaluatorSpec(name="embedding-fidelity", dataset="sentences", options={"model_dir": str(folder), **options})


def _noised(model: nn.Module, scale: float) -> nn.Module:
    """Gaussian noise on every weight matrix, `scale` times the matrix's own standard deviation."""
    noised = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in noised.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return noised


def _dynamic_int8(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notices
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _torchao_int8_weight_only(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8WeightOnlyConfig())
    return quantized


def test_original_agrees_with_itself(evaluator, original_metrics) -> None:
    assert evaluator.primary_metric == "mean_cosine" and evaluator.higher_is_better
    assert evaluator_needs_reference("embedding-fidelity")
    assert original_metrics["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert original_metrics["min_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert original_metrics["topk_agreement"] == 1.0
    assert original_metrics["nonfinite_outputs"] == 0.0
    assert original_metrics["samples"] == len(load_sentences("sentences"))


def test_bundled_sentences_form_retrievable_paraphrase_groups(evaluator) -> None:
    """Under the original's embeddings, nearly every sentence's nearest neighbour is in its own group."""
    groups = [
        [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
        for block in SENTENCES_FILE.read_text().split("\n\n")
    ]
    groups = [g for g in groups if g]
    sentences = [s for g in groups for s in g]
    assert sentences == load_sentences("sentences") == evaluator.sentences
    assert 150 <= len(sentences) <= 300 and len(set(sentences)) == len(sentences)
    group_of = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    unit = torch.nn.functional.normalize(evaluator.reference_embeddings(Progress()), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    same_group = group_of[similarity.argmax(dim=1)] == group_of
    assert same_group.double().mean() > 0.95


@pytest.fixture(scope="module")
def variants(minilm):
    model = minilm[2]
    return {
        "torchao_int8_weight_only": _torchao_int8_weight_only(model),
        "dynamic_int8": _dynamic_int8(model),
        "noise_2pct": _noised(model, 0.02),
        "noise_10pct": _noised(model, 0.10),
    }


@pytest.fixture(scope="module")
def variant_metrics(evaluator, variants):
    return {name: evaluator.evaluate(model, Progress()) for name, model in variants.items()}


def test_quantized_and_noised_models_rank_below_the_original(variant_metrics, original_metrics) -> None:
    for metrics in variant_metrics.values():
        assert metrics["nonfinite_outputs"] == 0.0
        assert 0.0 < metrics["min_cosine"] <= metrics["mean_cosine"] < original_metrics["mean_cosine"] - 1e-4
        assert 0.0 < metrics["topk_agreement"] <= 1.0
    cosine = {name: metrics["mean_cosine"] for name, metrics in variant_metrics.items()}
    # weight-only int8 keeps activations in float, so it stays closer to the original than dynamic int8
    assert cosine["torchao_int8_weight_only"] > cosine["dynamic_int8"]
    assert cosine["noise_2pct"] > cosine["noise_10pct"]
    assert variant_metrics["noise_2pct"]["topk_agreement"] > variant_metrics["noise_10pct"]["topk_agreement"]
    assert variant_metrics["dynamic_int8"]["topk_agreement"] < 1.0


def test_deterministic_and_reference_computed_once(minilm, variants, variant_metrics) -> None:
    folder, card, model = minilm
    events: list[dict] = []
    progress = Progress(emit=events.append, min_interval_s=0)
    fresh = build_evaluator(_spec(folder), EvaluationSetup(reference=model, input_spec=card.input_spec))
    assert fresh.evaluate(variants["dynamic_int8"], progress) == variant_metrics["dynamic_int8"]
    assert fresh.evaluate(variants["dynamic_int8"], progress) == variant_metrics["dynamic_int8"]
    stages = [e["stage"] for e in events]
    batches = len(fresh.batches)
    assert stages.count("reference") == batches + 1 and stages.count("evaluate") == 2 * (batches + 1)


def test_k_option_and_text_file_dataset(minilm, variants, tmp_path) -> None:
    folder, _, model = minilm
    text = (
        "# a comment\nA robot picks up a cup.\n\nThe robot grasps the mug.\nIt is raining.\nThe rain keeps falling.\n"
    )
    (tmp_path / "four.txt").write_text(text)
    spec = EvaluatorSpec(
        name="embedding-fidelity", dataset=str(tmp_path / "four.txt"), options={"model_dir": str(folder), "k": 1}
    )
    evaluator = build_evaluator(spec, EvaluationSetup(reference=model))
    assert evaluator.sentences == [
        "A robot picks up a cup.",
        "The robot grasps the mug.",
        "It is raining.",
        "The rain keeps falling.",
    ]
    metrics = evaluator.evaluate(variants["noise_2pct"], Progress())
    assert metrics["samples"] == 4.0 and metrics["topk_agreement"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert metrics["mean_cosine"] < 1.0


_NO_MODEL_DIR = object()


@pytest.mark.parametrize(
    ("options", "dataset", "message"),
    [
        ({"model_dir": None}, "sentences", "needs options.model_dir"),
        ({"model_dir": _NO_MODEL_DIR}, "sentences", "needs options.model_dir"),
        ({"model_dir": "/nonexistent/folder"}, "sentences", "is not a folder"),
        ({"k": 0}, "sentences", "invalid options"),
        ({"batch_size": -1}, "sentences", "invalid options"),
        ({"temperature": 1.0}, "sentences", "invalid options"),
        ({"k": 240}, "sentences", "needs more than 240 sentences"),
        ({}, "digits", "unknown dataset 'digits'"),
        ({}, "/nonexistent/sentences.txt", "cannot read sentences"),
    ],
)
def test_bad_options_and_data(minilm, options, dataset, message) -> None:
    folder, card, model = minilm
    options = {k: v for k, v in {"model_dir": str(folder), **options}.items() if v is not _NO_MODEL_DIR}
    spec = EvaluatorSpec(name="embedding-fidelity", dataset=dataset, options=options)
    with pytest.raises(EvaluationError, match=message) as err:
        build_evaluator(spec, EvaluationSetup(reference=model, input_spec=card.input_spec))
    assert err.value.hint


def test_folder_without_tokenizer_and_missing_reference(minilm, tmp_path) -> None:
    folder, _, model = minilm
    with pytest.raises(EvaluationError, match="cannot load a tokenizer"):
        build_evaluator(_spec(tmp_path), EvaluationSetup(reference=model))
    with pytest.raises(EvaluationError, match="compares against the original model"):
        build_evaluator(_spec(folder), EvaluationSetup(reference=None))


class _Pooled(nn.Module):
    """Returns one vector per sequence instead of per-token hidden states."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], 384)


class _NeedsMask(nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, 384)


class _NaNs(nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.full((*input_ids.shape, 384), float("nan"))


def test_models_that_cannot_be_compared(evaluator) -> None:
    with pytest.raises(EvaluationError, match=r"returned \[\d+, 384\]") as err:
        evaluator.evaluate(_Pooled(), Progress())
    assert "output-fidelity" in (err.value.hint or "")
    with pytest.raises(EvaluationError, match="the model failed on inputs") as err:
        evaluator.evaluate(_NeedsMask(), Progress())
    assert "model(input_ids)" in (err.value.hint or "")
    with pytest.raises(EvaluationError, match="8-dimensional, the original's 384"):
        evaluator.evaluate(nn.Embedding(30522, 8), Progress())
    metrics = evaluator.evaluate(_NaNs(), Progress())
    assert metrics["nonfinite_outputs"] == 1.0 and "mean_cosine" not in metrics


def _tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(30522, 32), nn.Linear(32, 32)).eval()


def test_onnx_export_with_fixed_batch_and_dynamic_length(minilm, tmp_path) -> None:
    folder, _, _ = minilm
    encoder = _tiny_encoder()
    path = tmp_path / "encoder.onnx"
    example = torch.zeros(1, 12, dtype=torch.int64)
    torch.onnx.export(
        encoder,
        (example,),
        str(path),
        input_names=["input_ids"],
        dynamic_axes={"input_ids": {1: "tokens"}},
        dynamo=False,
    )
    evaluator = build_evaluator(_spec(folder), EvaluationSetup(reference=encoder))
    metrics = evaluator.evaluate(OnnxModule(path), Progress())
    assert metrics["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["topk_agreement"] > 0.99

    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(
        encoder, (torch.zeros(1, 128, dtype=torch.int64),), str(fixed), input_names=["input_ids"], dynamo=False
    )
    with pytest.raises(EvaluationError, match="the model failed on inputs") as err:
        evaluator.evaluate(OnnxModule(fixed), Progress())
    assert "dynamic batch and sequence axes" in (err.value.hint or "")
