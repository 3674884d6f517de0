"""Sensitivity-driven mixed precision: HQQ bits per Linear layer, chosen from measured output sensitivity under a
budget (the idea of ModelOpt's AutoQuantize and AutoRound's AutoScheme, applied to VLAs and policies).

1. Sensitivity (robopt.tools.sensitivity): each Linear alone is HQQ-quantized at each candidate bit width and the
   model's output error on the run's calibration samples is measured (relative output noise power).
2. Assignment: one bit width per layer minimizing the SUM of those errors (noise powers of independent small
   perturbations add up) subject to the budget: average bits per quantized Linear weight (parameter-weighted)
   or stored Linear bytes relative to fp32. Layers whose role is in `keep_roles` only get bit widths >= `keep_bits`.
   By default no role is protected by rule: the measured sensitivity already keeps fragile layers (action heads,
   projectors) at higher precision where it matters, and on mini-vla protecting the action head and projector at
   8 bits by rule made closed-loop success significantly WORSE at 3 bits (19 vs 6 discordant episodes of 200,
   p=0.015; bench/results/mixed_precision.json), because their bits had to come out of the backbone.
   This is a multiple-choice knapsack,
   solved EXACTLY as a 0/1 integer program by scipy's HiGHS MILP solver (a few hundred binaries at most here).
3. HQQ packs each layer at its bit width (robopt.tools.techniques.hqq_quant).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field, model_validator
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
from robopt.tools.sensitivity import LayerSensitivity, Role, layer_sensitivity, sensitivity_table
from robopt.tools.sensitivity_report import from_report, predicted_sqnr_db, reusable_table, risk_from_sqnr
from robopt.tools.techniques import _layers
from robopt.tools.techniques.hqq_quant import (
    HQQ_LAYER_SPEEDUP,
    Axis,
    Bits,
    bytes_per_weight,
    hqq_probe,
    replace_linears,
    stored_bytes,
)

SOLVER = "exact 0/1 integer program (multiple-choice knapsack), scipy.optimize.milp with HiGHS"


class MixedPrecisionConfig(TechniqueConfig):
    """Budget, candidate bit widths and protected roles of the sensitivity-driven HQQ mixed precision."""

    average_bits: float | None = Field(
        default=4.5,
        ge=2,
        le=8,
        description="Budget: average HQQ bits per quantized Linear weight (parameter-weighted). Set null to use "
        "size_ratio instead.",
    )
    size_ratio: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Budget instead of average_bits: stored bytes of the quantized Linear weights (packed values + "
        "group scales and zeros; biases stay fp32 and are not counted) / their fp32 bytes.",
    )
    candidate_bits: tuple[Bits, ...] = Field(default=(8, 4, 3, 2), min_length=1, description="Bit widths to choose.")
    keep_roles: tuple[Role, ...] = Field(
        default=(),
        description="Layer roles (vision_tower, projector, backbone, action_head, other) kept at >= keep_bits "
        "regardless of their measured sensitivity (default: none; the sensitivity decides).",
    )
    keep_bits: Bits = Field(default=8, description="Minimum bits for layers in keep_roles.")
    group_size: int = Field(default=64, ge=8, multiple_of=8, description="Weights per HQQ scale/zero group.")
    axis: Axis = Field(default=1, description="HQQ grouping axis (1: along input channels).")
    calibration_samples: int = Field(default=32, ge=1, le=1024, description="Calibration samples for sensitivity.")

    @model_validator(mode="after")
    def _one_budget(self) -> MixedPrecisionConfig:
        if (self.average_bits is None) == (self.size_ratio is None):
            raise ValueError("give exactly one budget: average_bits or size_ratio (set the other to null)")
        if len(set(self.candidate_bits)) != len(self.candidate_bits):
            raise ValueError(f"candidate_bits has duplicates: {self.candidate_bits}")
        return self


def _options(layer: LayerSensitivity, config: MixedPrecisionConfig) -> list[int]:
    """Bit widths this layer may take, cheapest first: measured with a finite error, and among candidate_bits
    (or, for a protected role, any measured width >= keep_bits)."""
    if layer.role in config.keep_roles:
        allowed = [b for b in layer.relative_error if b >= config.keep_bits]
    else:
        allowed = [b for b in layer.relative_error if b in config.candidate_bits]
    return sorted(b for b in allowed if math.isfinite(layer.relative_error[b]))


def _cost(layer: LayerSensitivity, bits: int, config: MixedPrecisionConfig) -> float:
    """What a layer at `bits` spends of the budget: nominal bits x weights, or its measured packed bytes."""
    if config.average_bits is not None:
        return layer.params * bits
    if bits in layer.stored_bytes:
        return layer.stored_bytes[bits]
    return layer.params * bytes_per_weight(bits, config.group_size)  # a table made without byte counts


def _capacity(layers: list[LayerSensitivity], config: MixedPrecisionConfig) -> float:
    weights = sum(layer.params for layer in layers)
    if config.average_bits is not None:
        return config.average_bits * weights
    assert config.size_ratio is not None
    return config.size_ratio * 4.0 * weights


def assign_bits(layers: list[LayerSensitivity], config: MixedPrecisionConfig) -> dict[str, int]:
    """The bit width of every layer minimizing the summed output error under the budget (exact MILP).

    Raises TechniqueNotApplicableError when even the cheapest allowed choice exceeds the budget.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    options = [(layer, _options(layer, config)) for layer in layers]
    options = [(layer, bits) for layer, bits in options if bits]
    capacity = _capacity([layer for layer, _ in options], config)
    cheapest = sum(_cost(layer, bits[0], config) for layer, bits in options)
    if cheapest > capacity * (1 + 1e-12):
        floor = _budget_value(cheapest, [layer for layer, _ in options], config)
        raise TechniqueNotApplicableError(
            f"the budget cannot be met: the protected roles {list(config.keep_roles)} at >= {config.keep_bits} bits "
            f"and the rest at {min(config.candidate_bits)} bits already need {floor:.3g}",
            "raise the budget, lower keep_bits or shrink keep_roles",
        )
    columns = [(i, b) for i, (_, bits) in enumerate(options) for b in bits]
    errors = np.array([options[i][0].relative_error[b] for i, b in columns])
    scale = float(errors.max()) or 1.0  # keep the objective near 1 for the solver's tolerances
    costs = np.array([_cost(options[i][0], b, config) for i, b in columns]) / capacity
    one_each = np.zeros((len(options), len(columns)))
    for j, (i, _) in enumerate(columns):
        one_each[i, j] = 1.0
    result = milp(
        c=errors / scale,
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(costs[None, :], -np.inf, 1.0 - 1e-9)],
        integrality=np.ones(len(columns)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise TechniqueFailedError(f"the bit-assignment solver failed: {result.message}", "report this as a bug")
    chosen = {options[i][0].name: b for (i, b), x in zip(columns, result.x, strict=True) if x > 0.5}
    if len(chosen) != len(options):
        raise TechniqueFailedError("the bit-assignment solver returned no choice for some layers", "report this bug")
    return chosen


def _budget_value(spent: float, layers: list[LayerSensitivity], config: MixedPrecisionConfig) -> float:
    """`spent` budget units expressed like the budget: average bits, or stored/fp32 bytes."""
    weights = sum(layer.params for layer in layers) or 1
    return spent / weights if config.average_bits is not None else spent / (4.0 * weights)


@register_technique
class MixedPrecisionHQQ(Technique):
    name = "mixed_precision"
    family = "quantization"
    description = (
        "Sensitivity-driven mixed precision: measures each Linear layer's output sensitivity on calibration data, "
        "then picks HQQ 8/4/3/2 bits per layer under an average-bits or size budget (roles such as the action head can "
        "be kept >= 8-bit with keep_roles). Needs calibration data; slower than fp32 on CPU."
    )
    config_cls = MixedPrecisionConfig

    def availability(self) -> Availability:
        hqq = hqq_probe()
        if not hqq.available:
            return hqq
        try:
            from scipy.optimize import milp  # noqa: F401
        except ImportError as e:
            return Availability(False, f"scipy's MILP solver is missing: {e}")
        return Availability(True, backend=f"{hqq.backend}; bits by {SOLVER}")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return _layers.linear_quantization_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, MixedPrecisionConfig)
        linear = _layers.linear_params(analysis)
        share = _layers.share_of_params(analysis, linear)
        if config.average_bits is not None:
            stored = config.average_bits / 8 + 8 / config.group_size
            budget = f"{config.average_bits:g} bits per weight on average"
        else:
            assert config.size_ratio is not None
            stored = 4.0 * config.size_ratio
            budget = f"{config.size_ratio:.0%} of their fp32 bytes"
        risk, measured = ("low" if stored >= 1.0 else "medium"), ""
        prediction = predicted_assignment(analysis, config)
        if prediction is not None:
            mixed_db, uniform_db, uniform_bits = prediction
            risk = risk_from_sqnr(mixed_db) or risk
            measured = f" Measured sensitivity predicts output SQNR {mixed_db:.1f} dB" + (
                f" (uniform {uniform_bits}-bit: {uniform_db:.1f} dB)." if uniform_db is not None else "."
            )
        return Estimate(
            size_ratio=_layers.size_ratio_after(analysis, linear, stored),
            speedup=_layers.amdahl_speedup(share, HQQ_LAYER_SPEEDUP),
            accuracy_risk=risk,
            note=(
                f"Linear weights ({share:.0%} of parameters) at {budget}, bits per layer chosen from measured output "
                f"sensitivity; needs calibration data.{measured} SLOWER on CPU: HQQ layers dequantize on every call."
            ),
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """One more average bit (up to 8), or 1.5x the size ratio (up to fp32 / 4, i.e. about 8-bit)."""
        assert isinstance(config, MixedPrecisionConfig)
        if config.average_bits is not None:
            return (
                config.model_copy(update={"average_bits": min(8.0, config.average_bits + 1)})
                if config.average_bits < 8
                else None
            )
        assert config.size_ratio is not None
        if config.size_ratio >= 0.28:
            return None
        return config.model_copy(update={"size_ratio": min(0.28, config.size_ratio * 1.5)})

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, MixedPrecisionConfig)
        _layers.require_eager_float_module(model, self.name)
        avail = self.availability()
        if not avail.available:
            raise TechniqueNotApplicableError(f"{self.name} is unavailable: {avail.reason}", "use hqq")
        if context.calibration is None and context.analysis.layer_sensitivity is None:
            raise TechniqueNotApplicableError(
                "mixed_precision measures each layer's sensitivity on calibration data, and this run has none",
                "run it through the pipeline (it supplies the model type's calibration set) or pass --calibration FILE",
            )
        candidates = sorted({*config.candidate_bits, config.keep_bits}, reverse=True)
        model.eval()
        report = context.analysis.layer_sensitivity
        table = (
            reusable_table(report, model, candidates, config.group_size, config.calibration_samples)
            if config.axis == 1
            else None
        )
        if table is not None and report is not None:
            context.progress.message(self.name, "per-layer sensitivity reused from the analysis report")
            calibration_record = {
                "sensitivity_from": "analysis report",
                "calibration_source": report.calibration_source,
                "calibration_samples": report.samples,
                "calibration_fingerprint": report.calibration_fingerprint,
            }
        else:
            if context.calibration is None:
                raise TechniqueNotApplicableError(
                    "the analysis report's sensitivity does not match this config and this run has no calibration data",
                    "pass --calibration FILE or use the default group_size/candidate_bits",
                )
            calibration = context.calibration(config.calibration_samples)
            table = layer_sensitivity(
                model,
                calibration,
                candidates,
                context.progress,
                group_size=config.group_size,
                axis=config.axis,
                example_inputs=context.example_inputs,
                stage=f"{self.name}: sensitivity",
            )
            calibration_record = {
                "sensitivity_from": "measured in this step",
                "calibration_source": calibration.source,
                "calibration_samples": len(calibration),
                "calibration_fingerprint": calibration.fingerprint,
            }
        bits = assign_bits(table, config)
        modules = dict(model.named_modules())
        plan = [(row.name, modules[row.name], bits[row.name]) for row in table if row.name in bits]
        float_layers = [row.name for row in table if row.name not in bits]
        dense = sum(p.numel() * p.element_size() for _, m, _ in plan for p in m.parameters())
        model, unpacked = replace_linears(model, plan, config.group_size, config.axis, context.progress, self.name)
        if unpacked:  # sensitivity only lists bit widths HQQ packs, so this is a bug if it happens
            raise TechniqueFailedError(f"hqq could not pack {unpacked} at their assigned bits", "report this as a bug")
        quantized = [name for name, _, _ in plan]
        after = sum(stored_bytes(model.get_submodule(n) if n else model) for n in quantized)
        weights = sum(row.params for row in table if row.name in bits)
        achieved = sum(row.params * bits[row.name] for row in table if row.name in bits) / max(weights, 1)
        proxy = sum(row.relative_error[bits[row.name]] for row in table if row.name in bits)
        packed = sum(row.stored_bytes[bits[row.name]] for row in table if row.name in bits)
        return TechniqueResult(
            model=model,
            backend=avail.backend,
            notes=f"{len(quantized)} Linear layers at {achieved:.2f} average bits ({_histogram(bits)})",
            details={
                "bits": bits,
                "bits_histogram": _histogram(bits),
                "average_bits": achieved,
                "budget": {"average_bits": config.average_bits, "size_ratio": config.size_ratio},
                "linear_bytes_before": dense,
                "linear_bytes_after": after,
                "weight_size_ratio": packed / max(4 * weights, 1),
                "predicted_output_error": proxy,
                "layers_float": float_layers,
                "keep_roles": list(config.keep_roles),
                "keep_bits": config.keep_bits,
                "group_size": config.group_size,
                "axis": config.axis,
                "sensitivity_proxy": "output relative error (and SQNR dB) with one layer HQQ-quantized at a time",
                "sensitivity": sensitivity_table(table),
                "solver": SOLVER,
                **calibration_record,
            },
        )


def predicted_assignment(
    analysis: AnalysisReport, config: MixedPrecisionConfig
) -> tuple[float, float | None, int] | None:
    """From the analysis report's sensitivity: the output SQNR predicted for this config's bit assignment, and for
    the largest uniform width that fits the same budget (and that width). None without a usable report."""
    report = analysis.layer_sensitivity
    bits = {*config.candidate_bits, config.keep_bits}
    if report is None or report.group_size != config.group_size or config.axis != 1 or not bits <= set(report.bits):
        return None
    table = from_report(report)
    try:
        chosen = assign_bits(table, config)
    except TechniqueNotApplicableError:
        return None
    mixed = predicted_sqnr_db(table, chosen)
    if mixed is None:
        return None
    capacity = _capacity(table, config)
    fitting = [
        b for b in sorted(config.candidate_bits, reverse=True) if sum(_cost(t, b, config) for t in table) <= capacity
    ]
    uniform_bits = fitting[0] if fitting else min(config.candidate_bits)
    return mixed, predicted_sqnr_db(table, {t.name: uniform_bits for t in table}), uniform_bits


def _histogram(bits: dict[str, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for b in sorted(bits.values(), reverse=True):
        counts[f"{b}-bit"] = counts.get(f"{b}-bit", 0) + 1
    return counts


def uniform_error(table: list[LayerSensitivity], bits: int) -> float | None:
    """The summed output-error proxy of giving every layer `bits` (None when some layer cannot take it)."""
    if any(bits not in row.relative_error for row in table):
        return None
    return sum(row.relative_error[bits] for row in table)
