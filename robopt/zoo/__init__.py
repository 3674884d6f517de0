"""The model zoo: benchmark models built offline with fixed seeds, cached as safetensors + card.json per entry."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from pydantic import ValidationError

from robopt.evaluation.base import EvaluationSetup, build_evaluator
from robopt.progress import Progress
from robopt.zoo import digits_cnn  # noqa: F401  (registers its entry)
from robopt.zoo.cards import (
    CARD_FILE,
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

    Returns (weights path, card). A cached build is returned as is unless `force`.
    """
    entry = get_entry(name)
    directory = Path(zoo_dir) / name
    if not force and (cached := _load_cached(directory, name)) is not None:
        return cached
    progress = progress or Progress()
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, card_path = directory / WEIGHTS_FILE, directory / CARD_FILE

    start = time.perf_counter()
    model = entry.train(entry.seed, progress, dict(entry.architecture_kwargs))
    tmp_weights = _tmp_path(weights_path)
    try:
        _save_state_dict(model.state_dict(), tmp_weights)
        card = ModelCard(
            name=entry.name,
            description=entry.description,
            architecture=entry.architecture,
            architecture_kwargs=dict(entry.architecture_kwargs),
            family=entry.family,
            input_spec=entry.input_spec,
            evaluator=entry.evaluator,
            suggested_criteria=dict(entry.suggested_criteria),
            seed=entry.seed,
            build_seconds=0.0,
        )
        # Measured on the model read back from the file, so the card describes exactly what is cached.
        reloaded = load_card_model(tmp_weights, card)
        evaluator = build_evaluator(entry.evaluator, EvaluationSetup(reference=reloaded, input_spec=entry.input_spec))
        metrics = evaluator.evaluate(reloaded, progress)
        card = card.model_copy(update={"metrics": metrics, "build_seconds": round(time.perf_counter() - start, 3)})
        # Remove the old card first: weights without a card are treated as not built, never as a stale match.
        card_path.unlink(missing_ok=True)
        os.replace(tmp_weights, weights_path)
    finally:
        tmp_weights.unlink(missing_ok=True)
    _write_atomic(card_path, card.model_dump_json(indent=2))
    return weights_path, card


def resolve(name: str, zoo_dir: Path, progress: Progress | None = None) -> tuple[Path, ModelCard]:
    """The cached build of `name`, building it first when it is missing."""
    return build(name, zoo_dir, force=False, progress=progress)


def _load_cached(directory: Path, name: str) -> tuple[Path, ModelCard] | None:
    weights_path, card_path = directory / WEIGHTS_FILE, directory / CARD_FILE
    if not (weights_path.is_file() and card_path.is_file()):
        return None
    try:
        card = ModelCard.model_validate_json(card_path.read_text())
    except (ValidationError, UnicodeDecodeError):
        return None  # an unreadable card is a broken cache entry: rebuild it
    return (weights_path, card) if card.name == name else None


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
