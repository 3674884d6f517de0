"""Wanda and SparseGPT against magnitude pruning at equal sparsity: per-layer reconstruction error on held-out inputs
(the papers' defining property) and task quality, on the zoo's tiny-lm and on an MLP trained on real digits.

Measured here (tiny-lm, 50% of every decoder Linear, 32 training-corpus windows; errors ||W X - W' X|| / ||W X|| on 32
other windows, perplexity on 32 held-out stdlib windows): SparseGPT halves magnitude's error on every layer (mean
0.067 vs 0.135) and keeps perplexity near the dense model's (86.75 vs dense 86.23; magnitude 89.00). Wanda's score
only pays where input features differ in scale: tiny-lm's RMSNorm outputs barely do (largest feature norm 1.3-2.2x
the median), so Wanda is on a par with magnitude there (mean error 0.134, perplexity 88.99; ranked per layer, its error
is below magnitude's on every layer, mean 0.126) and clearly better on the digits MLP's first layer, whose pixel
inputs range from always-blank borders to busy centres.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robopt import zoo
from robopt.calibration.base import CalibrationSet
from robopt.calibration.providers import calibration_source
from robopt.errors import CancelledError, TechniqueNotApplicableError
from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, build_evaluator
from robopt.evaluation.language_model import fill_model_dir
from robopt.progress import Progress
from robopt.tools import sparsity
from robopt.tools.loading import load_model
from robopt.tools.registry import ApplyContext, TechniqueResult, get_technique, parse_config
from robopt.tools.threads import torch_threads
from tests.tools.technique_models import DigitsMLP, accuracy, load_digits_split, train
from tests.tools.test_techniques import analyze, serialized_size

SPARSITY = 0.5


def run(name: str, config: dict[str, Any], model: nn.Module, analysis, samples, example, progress=None):
    technique = get_technique(name)
    context = ApplyContext(
        analysis=analysis,
        example_inputs=example,
        calibration=(lambda n: CalibrationSet(tuple(samples[:n]), "test")) if samples is not None else None,
        progress=progress or Progress(),
    )
    return technique.apply(copy.deepcopy(model), parse_config(technique, config), context)


def dense_inputs(model: nn.Module, names: list[str], samples) -> dict[str, torch.Tensor]:
    """Each named Linear's inputs, [tokens, in_features], when `model` runs on `samples`."""
    layers = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        layers[n].register_forward_pre_hook(lambda _m, i, n=n: captured[n].append(i[0].reshape(-1, i[0].shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        for sample in samples:
            model(*sample)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in captured.items()}


def errors(dense: nn.Module, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """||W X - W' X|| / ||W X|| per layer on the held-out inputs X of the dense model."""
    layers = dict(dense.named_modules())
    out = {}
    with torch.no_grad():
        for name, x in inputs.items():
            w = layers[name].weight
            out[name] = float((x @ (w - weights[name]).T).norm() / (x @ w.T).norm())
    return out


def pruned_weights(result: TechniqueResult, names: list[str]) -> dict[str, torch.Tensor]:
    layers = dict(result.model.named_modules())
    return {n: layers[n].weight.detach() for n in names}


# -- tiny-lm ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(data_dir):
    """tiny-lm with 32 calibration windows for pruning and 32 other windows for measuring, its analysis and its
    perplexity evaluator (32 held-out stdlib windows)."""
    folder, card = zoo.resolve("tiny-lm", data_dir / "zoo")
    model = load_model(folder).module.eval()
    windows = calibration_source(fill_model_dir(card.evaluator, folder), card.input_spec, data_dir, seed=0)(64).samples
    perplexity = build_evaluator(
        EvaluatorSpec(name="perplexity", dataset="stdlib-heldout", options={"model_dir": str(folder), "windows": 32}),
        EvaluationSetup(),
    )
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    return {
        "model": model,
        "analysis": analyze(model, "decoder-llm", fmt="hf-folder"),
        "train": list(windows[:32]),
        "example": windows[0],
        "names": names,
        "inputs": dense_inputs(model, names, windows[32:]),
        "perplexity": lambda m: perplexity.evaluate(m, Progress())["perplexity"],
    }


@pytest.fixture(scope="module")
def lm_results(lm):
    """Magnitude (layer-wise), Wanda (per row and per layer) and SparseGPT at 50%: results, errors, perplexity."""
    configs = {
        "magnitude": ("prune_unstructured", {"sparsity": SPARSITY, "scope": "layer"}),
        "wanda": ("prune_wanda", {"sparsity": SPARSITY}),
        "wanda_layer": ("prune_wanda", {"sparsity": SPARSITY, "comparison": "layer"}),
        "sparsegpt": ("prune_sparsegpt", {"sparsity": SPARSITY}),
    }
    out = {"dense": {"perplexity": lm["perplexity"](lm["model"])}}
    for label, (name, config) in configs.items():
        result = run(name, config, lm["model"], lm["analysis"], lm["train"], lm["example"])
        out[label] = {
            "result": result,
            "errors": errors(lm["model"], pruned_weights(result, lm["names"]), lm["inputs"]),
            "perplexity": lm["perplexity"](result.model),
        }
    return out


def test_sparsegpt_reconstructs_every_tiny_lm_layer_better_than_magnitude_and_wanda(lm, lm_results) -> None:
    mag, wanda, sgpt = (lm_results[k]["errors"] for k in ("magnitude", "wanda", "sparsegpt"))
    assert len(sgpt) == 14  # q, k, v, o, gate, up, down of both decoder layers
    for name in lm["names"]:
        assert sgpt[name] < 0.8 * mag[name], name  # measured: 0.03-0.09 vs 0.12-0.16
        assert sgpt[name] < wanda[name], name
    assert sum(sgpt.values()) < 0.6 * sum(mag.values())


def test_wanda_score_beats_magnitude_within_the_same_comparison_group(lm, lm_results) -> None:
    """Wanda's score against |W| with the same ranking group: per layer (both techniques), and per output row
    (magnitude per row computed here from the dense weights)."""
    mag, wanda_layer = lm_results["magnitude"]["errors"], lm_results["wanda_layer"]["errors"]
    assert all(wanda_layer[n] < mag[n] for n in lm["names"]), {n: (wanda_layer[n], mag[n]) for n in lm["names"]}
    layers = dict(lm["model"].named_modules())
    row_magnitude = {
        n: layers[n].weight.detach().masked_fill(sparsity.row_prune_mask(layers[n].weight.abs(), SPARSITY), 0.0)
        for n in lm["names"]
    }
    mag_row = errors(lm["model"], row_magnitude, lm["inputs"])
    wanda_row = lm_results["wanda"]["errors"]
    assert sum(wanda_row[n] < mag_row[n] for n in lm["names"]) >= 12
    assert sum(wanda_row.values()) < sum(mag_row.values())


def test_held_out_perplexity_at_equal_sparsity(lm_results) -> None:
    dense = lm_results["dense"]["perplexity"]
    mag, wanda, sgpt = (lm_results[k]["perplexity"] for k in ("magnitude", "wanda", "sparsegpt"))
    assert dense < sgpt < mag  # measured: 86.23 < 86.75 < 89.00
    assert sgpt - dense < 0.5 * (mag - dense)
    # Wanda is on a par with magnitude on tiny-lm (no outlier features; measured 88.99 vs 89.00), never far off
    assert wanda < mag * 1.02


def test_details_report_measured_sparsity_and_no_speedup(lm, lm_results) -> None:
    for label in ("wanda", "sparsegpt"):
        result = lm_results[label]["result"]
        details = result.details
        assert details["layers_skipped"] == ["lm_head"]
        assert set(details["sparsity_per_layer"]) == set(lm["names"])
        for name, share in details["sparsity_per_layer"].items():
            weight = dict(result.model.named_modules())[name].weight
            assert share == pytest.approx(float((weight == 0).float().mean()), abs=1e-6)
            assert share == pytest.approx(SPARSITY, abs=0.01)
        assert (dict(result.model.named_modules())["lm_head"].weight != 0).all()
        assert "no speed-up expected on this CPU" in details["speedup"]
        assert set(details["reconstruction_error_per_layer"]) == set(lm["names"])
        assert details["calibration_samples"] == 32 and details["sequential"] is True
        # the reported errors are measured on the calibration inputs; on held-out ones they are close
        held_out = lm_results[label]["errors"]
        assert details["mean_reconstruction_error"] == pytest.approx(sum(held_out.values()) / len(held_out), rel=0.2)
        assert serialized_size(result.model) == pytest.approx(serialized_size(lm["model"]), rel=0.01)
    estimate = get_technique("prune_sparsegpt").estimate(
        lm["analysis"], get_technique("prune_sparsegpt").default_config()
    )
    assert (estimate.size_ratio, estimate.speedup) == (1.0, 1.0)
    assert "do not shrink dense storage" in estimate.note


def test_sparsegpt_result_survives_save_and_load(lm, lm_results) -> None:
    model = lm_results["sparsegpt"]["result"].model
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    ids = torch.cat([lm["train"][0][0], lm["train"][1][0]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert sparsity.zero_share([loaded.model.layers[0].mlp.up_proj.weight]) == pytest.approx(SPARSITY, abs=0.01)


def test_decoder_layers_are_pruned_one_block_after_another(lm) -> None:
    """A group is one decoder layer; each group's calibration pass reports progress, and cancelling stops the run."""
    model = lm["model"]
    layers = {n: m for n, m in model.named_modules() if n in lm["names"]}
    order, once = sparsity.execution_order(model, layers, lm["example"])
    groups = sparsity.layer_groups(model, order)
    assert once and [len(g) for g in groups] == [7, 7]
    assert all(n.startswith("model.layers.0.") for n in groups[0])
    events: list[dict] = []
    progress = Progress(emit=events.append, min_interval_s=0)
    run("prune_wanda", {"samples": 8}, model, lm["analysis"], lm["train"], lm["example"], progress)
    messages = [e["message"] for e in events if e["stage"] == "prune_wanda" and e.get("message")]
    assert [m.split(":")[0] for m in messages] == ["group 1/2", "group 2/2"]
    assert any(e["stage"] == "prune_wanda: calibrate group 2/2" and e.get("current") == 1 for e in events)
    progress = Progress(min_interval_s=0)
    progress.cancel.set()
    with pytest.raises(CancelledError):
        run("prune_sparsegpt", {"samples": 8}, model, lm["analysis"], lm["train"], lm["example"], progress)


# -- an MLP on real digits -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_mlp():
    data = load_digits_split(seed=0)
    with torch_threads(1):
        torch.manual_seed(0)
        model = train(DigitsMLP(hidden=128), data.x_train, data.y_train, steps=300)
    names = ["body.0", "body.2", "head"]
    return {
        "model": model,
        "data": data,
        "analysis": analyze(model, "mlp-policy"),
        "train": [(x[None],) for x in data.x_train[:256]],
        "example": (data.x_test[:2],),
        "names": names,
        "inputs": dense_inputs(model, names, [(data.x_test,)]),
    }


def _mlp_run(mlp, name: str, config: dict[str, Any]) -> TechniqueResult:
    return run(name, {**config, "skip_head": False}, mlp["model"], mlp["analysis"], mlp["train"], mlp["example"])


def test_on_correlated_pixel_inputs_wanda_and_sparsegpt_beat_magnitude_on_every_layer(digits_mlp) -> None:
    """Wanda's score against |W| in each comparison group (per row, per layer), SparseGPT against both."""
    assert accuracy(digits_mlp["model"], digits_mlp["data"].x_test, digits_mlp["data"].y_test) > 0.93
    names, found = digits_mlp["names"], {}
    for label, name, config in (
        ("magnitude", "prune_unstructured", {"scope": "layer"}),
        ("wanda", "prune_wanda", {}),
        ("wanda_layer", "prune_wanda", {"comparison": "layer"}),
        ("sparsegpt", "prune_sparsegpt", {}),
    ):
        result = _mlp_run(digits_mlp, name, {**config, "sparsity": SPARSITY})
        found[label] = errors(digits_mlp["model"], pruned_weights(result, names), digits_mlp["inputs"])
    layers = dict(digits_mlp["model"].named_modules())
    row_magnitude = {
        n: layers[n].weight.detach().masked_fill(sparsity.row_prune_mask(layers[n].weight.abs(), SPARSITY), 0.0)
        for n in names
    }
    found["magnitude_row"] = errors(digits_mlp["model"], row_magnitude, digits_mlp["inputs"])
    for name in names:
        assert found["sparsegpt"][name] < min(found[k][name] for k in found if k != "sparsegpt"), (name, found)
    for wanda, magnitude in (("wanda", "magnitude_row"), ("wanda_layer", "magnitude")):
        assert all(found[wanda][n] < found[magnitude][n] for n in ("body.0", "body.2")), found
        assert sum(found[wanda].values()) < 0.85 * sum(found[magnitude].values()), found
    # Not asserted per layer for the head: its inputs are all-positive ReLU outputs, whose cross terms (which Wanda's
    # diagonal score ignores) dominate the error; measured 0.173 vs 0.178 per row, 0.186 vs 0.163 per layer.
    # the always-blank border pixels: Wanda prunes their weights first (they cost nothing), magnitude does not
    assert found["wanda"]["body.0"] < 0.7 * found["magnitude"]["body.0"]


def test_sparsegpt_keeps_digits_accuracy_where_magnitude_loses_it(digits_mlp) -> None:
    x, y = digits_mlp["data"].x_test, digits_mlp["data"].y_test
    dense = accuracy(digits_mlp["model"], x, y)
    magnitude = accuracy(_mlp_run(digits_mlp, "prune_unstructured", {"sparsity": 0.7, "scope": "layer"}).model, x, y)
    sgpt = accuracy(_mlp_run(digits_mlp, "prune_sparsegpt", {"sparsity": 0.7}).model, x, y)
    assert sgpt > magnitude + 0.05  # measured: 0.925 vs 0.836 (dense 0.956)
    assert sgpt >= dense - 0.05


def test_sequential_pruning_feeds_pruned_outputs_forward(digits_mlp) -> None:
    """Each Linear of the MLP is its own group: the first sees the same inputs either way, later ones differ."""
    sequential = _mlp_run(digits_mlp, "prune_wanda", {"sequential": True})
    one_pass = _mlp_run(digits_mlp, "prune_wanda", {"sequential": False})
    again = _mlp_run(digits_mlp, "prune_wanda", {"sequential": True})
    a, b, c = (pruned_weights(r, digits_mlp["names"]) for r in (sequential, one_pass, again))
    assert torch.equal(a["body.0"], b["body.0"])
    assert not torch.equal(a["body.2"] != 0, b["body.2"] != 0)
    assert all(torch.equal(a[n], c[n]) for n in a)  # deterministic


def test_without_fitting_calibration_data_it_is_not_applicable(digits_mlp) -> None:
    for name in ("prune_wanda", "prune_sparsegpt"):
        with pytest.raises(TechniqueNotApplicableError, match="needs calibration inputs"):
            run(name, {}, digits_mlp["model"], digits_mlp["analysis"], None, digits_mlp["example"])
        wrong = [(torch.rand(1, 10),)]  # the MLP takes 64 features
        with pytest.raises(TechniqueNotApplicableError, match="failed on a calibration sample"):
            run(name, {}, digits_mlp["model"], digits_mlp["analysis"], wrong, digits_mlp["example"])


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("prune_wanda", {"sparsity": 1.0}),
        ("prune_wanda", {"comparison": "column"}),
        ("prune_sparsegpt", {"sparsity": 0.0}),
        ("prune_sparsegpt", {"percdamp": 0.0}),
        ("prune_sparsegpt", {"samples": 0}),
    ],
)
def test_bad_configs_are_rejected(name: str, config: dict) -> None:
    with pytest.raises(ValidationError):
        parse_config(get_technique(name), config)


def test_registered_as_pruning_not_planned_by_default_with_milder_ladder() -> None:
    for name in ("prune_wanda", "prune_sparsegpt", "prune_semistructured"):
        technique = get_technique(name)
        assert technique.family == "pruning" and technique.planned_by_default is False
        config = parse_config(technique, {"samples": 16, "sequential": False})
        assert technique.config_cls.model_validate_json(config.model_dump_json()) == config
        assert technique.availability().available
    for name in ("prune_wanda", "prune_sparsegpt"):
        technique = get_technique(name)
        ladder, config = [], technique.default_config()
        while config is not None:
            ladder.append(config.sparsity)
            config = technique.milder(config)
        assert ladder == [0.5, 0.3, 0.15]
