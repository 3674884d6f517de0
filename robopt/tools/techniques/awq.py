"""AWQ (activation-aware weight quantization): 4-bit weights with per-group scales for Hugging Face causal LMs,
through autoawq, an optional extra (`pip install 'robopt[awq]'`).

autoawq is deprecated upstream (see UPSTREAM_STATUS) and pulls triton, so it stays out of the main environment.
AWQ scales the weight channels that see large activations before rounding (searched on calibration tokens), then
stores 4-bit weights packed in int32 with fp16 scales and 4-bit zero points per group. On CPU autoawq has no
kernel (its awq_ext and triton kernels are GPU-only, its CPU path needs intel_extension_for_pytorch): each call
dequantizes the weights to fp16 and runs an fp16 matmul, so the model is smaller but slower than fp32. Its
save_quantized folder reloads in transformers 5 only with gptqmodel installed; robopt stores the pickled model,
which loads wherever autoawq is installed.
"""

from __future__ import annotations

import functools
import math
import statistics
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import torch
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
from robopt.tools.techniques import _hf_quant, _layers
from robopt.tools.techniques.half_precision import time_call_ms
from robopt.tools.threads import torch_threads

EXTRA = "awq"
UPSTREAM_STATUS = (
    "deprecated upstream: autoawq 0.2.9 announces it is 'officially deprecated and will no longer be maintained' "
    "(last tested with torch 2.6.0 and transformers 4.51.3); the AWQ algorithm was adopted by the vLLM project's "
    "llm-compressor"
)
_NOT_INSTALLED = f"autoawq is not installed (optional extra: pip install 'robopt[{EXTRA}]'); {UPSTREAM_STATUS}"
_PROBE_ROUNDS = 3


class AwqConfig(TechniqueConfig):
    """autoawq `quantize` settings (4-bit weights, GEMM layout)."""

    group_size: Literal[32, 64, 128] = Field(
        default=128, description="Weights per scale/zero point along the input dimension (smaller: more accurate)."
    )
    zero_point: bool = Field(default=True, description="Asymmetric groups with a 4-bit zero point (else symmetric).")
    calibration_samples: int = Field(
        default=32, ge=1, le=512, description="Calibration sequences (token ids) for the activation statistics."
    )
    apply_clip: bool = Field(
        default=True, description="Also search per-group clipping ranges (more accurate; most of the time on CPU)."
    )


@contextmanager
def _quiet_awq() -> Iterator[None]:
    """autoawq prints its deprecation notice on import (after resetting the DeprecationWarning filter itself) and
    warns about its naive CPU path on first use: UPSTREAM_STATUS and the backend name say both once. Warnings
    raised inside are recorded and dropped; the filters are restored on exit."""
    with warnings.catch_warnings(record=True):
        yield


def _import_awq() -> Any:
    with _quiet_awq():
        import awq

        return awq


def _kernel() -> str:
    """The WQLinear_GEMM path that runs here (autoawq picks it at import)."""
    with _quiet_awq():
        from awq.modules.linear import gemm

    if getattr(gemm, "awq_ext", None) is not None:
        return "awq_ext CUDA kernels"
    if getattr(gemm, "TRITON_AVAILABLE", False):
        return "triton kernels"
    return "naive PyTorch path: dequantize to fp16 + fp16 matmul (no awq_ext/triton kernel on CPU)"


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@functools.cache
def _probe() -> Availability:
    """Quantize a 1-layer random Llama with autoawq on CPU and check its logits against fp32."""
    try:
        awq = _import_awq()
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing in (None, "awq"):
            return Availability(False, _NOT_INSTALLED)
        return Availability(False, f"autoawq is installed but does not import here ({e}); {UPSTREAM_STATUS}")
    try:
        # One thread: the probe's tiny matmuls otherwise stall on thread hand-offs when the machine is busy.
        with torch.random.fork_rng(devices=[]), torch_threads(1):
            torch.manual_seed(0)
            model = _tiny_llama()
            ids = torch.randint(0, 128, (1, 32))
            with torch.no_grad():
                expected = model(ids).logits
            calibration = [torch.randint(0, 128, (32,)).tolist() for _ in range(2)]
            config = AwqConfig(group_size=32, calibration_samples=2, apply_clip=False)
            quantized = _quantize(model, config, calibration, Progress(), "awq-probe")
            with torch.no_grad(), _quiet_awq():
                got = quantized(ids).logits.float()
        err = (got - expected).abs().max().item()
        if not torch.isfinite(got).all() or not err < 0.5 * expected.abs().max().item():
            return Availability(False, f"autoawq quantizes but its CPU forward is wrong here (max abs error {err:.3g})")
    except Exception as e:  # any failure of a deprecated third-party stack means "cannot run here"
        return Availability(False, f"autoawq {awq.__version__} cannot quantize on this CPU: {type(e).__name__}: {e}")
    return Availability(True, backend=f"autoawq {awq.__version__} WQLinear_GEMM ({_kernel()})")


@functools.cache
def layer_speed(tokens: int) -> tuple[float, float]:
    """(fp32 ms, AWQ ms) of a 512x512 Linear on `tokens` tokens on this CPU, medians of interleaved rounds."""
    with _quiet_awq():
        from awq.modules.linear.gemm import WQLinear_GEMM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        linear, x = nn.Linear(512, 512).eval(), torch.randn(1, tokens, 512)
    weight = linear.weight.data.reshape(512, -1, 128)
    low, high = weight.amin(dim=2), weight.amax(dim=2)
    scales = ((high - low) / 15).clamp(min=1e-5)
    zeros = torch.round(-low / scales)
    awq_linear = WQLinear_GEMM.from_linear(linear, 4, 128, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())
    fp32, quantized = [], []
    with _quiet_awq():
        for _ in range(_PROBE_ROUNDS):
            fp32.append(time_call_ms(linear, x))
            quantized.append(time_call_ms(awq_linear.eval(), x))
    return statistics.median(fp32), statistics.median(quantized)


def _copying_state_dict(module: nn.Module) -> Any:
    """`module.state_dict` returning detached copies instead of views of the live parameters."""
    live = type(module).state_dict.__get__(module)

    def state_dict(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in live(*args, **kwargs).items()}

    return state_dict


def _tokens_per_call(analysis: AnalysisReport) -> int:
    """Tokens in one call of the model (batch x sequence of its first input), 1..512; 1 when unknown."""
    spec = analysis.input_spec
    shape = spec.inputs[0].shape if spec and spec.inputs else None
    return min(512, max(1, math.prod(d for d in shape if d > 0))) if shape else 1


def _progress_quantizer(progress: Progress, stage: str) -> type:
    """autoawq's AwqQuantizer reporting one progress step per decoder layer (and honouring cancellation), with its
    scale search fixed for CPU.

    autoawq 0.2.9's `_compute_best_scale` keeps the weights to restore between grid points as
    `{k: v.cpu() for k, v in module.state_dict().items()}`: copies on GPU, but on CPU the very tensors that its first
    grid point then scales in place. Every later grid point and the final "restored" layers carry that scaling, so
    the quantized model no longer computes what the original did (measured on tiny-lm: the search's scaling alone,
    without any rounding, moved perplexity from 91.9 to 96.8). While it runs, the inspected module's state_dict
    hands out copies.
    """
    from awq.quantize.quantizer import AwqQuantizer

    class ProgressAwqQuantizer(AwqQuantizer):
        def _compute_best_scale(
            self, x: Any, w_mean: Any, x_mean: Any, module2inspect: nn.Module, *args: Any, **kw: Any
        ):
            module2inspect.state_dict = _copying_state_dict(module2inspect)  # instance attribute, removed below
            try:
                return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, *args, **kw)
            finally:
                del module2inspect.state_dict

        def _index(self, layer: nn.Module) -> int:
            return next(i for i, m in enumerate(self.modules) if m is layer)

        def _get_input_feat(self, layer: nn.Module, named_linears: dict[str, nn.Linear]) -> Any:
            if self._index(layer) == 0:
                progress.update(stage, 0, len(self.modules), "searching activation-aware scales per decoder layer")
            progress.check()
            return super()._get_input_feat(layer, named_linears)

        def _apply_quant(self, module: nn.Module, named_linears: dict[str, nn.Linear]) -> None:
            super()._apply_quant(module, named_linears)
            progress.update(stage, self._index(module) + 1, len(self.modules))

    return ProgressAwqQuantizer


def _quantize(
    model: nn.Module, config: AwqConfig, calibration: list[list[int]], progress: Progress, stage: str
) -> nn.Module:
    """Run autoawq on a transformers causal LM (saved to a temporary folder, loaded by AutoAWQForCausalLM on CPU)."""
    with _quiet_awq():
        from awq import AutoAWQForCausalLM

    use_cache = getattr(model.config, "use_cache", None)
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    with tempfile.TemporaryDirectory(prefix="robopt-awq-") as tmp, _hf_quant.quiet_transformers(), _quiet_awq():
        model.save_pretrained(tmp)
        awq_model = AutoAWQForCausalLM.from_pretrained(
            tmp, torch_dtype=dtype, device_map="cpu", safetensors=True, trust_remote_code=False
        )
    length = max(len(c) for c in calibration)
    with _hf_quant.quiet_transformers(), _quiet_awq():
        awq_model.quantize(
            None,
            quant_config={
                "w_bit": 4,
                "q_group_size": config.group_size,
                "zero_point": config.zero_point,
                "version": "GEMM",
            },
            calib_data=calibration,
            max_calib_samples=len(calibration),
            max_calib_seq_len=length,
            apply_clip=config.apply_clip,
            quantizer_cls=_progress_quantizer(progress, stage),
        )
    quantized = awq_model.model.eval()
    if use_cache is not None:
        quantized.config.use_cache = use_cache
    return quantized


def _token_lists(context: ApplyContext, n: int, technique: str) -> tuple[list[list[int]], str]:
    if context.calibration is None:
        raise TechniqueNotApplicableError(
            f"{technique} needs calibration token ids, and none were given",
            "give a calibration source (e.g. windows of text the model was trained on) or use bnb_int8/hqq",
        )
    calibration = context.calibration(n)
    lists = []
    for sample in calibration.samples:
        ids = sample[0]
        if ids.is_floating_point() or ids.ndim != 2 or ids.shape[0] != 1:
            raise TechniqueNotApplicableError(
                f"{technique} calibrates on token ids [1, length]; got a {ids.dtype} tensor of shape {list(ids.shape)}",
                "give a calibration set of input_ids for this language model",
            )
        lists.append(ids[0].tolist())
    if not lists:
        raise TechniqueNotApplicableError(f"{technique} got an empty calibration set", "give at least one sample")
    return lists, calibration.source


def _awq_model_types() -> set[str]:
    with _quiet_awq():
        from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    return set(AWQ_CAUSAL_LM_MODEL_MAP)


@register_technique
class Awq(Technique):
    name = "awq"
    family = "quantization"
    description = (
        "AWQ 4-bit weight quantization of a Hugging Face causal LM's decoder layers with calibration-searched "
        "activation-aware scales (autoawq, optional extra; deprecated upstream). Smaller, slower than fp32 on CPU."
    )
    config_cls = AwqConfig

    def availability(self) -> Availability:
        return _probe()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        if analysis.format != "hf-folder" or analysis.architecture != "decoder-llm":
            return Applicability(False, "AWQ (autoawq) quantizes Hugging Face causal language models only")
        reason = _layers.already_quantized_reason(analysis)
        if reason:
            return Applicability(False, reason)
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, AwqConfig)
        linear = _layers.linear_params(analysis)
        share = _layers.share_of_params(analysis, linear)
        stored = 0.5 + 2.5 / config.group_size  # 4-bit weight + fp16 scale and 4-bit zero per group
        tokens = _tokens_per_call(analysis)
        fp32_ms, awq_ms = layer_speed(tokens)
        layer_speedup = fp32_ms / awq_ms
        return Estimate(
            size_ratio=_layers.size_ratio_after(analysis, linear, stored),
            speedup=_layers.amdahl_speedup(share, layer_speedup),
            accuracy_risk="medium",
            note=(
                f"Decoder Linear weights go to {stored:.3g} bytes each (lm_head and embeddings stay as they are; the "
                f"estimate counts all {share:.0%} Linear parameters). Measured on this CPU: a 512x512 AWQ layer ran "
                f"at {layer_speedup:.2g}x the speed of fp32 ({fp32_ms:.3f} -> {awq_ms:.3f} ms on {tokens} tokens; "
                f"autoawq dequantizes on every call here). autoawq is {UPSTREAM_STATUS}."
            ),
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, AwqConfig)
        if config.group_size > 32:
            return config.model_copy(update={"group_size": config.group_size // 2})
        return None

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, AwqConfig)
        avail = _probe()
        if not avail.available:
            raise TechniqueNotApplicableError(f"{self.name} is unavailable: {avail.reason}", "use weight_only_int4")
        _layers.require_eager_float_module(model, self.name)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if not _hf_quant.is_hf_model(model) or model_type not in _awq_model_types():
            raise TechniqueNotApplicableError(
                f"autoawq quantizes transformers causal LMs of the types it knows; got {type(model).__name__} "
                f"(model_type {model_type!r})",
                "use weight_only_int4 or hqq for other models",
            )
        narrow = [n for n, m in model.named_modules() if type(m) is nn.Linear and m.in_features % config.group_size]
        if any(".layers." in n or n.startswith("layers.") for n in narrow):
            raise TechniqueNotApplicableError(
                f"AWQ groups of {config.group_size} do not tile these layers' inputs: {', '.join(narrow[:5])}",
                "choose a group_size that divides every decoder layer's input width",
            )
        calibration, source = _token_lists(context, config.calibration_samples, self.name)
        attributes = {k: v for k, v in vars(model).items() if not k.startswith("_")}
        try:
            quantized = _quantize(model.eval(), config, calibration, context.progress, self.name)
        except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as e:
            raise TechniqueFailedError(
                f"autoawq failed to quantize {type(model).__name__} on CPU: {type(e).__name__}: {e}",
                "use weight_only_int4 or hqq (autoawq is deprecated upstream and unmaintained)",
            ) from e
        for key, value in attributes.items():
            if key not in vars(quantized):
                setattr(quantized, key, value)
        layers = [n for n, m in quantized.named_modules() if type(m).__name__ == "WQLinear_GEMM"]
        return TechniqueResult(
            model=quantized,
            backend=avail.backend,
            notes=f"AWQ W4 g{config.group_size} on {len(layers)} Linear layers, calibrated on {len(calibration)} "
            f"sequences from {source}; {UPSTREAM_STATUS}",
            details={
                "layers_quantized": len(layers),
                "group_size": config.group_size,
                "zero_point": config.zero_point,
                "apply_clip": config.apply_clip,
                "calibration_samples": len(calibration),
                "calibration_source": source,
                "autoawq": _autoawq_version(),
                "stored": "int32-packed 4-bit weights, fp16 scales and packed 4-bit zeros per group",
                "export": "pickled model (needs autoawq to load); autoawq's save_quantized folder reloads in "
                "transformers 5 only with gptqmodel, and autoawq's from_quantized needs intel_extension_for_pytorch "
                "on CPU",
            },
        )


def _autoawq_version() -> str:
    try:
        return version("autoawq")
    except PackageNotFoundError:
        return "unknown"
