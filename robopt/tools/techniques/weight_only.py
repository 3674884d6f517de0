"""Weight-only quantization of Linear layers: INT8 with torchao, packed 4-bit (NF4/FP4) with bitsandbytes.

torchao int8 weight-only runs SLOWER than fp32 on this CPU (weights are dequantized per call). torchao's
Int4WeightOnlyConfig has no CPU path here (it fails with "Requires mslk >= 1.0.0", and torchao 0.18 does not
support the "opaque" CPU packing), so 4-bit uses bitsandbytes' Linear4bit, whose CPU kernels run and whose
weights are stored packed (two 4-bit values per byte plus one fp32 absmax per block). On CPUs with AVX512-BF16
bitsandbytes repacks them on the first inference call for a fused 4-bit GEMM that computes in bf16.

Plain modules get their nn.Linear layers swapped in place; transformers models go through transformers' own
bitsandbytes integration (robopt.tools.techniques._hf_quant), so their save_pretrained folder reloads with plain
transformers. The layer-selection rules here (head detection, layers narrower than a block) are shared by the
other Linear quantizers (bnb_int8, hqq).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from importlib.metadata import version
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.picklable import make_picklable
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

# Measured on this CPU (512-wide MLP, batch 1): fp32 0.048 ms, torchao int8 weight-only 0.137 ms; bitsandbytes
# nf4 (fused bf16 kernel) 0.15-0.35x the speed of fp32 on 256-512 wide layers at batch 1, but faster than fp32 on
# memory-bound layers of millions of weights. Used as per-layer speedups in the estimates.
_INT8_LAYER_SPEEDUP = 0.35
_INT4_LAYER_SPEEDUP = 0.2


def _linear_targets(
    model: nn.Module, skip_head: bool, example_inputs: tuple[object, ...] | None
) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """Exact nn.Linear layers to quantize (subclasses such as attention out_proj are read raw by their parent)."""
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    heads = _layers.find_head_layers(model, example_inputs) if skip_head else []
    keep = [(n, m) for n, m in linears if all(m is not h for h in heads)]
    skipped = [n for n, m in linears if any(m is h for h in heads)]
    return keep, skipped


def _require_targets(targets: list[tuple[str, nn.Linear]], skipped: list[str], technique: str) -> None:
    if not targets:
        because = f" (skipped head: {', '.join(skipped)})" if skipped else ""
        raise TechniqueNotApplicableError(
            f"{technique} found no nn.Linear layer to quantize{because}",
            "set skip_head=false or choose a technique for this layer type",
        )


def split_narrow(targets: list[tuple[str, nn.Linear]], blocksize: int) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """(layers whose rows tile into whole blocks, names of the others).

    bitsandbytes' CPU inference path reshapes absmax to in_features / blocksize blocks per row and fails
    ("shape '[256, 0]' is invalid") when a row is not a whole number of blocks: such layers stay fp32."""
    kept = [(n, m) for n, m in targets if not m.in_features % blocksize]
    return kept, [n for n, m in targets if m.in_features % blocksize]


def swap_linears(
    model: nn.Module,
    targets: list[tuple[str, nn.Linear]],
    convert: Callable[[str, nn.Linear], nn.Module],
    progress: Progress,
    stage: str,
) -> nn.Module:
    """Replace each target layer by `convert(name, layer)`, reporting progress (and honouring cancellation)."""
    for name, linear in progress.track(targets, stage):
        new = convert(name, linear)
        if not name:  # the model itself is a single Linear
            return new
        model.set_submodule(name, new)
    return model


def quantize_hf_with_bnb(
    model: nn.Module, bnb_kwargs: dict[str, Any], keep: list[str], context: ApplyContext, stage: str
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize the `keep` layers of a transformers model through `BitsAndBytesConfig(**bnb_kwargs)`.

    Returns the model transformers built and details (layers quantized/skipped, the quantization_config that its
    save_pretrained folder carries)."""
    from transformers import BitsAndBytesConfig

    skip = _hf_quant.skip_modules(model, keep)
    config = BitsAndBytesConfig(**bnb_kwargs, llm_int8_skip_modules=skip)
    quantized = _hf_quant.reload(model, context.progress, stage, quantization_config=config)
    quantized.register_state_dict_pre_hook(_hf_quant.restore_bnb_cpu_layout_hook)
    layers = _hf_quant.bnb_layers(quantized)
    if not layers:
        raise TechniqueFailedError(
            f"transformers converted no layer to bitsandbytes (skipped: {', '.join(skip) or 'none'})",
            "check that the model has nn.Linear layers outside the head",
        )
    return quantized, {
        "layers_quantized": len(layers),
        "layers_skipped": skip,
        "route": "transformers BitsAndBytesConfig (from_pretrained on CPU)",
        "quantization_config": json.loads(quantized.config.quantization_config.to_json_string(use_diff=False)),
        "export": "save_pretrained folder with quantization_config; plain transformers reloads it (device_map='cpu')",
    }


def cpu_kernel(op: str) -> str:
    """Which implementation of a bitsandbytes op runs on CPU here: its CPU kernel or the generic default."""
    try:
        cpu = torch._C._dispatch_has_kernel_for_dispatch_key(f"bitsandbytes::{op}", "CPU")
    except (AttributeError, RuntimeError):
        return "unknown"
    return "cpu" if cpu else "default"


# -- INT8 weight-only (torchao) ------------------------------------------------------------------


class WeightOnlyInt8Config(TechniqueConfig):
    """torchao `Int8WeightOnlyConfig` on Linear layers (per-row scales)."""

    skip_head: bool = Field(default=False, description="Keep the output (classifier/action) layer in fp32.")


@functools.cache
def _torchao_probe() -> Availability:
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        with torch.random.fork_rng(devices=[]):
            tiny = nn.Sequential(nn.Linear(16, 8))
            quantize_(tiny, Int8WeightOnlyConfig())
            with torch.no_grad():
                tiny(torch.randn(2, 16))
    except (ImportError, RuntimeError, NotImplementedError, AssertionError) as e:
        return Availability(False, f"torchao int8 weight-only cannot run here: {e}")
    return Availability(True, backend=f"torchao {torchao.__version__} Int8WeightOnlyConfig")


@register_technique
class WeightOnlyInt8(Technique):
    name = "weight_only_int8"
    family = "quantization"
    description = (
        "INT8 weight-only quantization of Linear layers (torchao): ~4x smaller Linear weights, near-lossless, "
        "but slower than fp32 on CPUs."
    )
    config_cls = WeightOnlyInt8Config

    def availability(self) -> Availability:
        return _torchao_probe()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return _layers.linear_quantization_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, WeightOnlyInt8Config)
        linear = _layers.linear_params(analysis)
        share = _layers.share_of_params(analysis, linear)
        return Estimate(
            size_ratio=_layers.size_ratio_after(analysis, linear, _layers.INT8_BYTES_PER_PARAM),
            speedup=_layers.amdahl_speedup(share, _INT8_LAYER_SPEEDUP),
            accuracy_risk="low",
            note=(
                f"~4x smaller Linear weights ({share:.0%} of parameters) but SLOWER on CPU: measured fp32 0.048 ms vs "
                "0.137 ms int8 weight-only on a 512x512 MLP. Choose it for size, not latency."
            ),
        )

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, WeightOnlyInt8Config)
        _layers.require_eager_float_module(model, self.name)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        targets, skipped = _linear_targets(model, config.skip_head, context.example_inputs)
        _require_targets(targets, skipped, self.name)
        chosen = {id(m) for _, m in targets}
        model.eval()
        context.progress.update(self.name, 0, 1, f"quantizing {len(targets)} Linear layers")
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _fqn: id(m) in chosen)
        context.progress.update(self.name, 1, 1)
        make_picklable(model)
        return TechniqueResult(
            model=model,
            backend=_torchao_probe().backend,
            details={"layers_quantized": len(targets), "layers_skipped": skipped, "weight_scales": "per-row"},
        )


# -- 4-bit weights (bitsandbytes NF4/FP4) ---------------------------------------------------------

BlockSize = Literal[32, 64, 128, 256, 512, 1024, 2048, 4096]
HF_BLOCKSIZE = 64  # bitsandbytes' 4-bit block size when transformers quantizes (BitsAndBytesConfig cannot set it)


class WeightOnlyInt4Config(TechniqueConfig):
    """bitsandbytes `Linear4bit` settings (fp32 compute on CPU)."""

    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="NormalFloat4 (for normal weights) or FP4.")
    blocksize: BlockSize = Field(default=64, description="Weights per absmax scale (bitsandbytes' allowed sizes).")
    double_quant: bool = Field(default=False, description="Also quantize the per-block scales (slightly smaller).")
    skip_head: bool = Field(default=True, description="Keep the output (classifier/action) layer in fp32.")


def _to_linear4bit(linear: nn.Linear, config: WeightOnlyInt4Config) -> nn.Module:
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=torch.uint8,
    )
    new.weight = bnb.nn.Params4bit(
        linear.weight.data.detach().clone(),
        requires_grad=False,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        blocksize=config.blocksize,
    )
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    # Params4bit packs its data when moved to a real device; on CPU that is this call.
    return new.to(linear.weight.device)


@functools.cache
def _bnb_probe() -> Availability:
    """Run one tiny 4-bit matmul on CPU, check it approximates fp32, and name the kernel that ran."""
    try:
        import bitsandbytes as bnb

        with torch.random.fork_rng(devices=[]):  # the probe must not move the caller's random stream
            torch.manual_seed(0)
            ref = nn.Linear(64, 32)
            q = _to_linear4bit(ref, WeightOnlyInt4Config()).eval()
            x = torch.randn(2, 64)
            with torch.no_grad():
                expected = ref(x)
                err = (q(x) - expected).abs().max().item()
        if not getattr(q.weight, "bnb_quantized", False) or not err < 0.25 * expected.abs().max().item():
            return Availability(False, f"bitsandbytes 4-bit CPU matmul is wrong here (max abs error {err:.3g})")
    except Exception as e:
        return Availability(False, f"bitsandbytes 4-bit CPU kernel cannot run here: {type(e).__name__}: {e}")
    if getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        kernel = f"fused 4-bit GEMM in bf16 ({cpu_kernel('gemv_4bit')} gemv_4bit, AVX512-BF16)"
    else:
        kernel = "dequantize_4bit + fp32 matmul"
    return Availability(True, backend=f"bitsandbytes {bnb.__version__} Linear4bit (CPU: {kernel})")


@register_technique
class WeightOnlyInt4(Technique):
    name = "weight_only_int4"
    family = "quantization"
    description = (
        "4-bit weight-only quantization of Linear layers (bitsandbytes NF4/FP4, packed storage): ~7x smaller "
        "Linear weights, slower than fp32 on CPU, more accuracy risk than int8."
    )
    config_cls = WeightOnlyInt4Config

    def availability(self) -> Availability:
        return _bnb_probe()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return _layers.linear_quantization_applicability(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, WeightOnlyInt4Config)
        linear = _layers.linear_params(analysis)
        scale_bytes = (1.0 if config.double_quant else 4.0) / config.blocksize
        share = _layers.share_of_params(analysis, linear)
        return Estimate(
            size_ratio=_layers.size_ratio_after(analysis, linear, 0.5 + scale_bytes),
            speedup=_layers.amdahl_speedup(share, _INT4_LAYER_SPEEDUP),
            accuracy_risk="medium",
            note=(
                f"Linear weights ({share:.0%} of parameters) go to {0.5 + scale_bytes:.3g} bytes each"
                + (", the head layer stays fp32 (not counted here)" if config.skip_head else "")
                + ". Usually SLOWER on this CPU: measured 0.15-0.35x the speed of fp32 for 256-512 wide layers at "
                "batch 1 (bitsandbytes' fused bf16 4-bit kernel); only very large layers (millions of weights, "
                "memory-bound) ran faster. Latency is measured after."
            ),
        )

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, WeightOnlyInt4Config)
        _layers.require_eager_float_module(model, self.name)
        avail = _bnb_probe()
        if not avail.available:
            raise TechniqueNotApplicableError(f"{self.name} is unavailable: {avail.reason}", "use weight_only_int8")
        hf = _hf_quant.is_hf_model(model)
        if hf and config.blocksize != HF_BLOCKSIZE:
            raise TechniqueNotApplicableError(
                f"transformers' BitsAndBytesConfig has no block size: bitsandbytes uses {HF_BLOCKSIZE} for "
                f"transformers models, not {config.blocksize}",
                f"set blocksize={HF_BLOCKSIZE} for this Hugging Face model",
            )
        targets, skipped = _linear_targets(model, config.skip_head, context.example_inputs)
        targets, narrow = split_narrow(targets, config.blocksize)
        skipped += narrow
        _require_targets(targets, skipped, self.name)
        model.eval()
        details: dict[str, Any] = {
            "quant_type": config.quant_type,
            "blocksize": config.blocksize,
            "double_quant": config.double_quant,
            "bitsandbytes": version("bitsandbytes"),
        }
        if hf:
            bnb_kwargs = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": config.quant_type,
                "bnb_4bit_use_double_quant": config.double_quant,
                "bnb_4bit_compute_dtype": torch.float32,
            }
            keep = [n for n, _ in targets]
            model, hf_details = quantize_hf_with_bnb(model, bnb_kwargs, keep, context, self.name)
            details.update(hf_details)
        else:
            convert = functools.partial(_packed_linear4bit, config=config)
            model = swap_linears(model, targets, convert, context.progress, self.name)
            details.update({"layers_quantized": len(targets), "layers_skipped": skipped, "route": "module swap"})
        return TechniqueResult(model=model, backend=f"{avail.backend} {config.quant_type}", details=details)


def _packed_linear4bit(name: str, linear: nn.Linear, config: WeightOnlyInt4Config) -> nn.Module:
    new = _to_linear4bit(linear, config)
    if not getattr(new.weight, "bnb_quantized", False):
        raise TechniqueFailedError(
            f"bitsandbytes did not pack the weight of {name!r} to 4 bits",
            "check the bitsandbytes installation (`python -m bitsandbytes`)",
        )
    return new
