"""Graph state: JSON data only (pydantic objects dumped to dicts), with references to artifacts, never live models."""

from __future__ import annotations

import operator
from typing import Annotated, Any

from typing_extensions import TypedDict


class InputState(TypedDict, total=False):
    """What a caller gives: a model and criteria, or a natural-language request."""

    model: str
    """A model path, a zoo name (e.g. 'digits-cnn') or 'artifact:<sha256>' for a model already in the store."""
    criteria: dict[str, Any]
    """robopt.domain.Criteria as JSON."""
    evaluator: dict[str, Any] | None
    """robopt.evaluation.base.EvaluatorSpec as JSON; default: the zoo card's, else output fidelity."""
    request: str | None
    """A natural-language request ('shrink digits-cnn to under 100 KB ...'), parsed by the intake agent."""
    load_options: dict[str, Any]
    """robopt.tools.loading.LoadOptions as JSON (architecture, trust_pickle, input_shape)."""
    techniques: list[str] | None
    """Restrict planning to these registered techniques."""
    calibration: str | None
    """Absolute path of the user's calibration data file (.npz, .pt, .txt, .jsonl) for techniques that need real
    inputs; None: the evaluator's own training-side data (robopt.calibration.providers)."""


class ModelState(TypedDict):
    """A model the run knows: its artifact, its measurement and its analysis."""

    artifact: dict[str, Any]
    measurement: dict[str, Any]
    analysis: dict[str, Any]


class State(InputState, total=False):
    """The full, checkpointed state of one optimization session."""

    session: str
    started_at: float
    ingested: dict[str, Any]
    """The validated input model: {artifact, source, source_format, hf_config, card}."""
    evaluator_resolved: dict[str, Any]
    baseline: ModelState
    current: ModelState
    """The last accepted model. Rollback returns here; it is never overwritten by a rejected candidate."""
    chain_anchor: ModelState | None
    """While provisional steps are in flight (a step judged together with the next one, e.g. pruning before its
    recovery fine-tuning): the last model judged in full. If the chain fails, rollback returns HERE."""
    rolled_back: Annotated[list[int], operator.add]
    """Indices of provisionally accepted attempts undone because the chain they started failed."""
    plan: dict[str, Any] | None
    cursor: int
    candidate: dict[str, Any] | None
    """The step in flight: {step, artifact, backend, duration_s} after optimize, or {step, error} on failure."""
    attempts: Annotated[list[dict[str, Any]], operator.add]
    decider_events: Annotated[list[dict[str, Any]], operator.add]
    replans: int
    stop_reason: str
    result: dict[str, Any] | None
