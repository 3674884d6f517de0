"""Teacher -> student training on inputs alone: the loop behind distillation, recovery fine-tuning and pruning
recovery.

Every compression step in robopt has a teacher for free: the model before the step (or the user's original). So
training needs no labels: the student learns the teacher's outputs on the run's training-side inputs
(robopt.calibration: digits' train split, expert states on training seeds, training-corpus token windows, ...).

Losses: "kl" matches softened distributions (Hinton et al. 2015: KL(softmax(t/T) || softmax(s/T)) * T^2) over the
last dimension — logits of classifiers, language models and action-token VLAs; "mse" matches values — continuous
actions of control policies, embeddings. "auto" picks by output and architecture (choose_loss).

The loop keeps the weights that scored best on a held-out slice of the inputs (checked every `eval_every` steps),
so training never hands back a student worse than it started on data it did not train on; it stops at the step
or time budget and reports progress per step (cancellation honoured).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robopt.errors import TechniqueNotApplicableError
from robopt.progress import Progress

LossKind = Literal["kl", "mse"]
Sample = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class TrainBudget:
    """When training stops: after `steps` optimizer steps or `seconds` of wall time, whichever comes first."""

    steps: int = 300
    seconds: float | None = None


@dataclass
class TrainResult:
    """What a fit did: steps run, why it stopped, held-out loss before and after (best kept), loss history."""

    steps: int
    seconds: float
    stopped_by: Literal["steps", "time"]
    loss: LossKind
    holdout_before: float
    holdout_after: float
    best_step: int
    history: list[tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "stopped_by": self.stopped_by,
            "loss": self.loss,
            "holdout_loss_before": self.holdout_before,
            "holdout_loss_after": self.holdout_after,
            "best_step": self.best_step,
            "history": [[s, round(v, 6)] for s, v in self.history],
        }


@contextmanager
def all_trainable(model: nn.Module) -> Iterator[None]:
    """Let every float parameter require grad inside the block (tracing for torch-pruning, gradient importances,
    recovery), then freeze again the ones that were frozen. Pruning replaces Parameter objects, so they are found
    again by name."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(True)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)


def primary(output: Any) -> torch.Tensor:
    """The model's primary output tensor (logits of HF outputs, first element of tuples)."""
    from robopt.evaluation.classification import primary_output

    return primary_output(output)


def choose_loss(output: torch.Tensor, kind: Literal["auto", "kl", "mse"], architecture: str) -> LossKind:
    """ "auto": MSE for control policies (continuous actions) and outputs without a class dimension, KL for
    logits (classifiers, language models, action-token VLAs)."""
    if kind != "auto":
        return kind
    if architecture == "mlp-policy" or output.ndim < 2 or output.shape[-1] < 2:
        return "mse"
    if architecture in ("cnn", "decoder-llm", "vision-language-action"):
        return "kl"
    return "mse"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: LossKind, temperature: float) -> torch.Tensor:
    if student.shape != teacher.shape:
        raise TechniqueNotApplicableError(
            f"student output {tuple(student.shape)} differs from the teacher's {tuple(teacher.shape)}",
            "the student must produce the teacher's output shape",
        )
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    t = temperature
    s = student.float().reshape(-1, student.shape[-1]) / t
    q = teacher.float().reshape(-1, teacher.shape[-1]) / t
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(q, -1), log_target=True, reduction="batchmean") * t * t


def collate(samples: Sequence[Sample]) -> Sample:
    """Batch-1 samples (one tuple of tensors per model call) into one batch, concatenated along dim 0."""
    width = len(samples[0])
    if any(len(s) != width for s in samples):
        raise TechniqueNotApplicableError("training samples have different numbers of inputs")
    try:
        return tuple(torch.cat([s[i] for s in samples], 0) for i in range(width))
    except RuntimeError as e:
        raise TechniqueNotApplicableError(
            f"training samples cannot be batched (their shapes differ): {e}",
            "give inputs of one shape (e.g. fixed-length token windows)",
        ) from e


def teacher_targets(teacher: nn.Module, samples: Sequence[Sample], batch_size: int) -> list[torch.Tensor]:
    """The teacher's primary output for every sample (batch dimension 1 each), computed once."""
    from robopt.evaluation.classification import set_eval_mode

    set_eval_mode(teacher)
    targets: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            out = primary(teacher(*collate(chunk))).detach().float()
            targets.extend(out[i : i + 1] for i in range(len(chunk)))
    return targets


def _split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(n * holdout)) if n >= 8 else 0
    return order[held:], order[:held]


def _mean_loss(
    student: nn.Module,
    samples: Sequence[Sample],
    targets: Sequence[torch.Tensor],
    idx: list[int],
    kind: LossKind,
    temperature: float,
    batch_size: int,
) -> float:
    if not idx:
        return math.nan
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            out = primary(student(*collate([samples[i] for i in chunk])))
            total += float(distillation_loss(out, torch.cat([targets[i] for i in chunk]), kind, temperature)) * len(
                chunk
            )
    return total / len(idx)


def fit_to_teacher(
    student: nn.Module,
    samples: Sequence[Sample],
    targets: Sequence[torch.Tensor],
    *,
    budget: TrainBudget = TrainBudget(),
    loss: Literal["auto", "kl", "mse"] = "auto",
    architecture: str = "unknown",
    temperature: float = 2.0,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 32,
    holdout: float = 0.1,
    eval_every: int = 25,
    params: Sequence[nn.Parameter] | None = None,
    extra_loss: Callable[[nn.Module, Sample], torch.Tensor] | None = None,
    progress: Progress | None = None,
    stage: str = "training",
    seed: int = 0,
) -> TrainResult:
    """Train `student` (in place) to reproduce `targets` (the teacher's outputs on `samples`).

    `params`: what is trained (default: every parameter that requires grad). `extra_loss(student, batch)` is added
    to the distillation loss (feature matching, regularizers). The student ends with the weights that had the
    lowest held-out loss (the starting weights included) and in eval mode.
    """
    progress = progress or Progress()
    if not samples or len(samples) != len(targets):
        raise TechniqueNotApplicableError(
            f"training needs samples with one teacher target each, got {len(samples)} samples and {len(targets)} "
            "targets",
            "give the run calibration/training data",
        )
    trainable = list(params) if params is not None else [p for p in student.parameters() if p.requires_grad]
    if not trainable:
        raise TechniqueNotApplicableError("the student has no trainable parameters", "unfreeze some layers")
    train_idx, held_idx = _split(len(samples), holdout, seed)
    with torch.no_grad():
        student.eval()
        probe = primary(student(*collate([samples[0]])))
    kind = choose_loss(probe, loss, architecture)
    best_loss = _mean_loss(student, samples, targets, held_idx, kind, temperature, batch_size)
    before = best_loss
    best_state = copy.deepcopy(student.state_dict()) if held_idx else None
    best_step = 0
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history: list[tuple[int, float]] = []
    started = time.perf_counter()
    stopped_by: Literal["steps", "time"] = "steps"
    step = 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for step in range(1, budget.steps + 1):
            progress.check()
            student.train()
            pick = torch.randint(len(train_idx), (min(batch_size, len(train_idx)),), generator=generator).tolist()
            batch_ids = [train_idx[i] for i in pick]
            batch = collate([samples[i] for i in batch_ids])
            out = primary(student(*batch))
            value = distillation_loss(out, torch.cat([targets[i] for i in batch_ids]), kind, temperature)
            if extra_loss is not None:
                value = value + extra_loss(student, batch)
            if not torch.isfinite(value):
                raise TechniqueNotApplicableError(
                    f"training diverged at step {step} (loss {float(value.detach())})", "lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if step == 1 or step % eval_every == 0 or step == budget.steps:
                history.append((step, float(value.detach())))
                progress.update(stage, step, budget.steps, f"loss {float(value.detach()):.4g}")
                if held_idx:
                    student.eval()
                    current = _mean_loss(student, samples, targets, held_idx, kind, temperature, batch_size)
                    if current < best_loss:
                        best_loss, best_step = current, step
                        best_state = copy.deepcopy(student.state_dict())
            if budget.seconds is not None and time.perf_counter() - started > budget.seconds:
                stopped_by = "time"
                break
    if held_idx:
        student.eval()
        final = _mean_loss(student, samples, targets, held_idx, kind, temperature, batch_size)
        if final < best_loss:
            best_loss, best_step = final, step
        elif best_state is not None:
            student.load_state_dict(best_state)
    else:
        best_loss, best_step = float(value.detach()), step
    student.eval()
    return TrainResult(
        steps=step,
        seconds=time.perf_counter() - started,
        stopped_by=stopped_by,
        loss=kind,
        holdout_before=before,
        holdout_after=best_loss,
        best_step=best_step,
        history=history,
    )
