"""bitsandbytes 4-bit and 8-bit on transformers models go through transformers' own integration: the zoo's tiny-lm
(LlamaForCausalLM) and minilm (BertModel) are quantized on CPU, judged by their evaluators, and their save_pretrained
folders reload in a fresh process that imports only torch and transformers, giving the outputs robopt evaluated."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robopt import zoo
from robopt.errors import TechniqueNotApplicableError
from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, build_evaluator
from robopt.progress import Progress
from robopt.tools.loading import load_model
from robopt.tools.registry import ApplyContext, TechniqueResult, get_technique, parse_config
from robopt.tools.techniques._hf_quant import save_pretrained_folder, skip_modules
from tests.tools.test_techniques import analyze

# Loads a save_pretrained folder with plain transformers and writes its outputs on fixed ids; it must not need robopt.
RELOAD = """
import sys, torch, transformers
folder, loader, ids_path, out_path = sys.argv[1:5]
model = getattr(transformers, loader).from_pretrained(folder, device_map="cpu").eval()
with torch.no_grad():
    out = model(torch.load(ids_path))[0].float()
layers = sorted({type(m).__module__.split(".")[0] + "." + type(m).__name__ for m in model.modules()})
robopt = sorted(m for m in sys.modules if m.split(".")[0] == "robopt")
torch.save({"out": out, "layers": layers, "robopt": robopt, "config": model.config.to_dict()}, out_path)
"""


@pytest.fixture(scope="module")
def tiny(data_dir: Path) -> tuple[Path, Any, nn.Module]:
    folder, card = zoo.resolve("tiny-lm", data_dir / "zoo")
    return folder, card, load_model(folder).module


@pytest.fixture(scope="module")
def minilm(data_dir: Path) -> tuple[Path, Any, nn.Module]:
    folder, card = zoo.resolve("minilm", data_dir / "zoo")
    return folder, card, load_model(folder).module


def token_ids(high: int, length: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, high, (1, length), generator=torch.Generator().manual_seed(seed))


def run(name: str, model: nn.Module, config: dict[str, Any], events: list | None = None) -> TechniqueResult:
    technique = get_technique(name)
    ids = token_ids(model.config.vocab_size)
    progress = Progress(emit=events.append, min_interval_s=0) if events is not None else Progress()
    context = ApplyContext(analysis=analyze(model, "unknown", "hf-folder"), example_inputs=(ids,), progress=progress)
    return technique.apply(copy.deepcopy(model), parse_config(technique, config), context)


def reload_in_fresh_process(folder: Path, loader: str, ids: torch.Tensor, tmp_path: Path) -> dict[str, Any]:
    ids_path, out_path = tmp_path / "ids.pt", tmp_path / "out.pt"
    torch.save(ids, ids_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(folder), loader, str(ids_path), str(out_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_path, weights_only=False)


def perplexity(folder: Path, model: nn.Module) -> float:
    spec = EvaluatorSpec(name="perplexity", dataset="stdlib-heldout", options={"model_dir": str(folder), "windows": 16})
    return build_evaluator(spec, EvaluationSetup()).evaluate(model, Progress())["perplexity"]


# (technique, config, bitsandbytes layer class, largest accepted perplexity ratio after/before)
# Measured on tiny-lm (16 held-out windows): fp32 120.07, nf4 119.98, int8 (threshold 6) 120.03.
TINY_CASES = [
    ("weight_only_int4", {}, "Linear4bit", 1.03),
    ("bnb_int8", {}, "Linear8bitLt", 1.01),
]


@pytest.mark.parametrize(("name", "config", "layer", "max_ratio"), TINY_CASES, ids=lambda v: str(v))
def test_tiny_lm_through_transformers_round_trips(
    tiny: tuple[Path, Any, nn.Module], tmp_path: Path, name: str, config: dict, layer: str, max_ratio: float
) -> None:
    folder, _, model = tiny
    events: list[dict] = []
    result = run(name, model, config, events)
    quantized = result.model
    assert type(quantized) is type(model)  # a transformers model, built by transformers
    assert result.details["route"].startswith("transformers BitsAndBytesConfig")
    assert result.details["layers_skipped"] == ["lm_head"] and type(quantized.lm_head) is nn.Linear
    kinds = [type(m).__name__ for m in quantized.modules()]
    assert kinds.count(layer) == result.details["layers_quantized"] == 14  # 2 decoder layers x 7 projections
    assert quantized.config.quantization_config.quant_method == "bitsandbytes"
    assert "CPU" in result.backend and result.details["bitsandbytes"]
    assert any(e["stage"] == name for e in events)

    before, after = perplexity(folder, model), perplexity(folder, quantized)
    assert math.isfinite(after) and after <= before * max_ratio

    # As in the pipeline: the model ran (bitsandbytes has repacked 4-bit weights for its CPU kernel by now), the
    # artifact store pickled it, and the export loads that pickle and calls plain save_pretrained.
    ids = token_ids(model.config.vocab_size, seed=1)
    with torch.no_grad():
        evaluated = quantized(ids).logits.float()
    buf = io.BytesIO()
    torch.save(quantized, buf)
    buf.seek(0)
    stored = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(stored(ids).logits.float(), evaluated)
    stored.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["llm_int8_skip_modules"] == ["lm_head"]
    reloaded = reload_in_fresh_process(tmp_path / "hf", "AutoModelForCausalLM", ids, tmp_path)
    assert reloaded["robopt"] == []
    assert f"bitsandbytes.{layer}" in reloaded["layers"]
    # Measured: identical logits (max abs difference 0.0).
    assert (reloaded["out"] - evaluated).abs().max().item() <= 1e-5
    with torch.no_grad():  # saving left the model's outputs unchanged
        assert torch.equal(stored(ids).logits.float(), evaluated)


def test_double_quant_save_after_inference_requantizes_the_scales(
    tiny: tuple[Path, Any, nn.Module], tmp_path: Path
) -> None:
    # bitsandbytes' CPU kernel expands double-quantized scales at the first call; saving quantizes them again (8-bit
    # blockwise), so the saved model is close to, not identical with, the one that ran.
    _, _, model = tiny
    quantized = run("weight_only_int4", model, {"double_quant": True}).model
    ids = token_ids(model.config.vocab_size, seed=1)
    with torch.no_grad():
        evaluated = quantized(ids).logits.float()
    save_pretrained_folder(quantized, tmp_path / "hf")
    reloaded = reload_in_fresh_process(tmp_path / "hf", "AutoModelForCausalLM", ids, tmp_path)
    assert reloaded["config"]["quantization_config"]["bnb_4bit_use_double_quant"] is True
    difference = (reloaded["out"] - evaluated).abs().max().item()
    assert difference < 0.01 * evaluated.abs().max().item()  # measured 0.045 on logits up to 15.3


def test_minilm_int8_through_transformers_keeps_embeddings(minilm: tuple[Path, Any, nn.Module], tmp_path: Path) -> None:
    _, card, model = minilm
    result = run("bnb_int8", model, {"skip_head": False})
    quantized = result.model
    assert result.details["layers_quantized"] == 37  # 6 layers x 6 Linear + the pooler
    assert sum(type(m).__name__ == "Linear8bitLt" for m in quantized.modules()) == 37
    spec = EvaluatorSpec(name="embedding-fidelity", dataset="sentences", options=card.evaluator.options)
    metrics = build_evaluator(spec, EvaluationSetup(reference=model)).evaluate(quantized, Progress())
    assert metrics["mean_cosine"] > 0.99  # measured 0.9992 (min 0.9986, top-5 agreement 0.986)

    ids = token_ids(model.config.vocab_size, length=32, seed=2)
    with torch.no_grad():
        evaluated = quantized(ids)[0].float()
    out_dir = save_pretrained_folder(quantized, tmp_path / "hf")
    reloaded = reload_in_fresh_process(out_dir, "AutoModel", ids, tmp_path)
    assert reloaded["robopt"] == [] and "bitsandbytes.Linear8bitLt" in reloaded["layers"]
    assert (reloaded["out"] - evaluated).abs().max().item() <= 1e-5


def test_hf_models_quantize_only_the_chosen_layers(tiny: tuple[Path, Any, nn.Module]) -> None:
    _, _, model = tiny
    # Every nn.Linear outside `keep` is named for transformers to skip; names match whole modules only.
    skip = skip_modules(model, ["model.layers.1.mlp.down_proj"])
    assert "model.layers.1.mlp.down_proj" not in skip and "model.layers.1.mlp.up_proj" in skip
    assert len(skip) == 14
    result = run("weight_only_int4", model, {"skip_head": False})
    assert result.details["layers_skipped"] == [] and type(result.model.lm_head).__name__ == "Linear4bit"


def test_hf_block_size_is_fixed_by_transformers(tiny: tuple[Path, Any, nn.Module]) -> None:
    _, _, model = tiny
    with pytest.raises(TechniqueNotApplicableError, match="BitsAndBytesConfig has no block size"):
        run("weight_only_int4", model, {"blocksize": 128})


def test_hf_route_refuses_an_already_quantized_model(tiny: tuple[Path, Any, nn.Module]) -> None:
    _, _, model = tiny
    quantized = run("bnb_int8", model, {}).model
    with pytest.raises(TechniqueNotApplicableError, match="already quantized"):
        run("weight_only_int4", quantized, {})
