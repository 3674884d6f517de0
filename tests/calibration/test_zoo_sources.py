"""Calibration sets from robopt's own data, one per model type: they fit the zoo model's input spec, the model
runs on them, and they are disjoint from what the model's evaluator measures on."""

from __future__ import annotations

import math

import torch

from robopt import zoo
from robopt.calibration import RANDOM_SOURCE, calibration_source
from robopt.calibration.providers import choose_recipe
from robopt.calibration.text import docstring_text
from robopt.calibration.zoo_data import calibration_episode_seeds
from robopt.domain.records import InputSpec, TensorSpec
from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, build_evaluator
from robopt.evaluation.datasets import digits_split
from robopt.evaluation.embedding import load_sentences
from robopt.evaluation.text_corpus import corpus_text
from robopt.robotics.rollout import expert_demonstrations
from robopt.robotics.task import make_task
from robopt.tools.loading import load_model
from tests.calibration.conftest import assert_fits


def _rows(tensors) -> set[bytes]:
    return {t.contiguous().numpy().tobytes() for t in tensors}


def test_digits_cnn_gets_images_of_the_training_split(digits_cnn, tmp_path) -> None:
    weights, card = digits_cnn
    calibration = calibration_source(card.evaluator, card.input_spec, tmp_path, seed=0)(64)
    assert_fits(calibration, card.input_spec, 64)
    x_train, _, x_test, _ = digits_split()
    images = [sample[0][0] for sample in calibration.samples]
    assert _rows(images) <= _rows(x_train) and not _rows(images) & _rows(x_test)
    assert len(_rows(images)) == 64  # no image twice
    assert "train split" in calibration.source and "64 of 1,347 samples" in calibration.source
    model = zoo.load_card_model(weights, card).eval()
    with torch.no_grad():
        logits = torch.cat([model(*sample) for sample in calibration.samples])
    assert logits.shape == (64, 10) and bool(torch.isfinite(logits).all())
    assert len(set(logits.argmax(1).tolist())) >= 8  # real digits of many classes, not noise


def test_an_evaluator_on_the_training_split_gets_the_test_split(tmp_path) -> None:
    spec = InputSpec(inputs=[TensorSpec(shape=[1, 1, 8, 8])], source="zoo")
    evaluator = EvaluatorSpec(name="classification", dataset="digits-train")
    calibration = calibration_source(evaluator, spec, tmp_path, seed=0)(16)
    x_train, _, x_test, _ = digits_split()
    images = [sample[0][0] for sample in calibration.samples]
    assert _rows(images) <= _rows(x_test) and not _rows(images) & _rows(x_train)


def test_reacher_policy_gets_expert_states_of_training_episodes(reacher_policy, tmp_path) -> None:
    weights, card = reacher_policy
    calibration = calibration_source(card.evaluator, card.input_spec, tmp_path, seed=0)(40)
    assert_fits(calibration, card.input_spec, 40)
    assert "seeds below 1000" in calibration.source and "1000-1049 excluded" in calibration.source
    seeds = calibration_episode_seeds((1000, 1050), seed=0)
    assert len(seeds) == 1000 and all(0 <= s < 1000 for s in seeds)
    # Rebuilt independently: every sample is an expert state of the first (40 / 8 =) 5 calibration seeds ...
    task = make_task("reacher")
    training_states, _, _ = expert_demonstrations(task, seeds[:5])
    # ... and none is a state of the evaluator's episodes (seeds 1000-1049).
    evaluation_states, _, _ = expert_demonstrations(task, range(1000, 1050))
    task.close()
    observations = [sample[0] for sample in calibration.samples]
    assert _rows(observations) <= _rows(s[0] for s in training_states)
    assert not _rows(observations) & _rows(s[0] for s in evaluation_states)
    model = zoo.load_card_model(weights, card).eval()
    with torch.no_grad():
        actions = torch.cat([model(*sample) for sample in calibration.samples])
    assert actions.shape == (40, 2) and bool(torch.isfinite(actions).all()) and float(actions.abs().sum()) > 0


def test_closed_loop_calibration_avoids_evaluation_seeds_below_1000(tmp_path) -> None:
    evaluator = EvaluatorSpec(name="closed-loop", dataset="reacher", options={"first_seed": 0, "episodes": 500})
    seeds = calibration_episode_seeds((0, 500), seed=3)
    assert sorted(seeds) == list(range(500, 1000))
    spec = InputSpec(inputs=[TensorSpec(name="observation", shape=[1, 10])], source="zoo")
    calibration = calibration_source(evaluator, spec, tmp_path, seed=3)(8)
    assert "episode seeds 0-499 excluded" in calibration.source
    task = make_task("reacher")
    states, _, _ = expert_demonstrations(task, seeds[:1])
    task.close()
    assert _rows(s[0] for s in calibration.samples) <= _rows(s[0] for s in states)


def test_mini_vla_gets_image_and_instruction_samples(tmp_path) -> None:
    from robopt.robotics.minivla_task import VOCABULARY
    from robopt.zoo.mini_vla import MiniVLA

    spec = MiniVLA.input_spec
    evaluator = EvaluatorSpec(name="closed-loop", dataset="mini-vla", options={"episodes": 30})
    calibration = calibration_source(evaluator, spec, tmp_path, seed=0)(12)
    assert_fits(calibration, spec, 12)
    images = torch.cat([sample[0] for sample in calibration.samples])
    assert float(images.std()) > 0.01 and len(_rows(images)) == 12  # rendered scenes, all different
    colours = {"red", "green", "blue", "yellow"}
    for _, instruction in calibration.samples:
        words = [VOCABULARY[i] for i in instruction[0].tolist() if i]
        assert len(colours & set(words)) == 1, words  # "reach the blue ball", ...
    # The architecture runs on them (an untrained instance: the trained zoo build takes minutes).
    torch.manual_seed(0)
    with torch.no_grad():
        logits = MiniVLA().eval()(*calibration.samples[0])
    assert logits.shape == (1, 2, 256) and bool(torch.isfinite(logits).all())


def test_tiny_lm_gets_training_text_not_held_out_text(tiny_lm, tmp_path) -> None:
    from transformers import AutoTokenizer

    folder, card = tiny_lm
    calibration = calibration_source(card.evaluator, card.input_spec, tmp_path, seed=0)(32)
    assert_fits(calibration, card.input_spec, 32)
    assert "training corpus" in calibration.source and "64-token windows" in calibration.source
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [tokenizer.decode(s[0][0].tolist(), clean_up_tokenization_spaces=False) for s in calibration.samples]
    whole = [t for t in texts if "\ufffd" not in t]  # a window may cut a multi-byte character at its ends
    assert len(whole) >= 30
    train, heldout = corpus_text("train"), corpus_text("heldout")
    assert all(t in train for t in whole) and not any(t in heldout for t in whole)
    evaluator = build_evaluator(card.evaluator, EvaluationSetup(input_spec=card.input_spec))
    evaluated = {tuple(w.tolist()) for w in evaluator.windows}
    assert not evaluated & {tuple(s[0][0].tolist()) for s in calibration.samples}
    model = load_model(folder).module.eval()
    ids = torch.cat([s[0] for s in calibration.samples])
    random_ids = torch.randint(0, card.input_spec.inputs[0].high, ids.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
        random_loss = float(model(input_ids=random_ids, labels=random_ids).loss)
    # text the model was trained on: far better than chance (ln 2048 = 7.6) and than random ids
    assert loss < math.log(2048) / 2 and loss < random_loss - 2


def test_lm_eval_also_gets_the_training_corpus(tiny_lm) -> None:
    folder, card = tiny_lm
    evaluator = EvaluatorSpec(name="lm-eval", options={"model_dir": str(folder)})
    assert choose_recipe(evaluator, card.input_spec).kind == "training-corpus"
    assert choose_recipe(EvaluatorSpec(name="lm-eval"), card.input_spec).kind == "random"  # no tokenizer known


def test_minilm_gets_docstrings_disjoint_from_the_evaluator_sentences(minilm, tmp_path) -> None:
    from transformers import AutoTokenizer

    folder, card = minilm
    calibration = calibration_source(card.evaluator, card.input_spec, tmp_path, seed=0)(24)
    assert_fits(calibration, card.input_spec, 24)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [s[0][0].tolist() for s in calibration.samples]
    assert all(r[0] == tokenizer.cls_token_id and r[-1] == tokenizer.sep_token_id for r in rows)
    assert not any(tokenizer.pad_token_id in r for r in rows)  # packed text: the mask is all ones, as evaluated
    streams = [f" {' '.join(map(str, r))} " for r in rows]
    for sentence in load_sentences(card.evaluator.dataset):
        ids = f" {' '.join(map(str, tokenizer(sentence, add_special_tokens=False)['input_ids']))} "
        assert not any(ids in stream for stream in streams), sentence
    model = load_model(folder).module.eval()
    with torch.no_grad():
        hidden = model(*calibration.samples[0]).last_hidden_state
    assert hidden.shape == (1, 128, 384) and bool(torch.isfinite(hidden).all())


def test_docstring_lines_holding_an_evaluator_sentence_are_left_out() -> None:
    line = "Generic (shallow and deep) copying operations."  # the copy module's docstring
    assert line in docstring_text([])
    assert line not in docstring_text(["generic (shallow  and deep) COPYING operations."])


def test_other_evaluators_get_random_inputs_labelled_as_such(tmp_path) -> None:
    ids = TensorSpec(name="ids", shape=[4, 3], dtype="int64", high=9)
    spec = InputSpec(inputs=[TensorSpec(name="x", shape=[4, 6]), ids], source="caller")
    source = calibration_source(EvaluatorSpec(name="output-fidelity"), spec, tmp_path, seed=0)
    calibration = source(5)
    assert calibration.source == RANDOM_SOURCE
    assert_fits(calibration, spec, 5)  # batch 1, whatever the spec's batch
    assert len(_rows(s[0] for s in calibration.samples)) == 5
    assert calibration_source(None, spec, tmp_path, seed=0)(5).fingerprint == calibration.fingerprint
    assert not (tmp_path / "calibration").exists()  # random inputs are cheaper to make than to read back
