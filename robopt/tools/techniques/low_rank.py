"""Low-rank compression: truncated SVD of Linear and Conv weights, each replaced by two smaller layers.

- Linear(in, out) with W ~ U_r S_r V_r^T becomes Sequential(down = Linear(in, r, no bias), up = Linear(r, out)).
- Conv(in, out, k) (groups 1): its weight reshaped to [out, in * k...] is factorized the same way and becomes
  Sequential(down = Conv(in, r, k, same stride/padding/dilation, no bias), up = 1x1 Conv(r, out)); the 1x1 conv is
  pointwise, so the pair computes exactly the convolution with the rank-r kernel (the "channel decomposition" of
  Zhang et al. 2015 / Jaderberg et al. 2014's scheme 2 without the spatial split).
  Both factors get sqrt(S_r) so they have balanced scales (quantizers after this step like that).
  By Eckart-Young the truncated SVD is the best rank-r approximation in Frobenius norm: the relative weight error is
  sqrt(sum of discarded s^2 / sum of s^2). torch.linalg.svd does the factorization. Tucker-2 (tensorly) would also
  compress the input channels, but it is iterative (no such exact optimum to test against), it gains nothing on
  convs with few input channels (digits-cnn's are 1 and 16), and plain SVD needs no new dependency.
- A layer is factorized only when r * (in + out) < in * out: otherwise it stays dense.
- Ranks per layer: `rank_rule="energy"` keeps the smallest r whose cumulative singular-value energy reaches the
  threshold (no data needed). `rank_rule="budget"` keeps the factorizable layers' parameters <= size_ratio x their
  dense parameters; `allocation="sensitivity"` (default) measures the model's output error on calibration samples
  with one layer truncated at each candidate rank at a time and picks the ranks minimising the summed error under the
  budget EXACTLY (multiple-choice knapsack as a 0/1 integer program, scipy's HiGHS MILP, as mixed_precision does);
  `allocation="uniform"` gives every layer the same fraction of its full rank (the baseline).
- Optional recovery: `recovery_steps` > 0 trains the factorized model to reproduce the teacher's outputs
  (robopt.training.fit.fit_to_teacher) on calibration inputs, keeping the best held-out weights.

The result is plain torch layers (nn.Sequential of nn.Linear / nn.ConvNd): it pickles without robopt, and
Linear-quantizers (dynamic INT8, HQQ, ...) still find every Linear after it, so low_rank -> quantize chains.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from robopt.calibration.base import CalibrationSet
from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.progress import Progress
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

SOLVER = "exact 0/1 integer program (multiple-choice knapsack), scipy.optimize.milp with HiGHS"
BACKEND = "torch.linalg.svd (truncated SVD; two dense layers per factorized layer)"
FACTORIZED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FACTORIZED_NAMES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
_BATCH = 64

# Share of the factorizable parameters kept at an energy threshold: measured on robopt's zoo nets (digits-cnn,
# reacher-policy: trained small nets have flat spectra, so 0.95 energy already needs nearly full rank). A rule of
# thumb: the real ranks are known only after the SVD.
_ENERGY_KEPT = ((0.8, 0.45), (0.9, 0.7), (0.95, 0.9), (0.99, 1.0))
# Measured on this CPU (1 thread, batch 1): a 512x256 Linear at half its parameters ran 33 -> 43 us (slower: one more
# kernel call), 1024x1024 263 -> 136 us, 4096x4096 4.9 -> 2.5 ms. Layers under _SMALL_LAYER weights are overhead-bound.
# Whole models (busy machine, 1 thread, batch 1): digits-cnn and reacher-policy at budgets 0.5 and 0.2 ran 0.8-1.0x.
_SMALL_LAYER = 200_000
_BIG_LAYER = 1_000_000
_SMALL_LAYER_SPEEDUP = 0.85


class LowRankConfig(TechniqueConfig):
    """How ranks are chosen (energy threshold or size budget), how a budget is shared, and optional recovery."""

    rank_rule: Literal["budget", "energy"] = Field(
        default="budget",
        description="budget: factorizable layers' parameters <= size_ratio x dense; energy: per layer, the smallest "
        "rank keeping `energy` of the squared singular values.",
    )
    size_ratio: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Budget (rank_rule=budget): parameters (weights + biases) of the Linear/Conv layers that can be "
        "factorized, after / before. The default is the aggressive end (milder() retries at 1.5x): with recovery and "
        "dynamic INT8 after it, it takes digits-cnn and reacher-policy past 8x smaller.",
    )
    energy: float = Field(
        default=0.9, gt=0.0, lt=1.0, description="Energy threshold (rank_rule=energy): kept share of sum(s^2)."
    )
    allocation: Literal["sensitivity", "uniform"] = Field(
        default="sensitivity",
        description="How the budget is shared: ranks minimising the summed measured output error (needs calibration "
        "data), or the same fraction of full rank in every layer.",
    )
    candidate_fractions: tuple[float, ...] = Field(
        default=(0.03, 0.06, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        min_length=1,
        description="Candidate ranks whose output error is measured, as fractions of the layer's dense parameters "
        "(r = fraction x in x out / (in + out)); keeping the layer dense is always a candidate.",
    )
    calibration_samples: int = Field(default=64, ge=1, le=2048, description="Samples for the sensitivity measurement.")
    recovery_steps: int = Field(
        default=0, ge=0, le=100_000, description="Optimizer steps of training on the teacher's outputs (0: off)."
    )
    recovery_samples: int = Field(default=1024, ge=8, le=100_000, description="Calibration inputs used for recovery.")
    recovery_lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="Learning rate of the recovery (AdamW).")
    recovery_seconds: float | None = Field(default=None, gt=0, description="Optional time limit of the recovery.")

    @model_validator(mode="after")
    def _fractions_in_range(self) -> LowRankConfig:
        if any(not 0.0 < f < 1.0 for f in self.candidate_fractions):
            raise ValueError(f"candidate_fractions must lie in (0, 1), got {self.candidate_fractions}")
        return self


# -- layers and their SVD -------------------------------------------------------------------------------------------


@dataclass
class LayerSVD:
    """One factorizable layer: its weight as a matrix [out, in * kernel] and that matrix's SVD (float64)."""

    name: str
    module: nn.Module
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def out_dim(self) -> int:
        return self.u.shape[0]

    @property
    def in_dim(self) -> int:
        return self.vh.shape[1]

    @property
    def full_rank(self) -> int:
        return self.s.shape[0]

    @property
    def bias(self) -> int:
        bias = getattr(self.module, "bias", None)
        return bias.numel() if isinstance(bias, torch.Tensor) else 0

    @property
    def dense_params(self) -> int:
        return self.out_dim * self.in_dim + self.bias

    def params_at(self, rank: int | None) -> int:
        """Parameters at `rank` (None: dense)."""
        return self.dense_params if rank is None else rank * (self.out_dim + self.in_dim) + self.bias

    def pays(self, rank: int) -> bool:
        return 1 <= rank <= self.full_rank and rank * (self.out_dim + self.in_dim) < self.out_dim * self.in_dim

    def energy_kept(self, rank: int) -> float:
        power = self.s.pow(2)
        return float(power[:rank].sum() / power.sum()) if float(power.sum()) > 0 else 1.0

    def relative_error(self, rank: int) -> float:
        """Eckart-Young: ||W - W_r||_F / ||W||_F = sqrt(discarded energy)."""
        return math.sqrt(max(0.0, 1.0 - self.energy_kept(rank)))

    def truncated_weight(self, rank: int) -> torch.Tensor:
        """W_r in the layer's own shape and dtype."""
        w = (self.u[:, :rank] * self.s[:rank]) @ self.vh[:rank]
        weight = self.module.weight
        return w.reshape(weight.shape).to(weight.dtype)


def factorizable_layers(model: nn.Module, progress: Progress, stage: str) -> list[LayerSVD]:
    """Every float Linear / Conv1-3d (groups 1) with a rank that pays, with its SVD (one thread: LAPACK's threaded
    SVD of these small matrices is no faster, and on a busy 2-core machine it was 20-50x slower)."""
    found = []
    shared = _shared(model)
    candidates = [
        (name, m)
        for name, m in _layers.weighted_layers(model, FACTORIZED_TYPES)
        if name
        and m.weight.dtype.is_floating_point
        and getattr(m, "groups", 1) == 1
        and m.weight.ndim >= 2
        and id(m) not in shared
        and id(m.weight) not in shared
    ]
    for name, module in progress.track(candidates, stage):
        matrix = module.weight.detach().to(torch.float64).reshape(module.weight.shape[0], -1)
        with torch_threads(1):
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        layer = LayerSVD(name, module, u, s, vh)
        if layer.pays(1):
            found.append(layer)
    return found


def _shared(model: nn.Module) -> set[int]:
    """ids of modules reachable under several names and of parameters held by several modules (tied weights):
    replacing one occurrence would leave the other dense (or untie it), so those layers stay as they are."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        seen[id(module)] = seen.get(id(module), 0) + 1
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(module))
    return {k for k, n in seen.items() if n > 1} | {k for k, mods in owners.items() if len(mods) > 1}


def factorized(layer: LayerSVD, rank: int) -> nn.Sequential:
    """The two-layer replacement of `layer` at `rank`: down (no bias) then up (the original bias)."""
    module, weight = layer.module, layer.module.weight
    root = layer.s[:rank].sqrt()
    down_w = (root[:, None] * layer.vh[:rank]).to(weight.dtype)
    up_w = (layer.u[:, :rank] * root).to(weight.dtype)
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        down: nn.Module = nn.Linear(layer.in_dim, rank, bias=False, device=weight.device, dtype=weight.dtype)
        up: nn.Module = nn.Linear(rank, layer.out_dim, bias=bias, device=weight.device, dtype=weight.dtype)
        down.weight.data.copy_(down_w)
        up.weight.data.copy_(up_w)
    else:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        conv = type(module)
        down = conv(
            module.in_channels,
            rank,
            module.kernel_size,  # type: ignore[arg-type]
            stride=module.stride,  # type: ignore[arg-type]
            padding=module.padding,  # type: ignore[arg-type]
            dilation=module.dilation,  # type: ignore[arg-type]
            bias=False,
            padding_mode=module.padding_mode,
            device=weight.device,
            dtype=weight.dtype,
        )
        up = conv(rank, module.out_channels, 1, bias=bias, device=weight.device, dtype=weight.dtype)
        down.weight.data.copy_(down_w.reshape(down.weight.shape))
        up.weight.data.copy_(up_w.reshape(up.weight.shape))
    if bias:
        up.bias.data.copy_(module.bias.data)  # type: ignore[union-attr]
    return nn.Sequential(OrderedDict(down=down, up=up))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# -- measured sensitivity -------------------------------------------------------------------------------------------


def _batches(samples: Sequence[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    from robopt.training.fit import collate

    return [collate(samples[i : i + _BATCH]) for i in range(0, len(samples), _BATCH)]


def _outputs(model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = []
        for batch in batches:
            outs.extend(t.detach().double() for t in _layers.flatten_tensors(model(*batch)) if t.is_floating_point())
    if not outs:
        raise TechniqueNotApplicableError(
            "the model returns no floating-point tensor, so its output error cannot be measured",
            "use rank_rule=energy, which needs no measurement",
        )
    return outs


def output_error(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Relative output error: sum ||y' - y||^2 / sum ||y||^2 over every float output (inf when not finite)."""
    num = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference, strict=True))
    den = sum(float(r.pow(2).sum()) for r in reference) or 1.0
    value = num / den
    return value if math.isfinite(value) else math.inf


def candidate_ranks(layer: LayerSVD, fractions: Sequence[float]) -> list[int]:
    """Distinct ranks that pay, from parameter fractions of the dense layer, smallest first (at least rank 1)."""
    per_rank = layer.out_dim + layer.in_dim
    ranks = {max(1, math.floor(f * layer.out_dim * layer.in_dim / per_rank)) for f in fractions}
    return sorted(r for r in ranks if layer.pays(r))


def measure_sensitivity(
    model: nn.Module,
    layers: list[LayerSVD],
    ranks: dict[str, list[int]],
    samples: Sequence[tuple[torch.Tensor, ...]],
    progress: Progress,
    stage: str,
) -> dict[str, dict[int, float]]:
    """Output error of the model with ONE layer's weight truncated to each candidate rank (the others dense)."""
    batches = _batches(samples)
    reference = _outputs(model, batches)
    total = sum(len(ranks[layer.name]) for layer in layers)
    done = 0
    table: dict[str, dict[int, float]] = {}
    progress.update(stage, 0, total)
    for layer in layers:
        weight = layer.module.weight
        original = weight.data.clone()
        row: dict[int, float] = {}
        try:
            for rank in ranks[layer.name]:
                weight.data.copy_(layer.truncated_weight(rank))
                row[rank] = output_error(reference, _outputs(model, batches))
                done += 1
                progress.update(stage, done, total, f"{layer.name} rank {rank}")
        finally:
            weight.data.copy_(original)
        table[layer.name] = row
    return table


# -- rank allocation ------------------------------------------------------------------------------------------------

Allocation = dict[str, int | None]  # layer name -> rank, or None to keep the layer dense


def allocate_by_sensitivity(
    layers: list[LayerSVD], table: dict[str, dict[int, float]], capacity: float
) -> tuple[Allocation, float]:
    """Ranks (or dense) minimising the summed measured output error with total parameters <= capacity (exact MILP).
    Returns the allocation and its summed predicted error."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    columns: list[tuple[int, int | None]] = []
    errors: list[float] = []
    for i, layer in enumerate(layers):
        columns.append((i, None))
        errors.append(0.0)
        for rank, err in table[layer.name].items():
            if math.isfinite(err):
                columns.append((i, rank))
                errors.append(err)
    costs = np.array([layers[i].params_at(r) for i, r in columns], dtype=float)
    cheapest = [min(float(costs[j]) for j, (i, _) in enumerate(columns) if i == k) for k in range(len(layers))]
    _check_feasible(layers, cheapest, capacity)
    scale = max(errors) or 1.0
    one_each = np.zeros((len(layers), len(columns)))
    for j, (i, _) in enumerate(columns):
        one_each[i, j] = 1.0
    result = milp(
        c=np.array(errors) / scale,
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(costs[None, :] / capacity, -np.inf, 1.0)],
        integrality=np.ones(len(columns)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise TechniqueFailedError(f"the rank-allocation solver failed: {result.message}", "report this as a bug")
    chosen = {layers[i].name: r for (i, r), x in zip(columns, result.x, strict=True) if x > 0.5}
    if len(chosen) != len(layers):
        raise TechniqueFailedError("the rank-allocation solver left some layer without a rank", "report this as a bug")
    spent = sum(layer.params_at(chosen[layer.name]) for layer in layers)
    if spent > capacity * (1 + 1e-9):  # HiGHS' feasibility tolerance, never accepted silently
        raise TechniqueFailedError(f"the solver's ranks need {spent} > {capacity:.0f} parameters", "report this bug")
    predicted = sum(table[layer.name][r] for layer in layers if (r := chosen[layer.name]) is not None)
    return chosen, predicted


def _uniform_at(layers: list[LayerSVD], fraction: float) -> Allocation:
    chosen: Allocation = {}
    for layer in layers:
        rank = max(1, math.floor(fraction * layer.full_rank + 1e-9))
        chosen[layer.name] = rank if layer.pays(rank) else None
    return chosen


def allocate_uniform(layers: list[LayerSVD], capacity: float) -> Allocation:
    """The largest common fraction of full rank whose total parameters fit the budget (a layer where that rank does
    not pay stays dense). Parameters grow with the fraction, so the first fitting fraction from the top is it."""
    fractions = sorted({k / layer.full_rank for layer in layers for k in range(1, layer.full_rank + 1)}, reverse=True)
    for fraction in fractions:
        chosen = _uniform_at(layers, fraction)
        if sum(layer.params_at(chosen[layer.name]) for layer in layers) <= capacity:
            return chosen
    _check_feasible(layers, [layer.params_at(1) for layer in layers], capacity)
    raise TechniqueNotApplicableError("no uniform rank fraction meets the budget", "raise size_ratio")


def allocate_by_energy(layers: list[LayerSVD], energy: float) -> Allocation:
    """Per layer: the smallest rank keeping `energy` of sum(s^2); dense where that rank does not pay."""
    chosen: Allocation = {}
    for layer in layers:
        power = layer.s.pow(2)
        kept = power.cumsum(0) / power.sum()
        rank = min(int((kept < energy - 1e-12).sum()) + 1, layer.full_rank)
        chosen[layer.name] = rank if layer.pays(rank) else None
    return chosen


def _check_feasible(layers: list[LayerSVD], cheapest: Sequence[float], capacity: float) -> None:
    if sum(cheapest) > capacity * (1 + 1e-12):
        dense = sum(layer.dense_params for layer in layers)
        raise TechniqueNotApplicableError(
            f"the budget cannot be met: even the smallest candidate ranks need {sum(cheapest) / dense:.3f} of the "
            f"factorizable parameters, the budget allows {capacity / dense:.3f}",
            "raise size_ratio or add smaller candidate_fractions",
        )


# -- the technique --------------------------------------------------------------------------------------------------


def _availability() -> Availability:
    try:
        from scipy.optimize import milp  # noqa: F401
    except ImportError as e:
        return Availability(False, f"scipy's MILP solver (rank allocation) is missing: {e}")
    return Availability(True, backend=f"{BACKEND}; ranks by {SOLVER}")


def _energy_share(energy: float) -> float:
    """Rule of thumb: share of factorizable parameters kept at `energy` (linear between measured anchors)."""
    xs, ys = zip(*_ENERGY_KEPT, strict=True)
    return float(np.interp(energy, (0.0, *xs), (0.05, *ys)))


@register_technique
class LowRank(Technique):
    name = "low_rank"
    family = "low-rank"
    description = (
        "Low-rank compression: truncated SVD of Linear and Conv weights, each replaced by two smaller layers, ranks "
        "chosen per layer by a size budget (allocated by measured output sensitivity on calibration data) or an "
        "energy threshold; optional recovery training against the teacher. Plain torch layers, so quantization "
        "can follow."
    )
    config_cls = LowRankConfig

    def availability(self) -> Availability:
        return _availability()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        reason = _layers.not_eager_reason(analysis) or _layers.already_quantized_reason(analysis)
        if reason:
            return Applicability(False, reason)
        if analysis.format == "hf-folder":
            return Applicability(
                False,
                "factorized layers change a Hugging Face model's state-dict keys, so save_pretrained folders "
                "would not reload with plain transformers",
            )
        if _layers.params_of(analysis, _FACTORIZED_NAMES) <= 0:
            return Applicability(False, "the model has no Linear or Conv layers to factorize")
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, LowRankConfig)
        params = _layers.params_of(analysis, _FACTORIZED_NAMES)
        share = _layers.share_of_params(analysis, params)
        layers = sum(analysis.layer_census.get(t, 0) for t in _FACTORIZED_NAMES) or 1
        if config.rank_rule == "budget":
            kept = config.size_ratio
            # Measured with sensitivity allocation: 0.3 kept digits-cnn's accuracy and reacher-policy's success, 0.2
            # cost reacher 40 points of success until recovered; a uniform rank fraction loses far more (see the tests).
            low, medium = (0.5, 0.25) if config.allocation == "sensitivity" else (0.7, 0.4)
            risk = "low" if kept >= low else "medium" if kept >= medium else "high"
            rule = f"Linear/Conv parameters ({share:.0%} of the model) to {kept:.0%} by budget (met exactly)"
        else:
            kept = _energy_share(config.energy)
            risk = "low" if config.energy >= 0.97 else "medium" if config.energy >= 0.85 else "high"
            rule = (
                f"rule of thumb: {config.energy:g} energy keeps ~{kept:.0%} of the Linear/Conv parameters ({share:.0%} "
                "of the model) on small trained nets, whose spectra are flat; the real ranks are known after the SVD"
            )
        per_layer = params / layers
        if per_layer >= _BIG_LAYER:
            speedup = _layers.amdahl_speedup(share, 1.0 / kept)
            speed = "big layers: time follows the FLOP ratio on CPU (measured here for 1k-4k wide Linears)"
        elif per_layer < _SMALL_LAYER:
            speedup = _SMALL_LAYER_SPEEDUP
            speed = "small layers are overhead-bound: two kernel calls instead of one, usually SLOWER at batch 1"
        else:
            speedup = 1.0
            speed = "mid-size layers: about as fast as dense"
        recovery = f" {config.recovery_steps} recovery steps against the teacher." if config.recovery_steps else ""
        return Estimate(
            size_ratio=_layers.size_ratio_after(analysis, params, _layers.bytes_per_param(analysis) * kept),
            speedup=speedup,
            accuracy_risk=risk,
            note=f"Truncated SVD: {rule}. Speed: {speed}.{recovery}",
        )

    def stronger(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """Budget: 2/3 of the size ratio, down to 0.08 (energy rule: none)."""
        assert isinstance(config, LowRankConfig)
        if config.rank_rule != "budget" or config.size_ratio <= 0.08 + 1e-9:
            return None
        return config.model_copy(update={"size_ratio": max(0.08, config.size_ratio * 2 / 3)})

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """Budget: 1.5x the size ratio (up to 0.9); energy: halve the discarded energy (down to 0.5%)."""
        assert isinstance(config, LowRankConfig)
        if config.rank_rule == "budget":
            if config.size_ratio >= 0.9 - 1e-9:
                return None
            return config.model_copy(update={"size_ratio": min(0.9, config.size_ratio * 1.5)})
        if config.energy >= 0.995 - 1e-9:
            return None
        return config.model_copy(update={"energy": min(0.995, 1.0 - (1.0 - config.energy) / 2)})

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        """One torch thread: the measured errors decide discrete ranks, so they must not depend on the core count
        (float reductions do), and the small layers this targets gain nothing from more threads."""
        assert isinstance(config, LowRankConfig)
        with torch_threads(1):
            return self._apply(model, config, context)

    def _apply(self, model: nn.Module, config: LowRankConfig, context: ApplyContext) -> TechniqueResult:
        _layers.require_eager_float_module(model, self.name)
        avail = _availability()
        if not avail.available:
            raise TechniqueNotApplicableError(f"{self.name} is unavailable: {avail.reason}", "install scipy")
        progress = context.progress
        needs_data = (config.rank_rule == "budget" and config.allocation == "sensitivity") or config.recovery_steps > 0
        if needs_data and context.calibration is None:
            raise TechniqueNotApplicableError(
                "low_rank measures output sensitivity / trains on calibration inputs, and this run has none",
                "run it through the pipeline (it supplies the model type's calibration set), pass --calibration FILE, "
                "or use allocation=uniform / rank_rule=energy without recovery_steps",
            )
        model.eval()
        teacher = copy.deepcopy(model) if config.recovery_steps and context.teacher is None else None
        calibration = self._calibration(config, context)
        samples = calibration.samples[: config.calibration_samples] if calibration else ()
        layers = factorizable_layers(model, progress, f"{self.name}: SVD")
        if not layers:
            raise TechniqueNotApplicableError(
                "no Linear/Conv layer of this model can be factorized with fewer parameters (r*(in+out) < in*out "
                "holds for no rank, or the convs are grouped)",
                "low-rank compression needs wider layers",
            )
        dense = sum(layer.dense_params for layer in layers)
        table: dict[str, dict[int, float]] = {}
        predicted: float | None = None
        if config.rank_rule == "energy":
            chosen = allocate_by_energy(layers, config.energy)
        elif config.allocation == "uniform":
            chosen = allocate_uniform(layers, config.size_ratio * dense)
        else:
            ranks = {layer.name: candidate_ranks(layer, config.candidate_fractions) for layer in layers}
            table = measure_sensitivity(model, layers, ranks, samples, progress, f"{self.name}: sensitivity")
            chosen, predicted = allocate_by_sensitivity(layers, table, config.size_ratio * dense)
        if all(rank is None for rank in chosen.values()):
            setting = f"energy {config.energy:g}" if config.rank_rule == "energy" else f"budget {config.size_ratio:g}"
            raise TechniqueNotApplicableError(
                f"no layer is factorized at {setting}: every layer's rank would need as many parameters as the dense "
                "layer",
                "lower the energy threshold, or use rank_rule=budget with a size_ratio below 1",
            )
        batches = _batches(samples) if samples else []
        reference = _outputs(model, batches) if batches else []
        shapes_before = _layers.output_shapes(model, context.example_inputs) if context.example_inputs else None
        params_before = _layers.count_params(model)
        per_layer = self._factorize(model, layers, chosen, progress)
        self._check_outputs(model, context, shapes_before)
        measured = output_error(reference, _outputs(model, batches)) if batches else None
        recovery = None
        if config.recovery_steps:
            assert calibration is not None
            recovery = self._recover(model, teacher, calibration, config, context)
        after = sum(layer.params_at(chosen[layer.name]) for layer in layers)
        factorized_names = [name for name, rank in chosen.items() if rank is not None]
        details: dict[str, Any] = {
            "rank_rule": config.rank_rule,
            "allocation": config.allocation if config.rank_rule == "budget" else "energy threshold per layer",
            "size_ratio_budget": config.size_ratio if config.rank_rule == "budget" else None,
            "energy_threshold": config.energy if config.rank_rule == "energy" else None,
            "layers": per_layer,
            "layers_dense": [name for name, rank in chosen.items() if rank is None],
            "factorizable_params_before": dense,
            "factorizable_params_after": after,
            "factorizable_param_ratio": after / dense,
            "params_before": params_before,
            "params_after": _layers.count_params(model),
            "param_ratio": _layers.count_params(model) / max(params_before, 1),
            "predicted_output_error": predicted,
            "calibration_output_error": measured,
            "sensitivity_proxy": "relative output error on calibration samples, one layer truncated at a time",
            "sensitivity": {  # null: the model's output was not finite at that rank
                name: {str(r): e if math.isfinite(e) else None for r, e in row.items()} for name, row in table.items()
            },
            "solver": SOLVER if table else None,
            "recovery": recovery,
        }
        if calibration is not None:
            details |= {
                "calibration_source": calibration.source,
                "calibration_samples": len(samples),
                "calibration_fingerprint": CalibrationSet(tuple(samples), calibration.source).fingerprint,
            }
        notes = (
            f"{len(factorized_names)} of {len(layers)} layers factorized, their parameters {after:,} / {dense:,} "
            f"({after / dense:.0%}); model {details['params_after']:,} / {params_before:,} parameters"
        )
        if measured is not None:
            notes += f"; calibration output error {measured:.3g}"
        return TechniqueResult(model=model, backend=avail.backend, notes=notes, details=details)

    # -- steps of apply -----------------------------------------------------------------------------------------

    @staticmethod
    def _calibration(config: LowRankConfig, context: ApplyContext) -> CalibrationSet | None:
        if context.calibration is None:
            return None
        n = max(config.calibration_samples, config.recovery_samples if config.recovery_steps else 0)
        calibration = context.calibration(n)
        if len(calibration) == 0:
            raise TechniqueNotApplicableError("the calibration set is empty", "give calibration data")
        return calibration

    def _factorize(
        self, model: nn.Module, layers: list[LayerSVD], chosen: Allocation, progress: Progress
    ) -> dict[str, dict[str, Any]]:
        per_layer: dict[str, dict[str, Any]] = {}
        todo = [layer for layer in layers if chosen[layer.name] is not None]
        for layer in progress.track(todo, f"{self.name}: factorize"):
            rank = chosen[layer.name]
            assert rank is not None
            _replace(model, layer.name, factorized(layer, rank))
            per_layer[layer.name] = {
                "kind": type(layer.module).__name__,
                "shape": [layer.out_dim, layer.in_dim],
                "rank": rank,
                "full_rank": layer.full_rank,
                "params_before": layer.dense_params,
                "params_after": layer.params_at(rank),
                "energy_kept": layer.energy_kept(rank),
                "relative_weight_error": layer.relative_error(rank),
            }
        return per_layer

    @staticmethod
    def _check_outputs(model: nn.Module, context: ApplyContext, shapes_before: list[list[int]] | None) -> None:
        if context.example_inputs is None or shapes_before is None:
            return
        try:
            shapes_after = _layers.output_shapes(model, context.example_inputs)
        except Exception as e:  # a model whose code reads a replaced layer's .weight directly
            raise TechniqueFailedError(
                f"the factorized model does not run: {type(e).__name__}: {e}",
                "this model's code uses the layers' weights directly; low-rank compression cannot replace them",
            ) from e
        if shapes_after != shapes_before:
            raise TechniqueFailedError(
                f"factorizing changed the output shapes from {shapes_before} to {shapes_after}", "report this as a bug"
            )

    def _recover(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        calibration: CalibrationSet,
        config: LowRankConfig,
        context: ApplyContext,
    ) -> dict[str, Any]:
        from robopt.training.fit import TrainBudget, fit_to_teacher, teacher_targets

        source = teacher if teacher is not None else context.teacher() if context.teacher else None
        if source is None:
            raise TechniqueFailedError("no teacher for recovery", "report this as a bug")
        samples = calibration.samples[: config.recovery_samples]
        targets = teacher_targets(source, samples, _BATCH)
        result = fit_to_teacher(
            model,
            samples,
            targets,
            budget=TrainBudget(steps=config.recovery_steps, seconds=config.recovery_seconds),
            architecture=context.analysis.architecture,
            lr=config.recovery_lr,
            progress=context.progress,
            stage=f"{self.name}: recovery",
            seed=context.seed,
        )
        return {
            **result.as_dict(),
            "teacher": "the run's original model" if teacher is None else "the model before factorizing",
            "samples": len(samples),
        }
