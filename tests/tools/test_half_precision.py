"""cast_half (fp16/bf16) on the zoo's digits-cnn, a BatchNorm CNN and minilm: accuracy, fp32 outputs, pickling, the
Hugging Face round trip, overflow, and an estimate built from a probe measured on this machine."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robopt import zoo
from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.evaluation.base import EvaluationSetup, build_evaluator
from robopt.progress import Progress
from robopt.tools.loading import load_model
from robopt.tools.registry import ApplyContext, TechniqueResult, get_technique, parse_config
from robopt.tools.techniques.half_precision import HalfPrecisionModule, half_speed
from robopt.tools.threads import torch_threads
from robopt.zoo import load_card_model
from tests.tools.technique_models import DigitsCNN, accuracy, as_images, load_digits_split, train
from tests.tools.test_techniques import analyze, serialized_size
from tests.tools.test_weight_only_hf import reload_in_fresh_process, token_ids


def run(model: nn.Module, example: tuple[Any, ...], fmt: str = "torch-pickle", **config: Any) -> TechniqueResult:
    technique = get_technique("cast_half")
    context = ApplyContext(analysis=analyze(model, "unknown", fmt), example_inputs=example)
    return technique.apply(copy.deepcopy(model), parse_config(technique, config), context)


@pytest.fixture(scope="module")
def digits_cnn(data_dir: Path):
    weights, card = zoo.resolve("digits-cnn", data_dir / "zoo")
    return card, load_card_model(weights, card).eval()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_digits_cnn_keeps_its_accuracy(digits_cnn, dtype: str) -> None:
    card, model = digits_cnn
    result = run(model, (torch.rand(1, 1, 8, 8),), dtype=dtype)
    half = result.model
    assert isinstance(half, HalfPrecisionModule)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16 if dtype == "bf16" else torch.float16}
    assert half.input_spec == model.input_spec  # attributes of the wrapped model are reachable
    evaluator = build_evaluator(card.evaluator, EvaluationSetup(reference=model, input_spec=card.input_spec))
    before, after = evaluator.evaluate(model, Progress()), evaluator.evaluate(half, Progress())
    assert after["accuracy"] >= before["accuracy"] - 0.01  # measured: 98.9% -> 98.9% at both dtypes
    assert serialized_size(half) < 0.55 * serialized_size(model)

    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = half(x)
    assert out.dtype == torch.float32  # float outputs come back in fp32
    buf = io.BytesIO()
    torch.save(half, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(x), out)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(half)(x), out)
    assert result.details["probe"] == half_speed(dtype).describe()


def test_batchnorm_cnn_needs_no_fp32_layers() -> None:
    digits = load_digits_split(seed=0)
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(0)
        model = train(DigitsCNN(), as_images(digits.x_train), digits.y_train, steps=60).eval()
    x, y = as_images(digits.x_test), digits.y_test
    base = accuracy(model, x, y)
    assert base > 0.9  # measured 0.978 after 60 steps, and 0.978 at bf16 and fp16
    for dtype in ("bf16", "fp16"):
        assert accuracy(run(model, (x[:1],), dtype=dtype).model, x, y) >= base - 0.01


def test_estimate_comes_from_the_measured_probe(digits_cnn) -> None:
    _, model = digits_cnn
    technique = get_technique("cast_half")
    analysis = analyze(model, "cnn")
    for dtype in ("bf16", "fp16"):
        estimate = technique.estimate(analysis, parse_config(technique, {"dtype": dtype}))
        speed = half_speed(dtype)
        assert speed.linear_fp32_ms > 0 and speed.linear_half_ms > 0 and speed.conv_half_ms > 0
        assert speed.describe() in estimate.note and f"{dtype} matmul" in estimate.note
        linear = analysis.params_by_layer_type["Linear"] / analysis.param_count
        conv = analysis.params_by_layer_type["Conv2d"] / analysis.param_count
        expected = 1 / ((1 - linear - conv) + linear / speed.linear_ratio + conv / speed.conv_ratio)
        assert estimate.speedup == pytest.approx(expected)
        verdict = "faster" if estimate.speedup > 1.05 else "slower" if estimate.speedup < 0.95 else "about as fast"
        assert f"size 2x smaller, {verdict}" in estimate.note
        assert estimate.size_ratio == pytest.approx(0.5, abs=0.01)
    assert half_speed("bf16") == half_speed("bf16")  # measured once per process: the same timings


def test_fp16_overflow_fails_with_a_hint() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e3)
    x = torch.full((1, 4), 100.0)
    with pytest.raises(TechniqueFailedError, match="non-finite") as caught:
        run(model, (x,), dtype="fp16")
    assert "bf16" in str(caught.value.hint)
    assert torch.isfinite(run(model, (x,), dtype="bf16").model(x)).all()  # bf16 has fp32's range


def test_half_models_are_refused() -> None:
    technique = get_technique("cast_half")
    half = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    assert not technique.applicable(analyze(half, "mlp-policy")).applicable
    with pytest.raises(TechniqueNotApplicableError, match="expects an fp32 model"):
        run(half, (torch.randn(1, 8),))


def test_config() -> None:
    technique = get_technique("cast_half")
    assert technique.availability().available
    with pytest.raises(ValidationError):
        parse_config(technique, {"dtype": "fp8"})
    config = parse_config(technique, {"dtype": "fp16"})
    assert technique.config_cls.model_validate_json(config.model_dump_json()) == config
    assert technique.milder(config) == parse_config(technique, {"dtype": "bf16"})
    assert technique.milder(parse_config(technique, {})) is None


def test_minilm_half_folder_reloads_with_plain_transformers(data_dir: Path, tmp_path: Path) -> None:
    folder, _ = zoo.resolve("minilm", data_dir / "zoo")
    model = load_model(folder).module
    ids = token_ids(model.config.vocab_size, length=32)
    result = run(model, (ids,), fmt="hf-folder", dtype="bf16")
    half = result.model
    assert type(half) is type(model) and half.dtype == torch.bfloat16
    with torch.no_grad():
        reference, out = model(ids)[0], half(ids)[0]
    assert out.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(out.mean(1), reference.mean(1)).item()
    assert cosine > 0.999  # mean-pooled embedding, measured 0.99995 (fp16: 0.999999)
    half.save_pretrained(tmp_path / "hf")
    reloaded = reload_in_fresh_process(tmp_path / "hf", "AutoModel", ids, tmp_path)
    assert reloaded["robopt"] == [] and reloaded["config"]["dtype"] == "bfloat16"
    assert torch.equal(reloaded["out"], out)  # measured: identical
