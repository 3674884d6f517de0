"""Unstructured L1-magnitude pruning of Linear/Conv weights (torch.nn.utils.prune), made permanent.

`scope="global"` ranks |w| across all pruned layers at once (one threshold: layers with smaller weights lose more),
`scope="layer"` zeroes the same share in every layer. Zeros do not shrink dense storage or speed dense kernels on
this CPU: it pays off only with a sparse format or kernel downstream, or as a step before structured pruning or
compression. Activation-aware variants: prune_wanda, prune_sparsegpt; N:M patterns: prune_semistructured.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import prune

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueNotApplicableError
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
from robopt.tools.sparsity import NO_SPEEDUP_NOTE, zero_share
from robopt.tools.techniques import _layers

_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)
_MILDER = (0.7, 0.5, 0.3, 0.15)


class PruneUnstructuredConfig(TechniqueConfig):
    """Which share of Linear/Conv weights to zero, ranked globally or per layer."""

    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0, description="Share of weights set to zero.")
    scope: Literal["global", "layer"] = Field(
        default="global", description="Rank magnitudes across all layers (global) or within each layer."
    )
    skip_head: bool = Field(default=True, description="Leave the output (classifier/action) layer dense.")


@register_technique
class PruneUnstructured(Technique):
    name = "prune_unstructured"
    family = "pruning"
    description = (
        "Unstructured L1-magnitude pruning of Linear/Conv weights (global or per layer). Zeros do not shrink "
        "dense storage or speed dense kernels: useful before sparse export or compression."
    )
    config_cls = PruneUnstructuredConfig
    planned_by_default = False  # zeros alone gain nothing in dense storage or speed

    def availability(self) -> Availability:
        return Availability(True, backend="torch.nn.utils.prune L1Unstructured")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        reason = _layers.not_eager_reason(analysis) or _layers.already_quantized_reason(analysis)
        if reason:
            return Applicability(False, reason)
        if _layers.linear_params(analysis) + _layers.conv_params(analysis) <= 0:
            return Applicability(False, "the model has no Linear or Conv weights to prune")
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, PruneUnstructuredConfig)
        s = config.sparsity
        return Estimate(
            size_ratio=1.0,
            speedup=1.0,
            accuracy_risk="low" if s <= 0.3 else "medium" if s <= 0.6 else "high",
            note="zeros do not shrink dense storage or speed dense kernels on this CPU",
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, PruneUnstructuredConfig)
        lower = [s for s in _MILDER if s < config.sparsity - 1e-9]
        return PruneUnstructuredConfig(**{**config.model_dump(), "sparsity": lower[0]}) if lower else None

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, PruneUnstructuredConfig)
        _layers.require_eager_float_module(model, self.name)
        layers = _layers.weighted_layers(model, _PRUNABLE)
        heads = _layers.find_head_layers(model, context.example_inputs) if config.skip_head else []
        targets = [(n, m) for n, m in layers if all(m is not h for h in heads)]
        if not targets:
            raise TechniqueNotApplicableError(
                "no Linear/Conv weight is left to prune" + (" after skipping the head" if heads else ""),
                "set skip_head=false or choose another technique",
            )
        model.eval()
        progress = context.progress
        if config.scope == "global":
            progress.update(self.name, 0, 1, f"global L1 pruning over {len(targets)} layers")
            prune.global_unstructured(
                [(m, "weight") for _, m in targets], pruning_method=prune.L1Unstructured, amount=config.sparsity
            )
            progress.update(self.name, 1, 1)
        else:
            for _, m in progress.track(targets, self.name):
                prune.l1_unstructured(m, "weight", amount=config.sparsity)
        for _, m in targets:
            prune.remove(m, "weight")
        with torch.no_grad():
            pruned = [m.weight.detach() for _, m in targets]
            achieved = zero_share(pruned)
            overall = zero_share([p.detach() for p in model.parameters()])
            per_layer = {n: round(zero_share([m.weight.detach()]), 6) for n, m in targets}
        return TechniqueResult(
            model=model,
            backend=f"torch.nn.utils.prune L1Unstructured ({'global' if config.scope == 'global' else 'layer-wise'})",
            notes=NO_SPEEDUP_NOTE,
            details={
                "requested_sparsity": config.sparsity,
                "achieved_sparsity": round(achieved, 6),
                "model_sparsity": round(overall, 6),
                "layers_pruned": len(targets),
                "layers_skipped": [n for n, m in layers if any(m is h for h in heads)],
                "scope": config.scope,
                "sparsity_per_layer": per_layer,
                "speedup": NO_SPEEDUP_NOTE,
                "storage": "dense (zeros stored as values): the file size does not change",
            },
        )
