"""HQQ (Half-Quadratic Quantization) of Linear weights: 8/4/3/2-bit, packed storage, no calibration data.

HQQ (Badri & Shaji, 2023; the `hqq` package) fits each weight group's zero point by a half-quadratic proximal
solver that minimizes an lp (p < 1) reconstruction error, so it needs no data. Weights are stored bit-packed
(4-bit: two per byte, 2-bit: four per byte, 3-bit: ten per int32) with one scale and one zero point (fp32 here)
per group. On CPU the layer dequantizes its weights on every call and runs an fp32 matmul (hqq's "PyTorch"
backend; its ATen/CUDA kernels need a GPU), so it is smaller than fp32 but slower.

`CpuHQQLinear` pins that forward path in the class itself: hqq's HQQLinear picks its forward through a class-wide
`set_backend` at construction, so an HQQLinear unpickled in a fresh process (where no HQQLinear was constructed)
has no forward at all. The subclass pickles (torch.save of the whole model) with only packed tensors inside.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

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
from robopt.tools.sensitivity_report import risk_from_sqnr, uniform_prediction
from robopt.tools.techniques import _layers
from robopt.tools.techniques.weight_only import _linear_targets, _require_targets
from robopt.tools.threads import torch_threads

HQQ_BITS: tuple[int, ...] = (8, 4, 3, 2)
Bits = Literal[8, 4, 3, 2]
Axis = Literal[0, 1]
# How many quantized values share one packed row (hqq packs along the first dimension of the grouped weight).
_PACK_ROWS = {8: 1, 4: 2, 3: 1, 2: 4}  # 3-bit pads its rows to a multiple of 10 itself
_META_BYTES_PER_GROUP = 8  # an fp32 scale and an fp32 zero point
# Measured on the project's 2-core CPU (batch 1, 512-wide 3-layer MLP, 1 thread, p50): fp32 0.163 ms, HQQ 8-bit
# 0.87 ms, 4-bit 1.18 ms, 3-bit 1.71 ms, 2-bit 1.25 ms (unpacking and dequantizing dominate). Per-layer speed ratios
# for the estimates:
HQQ_LAYER_SPEEDUP_BY_BITS = {8: 0.19, 4: 0.14, 3: 0.095, 2: 0.13}
HQQ_LAYER_SPEEDUP = 0.14  # a mix of widths (mixed precision)


@functools.cache
def layer_class() -> type[nn.Module]:
    """The CpuHQQLinear class (defined on first use: importing hqq takes seconds, and most runs never need it)."""
    from hqq.core.quantize import HQQLinear

    class CpuHQQLinear(HQQLinear):
        """HQQLinear with a fixed forward: dequantize the packed weights, then `F.linear` in the compute dtype."""

        @classmethod
        def set_backend(cls, backend: Any) -> None:  # the forward below is fixed; hqq's class-wide switch is ignored
            return None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.dequantize(), self.bias)

    CpuHQQLinear.__module__ = __name__
    CpuHQQLinear.__qualname__ = "CpuHQQLinear"
    return CpuHQQLinear


def __getattr__(name: str) -> Any:
    # Pickles name the layer class `robopt.tools.techniques.hqq_quant.CpuHQQLinear`; resolve it lazily on load.
    if name == "CpuHQQLinear":
        return layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bytes_per_weight(nbits: int, group_size: int) -> float:
    """Stored bytes per weight: the packed value (3-bit packs 10 per int32) plus its group's scale and zero."""
    packed = 4 / 10 if nbits == 3 else nbits / 8
    return packed + _META_BYTES_PER_GROUP / group_size


def group_size_for(linear: nn.Linear, nbits: int, group_size: int, axis: int) -> int | None:
    """The group size HQQ can use for this layer: `group_size` when it tiles the weight and packs, else one group
    per row (axis 1) / column (axis 0); None when neither packs (the layer then stays in float)."""
    out_f, in_f = linear.out_features, linear.in_features
    along = in_f if axis == 1 else out_f  # the dimension a group runs along
    for g in (group_size, along):
        if along % g:
            continue
        packed_rows = (out_f * in_f) // g if axis == 1 else g
        if packed_rows % _PACK_ROWS[nbits] == 0:
            return g
    return None


def quantize_linear(linear: nn.Linear, nbits: int, group_size: int, axis: int) -> nn.Module | None:
    """A CpuHQQLinear holding `linear`'s weights at `nbits` (the source layer is left untouched), or None when
    HQQ cannot pack this layer's shape (see group_size_for)."""
    from hqq.core.quantize import BaseQuantizeConfig

    g = group_size_for(linear, nbits, group_size, axis)
    if g is None:
        return None
    source = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    source.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    if linear.bias is not None:
        source.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    dtype = linear.weight.dtype if linear.weight.dtype.is_floating_point else torch.float32
    # BaseQuantizeConfig requires group sizes that are multiples of 8; per-row groups need not be.
    config = BaseQuantizeConfig(nbits=nbits, group_size=64, axis=axis)
    config["weight_quant_params"]["group_size"] = g
    # One thread: the solver's float reductions run in a fixed order, so the packed weights are the same on any
    # machine (and these small per-group ops run faster without thread hand-offs).
    with torch.no_grad(), torch_threads(1):
        return layer_class()(source, config, compute_dtype=dtype, device=str(linear.weight.device))  # type: ignore[call-arg]


def fake_quantized(linear: nn.Linear, nbits: int, group_size: int, axis: int) -> tuple[torch.Tensor, int] | None:
    """The weights `quantize_linear` would compute with (a float tensor, for fake-quant measurements) and the bytes
    its packed form stores (bias excluded); None when HQQ cannot pack this layer at `nbits`."""
    layer = quantize_linear(linear, nbits, group_size, axis)
    if layer is None:
        return None
    with torch.no_grad():
        weight = layer.dequantize().reshape(linear.weight.shape).to(linear.weight.dtype)  # type: ignore[operator]
    layer.bias = None
    return weight, stored_bytes(layer)


def stored_bytes(module: nn.Module) -> int:
    """Bytes of the tensors a quantized HQQ layer keeps (packed weights, scales, zero points, bias)."""
    tensors = [module.W_q, module.bias, *(v for v in module.meta.values() if isinstance(v, torch.Tensor))]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def replace_linears(
    model: nn.Module,
    plan: list[tuple[str, nn.Linear, int]],
    group_size: int,
    axis: int,
    progress: Progress,
    stage: str,
) -> tuple[nn.Module, list[str]]:
    """Swap each (name, Linear, bits) of `plan` for a CpuHQQLinear. Returns the model (a new object when the model
    itself is the Linear) and the names of the layers HQQ could not pack, which stay in float."""
    unpacked: list[str] = []
    for name, linear, nbits in progress.track(plan, stage):
        new = quantize_linear(linear, nbits, group_size, axis)
        if new is None:
            unpacked.append(name)
            continue
        if not name:
            return new, unpacked
        model.set_submodule(name, new)
    return model, unpacked


@functools.cache
def hqq_probe() -> Availability:
    """Quantize one small Linear to 4 bits on CPU, run it and check it approximates fp32."""
    try:
        import hqq  # noqa: F401

        with torch.random.fork_rng(devices=[]):  # the probe must not move the caller's random stream
            torch.manual_seed(0)
            ref = nn.Linear(128, 64)
            q = quantize_linear(ref, 4, 64, 1)
            x = torch.randn(4, 128)
            with torch.no_grad():
                expected = ref(x)
                err = float((q(x) - expected).norm() / expected.norm())  # type: ignore[misc]
        if not err < 0.2:
            return Availability(False, f"hqq 4-bit CPU forward is wrong here (relative error {err:.3g})")
    except Exception as e:  # any failure of the library here means the backend cannot run
        return Availability(False, f"hqq cannot run on this CPU: {type(e).__name__}: {e}")
    return Availability(True, backend=f"hqq {version('hqq')} HQQLinear (PyTorch dequantize + fp32 matmul, CPU)")


class HQQConfig(TechniqueConfig):
    """HQQ weight quantization of every nn.Linear (calibration-free)."""

    nbits: Bits = Field(default=4, description="Bits per weight: 8, 4, 3 or 2.")
    group_size: int = Field(
        default=64,
        ge=8,
        multiple_of=8,
        description="Weights per scale/zero group (HQQ's default 64); layers it does not tile get one group per row.",
    )
    axis: Axis = Field(default=1, description="1: groups along input channels (common layout); 0: along outputs.")
    skip_head: bool = Field(default=True, description="Keep the output (classifier/action) layer in fp32.")


@register_technique
class HQQQuantization(Technique):
    name = "hqq"
    family = "quantization"
    description = (
        "HQQ weight-only quantization of Linear layers to 8/4/3/2 bits (packed, calibration-free): ~3.5x/6x/7x/"
        "9x smaller Linear weights, 5-10x slower Linear layers than fp32 on CPU (dequantized per call)."
    )
    config_cls = HQQConfig

    def availability(self) -> Availability:
        return hqq_probe()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return _layers.linear_quantization_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, HQQConfig)
        linear = _layers.linear_params(analysis)
        share = _layers.share_of_params(analysis, linear)
        stored = bytes_per_weight(config.nbits, config.group_size)
        risk = "low" if config.nbits == 8 else "medium" if config.nbits >= 4 else "high"
        measured = ""
        report = analysis.layer_sensitivity
        if report is not None and report.group_size == config.group_size and config.axis == 1:
            predicted, layers = uniform_prediction(
                report, config.nbits, skip_roles=("action_head",) if config.skip_head else ()
            )
            if predicted is not None and layers:
                risk = risk_from_sqnr(predicted) or risk
                measured = f" Measured sensitivity predicts output SQNR {predicted:.1f} dB ({layers} layers)."
        return Estimate(
            size_ratio=_layers.size_ratio_after(analysis, linear, stored),
            speedup=_layers.amdahl_speedup(share, HQQ_LAYER_SPEEDUP_BY_BITS[config.nbits]),
            accuracy_risk=risk,
            note=(
                f"Linear weights ({share:.0%} of parameters) go to {stored:.3g} bytes each ({config.nbits}-bit packed "
                f"+ fp32 scale and zero per {config.group_size})"
                + (", the head layer stays fp32 (not counted here)" if config.skip_head else "")
                + f".{measured} SLOWER on CPU: measured 5-10x slower Linear layers (dequantized on every call)."
            ),
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, HQQConfig)
        higher = [b for b in sorted(HQQ_BITS) if b > config.nbits]
        return config.model_copy(update={"nbits": higher[0]}) if higher else None

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, HQQConfig)
        _layers.require_eager_float_module(model, self.name)
        avail = hqq_probe()
        if not avail.available:
            raise TechniqueNotApplicableError(f"{self.name} is unavailable: {avail.reason}", "use weight_only_int8")
        targets, skipped = _linear_targets(model, config.skip_head, context.example_inputs)
        _require_targets(targets, skipped, self.name)
        model.eval()
        before = sum(_dense_bytes(m) for _, m in targets)
        plan = [(name, m, config.nbits) for name, m in targets]
        model, unpacked = replace_linears(model, plan, config.group_size, config.axis, context.progress, self.name)
        quantized = [name for name, _, _ in plan if name not in unpacked]
        if not quantized:
            raise TechniqueNotApplicableError(
                f"hqq could not pack any Linear layer at {config.nbits} bits (shapes do not tile into groups)",
                "try nbits=8 or another technique",
            )
        after = _quantized_bytes(model, quantized)
        return TechniqueResult(
            model=model,
            backend=avail.backend,
            notes=f"{len(quantized)} Linear layers at {config.nbits}-bit HQQ; weights {before} -> {after} bytes",
            details={
                "layers_quantized": len(quantized),
                "layers_skipped": skipped + unpacked,
                "nbits": config.nbits,
                "group_size": config.group_size,
                "axis": config.axis,
                "linear_bytes_before": before,
                "linear_bytes_after": after,
                "backend": avail.backend,
                "hqq": version("hqq"),
            },
        )


def _dense_bytes(linear: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in linear.parameters())


def _quantized_bytes(model: nn.Module, names: list[str]) -> int:
    total = 0
    for name in names:
        module = model.get_submodule(name) if name else model
        if not isinstance(module, layer_class()):
            raise TechniqueFailedError(f"layer {name!r} was not replaced by an HQQ layer", "report this as a bug")
        total += stored_bytes(module)
    return total
