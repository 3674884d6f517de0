"""The tiny-lm zoo entry: a Llama causal LM + byte-level BPE trained offline on stdlib sources, saved as a plain
transformers folder whose card perplexity is measured (and far below the untrained model's)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from robopt import zoo
from robopt.evaluation.base import EvaluationSetup, build_evaluator
from robopt.evaluation.text_corpus import HELDOUT_MODULES, TRAIN_MODULES, corpus_text
from robopt.progress import Progress
from robopt.tools.loading import load_model
from robopt.zoo import tiny_lm


@pytest.fixture(scope="module")
def built(data_dir):
    """Built once per test session into the shared zoo cache (the evaluator tests reuse it)."""
    return zoo.resolve("tiny-lm", data_dir / "zoo")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_lm.train_tokenizer()


def _weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_card_describes_the_folder(built) -> None:
    folder, card = built
    assert folder.name == "hf" and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert card.kind == "hf-folder" and card.family == "decoder-llm"
    spec = card.input_spec.inputs[0]
    assert (spec.name, spec.shape, spec.dtype, spec.high) == ("input_ids", [1, 64], "int64", tiny_lm.VOCAB_SIZE)
    assert card.evaluator.name == "perplexity" and card.evaluator.dataset == "stdlib-heldout"
    assert card.evaluator.options["model_dir"] == str(folder)
    assert card.suggested_criteria == {"max_size": "50%", "max_accuracy_drop": "5%rel"}
    assert card.metrics["nonfinite_outputs"] == 0.0
    assert card.metrics["perplexity"] == pytest.approx(math.exp(card.metrics["loss"]), rel=1e-12)


def test_folder_reloads_with_plain_transformers(built) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, card = built
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and len(tokenizer) == tiny_lm.VOCAB_SIZE
    ids = tokenizer("def gcd(a, b):\n    while b:\n", return_tensors="pt")["input_ids"]
    robopt_model = load_model(folder).module
    with torch.no_grad():
        assert torch.equal(model(ids).logits, robopt_model(ids).logits)
    # the card's perplexity was measured on exactly these weights
    evaluator = build_evaluator(card.evaluator, EvaluationSetup(input_spec=card.input_spec))
    assert evaluator.evaluate(model, Progress())["perplexity"] == pytest.approx(card.metrics["perplexity"], rel=1e-9)


def test_trained_perplexity_is_far_below_untrained(built, tokenizer) -> None:
    _, card = built
    evaluator = build_evaluator(card.evaluator, EvaluationSetup(input_spec=card.input_spec))
    untrained = evaluator.evaluate(tiny_lm.untrained_tiny_lm(card.seed, tokenizer), Progress())["perplexity"]
    assert untrained > 1000  # about the vocabulary size: an untrained model guesses uniformly
    assert card.metrics["perplexity"] < untrained / 10


def test_tokenizer_is_deterministic_lossless_and_saved(built, tokenizer) -> None:
    from transformers import AutoTokenizer

    folder, _ = built
    assert tiny_lm.train_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    saved = AutoTokenizer.from_pretrained(folder)
    assert saved.get_vocab() == tokenizer.get_vocab()
    text = corpus_text("heldout")[:5000]
    assert saved.decode(saved(text)["input_ids"]) == text  # byte-level: nothing is lost, nothing is unknown


def test_training_is_deterministic_and_reports_every_step(tokenizer) -> None:
    events: list[dict] = []
    threads = torch.get_num_threads()
    first = tiny_lm.train_tiny_lm(0, Progress(emit=events.append, min_interval_s=0), tokenizer, steps=3)
    second = tiny_lm.train_tiny_lm(0, Progress(), tokenizer, steps=3)
    other_seed = tiny_lm.train_tiny_lm(1, Progress(), tokenizer, steps=3)
    assert _weights_hash(first) == _weights_hash(second)
    assert _weights_hash(first) != _weights_hash(other_seed)
    assert [(e["current"], e["total"]) for e in events if e["stage"] == "train"] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert torch.get_num_threads() == threads and not first.training  # single-threaded only while training


def test_held_out_modules_never_reach_training() -> None:
    assert not set(HELDOUT_MODULES) & set(TRAIN_MODULES)
    assert list(TRAIN_MODULES) == sorted(TRAIN_MODULES) and list(HELDOUT_MODULES) == sorted(HELDOUT_MODULES)
