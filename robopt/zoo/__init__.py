"""The model zoo: benchmark models built offline with fixed seeds, cached as safetensors + card.json per entry."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from pydantic import ValidationError
from torch import nn

from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, build_evaluator, evaluator_needs_reference
from robopt.progress import Progress

# Importing an entry module registers its entry.
from robopt.zoo import (  # noqa: F401
    digits_cnn,
    fetchreach_policy,
    mini_vla,
    minilm,
    openvla,
    reacher_policy,
    tiny_lm,
)
from robopt.zoo.cards import (
    CARD_FILE,
    HF_FOLDER,
    WEIGHTS_FILE,
    ModelCard,
    ZooEntry,
    entry_names,
    get_entry,
    load_card_model,
)

__all__ = ["ModelCard", "ZooEntry", "build", "list_entries", "load_card_model", "resolve"]


def list_entries() -> list[str]:
    """Names of the zoo models, sorted."""
    return entry_names()


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")


def build(name: str, zoo_dir: Path, *, force: bool = False, progress: Progress | None = None) -> tuple[Path, ModelCard]:
    """Train `name` offline, measure it with its evaluator, and cache it under `zoo_dir/name/`.

    Returns (model path, card): the safetensors file (module entries), the save_pretrained folder (hf-folder
    entries) or the entry's directory holding only its card (shape-only entries). A cached build is returned
    as is unless `force`.
    """
    entry = get_entry(name)
    directory = Path(zoo_dir) / name
    if not force and (cached := _load_cached(directory, name)) is not None:
        return cached
    progress = progress or Progress()
    directory.mkdir(parents=True, exist_ok=True)
    card_path = directory / CARD_FILE
    start = time.perf_counter()
    card = ModelCard(
        name=entry.name,
        description=entry.description,
        kind=entry.kind,
        architecture=entry.architecture,
        architecture_kwargs=dict(entry.architecture_kwargs),
        family=entry.family,
        input_spec=entry.input_spec,
        evaluator=entry.evaluator,
        suggested_criteria=dict(entry.suggested_criteria),
        seed=entry.seed,
        build_seconds=0.0,
    )
    # Remove the old card first: a model without a card is treated as not built, never as a stale match.
    card_path.unlink(missing_ok=True)
    if entry.kind == "shape-only":
        final = directory
    elif entry.kind == "hf-folder":
        final = directory / HF_FOLDER
        card = _build_folder(entry, card, final, progress)
    else:
        final = directory / WEIGHTS_FILE
        card = _build_module(entry, card, final, progress)
    card = card.model_copy(update={"build_seconds": round(time.perf_counter() - start, 3)})
    _write_atomic(card_path, card.model_dump_json(indent=2))
    return final, card


def _measure(entry: ZooEntry, card: ModelCard, model: nn.Module, progress: Progress) -> ModelCard:
    reference = model if evaluator_needs_reference(card.evaluator.name) else None
    evaluator = build_evaluator(
        card.evaluator, EvaluationSetup(reference=reference, input_spec=entry.input_spec, seed=entry.seed)
    )
    metrics = evaluator.evaluate_detailed(model, progress).metrics
    return card.model_copy(update={"metrics": metrics})


def _build_module(entry: ZooEntry, card: ModelCard, weights_path: Path, progress: Progress) -> ModelCard:
    assert entry.train is not None, f"zoo entry {entry.name} of kind 'module' needs a train function"
    model = entry.train(entry.seed, progress, dict(entry.architecture_kwargs))
    tmp_weights = _tmp_path(weights_path)
    try:
        _save_state_dict(model.state_dict(), tmp_weights)
        # Measured on the model read back from the file, so the card describes exactly what is cached.
        card = _measure(entry, card, load_card_model(tmp_weights, card), progress)
        os.replace(tmp_weights, weights_path)
    finally:
        tmp_weights.unlink(missing_ok=True)
    return card


def _build_folder(entry: ZooEntry, card: ModelCard, folder: Path, progress: Progress) -> ModelCard:
    """Write the folder in a temporary directory, measure it as loaded from disk, then move it in place.

    An evaluator option `model_dir` (null in the entry) is filled with the folder's path: evaluators of
    Hugging Face models find the tokenizer there.
    """
    from robopt.tools.loading import LoadOptions, load_model

    assert entry.build_folder is not None, f"zoo entry {entry.name} of kind 'hf-folder' needs build_folder"
    tmp = _tmp_path(folder)
    try:
        tmp.mkdir(parents=True)
        entry.build_folder(entry.seed, progress, tmp)
        if "model_dir" in card.evaluator.options:
            card = card.model_copy(update={"evaluator": _with_model_dir(card.evaluator, tmp)})
        loaded = load_model(tmp, LoadOptions(input_spec=entry.input_spec))
        card = _measure(entry, card, loaded.module, progress)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if "model_dir" in card.evaluator.options:
        card = card.model_copy(update={"evaluator": _with_model_dir(card.evaluator, folder)})
    return card


def _with_model_dir(spec: EvaluatorSpec, folder: Path) -> EvaluatorSpec:
    return spec.model_copy(update={"options": {**spec.options, "model_dir": str(folder)}})


def resolve(name: str, zoo_dir: Path, progress: Progress | None = None) -> tuple[Path, ModelCard]:
    """The cached build of `name`, building it first when it is missing."""
    return build(name, zoo_dir, force=False, progress=progress)


def _load_cached(directory: Path, name: str) -> tuple[Path, ModelCard] | None:
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        return None
    try:
        card = ModelCard.model_validate_json(card_path.read_text())
    except (ValidationError, UnicodeDecodeError):
        return None  # an unreadable card is a broken cache entry: rebuild it
    if card.name != name or card.kind != get_entry(name).kind:
        return None
    path = {"module": directory / WEIGHTS_FILE, "hf-folder": directory / HF_FOLDER, "shape-only": directory}[card.kind]
    return (path, card) if path.exists() else None


def _save_state_dict(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
