"""The built-in compression techniques, run on a real MLP and CNN trained on scikit-learn's digits."""

from __future__ import annotations

import copy
import io
import itertools
import json
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.registry import ApplyContext, get_technique, list_techniques, parse_config
from robopt.tools.techniques import _layers
from tests.tools.technique_models import (
    DigitsCNN,
    DigitsMLP,
    RecurrentPolicy,
    accuracy,
    as_images,
    load_digits_split,
    train,
)

TECHNIQUES = ["quantize_dynamic_int8", "weight_only_int8", "weight_only_int4", "prune_unstructured", "prune_structured"]


# -- fixtures -------------------------------------------------------------------------------------


def serialized_size(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model, buf)
    return len(buf.getvalue())


def analyze(model: nn.Module, architecture: str, fmt: str = "torch-pickle") -> AnalysisReport:
    """A minimal static analysis (census by leaf class name), as robopt's analysis tool reports it."""
    census: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    for m in model.modules():
        if next(m.children(), None) is None:
            census[type(m).__name__] += 1
            by_type[type(m).__name__] += sum(p.numel() for p in m.parameters(recurse=False))
    tensors = itertools.chain(model.parameters(), model.buffers())
    return AnalysisReport(
        format=fmt,
        source="test",
        param_count=sum(p.numel() for p in model.parameters()),
        size_on_disk_bytes=serialized_size(model),
        size_in_memory_bytes=sum(t.numel() * t.element_size() for t in tensors),
        layer_census=dict(census),
        params_by_layer_type=dict(by_type),
        architecture=architecture,  # type: ignore[arg-type]
    )


class Trained:
    """A trained model with its test data and analysis."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, architecture: str) -> None:
        self.model, self.x, self.y = model, x, y
        self.accuracy = accuracy(model, x, y)
        self.analysis = analyze(model, architecture)
        self.size = serialized_size(model)

    def run(self, name: str, config: dict[str, Any], events: list[dict[str, Any]] | None = None):
        technique = get_technique(name)
        progress = Progress(emit=events.append) if events is not None else Progress()
        context = ApplyContext(analysis=self.analysis, example_inputs=(self.x[:2],), progress=progress)
        return technique.apply(copy.deepcopy(self.model), parse_config(technique, config), context)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def mlp(digits) -> Trained:
    torch.manual_seed(0)
    model = train(DigitsMLP(hidden=256), digits.x_train, digits.y_train, steps=400)
    return Trained(model, digits.x_test, digits.y_test, "mlp-policy")


@pytest.fixture(scope="module")
def cnn(digits) -> Trained:
    torch.manual_seed(0)
    model = train(DigitsCNN(), as_images(digits.x_train), digits.y_train, steps=300)
    return Trained(model, as_images(digits.x_test), digits.y_test, "cnn")


def test_fixtures_learned_the_task(mlp: Trained, cnn: Trained) -> None:
    assert mlp.accuracy > 0.93
    assert cnn.accuracy > 0.95


# -- the table: every technique on real models --------------------------------------------------

# (technique, config, model fixture, largest accepted accuracy drop)
CASES = [
    ("quantize_dynamic_int8", {}, "mlp", 0.02),
    ("quantize_dynamic_int8", {"per_channel": False}, "mlp", 0.02),
    ("quantize_dynamic_int8", {}, "cnn", 0.02),
    ("weight_only_int8", {}, "mlp", 0.02),
    ("weight_only_int8", {"skip_head": False}, "cnn", 0.02),
    ("weight_only_int4", {}, "mlp", 0.03),
    ("weight_only_int4", {"quant_type": "fp4", "blocksize": 128, "double_quant": True}, "mlp", 0.05),
    ("prune_unstructured", {"sparsity": 0.5}, "mlp", 0.05),
    ("prune_unstructured", {"sparsity": 0.3, "scope": "layer"}, "cnn", 0.05),
    # Channel pruning without fine-tuning costs a few points (measured: 2-3 at ratio 0.3).
    ("prune_structured", {"ratio": 0.3}, "mlp", 0.1),
    ("prune_structured", {"ratio": 0.3, "importance": "magnitude_l1", "global_pruning": True}, "cnn", 0.1),
]


@pytest.mark.parametrize(("name", "config", "fixture", "max_drop"), CASES, ids=lambda v: str(v))
def test_technique_table(
    name: str, config: dict, fixture: str, max_drop: float, request: pytest.FixtureRequest
) -> None:
    trained: Trained = request.getfixturevalue(fixture)
    events: list[dict[str, Any]] = []
    result = trained.run(name, config, events)
    model = result.model

    assert result.backend
    assert not model.training
    assert model.input_spec == trained.model.input_spec  # attributes survive
    with torch.no_grad():
        out = model(trained.x)
    assert out.shape == (len(trained.x), 10)
    assert torch.isfinite(out).all()
    assert accuracy(model, trained.x, trained.y) >= trained.accuracy - max_drop
    assert events and all(e["node"] == "" and e["type"] == "progress" for e in events)

    # The artifact store saves whole modules and loads them back with weights_only=False.
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    reloaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(reloaded(trained.x), out)


# -- real effects, technique by technique -------------------------------------------------------


def test_dynamic_int8_shrinks_mlp_and_keeps_accuracy(mlp: Trained) -> None:
    result = mlp.run("quantize_dynamic_int8", {})
    assert mlp.size / serialized_size(result.model) >= 2.5
    assert accuracy(result.model, mlp.x, mlp.y) >= mlp.accuracy - 0.02
    assert result.details["layers_quantized"] == 3
    assert result.backend == f"torch.ao quantize_dynamic int8 ({torch.backends.quantized.engine})"
    assert _layers.quantized_modules(result.model)


def test_dynamic_int8_silences_torch_ao_deprecation(mlp: Trained) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mlp.run("quantize_dynamic_int8", {})
    assert not [w for w in caught if "torch.ao.quantization is deprecated" in str(w.message)]


def test_dynamic_int8_quantizes_lstm_when_asked() -> None:
    torch.manual_seed(0)
    model = RecurrentPolicy().eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        ref = model(x)
    technique = get_technique("quantize_dynamic_int8")
    config = technique.config_cls(layer_types=["Linear", "LSTM"])
    result = technique.apply(model, config, ApplyContext(analysis=analyze(model, "mlp-policy")))
    assert result.details["layers_quantized"] == 2
    with torch.no_grad():
        assert (result.model(x) - ref).abs().max().item() < 0.05


def test_weight_only_int8_shrinks_and_keeps_accuracy(mlp: Trained) -> None:
    result = mlp.run("weight_only_int8", {})
    assert mlp.size / serialized_size(result.model) >= 2.5
    assert accuracy(result.model, mlp.x, mlp.y) >= mlp.accuracy - 0.02


def test_weight_only_int4_packs_weights(mlp: Trained) -> None:
    result = mlp.run("weight_only_int4", {})
    assert mlp.size / serialized_size(result.model) >= 4.0
    assert accuracy(result.model, mlp.x, mlp.y) >= mlp.accuracy - 0.03
    assert result.details["layers_skipped"] == ["head"]
    assert type(result.model.head) is nn.Linear
    packed = result.model.body[0].weight
    assert packed.dtype == torch.uint8 and packed.numel() == 64 * 256 // 2  # two 4-bit values per byte


def test_weight_only_int4_on_head_only_model_is_not_applicable(cnn: Trained) -> None:
    with pytest.raises(TechniqueNotApplicableError, match="skipped head: classifier"):
        cnn.run("weight_only_int4", {})


@pytest.mark.parametrize(("sparsity", "scope"), [(0.5, "global"), (0.8, "global"), (0.3, "layer")])
def test_unstructured_reaches_requested_sparsity(mlp: Trained, sparsity: float, scope: str) -> None:
    result = mlp.run("prune_unstructured", {"sparsity": sparsity, "scope": scope})
    model = result.model
    weights = [model.body[0].weight, model.body[2].weight]
    measured = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert measured == pytest.approx(sparsity, abs=0.01)
    assert result.details["achieved_sparsity"] == pytest.approx(measured, abs=1e-6)
    assert not (model.head.weight == 0).any()  # head skipped by default
    assert not any(hasattr(m, "weight_orig") for m in model.modules())  # pruning made permanent
    assert serialized_size(model) == pytest.approx(mlp.size, rel=0.01)  # dense storage does not shrink


@pytest.mark.parametrize("fixture", ["mlp", "cnn"])
def test_structured_removes_channels_and_keeps_outputs(fixture: str, request: pytest.FixtureRequest) -> None:
    trained: Trained = request.getfixturevalue(fixture)
    ratio = 0.3
    result = trained.run("prune_structured", {"ratio": ratio})
    before, after = result.details["params_before"], result.details["params_after"]
    assert before == sum(p.numel() for p in trained.model.parameters())
    assert after == sum(p.numel() for p in result.model.parameters())
    assert after <= (1 - ratio) * before  # interior layers lose at least `ratio` of their channels
    assert result.details["output_shapes"] == [[2, 10]]
    assert serialized_size(result.model) < trained.size


def test_structured_keeps_frozen_parameters_frozen(mlp: Trained) -> None:
    model = copy.deepcopy(mlp.model).requires_grad_(False)
    technique = get_technique("prune_structured")
    context = ApplyContext(analysis=mlp.analysis, example_inputs=(mlp.x[:2],))
    result = technique.apply(model, technique.default_config(), context)
    assert result.details["params_after"] < result.details["params_before"]
    assert not any(p.requires_grad for p in result.model.parameters())


def test_structured_keeps_tanh_policy_action_shape() -> None:
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(12, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3), nn.Tanh())
    obs = torch.randn(4, 12)
    assert _layers.find_head_layers(policy, (obs,)) == [policy[4]]
    technique = get_technique("prune_structured")
    context = ApplyContext(analysis=analyze(policy, "mlp-policy"), example_inputs=(obs,))
    result = technique.apply(policy, technique.default_config(), context)
    assert result.model(obs).shape == (4, 3)
    assert result.model[0].out_features < 64


def test_structured_needs_example_inputs(mlp: Trained) -> None:
    technique = get_technique("prune_structured")
    with pytest.raises(TechniqueNotApplicableError, match="example inputs") as info:
        technique.apply(copy.deepcopy(mlp.model), technique.default_config(), ApplyContext(analysis=mlp.analysis))
    assert info.value.hint


def test_structured_refuses_transformers(mlp: Trained) -> None:
    analysis = mlp.analysis.model_copy(update={"architecture": "transformer-encoder"})
    appl = get_technique("prune_structured").applicable(analysis)
    assert not appl.applicable
    assert appl.reason == "transformers are pruned by prune_heads (attention heads and MLP channels)"


# -- estimates, applicability, milder ------------------------------------------------------------


def test_estimates_are_consistent_with_the_model(mlp: Trained, cnn: Trained) -> None:
    est = {n: get_technique(n).estimate(mlp.analysis, get_technique(n).default_config()) for n in TECHNIQUES}
    assert 0.25 < est["quantize_dynamic_int8"].size_ratio < 0.3  # the MLP is ~100% Linear parameters
    # Small layers at batch 1: int8 does not pay off on this CPU (measured), so no speed-up is promised ...
    assert est["quantize_dynamic_int8"].speedup < 1.0
    # ... while ~1M-weight layers (or big batches) are expected to run ~2x faster.
    big = mlp.analysis.model_copy(
        update={
            "params_by_layer_type": {k: v * 64 for k, v in mlp.analysis.params_by_layer_type.items()},
            "param_count": mlp.analysis.param_count * 64,
        }
    )
    dynamic_big = get_technique("quantize_dynamic_int8").estimate(
        big, get_technique("quantize_dynamic_int8").default_config()
    )
    assert dynamic_big.speedup > 1.5
    assert est["weight_only_int8"].speedup < 1.0  # honest: slower on CPU
    assert est["weight_only_int4"].size_ratio < est["weight_only_int8"].size_ratio
    assert est["weight_only_int4"].speedup < 1.0
    assert (est["prune_unstructured"].size_ratio, est["prune_unstructured"].speedup) == (1.0, 1.0)
    assert est["prune_structured"].size_ratio == pytest.approx(0.49, abs=0.02)
    assert all(e.note and e.accuracy_risk in ("low", "medium", "high") for e in est.values())
    # On the CNN, Linear layers hold a minority of parameters: dynamic int8 gains much less.
    dynamic = get_technique("quantize_dynamic_int8")
    cnn_est = dynamic.estimate(cnn.analysis, dynamic.default_config())
    assert cnn_est.size_ratio > est["quantize_dynamic_int8"].size_ratio
    assert cnn_est.speedup <= 1.0


@pytest.mark.parametrize("name", TECHNIQUES)
def test_outlook_on_eager_and_torchscript_models(name: str, mlp: Trained) -> None:
    technique = get_technique(name)
    outlook = technique.outlook(mlp.analysis)
    assert outlook.available and outlook.applicable, outlook.reason
    assert outlook.expected_size_ratio is not None and outlook.expected_speedup is not None

    scripted = mlp.analysis.model_copy(update={"format": "torchscript"})
    appl = technique.applicable(scripted)
    assert not appl.applicable and "torchscript" in appl.reason


@pytest.mark.parametrize("name", TECHNIQUES)
def test_already_quantized_models_are_refused(name: str, mlp: Trained) -> None:
    census = {**mlp.analysis.layer_census, "DynamicQuantizedLinear": 3}
    appl = get_technique(name).applicable(mlp.analysis.model_copy(update={"layer_census": census}))
    assert not appl.applicable and "already quantized" in appl.reason

    # torchao keeps the Linear class (only its weight becomes a tensor subclass): caught at apply time.
    technique = get_technique(name)
    context = ApplyContext(analysis=mlp.analysis, example_inputs=(mlp.x[:2],))
    for quantizer in ("quantize_dynamic_int8", "weight_only_int8"):
        quantized = mlp.run(quantizer, {}).model
        with pytest.raises(TechniqueNotApplicableError, match="already quantized"):
            technique.apply(quantized, technique.default_config(), context)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_torchscript_module_is_refused_at_apply(name: str, mlp: Trained) -> None:
    scripted = torch.jit.trace(copy.deepcopy(mlp.model), mlp.x[:2])
    technique = get_technique(name)
    context = ApplyContext(analysis=mlp.analysis, example_inputs=(mlp.x[:2],))
    with pytest.raises(TechniqueNotApplicableError, match=r"eager nn\.Module"):
        technique.apply(scripted, technique.default_config(), context)


@pytest.mark.parametrize(
    ("name", "start", "field", "expected"),
    [
        ("prune_structured", {"ratio": 0.5}, "ratio", [0.3, 0.15]),
        ("prune_structured", {"ratio": 0.8}, "ratio", [0.5, 0.3, 0.15]),
        ("prune_structured", {"ratio": 0.1}, "ratio", []),
        ("prune_unstructured", {"sparsity": 0.9, "scope": "layer"}, "sparsity", [0.7, 0.5, 0.3, 0.15]),
        ("quantize_dynamic_int8", {}, None, []),
        ("weight_only_int8", {}, None, []),
        ("weight_only_int4", {"quant_type": "fp4"}, None, []),
    ],
)
def test_milder_chains_terminate(name: str, start: dict, field: str | None, expected: list[float]) -> None:
    technique = get_technique(name)
    config = parse_config(technique, start)
    seen = []
    for _ in range(10):
        config = technique.milder(config)
        if config is None:
            break
        assert isinstance(config, technique.config_cls)
        assert {k: v for k, v in config.model_dump().items() if k != field} == {
            k: v for k, v in parse_config(technique, start).model_dump().items() if k != field
        }
        seen.append(getattr(config, field))
    assert config is None
    assert seen == expected


# -- configs --------------------------------------------------------------------------------------

CONFIGS = [
    ("quantize_dynamic_int8", {}),
    ("quantize_dynamic_int8", {"layer_types": ["Linear", "LSTM", "GRU"], "per_channel": False}),
    ("weight_only_int8", {"skip_head": True}),
    ("weight_only_int4", {}),
    ("weight_only_int4", {"quant_type": "fp4", "blocksize": 256, "double_quant": True, "skip_head": False}),
    ("prune_unstructured", {"sparsity": 0.25, "scope": "layer", "skip_head": False}),
    ("prune_structured", {"ratio": 0.5, "importance": "magnitude_l1", "global_pruning": True}),
]


@pytest.mark.parametrize(("name", "config"), CONFIGS, ids=lambda v: str(v))
def test_config_json_round_trip(name: str, config: dict) -> None:
    technique = get_technique(name)
    parsed = parse_config(technique, config)
    assert technique.config_cls.model_validate_json(parsed.model_dump_json()) == parsed
    assert parse_config(technique, json.loads(json.dumps(parsed.model_dump()))) == parsed
    default = technique.default_config()
    assert technique.config_cls.model_validate_json(default.model_dump_json()) == default


INVALID = [
    ("prune_unstructured", {"sparsity": 1.5}),
    ("prune_unstructured", {"sparsity": 0.0}),
    ("prune_unstructured", {"scope": "model"}),
    ("prune_structured", {"ratio": 0.95}),
    ("prune_structured", {"importance": "random"}),
    ("weight_only_int4", {"blocksize": 48}),
    ("weight_only_int4", {"quant_type": "int4"}),
    ("quantize_dynamic_int8", {"dtype": "quint8"}),
    ("quantize_dynamic_int8", {"layer_types": []}),
    ("quantize_dynamic_int8", {"layer_types": ["Linear", "Linear"]}),
    ("quantize_dynamic_int8", {"layer_types": ["Conv2d"]}),
]


INVALID += [(name, {"unknown_field": 1}) for name in TECHNIQUES]


@pytest.mark.parametrize(("name", "config"), INVALID, ids=lambda v: str(v))
def test_invalid_configs_are_rejected(name: str, config: dict) -> None:
    with pytest.raises(ValidationError):
        parse_config(get_technique(name), config)


def test_configs_are_frozen() -> None:
    config = get_technique("prune_unstructured").default_config()
    with pytest.raises(ValidationError):
        config.sparsity = 0.9  # type: ignore[misc]


def test_every_technique_registered_once() -> None:
    names = [t.name for t in list_techniques()]
    assert set(TECHNIQUES) <= set(names)
    assert len(names) == len(set(names))
    families = {t.name: t.family for t in list_techniques()}
    assert {families[n] for n in TECHNIQUES} == {"quantization", "pruning"}


def test_weight_only_int4_keeps_layers_narrower_than_a_block_in_fp32() -> None:
    # bitsandbytes' CPU inference fails on rows shorter than one block (a 10-input policy layer, blocksize 64).
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(10, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
    technique = get_technique("weight_only_int4")
    x = torch.randn(1, 10)
    analysis = analyze(policy, "mlp-policy")
    context = ApplyContext(analysis=analysis, example_inputs=(x,))
    result = technique.apply(copy.deepcopy(policy), parse_config(technique, {}), context)
    assert "0" in result.details["layers_skipped"] and type(result.model[0]) is nn.Linear
    assert type(result.model[2]) is not nn.Linear  # the 128-wide layer is packed
    with torch.no_grad():
        out = result.model.eval()(x)
    assert out.shape == (1, 2) and torch.isfinite(out).all()
