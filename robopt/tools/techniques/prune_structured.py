"""Structured channel pruning with torch-pruning's dependency graph: removes whole Conv channels and Linear neurons
(outputs intact), in one shot or over several rounds with recovery fine-tuning towards a teacher between them.

Channels are ranked by an importance torch-pruning provides: group weight magnitude (L1/L2), first-order Taylor or
OBD Hessian (both from per-sample gradients of a distillation loss, robopt.tools.pruning_schedule), per layer or
globally. The result is a plain, smaller dense nn.Module (fewer parameters and FLOPs, no pruning hooks).
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any, Literal

from pydantic import Field
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.tools import pruning_schedule as schedule_lib
from robopt.tools.registry import (
    Applicability,
    ApplyContext,
    Availability,
    Estimate,
    Technique,
    TechniqueConfig,
    TechniqueResult,
    register_technique,
)
from robopt.tools.techniques import _layers
from robopt.tools.threads import torch_threads
from robopt.training.fit import all_trainable

_SUPPORTED_FAMILIES = ("cnn", "mlp-policy")
_TRANSFORMER_FAMILIES = ("transformer-encoder", "decoder-llm", "vision-language-action")
_NORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm")
_MILDER = (0.5, 0.3, 0.15)
_STRONGER = ((0.5, 2), (0.65, 3), (0.75, 3))  # (ratio, pruning rounds with recovery between them)
_GRADIENT_IMPORTANCES = ("taylor", "hessian")
_MAX_SPEEDUP = 2.0  # small nets are overhead-bound on CPU: fewer FLOPs buy far less than proportional time

_IMPORTANCE_CLASSES = {
    "magnitude_l2": "GroupMagnitudeImportance p=2",
    "magnitude_l1": "GroupMagnitudeImportance p=1",
    "taylor": "TaylorImportance",
    "hessian": "HessianImportance",
}

Importance = Literal["magnitude_l2", "magnitude_l1", "taylor", "hessian"]


class PruneStructuredConfig(TechniqueConfig):
    """How many channels to remove, how to rank them, and over how many rounds with how much recovery."""

    ratio: float = Field(
        default=0.3,
        gt=0.0,
        lt=0.95,
        description="Share of channels/neurons removed (per group, or of all channels with global_pruning); "
        "interior layers keep about (1-ratio)^2 of their parameters (0.75 -> ~1/16).",
    )
    importance: Importance = Field(
        default="magnitude_l2",
        description="How channels are ranked (torch-pruning importances): magnitude_l2 / magnitude_l1 = group "
        "weight norm (no data); taylor = TaylorImportance, sum |w| E|dL/dw|; hessian = HessianImportance (Optimal "
        "Brain Damage), sum w^2 E[(dL/dw)^2]. taylor and hessian take per-sample gradients of a distillation loss "
        "against the teacher on the run's training inputs (targets sampled from the teacher, so the gradient is "
        "not zero at the teacher itself); they need training inputs.",
    )
    global_pruning: bool = Field(
        default=False,
        description="Rank channels across all layers (torch-pruning global ranking: layers lose different shares) "
        "instead of removing `ratio` of every layer's channels.",
    )
    steps: int = Field(
        default=1,
        ge=1,
        le=10,
        description="Pruning rounds: the removed share grows linearly to `ratio` over the rounds, with "
        "`recovery_steps` of fine-tuning towards the teacher after each. More rounds keep more accuracy at high "
        "ratios.",
    )
    recovery_steps: int = Field(
        default=150,
        ge=0,
        le=20_000,
        description="Optimizer steps of recovery fine-tuning (distillation towards the teacher: the run's original "
        "model, else the model as handed in) after each round, on the run's training inputs. Without training "
        "inputs recovery is skipped and the result says so; 0 turns it off.",
    )
    recovery_lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="AdamW learning rate of recovery.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Samples per recovery step.")
    calibration_samples: int = Field(
        default=512,
        ge=8,
        le=20_000,
        description="Training inputs drawn for recovery and gradient importances (a tenth is held out to measure "
        "each round's fidelity to the teacher).",
    )
    gradient_samples: int = Field(
        default=128, ge=1, le=4096, description="Samples whose per-sample gradients feed taylor/hessian importance."
    )


def _availability() -> Availability:
    try:
        import torch_pruning  # noqa: F401
    except ImportError as e:
        return Availability(False, f"torch-pruning is not importable: {e}")
    return Availability(True, backend=f"torch-pruning {version('torch-pruning')} MetaPruner")


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "hessian":
        # Its own accumulate_grad() keeps only the last sample in torch-pruning 1.6 (keyed by parameter, checked by
        # name), so the mean squared per-sample gradient is put into .grad instead (pruning_schedule).
        return tp.importance.HessianImportance()
    return tp.importance.GroupMagnitudeImportance(p=2 if name == "magnitude_l2" else 1)


def _empty_layers(model: nn.Module) -> list[str]:
    """Layers pruned down to nothing (global ranking can empty a layer whose weights are all small)."""
    empty = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and weight is not None and 0 in weight.shape:
            empty.append(name)
    return empty


@register_technique
class PruneStructured(Technique):
    name = "prune_structured"
    family = "pruning"
    description = (
        "Structured channel pruning (torch-pruning, dependency-graph aware): removes whole Conv channels and "
        "Linear neurons, ranked by magnitude, Taylor or Hessian (OBD) importance, per layer or globally, in one "
        "shot or over several rounds with distillation recovery between them; the model gets smaller and faster "
        "while its output shapes stay the same."
    )
    config_cls = PruneStructuredConfig

    def availability(self) -> Availability:
        return _availability()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        reason = _layers.not_eager_reason(analysis) or _layers.already_quantized_reason(analysis)
        if reason:
            return Applicability(False, reason)
        if analysis.architecture in _TRANSFORMER_FAMILIES:
            return Applicability(False, "transformers are pruned by prune_heads (attention heads and MLP channels)")
        if analysis.architecture not in _SUPPORTED_FAMILIES:
            return Applicability(
                False, f"structured pruning supports cnn and mlp-policy models, not {analysis.architecture!r}"
            )
        if _layers.linear_params(analysis) + _layers.conv_params(analysis) <= 0:
            return Applicability(False, "the model has no Linear or Conv layers to prune")
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, PruneStructuredConfig)
        r = config.ratio
        # Per layer, interior layers lose input and output channels: (1-r)^2 of them stay. Global ranking spreads the
        # cut unevenly and may spare the big layers (digits-cnn at 0.75: 0.29 of the parameters stay, not 0.07), so
        # its estimate is the conservative 1-r.
        keep = (1.0 - r) if config.global_pruning else (1.0 - r) ** 2
        prunable = _layers.linear_params(analysis) + _layers.conv_params(analysis)
        norms = _layers.params_of(analysis, _NORM_TYPES)
        total = max(analysis.param_count, 1)
        after = total - prunable * (1.0 - keep) - norms * r
        recovered = config.recovery_steps > 0
        risk_levels = (0.15, 0.35) if not recovered else (0.35, 0.6)
        return Estimate(
            size_ratio=max(after, 1.0) / total,
            speedup=min(1.0 + 0.5 * (1.0 / keep - 1.0), _MAX_SPEEDUP),
            accuracy_risk="low" if r <= risk_levels[0] else "medium" if r <= risk_levels[1] else "high",
            note=(
                f"rule of thumb: interior Linear/Conv parameters and FLOPs scale by {keep:.2f} "
                + (
                    "(global ranking: conservatively 1-r, the real cut depends on which layers lose channels); "
                    if config.global_pruning
                    else "((1-r)^2); "
                )
                + "first and head layers shrink less. Speedup is damped and capped at "
                f"{_MAX_SPEEDUP}x because small nets are overhead-bound on CPU. "
                + (
                    f"{config.steps} round(s) with {config.recovery_steps} recovery steps each win back accuracy "
                    "when the run has training inputs."
                    if recovered
                    else "No recovery: accuracy recovers only with a later fine-tuning step."
                )
            ),
        )

    def stronger(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """Ratios 0.5, 0.65, 0.75 (more recovery rounds as the cut deepens: 2, 3, 3), for size targets of 8x."""
        assert isinstance(config, PruneStructuredConfig)
        higher = [(r, n) for r, n in _STRONGER if r > config.ratio + 1e-9]
        if not higher:
            return None
        ratio, rounds = higher[0]
        return PruneStructuredConfig(**{**config.model_dump(), "ratio": ratio, "steps": max(config.steps, rounds)})

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, PruneStructuredConfig)
        lower = [r for r in _MILDER if r < config.ratio - 1e-9]
        return PruneStructuredConfig(**{**config.model_dump(), "ratio": lower[0]}) if lower else None

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, PruneStructuredConfig)
        # One thread: gradients, rankings and recovery come out identical on machines with any core count (and
        # small models train faster than with threads competing for a busy CPU).
        with torch_threads(1):
            return self._apply(model, config, context)

    def _apply(self, model: nn.Module, config: PruneStructuredConfig, context: ApplyContext) -> TechniqueResult:
        _layers.require_eager_float_module(model, self.name)
        if context.example_inputs is None:
            raise TechniqueNotApplicableError(
                "structured pruning traces the model and needs example inputs",
                "give the model's input shape (an InputSpec, e.g. --input-shape 1x3x224x224) so inputs can be built",
            )
        import torch_pruning as tp

        inputs = tuple(context.example_inputs)
        model.eval()
        shapes_before = _layers.output_shapes(model, inputs)
        params_before = _layers.count_params(model)
        heads = _layers.find_head_layers(model, inputs)
        gradient_importance = config.importance in _GRADIENT_IMPORTANCES
        data, recovery_note = schedule_lib.training_data(
            model,
            context,
            required_for=f"{self.name} with {config.importance} importance" if gradient_importance else None,
            recovery=config.recovery_steps > 0,
            samples=config.calibration_samples,
            batch_size=max(config.batch_size, 64),
        )
        recovering = data is not None and config.recovery_steps > 0
        rounds: list[dict[str, Any]] = []
        groups = 0
        with all_trainable(model):
            pruner = tp.pruner.MetaPruner(
                model,
                inputs,
                importance=_importance(config.importance),
                pruning_ratio=config.ratio,
                iterative_steps=config.steps,
                global_pruning=config.global_pruning,
                ignored_layers=heads,
                forward_fn=lambda m, x: m(*x),
            )
            for k, target in enumerate(schedule_lib.schedule(config.ratio, config.steps), 1):
                stage = f"{self.name} round {k}/{config.steps}"
                if gradient_importance:
                    assert data is not None
                    schedule_lib.per_sample_gradient_stat(
                        model,
                        data,
                        samples=config.gradient_samples,
                        stat="abs" if config.importance == "taylor" else "square",
                        progress=context.progress,
                        stage=f"{stage}: {config.importance} gradients",
                        seed=context.seed + k,
                    )
                for group in pruner.step(interactive=True):
                    group.prune()
                    groups += 1
                    context.progress.update(stage, groups, None, "pruning channel groups")
                schedule_lib.clear_gradients(model)
                empty = _empty_layers(model)
                if empty:
                    raise TechniqueFailedError(
                        f"pruning at ratio {target:.3g} removed every channel of {', '.join(empty)}",
                        "lower the ratio, or rank per layer (global_pruning=false)",
                    )
                rounds.append(self._round(model, k, target, data, config, context, stage, recovering))
        del pruner
        model.eval()
        shapes_after = _layers.output_shapes(model, inputs)
        if shapes_after != shapes_before:
            raise TechniqueFailedError(
                f"structured pruning changed the output shapes from {shapes_before} to {shapes_after}",
                "the output layer was not recognized; this model needs its head named explicitly",
            )
        schedule_lib.ensure_finite(model, inputs)
        params_after = _layers.count_params(model)
        if params_after >= params_before:
            raise TechniqueFailedError(
                f"structured pruning at ratio {config.ratio} removed no channel",
                "raise the ratio, or the layers are too narrow to prune",
            )
        context.progress.update(self.name, config.steps, config.steps)
        details: dict[str, Any] = {
            "params_before": params_before,
            "params_after": params_after,
            "param_ratio": round(params_after / params_before, 6),
            "ratio": config.ratio,
            "importance": config.importance,
            "global_pruning": config.global_pruning,
            "steps": config.steps,
            "groups_pruned": groups,
            "rounds": rounds,
            "recovery": "on" if recovering else (recovery_note or "off"),
            "ignored_layers": [n for n, m in model.named_modules() if any(m is h for h in heads)],
            "output_shapes": shapes_after,
        }
        if data is not None:
            details["teacher_data"] = data.describe()
        return TechniqueResult(
            model=model,
            backend=f"{_availability().backend} ({_IMPORTANCE_CLASSES[config.importance]}, "
            f"{'global' if config.global_pruning else 'per-layer'} ranking)",
            notes=recovery_note,
            details=details,
        )

    def _round(
        self,
        model: nn.Module,
        k: int,
        target: float,
        data: schedule_lib.TeacherData | None,
        config: PruneStructuredConfig,
        context: ApplyContext,
        stage: str,
        recovering: bool,
    ) -> dict[str, Any]:
        """Measure a finished round (params, held-out fidelity) and run its recovery fine-tuning."""
        record: dict[str, Any] = {"round": k, "ratio": round(target, 6), "params": _layers.count_params(model)}
        if data is None:
            return record
        record["heldout_loss_pruned"] = schedule_lib.heldout_loss(model, data)
        if recovering:
            record["recovery"] = schedule_lib.recover(
                model,
                data,
                config.recovery_steps,
                lr=config.recovery_lr,
                batch_size=config.batch_size,
                progress=context.progress,
                stage=f"{stage}: recovery",
                seed=context.seed + k,
            )
            record["heldout_loss_recovered"] = schedule_lib.heldout_loss(model, data)
        return record
