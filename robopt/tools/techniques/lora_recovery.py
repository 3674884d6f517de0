"""LoRA / QLoRA recovery (peft): low-rank adapters on the Linear layers learn to reproduce the run's original model.

Adapters (rank r, scale alpha/r) go on every Linear layer but the output head (peft's LoraConfig with the layers'
full names), and only they train, with robopt.training.fit.fit_to_teacher on the run's training-side inputs
(context.calibration) toward the original model (context.teacher).

- Float bases: the adapters are merged back (peft merge_and_unload): the result is the plain model again, with the
  same layers and parameter count. Unstructured sparsity is kept by default: weights with exact-zero masks (see
  finetune.MIN_SPARSITY) get their zeros back after the merge (the merged low-rank update is dense); the held-out
  loss after that is measured, and `finetune` (which keeps zeros while it trains) is the better fit for small nets.
- Quantized bases (QLoRA): bitsandbytes 4-bit (Linear4bit, from weight_only_int4) and HQQ layers (hqq) stay frozen
  and packed; the adapters train on top of them and are KEPT UNMERGED in the result (peft's lora layers wrapping
  the quantized ones, inside the original model class; torch.save/torch.load round-trips it). Merging into a
  quantized layer means dequantize + add + re-quantize (peft's merge for Linear4bit and HQQLinear), and measured on
  tiny-lm that rounding erases most of what the adapters learned: held-out KL to the fp32 model, nf4
  0.00289 -> adapters 0.00094 -> merged and re-quantized 0.00222; HQQ 2-bit 0.0659 -> 0.0164 -> 0.0632. Kept
  adapters add r * (in + out) fp32 weights per layer (tiny-lm, r=8: 40,960 parameters, 160 KiB; its nf4 pickle
  grew 2,360,970 -> 2,567,158 bytes, +8.7%, still 67% of the fp32 pickle) and cost latency (tiny-lm: 12-15 ms ->
  24 ms per 64-token call on this CPU). When any target layer is quantized, all adapters stay unmerged.
- bitsandbytes repacks 4-bit weights for its fused CPU kernel on the first inference call, and that kernel has no
  autograd: gradients would not flow through the frozen layers to earlier adapters. The packing is undone before
  training and disabled while it runs (restored after, so inference uses the fused kernel again).
- Not supported: torch.ao dynamic-int8 layers (peft has no LoRA layer for them), torchao tensors (peft cannot
  merge them without the quantization recipe, and unmerged they are not verified here), bitsandbytes 8-bit
  (recover before bnb_int8). Apply lora_recovery before those quantizers instead.
"""

from __future__ import annotations

import math
import warnings
from importlib.metadata import version
from typing import Any, Literal

import torch
from pydantic import Field
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
from robopt.tools.techniques import _hf_quant, _layers
from robopt.tools.techniques.finetune import (
    LossChoice,
    after_each_step,
    apply_masks,
    check_loss,
    draw_samples,
    loss_kind,
    recovery_details,
    require_improvement,
    require_teacher,
    sparsity_masks,
    split_check,
    step_reporter,
    zeros_kept,
)
from robopt.tools.threads import torch_threads
from robopt.training.fit import TrainBudget, fit_to_teacher, teacher_targets

BaseKind = Literal["float", "bnb-4bit", "hqq"]
# Census class names of the quantized layers adapters can sit on (robopt's HQQ layer is CpuHQQLinear).
_SUPPORTED_QUANTIZED = ("Linear4bit", "LinearNF4", "LinearFP4")
_HQQ_NAMES = ("HQQLinear", "CpuHQQLinear")
# Measured on tiny-lm (nf4 base, 14 adapted layers, batch 1 x 64 tokens, 1 thread): 12-15 ms -> 24 ms per call.
_KEPT_ADAPTERS_SPEEDUP = 0.6
_UNSUPPORTED_WHY = {
    "dynamicquantized": "peft has no LoRA layer for torch.ao quantized layers; apply lora_recovery before "
    "quantize_dynamic_int8",
    "8bit": "robopt's lora_recovery does not train over bitsandbytes 8-bit layers; apply it before bnb_int8",
    "quantized": "peft has no LoRA layer for torch.ao quantized layers; apply lora_recovery before quantizing",
}


class LoraRecoveryConfig(TechniqueConfig):
    """Adapter shape, the training budget, and what happens to pruned zeros."""

    r: int = Field(default=8, ge=1, le=512, description="Adapter rank.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scale numerator: the update is (alpha / r) * B @ A.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input while training.")
    include_head: bool = Field(default=False, description="Also adapt the output (classifier/LM) head.")
    steps: int = Field(default=200, ge=1, le=100_000, description="Optimizer steps (the step budget).")
    seconds: float | None = Field(
        default=120.0, gt=0, description="Wall-time budget in seconds (None: steps only); whichever comes first."
    )
    lr: float = Field(default=2e-3, gt=0, le=1.0, description="AdamW learning rate of the adapters.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Inputs per optimizer step.")
    samples: int = Field(default=256, ge=16, le=100_000, description="Training-side inputs drawn from the run's data.")
    loss: LossChoice = Field(
        default="auto", description="kl: softened logits; mse: output values; auto: by output and architecture."
    )
    temperature: float = Field(default=1.0, gt=0, le=20, description="Softmax temperature of the KL loss.")
    keep_sparsity: bool = Field(
        default=True, description="Float bases: zero the pruned weights again after merging (the update is dense)."
    )


def _is_hqq(module: nn.Module) -> bool:
    return any(c.__name__ == "HQQLinear" and c.__module__.startswith("hqq") for c in type(module).__mro__)


def _is_bnb_4bit(module: nn.Module) -> bool:
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _plain_float(weight: object) -> bool:
    return type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point  # type: ignore[attr-defined]


def base_kind(module: nn.Module) -> BaseKind | None:
    """What an adapter would sit on: an exact nn.Linear with plain float weights, a bitsandbytes 4-bit or an HQQ
    layer; None otherwise (subclasses such as attention out_proj are read raw by their parent)."""
    if type(module) is nn.Linear:
        return "float" if _plain_float(module.weight) else None
    if _is_bnb_4bit(module):
        return "bnb-4bit"
    if _is_hqq(module):
        return "hqq"
    return None


def _why_not(layer: str) -> str:
    low = layer.lower()
    for marker, why in _UNSUPPORTED_WHY.items():
        if marker in low:
            return why
    return (
        "lora_recovery trains over float, bitsandbytes 4-bit and HQQ Linear layers only; apply it before this quantizer"
    )


def _unsupported_reason(layer_types: list[str]) -> str | None:
    """Why adapters cannot go on these quantized layer types (census names), or None when they can."""
    bad = [t for t in layer_types if t not in _SUPPORTED_QUANTIZED and t not in _HQQ_NAMES]
    return f"quantized layers {', '.join(bad)}: {_why_not(bad[0])}" if bad else None


def _unsupported_layers(model: nn.Module) -> list[str]:
    """'Layer (why)' for each kind of quantized layer in `model` that adapters cannot sit on (the outermost
    quantized module of each subtree, named as robopt's analysis names it)."""
    modules = dict(model.named_modules())
    flagged = _layers.quantized_modules(model)
    found: dict[str, str] = {}
    for name in flagged:
        module = modules.get(name, model)
        if base_kind(module) is not None or any(name.startswith(f"{other}.") for other in flagged if other != name):
            continue
        kind = module._get_name()
        weight = getattr(module, "weight", None)
        if type(weight).__module__.startswith("torchao"):
            found[kind] = (
                f"torchao {type(weight).__name__} weights: peft cannot merge adapters into them without the "
                "quantization recipe, and unmerged adapters over them are not verified here; apply lora_recovery "
                "before weight_only_int8"
            )
        else:
            found[kind] = _why_not(kind)
    return [f"{kind} ({why})" for kind, why in sorted(found.items())]


def _has_adapters(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


class _AdaptersOnly(nn.Module):
    """fit_to_teacher's student: calls the wrapped model, but its state_dict holds only the adapter parameters.

    fit snapshots and restores its best weights through state_dict; a quantized base cannot round-trip its packed
    state that way (bitsandbytes' CPU layout), and the frozen base never changes anyway."""

    def __init__(self, model: nn.Module, adapters: list[nn.Parameter]) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", model)  # not registered: its state stays out of state_dict
        self.adapters = nn.ParameterList(adapters)

    def forward(self, *inputs: Any) -> Any:
        return self.wrapped(*inputs)

    def train(self, mode: bool = True) -> _AdaptersOnly:
        super().train(mode)
        self.wrapped.train(mode)
        return self


def _targets(
    model: nn.Module, include_head: bool, example_inputs: tuple[Any, ...] | None
) -> tuple[list[tuple[str, BaseKind]], list[str]]:
    """(name, base kind) of the layers to adapt, and the head layers skipped."""
    heads = [] if include_head else _layers.find_head_layers(model, example_inputs, kinds=(nn.Linear,))
    targets: list[tuple[str, BaseKind]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        kind = base_kind(module)
        if kind is None:
            continue
        if any(module is h for h in heads):
            skipped.append(name)
        elif name:
            targets.append((name, kind))
    return targets, skipped


class _PackingOff:
    """bitsandbytes 4-bit layers in their canonical layout, with the (autograd-less) fused CPU kernel disabled."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if _is_bnb_4bit(m) and hasattr(m, "support_avx512bf16_for_cpu")]
        self.flags = [m.support_avx512bf16_for_cpu for m in self.layers]

    def __enter__(self) -> _PackingOff:
        for m in self.layers:
            _hf_quant.restore_bnb_cpu_layout(m)
            m.support_avx512bf16_for_cpu = False
        return self

    def __exit__(self, *_exc: object) -> None:
        for m, flag in zip(self.layers, self.flags, strict=True):
            m.support_avx512bf16_for_cpu = flag
            # Params4bit.__deepcopy__ ignores its memo, so a deep-copied model's weights still point (`.module`) at
            # the source model's layers, and pickling the result would store both: point them back at their owner.
            if getattr(m.weight, "module", m) is not m:
                m.weight.module = m
            if hasattr(m, "quant_state"):  # the layer's copy of the state, left stale by the layout round trip
                m.quant_state = m.weight.quant_state


def _estimate_adapter_bytes(analysis: AnalysisReport, r: int) -> int:
    """Rule of thumb: per quantized layer type, layers of square weights holding the stored parameters (4-bit
    packing: two weights per stored byte), each adapter r * 2d fp32 weights."""
    total = 0
    for t in (*_SUPPORTED_QUANTIZED, *_HQQ_NAMES):
        layers = analysis.layer_census.get(t, 0)
        stored = analysis.params_by_layer_type.get(t, 0)
        if layers and stored:
            d = math.sqrt(2 * stored / layers)
            total += int(layers * 2 * r * d * 4)
    return total


@register_technique
class LoraRecovery(Technique):
    name = "lora_recovery"
    family = "recovery"
    description = (
        "LoRA adapters (peft) on the Linear layers learn to reproduce the run's original model; merged back into "
        "float models (same size), kept beside frozen bitsandbytes 4-bit / HQQ layers (QLoRA). Recovers accuracy."
    )
    config_cls = LoraRecoveryConfig
    # Planned only to close a chain (after pruning or low-rank): alone it gains nothing, and the planners know it.

    def availability(self) -> Availability:
        try:
            import peft  # noqa: F401
        except ImportError as e:
            return Availability(False, f"peft is not importable: {e}")
        return Availability(True, backend=f"peft {version('peft')} LoRA + robopt fit_to_teacher")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        reason = _layers.not_eager_reason(analysis) or _unsupported_reason(_layers.quantized_layer_types(analysis))
        if reason:
            return Applicability(False, reason)
        adaptable = _layers.linear_params(analysis) + sum(
            analysis.params_by_layer_type.get(t, 0) for t in (*_SUPPORTED_QUANTIZED, *_HQQ_NAMES)
        )
        if adaptable <= 0:
            return Applicability(False, "the model has no Linear layers to put adapters on")
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, LoraRecoveryConfig)
        added = _estimate_adapter_bytes(analysis, config.r)
        if not added:
            return Estimate(
                size_ratio=1.0,
                speedup=1.0,
                accuracy_risk="low",
                note="only recovers accuracy: the adapters are merged back, size and speed are unchanged",
            )
        return Estimate(
            size_ratio=1.0 + added / _layers.memory_bytes(analysis),
            speedup=_KEPT_ADAPTERS_SPEEDUP,
            accuracy_risk="low",
            note=(
                "only recovers accuracy; over quantized layers the adapters stay unmerged (re-quantizing a merge "
                f"erased most of the gain when measured): about {added / 1024:.0f} KiB of fp32 adapters (rule of "
                "thumb, square layers), and two rank-r matmuls per layer: measured on tiny-lm (nf4, 64 tokens, 1 "
                "thread) 12-15 ms -> 24 ms per call; larger layers pay relatively less. Latency is measured after."
            ),
        )

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, LoraRecoveryConfig)
        self._check_model(model)
        teacher_of = require_teacher(context, self.name)
        targets, skipped = _targets(model, config.include_head, context.example_inputs)
        if not targets:
            raise TechniqueNotApplicableError(
                "lora_recovery found no Linear layer to adapt"
                + (f" (skipped head: {', '.join(skipped)})" if skipped else ""),
                "set include_head=true or use finetune",
            )
        quantized = any(kind != "float" for _, kind in targets)
        samples, source = draw_samples(context, config.samples, self.name)
        train, check = split_check(samples, context.seed)
        modules = dict(model.named_modules())
        float_weights = [(f"{n}.weight", modules[n].weight) for n, kind in targets if kind == "float"]
        masks = sparsity_masks(float_weights) if config.keep_sparsity and not quantized else {}
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        with torch_threads(1):
            teacher = teacher_of()
            train_targets = teacher_targets(teacher, train, config.batch_size)
            check_targets = teacher_targets(teacher, check, config.batch_size)
            del teacher
            kind = loss_kind(train_targets, config.loss, context.analysis.architecture)
            # Before and after are measured with the kernels that will run the result (bitsandbytes' fused one).
            before = check_loss(model, check, check_targets, kind, config.temperature, config.batch_size)
            with _PackingOff(model):
                peft_model = self._wrap(model, sorted(n for n, _ in targets), config, context.seed)
                adapters = [p for p in peft_model.parameters() if p.requires_grad]
                with after_each_step(adapters, step_reporter(context.progress, self.name, config.steps)):
                    result = fit_to_teacher(
                        _AdaptersOnly(peft_model, adapters),
                        train,
                        train_targets,
                        budget=TrainBudget(steps=config.steps, seconds=config.seconds),
                        loss=kind,
                        architecture=context.analysis.architecture,
                        temperature=config.temperature,
                        lr=config.lr,
                        batch_size=config.batch_size,
                        params=adapters,
                        progress=context.progress,
                        stage=self.name,
                        seed=context.seed,
                    )
                out = self._finish(peft_model, adapters, merge=not quantized)
            for n, p in out.named_parameters():
                p.requires_grad_(flags.get(n, False))
            params = dict(out.named_parameters())
            apply_masks(params, masks)
            after = check_loss(out, check, check_targets, kind, config.temperature, config.batch_size)
        adapter_params = sum(p.numel() for p in adapters)
        require_improvement(
            before,
            after,
            self.name,
            "use finetune (keeps pruned zeros while it trains) or keep_sparsity=false"
            if masks
            else "lower lr or raise steps/samples",
        )
        if masks and not zeros_kept(params, masks):
            raise TechniqueFailedError("pruned weights grew back after the merge", "report this as a robopt bug")
        mode = "adapters kept over the quantized layers" if quantized else "merged into the float weights"
        details = {
            **recovery_details(before, after, kind, len(check), source),
            "mode": mode,
            "r": config.r,
            "alpha": config.alpha,
            "layers_adapted": len(targets),
            "base_layers": sorted({k for _, k in targets}),
            "layers_skipped": skipped,
            "adapter_params": adapter_params,
            "adapter_bytes_kept": adapter_params * 4 if quantized else 0,
            "train_samples": len(train),
            "sparse_weights_kept": sorted(masks),
            "fit": result.as_dict(),
        }
        return TechniqueResult(
            model=out,
            backend=self.availability().backend,
            notes=(
                f"rank-{config.r} adapters on {len(targets)} layers, {result.steps} steps ({result.stopped_by} "
                f"budget), {mode}; held-out distillation loss {before:.4g} -> {after:.4g}"
            ),
            details=details,
        )

    @staticmethod
    def _wrap(model: nn.Module, names: list[str], config: LoraRecoveryConfig, seed: int) -> nn.Module:
        """peft's LoRA layers around the named layers (in place), their random init fixed by `seed`."""
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names, bias="none"
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft recognises HQQ layers by the exact class name HQQLinear and warns about robopt's subclass
            # CpuHQQLinear, then reads its in/out features and dispatches it to its HQQ LoRA layer all the same.
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            torch.manual_seed(seed)
            return get_peft_model(model, lora)

    @staticmethod
    def _finish(peft_model: nn.Module, adapters: list[nn.Parameter], merge: bool) -> nn.Module:
        """The plain model with the adapters merged in, or (quantized bases) the model with peft's lora layers kept
        around the frozen quantized ones, adapters frozen too; in eval mode either way."""
        if merge:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft warns about merging in general terms
                return peft_model.merge_and_unload().eval()  # type: ignore[operator]
        for p in adapters:
            p.requires_grad_(False)
        return peft_model.get_base_model().eval()  # type: ignore[operator]

    def _check_model(self, model: nn.Module) -> None:
        from robopt.tools.onnx_module import OnnxModule

        if isinstance(model, (torch.jit.ScriptModule, OnnxModule)):
            raise TechniqueNotApplicableError(
                f"lora_recovery needs an eager nn.Module, got {type(model).__name__}",
                "load the model from its PyTorch source (pickle, safetensors or HF folder)",
            )
        unsupported = _unsupported_layers(model)
        if unsupported:
            raise TechniqueNotApplicableError(
                f"lora_recovery cannot put adapters on these quantized layers: {'; '.join(unsupported)}",
                "apply lora_recovery (or finetune) before that quantization step",
            )
        if _has_adapters(model):
            raise TechniqueNotApplicableError(
                "the model already carries LoRA adapters (an earlier lora_recovery)",
                "run lora_recovery once per chain, or finetune a float model",
            )
