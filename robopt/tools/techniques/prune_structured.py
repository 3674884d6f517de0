"""Structured channel pruning with torch-pruning's dependency graph: removes whole channels/neurons, outputs intact.

The result is a genuinely smaller dense model (fewer parameters and FLOPs); accuracy usually needs fine-tuning
to recover at high ratios.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Literal

from pydantic import Field
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
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

_SUPPORTED_FAMILIES = ("cnn", "mlp-policy")
_TRANSFORMER_FAMILIES = ("transformer-encoder", "decoder-llm", "vision-language-action")
_NORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm")
_MILDER = (0.5, 0.3, 0.15)


class PruneStructuredConfig(TechniqueConfig):
    """How many channels to remove from each prunable group, and how to rank them."""

    ratio: float = Field(default=0.3, gt=0.0, lt=0.9, description="Share of channels/neurons removed per group.")
    importance: Literal["magnitude_l2", "magnitude_l1"] = Field(
        default="magnitude_l2", description="Group weight-magnitude norm used to rank channels."
    )
    global_pruning: bool = Field(
        default=False, description="Rank channels across all layers instead of pruning each group by `ratio`."
    )


def _availability() -> Availability:
    try:
        import torch_pruning  # noqa: F401
    except ImportError as e:
        return Availability(False, f"torch-pruning is not importable: {e}")
    return Availability(True, backend=f"torch-pruning {version('torch-pruning')} MetaPruner")


@register_technique
class PruneStructured(Technique):
    name = "prune_structured"
    family = "pruning"
    description = (
        "Structured channel pruning (torch-pruning, dependency-graph aware): removes whole Conv channels and "
        "Linear neurons, so the model gets smaller and faster while its output shapes stay the same."
    )
    config_cls = PruneStructuredConfig

    def availability(self) -> Availability:
        return _availability()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        reason = _layers.not_eager_reason(analysis) or _layers.already_quantized_reason(analysis)
        if reason:
            return Applicability(False, reason)
        if analysis.architecture in _TRANSFORMER_FAMILIES:
            return Applicability(False, "head/channel pruning of transformers is not supported yet")
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
        keep = (1.0 - r) ** 2  # interior layers lose input and output channels
        prunable = _layers.linear_params(analysis) + _layers.conv_params(analysis)
        norms = _layers.params_of(analysis, _NORM_TYPES)
        total = max(analysis.param_count, 1)
        after = total - prunable * (1.0 - keep) - norms * r
        return Estimate(
            size_ratio=max(after, 1.0) / total,
            speedup=1.0 + 0.5 * (1.0 / keep - 1.0),
            accuracy_risk="low" if r <= 0.15 else "medium" if r <= 0.35 else "high",
            note=(
                f"rule of thumb: interior Linear/Conv parameters and FLOPs scale by (1-r)^2 = {keep:.2f}; first and "
                "head layers shrink less. Speedup is damped because small nets are overhead-bound on CPU. "
                "Accuracy recovers with fine-tuning."
            ),
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, PruneStructuredConfig)
        lower = [r for r in _MILDER if r < config.ratio - 1e-9]
        return PruneStructuredConfig(**{**config.model_dump(), "ratio": lower[0]}) if lower else None

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, PruneStructuredConfig)
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
        norm = 2 if config.importance == "magnitude_l2" else 1
        importance = tp.importance.GroupMagnitudeImportance(p=norm)
        # Tracing follows autograd's graph, so frozen parameters must require grad while the pruner is built;
        # pruning replaces Parameter objects, so they are restored by name.
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
        for n, p in model.named_parameters():
            if n in frozen:
                p.requires_grad_(True)
        try:
            pruner = tp.pruner.MetaPruner(
                model,
                inputs,
                importance=importance,
                pruning_ratio=config.ratio,
                global_pruning=config.global_pruning,
                ignored_layers=heads,
                forward_fn=lambda m, x: m(*x),
            )
            groups = 0
            for group in pruner.step(interactive=True):
                group.prune()
                groups += 1
                context.progress.update(self.name, groups, None, "pruning channel groups")
            context.progress.update(self.name, groups, groups)
        finally:
            for n, p in model.named_parameters():
                if n in frozen:
                    p.requires_grad_(False)
        model.eval()
        shapes_after = _layers.output_shapes(model, inputs)
        if shapes_after != shapes_before:
            raise TechniqueFailedError(
                f"structured pruning changed the output shapes from {shapes_before} to {shapes_after}",
                "the output layer was not recognized; this model needs its head named explicitly",
            )
        params_after = _layers.count_params(model)
        if params_after >= params_before:
            raise TechniqueFailedError(
                f"structured pruning at ratio {config.ratio} removed no channel",
                "raise the ratio, or the layers are too narrow to prune",
            )
        return TechniqueResult(
            model=model,
            backend=f"{_availability().backend} (GroupMagnitudeImportance p={norm})",
            details={
                "params_before": params_before,
                "params_after": params_after,
                "param_ratio": round(params_after / params_before, 6),
                "ratio": config.ratio,
                "global_pruning": config.global_pruning,
                "groups_pruned": groups,
                "ignored_layers": [n for n, m in model.named_modules() if any(m is h for h in heads)],
                "output_shapes": shapes_after,
            },
        )
