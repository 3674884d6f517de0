"""OpenVLA-shaped zoo entries: the 7.5B shape model on the meta device, the CPU-sized mini, and the shape report."""

from __future__ import annotations

import copy
import json

import psutil
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from robopt import zoo
from robopt.errors import ResourceLimitError, UnsupportedFormatError
from robopt.evaluation.base import EvaluationSetup, build_evaluator
from robopt.progress import Progress
from robopt.tools.analysis import _kernel_flop_formulas, profile_module
from robopt.tools.example_inputs import make_example_inputs
from robopt.tools.shape_report import inference_stages, shape_report, zoo_shape_report
from robopt.zoo import load_card_model
from robopt.zoo.openvla import MINI_SIZES, MINI_TEXT_TOKENS, OpenVLA, build_openvla_mini

OPENVLA_PARAMS = 7.54e9
LLAMA2_7B_PARAMS = 6_738_415_616  # 32,000-row vocabulary
PUBLISHED = ["jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "raspberry-pi-5", "nvidia-h100-sxm", "nvidia-rtx-4090"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Hundreds of tiny kernels per forward: on a busy 2-core machine, two OpenMP threads wait on each other
    # (measured 2.2 s vs 0.11 s per mini forward under load). One thread keeps this module CI-sized.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shape(data_dir):
    rss = psutil.Process().memory_info().rss
    _, card = zoo.resolve("openvla-7b-shape", data_dir / "zoo")
    model = card.instantiate()
    return card, model, psutil.Process().memory_info().rss - rss


@pytest.fixture(scope="module")
def mini(data_dir):
    weights, card = zoo.resolve("openvla-mini", data_dir / "zoo")
    return card, load_card_model(weights, card)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_7b_shape_has_openvla_parameter_count_without_memory(shape) -> None:
    card, model, rss_growth = shape
    assert card.kind == "shape-only" and card.family == "vision-language-action"
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert rss_growth < 1 * 2**30  # 30 GB of float32 weights were never allocated
    total = _count(model)
    assert abs(total - OPENVLA_PARAMS) / OPENVLA_PARAMS < 0.02
    # Llama-2-7B plus the 64 rows OpenVLA's padded vocabulary (32,064) adds to embed_tokens and lm_head
    assert _count(model.language_model) == LLAMA2_7B_PARAMS + 2 * 64 * 4096
    assert _count(model.projector) == (2176 * 8704 + 8704) + (8704 * 4096 + 4096) + (4096 * 4096 + 4096)
    assert abs(_count(model.vision_backbone.featurizer) - 304e6) / 304e6 < 0.01  # DINOv2 ViT-L/14
    assert abs(_count(model.vision_backbone.fused_featurizer) - 428e6) / 428e6 < 0.01  # SigLIP SO400M/14
    assert _count(model.action_head) == 0


def test_7b_refuses_a_real_allocation() -> None:
    with pytest.raises(ResourceLimitError, match="meta device") as err:
        OpenVLA(llm_layers=200)
    assert "openvla-mini" in (err.value.hint or "")


def test_flop_formulas_match_counted_flops(shape, mini) -> None:
    _, model, _ = shape
    inputs = (torch.empty(1, 3, 224, 224, device="meta"), torch.zeros(1, 32, dtype=torch.long, device="meta"))
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_kernel_flop_formulas()) as counter:
        assert model(*inputs).shape == (1, 7, 256)
    assert sum(s.flops for s in inference_stages(model.structure(32))) == counter.get_total_flops()
    card, small = mini
    counted = profile_module(small, make_example_inputs(card.input_spec)).flops
    assert sum(s.flops for s in inference_stages(small.structure(MINI_TEXT_TOKENS))) == counted


def test_mini_card_and_fidelity_on_itself(mini) -> None:
    card, model = mini
    assert card.kind == "module" and card.family == "vision-language-action"
    assert [t.name for t in card.input_spec.inputs] == ["pixel_values", "input_ids"]
    assert card.input_spec.inputs[1].dtype == "int64" and card.input_spec.inputs[1].high == MINI_SIZES.text_vocab
    # measured at build time by output-fidelity on the model read back from its safetensors, against itself
    assert card.metrics["top1_agreement"] == 1.0 and card.metrics["max_abs_error"] == 0.0
    assert card.metrics["cosine"] == pytest.approx(1.0)
    # and the evaluator tells a perturbed VLA apart
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.projector.fc3.weight.add_(0.05 * torch.randn_like(perturbed.projector.fc3.weight))
    spec = card.evaluator.model_copy(update={"options": {"samples": 2}})
    evaluator = build_evaluator(spec, EvaluationSetup(reference=model, input_spec=card.input_spec))
    metrics = evaluator.evaluate(perturbed, Progress())
    assert metrics["cosine"] < 0.9999 and metrics["max_abs_error"] > 0.0
    assert 0.0 <= metrics["top1_agreement"] <= 1.0
    assert profile_module(model, None).architecture == "vision-language-action"


def test_mini_forward_decodes_action_tokens_greedily(mini) -> None:
    card, model = mini
    pixels, ids = make_example_inputs(
        card.input_spec.model_copy(
            update={"inputs": [t.model_copy(update={"shape": [2, *t.shape[1:]]}) for t in card.input_spec.inputs]}
        )
    )
    with torch.no_grad():
        actions = model(pixels, ids)
        assert actions.shape == (2, 7, 256) and torch.isfinite(actions).all()
        # recompute without the KV cache: the prefix, then the prefix + the first greedy action token
        lm = model.language_model
        text = lm.get_input_embeddings()(ids)
        patches = model.projector(model.vision_backbone(pixels))
        prefix = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        first = lm(inputs_embeds=prefix).logits[:, -1]
        vocab = MINI_SIZES.text_vocab
        # column j is token id vocab - 1 - j: the last 256 ids of the tokenizer's vocabulary
        torch.testing.assert_close(actions[:, 0], first[:, vocab - 256 : vocab].flip(-1))
        token = vocab - 1 - actions[:, 0].argmax(-1)
        second = lm(inputs_embeds=torch.cat([prefix, lm.get_input_embeddings()(token)[:, None]], dim=1)).logits[:, -1]
        torch.testing.assert_close(actions[:, 1], second[:, vocab - 256 : vocab].flip(-1), atol=1e-5, rtol=1e-4)


def test_mini_build_is_deterministic(mini) -> None:
    _, model = mini
    kwargs = MINI_SIZES.model_dump()
    again = build_openvla_mini(0, Progress(), kwargs).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    other = build_openvla_mini(1, Progress(), kwargs).state_dict()
    assert not torch.equal(other["projector.fc1.weight"], again["projector.fc1.weight"])


def test_shape_report_of_openvla_7b(data_dir) -> None:
    report = zoo_shape_report("openvla-7b-shape", zoo_dir=data_dir / "zoo", devices=PUBLISHED, data_dir=data_dir)
    json.dumps(report)  # JSON-able
    params = report["params"]
    assert sum(params["components"].values()) == params["total"]
    assert set(params["components"]) == {"vision.dinov2", "vision.siglip", "projector", "llm", "action_head"}
    memory = report["memory"]
    assert (
        memory["bf16"]["weight_bytes"] == 2 * params["total"] and memory["fp32"]["weight_bytes"] == 4 * params["total"]
    )
    assert memory["int4"]["total_bytes"] < memory["int8"]["total_bytes"] < memory["bf16"]["total_bytes"]
    devices = report["devices"]
    assert not devices["jetson-orin-nano-8gb"]["precisions"]["bf16"]["fits"]
    assert devices["jetson-orin-nano-8gb"]["precisions"]["int4"]["fits"]
    assert devices["jetson-agx-orin-64gb"]["precisions"]["fp32"]["fits"]
    rtx = devices["nvidia-rtx-4090"]["precisions"]["bf16"]
    # decode is memory-bound: ~ the LLM's bf16 weights (embedding table excluded) / 1008 GB/s, plus the KV cache
    streamed = 2 * (LLAMA2_7B_PARAMS + 2 * 64 * 4096 - 32064 * 4096)
    assert rtx["decode_bound"] == "memory"
    assert streamed / 1008e9 * 1e3 < rtx["decode_token_ms"] < 1.02 * streamed / 1008e9 * 1e3
    assert rtx["action_ms"] > 6 * rtx["decode_token_ms"]
    assert rtx["control_rate_hz"] == pytest.approx(1e3 / rtx["action_ms"])
    for device in devices.values():  # fewer bytes, never slower
        rates = [device["precisions"][p]["decode_token_ms"] for p in ("fp32", "bf16", "int8", "int4")]
        assert rates == sorted(rates, reverse=True)


def test_shape_report_needs_a_structure(mini) -> None:
    with pytest.raises(UnsupportedFormatError, match="structure"):
        shape_report(torch.nn.Linear(4, 4), text_tokens=8, devices=PUBLISHED)
    _, model = mini
    report = shape_report(model, text_tokens=MINI_TEXT_TOKENS, devices=["raspberry-pi-5"])
    assert report["params"]["total"] == _count(model)
    assert report["tokens"] == {"image": 64, "text": 16, "prefix": 80, "action": 7}
