"""Action-space distillation of closed-loop policies with DAgger: the student learns where it will actually go.

Plain distillation only shows the student states the teacher visits; once the student drifts off them it meets
states it never learned (covariate shift). DAgger (Ross et al. 2011) closes the loop: the student drives episodes,
the teacher labels every state the student visits, those states join the data set and the student is refit.

`distill_with_dagger` runs: the teacher drives `plan.teacher_seeds` episodes (its own rollouts, plus any extra
states given, e.g. the run's expert calibration states), the teacher labels them, the student is fit; then for
every DAgger round the student drives that round's seeds, the teacher labels the visited states, and the student is
refit on everything gathered so far. Episodes only use training seeds (below TRAINING_SEED_LIMIT); evaluation uses
the seeds from there on. robopt.zoo.bc_policy does the same for behaviour cloning from the scripted expert.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from robopt.calibration.samples import seeded_order
from robopt.calibration.zoo_data import TRAINING_SEED_LIMIT
from robopt.errors import EvaluationError, TechniqueFailedError, TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.robotics.rollout import model_policy, run_episodes
from robopt.robotics.task import ClosedLoopTask
from robopt.training.fit import Sample, TrainResult, teacher_targets

Fit = Callable[[Sequence[Sample], Sequence[torch.Tensor], str], TrainResult]
"""fit(samples, targets, stage) trains the student in place on the teacher's targets and says how it went."""


@dataclass(frozen=True)
class DaggerPlan:
    """Which training episodes are driven: the teacher's own, then one seed list per DAgger round (student)."""

    teacher_seeds: tuple[int, ...]
    round_seeds: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        seeds = [*self.teacher_seeds, *(s for r in self.round_seeds for s in r)]
        if not all(0 <= s < TRAINING_SEED_LIMIT for s in seeds):
            raise TechniqueNotApplicableError(
                f"DAgger episodes must use training seeds in [0, {TRAINING_SEED_LIMIT}); evaluation uses the rest",
                "pick fewer episodes",
            )

    @classmethod
    def spread(cls, teacher_episodes: int, rounds: int, episodes: int, seed: int) -> DaggerPlan:
        """Distinct training seeds in an order fixed by `seed`: the teacher's first, then each round's."""
        needed = teacher_episodes + rounds * episodes
        if needed > TRAINING_SEED_LIMIT:
            raise TechniqueNotApplicableError(
                f"{needed} training episodes asked for, but only {TRAINING_SEED_LIMIT} training seeds exist",
                "lower rollout_episodes, dagger_rounds or dagger_episodes",
            )
        order = seeded_order(TRAINING_SEED_LIMIT, seed)[:needed]
        rest = order[teacher_episodes:]
        return cls(
            teacher_seeds=tuple(order[:teacher_episodes]),
            round_seeds=tuple(tuple(rest[r * episodes : (r + 1) * episodes]) for r in range(rounds)),
        )


@dataclass
class RoundRecord:
    """One fit: who drove the episodes, how much data there was, how the driver did, what the fit achieved."""

    round: int
    driver: Literal["teacher", "student"]
    episodes: int
    new_states: int
    data_size: int
    driver_success: float | None
    fit: TrainResult
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "driver": self.driver,
            "episodes": self.episodes,
            "new_states": self.new_states,
            "data_size": self.data_size,
            "driver_success_on_training_episodes": self.driver_success,
            "holdout_loss": self.fit.holdout_after,
            "fit": self.fit.as_dict(),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class DaggerResult:
    rounds: list[RoundRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)


def visited_states(
    task: ClosedLoopTask, model: nn.Module, seeds: Sequence[int], progress: Progress, stage: str
) -> tuple[list[Sample], float]:
    """The model inputs at every tick while `model` drives the episodes of `seeds`, and its success rate there."""
    drive = model_policy(task, model)
    states: list[Sample] = []

    def recording(observation: object) -> np.ndarray:
        states.append(tuple(t.detach().clone() for t in task.model_inputs(observation)))
        return drive(observation)

    try:
        outcomes = run_episodes(task, recording, list(seeds), progress=progress, stage=stage)
    except EvaluationError as e:
        raise TechniqueFailedError(f"a {stage} rollout failed: {e.message}", e.hint) from e
    return states, float(np.mean([o.success for o in outcomes])) if outcomes else 0.0


def distill_with_dagger(
    student: nn.Module,
    teacher: nn.Module,
    task: ClosedLoopTask,
    plan: DaggerPlan,
    fit: Fit,
    *,
    extra_samples: Sequence[Sample] = (),
    batch_size: int = 256,
    progress: Progress | None = None,
) -> DaggerResult:
    """Fit `student` (in place) on teacher-labelled states of the teacher's rollouts, then refine with DAgger."""
    progress = progress or Progress()
    result = DaggerResult()
    started = time.perf_counter()
    states, rate = visited_states(task, teacher, plan.teacher_seeds, progress, "teacher rollouts")
    result.samples = [*extra_samples, *states]
    if not result.samples:
        raise TechniqueNotApplicableError(
            "no states to distil on: no teacher episodes and no calibration states", "give rollout episodes"
        )
    result.targets = teacher_targets(teacher, result.samples, batch_size)
    trained = fit(result.samples, result.targets, "distill")
    result.rounds.append(
        RoundRecord(
            0,
            "teacher",
            len(plan.teacher_seeds),
            len(result.samples),
            len(result.samples),
            rate if plan.teacher_seeds else None,
            trained,
            time.perf_counter() - started,
        )
    )
    for index, seeds in enumerate(plan.round_seeds, 1):
        started = time.perf_counter()
        states, rate = visited_states(task, student, seeds, progress, f"dagger round {index}")
        result.samples.extend(states)
        result.targets.extend(teacher_targets(teacher, states, batch_size))
        progress.message("dagger", f"round {index}: the student succeeded in {rate:.0%} of {len(seeds)} episodes")
        trained = fit(result.samples, result.targets, f"dagger round {index}")
        result.rounds.append(
            RoundRecord(
                index,
                "student",
                len(seeds),
                len(states),
                len(result.samples),
                rate,
                trained,
                time.perf_counter() - started,
            )
        )
    return result
