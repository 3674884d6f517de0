"""Recovery fine-tuning: every float parameter of a small net is trained to reproduce the run's original model.

A compression step (pruning, low-rank, ...) costs accuracy; training the compressed model on the run's
training-side inputs (context.calibration) toward the original model's outputs (context.teacher) wins it back
without labels (robopt.training.fit.fit_to_teacher: KL on softened logits, MSE on continuous actions; the best
held-out weights are kept). It changes no size or speed; it only recovers accuracy.

Sparsity is kept: weights (2-D and up) that hold at least MIN_SPARSITY exact zeros are taken to be pruned, and
their zeros are written back after every optimizer step (a global optimizer step post-hook that fires only for
this training's optimizer), so recovery never undoes unstructured or 2:4 pruning. The same hook emits a progress
event per step (rate-limited by Progress) and honours cancellation.

Quantized models are not fine-tuned here (their weights are packed integers): lora_recovery trains adapters
over them. The helpers below (teacher, samples, held-out check, masks, step hook) are shared with lora_recovery.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

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
from robopt.training.fit import (
    LossKind,
    Sample,
    TrainBudget,
    choose_loss,
    collate,
    distillation_loss,
    fit_to_teacher,
    primary,
    teacher_targets,
)

MIN_SPARSITY = 0.01  # share of exact zeros that marks a weight as pruned (trained float weights have ~none)
MAX_PARAMS = 25_000_000  # full fine-tuning keeps two AdamW moments per weight; beyond this use lora_recovery
MIN_SAMPLES = 16
CHECK_SHARE = 0.1  # inputs kept out of training and model selection, to measure the recovery honestly
LossChoice = Literal["auto", "kl", "mse"]


class FinetuneConfig(TechniqueConfig):
    """Budget and optimizer of a full fine-tune toward the run's original model."""

    steps: int = Field(default=300, ge=1, le=100_000, description="Optimizer steps (the step budget).")
    seconds: float | None = Field(
        default=120.0, gt=0, description="Wall-time budget in seconds (None: steps only); whichever comes first."
    )
    lr: float = Field(default=1e-3, gt=0, le=1.0, description="AdamW learning rate.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Inputs per optimizer step.")
    samples: int = Field(
        default=512, ge=MIN_SAMPLES, le=100_000, description="Training-side inputs drawn from the run's data."
    )
    loss: LossChoice = Field(
        default="auto", description="kl: softened logits; mse: output values; auto: by output and architecture."
    )
    temperature: float = Field(default=2.0, gt=0, le=20, description="Softmax temperature of the KL loss.")
    keep_sparsity: bool = Field(default=True, description="Keep pruned (exactly zero) weights at zero.")


# -- shared with lora_recovery ------------------------------------------------------------------------------------


def require_teacher(context: ApplyContext, technique: str) -> Callable[[], nn.Module]:
    """The run's original model loader; outside a run there is none, and training toward itself teaches nothing."""
    if context.teacher is None:
        raise TechniqueNotApplicableError(
            f"{technique} trains the model to reproduce the run's original model, and there is none here (outside a "
            "run the model would learn its own outputs, which teaches it nothing)",
            "use it as a step after a compression step in a robopt run, or pass ApplyContext(teacher=...)",
        )
    return context.teacher


def draw_samples(context: ApplyContext, n: int, technique: str) -> tuple[list[Sample], str]:
    """`n` training-side inputs of the run (context.calibration) and where they came from."""
    if context.calibration is None:
        raise TechniqueNotApplicableError(
            f"{technique} trains on the run's inputs, and this run has no calibration data",
            "give the run an evaluator with training data (e.g. classification:digits, closed-loop:reacher, "
            "perplexity) or --calibration FILE",
        )
    calibration = context.calibration(n)
    samples = list(calibration.samples)
    if len(samples) < MIN_SAMPLES:
        raise TechniqueNotApplicableError(
            f"{technique} needs at least {MIN_SAMPLES} training inputs, the run's data gave {len(samples)}",
            "give more calibration data (--calibration FILE)",
        )
    return samples, calibration.source


def split_check(samples: Sequence[Sample], seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training inputs, check inputs): the check slice is used neither for training nor for model selection."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = max(2, round(len(samples) * CHECK_SHARE))
    return [samples[i] for i in order[held:]], [samples[i] for i in order[:held]]


def loss_kind(targets: Sequence[torch.Tensor], choice: LossChoice, architecture: str) -> LossKind:
    return choose_loss(targets[0], choice, architecture)


def check_loss(
    model: nn.Module,
    samples: Sequence[Sample],
    targets: Sequence[torch.Tensor],
    kind: LossKind,
    temperature: float,
    batch_size: int,
) -> float:
    """Mean distillation loss of `model` against the teacher's `targets` (eval mode, no gradients)."""
    from robopt.evaluation.classification import set_eval_mode

    set_eval_mode(model)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            out = primary(model(*collate(chunk)))
            target = torch.cat(list(targets[start : start + batch_size]))
            total += float(distillation_loss(out, target, kind, temperature)) * len(chunk)
    return total / len(samples)


def sparsity_masks(named_weights: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Keep-masks (True where the weight is not zero) of the float weights with >= MIN_SPARSITY exact zeros."""
    masks: dict[str, torch.Tensor] = {}
    for name, weight in named_weights:
        if weight.ndim < 2 or not weight.dtype.is_floating_point or weight.numel() == 0:
            continue
        keep = weight.detach() != 0
        if 1.0 - float(keep.float().mean()) >= MIN_SPARSITY:
            masks[name] = keep
    return masks


def apply_masks(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned positions again (in place)."""
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep)


def zeros_kept(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> bool:
    return all(bool((params[name][~keep] == 0).all()) for name, keep in masks.items())


@contextlib.contextmanager
def after_each_step(trained: Sequence[nn.Parameter], callback: Callable[[int], None]) -> Iterator[None]:
    """Call `callback(step)` right after every optimizer step that updates `trained` (fit_to_teacher builds its
    optimizer inside; torch's global step post-hook is filtered to the optimizer holding these parameters)."""
    mine = {id(p) for p in trained}
    steps = 0

    def hook(optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        nonlocal steps
        if any(id(p) in mine for group in optimizer.param_groups for p in group["params"]):
            steps += 1
            callback(steps)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def step_reporter(progress: Progress, stage: str, total: int) -> Callable[[int], None]:
    def report(step: int) -> None:
        progress.update(stage, step, total, f"step {step}/{total}")

    return report


def recovery_details(before: float, after: float, kind: LossKind, check: int, source: str) -> dict[str, Any]:
    return {
        "check_loss_before": before,
        "check_loss_after": after,
        "check_samples": check,
        "loss": kind,
        "calibration_source": source,
    }


def require_improvement(before: float, after: float, technique: str, hint: str) -> None:
    if not math.isfinite(after) or after > before:
        raise TechniqueFailedError(
            f"{technique} left the model further from the original on held-out inputs (distillation loss "
            f"{before:.4g} -> {after:.4g})",
            hint,
        )


# -- the technique -------------------------------------------------------------------------------------------------


def _float16_params(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dtype == torch.float16]


@register_technique
class Finetune(Technique):
    name = "finetune"
    family = "recovery"
    description = (
        "Full fine-tuning of a small net (every float parameter) to reproduce the run's original model on its "
        "training-side inputs; recovers accuracy lost by pruning or factorization, keeps pruned zeros at zero."
    )
    config_cls = FinetuneConfig
    # Planned only to close a chain (after pruning or low-rank): alone it gains nothing, and the planners know it.

    def availability(self) -> Availability:
        return Availability(True, backend=f"torch {torch.__version__} AdamW (robopt.training.fit)")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        reason = _layers.not_eager_reason(analysis)
        if reason:
            return Applicability(False, reason)
        quantized = _layers.quantized_layer_types(analysis)
        if quantized:
            return Applicability(
                False,
                f"the model is quantized (layers: {', '.join(quantized)}); its packed weights cannot be fine-tuned: "
                "use lora_recovery (adapters over the quantized layers)",
            )
        if analysis.param_count <= 0:
            return Applicability(False, "the model has no parameters to train")
        if analysis.param_count > MAX_PARAMS:
            return Applicability(
                False,
                f"full fine-tuning is for small nets (<= {MAX_PARAMS:,} parameters, this one has "
                f"{analysis.param_count:,}): use lora_recovery",
            )
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, FinetuneConfig)
        return Estimate(
            size_ratio=1.0,
            speedup=1.0,
            accuracy_risk="low",
            note=(
                "only recovers accuracy lost by an earlier step (size and speed are unchanged); it keeps the weights "
                f"that best reproduce the original on held-out inputs, within {config.steps} steps"
                + (f" or {config.seconds:g} s" if config.seconds else "")
            ),
        )

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, FinetuneConfig)
        quantized = _layers.quantized_modules(model)
        if quantized:
            raise TechniqueNotApplicableError(
                f"finetune trains float weights, but these layers are quantized: {', '.join(quantized[:5])}",
                "use lora_recovery, which trains adapters over quantized layers",
            )
        _layers.require_eager_float_module(model, self.name)
        half = _float16_params(model)
        if half:
            raise TechniqueNotApplicableError(
                f"finetune does not train float16 weights ({', '.join(half[:3])}): AdamW steps underflow in fp16",
                "fine-tune before cast_half",
            )
        teacher_of = require_teacher(context, self.name)
        samples, source = draw_samples(context, config.samples, self.name)
        train, check = split_check(samples, context.seed)
        params = dict(model.named_parameters())
        trained = [p for p in params.values() if p.dtype.is_floating_point]
        if not trained:
            raise TechniqueNotApplicableError("the model has no float parameters to train")
        masks = sparsity_masks(list(params.items())) if config.keep_sparsity else {}
        flags = {name: p.requires_grad for name, p in params.items()}
        with torch_threads(1):
            teacher = teacher_of()
            targets = teacher_targets(teacher, train, config.batch_size)
            check_targets = teacher_targets(teacher, check, config.batch_size)
            del teacher
            kind = loss_kind(targets, config.loss, context.analysis.architecture)
            before = check_loss(model, check, check_targets, kind, config.temperature, config.batch_size)
            report = step_reporter(context.progress, self.name, config.steps)

            def after_step(step: int) -> None:
                apply_masks(params, masks)
                report(step)

            try:
                for p in trained:
                    p.requires_grad_(True)
                with after_each_step(trained, after_step):
                    result = fit_to_teacher(
                        model,
                        train,
                        targets,
                        budget=TrainBudget(steps=config.steps, seconds=config.seconds),
                        loss=kind,
                        architecture=context.analysis.architecture,
                        temperature=config.temperature,
                        lr=config.lr,
                        batch_size=config.batch_size,
                        params=trained,
                        progress=context.progress,
                        stage=self.name,
                        seed=context.seed,
                    )
            finally:
                for name, p in params.items():
                    p.requires_grad_(flags[name])
            apply_masks(params, masks)  # a no-op after the hook; guards the weights fit restored
            after = check_loss(model, check, check_targets, kind, config.temperature, config.batch_size)
        require_improvement(before, after, self.name, "lower lr or raise steps/samples")
        if not zeros_kept(params, masks):
            raise TechniqueFailedError("finetune let pruned weights grow back", "report this as a robopt bug")
        pruned = sum(int((~keep).sum()) for keep in masks.values())
        details = {
            **recovery_details(before, after, kind, len(check), source),
            "trained_params": sum(p.numel() for p in trained),
            "train_samples": len(train),
            "sparse_weights_kept": sorted(masks),
            "pruned_zeros_kept": pruned,
            "fit": result.as_dict(),
        }
        return TechniqueResult(
            model=model.eval(),
            backend=self.availability().backend,
            notes=(
                f"{result.steps} steps ({result.stopped_by} budget) on {len(train)} inputs; held-out distillation "
                f"loss {before:.4g} -> {after:.4g}" + (f"; {pruned:,} pruned zeros kept" if masks else "")
            ),
            details=details,
        )
