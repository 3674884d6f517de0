"""The awq technique (autoawq, optional extra `robopt[awq]`): reported unavailable with the reason where autoawq is
missing; where it is installed, AWQ W4 of the zoo's tiny-lm on CPU, judged by perplexity, and its scale search
checked to leave the model's function unchanged before rounding."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from robopt import zoo
from robopt.calibration.base import CalibrationSet
from robopt.errors import TechniqueNotApplicableError
from robopt.evaluation.text_corpus import corpus_text
from robopt.progress import Progress
from robopt.tools.loading import load_model
from robopt.tools.registry import ApplyContext, get_technique, parse_config
from tests.tools.test_techniques import analyze, serialized_size
from tests.tools.test_weight_only_hf import perplexity, token_ids

# A process in which `import awq` fails, whatever is installed: what every machine without the extra reports.
WITHOUT_AWQ = """
import sys
sys.modules["awq"] = None
from robopt.tools.registry import get_technique
avail = get_technique("awq").availability()
print(avail.available)
print(avail.reason)
"""

FAST = {"group_size": 64, "calibration_samples": 16, "apply_clip": False}


def test_missing_extra_is_reported_with_the_reason() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_AWQ], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    available, reason = done.stdout.strip().splitlines()[-2:]
    assert available == "False"
    assert "autoawq is not installed" in reason and "pip install 'robopt[awq]'" in reason
    assert "deprecated upstream" in reason and "llm-compressor" in reason


def test_applies_only_to_causal_language_models() -> None:
    technique = get_technique("awq")
    mlp = nn.Sequential(nn.Linear(8, 8))
    assert not technique.applicable(analyze(mlp, "mlp-policy")).applicable
    assert technique.applicable(analyze(mlp, "decoder-llm", "hf-folder")).applicable


@pytest.fixture(scope="module")
def tiny(data_dir: Path) -> tuple[Path, nn.Module, Any]:
    """tiny-lm and a calibration source: 64-token windows of its stdlib training text, tokenized by its tokenizer."""
    with warnings.catch_warnings(record=True):  # autoawq announces its deprecation on import
        pytest.importorskip("awq")
    from transformers import AutoTokenizer

    folder, _ = zoo.resolve("tiny-lm", data_dir / "zoo")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tokenizer(corpus_text("train")[:200_000], add_special_tokens=False, verbose=False)["input_ids"])

    def calibration(n: int) -> CalibrationSet:
        return CalibrationSet(tuple((ids[i * 64 : (i + 1) * 64].unsqueeze(0),) for i in range(n)), "stdlib train")

    return folder, load_model(folder).module, calibration


def context_for(model: nn.Module, calibration: Any, events: list | None = None) -> ApplyContext:
    progress = Progress(emit=events.append, min_interval_s=0) if events is not None else Progress()
    return ApplyContext(
        analysis=analyze(model, "decoder-llm", "hf-folder"),
        example_inputs=(token_ids(model.config.vocab_size),),
        progress=progress,
        calibration=calibration,
    )


def test_awq_quantizes_tiny_lm_on_cpu(tiny) -> None:
    folder, model, calibration = tiny
    technique = get_technique("awq")
    avail = technique.availability()
    assert avail.available, avail.reason
    events: list[dict] = []
    result = technique.apply(
        copy.deepcopy(model), parse_config(technique, FAST), context_for(model, calibration, events)
    )
    quantized = result.model
    assert result.details["layers_quantized"] == 14  # 2 decoder layers x 7 projections; lm_head stays fp32
    assert type(quantized.lm_head) is nn.Linear
    assert result.details["calibration_samples"] == 16 and "deprecated upstream" in result.notes
    assert [e["current"] for e in events if e["stage"] == "awq"] == [0, 1, 2]  # one step per decoder layer
    estimate = technique.estimate(analyze(model, "decoder-llm", "hf-folder"), technique.default_config())
    assert "a 512x512 AWQ layer ran at" in estimate.note and "deprecated upstream" in estimate.note
    assert 0.3 < estimate.size_ratio < 0.5
    # Measured (16 held-out windows): 120.07 -> 120.28.
    assert perplexity(folder, quantized) <= perplexity(folder, model) * 1.02
    assert serialized_size(quantized) < 0.65 * serialized_size(model)

    ids = token_ids(model.config.vocab_size, seed=1)
    with torch.no_grad():
        out = quantized(ids).logits
    buf = io.BytesIO()
    torch.save(quantized, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(ids).logits, out)


def test_scale_search_keeps_the_function(tiny) -> None:
    # autoawq's own search scales the layers it inspects in place on CPU; robopt's quantizer restores real copies,
    # so applying the searched scales without rounding leaves the outputs as they were.
    from awq import AutoAWQForCausalLM

    from robopt.tools.techniques.awq import _progress_quantizer

    folder, model, calibration = tiny
    awq_model = AutoAWQForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32, device_map="cpu")
    awq_model.quantize(
        None,
        quant_config={"w_bit": 4, "q_group_size": 64, "zero_point": True, "version": "GEMM"},
        calib_data=[s[0][0].tolist() for s in calibration(8).samples],
        max_calib_samples=8,
        max_calib_seq_len=64,
        apply_clip=False,
        export_compatible=True,  # scale only, no rounding
        quantizer_cls=_progress_quantizer(Progress(), "awq"),
    )
    ids = token_ids(model.config.vocab_size, seed=2)
    with torch.no_grad():
        # measured 7.6e-06 (autoawq's search alone: 3.6)
        assert (awq_model.model(ids).logits - model(ids).logits).abs().max().item() < 1e-3


def test_awq_needs_calibration_token_ids(tiny) -> None:
    _, model, _ = tiny
    technique = get_technique("awq")
    with pytest.raises(TechniqueNotApplicableError, match="needs calibration"):
        technique.apply(copy.deepcopy(model), parse_config(technique, FAST), context_for(model, None))
    images = lambda n: CalibrationSet(tuple((torch.rand(1, 3, 8, 8),) for _ in range(n)), "images")  # noqa: E731
    with pytest.raises(TechniqueNotApplicableError, match="token ids"):
        technique.apply(copy.deepcopy(model), parse_config(technique, FAST), context_for(model, images))
