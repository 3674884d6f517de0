"""SparseGPT: one-shot unstructured pruning of Linear weights with OBS-style reconstruction from calibration data.

Frantar & Alistarh 2023 ("SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"); the algorithm
lives in robopt.tools.sparsity (written from the paper, see there why no library is used). The kept weights are
updated to compensate for the pruned ones, so the layer outputs on the calibration inputs move less than with
magnitude or Wanda pruning at the same sparsity. Zeros stay in dense storage: no smaller file, no faster dense kernel.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.tools import sparsity
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
from robopt.tools.techniques.prune_wanda import (
    CalibratedPruneConfig,
    linear_applicability,
    milder_sparsity,
    prunable_linears,
    sparse_estimate,
    sparse_result,
)


class SparseGptSettings(CalibratedPruneConfig):
    """The OBS solver's settings, shared with the N:M pruner."""

    blocksize: int = Field(
        default=128, ge=1, le=4096, description="Columns per lazy-update block (and per mask-selection block)."
    )
    percdamp: float = Field(
        default=0.01, gt=0.0, le=1.0, description="Dampening added to the Hessian diagonal (share of its mean)."
    )


class SparseGptConfig(SparseGptSettings):
    """SparseGPT: the share of each block of columns with the lowest OBS saliency is zeroed, the rest updated."""

    sparsity: float = Field(default=0.5, gt=0.0, lt=1.0, description="Share of each layer's weights set to zero.")


@register_technique
class PruneSparseGpt(Technique):
    name = "prune_sparsegpt"
    family = "pruning"
    description = (
        "SparseGPT: one-shot unstructured pruning of Linear weights that updates the kept weights (inverse Hessian "
        "of the layer inputs, from calibration data) to keep each layer's outputs. Zeros do not shrink dense "
        "storage or speed dense kernels on this CPU."
    )
    config_cls = SparseGptConfig
    planned_by_default = False  # zeros alone gain nothing in dense storage or speed

    def availability(self) -> Availability:
        return Availability(True, backend="robopt.tools.sparsity (SparseGPT, Frantar & Alistarh 2023; torch)")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return linear_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, SparseGptConfig)
        return sparse_estimate(config.sparsity, "SparseGPT")

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        return milder_sparsity(config)

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, SparseGptConfig)
        targets, skipped = prunable_linears(model, context, config.skip_head, self.name)
        samples, source = sparsity.calibration_samples(context, config.samples, self.name)

        def prune(_name: str, layer: nn.Linear, stats: sparsity.InputStatistics) -> torch.Tensor:
            assert stats.xtx is not None
            return sparsity.sparsegpt_prune(
                layer.weight, stats.xtx, sparsity=config.sparsity, blocksize=config.blocksize, percdamp=config.percdamp
            )

        reports = sparsity.prune_linear_layers(
            model,
            targets,
            samples,
            prune,
            sequential=config.sequential,
            full_statistics=True,
            progress=context.progress,
            stage=self.name,
        )
        return sparse_result(
            model,
            targets,
            skipped,
            reports,
            "robopt.tools.sparsity SparseGPT (OBS updates, lazy column blocks)",
            source,
            {
                "method": "sparsegpt",
                "requested_sparsity": config.sparsity,
                "sequential": config.sequential,
                "blocksize": config.blocksize,
                "percdamp": config.percdamp,
                "calibration_samples": len(samples),
            },
        )
