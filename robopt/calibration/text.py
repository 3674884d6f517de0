"""Token-id calibration sets for language models and text encoders: fixed-length windows of training text,
tokenized with the model folder's own tokenizer.

Causal LMs get windows of the stdlib *training* corpus (robopt.evaluation.text_corpus; the perplexity and lm-eval
evaluators measure on the held-out modules). Text encoders get the docstrings of the same training modules, minus
any line holding a sentence of the embedding evaluator's set. Each window is what `tokenizer(text)` gives for it:
the tokenizer's own special tokens (BERT's [CLS] ... [SEP]; none for tiny-lm) around `length` tokens in all.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from pathlib import Path
from typing import Any

import torch

from robopt.calibration.samples import Sample, conform_sample, count_phrase, seeded_order
from robopt.domain.records import InputSpec
from robopt.errors import CalibrationDataError
from robopt.progress import Progress

DEFAULT_SEQUENCE_LENGTH = 128
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece", "sentencepiece")


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the tokenizer files of a save_pretrained folder (names and bytes), for cache keys."""
    digest = hashlib.sha256()
    folder = Path(model_dir).expanduser()
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if path.is_file() and path.name.lower().startswith(_TOKENIZER_FILES):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _load(model_dir: str, fingerprint: str) -> Any:
    from robopt.evaluation.language_model import load_tokenizer

    return load_tokenizer(model_dir)


def load_folder_tokenizer(model_dir: str) -> Any:
    """The tokenizer of a save_pretrained folder, loaded once per process for each version of its files."""
    return _load(model_dir, tokenizer_fingerprint(model_dir))


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids `tokenizer(text)` puts before and after a text's own tokens (e.g. [CLS] and [SEP])."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start]), list(full[start + len(bare) :])
    return [], []  # a template that rewrites the text's tokens: use the text's tokens alone


def token_windows(model_dir: str, text: str, length: int) -> torch.Tensor:
    """Non-overlapping windows [count, length] of `text`, each as the tokenizer frames one sequence."""
    tokenizer = load_folder_tokenizer(model_dir)
    prefix, suffix = special_affixes(tokenizer)
    content = length - len(prefix) - len(suffix)
    if content < 1:
        raise CalibrationDataError(
            f"a sequence of {length} tokens leaves no room for text after the tokenizer's special tokens",
            "use a longer sequence length",
        )
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    count = len(ids) // content
    windows = [prefix + ids[i * content : (i + 1) * content] + suffix for i in range(count)]
    return torch.tensor(windows, dtype=torch.int64).reshape(count, length)


def sequence_length(spec: InputSpec | None, requested: int | None) -> int:
    """Tokens per sample: the caller's choice, else the model's input length, else DEFAULT_SEQUENCE_LENGTH."""
    if requested is not None:
        return requested
    if spec is not None and len(spec.inputs) == 1 and len(spec.inputs[0].shape) == 2 and spec.inputs[0].shape[1] > 0:
        return spec.inputs[0].shape[1]
    return DEFAULT_SEQUENCE_LENGTH


def window_samples(
    windows: torch.Tensor, n: int, seed: int, spec: InputSpec | None, where: str, free_length: bool
) -> list[Sample]:
    """The first `n` windows in an order fixed by `seed`, as batch-1 samples checked against `spec`."""
    order = seeded_order(windows.shape[0], seed)[:n]
    return [conform_sample((windows[i : i + 1],), spec, where, free_length=free_length) for i in order]


def training_corpus_samples(
    params: dict[str, Any], n: int, seed: int, spec: InputSpec | None, progress: Progress
) -> tuple[list[Sample], str]:
    """Windows of the stdlib training corpus for causal LMs."""
    from robopt.evaluation.language_model import LM_TASK_NAME
    from robopt.evaluation.text_corpus import CORPUS_NAME, TRAIN_MODULES, corpus_text

    progress.message("calibration", f"tokenizing the stdlib training corpus ({len(TRAIN_MODULES)} modules)")
    progress.check()
    windows = token_windows(params["model_dir"], corpus_text("train"), params["length"])
    samples = window_samples(windows, n, seed, spec, "the training corpus", params["free_length"])
    dataset = params.get("evaluated_on")
    measured = "held-out modules" if dataset in (None, CORPUS_NAME, LM_TASK_NAME) else dataset
    source = (
        f"{params['length']}-token windows of the stdlib training corpus ({len(TRAIN_MODULES)} modules; the "
        f"evaluator measures on {measured}), tokenized with {params['model_dir']}: "
        f"{count_phrase(len(samples), n, windows.shape[0], 'windows')}, seed {seed}"
    )
    return samples, source


def _normalized(line: str) -> str:
    return " ".join(line.split()).lower()


def _holds_any(line: str, sentences: list[str]) -> bool:
    return any(sentence in line for sentence in sentences)


def docstring_text(excluded_sentences: list[str]) -> str:
    """The docstrings of the stdlib training modules (module, class, function), in a fixed order, without any line
    that holds one of `excluded_sentences` (compared case- and whitespace-insensitively)."""
    from robopt.evaluation.text_corpus import TRAIN_MODULES

    excluded = [_normalized(s) for s in excluded_sentences if s.strip()]
    docs = [
        "\n".join(line for line in doc.splitlines() if not _holds_any(_normalized(line), excluded))
        for name in TRAIN_MODULES
        for doc in _docstrings(name)
    ]
    return "\n\n".join(docs)


@functools.cache
def _docstrings(module: str) -> tuple[str, ...]:
    """The module's, its classes' and its functions' docstrings, in ast.walk order (parsed once per process)."""
    from robopt.evaluation.text_corpus import module_source

    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = ast.walk(ast.parse(module_source(module)))
    return tuple(doc for node in nodes if isinstance(node, kinds) and (doc := ast.get_docstring(node)))


def evaluator_sentences(dataset: str | None) -> list[str]:
    from robopt.evaluation.embedding import load_sentences

    return load_sentences(dataset)


def sentences_sha256(sentences: list[str]) -> str:
    return hashlib.sha256("\n".join(sentences).encode()).hexdigest()


def docstring_samples(
    params: dict[str, Any], n: int, seed: int, spec: InputSpec | None, progress: Progress
) -> tuple[list[Sample], str]:
    """Windows of stdlib training docstrings for text encoders, disjoint from the evaluator's sentences."""
    from robopt.evaluation.text_corpus import TRAIN_MODULES

    progress.message("calibration", f"tokenizing the docstrings of {len(TRAIN_MODULES)} stdlib training modules")
    progress.check()
    text = docstring_text(evaluator_sentences(params["dataset"]))
    progress.check()
    windows = token_windows(params["model_dir"], text, params["length"])
    samples = window_samples(windows, n, seed, spec, "the docstring corpus", params["free_length"])
    source = (
        f"{params['length']}-token windows of stdlib training-module docstrings (lines holding an evaluator "
        f"sentence removed), tokenized with {params['model_dir']}: "
        f"{count_phrase(len(samples), n, windows.shape[0], 'windows')}, seed {seed}"
    )
    return samples, source


def text_params(model_dir: str, length: int, free_length: bool) -> dict[str, Any]:
    """What a token set depends on besides its text: the tokenizer's files, the length and the Python version
    (the corpus is the installed standard library)."""
    return {
        "model_dir": model_dir,
        "tokenizer_sha256": tokenizer_fingerprint(model_dir),
        "length": length,
        "free_length": free_length,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
