"""The Python API: optimize, chat, analyze, resume, history and rollback — the same graph the CLI runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.domain.criteria import Criteria
from robopt.domain.plan import OptimizationResult
from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import EvaluationError
from robopt.evaluation.base import EvaluatorSpec
from robopt.graph.context import Context
from robopt.memory.artifacts import ArtifactStore
from robopt.progress import Progress
from robopt.runner import (
    EventHandler,
    SessionOutcome,
    new_session_id,
    rollback_session,
    run_session,
    session_history,
)
from robopt.tools.ingest import ARTIFACT_PREFIX, ingest_model
from robopt.tools.loading import LoadOptions

ModelInput = str | Path | nn.Module


def parse_evaluator(value: EvaluatorSpec | str | dict[str, Any] | None) -> EvaluatorSpec | None:
    """'classification', 'classification:digits', 'classification:data.npz', a dict or a spec."""
    if value is None or isinstance(value, EvaluatorSpec):
        return value
    if isinstance(value, dict):
        return EvaluatorSpec.model_validate(value)
    name, _, dataset = value.partition(":")
    if not name:
        raise EvaluationError(f"empty evaluator in {value!r}", "use e.g. classification:digits or output-fidelity")
    return EvaluatorSpec(name=name, dataset=dataset or None)


def _input_spec_of(module: nn.Module, options: LoadOptions) -> InputSpec | None:
    if options.input_spec is not None:
        return options.input_spec
    if options.input_shape is not None:
        return InputSpec(inputs=[TensorSpec(shape=list(options.input_shape))], source="caller")
    spec = getattr(module, "input_spec", None)
    if isinstance(spec, InputSpec):
        return spec
    if isinstance(spec, dict):
        return InputSpec.model_validate(spec)
    return None


def _model_reference(model: ModelInput, options: LoadOptions, context: Context) -> str:
    """A live module is stored as an artifact first: graph state holds references, never modules."""
    if isinstance(model, nn.Module):
        store = ArtifactStore(context.settings().artifacts_dir)
        ref = store.put_module(model, input_spec=_input_spec_of(model, options))
        return f"{ARTIFACT_PREFIX}{ref.sha256}"
    return str(model)


def _load_options(value: LoadOptions | dict[str, Any] | None) -> LoadOptions:
    return value if isinstance(value, LoadOptions) else LoadOptions.model_validate(value or {})


def _criteria(criteria: Criteria | dict[str, Any] | None) -> dict[str, Any] | None:
    """None stays None: intake then takes a zoo model's suggested criteria from its card (or the defaults)."""
    if criteria is None:
        return None
    return (criteria if isinstance(criteria, Criteria) else Criteria.model_validate(criteria)).model_dump(mode="json")


def optimize(
    model: ModelInput,
    criteria: Criteria | dict[str, Any] | None = None,
    *,
    evaluator: EvaluatorSpec | str | dict[str, Any] | None = None,
    load_options: LoadOptions | dict[str, Any] | None = None,
    techniques: list[str] | None = None,
    calibration: str | Path | None = None,
    session: str | None = None,
    context: Context | None = None,
    on_event: EventHandler | None = None,
) -> OptimizationResult:
    """Optimize a model (path, zoo name, or nn.Module) against criteria; returns the measured result.

    `calibration`: a data file for techniques that calibrate on real inputs (.npz with one array per input name,
    .pt tensors, or .txt/.jsonl text for token models); default: the evaluator's own training-side data.
    `result.artifact` is the best model's artifact path; `result.attempts` lists every step tried.
    """
    context = context or Context()
    options = _load_options(load_options)
    spec = parse_evaluator(evaluator)
    inputs: dict[str, Any] = {
        "model": _model_reference(model, options, context),
        "criteria": _criteria(criteria),
        "evaluator": spec.model_dump(mode="json") if spec else None,
        "load_options": options.model_dump(mode="json"),
        "techniques": techniques,
        # A path relative to the caller's directory, resolved here: the graph may run elsewhere (service, resume).
        "calibration": str(Path(calibration).expanduser().resolve()) if calibration is not None else None,
    }
    outcome = run_session(inputs, session=session or new_session_id(), context=context, on_event=on_event)
    return outcome.result()


def chat(
    request: str,
    *,
    evaluator: EvaluatorSpec | str | dict[str, Any] | None = None,
    session: str | None = None,
    context: Context | None = None,
    on_event: EventHandler | None = None,
) -> OptimizationResult:
    """Optimize from a natural-language request, e.g. "shrink digits-cnn to under 100 KB, lose at most 1%"."""
    spec = parse_evaluator(evaluator)
    inputs = {"request": request, "evaluator": spec.model_dump(mode="json") if spec else None}
    outcome = run_session(inputs, session=session or new_session_id(), context=context or Context(), on_event=on_event)
    return outcome.result()


def resume(
    session: str,
    *,
    context: Context | None = None,
    on_event: EventHandler | None = None,
    checkpoint: str | None = None,
) -> OptimizationResult:
    """Continue a session from its last checkpoint (or from `checkpoint`, an id or unique prefix, forking there)."""
    outcome: SessionOutcome = run_session(
        None, session=session, context=context or Context(), on_event=on_event, checkpoint_id=checkpoint
    )
    return outcome.result()


def history(session: str, *, context: Context | None = None) -> list[dict[str, Any]]:
    """The session's checkpoints, oldest first, with the accepted model and metrics at each."""
    return session_history(session, context or Context())


def rollback(session: str, checkpoint: str, *, context: Context | None = None) -> OptimizationResult:
    """Restore the model accepted at `checkpoint` as the session's result."""
    return rollback_session(session, checkpoint, context or Context())


def shape_only_zoo_name(model: ModelInput) -> str | None:
    """`model` when it names a shape-only zoo entry (an architecture without weights), else None."""
    from robopt import zoo
    from robopt.zoo.cards import get_entry

    if isinstance(model, str) and not Path(model).expanduser().exists() and model in zoo.list_entries():
        return model if get_entry(model).kind == "shape-only" else None
    return None


def shape_report(
    name: str, *, devices: list[str] | None = None, context: Context | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Parameters, FLOPs, memory per precision and roofline latency / control-rate predictions per target
    device for an OpenVLA-shaped zoo model (openvla-7b-shape is built on the meta device: no weights)."""
    from robopt.tools.shape_report import zoo_shape_report

    settings = (context or Context()).settings()
    return zoo_shape_report(
        name, zoo_dir=settings.zoo_dir, devices=devices, data_dir=settings.data_dir, progress=progress
    )


def analyze(
    model: ModelInput,
    *,
    load_options: LoadOptions | dict[str, Any] | None = None,
    context: Context | None = None,
    progress: Progress | None = None,
    calibration: str | Path | None = None,
) -> AnalysisReport:
    """Profile a model without optimizing it: size, parameters, FLOPs, census, family, latency, memory,
    per-layer quantization sensitivity (on `calibration`, a file like optimize's, else the data the model's
    evaluator implies) and the techniques that apply with their expected gains."""
    from robopt.evaluation.base import EvaluatorSpec
    from robopt.evaluation.profile_artifact import profile_artifact
    from robopt.tools.registry import list_techniques
    from robopt.tools.sensitivity_report import artifact_sensitivity

    context = context or Context()
    settings = context.settings()
    options = _load_options(load_options)
    store = ArtifactStore(settings.artifacts_dir)
    progress = progress or Progress(node="analyze")
    if calibration:  # a missing or unreadable file fails now, not after the model is profiled
        from robopt.calibration import check_calibration_path

        check_calibration_path(Path(calibration).expanduser())
    ingested = ingest_model(
        _model_reference(model, options, context),
        store=store,
        zoo_dir=settings.zoo_dir,
        options=options,
        progress=progress,
    )
    profile = profile_artifact(
        store,
        ingested.artifact,
        evaluator=None,
        threads=settings.effective_threads(),
        progress=progress,
        seed=context.seed,
        isolated=context.isolated_measurement,
        source=ingested.source,
        hf_config=ingested.hf_config,
    )
    report = profile.analysis
    report.source_format = ingested.source_format
    evaluator = EvaluatorSpec.model_validate(ingested.card["evaluator"]) if ingested.card else None
    sensitivity = artifact_sensitivity(
        store,
        ingested.artifact,
        evaluator=evaluator,
        data_dir=settings.data_dir,
        seed=context.seed,
        budget_s=settings.sensitivity_budget_s,
        progress=progress,
        user_file=Path(calibration).expanduser() if calibration else None,
    )
    if isinstance(sensitivity, str):
        report.unmeasured["layer_sensitivity"] = sensitivity
    else:
        report.layer_sensitivity = sensitivity
    report.techniques = [t.outlook(profile.analysis) for t in list_techniques()]
    return report
