"""Magnitude pruning (prune_unstructured), global and layer-wise: the ranking each scope promises, measured per layer,
made permanent, reported honestly (no size or speed gain) and surviving torch.save / torch.load."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn

from robopt.errors import TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.registry import ApplyContext, get_technique, parse_config
from tests.tools.technique_models import DigitsCNN
from tests.tools.test_techniques import analyze, serialized_size


class ConvAndLinear(nn.Module):
    """Conv and Linear layers of very different fan-in (so their initial weight scales differ) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = DigitsCNN().features  # Conv(1, 16, 3x3), Conv(16, 32, 3x3), pooled to 32x4x4
        self.body = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.features(x.view(-1, 1, 8, 8)).flatten(1)))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return ConvAndLinear().eval()


def prune(model: nn.Module, config: dict[str, Any], events: list | None = None):
    technique = get_technique("prune_unstructured")
    progress = Progress(emit=events.append, min_interval_s=0) if events is not None else Progress()
    context = ApplyContext(analysis=analyze(model, "cnn"), example_inputs=(torch.rand(2, 64),), progress=progress)
    return technique.apply(copy.deepcopy(model), parse_config(technique, config), context)


def weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach() for n in names}


def test_layer_scope_zeroes_the_same_share_of_every_layer(model: nn.Module) -> None:
    events: list[dict] = []
    result = prune(model, {"sparsity": 0.6, "scope": "layer"}, events)
    pruned = result.details["sparsity_per_layer"]
    assert result.details["layers_skipped"] == ["head"]  # the output layer stays dense
    assert set(pruned) == {"features.0", "features.3", "body.0", "body.2"}
    before, after = weights(model, list(pruned)), weights(result.model, list(pruned))
    for name, w in after.items():
        zeros = int((w == 0).sum())
        assert zeros == round(0.6 * w.numel()), name
        assert pruned[name] == pytest.approx(zeros / w.numel(), abs=1e-6)
        # within the layer, every zeroed weight was smaller in magnitude than every kept one
        assert before[name].abs()[w == 0].max() <= before[name].abs()[w != 0].min()
    assert [e["current"] for e in events if e["stage"] == "prune_unstructured"] == [0, 1, 2, 3, 4]


def test_global_scope_uses_one_threshold_across_layers(model: nn.Module) -> None:
    result = prune(model, {"sparsity": 0.6, "scope": "global"})
    per_layer = result.details["sparsity_per_layer"]
    before, after = weights(model, list(per_layer)), weights(result.model, list(per_layer))
    largest_pruned = max(float(before[n].abs()[after[n] == 0].max()) for n in per_layer)
    smallest_kept = min(float(before[n].abs()[after[n] != 0].min()) for n in per_layer)
    assert largest_pruned <= smallest_kept
    total = sum(w.numel() for w in after.values())
    assert sum(int((w == 0).sum()) for w in after.values()) == round(0.6 * total)
    assert result.details["achieved_sparsity"] == pytest.approx(0.6, abs=1e-4)
    # layers of large fan-in start with small weights, so one threshold prunes them far more than the rest
    assert per_layer["features.0"] < 0.2 and per_layer["body.0"] > 0.6
    assert max(per_layer.values()) - min(per_layer.values()) > 0.4


def test_result_is_permanent_honest_and_survives_save_and_load(model: nn.Module) -> None:
    result = prune(model, {"sparsity": 0.5})
    assert not any(hasattr(m, "weight_orig") or m._forward_pre_hooks for m in result.model.modules())
    assert "no speed-up expected on this CPU" in result.details["speedup"]
    assert "dense" in result.details["storage"]
    assert serialized_size(result.model) == pytest.approx(serialized_size(model), rel=0.01)
    technique = get_technique("prune_unstructured")
    estimate = technique.estimate(analyze(model, "cnn"), technique.default_config())
    assert (estimate.size_ratio, estimate.speedup) == (1.0, 1.0)
    buffer = io.BytesIO()
    torch.save(result.model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.rand(5, 64)
    with torch.no_grad():
        assert torch.equal(result.model(x), loaded(x))
    assert torch.equal(loaded.body[0].weight == 0, result.model.body[0].weight == 0)


def test_not_applicable_cases(model: nn.Module) -> None:
    technique = get_technique("prune_unstructured")
    assert not technique.applicable(analyze(model, "cnn", fmt="onnx")).applicable
    head_only = nn.Sequential(nn.Linear(64, 10))
    with pytest.raises(TechniqueNotApplicableError, match="after skipping the head"):
        prune(head_only, {})
    assert int((prune(head_only, {"skip_head": False}).model[0].weight == 0).sum()) == 320
