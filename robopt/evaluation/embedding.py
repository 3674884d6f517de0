"""Embedding fidelity: how closely a sentence encoder's mean-pooled embeddings match the original model's.

For Hugging Face text encoders (e.g. the zoo's all-MiniLM-L6-v2) and their compressed variants. A bundled set of
sentences in paraphrase groups is tokenized with the model folder's tokenizer; each sentence's embedding is the
mean of `last_hidden_state` over its tokens. Sentences are batched by token count, so no batch holds padding: the
model is called exactly as the pipeline calls it, `model(input_ids)`, and the attention mask is all ones by
construction (mean pooling under the mask is the plain mean), which also works for ONNX exports that take only
`input_ids`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from robopt.errors import EvaluationError
from robopt.evaluation.base import EvaluationSetup, Evaluator, EvaluatorSpec, register_evaluator
from robopt.evaluation.classification import call_model, fixed_batch_size, parse_options, set_eval_mode
from robopt.progress import Progress
from robopt.tools.threads import torch_threads

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUNDLED_SENTENCES = "sentences"
SENTENCES_FILE = Path(__file__).with_name("data") / "sentences.txt"
_CALL_HINT = (
    "embedding-fidelity calls the model like the original encoder, model(input_ids) with int64 input_ids of shape "
    "[batch, tokens] (tokens vary per batch) and reads last_hidden_state [batch, tokens, hidden]; export ONNX models "
    "with dynamic batch and sequence axes, or judge this model with the output-fidelity evaluator"
)
_DATA_HINT = (
    f"use the bundled dataset {BUNDLED_SENTENCES!r} or a UTF-8 .txt file with one sentence a line "
    "('#' lines and blank lines are skipped)"
)


class EmbeddingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str | None = Field(
        default=None, description="the model's save_pretrained folder, where its tokenizer is (the zoo fills it)"
    )
    k: int = Field(default=5, gt=0, description="neighbours compared per query sentence for topk_agreement")
    batch_size: int = Field(default=64, gt=0, description="sentences per forward pass (at most)")
    max_length: int = Field(default=128, gt=2, description="tokens per sentence, special tokens included")
    threads: int = Field(
        default=1, gt=0, description="torch CPU threads while embedding (1: the same sums on any core count)"
    )


def load_sentences(dataset: str | None) -> list[str]:
    """The sentences of the bundled set (None or 'sentences') or of a user .txt file, in file order."""
    name = (dataset or BUNDLED_SENTENCES).strip()
    path = SENTENCES_FILE if name == BUNDLED_SENTENCES else Path(name).expanduser()
    if path is not SENTENCES_FILE and path.suffix.lower() != ".txt":
        raise EvaluationError(f"unknown dataset {dataset!r} for embedding-fidelity", _DATA_HINT)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"cannot read sentences from {str(path)!r}: {e}", _DATA_HINT) from e
    sentences = [line.strip() for line in text.splitlines()]
    return [s for s in sentences if s and not s.startswith("#")]


def _load_tokenizer(model_dir: str | None) -> PreTrainedTokenizerBase:
    hint = (
        "set the evaluator option model_dir to the model's save_pretrained folder holding its tokenizer "
        "(the zoo fills it for its own models)"
    )
    if not model_dir:
        raise EvaluationError("the embedding-fidelity evaluator needs options.model_dir to find the tokenizer", hint)
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise EvaluationError(f"model_dir {str(folder)!r} is not a folder", hint)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvaluationError(f"cannot load a tokenizer from {str(folder)!r}: {e}", hint) from e


def _length_batches(token_ids: list[list[int]], batch_size: int) -> list[tuple[list[int], torch.Tensor]]:
    """(sentence indices, input_ids [b, tokens]) with every sentence of a batch of the same length: no padding."""
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(token_ids):
        by_length.setdefault(len(ids), []).append(index)
    batches = []
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            batches.append((chunk, torch.tensor([token_ids[i] for i in chunk], dtype=torch.int64)))
    return batches


def _pad_rows(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """Fill a batch up to `rows` by repeating its last row (for models exported with a fixed batch size)."""
    return ids if ids.shape[0] == rows else torch.cat([ids, ids[-1:].expand(rows - ids.shape[0], -1)])


class EmbeddingFidelityEvaluator(Evaluator):
    """`mean_cosine` / `min_cosine` between each sentence's embedding and the original's, and `topk_agreement`.

    `topk_agreement`: for each sentence as a query, the share of its k nearest neighbours (cosine, among the other
    sentences) under the model's embeddings that are also among its k nearest under the original's, averaged.
    Non-finite embeddings are counted in `nonfinite_outputs` and leave the cosine metrics out.
    """

    name = "embedding-fidelity"
    description = (
        "agreement of a text encoder's mean-pooled sentence embeddings with the original model's "
        "(bundled 'sentences' or a .txt file; needs options.model_dir for the tokenizer)"
    )
    primary_metric = "mean_cosine"
    higher_is_better = True
    needs_reference = True

    def __init__(self, spec: EvaluatorSpec, setup: EvaluationSetup) -> None:
        self.options = parse_options(EmbeddingOptions, spec)
        if setup.reference is None:
            raise EvaluationError(
                "the embedding-fidelity evaluator compares against the original model, which was not given",
                "pass the original model as EvaluationSetup.reference",
            )
        self.reference = setup.reference
        sentences = load_sentences(spec.dataset)
        if len(sentences) <= self.options.k:
            raise EvaluationError(
                f"topk_agreement with k={self.options.k} needs more than {self.options.k} sentences, "
                f"the dataset has {len(sentences)}",
                "lower the option k or give more sentences",
            )
        tokenizer = _load_tokenizer(self.options.model_dir)
        encoded = tokenizer(sentences, truncation=True, max_length=self.options.max_length)["input_ids"]
        self.sentences = sentences
        self.token_ids: list[list[int]] = [list(ids) for ids in encoded]
        self.batches = _length_batches(self.token_ids, self.options.batch_size)
        self._reference_embeddings: torch.Tensor | None = None

    def embed(self, model: nn.Module, progress: Progress, stage: str) -> torch.Tensor:
        """Mean-pooled embeddings [sentences, hidden] in float64, in dataset order."""
        set_eval_mode(model)
        fixed = fixed_batch_size(model)
        batches = self.batches if fixed is None else _length_batches(self.token_ids, fixed)
        pooled: list[torch.Tensor | None] = [None] * len(self.token_ids)
        with torch.no_grad(), torch_threads(self.options.threads):
            for indices, ids in progress.track(batches, stage):
                inputs = _pad_rows(ids, fixed) if fixed is not None else ids
                try:
                    hidden = call_model(model, (inputs,))
                except EvaluationError as e:
                    raise EvaluationError(e.message, _CALL_HINT) from e
                if hidden.ndim != 3 or tuple(hidden.shape[:2]) != tuple(inputs.shape) or not hidden.is_floating_point():
                    raise EvaluationError(
                        f"the model returned {list(hidden.shape)} {hidden.dtype} for input_ids {list(inputs.shape)}; "
                        "a text encoder returns float last_hidden_state [batch, tokens, hidden]",
                        _CALL_HINT,
                    )
                means = hidden[: len(indices)].detach().cpu().to(torch.float64).mean(dim=1)
                for index, row in zip(indices, means, strict=True):
                    pooled[index] = row
        return torch.stack(pooled)  # type: ignore[arg-type]  # every index belongs to exactly one batch

    def reference_embeddings(self, progress: Progress) -> torch.Tensor:
        """The original model's embeddings, computed once: the reference never changes during a run."""
        if self._reference_embeddings is None:
            embeddings = self.embed(self.reference, progress, "reference")
            if not bool(torch.isfinite(embeddings).all()):
                raise EvaluationError(
                    "the original model returns non-finite embeddings, so embeddings cannot be compared",
                    "check that the reference is the unmodified original model",
                )
            self._reference_embeddings = embeddings
        return self._reference_embeddings

    def evaluate(self, model: nn.Module, progress: Progress) -> dict[str, float]:
        reference = self.reference_embeddings(progress)
        embeddings = self.embed(model, progress, "evaluate")
        if embeddings.shape != reference.shape:
            raise EvaluationError(
                f"the model's embeddings are {embeddings.shape[1]}-dimensional, the original's {reference.shape[1]}",
                "a compressed encoder must keep the original's hidden size",
            )
        nonfinite = int((~torch.isfinite(embeddings)).sum())
        metrics = {"samples": float(len(self.sentences)), "nonfinite_outputs": nonfinite / embeddings.numel()}
        if nonfinite:  # NaN would not survive JSON; nonfinite_outputs already tells the judge the model is broken
            return metrics
        cosines = row_cosines(embeddings, reference)
        metrics["mean_cosine"] = float(cosines.mean())
        metrics["min_cosine"] = float(cosines.min())
        metrics["topk_agreement"] = topk_agreement(embeddings, reference, self.options.k)
        return metrics


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between matching rows; two zero rows agree (1), one zero row does not (0)."""
    norm_a, norm_b = a.norm(dim=1), b.norm(dim=1)
    both = norm_a * norm_b
    cosines = (a * b).sum(dim=1) / torch.where(both > 0, both, torch.ones_like(both))
    cosines = torch.where(both > 0, cosines, (norm_a == norm_b).to(cosines.dtype))
    return cosines.clamp(-1.0, 1.0)


def _neighbours(embeddings: torch.Tensor, k: int) -> torch.Tensor:
    """A [n, n] boolean matrix: row i marks the k sentences most cosine-similar to sentence i (itself excluded)."""
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(float("-inf"))
    top = similarity.topk(k, dim=1).indices
    return torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, top, True)


def topk_agreement(embeddings: torch.Tensor, reference: torch.Tensor, k: int) -> float:
    """Mean share of each sentence's k nearest neighbours that the model and the reference have in common."""
    shared = (_neighbours(embeddings, k) & _neighbours(reference, k)).sum(dim=1)
    return float(shared.to(torch.float64).mean() / k)


register_evaluator(EmbeddingFidelityEvaluator.name, EmbeddingFidelityEvaluator.description)(EmbeddingFidelityEvaluator)
