"""Per-layer sensitivity as part of the analysis report: measured within a time budget, summarized for planning.

The analysis node measures robopt.tools.sensitivity.layer_sensitivity (one Linear HQQ-quantized at a time, output
error on calibration samples) at 8/4/3/2 bits with group size 64 (the defaults of the hqq and mixed_precision
techniques), as many samples as fit the budget (4 to 32), and stores it as data (SensitivityReport). Planners use
it through the techniques' estimates: the summed per-layer noise powers predict the output SQNR of a uniform or a
mixed bit assignment, and that prediction sets the estimate's accuracy risk (risk_from_sqnr).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from robopt.calibration.base import CalibrationSet
from robopt.domain.analysis import LayerSensitivityRecord, SensitivityReport
from robopt.errors import RoboptError
from robopt.progress import Progress
from robopt.tools.analysis import eval_mode
from robopt.tools.sensitivity import MAX_SQNR_DB, LayerSensitivity, layer_sensitivity, sensitivity_table, sqnr_db
from robopt.tools.threads import torch_threads

BITS = (8, 4, 3, 2)
GROUP_SIZE = 64
MIN_SAMPLES, MAX_SAMPLES = 4, 32
METHOD = (
    "output SQNR with one Linear layer at a time HQQ-quantized (group 64, axis 1), every other layer in float; "
    "predictions sum the per-layer output noise powers"
)
# Predicted output SQNR -> accuracy risk of a plan step (a coarse prior for ordering plans; evaluation judges).
# 25 dB is about 6% RMS output error, 15 dB about 18%. Seen here: reacher-policy at uniform 4-bit (18.6 dB) kept its
# closed-loop success, tiny-lm at 4-bit (27 dB) lost 0.4% perplexity, at 2-bit (8.9 dB) 12%.
LOW_RISK_DB, MEDIUM_RISK_DB = 25.0, 15.0

Risk = Literal["low", "medium", "high"]

if TYPE_CHECKING:
    from robopt.domain.records import ArtifactRef
    from robopt.evaluation.base import EvaluatorSpec
    from robopt.memory.artifacts import ArtifactStore


def risk_from_sqnr(db: float | None) -> Risk | None:
    if db is None:
        return None
    return "low" if db >= LOW_RISK_DB else "medium" if db >= MEDIUM_RISK_DB else "high"


def to_report(
    results: list[LayerSensitivity],
    *,
    source: str,
    samples: int,
    group_size: int,
    seconds: float,
    fingerprint: str = "",
) -> SensitivityReport:
    bits = sorted({b for r in results for b in r.relative_error}, reverse=True)
    uniform = {b: predicted_sqnr_db(results, {r.name: b for r in results}) for b in bits}
    spread = {}
    for b in bits:
        # layers that do not reach the output at all (MAX_SQNR_DB) say nothing about the spread
        values = [r.sqnr_db[b] for r in results if -math.inf < r.sqnr_db.get(b, math.inf) < MAX_SQNR_DB]
        if values:
            spread[b] = round(max(values) - min(values), 3)
    return SensitivityReport(
        method=METHOD,
        calibration_source=source,
        calibration_fingerprint=fingerprint,
        samples=samples,
        group_size=group_size,
        bits=bits,
        seconds=round(seconds, 3),
        layers=[LayerSensitivityRecord.model_validate(row) for row in sensitivity_table(results)],
        uniform_sqnr_db=uniform,
        spread_db=spread,
    )


def from_report(report: SensitivityReport) -> list[LayerSensitivity]:
    """The report's layers as LayerSensitivity (non-finite errors, stored as None, come back as inf)."""

    def value(v: float | None, missing: float) -> float:
        return missing if v is None else v

    return [
        LayerSensitivity(
            name=r.name,
            layer_type=r.layer_type,
            role=r.role,  # type: ignore[arg-type]
            params=r.params,
            relative_error={b: value(v, math.inf) for b, v in r.relative_error.items()},
            sqnr_db={b: value(v, -math.inf) for b, v in r.sqnr_db.items()},
            stored_bytes=dict(r.stored_bytes),
        )
        for r in report.layers
    ]


def predicted_sqnr_db(layers: Iterable[LayerSensitivity], bits_of: dict[str, int | None]) -> float | None:
    """Output SQNR predicted for quantizing each layer at bits_of[name] (None or absent: kept in float).
    None when a chosen width was not measured for some layer."""
    total = 0.0
    for layer in layers:
        b = bits_of.get(layer.name)
        if b is None:
            continue
        if b not in layer.relative_error:
            return None
        total += layer.relative_error[b]
    return round(sqnr_db(total), 3)


def uniform_prediction(
    report: SensitivityReport, bits: int, *, skip_roles: tuple[str, ...] = ()
) -> tuple[float | None, int]:
    """Predicted output SQNR with every measured layer (but those in skip_roles) at `bits`, and how many layers."""
    layers = [r for r in from_report(report) if r.role not in skip_roles]
    return predicted_sqnr_db(layers, {r.name: bits for r in layers}), len(layers)


def _linear_count(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if type(m) is nn.Linear)


def _forward_seconds(model: nn.Module, samples: list[tuple[torch.Tensor, ...]]) -> float:
    from robopt.evaluation.classification import call_model

    with eval_mode(model), torch.no_grad(), torch_threads(1):
        call_model(model, samples[0])  # warm-up
        started = time.perf_counter()
        for sample in samples:
            call_model(model, sample)
        return (time.perf_counter() - started) / len(samples)


def measure_for_analysis(
    model: nn.Module,
    calibration: Callable[[int], CalibrationSet],
    *,
    budget_s: float,
    progress: Progress,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
) -> SensitivityReport | str:
    """The model's SensitivityReport, or why it was not measured (a sentence for the report's `unmeasured`).

    Samples: as many of MAX_SAMPLES as the budget allows for (Linear layers x 4 widths + 1) forward passes at the
    measured single-thread forward time; below MIN_SAMPLES it is not measured.
    """
    if budget_s <= 0:
        return "turned off (ROBOPT_SENSITIVITY_BUDGET_S=0)"
    linears = _linear_count(model)
    if linears == 0:
        return "the model has no nn.Linear layer (sensitivity is measured on Linear layers)"
    try:
        from robopt.tools.techniques import _layers

        _layers.require_eager_float_module(model, "layer sensitivity")
        calib = calibration(MAX_SAMPLES)
        samples = [tuple(s) for s in calib.samples]
        per_forward = _forward_seconds(model, samples[:MIN_SAMPLES])
        passes = linears * len(BITS) + 1
        affordable = int(budget_s / (passes * per_forward)) if per_forward > 0 else MAX_SAMPLES
        n = min(len(samples), MAX_SAMPLES, affordable)
        if n < MIN_SAMPLES:
            need = passes * MIN_SAMPLES * per_forward
            return (
                f"would take about {need:.0f} s ({linears} Linear layers x {len(BITS)} bit widths x {MIN_SAMPLES} "
                f"samples at {per_forward * 1e3:.1f} ms per forward), over the {budget_s:g} s budget "
                "(ROBOPT_SENSITIVITY_BUDGET_S)"
            )
        started = time.perf_counter()
        results = layer_sensitivity(
            model, samples[:n], BITS, progress, group_size=GROUP_SIZE, example_inputs=example_inputs
        )
        seconds = time.perf_counter() - started
    except RoboptError as e:
        return f"not measured: {e}"
    except ImportError as e:  # hqq missing: the quantizer the proxy uses
        return f"not measured: hqq is not importable ({e})"
    used = CalibrationSet(samples=tuple(samples[:n]), source=calib.source)
    return to_report(
        results, source=calib.source, samples=n, group_size=GROUP_SIZE, seconds=seconds, fingerprint=used.fingerprint
    )


def artifact_sensitivity(
    store: ArtifactStore,
    ref: ArtifactRef,
    *,
    evaluator: EvaluatorSpec | None,
    data_dir: Path,
    seed: int,
    budget_s: float,
    progress: Progress,
    user_file: Path | None = None,
) -> SensitivityReport | str:
    """Sensitivity of a stored artifact on the calibration data its evaluator implies (or the user's file):
    what the analysis node and `robopt analyze` put in the report."""
    if ref.format == "onnx":
        return "measured on PyTorch modules only (this artifact is ONNX)"
    from robopt.calibration import calibration_source
    from robopt.tools.example_inputs import make_example_inputs

    calibration = calibration_source(evaluator, ref.input_spec, data_dir, seed, user_file=user_file, progress=progress)
    inputs = make_example_inputs(ref.input_spec, seed) if ref.input_spec else None
    progress.message("sensitivity", "measuring per-layer quantization sensitivity")
    return measure_for_analysis(
        store.load(ref), calibration, budget_s=budget_s, progress=progress, example_inputs=inputs
    )


def reusable_table(
    report: SensitivityReport | None, model: nn.Module, bits: Iterable[int], group_size: int, samples: int
) -> list[LayerSensitivity] | None:
    """The analysis report's sensitivity when it was measured on exactly this model's Linear layers, with these bit
    widths and group size (axis 1) and at least `samples` samples; else None (measure again)."""
    if report is None or report.group_size != group_size or report.samples < samples:
        return None
    if not set(bits) <= set(report.bits):
        return None
    linears = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    if {r.name for r in report.layers} != linears:
        return None
    return from_report(report)
