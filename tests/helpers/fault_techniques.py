"""Techniques that misbehave on purpose, for fault tests. Loaded as a plugin (ROBOPT_PLUGINS) or imported.

Each one really transforms the model (or really raises); none pretends to be a compression technique the
product offers: they are never planned unless a test names them with `techniques=[...]`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.tools.registry import (
    Applicability,
    ApplyContext,
    Estimate,
    Technique,
    TechniqueConfig,
    TechniqueResult,
    get_technique,
    register_technique,
)


class NoConfig(TechniqueConfig):
    pass


class _Fault(Technique):
    family = "quantization"
    config_cls = NoConfig
    planned_by_default = False  # only when a test names it in `techniques=[...]`

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        # Looks very attractive, so the planner tries it first.
        return Estimate(size_ratio=0.1, speedup=3.0, accuracy_risk="low", note="fault-injection technique")


@register_technique
class RaisingTechnique(_Fault):
    name = "test_raise"
    description = "raises RuntimeError in apply"

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        with torch.no_grad():  # damage the (copy of the) model first: the stored artifact must not change
            for p in model.parameters():
                p.mul_(0)
        raise RuntimeError("injected failure in the middle of a step")


@register_technique
class NanTechnique(_Fault):
    name = "test_nan"
    description = "returns a model whose weights are NaN"

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        return TechniqueResult(model=model, backend="test")


@register_technique
class SlowInt8Technique(_Fault):
    """Dynamic INT8, after touching $ROBOPT_TEST_MARKER and sleeping $ROBOPT_TEST_SLEEP seconds (to be killed)."""

    name = "test_slow_int8"
    description = "sleeps, then applies quantize_dynamic_int8"

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        real = get_technique("quantize_dynamic_int8")
        return real.estimate(analysis, real.default_config())

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        if marker := os.environ.get("ROBOPT_TEST_MARKER"):
            Path(marker).write_text(str(os.getpid()))
        time.sleep(float(os.environ.get("ROBOPT_TEST_SLEEP", "0")))
        real = get_technique("quantize_dynamic_int8")
        return real.apply(model, real.default_config(), context)


@register_technique
class RaisingRecovery(RaisingTechnique):
    """A recovery step that fails: the chain it should close is rolled back with it."""

    name = "test_raise_recovery"
    family = "recovery"
    description = "a recovery step that raises RuntimeError in apply"
