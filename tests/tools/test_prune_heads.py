"""prune_heads on the zoo's tiny-lm (Llama) and minilm (BERT): exact parameter cuts, updated configs that reload
with plain transformers and give identical outputs, and recovery that improves held-out fidelity to the teacher."""

from __future__ import annotations

import copy
import io
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robopt import zoo
from robopt.calibration import calibration_source
from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.example_inputs import make_example_inputs
from robopt.tools.loading import load_model
from robopt.tools.registry import ApplyContext, get_technique, parse_config
from robopt.training.fit import collate, distillation_loss, primary

TECHNIQUE = get_technique("prune_heads")


def analysis_of(model: nn.Module, architecture: str, inputs: tuple[torch.Tensor, ...]) -> AnalysisReport:
    """The census and output shape robopt's analysis reports (what estimate() and applicable() read)."""
    census: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    for m in model.modules():
        if next(m.children(), None) is None:
            census[type(m).__name__] += 1
            by_type[type(m).__name__] += sum(p.numel() for p in m.parameters(recurse=False))
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        shape = list(primary(model(*inputs)).shape)
    return AnalysisReport(
        format="hf-folder",
        source="zoo",
        param_count=params,
        size_on_disk_bytes=4 * params,
        size_in_memory_bytes=4 * params,
        layer_census=dict(census),
        params_by_layer_type=dict(by_type),
        architecture=architecture,  # type: ignore[arg-type]
        output_shapes=[shape],
    )


class HFZoo:
    """A zoo HF folder loaded as robopt loads it, with analysis, example inputs and the run's calibration source."""

    def __init__(self, name: str, architecture: str, data_dir: Path, sequence_length: int | None = None) -> None:
        self.folder, self.card = zoo.resolve(name, data_dir / "zoo")
        self.model = load_model(self.folder).module.eval()
        self.inputs = tuple(make_example_inputs(self.card.input_spec, 0))
        self.analysis = analysis_of(self.model, architecture, self.inputs)
        self.calibration = calibration_source(
            self.card.evaluator, self.card.input_spec, data_dir, 0, sequence_length=sequence_length
        )
        self.fresh = calibration_source(  # other windows of the training corpus, never seen by the technique
            self.card.evaluator, self.card.input_spec, data_dir, 99, sequence_length=sequence_length
        )

    def prune(self, config: dict[str, Any], calibration: bool = True) -> Any:
        context = ApplyContext(
            analysis=self.analysis,
            example_inputs=self.inputs,
            calibration=self.calibration if calibration else None,
            progress=Progress(),
        )
        return TECHNIQUE.apply(copy.deepcopy(self.model), parse_config(TECHNIQUE, config), context)

    def fidelity_loss(self, model: nn.Module, kind: str, n: int = 24) -> float:
        """Distillation loss against the original model on fresh training-corpus windows (a perplexity proxy)."""
        batch = collate(list(self.fresh(n).samples))
        with torch.no_grad():
            return float(distillation_loss(primary(model(*batch)), primary(self.model(*batch)), kind, 2.0))


@pytest.fixture(scope="module")
def tiny(data_dir: Path) -> HFZoo:
    return HFZoo("tiny-lm", "decoder-llm", data_dir)


@pytest.fixture(scope="module")
def minilm(data_dir: Path) -> HFZoo:
    return HFZoo("minilm", "transformer-encoder", data_dir, sequence_length=32)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return primary(model(*inputs))


def assert_reloads_identically(model: nn.Module, inputs: tuple[torch.Tensor, ...], tmp_path: Path) -> nn.Module:
    """save_pretrained -> plain transformers Auto class from_pretrained, and torch.save -> torch.load: same outputs."""
    from transformers import AutoModel, AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if hasattr(model, "lm_head") else AutoModel
    again = auto.from_pretrained(tmp_path).eval()
    assert type(again) is type(model) and type(again).__module__.startswith("transformers.models.")
    expected = outputs(model, inputs)
    assert torch.isfinite(expected).all()
    assert (outputs(again, inputs) - expected).abs().max() <= 1e-6
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(outputs(torch.load(buffer, weights_only=False), inputs), expected)
    return again


# -- Llama (tiny-lm) -------------------------------------------------------------------------------------------------


def test_llama_heads_and_channels_removed_config_updated_and_reloads(tiny: HFZoo, tmp_path: Path) -> None:
    config = tiny.model.config
    hidden, head_dim, layers = config.hidden_size, config.head_dim, config.num_hidden_layers
    heads, intermediate = config.num_attention_heads, config.intermediate_size
    result = tiny.prune({"importance": "magnitude", "recovery_steps": 0})
    pruned = result.model
    # Automatic heads_ratio 0.5 and mlp_ratio 0.5: 4 -> 2 heads, 384 -> 192 channels in every layer.
    new = pruned.config
    assert (new.num_attention_heads, new.num_key_value_heads, new.intermediate_size) == (heads // 2, heads // 2, 192)
    assert new.head_dim == head_dim and new.hidden_size == hidden
    assert tiny.model.config.num_attention_heads == heads  # the input model's config is untouched
    removed_attention = 4 * (heads - heads // 2) * head_dim * hidden  # q, k, v rows and o columns
    removed_mlp = 3 * (intermediate - 192) * hidden  # gate, up rows and down columns (no biases)
    assert params(tiny.model) - params(pruned) == layers * (removed_attention + removed_mlp)
    assert result.details["params_after"] == params(pruned)
    assert result.details["config_updates"] == {
        "intermediate_size": 192,
        "num_attention_heads": heads // 2,
        "num_key_value_heads": heads // 2,
    }
    assert all(len(kept["kv_groups"]) == heads // 2 for kept in result.details["kept_per_layer"].values())
    estimate = TECHNIQUE.estimate(tiny.analysis, TECHNIQUE.default_config())
    assert estimate.size_ratio == pytest.approx(result.details["param_ratio"], abs=0.01)

    again = assert_reloads_identically(pruned, tiny.inputs, tmp_path)
    generated = again.generate(tiny.inputs[0][:, :8], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 14)


def test_llama_recovery_improves_fidelity(tiny: HFZoo) -> None:
    config = {"recovery_steps": 0, "calibration_samples": 96, "importance_samples": 32}
    unrecovered = tiny.prune(config)
    recovered = tiny.prune({**config, "recovery_steps": 40})
    assert recovered.details["after"] == unrecovered.details["after"]  # same ranking, same sizes
    (round_,) = recovered.details["rounds"]
    assert round_["heldout_loss_pruned"] == pytest.approx(unrecovered.details["rounds"][0]["heldout_loss_pruned"])
    assert round_["heldout_loss_recovered"] < 0.7 * round_["heldout_loss_pruned"]
    assert recovered.details["teacher_data"]["loss"] == "kl"
    before, after = tiny.fidelity_loss(unrecovered.model, "kl"), tiny.fidelity_loss(recovered.model, "kl")
    assert after < 0.8 * before, (before, after)
    assert torch.isfinite(outputs(recovered.model, tiny.inputs)).all()


def test_llama_grouped_kv_heads_are_pruned_by_group(tmp_path: Path) -> None:
    """Grouped-query attention: a key/value head goes together with its query heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    inputs = (torch.randint(0, 64, (1, 12)),)
    analysis = analysis_of(model, "decoder-llm", inputs)
    context = ApplyContext(analysis=analysis, example_inputs=inputs)
    options = {"importance": "magnitude", "heads_ratio": 0.5, "mlp_ratio": 0.5, "recovery_steps": 0}
    result = TECHNIQUE.apply(model, parse_config(TECHNIQUE, options), context)
    new = result.model.config
    assert (new.num_attention_heads, new.num_key_value_heads, new.intermediate_size) == (4, 2, 64)
    attention = result.model.model.layers[0].self_attn
    d = config.head_dim  # 64 / 8
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (
        4 * d,
        2 * d,
        4 * d,
    )
    assert_reloads_identically(result.model, inputs, tmp_path)


# -- BERT (minilm) -----------------------------------------------------------------------------------------------------


def test_bert_mlp_channels_removed_and_reloads(minilm: HFZoo, tmp_path: Path) -> None:
    config = minilm.model.config
    hidden, layers, intermediate = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    result = minilm.prune({"importance": "magnitude", "recovery_steps": 0})
    new = result.model.config
    assert new.intermediate_size == intermediate // 2
    assert new.num_attention_heads == config.num_attention_heads  # BERT keeps its heads
    removed = intermediate // 2
    assert params(minilm.model) - params(result.model) == layers * (2 * removed * hidden + removed)  # + dense bias
    assert "BertSelfAttention" in result.details["heads_kept_because"]
    estimate = TECHNIQUE.estimate(minilm.analysis, TECHNIQUE.default_config())
    assert estimate.size_ratio == pytest.approx(result.details["param_ratio"], abs=0.01)
    assert_reloads_identically(result.model, minilm.inputs, tmp_path)


def test_bert_recovery_improves_fidelity(minilm: HFZoo) -> None:
    config = {"mlp_ratio": 0.75, "calibration_samples": 40, "importance_samples": 8, "batch_size": 4}
    unrecovered = minilm.prune({**config, "recovery_steps": 0})
    recovered = minilm.prune({**config, "recovery_steps": 15})
    assert recovered.model.config.intermediate_size == 384
    (round_,) = recovered.details["rounds"]
    assert round_["heldout_loss_recovered"] < round_["heldout_loss_pruned"]
    assert recovered.details["teacher_data"]["loss"] == "mse"
    before, after = minilm.fidelity_loss(unrecovered.model, "mse", 8), minilm.fidelity_loss(recovered.model, "mse", 8)
    assert after < before, (before, after)


def test_bert_refuses_explicit_head_pruning(minilm: HFZoo) -> None:
    with pytest.raises(TechniqueNotApplicableError, match="standard config") as info:
        minilm.prune({"heads_ratio": 0.25, "importance": "magnitude", "recovery_steps": 0})
    assert "heads_ratio" in info.value.hint


# -- errors and config -----------------------------------------------------------------------------------------------


def test_activation_importance_needs_training_inputs(tiny: HFZoo) -> None:
    with pytest.raises(TechniqueNotApplicableError, match="training inputs"):
        tiny.prune({"recovery_steps": 0}, calibration=False)


def test_plain_torch_modules_are_refused(tiny: HFZoo) -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    context = ApplyContext(analysis=tiny.analysis, example_inputs=(torch.randn(1, 4),))
    with pytest.raises(TechniqueNotApplicableError, match="Hugging Face"):
        TECHNIQUE.apply(mlp, TECHNIQUE.default_config(), context)
    assert not TECHNIQUE.applicable(tiny.analysis.model_copy(update={"architecture": "cnn"})).applicable
    assert TECHNIQUE.applicable(tiny.analysis).applicable


def test_config_validation_and_milder_ladder() -> None:
    with pytest.raises(ValidationError):
        parse_config(TECHNIQUE, {"heads_ratio": 0.0, "mlp_ratio": 0.0})
    with pytest.raises(ValidationError):
        parse_config(TECHNIQUE, {"mlp_ratio": 0.95})
    config = parse_config(TECHNIQUE, {"heads_ratio": 0.5, "mlp_ratio": 0.75})
    ladder = []
    while (config := TECHNIQUE.milder(config)) is not None:
        ladder.append((config.heads_ratio, config.mlp_ratio))
    assert ladder == [(0.3, 0.5), (0.15, 0.3), (0.0, 0.15)]
    auto = TECHNIQUE.milder(TECHNIQUE.default_config())
    assert auto is not None and auto.heads_ratio is None and auto.mlp_ratio == 0.3
    assert TECHNIQUE.config_cls.model_validate_json(auto.model_dump_json()) == auto
