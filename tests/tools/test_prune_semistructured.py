"""2:4 semi-structured sparsity (prune_semistructured): the exact pattern on every pruned layer, the kept weights each
score promises, reconstruction error by score on an MLP trained on real digits, a Llama block, save / load, and the
honest report (torch's 2:4 kernels are CUDA only; dense storage on this CPU)."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robopt.calibration.base import CalibrationSet
from robopt.errors import TechniqueNotApplicableError
from robopt.tools import sparsity
from robopt.tools.registry import ApplyContext, get_technique, parse_config
from robopt.tools.techniques.prune_semistructured import cpu_semi_structured_error
from robopt.tools.threads import torch_threads
from tests.tools.technique_models import DigitsMLP, accuracy, load_digits_split, train
from tests.tools.test_techniques import analyze, serialized_size

NAME = "prune_semistructured"


def apply(
    model: nn.Module, config: dict[str, Any], samples, example, architecture: str = "mlp-policy", fmt="torch-pickle"
):
    technique = get_technique(NAME)
    context = ApplyContext(
        analysis=analyze(model, architecture, fmt=fmt),
        example_inputs=example,
        calibration=(lambda n: CalibrationSet(tuple(samples[:n]), "test")) if samples is not None else None,
    )
    return technique.apply(copy.deepcopy(model), parse_config(technique, config), context)


def groups_of_four_have_exactly_two_zeros(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    return bool(((weight.reshape(rows, cols // 4, 4) == 0).sum(dim=2) == 2).all())


@pytest.fixture(scope="module")
def digits():
    data = load_digits_split(seed=0)
    with torch_threads(1):
        torch.manual_seed(0)
        model = train(DigitsMLP(hidden=128), data.x_train, data.y_train, steps=300)
    return data, model, [(x[None],) for x in data.x_train[:256]]


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
def test_every_pruned_row_has_two_zeros_in_every_group_of_four(digits, score: str) -> None:
    data, model, samples = digits
    result = apply(model, {"score": score}, samples, (data.x_test[:2],))
    for name in ("body.0", "body.2"):
        weight = dict(result.model.named_modules())[name].weight
        assert groups_of_four_have_exactly_two_zeros(weight), name
        assert result.details["sparsity_per_layer"][name] == 0.5
    assert result.details["pattern"] == "2:4" and result.details["pattern_holds"] is True
    assert result.details["layers_skipped"] == ["head"] and (result.model.head.weight != 0).all()
    assert accuracy(result.model, data.x_test, data.y_test) > 0.8


def test_magnitude_keeps_the_two_largest_of_each_group(digits) -> None:
    data, model, _ = digits
    result = apply(model, {"score": "magnitude"}, None, (data.x_test[:2],))
    before = model.body[0].weight.detach().abs().reshape(128, 16, 4)
    after = result.model.body[0].weight.detach().reshape(128, 16, 4)
    kept, dropped = before.masked_fill(after == 0, float("inf")), before.masked_fill(after != 0, -1.0)
    assert (dropped.max(dim=2).values <= kept.min(dim=2).values).all()
    assert result.details["calibration_samples"] == 0  # magnitude needs no data


def test_reconstruction_error_by_score_on_held_out_digits(digits) -> None:
    """SparseGPT's updates beat both masks on every layer; Wanda's score beats |W| where inputs differ in scale.

    Measured (body.0, body.2, head): magnitude 0.311 / 0.217 / 0.263, Wanda 0.160 / 0.182 / 0.294, SparseGPT
    0.097 / 0.038 / 0.049. The head's all-positive ReLU inputs are where Wanda's diagonal score is not better."""
    data, model, samples = digits
    x = data.x_test
    with torch.no_grad():
        inputs = [x, model.body[:2](x), model.body(x)]  # what body.0, body.2 and head see in the dense model
    dense = [model.body[0].weight, model.body[2].weight, model.head.weight]
    found = {}
    for score in ("magnitude", "wanda", "sparsegpt"):
        pruned = apply(model, {"score": score, "skip_head": False}, samples, (x[:2],)).model
        new = [pruned.body[0].weight, pruned.body[2].weight, pruned.head.weight]
        with torch.no_grad():  # ||W X - W' X|| / ||W X||
            pairs = zip(inputs, dense, new, strict=True)
            found[score] = [float((i @ (w - v).T).norm() / (i @ w.T).norm()) for i, w, v in pairs]
    for layer in range(3):
        assert found["sparsegpt"][layer] < min(found["wanda"][layer], found["magnitude"][layer]), found
    assert found["wanda"][0] < 0.7 * found["magnitude"][0], found  # blank border pixels cost nothing to prune


def test_on_llama_blocks_pattern_holds_and_result_survives_save_and_load() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
        )  # fmt: skip
        model = LlamaForCausalLM(config).eval()
        windows = [(torch.randint(0, 128, (1, 32)),) for _ in range(16)]
    result = apply(model, {"score": "sparsegpt"}, windows, windows[0], "decoder-llm", "hf-folder")
    assert result.details["layers_pruned"] == 14 and result.details["layers_skipped"] == ["lm_head"]
    for name in result.details["sparsity_per_layer"]:
        assert groups_of_four_have_exactly_two_zeros(dict(result.model.named_modules())[name].weight), name
    buffer = io.BytesIO()
    torch.save(result.model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    ids = torch.cat([windows[1][0], windows[2][0]])
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, loaded(ids).logits)
    assert serialized_size(result.model) == pytest.approx(serialized_size(model), rel=0.01)


def test_layers_whose_width_does_not_split_into_fours_stay_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 30), nn.ReLU(), nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    result = apply(model, {"score": "magnitude"}, None, (torch.rand(2, 16),))
    assert result.details["layers_skipped"] == ["2", "4"]  # 30 inputs; and the head
    assert (result.model[2].weight != 0).all()
    assert groups_of_four_have_exactly_two_zeros(result.model[0].weight)


def test_honest_report_and_estimate(digits) -> None:
    data, model, samples = digits
    result = apply(model, {}, samples, (data.x_test[:2],))
    assert result.details["score"] == "wanda"  # the default
    assert "no speed-up expected on this CPU" in result.details["speedup"]
    error = cpu_semi_structured_error()
    if error is not None:  # torch 2.13 here: "Only CUDA tensors are currently supported"
        assert (
            "fails on this CPU" in result.details["semi_structured_kernel"]
            and error in result.details["semi_structured_kernel"]
        )
    technique = get_technique(NAME)
    estimate = technique.estimate(analyze(model, "mlp-policy"), technique.default_config())
    assert (estimate.size_ratio, estimate.speedup) == (1.0, 1.0)
    assert technique.family == "pruning" and technique.planned_by_default is False


def test_cpu_conversion_to_torch_semi_structured_tensor_is_not_available_here() -> None:
    """Records the environment fact the report relies on: torch's 2:4 tensor needs CUDA."""
    weight = torch.tensor([1.0, 2.0, 0.0, 0.0]).repeat(64, 16).half()
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.sparse.to_sparse_semi_structured(weight)
    assert cpu_semi_structured_error() is not None


def test_scores_needing_data_raise_without_it_and_milder_ladder(digits) -> None:
    data, model, _ = digits
    with pytest.raises(TechniqueNotApplicableError, match="needs calibration inputs"):
        apply(model, {"score": "wanda"}, None, (data.x_test[:2],))
    technique = get_technique(NAME)
    ladder, config = [], parse_config(technique, {"score": "magnitude"})
    while config is not None:
        ladder.append(config.score)
        config = technique.milder(config)
    assert ladder == ["magnitude", "wanda", "sparsegpt"]


@pytest.mark.parametrize(
    "config", [{"n": 4, "m": 4}, {"n": 3, "m": 2}, {"score": "sparsegpt", "blocksize": 6}, {"score": "random"}]
)
def test_bad_configs_are_rejected(config: dict) -> None:
    with pytest.raises(ValidationError):
        parse_config(get_technique(NAME), config)


def test_nm_masks_for_other_patterns() -> None:
    scores = torch.arange(16.0).reshape(2, 8)
    mask = sparsity.nm_prune_mask(scores, 1, 4)
    assert mask.sum().item() == 4 and mask[:, [0, 4]].all()
    assert sparsity.nm_pattern_holds(scores.masked_fill(mask, 0.0), 1, 4)
    assert not sparsity.nm_pattern_holds(scores, 1, 4)
