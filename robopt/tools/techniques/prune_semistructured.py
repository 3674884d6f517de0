"""N:M semi-structured sparsity of Linear weights (2:4 by default): n of every m consecutive input weights are zero.

The weights to drop in each group are chosen by magnitude, by Wanda's |W| * ||X||_2 or by SparseGPT (which also
updates the kept weights); see robopt.tools.sparsity. 2:4 is the pattern sparse tensor cores run, but torch's
kernels for it (torch.sparse.to_sparse_semi_structured) are CUDA only, so on this CPU the weights stay dense with
the zeros in place: same file size, same speed. The result records whether the CPU conversion works (it is probed).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field, model_validator
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
from robopt.tools.techniques.prune_sparsegpt import SparseGptSettings
from robopt.tools.techniques.prune_wanda import linear_applicability, prunable_linears, sparse_estimate, sparse_result

Score = Literal["magnitude", "wanda", "sparsegpt"]
_MILDER_SCORE: dict[str, Score] = {"magnitude": "wanda", "wanda": "sparsegpt"}


class SemiStructuredConfig(SparseGptSettings):
    """n zeros in every m consecutive input weights of each row; which ones by `score`."""

    n: int = Field(default=2, ge=1, le=16, description="Zeros per group.")
    m: int = Field(default=4, ge=2, le=32, description="Consecutive input weights per group (2:4 is n=2, m=4).")
    score: Score = Field(
        default="wanda",
        description="magnitude (|W|, no data), wanda (|W| x input norm, calibration data) or sparsegpt (OBS saliency "
        "with updates of the kept weights, calibration data).",
    )

    @model_validator(mode="after")
    def _pattern(self) -> SemiStructuredConfig:
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be below m={self.m}")
        if self.score == "sparsegpt" and self.blocksize % self.m:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of m={self.m} for sparsegpt")
        return self


@functools.cache
def cpu_semi_structured_error() -> str | None:
    """None if torch converts a 2:4 CPU tensor with to_sparse_semi_structured and multiplies it; else the error."""
    try:
        from torch.sparse import to_sparse_semi_structured

        dense = torch.tensor([1.0, 2.0, 0.0, 0.0]).repeat(64, 16)
        to_sparse_semi_structured(dense.half()) @ torch.ones(64, 8, dtype=torch.half)
    except Exception as e:  # any failure means "not usable here"; the message is recorded as it is
        return f"{type(e).__name__}: {e}".strip()
    return None


@register_technique
class PruneSemiStructured(Technique):
    name = "prune_semistructured"
    family = "pruning"
    description = (
        "N:M semi-structured sparsity (2:4 by default) of Linear weights, chosen by magnitude, Wanda or SparseGPT. "
        "torch's 2:4 kernels are CUDA only: on this CPU the zeros stay dense (same size, same speed)."
    )
    config_cls = SemiStructuredConfig
    planned_by_default = False  # zeros alone gain nothing in dense storage or speed here

    def availability(self) -> Availability:
        return Availability(True, backend="robopt.tools.sparsity N:M masks (dense storage)")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return linear_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, SemiStructuredConfig)
        return sparse_estimate(config.n / config.m, f"{config.n}:{config.m} sparsity by {config.score}")

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """The pattern fixes the sparsity; the retry keeps it and uses a score that loses less (wanda, sparsegpt)."""
        assert isinstance(config, SemiStructuredConfig)
        better = _MILDER_SCORE.get(config.score)
        return SemiStructuredConfig(**{**config.model_dump(), "score": better}) if better else None

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, SemiStructuredConfig)
        n, m = config.n, config.m
        targets, skipped = prunable_linears(model, context, config.skip_head, self.name, multiple_of=m)
        if config.score == "magnitude":
            samples, source = [], "none (magnitude needs no data)"
            reports = {}
            with torch.no_grad():
                for name, layer in context.progress.track(list(targets.items()), self.name):
                    layer.weight.masked_fill_(sparsity.nm_prune_mask(layer.weight.abs(), n, m), 0.0)
                    reports[name] = sparsity.LayerReport(sparsity.zero_share([layer.weight]), None)
        else:
            samples, source = sparsity.calibration_samples(context, config.samples, self.name)

            def prune(_name: str, layer: nn.Linear, stats: sparsity.InputStatistics) -> torch.Tensor:
                if config.score == "wanda":
                    scores = sparsity.wanda_scores(layer.weight.detach(), stats.sq_norms)
                    return layer.weight.detach().masked_fill(sparsity.nm_prune_mask(scores, n, m), 0.0)
                assert stats.xtx is not None
                return sparsity.sparsegpt_prune(
                    layer.weight, stats.xtx, nm=(n, m), blocksize=config.blocksize, percdamp=config.percdamp
                )

            reports = sparsity.prune_linear_layers(
                model,
                targets,
                samples,
                prune,
                sequential=config.sequential,
                full_statistics=True if config.score == "sparsegpt" else None,
                progress=context.progress,
                stage=self.name,
            )
        with torch.no_grad():
            broken = [name for name, layer in targets.items() if not sparsity.nm_pattern_holds(layer.weight, n, m)]
        cpu_error = cpu_semi_structured_error()
        return sparse_result(
            model,
            targets,
            skipped,
            reports,
            f"robopt.tools.sparsity {n}:{m} by {config.score} (dense storage with zeros)",
            source,
            {
                "method": f"{n}:{m} {config.score}",
                "pattern": f"{n}:{m}",
                "score": config.score,
                "pattern_holds": not broken,
                "pattern_broken_in": broken,
                "sequential": config.sequential if config.score != "magnitude" else None,
                "calibration_samples": len(samples),
                "semi_structured_kernel": (
                    f"not used: torch.sparse.to_sparse_semi_structured fails on this CPU ({cpu_error})"
                    if cpu_error
                    else "not used: dense storage kept (the conversion was not measured here)"
                ),
            },
        )
