"""`calibration_source(...)`: the lazy calibration source of a run, chosen by its evaluator (the model type).

- classification:digits -> images of the digits training split (the evaluator measures on the test split).
- closed-loop:TASK -> the scripted expert's model inputs on training episode seeds (below 1000, the evaluator's
  own episode seeds excluded); for mini-vla each sample is image + instruction ids.
- perplexity, lm-eval (with model_dir) -> token windows of the stdlib training corpus (evaluation: held-out modules).
- embedding-fidelity (with model_dir) -> token windows of training-module docstrings, minus any line holding one
  of the evaluator's sentences.
- anything else -> random inputs from the input spec, and the source line says so (RANDOM_SOURCE).
- a user file (--calibration FILE) overrides all of the above (robopt.calibration.files).

Nothing runs until a technique calls `source(n)`. A source has fewer samples than asked for only when its data
runs out (a user file, a corpus); it then returns all it has and its `source` line says "all K samples (n
requested)": samples are never repeated to fill a set. The same (data, input spec, n, seed) always gives the same
tensors; sets are cached under <data_dir>/calibration/ (random inputs are not: they cost less than a file read).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robopt.calibration import cache
from robopt.calibration.base import CalibrationSet
from robopt.calibration.files import check_calibration_path, check_text_model, file_samples, is_text, load_tensor_file
from robopt.calibration.samples import Sample
from robopt.calibration.text import (
    docstring_samples,
    evaluator_sentences,
    sentences_sha256,
    sequence_length,
    text_params,
    training_corpus_samples,
)
from robopt.calibration.zoo_data import (
    STATES_PER_EPISODE,
    digits_split_samples,
    expert_state_samples,
    random_samples,
)
from robopt.domain.records import InputSpec
from robopt.errors import TechniqueNotApplicableError
from robopt.evaluation.base import EvaluatorSpec
from robopt.progress import Progress

Builder = Callable[[dict[str, Any], int, int, InputSpec | None, Progress], tuple[list[Sample], str]]

BUILDERS: dict[str, Builder] = {
    "digits": digits_split_samples,
    "expert-states": expert_state_samples,
    "training-corpus": training_corpus_samples,
    "docstrings": docstring_samples,
    "random": random_samples,
    "file": file_samples,
}
TOKEN_EVALUATORS = ("perplexity", "lm-eval")
ENCODER_EVALUATORS = ("embedding-fidelity",)


@dataclass(frozen=True)
class Recipe:
    """Which builder makes the set, and every value the set depends on (the cache key is made from them)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        return self.kind != "random"


def _closed_loop_params(evaluator: EvaluatorSpec) -> dict[str, Any]:
    from robopt.evaluation.classification import parse_options
    from robopt.evaluation.closed_loop import ClosedLoopOptions

    options = parse_options(ClosedLoopOptions, evaluator)
    return {
        "task": evaluator.dataset,
        "excluded_seeds": [options.first_seed, options.first_seed + options.episodes],
        "states_per_episode": STATES_PER_EPISODE,
    }


def choose_recipe(
    evaluator: EvaluatorSpec | None,
    input_spec: InputSpec | None,
    user_file: Path | None = None,
    length: int | None = None,
) -> Recipe:
    """The recipe for a run: the user's file if given, else the evaluator's training-side data, else random.

    Reads the user file and tokenizer files to hash them (for the cache key); builds nothing.
    """
    model_dir = (evaluator.options.get("model_dir") if evaluator else None) or None
    free_length = length is not None
    if user_file is not None:
        path = Path(user_file).expanduser().resolve()
        check_calibration_path(path)
        params: dict[str, Any] = {"path": str(path), "sha256": cache.file_sha256(path)}
        if is_text(path):
            params |= text_params(
                check_text_model(path, input_spec, model_dir), sequence_length(input_spec, length), free_length
            )
        return Recipe("file", params)
    if evaluator is None:
        return Recipe("random")
    if evaluator.name == "classification" and evaluator.dataset in ("digits", "digits-test", "digits-train"):
        return Recipe("digits", {"split": "test" if evaluator.dataset == "digits-train" else "train"})
    if evaluator.name == "closed-loop" and evaluator.dataset:
        return Recipe("expert-states", _closed_loop_params(evaluator))
    if evaluator.name in TOKEN_EVALUATORS and model_dir:
        params = text_params(model_dir, sequence_length(input_spec, length), free_length)
        return Recipe("training-corpus", params | {"evaluated_on": evaluator.dataset})
    if evaluator.name in ENCODER_EVALUATORS and model_dir:
        sentences = evaluator_sentences(evaluator.dataset)
        params = text_params(model_dir, sequence_length(input_spec, length), free_length)
        return Recipe(
            "docstrings", params | {"dataset": evaluator.dataset, "sentences_sha256": sentences_sha256(sentences)}
        )
    return Recipe("random")


@dataclass(frozen=True)
class ServedSet:
    """One set a source handed out, as the run records it."""

    samples: int
    source: str
    fingerprint: str
    cached: bool

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "source": self.source, "fingerprint": self.fingerprint, "cached": self.cached}


class CalibrationProvider:
    """A lazy CalibrationSource: `provider(n)` builds (or loads from the cache) the set on its first call for n.

    `served` lists every set handed out (size, source, fingerprint, cache hit), so a run can record what a
    technique calibrated on.
    """

    def __init__(
        self,
        evaluator: EvaluatorSpec | None,
        input_spec: InputSpec | None,
        data_dir: Path,
        seed: int,
        user_file: Path | None = None,
        progress: Progress | None = None,
        sequence_length: int | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.input_spec = input_spec
        self.data_dir = Path(data_dir)
        self.seed = seed
        self.user_file = Path(user_file) if user_file is not None else None
        self.progress = progress or Progress()
        self.sequence_length = sequence_length
        self.served: list[ServedSet] = []
        self._recipe: Recipe | None = None
        self._sets: dict[int, tuple[CalibrationSet, str]] = {}

    def recipe(self) -> Recipe:
        if self._recipe is None:
            self._recipe = choose_recipe(self.evaluator, self.input_spec, self.user_file, self.sequence_length)
        return self._recipe

    def __call__(self, n: int) -> CalibrationSet:
        if not isinstance(n, int) or n < 1:
            raise TechniqueNotApplicableError(f"a calibration set needs at least one sample, {n!r} were asked for")
        if n in self._sets:
            return self._sets[n][0]
        recipe = self.recipe()
        spec = self.input_spec.model_dump(mode="json", exclude={"source"}) if self.input_spec else None
        path = cache.cache_path(
            self.data_dir, cache.cache_key({"kind": recipe.kind, **recipe.params}, spec, n, self.seed)
        )
        calibration = cache.load_cached(path) if recipe.cached else None
        hit = calibration is not None
        if calibration is None:
            started = time.perf_counter()
            samples, source = BUILDERS[recipe.kind](recipe.params, n, self.seed, self.input_spec, self.progress)
            calibration = CalibrationSet(samples=tuple(samples), source=source)
            fingerprint = calibration.fingerprint
            if recipe.cached:
                cache.store(path, calibration, fingerprint)
            self.progress.message(
                "calibration",
                f"built {len(calibration)} calibration samples in {time.perf_counter() - started:.1f} s: {source}",
            )
        else:
            fingerprint = calibration.fingerprint
            self.progress.message(
                "calibration", f"{len(calibration)} calibration samples from the cache: {calibration.source}"
            )
        self._sets[n] = (calibration, fingerprint)
        self._record(calibration, fingerprint, cached=hit)
        return calibration

    def _record(self, calibration: CalibrationSet, fingerprint: str, cached: bool) -> None:
        self.served.append(ServedSet(len(calibration), calibration.source, fingerprint, cached))


def calibration_source(
    evaluator: EvaluatorSpec | None,
    input_spec: InputSpec | None,
    data_dir: Path,
    seed: int,
    user_file: Path | None = None,
    progress: Progress | None = None,
    sequence_length: int | None = None,
) -> CalibrationProvider:
    """The run's calibration source (see the module docstring); lazy: nothing is read or built until called.

    `sequence_length`: tokens per sample for token models (default: the model's input length, else 128).
    """
    return CalibrationProvider(evaluator, input_spec, data_dir, seed, user_file, progress, sequence_length)


def validate_calibration_file(path: Path, evaluator: EvaluatorSpec | None, input_spec: InputSpec | None) -> str:
    """Check a user calibration file against the model before a run starts (intake); returns a description.

    Tensor files are read and every sample is checked; text files are checked for a token model and a tokenizer
    (tokenizing happens when a technique asks for samples).
    """
    path = Path(path).expanduser().resolve()
    check_calibration_path(path)
    if is_text(path):
        model_dir = check_text_model(path, input_spec, (evaluator.options.get("model_dir") if evaluator else None))
        return f"text calibration file {path}, tokenized with {model_dir}"
    samples = load_tensor_file(path, input_spec)
    return f"calibration file {path}: {len(samples):,} samples"
