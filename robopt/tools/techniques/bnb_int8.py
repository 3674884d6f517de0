"""LLM.int8() quantization of Linear layers with bitsandbytes' Linear8bitLt (it runs on CPU in bitsandbytes >= 0.48).

Stored: int8 weights (one byte each), one fp32 scale per output row (SCB) and the fp32 bias. At run time each
call casts the activations to fp16, quantizes them per row to int8 and multiplies int8 x int8 -> int32
(torch._int_mm where bitsandbytes registers its AVX512 CPU kernel, an fp32 emulation elsewhere); activation
columns with a value above `threshold` (the LLM.int8 outliers) are multiplied in float instead. Transformers
models go through transformers' BitsAndBytesConfig(load_in_8bit=True), so their save_pretrained folder reloads
with plain transformers.
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import version
from typing import Any

import torch
from pydantic import Field
from torch import nn

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
from robopt.tools.techniques import _hf_quant, _layers
from robopt.tools.techniques.weight_only import (
    _linear_targets,
    _require_targets,
    cpu_kernel,
    quantize_hf_with_bnb,
    swap_linears,
)

# Measured on this 2-core CPU (torch._int_mm kernel, batch 1, machine under load): 256-512 wide layers ran at
# 0.06-0.5x the speed of fp32 (quantizing the activations costs more than the matmul), 2048-4096 wide layers
# (memory-bound) at 1.1-3.8x. Per-layer speed ratios for the estimate, by weights per Linear layer.
_SMALL_LAYER_SPEEDUP = 0.3
_LARGE_LAYER_SPEEDUP = 1.2
_LARGE_LAYER_WEIGHTS = 1_000_000
_FP16_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast from"


class BnbInt8Config(TechniqueConfig):
    """bitsandbytes `Linear8bitLt` settings (LLM.int8, inference only)."""

    threshold: float = Field(
        default=6.0,
        ge=0.0,
        description="LLM.int8 outlier threshold on activations: input columns with |x| above it are multiplied in "
        "float, the rest in int8. 0 quantizes every column (faster, less accurate).",
    )
    skip_head: bool = Field(default=True, description="Keep the output (classifier/action/lm_head) layer in fp32.")


class _DropFp16CastNotice(logging.Filter):
    """bitsandbytes logs a warning on every call of every layer that its fp32 inputs are cast to fp16; the technique's
    notes say so once instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_FP16_CAST_MESSAGE)


@functools.cache
def _quiet_fp16_cast_notice() -> None:
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropFp16CastNotice())


def _to_linear8bit(name: str, linear: nn.Linear, threshold: float) -> nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    new = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=threshold
    )
    new.weight = bnb.nn.Int8Params(linear.weight.data.detach().clone(), requires_grad=False, has_fp16_weights=False)
    if bias:
        new.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    # Int8Params quantizes (int8 rows + fp32 row scales) when moved to a device; on CPU that is this call.
    return new.to(linear.weight.device).eval()


def _kernel() -> str:
    if cpu_kernel("int8_linear_matmul") == "cpu":
        return "int8 x int8 -> int32 via torch._int_mm (bitsandbytes' AVX512 CPU kernel)"
    return "int8 matmul emulated in fp32 (bitsandbytes' default kernel: no AVX512 CPU kernel here)"


@functools.cache
def _probe() -> Availability:
    """Quantize and run one tiny layer on CPU (with an outlier column) and check it approximates fp32."""
    try:
        import bitsandbytes as bnb

        _quiet_fp16_cast_notice()
        with torch.random.fork_rng(devices=[]):  # the probe must not move the caller's random stream
            torch.manual_seed(0)
            ref = nn.Linear(64, 32)
            q = _to_linear8bit("probe", ref, 6.0)
            x = torch.randn(2, 64)
            x[:, 0] = 20.0  # an outlier column takes the float path
            with torch.no_grad():
                expected = ref(x)
                err = (q(x) - expected).abs().max().item()
        if q.weight.dtype != torch.int8 or not err < 0.05 * expected.abs().max().item():
            return Availability(False, f"bitsandbytes int8 CPU matmul is wrong here (max abs error {err:.3g})")
    except Exception as e:
        return Availability(False, f"bitsandbytes Linear8bitLt cannot run on this CPU: {type(e).__name__}: {e}")
    return Availability(True, backend=f"bitsandbytes {bnb.__version__} Linear8bitLt (CPU: {_kernel()})")


@register_technique
class BnbInt8(Technique):
    name = "bnb_int8"
    family = "quantization"
    description = (
        "LLM.int8() quantization of Linear layers (bitsandbytes Linear8bitLt): int8 weights with per-row scales "
        "(~4x smaller Linear weights), int8 activations with float outlier columns. Slower than fp32 on CPU for "
        "small layers."
    )
    config_cls = BnbInt8Config

    def availability(self) -> Availability:
        return _probe()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return _layers.linear_quantization_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, BnbInt8Config)
        linear = _layers.linear_params(analysis)
        share = _layers.share_of_params(analysis, linear)
        per_layer = linear // max(analysis.layer_census.get("Linear", 0), 1)
        large = per_layer >= _LARGE_LAYER_WEIGHTS
        layer_speedup = _LARGE_LAYER_SPEEDUP if large else _SMALL_LAYER_SPEEDUP
        return Estimate(
            size_ratio=_layers.size_ratio_after(analysis, linear, _layers.INT8_BYTES_PER_PARAM),
            speedup=_layers.amdahl_speedup(share, layer_speedup),
            accuracy_risk="low" if config.threshold > 0 else "medium",
            note=(
                f"Linear weights ({share:.0%} of parameters) go to ~1 byte each"
                + (", the head layer stays fp32 (not counted here)" if config.skip_head else "")
                + f". Speed: ~{layer_speedup:g}x on those layers ({per_layer:,} weights per layer): measured on this "
                "CPU 0.06-0.5x for 256-512 wide layers, faster than fp32 only for memory-bound layers of millions "
                "of weights. Latency is measured after."
            ),
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, BnbInt8Config)
        if config.threshold == 0:
            return config.model_copy(update={"threshold": 6.0})
        if not config.skip_head:
            return config.model_copy(update={"skip_head": True})
        return None

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, BnbInt8Config)
        _layers.require_eager_float_module(model, self.name)
        avail = _probe()
        if not avail.available:
            raise TechniqueNotApplicableError(f"{self.name} is unavailable: {avail.reason}", "use weight_only_int8")
        targets, skipped = _linear_targets(model, config.skip_head, context.example_inputs)
        _require_targets(targets, skipped, self.name)
        model.eval()
        details: dict[str, Any] = {
            "threshold": config.threshold,
            "stored": "int8 weights, one fp32 scale (SCB) per output row, fp32 bias",
            "activations": "cast to fp16, quantized per row to int8 on every call; columns with |x| > threshold "
            "stay float" + ("" if config.threshold > 0 else " (threshold 0: none)"),
            "bitsandbytes": version("bitsandbytes"),
        }
        if _hf_quant.is_hf_model(model):
            bnb_kwargs = {"load_in_8bit": True, "llm_int8_threshold": config.threshold}
            keep = [n for n, _ in targets]
            model, hf_details = quantize_hf_with_bnb(model, bnb_kwargs, keep, context, self.name)
            details.update(hf_details)
        else:
            convert = functools.partial(_to_linear8bit, threshold=config.threshold)
            model = swap_linears(model, targets, convert, context.progress, self.name)
            details.update({"layers_quantized": len(targets), "layers_skipped": skipped, "route": "module swap"})
        return TechniqueResult(
            model=model,
            backend=f"{avail.backend}, threshold {config.threshold:g}",
            notes=f"LLM.int8 on {details['layers_quantized']} Linear layers; {details['activations']}",
            details=details,
        )
