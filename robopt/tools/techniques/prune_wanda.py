"""Wanda: unstructured pruning of Linear weights by |W| * ||X||_2 per output row, from calibration activations.

Sun et al. 2023 ("A Simple and Effective Pruning Approach for Large Language Models"); the algorithm lives in
robopt.tools.sparsity (written from the paper, see there why no library is used). Also the shared pieces of the
calibrated pruners (Wanda, SparseGPT, N:M): config base, applicability, estimate, target layers and details.
Zeros stay in dense storage: no smaller file and no faster dense kernel on this CPU.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueNotApplicableError
from robopt.tools import sparsity
from robopt.tools.registry import (
    Applicability,
    ApplyContext,
    Availability,
    Estimate,
    Risk,
    Technique,
    TechniqueConfig,
    TechniqueResult,
    register_technique,
)
from robopt.tools.techniques import _layers

MILDER_SPARSITIES = (0.7, 0.5, 0.3, 0.15)


class CalibratedPruneConfig(TechniqueConfig):
    """Settings shared by the pruners that read calibration activations of each Linear layer."""

    samples: int = Field(default=64, ge=1, le=4096, description="Calibration samples (model calls) to gather.")
    sequential: bool = Field(
        default=True,
        description="Gather each group's inputs (one ModuleList block, e.g. a decoder layer, or one Linear) with the "
        "groups before it already pruned, as the papers do; false: all from the dense model in one pass.",
    )
    skip_head: bool = Field(default=True, description="Leave the output layer (lm_head, classifier) dense.")


class WandaConfig(CalibratedPruneConfig):
    """Wanda: the share of each output row's (or each layer's) weights with the lowest |W| * ||X||_2 is zeroed."""

    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0, description="Share of each layer's weights set to zero.")
    comparison: Literal["row", "layer"] = Field(
        default="row",
        description="Rank scores within each output row (the paper's choice for LLMs) or across the whole layer.",
    )


# -- shared by the calibrated pruners --------------------------------------------------------------------------------


def linear_applicability(analysis: AnalysisReport) -> Applicability:
    """An eager float model with Linear weights."""
    reason = _layers.not_eager_reason(analysis) or _layers.already_quantized_reason(analysis)
    if reason:
        return Applicability(False, reason)
    if _layers.linear_params(analysis) <= 0:
        return Applicability(False, "the model has no Linear weights to prune")
    return Applicability(True)


def sparsity_risk(share: float) -> Risk:
    return "low" if share <= 0.3 else "medium" if share <= 0.6 else "high"


def sparse_estimate(share: float, method: str) -> Estimate:
    """Zeros in dense tensors: same size, same speed (the honest estimate); risk by the share zeroed."""
    return Estimate(
        size_ratio=1.0,
        speedup=1.0,
        accuracy_risk=sparsity_risk(share),
        note=f"{method}: zeros do not shrink dense storage or speed dense kernels on this CPU (rule of thumb: "
        "risk grows with the share zeroed; a chain step such as recovery fine-tuning or compression has to use them)",
    )


def milder_sparsity(config: TechniqueConfig) -> TechniqueConfig | None:
    """The same config with the next lower sparsity of MILDER_SPARSITIES, or None."""
    current = float(config.sparsity)  # type: ignore[attr-defined]
    lower = [s for s in MILDER_SPARSITIES if s < current - 1e-9]
    return type(config)(**{**config.model_dump(), "sparsity": lower[0]}) if lower else None


def prunable_linears(
    model: nn.Module, context: ApplyContext, skip_head: bool, technique: str, multiple_of: int = 1
) -> tuple[dict[str, nn.Linear], list[str]]:
    """(the Linear layers to prune by name, the names left dense): the head when `skip_head`, and layers whose input
    width is not a multiple of `multiple_of` (N:M groups). Puts the model in eval mode (calibration runs inference)."""
    _layers.require_eager_float_module(model, technique)
    model.eval()
    layers = _layers.weighted_layers(model, (nn.Linear,))
    heads = _layers.find_head_layers(model, context.example_inputs, (nn.Linear,)) if skip_head else []
    targets: dict[str, nn.Linear] = {}
    skipped: list[str] = []
    for name, module in layers:
        if any(module is h for h in heads) or module.in_features % multiple_of:
            skipped.append(name)
        else:
            targets[name] = module  # type: ignore[assignment]
    if not targets:
        raise TechniqueNotApplicableError(
            f"no Linear layer is left to prune (left dense: {', '.join(skipped) or 'none'})",
            "set skip_head=false, or use a technique for this model's layers",
        )
    return targets, skipped


def sparse_result(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    skipped: list[str],
    reports: dict[str, sparsity.LayerReport],
    backend: str,
    source: str,
    extra: dict[str, Any],
) -> TechniqueResult:
    """The TechniqueResult of a calibrated pruner: measured sparsity per layer and overall, errors, the honest note."""
    model.eval()
    with torch.no_grad():
        achieved = sparsity.zero_share([m.weight for m in targets.values()])
        overall = sparsity.zero_share(list(model.parameters()))
    return TechniqueResult(
        model=model,
        backend=backend,
        notes=f"{len(targets)} Linear layers pruned on {extra.get('calibration_samples', '?')} calibration samples "
        f"from {source}; {sparsity.NO_SPEEDUP_NOTE}",
        details={
            **extra,
            "achieved_sparsity": round(achieved, 6),
            "model_sparsity": round(overall, 6),
            "layers_pruned": len(targets),
            "layers_skipped": skipped,
            **sparsity.layer_details(reports),
            "speedup": sparsity.NO_SPEEDUP_NOTE,
            "storage": "dense (zeros stored as values): the file size does not change",
        },
    )


# -- Wanda -------------------------------------------------------------------------------------------------------------


@register_technique
class PruneWanda(Technique):
    name = "prune_wanda"
    family = "pruning"
    description = (
        "Wanda: unstructured pruning of Linear weights by |weight| x input-activation norm, per output row, from "
        "calibration data (no weight update). Zeros do not shrink dense storage or speed dense kernels on this CPU."
    )
    config_cls = WandaConfig
    planned_by_default = False  # zeros alone gain nothing in dense storage or speed

    def availability(self) -> Availability:
        return Availability(True, backend="robopt.tools.sparsity (Wanda, Sun et al. 2023; torch)")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return linear_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, WandaConfig)
        return sparse_estimate(config.sparsity, "Wanda")

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        return milder_sparsity(config)

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, WandaConfig)
        targets, skipped = prunable_linears(model, context, config.skip_head, self.name)
        samples, source = sparsity.calibration_samples(context, config.samples, self.name)

        def prune(_name: str, layer: nn.Linear, stats: sparsity.InputStatistics) -> torch.Tensor:
            scores = sparsity.wanda_scores(layer.weight.detach(), stats.sq_norms)
            choose = sparsity.row_prune_mask if config.comparison == "row" else sparsity.layer_prune_mask
            return layer.weight.detach().masked_fill(choose(scores, config.sparsity), 0.0)

        reports = sparsity.prune_linear_layers(
            model, targets, samples, prune, sequential=config.sequential, progress=context.progress, stage=self.name
        )
        return sparse_result(
            model,
            targets,
            skipped,
            reports,
            f"robopt.tools.sparsity Wanda (scores ranked per {config.comparison})",
            source,
            {
                "method": "wanda",
                "requested_sparsity": config.sparsity,
                "comparison": config.comparison,
                "sequential": config.sequential,
                "calibration_samples": len(samples),
            },
        )
