"""The minilm zoo entry: the packaged all-MiniLM-L6-v2 copied into a plain transformers folder, no training."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from robopt import zoo
from robopt.progress import Progress
from robopt.tools.example_inputs import make_example_inputs
from robopt.tools.loading import load_model
from robopt.zoo.minilm import FOLDER_FILES, VOCAB_SIZE, copy_minilm_folder, packaged_minilm_folder

SENTENCES = [
    "The robot arm picks up the red cube from the table.",
    "A manipulator grasps the red block lying on the table.",
    "I drink a cup of coffee every morning before going to work at the office.",
]


@pytest.fixture(scope="module")
def built(data_dir):
    return zoo.resolve("minilm", data_dir / "zoo")


def test_card(built) -> None:
    folder, card = built
    assert "minilm" in zoo.list_entries()
    assert card.kind == "hf-folder" and card.family == "transformer-encoder"
    assert folder.name == "hf" and folder.parent.name == "minilm"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FOLDER_FILES)
    (spec,) = card.input_spec.inputs
    assert (spec.name, spec.shape, spec.dtype, spec.high) == ("input_ids", [1, 128], "int64", VOCAB_SIZE)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == VOCAB_SIZE
    assert card.evaluator.name == "embedding-fidelity" and card.evaluator.dataset == "sentences"
    assert card.evaluator.options["model_dir"] == str(folder)
    # measured at build time on the folder as loaded from disk, against itself
    assert card.metrics["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert card.metrics["topk_agreement"] == 1.0 and card.metrics["nonfinite_outputs"] == 0.0
    assert card.suggested_criteria["max_size"] == "70%"


def test_copy_is_exact_and_reports_progress(tmp_path) -> None:
    events: list[dict] = []
    copy_minilm_folder(0, Progress(emit=events.append, min_interval_s=0), tmp_path)
    source = packaged_minilm_folder()
    for name in FOLDER_FILES:
        assert (tmp_path / name).read_bytes() == (source / name).read_bytes()
    assert [(e["current"], e["total"]) for e in events] == [
        (i, len(FOLDER_FILES)) for i in range(len(FOLDER_FILES) + 1)
    ]


def test_robopt_loader_runs_it_on_the_card_inputs(built) -> None:
    folder, card = built
    loaded = load_model(folder)
    assert loaded.format == "hf-folder" and loaded.metadata["hf_class"] == "BertModel"
    assert loaded.metadata["hf_unexpected_keys"] == []
    with torch.no_grad():
        output = loaded.module(*make_example_inputs(card.input_spec))
    assert output.last_hidden_state.shape == (1, 128, 384)
    assert torch.isfinite(output.last_hidden_state).all()


def test_plain_transformers_reproduces_sentence_transformers(built) -> None:
    from sentence_transformers import SentenceTransformer

    folder, _ = built
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padded, so the mask matters for pooling
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)

    reference = SentenceTransformer(str(packaged_minilm_folder()), device="cpu")
    theirs = reference.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True).cpu()
    assert ours.shape == theirs.shape == (3, 384)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # and the embeddings carry meaning: the paraphrases are closer to each other than to the coffee sentence
    assert float(ours[0] @ ours[1]) > float(ours[0] @ ours[2])
