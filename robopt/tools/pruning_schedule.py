"""What the pruning techniques share: the teacher's outputs on the run's training inputs, held-out fidelity,
recovery fine-tuning between pruning rounds, and the loss gradients that gradient-based importances rank by.

Every pruning round is judged against a teacher (the run's original model, or the model as it was handed in):
the distillation loss on a held-out slice of the training inputs, before and after recovery. Recovery is
robopt.training.fit.fit_to_teacher on the rest of the slice.

Gradients for Taylor / Hessian (OBD) importance: at round one the student *is* the teacher, so the gradient of a
distillation loss against the teacher's own outputs is exactly zero and ranks nothing. Targets are therefore
sampled from the teacher's predictive distribution (a class per position from softmax(logits) for "kl" outputs,
the output plus unit-variance-scaled Gaussian noise for "mse" outputs) and gradients are taken per sample: their
mean square is the diagonal of the Fisher / Gauss-Newton matrix, which is the Hessian of the distillation loss at
the teacher (OBD's curvature), and their mean absolute value gives the expected first-order Taylor term.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.registry import ApplyContext
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

TEMPERATURE = 2.0  # softening of "kl" losses, as robopt.training.fit uses by default
GradientStat = Literal["abs", "square"]


@dataclass
class TeacherData:
    """Training inputs with the teacher's outputs, split into a part to train/rank on and a held-out part."""

    train: list[Sample]
    train_targets: list[torch.Tensor]
    held: list[Sample]
    held_targets: list[torch.Tensor]
    loss: LossKind
    architecture: str
    source: str
    fingerprint: str

    def describe(self) -> dict[str, Any]:
        return {
            "samples": len(self.train) + len(self.held),
            "held_out": len(self.held),
            "source": self.source,
            "fingerprint": self.fingerprint,
            "loss": self.loss,
        }


def teacher_model(model: nn.Module, context: ApplyContext) -> nn.Module:
    """The teacher: the run's original model when the context has one, else a copy of `model` as handed in (call
    this before changing `model`). Frozen and in eval mode."""
    teacher = context.teacher() if context.teacher is not None else copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _require_calibration(context: ApplyContext, purpose: str) -> None:
    if context.calibration is None:
        raise TechniqueNotApplicableError(
            f"{purpose} needs the run's training inputs, and none were given",
            "run it inside a robopt run (the evaluator supplies training-side inputs), pass --calibration FILE, "
            "or set recovery_steps=0 and a magnitude importance",
        )


def teacher_data(
    context: ApplyContext,
    teacher: nn.Module,
    *,
    samples: int,
    holdout: float,
    architecture: str,
    batch_size: int,
    purpose: str,
) -> TeacherData:
    """Draw `samples` training inputs from the context, compute the teacher's outputs once and hold out a share.

    Raises TechniqueNotApplicableError (saying `purpose`) when the context has no training inputs.
    """
    _require_calibration(context, purpose)
    assert context.calibration is not None
    calibration = context.calibration(samples)
    items = list(calibration.samples)
    if len(items) < 2:
        raise TechniqueNotApplicableError(
            f"{purpose} needs at least 2 training inputs, got {len(items)}", "give a larger calibration set"
        )
    targets = teacher_targets(teacher, items, batch_size)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(context.seed)).tolist()
    held = max(1, round(len(items) * holdout))
    held_idx, train_idx = order[:held], order[held:]
    return TeacherData(
        train=[items[i] for i in train_idx],
        train_targets=[targets[i] for i in train_idx],
        held=[items[i] for i in held_idx],
        held_targets=[targets[i] for i in held_idx],
        loss=choose_loss(targets[0], "auto", architecture),
        architecture=architecture,
        source=calibration.source,
        fingerprint=calibration.fingerprint,
    )


def training_data(
    model: nn.Module,
    context: ApplyContext,
    *,
    required_for: str | None,
    recovery: bool,
    samples: int,
    batch_size: int,
) -> tuple[TeacherData | None, str]:
    """The teacher data a pruning technique works with, and a note when recovery had to be skipped.

    `required_for`: what needs the data (e.g. "taylor importance"), None when nothing does; then data is drawn only
    for `recovery` and only when the context has training inputs; without them recovery is skipped and the note
    says so. Call before changing `model` (the teacher may be a copy of it).
    """
    if required_for is None and not (recovery and context.calibration is not None):
        return None, "recovery skipped: no training inputs (calibration) were given" if recovery else ""
    if required_for is not None:
        _require_calibration(context, required_for)  # before the teacher is loaded or copied
    teacher = teacher_model(model, context)
    data = teacher_data(
        context,
        teacher,
        samples=samples,
        holdout=0.1,
        architecture=context.analysis.architecture,
        batch_size=batch_size,
        purpose=required_for or "recovery fine-tuning",
    )
    return data, ""


def heldout_loss(model: nn.Module, data: TeacherData, batch_size: int = 64) -> float:
    """Mean distillation loss of `model` against the teacher on the held-out inputs (the fidelity of a round)."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(data.held), batch_size):
            chunk = data.held[start : start + batch_size]
            out = primary(model(*collate(chunk)))
            target = torch.cat(data.held_targets[start : start + batch_size])
            total += float(distillation_loss(out, target, data.loss, TEMPERATURE)) * len(chunk)
    model.train(was_training)
    value = total / len(data.held)
    if not math.isfinite(value):
        raise TechniqueFailedError(
            f"the pruned model's outputs are not finite (held-out loss {value})", "prune less (a lower ratio)"
        )
    return value


def recover(
    model: nn.Module,
    data: TeacherData,
    steps: int,
    *,
    lr: float,
    batch_size: int,
    progress: Progress,
    stage: str,
    seed: int,
) -> dict[str, Any]:
    """Fine-tune `model` in place towards the teacher for `steps` optimizer steps (fit_to_teacher keeps the best
    weights on its own validation slice of the training part); returns what the fit did, without its history.

    Denormal floats are flushed to zero meanwhile: Adam's second moments of tiny gradients become denormal and make
    every optimizer step several times slower on x86 CPUs (measured: 150 steps of reacher-policy 11.6 s -> 4.3 s).
    """
    torch.set_flush_denormal(True)
    try:
        result = fit_to_teacher(
            model,
            data.train,
            data.train_targets,
            budget=TrainBudget(steps=steps),
            loss=data.loss,
            architecture=data.architecture,
            temperature=TEMPERATURE,
            lr=lr,
            batch_size=batch_size,
            progress=progress,
            stage=stage,
            seed=seed,
        )
    finally:
        torch.set_flush_denormal(False)
    summary = result.as_dict()
    summary.pop("history")
    return summary


def _sampled_target(output: torch.Tensor, kind: LossKind, scale: torch.Tensor, generator: torch.Generator) -> Any:
    if kind == "kl":
        probs = F.softmax(output.detach().float().reshape(-1, output.shape[-1]), -1)
        return torch.multinomial(probs, 1, generator=generator).reshape(-1)
    noise = torch.randn(output.shape, generator=generator) * scale
    return output.detach().float() + noise


def _sample_loss(output: torch.Tensor, target: Any, kind: LossKind) -> torch.Tensor:
    if kind == "kl":
        return F.cross_entropy(output.float().reshape(-1, output.shape[-1]), target)
    return 0.5 * F.mse_loss(output.float(), target, reduction="sum")


def per_sample_gradient_stat(
    model: nn.Module,
    data: TeacherData,
    *,
    samples: int,
    stat: GradientStat,
    progress: Progress,
    stage: str,
    seed: int,
) -> None:
    """Set every trainable parameter's `.grad` to the mean over `samples` training inputs of |g| ("abs") or g^2
    ("square"), g the per-sample gradient of the loss against targets sampled from the teacher (module docstring).

    torch-pruning's TaylorImportance then ranks by sum |w| E|g| and HessianImportance by sum w^2 E[g^2] (OBD).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TechniqueNotApplicableError("the model has no trainable parameters to take gradients of")
    picks = data.train[:samples]
    teacher_out = torch.cat(data.train_targets)
    scale = teacher_out.reshape(-1, teacher_out.shape[-1]).std(0).clamp_min(1e-6) if data.loss == "mse" else None
    generator = torch.Generator().manual_seed(seed)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    for sample in progress.track(picks, stage):
        output = primary(model(*sample))
        target = _sampled_target(output, data.loss, scale if scale is not None else torch.ones(()), generator)
        grads = torch.autograd.grad(_sample_loss(output, target, data.loss), params, allow_unused=True)
        for acc, g in zip(sums, grads, strict=True):
            if g is not None:
                acc.add_(g.abs() if stat == "abs" else g.square())
    model.train(was_training)
    for p, acc in zip(params, sums, strict=True):
        p.grad = (acc / len(picks)).to(p.dtype)


def clear_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def schedule(target: float, steps: int) -> list[float]:
    """The ratio reached after each of `steps` rounds: linear in the number of rounds (torch-pruning's
    linear_scheduler), ending exactly at `target`."""
    return [target * k / steps for k in range(1, steps + 1)]


def ensure_finite(model: nn.Module, inputs: Sequence[Any]) -> None:
    """Raise TechniqueFailedError if the model's primary output on `inputs` is not finite."""
    with torch.no_grad():
        out = primary(model(*inputs))
    if not torch.isfinite(out).all():
        raise TechniqueFailedError("the pruned model produces non-finite outputs", "prune less (a lower ratio)")
