"""Multi-objective architecture search over distillation students, resumable from optuna's own storage.

`search_students` asks an optuna sampler (NSGA-II by default, or multi-objective TPE; seeded) for student
configurations (robopt.search.space: width, depth, Conv2d kernel size), builds each with
robopt.training.students.design_student from the model, distils it briefly on the training inputs
(robopt.training.fit.fit_to_teacher) and scores it on objectives that are all minimised:

- metric: the normalised held-out distillation loss — the student's distillation loss against the teacher (KL of
  softened logits or MSE of values, as fit_to_teacher chooses) on a validation slice of the inputs that it neither
  trained on nor was selected on, divided by the loss of the best constant output there (the teacher's mean output:
  its variance for MSE, its mean distribution for KL). 0 means the student matches the teacher, 1 that it does no
  better than a constant. It needs no labels, so it works for classifiers and policies alike; task accuracy is not
  used because it would need each run's evaluator (and a closed-loop rollout per trial). For classifiers the top-1
  agreement with the teacher is recorded beside it.
- latency_ms: measured here, batch-1 forward, median (p50) of repeated timed calls after a warm-up, with torch at
  a fixed thread count (1 by default; robopt.evaluation.measure.measure_latency).
- params (unless size_objective=False): the parameter count. Small nets are overhead-bound on CPU (a digits CNN
  student with a tenth of the width runs as fast as the full one), so latency alone cannot tell small from large.

The Pareto set is optuna's `study.best_trials`. Trials live in a SQLite study under the data dir (see
robopt.search.storage), so a killed search resumes with its finished trials. The sampler is seeded with the seed and
the number of trials already stored, so a resumed search does not repeat the first draws; the first generation's
configurations are fixed by the seed, later ones depend on measured latencies as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from robopt.errors import CancelledError, RoboptError, TechniqueNotApplicableError
from robopt.evaluation.measure import LatencyStats, measure_latency
from robopt.progress import Progress
from robopt.search import storage as store
from robopt.search.space import ReachableSpace, SearchSpace, StudentConfig, reachable_space
from robopt.tools.threads import torch_threads
from robopt.training.fit import (
    Sample,
    TrainBudget,
    choose_loss,
    collate,
    distillation_loss,
    fit_to_teacher,
    primary,
    teacher_targets,
)
from robopt.training.students import design_student

STAGE = "architecture search"
METRIC = "normalised held-out distillation loss (student loss / loss of the best constant output; 0 = the teacher)"
SamplerName = Literal["nsga2", "tpe"]


class TrialTraining(BaseModel):
    """How each trial's student is distilled and scored (part of the study's identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=150, ge=1, description="Optimizer steps per trial.")
    seconds: float | None = Field(default=None, gt=0.0, description="Time limit per trial's training, seconds.")
    lr: float = Field(default=3e-3, gt=0.0, description="AdamW learning rate.")
    batch_size: int = Field(default=64, ge=1, description="Samples per optimizer step.")
    temperature: float = Field(default=2.0, gt=0.0, description="Softmax temperature of the KL loss.")
    loss: Literal["auto", "kl", "mse"] = Field(default="auto", description="Distillation loss (auto: by output).")
    validation: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Share of the inputs held out to score students (never trained on)."
    )


class LatencySettings(BaseModel):
    """How each student's latency is timed (robopt.evaluation.measure.measure_latency)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threads: int = Field(default=1, ge=1, description="torch threads while timing.")
    warmup: int = Field(default=10, ge=0, description="Untimed calls first.")
    min_iterations: int = Field(default=30, ge=1, description="Timed calls at least.")
    min_time_s: float = Field(default=0.2, ge=0.0, description="Timed seconds at least.")
    max_iterations: int = Field(default=2000, ge=1, description="Timed calls at most.")


@dataclass(frozen=True)
class SearchBudget:
    """When this call stops: when `n_trials` trials are finished in the study (earlier runs' included) or after
    `seconds` (checked between trials), whichever comes first."""

    n_trials: int = 20
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise TechniqueNotApplicableError(f"a search needs n_trials >= 1, got {self.n_trials}")
        if self.seconds is not None and self.seconds <= 0:
            raise TechniqueNotApplicableError(f"the search's seconds budget must be positive, got {self.seconds}")


@dataclass(frozen=True)
class StudentPoint:
    """One scored student configuration (a completed trial)."""

    trial: int
    config: StudentConfig
    params: int
    metric: float
    latency_ms: float
    latency_p95_ms: float
    agreement: float | None
    holdout_loss: float
    description: str

    def objectives(self, size_objective: bool) -> tuple[float, ...]:
        values = (self.metric, self.latency_ms)
        return (*values, float(self.params)) if size_objective else values

    def as_dict(self) -> dict[str, Any]:
        return {
            "trial": self.trial,
            **self.config.as_dict(),
            "params": self.params,
            "metric": round(self.metric, 6),
            "latency_ms": round(self.latency_ms, 5),
            "latency_p95_ms": round(self.latency_p95_ms, 5),
            "teacher_agreement": None if self.agreement is None else round(self.agreement, 4),
            "holdout_loss": round(self.holdout_loss, 6),
            "description": self.description,
        }


@dataclass
class SearchResult:
    """The Pareto set and what the search did. `resumed`: trials found finished in storage at the start;
    `run_now`: trials this call finished; `interrupted`: trials a killed process left running, retried."""

    pareto: list[StudentPoint]
    trials: list[StudentPoint]
    rejected: list[dict[str, Any]]
    objectives: tuple[str, ...]
    resumed: int
    run_now: int
    interrupted: list[int]
    n_trials: int
    stopped_by: Literal["trials", "time"]
    storage: Path
    study_name: str
    space: dict[str, Any]
    teacher_params: int
    model_params: int
    loss: str
    seconds: float
    sampler: str
    reachable: ReachableSpace
    timings: dict[str, float] = field(default_factory=dict)

    def design_kernel(self, point: StudentPoint) -> int | None:
        """The kernel_size that design_student (or the distill technique) needs to rebuild `point`'s student."""
        return self.reachable.design_kernel(point.config)

    @property
    def finished(self) -> int:
        return len(self.trials) + len(self.rejected)

    def as_dict(self) -> dict[str, Any]:
        return {
            "objectives": list(self.objectives),
            "metric": METRIC,
            "loss": self.loss,
            "pareto": [p.as_dict() for p in self.pareto],
            "trials_completed": len(self.trials),
            "trials_rejected": self.rejected,
            "trials_resumed": self.resumed,
            "trials_run_now": self.run_now,
            "trials_interrupted_and_retried": self.interrupted,
            "n_trials": self.n_trials,
            "stopped_by": self.stopped_by,
            "storage": str(self.storage),
            "study": self.study_name,
            "sampler": self.sampler,
            "space": self.space,
            "teacher_params": self.teacher_params,
            "model_params": self.model_params,
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


def choose_student(
    pareto: Sequence[StudentPoint], tolerance: float, *, smaller_than: int | None = None
) -> tuple[StudentPoint, bool]:
    """The rule: the best metric is the lowest on the Pareto set (a copy of the model, if the space holds one,
    counts); among the Pareto points with fewer than `smaller_than` parameters (the model's own size: a student
    as large as its model compresses nothing) whose metric is at most best + `tolerance` (an absolute margin on the
    normalised loss), the one with the fewest parameters, ties to the lower latency, then the lower metric.
    When none of the smaller points is that close, the smaller point with the lowest metric. Returns the point and
    whether it is within the tolerance."""
    if not pareto:
        raise TechniqueNotApplicableError("the search finished no trial, so there is no student to choose")
    if tolerance < 0:
        raise TechniqueNotApplicableError(f"tolerance must be >= 0, got {tolerance}")
    best = min(p.metric for p in pareto)
    smaller = [p for p in pareto if smaller_than is None or p.params < smaller_than]
    if not smaller:
        raise TechniqueNotApplicableError(
            f"no Pareto student has fewer than the model's {smaller_than:,} parameters",
            "lower max_width or min_depth, or run more trials",
        )
    close = [p for p in smaller if p.metric <= best + tolerance]
    if close:
        return min(close, key=lambda p: (p.params, p.latency_ms, p.metric)), True
    return min(smaller, key=lambda p: (p.metric, p.params, p.latency_ms)), False


def batch_one(inputs: Sample) -> Sample:
    """The first item of each input (latency is timed at batch 1)."""
    return tuple(t[:1] if isinstance(t, torch.Tensor) and t.ndim > 0 else t for t in inputs)


def student_latency(model: nn.Module, inputs: Sample, settings: LatencySettings, progress: Progress) -> LatencyStats:
    """Batch-1 forward latency of `model` on this machine (LatencyStats; p50 is the median)."""
    return measure_latency(
        model,
        batch_one(inputs),
        threads=settings.threads,
        warmup=settings.warmup,
        min_iterations=settings.min_iterations,
        min_time_s=settings.min_time_s,
        max_iterations=max(settings.max_iterations, settings.min_iterations),
        progress=progress,
    )


@dataclass
class _Scorer:
    """Scores students on the validation slice: normalised distillation loss and (logits) top-1 agreement."""

    samples: list[Sample]
    targets: list[torch.Tensor]
    kind: Literal["kl", "mse"]
    temperature: float
    batch_size: int = 256
    baseline: float = field(init=False)

    def __post_init__(self) -> None:
        teacher = torch.cat(self.targets)
        mean = teacher.mean(0, keepdim=True)
        if self.kind == "kl":
            p = torch.softmax(teacher / self.temperature, -1).mean(0, keepdim=True)
            mean = self.temperature * torch.log(p.clamp_min(1e-12))
        self.baseline = float(distillation_loss(mean.expand_as(teacher), teacher, self.kind, self.temperature))

    def score(self, student: nn.Module) -> tuple[float, float | None, float]:
        """(normalised loss, agreement or None, raw loss)."""
        total, agree, rows = 0.0, 0, 0
        student.eval()
        with torch.no_grad():
            for start in range(0, len(self.samples), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                out = primary(student(*collate(self.samples[chunk]))).float()
                want = torch.cat(self.targets[chunk])
                n = len(self.samples[chunk])
                total += float(distillation_loss(out, want, self.kind, self.temperature)) * n
                if self.kind == "kl":
                    agree += int((out.argmax(-1) == want.argmax(-1)).sum())
                    rows += want[..., 0].numel()
        raw = total / len(self.samples)
        normalised = raw / self.baseline if self.baseline > 1e-12 else raw
        return normalised, (agree / rows if rows else None), raw


def _split(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = min(max(1, round(n * share)), n - 2)
    return order[held:], order[:held]


def _sampler(name: SamplerName, population: int, seed: int) -> optuna.samplers.BaseSampler:
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=population, seed=seed)


def _point(trial: optuna.trial.FrozenTrial) -> StudentPoint:
    a = trial.user_attrs
    return StudentPoint(
        trial=trial.number,
        config=StudentConfig(a["width"], a["depth"], a["kernel_size"]),
        params=a["params"],
        metric=trial.values[0],
        latency_ms=trial.values[1],
        latency_p95_ms=a["latency_p95_ms"],
        agreement=a.get("teacher_agreement"),
        holdout_loss=a["holdout_loss"],
        description=a["description"],
    )


_SCORE_ATTRS = (
    "params",
    "description",
    "latency_p95_ms",
    "latency_iterations",
    "teacher_agreement",
    "validation_loss",
    "holdout_loss",
    "train_seconds",
)


def _same_config(study: optuna.Study, config: StudentConfig, number: int) -> optuna.trial.FrozenTrial | None:
    """The first finished trial (completed or rejected) with the same effective configuration, if any."""
    want = config.as_dict()
    for t in store.finished_trials(study):
        if t.number != number and all(t.user_attrs.get(k) == v for k, v in want.items()):
            return t
    return None


@dataclass
class _TrialRunner:
    """optuna's objective: design the trial's student, distil it briefly, score it, time it."""

    model: nn.Module
    inputs: Sample
    reachable: ReachableSpace
    scorer: _Scorer
    samples: list[Sample]
    targets: list[torch.Tensor]
    training: TrialTraining
    latency: LatencySettings
    architecture: str
    size_objective: bool
    seed: int
    progress: Progress

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        self.progress.check()
        config = self.reachable.suggest(trial)
        for key, value in config.as_dict().items():
            trial.set_user_attr(key, value)
        earlier = _same_config(trial.study, config, trial.number)
        if earlier is not None:  # training is deterministic: an equal configuration scores the same, so reuse it
            trial.set_user_attr("duplicate_of", earlier.number)
            if earlier.state == optuna.trial.TrialState.PRUNED:
                trial.set_user_attr("rejected", earlier.user_attrs.get("rejected", ""))
                raise optuna.TrialPruned(earlier.user_attrs.get("rejected", ""))
            for attr in _SCORE_ATTRS:
                trial.set_user_attr(attr, earlier.user_attrs.get(attr))
            return tuple(earlier.values)
        try:
            values = self._run(trial, config)
        except (CancelledError, KeyboardInterrupt):  # retried, with the same parameters, by the next call
            trial.study.enqueue_trial(dict(trial.params), user_attrs={store.RETRY_ATTR: trial.number})
            raise
        except RoboptError as e:  # a configuration this model cannot take, or a diverged fit: rejected, not fatal
            trial.set_user_attr("rejected", e.message)
            raise optuna.TrialPruned(e.message) from e
        return values

    def _run(self, trial: optuna.Trial, config: StudentConfig) -> tuple[float, ...]:
        t = self.training
        with torch_threads(1):
            design = design_student(
                self.model,
                self.inputs,
                width=config.width,
                depth=config.depth,
                kernel_size=self.reachable.design_kernel(config),
                seed=self.seed,
            )
            fit = fit_to_teacher(
                design.model,
                self.samples,
                self.targets,
                budget=TrainBudget(t.steps, t.seconds),
                loss=self.scorer.kind,
                architecture=self.architecture,
                temperature=t.temperature,
                lr=t.lr,
                batch_size=t.batch_size,
                progress=self.progress,
                stage=f"search trial {trial.number}",
                seed=self.seed,
            )
            metric, agreement, raw = self.scorer.score(design.model)
        stats = student_latency(design.model, self.inputs, self.latency, self.progress)
        scores = {
            "params": design.params,
            "description": design.description,
            "latency_p95_ms": stats.p95_ms,
            "latency_iterations": stats.iterations,
            "teacher_agreement": agreement,
            "validation_loss": raw,
            "holdout_loss": fit.holdout_after,
            "train_seconds": fit.seconds,
        }
        for attr, value in scores.items():
            trial.set_user_attr(attr, value)
        values = (metric, stats.p50_ms)
        return (*values, float(design.params)) if self.size_objective else values


@dataclass
class _StudyOutcome:
    finished: list[optuna.trial.FrozenTrial]
    pareto_numbers: set[int]
    resumed: int
    interrupted: list[int]


def _run_study(
    path: Path,
    name: str,
    objectives: tuple[str, ...],
    runner: _TrialRunner,
    budget: SearchBudget,
    sampler_for: Callable[[int], optuna.samplers.BaseSampler],
    progress: Progress,
) -> _StudyOutcome:
    """Open (or create) the study, recover a killed run's trials, run the trials the budget still allows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with store.exclusive(path):  # before the storage is opened: two processes would race to create its tables
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # progress events report the trials (and cancellations)
        rdb = store.open_storage(path)
        try:
            study = optuna.create_study(
                storage=rdb, study_name=name, directions=["minimize"] * len(objectives), load_if_exists=True
            )
            study.set_user_attr("objectives", list(objectives))
            study.set_user_attr("metric", METRIC)
            interrupted = store.recover_interrupted(study, rdb)
            resumed = len(store.finished_trials(study))
            # seeded with the number of stored trials too: a resumed search does not draw the first configurations again
            study = optuna.load_study(study_name=name, storage=rdb, sampler=sampler_for(len(study.trials)))
            if resumed or interrupted:
                progress.message(
                    STAGE,
                    f"resuming {path.name}: {resumed} trial(s) finished earlier"
                    + (f", retrying interrupted trial(s) {interrupted}" if interrupted else ""),
                )

            def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                done = len(store.finished_trials(study))
                if trial.state == optuna.trial.TrialState.COMPLETE:
                    p = _point(trial)
                    message = (
                        f"trial {trial.number} {p.config.as_dict()}: metric {p.metric:.4f}, "
                        f"{p.latency_ms:.4f} ms, {p.params:,} params"
                    )
                else:
                    message = f"trial {trial.number} rejected: {trial.user_attrs.get('rejected', trial.state.name)}"
                progress.update(STAGE, done, budget.n_trials, message)

            remaining = budget.n_trials - resumed
            if remaining > 0:
                progress.update(STAGE, resumed, budget.n_trials, f"{remaining} trial(s) to run")
                study.optimize(runner, n_trials=remaining, timeout=budget.seconds, callbacks=[report])
            finished = store.finished_trials(study)
            complete = any(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
            pareto = {t.number for t in study.best_trials} if complete else set()
            return _StudyOutcome(finished, pareto, resumed, interrupted)
        finally:
            store.close_storage(rdb)
            optuna.logging.set_verbosity(verbosity)


def search_students(
    model: nn.Module,
    teacher: nn.Module,
    samples: Sequence[Sample],
    *,
    storage_dir: Path,
    example_inputs: Sample | None = None,
    space: SearchSpace | None = None,
    training: TrialTraining | None = None,
    latency: LatencySettings | None = None,
    budget: SearchBudget | None = None,
    architecture: str = "unknown",
    sampler: SamplerName = "nsga2",
    population: int = 8,
    size_objective: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
) -> SearchResult:
    """Search students designed from `model` that learn `teacher`'s outputs on `samples` (batch-1 input tuples);
    see the module docstring. Neither model is modified.

    Raises TechniqueNotApplicableError for too few samples or a space the model cannot reach, ResourceLimitError when
    another process runs the same search, CancelledError when `progress` is cancelled (the trial running then is
    retried by the next call).
    """
    space, training = space or SearchSpace(), training or TrialTraining()
    latency, budget, progress = latency or LatencySettings(), budget or SearchBudget(), progress or Progress()
    if sampler not in ("nsga2", "tpe"):
        raise TechniqueNotApplicableError(f"unknown sampler {sampler!r}", "use 'nsga2' or 'tpe'")
    if population < 2:
        raise TechniqueNotApplicableError(f"population must be >= 2, got {population}")
    samples = [tuple(s) for s in samples]
    if len(samples) < 10:
        raise TechniqueNotApplicableError(
            f"an architecture search needs at least 10 training samples, got {len(samples)}", "give more samples"
        )
    inputs = batch_one(tuple(example_inputs) if example_inputs is not None else samples[0])
    started = time.perf_counter()
    objectives = ("metric", "latency_ms", "params") if size_objective else ("metric", "latency_ms")
    with torch_threads(1):
        targets = teacher_targets(teacher, samples, 256)
        kind = choose_loss(targets[0], training.loss, architecture)
        train_idx, val_idx = _split(len(samples), training.validation, seed)
        scorer = _Scorer([samples[i] for i in val_idx], [targets[i] for i in val_idx], kind, training.temperature)
        reachable = reachable_space(model, inputs, space, seed, progress)
    probed = time.perf_counter()
    key = store.study_key(
        {
            "model": store.module_fingerprint(model),
            "teacher": store.module_fingerprint(teacher),
            "data": store.samples_fingerprint(samples),
            "inputs": [list(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in inputs],
            "space": space.model_dump(mode="json"),
            "training": training.model_dump(mode="json"),
            "latency": latency.model_dump(mode="json"),
            "architecture": architecture,
            "sampler": sampler,
            "population": population,
            "objectives": objectives,
            "seed": seed,
        }
    )
    path, name = store.storage_path(storage_dir, key), store.study_name(key)
    runner = _TrialRunner(
        model,
        inputs,
        reachable,
        scorer,
        [samples[i] for i in train_idx],
        [targets[i] for i in train_idx],
        training,
        latency,
        architecture,
        size_objective,
        seed,
        progress,
    )
    outcome = _run_study(
        path,
        name,
        objectives,
        runner,
        budget,
        lambda stored: _sampler(sampler, population, seed * 100_003 + stored),
        progress,
    )
    trials = sorted(
        (_point(t) for t in outcome.finished if t.state == optuna.trial.TrialState.COMPLETE), key=lambda p: p.trial
    )
    pareto: dict[StudentConfig, StudentPoint] = {}
    for p in trials:  # equal configurations (reused scores) appear once, as their first trial
        if p.trial in outcome.pareto_numbers:
            pareto.setdefault(p.config, p)
    from robopt.tools.techniques import _layers

    return SearchResult(
        pareto=list(pareto.values()),
        trials=trials,
        rejected=[
            {"trial": t.number, "params": dict(t.params), "reason": t.user_attrs.get("rejected", "")}
            for t in outcome.finished
            if t.state == optuna.trial.TrialState.PRUNED
        ],
        objectives=objectives,
        resumed=outcome.resumed,
        run_now=len(outcome.finished) - outcome.resumed,
        interrupted=outcome.interrupted,
        n_trials=budget.n_trials,
        stopped_by="trials" if len(outcome.finished) >= budget.n_trials else "time",
        storage=path,
        study_name=name,
        space=reachable.describe(),
        teacher_params=_layers.count_params(teacher),
        model_params=_layers.count_params(model),
        loss=kind,
        seconds=time.perf_counter() - started,
        sampler=f"{sampler} (population {population}, seed {seed})",
        reachable=reachable,
        timings={"setup_s": probed - started, "trials_s": time.perf_counter() - probed},
    )


__all__ = [
    "METRIC",
    "LatencySettings",
    "ReachableSpace",
    "SearchBudget",
    "SearchResult",
    "SearchSpace",
    "StudentPoint",
    "TrialTraining",
    "choose_student",
    "search_students",
    "student_latency",
]
