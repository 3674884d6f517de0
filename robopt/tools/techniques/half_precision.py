"""Cast a model to fp16 or bf16: half the bytes, and faster only where the CPU has fast half-precision kernels.

Whether the hardware profits is measured, not assumed: the estimate times a Linear and a 3x3 convolution at fp32
and at the half dtype on this machine (once per process) and weighs them by the model's share of Linear and conv
weights. Plain modules are wrapped in `HalfPrecisionModule` (float inputs cast to the half dtype, float outputs
back to fp32). Transformers models are reloaded through from_pretrained(dtype=...) with two hooks doing the same,
so they stay PreTrainedModels whose save_pretrained folder plain transformers reloads. Measured on the zoo:
digits-cnn keeps its accuracy (98.9%) and reacher-policy its success rate (98%) at both dtypes with every layer
cast, so no layer is kept in fp32.
"""

from __future__ import annotations

import copy
import functools
import statistics
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.benchmark import Timer

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
from robopt.tools.techniques import _hf_quant, _layers

HalfDtype = Literal["bf16", "fp16"]
TORCH_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
_PROBE_SECONDS = 0.02  # minimum timed run per probe measurement (torch.utils.benchmark blocked_autorange)
_PROBE_ROUNDS = 5  # fp32/fp16/bf16 timed in turn, medians taken: other processes' load hits all three alike
PROBE_THREADS = 1


class CastHalfConfig(TechniqueConfig):
    """Which 16-bit float type the weights and activations use."""

    dtype: HalfDtype = Field(
        default="bf16", description="bf16 (fp32's range, 8-bit mantissa) or fp16 (10-bit mantissa, max 65504)."
    )


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """`value` with every floating-point tensor inside (tuples, lists, dicts, HF ModelOutputs) cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps the mapping's class (ModelOutput sets attributes with its items)
        for key, item in value.items():
            out[key] = cast_floats(item, dtype)
        return out
    if isinstance(value, tuple):
        items = [cast_floats(v, dtype) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [cast_floats(v, dtype) for v in value]
    return value


class HalfPrecisionModule(nn.Module):
    """Runs `module` (already cast to `dtype`) on float inputs cast to `dtype`; float outputs come back as fp32.

    Attributes it does not have (input_spec, helper methods) are looked up on the wrapped module."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.compute_dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = cast_floats((args, kwargs), self.compute_dtype)
        return cast_floats(self.module(*args, **kwargs), torch.float32)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or not modules or "module" not in modules:
                raise
            return getattr(modules["module"], name)


def cast_inputs_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Forward pre-hook of a half-precision transformers model: float inputs (pixel_values, inputs_embeds) in its
    dtype. A module-level function, so the model still pickles."""
    return cast_floats((args, kwargs), module.dtype)


def outputs_to_fp32_hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
    """Forward hook of a half-precision transformers model: float outputs (logits, hidden states) back in fp32."""
    return cast_floats(output, torch.float32)


# -- the measured probe ---------------------------------------------------------------------------------


def time_call_ms(fn: Any, *args: Any) -> float:
    """Median wall time of `fn(*args)` in ms (torch.utils.benchmark, no grad, one thread: a ratio of two timings
    stays meaningful on a loaded machine, where multi-threaded batch-1 calls stall on thread hand-offs)."""
    with torch.no_grad():
        timer = Timer("fn(*args)", globals={"fn": fn, "args": args}, num_threads=PROBE_THREADS)
        return timer.blocked_autorange(min_run_time=_PROBE_SECONDS).median * 1e3


@dataclass(frozen=True)
class HalfSpeed:
    """fp32 and half-precision times of a 512x512 Linear (batch 1) and a 32->32 3x3 conv on 32x32 (batch 1)."""

    dtype: str
    threads: int
    linear_fp32_ms: float
    linear_half_ms: float
    conv_fp32_ms: float
    conv_half_ms: float

    @property
    def linear_ratio(self) -> float:
        """Speed of the half Linear relative to fp32 (above 1: faster)."""
        return self.linear_fp32_ms / self.linear_half_ms

    @property
    def conv_ratio(self) -> float:
        return self.conv_fp32_ms / self.conv_half_ms

    def describe(self) -> str:
        return (
            f"{self.dtype} matmul {self.linear_ratio:.2g}x speed on this CPU (512x512 Linear, batch 1: "
            f"{self.linear_fp32_ms:.3f} -> {self.linear_half_ms:.3f} ms), 3x3 conv {self.conv_ratio:.2g}x "
            f"({self.conv_fp32_ms:.3f} -> {self.conv_half_ms:.3f} ms), {self.threads} thread(s)"
        )


@functools.cache
def _probe_times() -> dict[str, tuple[float, float]]:
    """Median ms of the probe Linear and conv at fp32, fp16 and bf16, over interleaved rounds (once per process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        linear, x = nn.Linear(512, 512).eval(), torch.randn(1, 512)
        conv, image = nn.Conv2d(32, 32, 3, padding=1).eval(), torch.randn(1, 32, 32, 32)
    dtypes = {"fp32": torch.float32, **TORCH_DTYPES}
    cases = {
        name: (copy.deepcopy(linear).to(dt), x.to(dt), copy.deepcopy(conv).to(dt), image.to(dt))
        for name, dt in dtypes.items()
    }
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in dtypes}
    for _ in range(_PROBE_ROUNDS):
        for name, (lin, lin_in, cnv, cnv_in) in cases.items():
            samples[name][0].append(time_call_ms(lin, lin_in))
            samples[name][1].append(time_call_ms(cnv, cnv_in))
    return {name: (statistics.median(lin), statistics.median(cnv)) for name, (lin, cnv) in samples.items()}


def half_speed(dtype: HalfDtype) -> HalfSpeed:
    """The measured probe for `dtype` against fp32."""
    times = _probe_times()
    (linear_fp32, conv_fp32), (linear_half, conv_half) = times["fp32"], times[dtype]
    return HalfSpeed(dtype, PROBE_THREADS, linear_fp32, linear_half, conv_fp32, conv_half)


@functools.cache
def _probe(dtype: HalfDtype) -> Availability:
    """One half-precision Linear and conv call must run here and stay close to fp32."""
    half = TORCH_DTYPES[dtype]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 3)).eval()
            x = torch.randn(2, 2, 4, 4)
            expected = net(x)
            err = (net.to(half)(x.to(half)).float() - expected).abs().max().item()
    except (RuntimeError, NotImplementedError) as e:
        return Availability(False, f"{dtype} Linear/conv cannot run on this CPU: {e}")
    if not err < 0.05 * expected.abs().max().item() + 1e-3:
        return Availability(False, f"{dtype} matmul is wrong on this CPU (max abs error {err:.3g})")
    return Availability(True, backend=f"torch {torch.__version__} {dtype} CPU kernels")


def _float_dtypes(model: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}


@register_technique
class CastHalf(Technique):
    name = "cast_half"
    family = "quantization"
    description = (
        "Cast weights and activations to bf16 or fp16: half the size; faster only on CPUs with fast 16-bit "
        "kernels (the estimate times a matmul and a conv at both precisions on this machine)."
    )
    config_cls = CastHalfConfig

    def availability(self) -> Availability:
        return _probe("bf16") if _probe("bf16").available else _probe("fp16")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        reason = _layers.not_eager_reason(analysis) or _layers.already_quantized_reason(analysis)
        if reason:
            return Applicability(False, reason)
        if analysis.param_count <= 0:
            return Applicability(False, "the model has no parameters to cast")
        if _layers.bytes_per_param(analysis) < 3.0:
            return Applicability(False, "the model is already stored in 16 bits or less per parameter")
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, CastHalfConfig)
        speed = half_speed(config.dtype)
        linear = _layers.share_of_params(analysis, _layers.linear_params(analysis))
        conv = _layers.share_of_params(analysis, _layers.conv_params(analysis))
        rest = max(0.0, 1.0 - linear - conv)
        speedup = 1.0 / (rest + linear / speed.linear_ratio + conv / speed.conv_ratio)
        verdict = "faster" if speedup > 1.05 else "slower" if speedup < 0.95 else "about as fast"
        return Estimate(
            size_ratio=_layers.size_ratio_after(analysis, analysis.param_count, 2.0),
            speedup=speedup,
            accuracy_risk="low" if config.dtype == "bf16" else "medium",
            note=(
                f"{speed.describe()}: size 2x smaller, {verdict} (weighted by {linear:.0%} Linear and {conv:.0%} "
                "conv weights; measured probe, the model's own latency is measured after)."
                + (
                    " fp16 overflows above 65504: inputs or activations that large become inf."
                    if config.dtype == "fp16"
                    else ""
                )
            ),
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, CastHalfConfig)
        return config.model_copy(update={"dtype": "bf16"}) if config.dtype == "fp16" else None

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, CastHalfConfig)
        _layers.require_eager_float_module(model, self.name)
        avail = _probe(config.dtype)
        if not avail.available:
            raise TechniqueNotApplicableError(f"{self.name} is unavailable: {avail.reason}", "use another technique")
        found = _float_dtypes(model)
        if found != {torch.float32}:
            raise TechniqueNotApplicableError(
                f"cast_half expects an fp32 model, found float tensors of {sorted(str(d) for d in found)}",
                "apply it to the fp32 model",
            )
        half = TORCH_DTYPES[config.dtype]
        model.eval()
        context.progress.update(self.name, 0, 1, f"casting to {config.dtype}")
        if _hf_quant.is_hf_model(model):
            model = _hf_quant.reload(model, context.progress, self.name, dtype=half)
            model.register_forward_pre_hook(cast_inputs_hook, with_kwargs=True)
            model.register_forward_hook(outputs_to_fp32_hook, with_kwargs=True)
            how = (
                "transformers model reloaded with from_pretrained(dtype=...) (it keeps its fp32 buffers such as "
                "rotary inv_freq); hooks cast float inputs to it and float outputs to fp32"
            )
        else:
            model = HalfPrecisionModule(model.to(half), half)
            how = "wrapped in HalfPrecisionModule: float inputs cast to it, float outputs to fp32"
        _check_finite(model, context, config.dtype)
        context.progress.update(self.name, 1, 1)
        return TechniqueResult(
            model=model,
            backend=f"{avail.backend} (weights and activations in {config.dtype})",
            notes=f"every float weight in {config.dtype}; {how}",
            details={"dtype": config.dtype, "casting": how, "probe": half_speed(config.dtype).describe()},
        )


def _check_finite(model: nn.Module, context: ApplyContext, dtype: str) -> None:
    """Run the example inputs once: a half model whose outputs overflow is a failed attempt, said now."""
    if context.example_inputs is None:
        return
    with torch.no_grad():
        outputs = _layers.flatten_tensors(model(*context.example_inputs))
    if not all(torch.isfinite(t).all() for t in outputs if t.is_floating_point()):
        raise TechniqueFailedError(
            f"the {dtype} model gives non-finite outputs on the example inputs (values beyond the {dtype} range)",
            "use dtype bf16 (fp32's range)" if dtype == "fp16" else "keep this model in fp32",
        )
