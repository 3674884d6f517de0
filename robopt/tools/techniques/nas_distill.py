"""Architecture search for a distillation student, then the chosen student distilled fully.

1. Search (robopt.search.search_students): optuna's seeded NSGA-II (or TPE) draws student configurations (width,
   depth, Conv2d kernel size) designed from the model; each is distilled briefly on the run's training inputs and
   scored on the normalised held-out distillation loss, its batch-1 latency measured here, and (by default) its
   parameter count. Trials learn from the calibration inputs only (closed-loop policies: the expert states; no
   rollouts), which keeps them cheap. The study lives in `<data_dir>/search/<key>.sqlite`, so a killed run resumes
   its search, and a rerun with the same model, data and space (e.g. a milder() retry) reuses every trial.
2. Choice, among the Pareto set: the fewest parameters among the points smaller than the model whose normalised
   loss is within `tolerance` (absolute) of the best point's; ties go to the lower latency; when no smaller point is
   that close, the smaller one with the lowest loss (robopt.search.choose_student; details say which).
3. Distillation: the chosen configuration goes to the `distill` technique (the same student design, from scratch,
   with `final_steps` per fit, and DAgger for closed-loop policies), whose result is returned.

The search's trial budget is visible as progress events ("architecture search", one per trial) and honours
cancellation. Slow (every trial trains a student), so it is planned only when named.
"""

from __future__ import annotations

import time
from importlib.metadata import version
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueNotApplicableError
from robopt.search import (
    LatencySettings,
    SearchBudget,
    SearchSpace,
    TrialTraining,
    choose_student,
    search_students,
)
from robopt.settings import get_settings
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
from robopt.tools.techniques.distill import Distill, DistillConfig, estimate_student


class NasDistillConfig(TechniqueConfig):
    """The search space and budget, the rule that picks the student, and the final distillation's budget."""

    min_width: float = Field(default=0.1, gt=0.0, le=1.0, description="Narrowest student width searched.")
    max_width: float = Field(default=1.0, gt=0.0, le=1.0, description="Widest student width searched.")
    width_step: float = Field(default=0.05, gt=0.0, le=1.0, description="Width grid step.")
    min_depth: int = Field(default=1, ge=0, description="Fewest hidden blocks searched (the most: the model's).")
    kernel_sizes: tuple[int, ...] = Field(default=(1, 3, 5), description="Odd Conv2d kernel sizes searched (CNNs).")
    n_trials: int = Field(default=16, ge=1, description="Trials the search finishes (resumed ones included).")
    search_seconds: float | None = Field(default=None, gt=0.0, description="Time limit of the search, in seconds.")
    trial_steps: int = Field(default=150, ge=1, description="Optimizer steps that briefly distil each trial.")
    sampler: Literal["nsga2", "tpe"] = Field(default="nsga2", description="optuna multi-objective sampler.")
    population: int = Field(default=8, ge=2, description="NSGA-II population (TPE: random start-up trials).")
    size_objective: bool = Field(
        default=True, description="Minimise the parameter count too (besides the loss and the measured latency)."
    )
    tolerance: float = Field(
        default=0.05,
        ge=0.0,
        description="Pick the smallest Pareto student whose normalised loss is within this "
        "(absolute) of the best one's.",
    )
    latency_threads: int = Field(default=1, ge=1, description="torch threads when timing each student.")
    final_steps: int = Field(default=600, ge=1, description="Optimizer steps of the chosen student's distillation.")
    final_seconds: float | None = Field(default=None, gt=0.0, description="Time limit per final fit, seconds.")
    lr: float = Field(default=3e-3, gt=0.0, description="AdamW learning rate (trials and the final distillation).")
    batch_size: int = Field(default=64, ge=1, description="Samples per optimizer step.")
    temperature: float = Field(default=2.0, gt=0.0, description="Softmax temperature of the KL loss.")
    loss: Literal["auto", "kl", "mse"] = Field(default="auto", description="Distillation loss (auto: by output).")
    samples: int = Field(default=1024, ge=10, description="Calibration (training-side) samples to search and distil.")
    rollout_episodes: int = Field(default=40, ge=0, description="Closed loop: teacher episodes of the final fit.")
    dagger_rounds: int = Field(default=2, ge=0, description="Closed loop: DAgger rounds of the final distillation.")
    dagger_episodes: int = Field(default=20, ge=1, description="Closed loop: student episodes per DAgger round.")

    @model_validator(mode="after")
    def _check(self) -> NasDistillConfig:
        self.space()  # raises ValueError (pydantic reports it) for an inconsistent space
        return self

    def space(self) -> SearchSpace:
        return SearchSpace(
            min_width=self.min_width,
            max_width=self.max_width,
            width_step=self.width_step,
            min_depth=self.min_depth,
            kernel_sizes=self.kernel_sizes,
        )


@register_technique
class NasDistill(Technique):
    name = "nas_distill"
    family = "distillation"
    description = (
        "Architecture search for a distillation student: optuna (NSGA-II/TPE, seeded, resumable from the data dir) "
        "tries widths, depths and kernel sizes designed from the model, each briefly distilled and scored on held-out "
        "loss, latency measured here and size; the smallest Pareto student near the best loss is then distilled fully."
    )
    config_cls = NasDistillConfig
    planned_by_default = False  # every trial trains a student: minutes, so only when asked for

    def availability(self) -> Availability:
        base = Distill().availability()
        if not base.available:
            return base
        return Availability(True, backend=f"optuna {version('optuna')} search + {base.backend}")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        return Distill().applicable(analysis)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, NasDistillConfig)
        middle = round((config.min_width + config.max_width) / 2, 6)
        guess = estimate_student(analysis, DistillConfig(width=middle))
        note = (
            f"which student the search picks is unknown before it runs; as a rule of thumb this assumes the middle "
            f"width {middle:g} of the searched range at the model's depth ({guess.note}). The search trains "
            f"{config.n_trials} students of {config.trial_steps} steps, then one of {config.final_steps}."
        )
        return Estimate(size_ratio=guess.size_ratio, speedup=guess.speedup, accuracy_risk="high", note=note)

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """Halve the tolerance (a more accurate, larger Pareto student; the search itself resumes from storage, so
        only the final distillation runs again); at zero, nothing milder is left."""
        assert isinstance(config, NasDistillConfig)
        if config.tolerance <= 1e-3:
            return None
        tolerance = config.tolerance / 2 if config.tolerance / 2 > 1e-3 else 0.0
        return config.model_copy(update={"tolerance": tolerance})

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, NasDistillConfig)
        _layers.require_eager_float_module(model, self.name)
        calibration = context.calibration(config.samples) if context.calibration is not None else None
        if calibration is None or not calibration.samples:
            raise TechniqueNotApplicableError(
                "the architecture search distils every trial's student on the run's inputs, and this run has no "
                "calibration data",
                "give the run an evaluator with training data (e.g. classification:digits) or --calibration FILE",
            )
        samples = list(calibration.samples)
        inputs = tuple(context.example_inputs) if context.example_inputs is not None else samples[0]
        teacher = context.teacher() if context.teacher is not None else model  # never modified
        teacher_name = "the run's original model" if context.teacher is not None else "the given model"
        storage_dir = get_settings().data_dir / "search"
        started = time.perf_counter()
        result = search_students(
            model,
            teacher,
            samples,
            storage_dir=storage_dir,
            example_inputs=inputs,
            space=config.space(),
            training=TrialTraining(
                steps=config.trial_steps,
                lr=config.lr,
                batch_size=config.batch_size,
                temperature=config.temperature,
                loss=config.loss,
            ),
            latency=LatencySettings(threads=config.latency_threads),
            budget=SearchBudget(config.n_trials, config.search_seconds),
            architecture=context.analysis.architecture,
            sampler=config.sampler,
            population=config.population,
            size_objective=config.size_objective,
            seed=context.seed,
            progress=context.progress,
        )
        search_seconds = time.perf_counter() - started
        chosen, within = choose_student(result.pareto, config.tolerance, smaller_than=_layers.count_params(model))
        context.progress.message(
            self.name,
            f"chose trial {chosen.trial} ({chosen.config.as_dict()}, {chosen.params:,} parameters) from "
            f"{len(result.pareto)} Pareto point(s); distilling it for {config.final_steps} steps",
        )
        final = {
            "width": chosen.config.width,
            "depth": chosen.config.depth,
            "kernel_size": result.design_kernel(chosen),
            "loss": config.loss,
            "temperature": config.temperature,
            "steps": config.final_steps,
            "seconds": config.final_seconds,
            "lr": config.lr,
            "batch_size": config.batch_size,
            "samples": config.samples,
            "rollout_episodes": config.rollout_episodes,
            "dagger_rounds": config.dagger_rounds,
            "dagger_episodes": config.dagger_episodes,
        }
        distill_config = DistillConfig(**final)
        distilled = Distill().apply(model, distill_config, context)
        details: dict[str, Any] = {
            **{k: v for k, v in distilled.details.items() if k in ("params_before", "params_after", "param_ratio")},
            "teacher": teacher_name,
            "search": result.as_dict(),
            "chosen": chosen.as_dict(),
            "chosen_design": {  # the design_student arguments that rebuild the chosen student's architecture
                "width": distill_config.width,
                "depth": distill_config.depth,
                "kernel_size": distill_config.kernel_size,
            },
            "choice_rule": (
                f"fewest parameters among the Pareto points smaller than the model whose normalised loss is at most "
                f"the best ({min(p.metric for p in result.pareto):.4f}) + tolerance {config.tolerance:g}; ties: lower "
                "latency; if none is that close, the smaller point with the lowest loss"
            ),
            "within_tolerance": within,
            "distillation": distilled.details,
            "seconds": {
                "search": round(search_seconds, 3),
                "distillation": round(time.perf_counter() - started - search_seconds, 3),
                "total": round(time.perf_counter() - started, 3),
            },
            "data": {"samples": len(calibration), "source": calibration.source},
        }
        return TechniqueResult(
            model=distilled.model,
            backend=self.availability().backend,
            notes=(
                f"searched {result.finished} student configuration(s) ({result.run_now} now, {result.resumed} resumed "
                f"from {result.storage.name}); chose width {chosen.config.width:g}, depth {chosen.config.depth}"
                + (f", kernel {chosen.config.kernel_size}" if chosen.config.kernel_size else "")
                + f" and distilled it into {distilled.details['params_after']:,} parameters"
            ),
            details=details,
        )
