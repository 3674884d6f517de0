"""Knowledge distillation into a student designed from the model: thinner, shallower, smaller kernels.

The student comes from robopt.training.students.design_student (the model thinned with torch-pruning, blocks
dropped, kernels resized) and learns the teacher's outputs with robopt.training.fit.fit_to_teacher: softened logits
(KL with temperature) for classifiers, actions (MSE) for control policies, optionally plus hidden-feature matching.

- Teacher: the run's original model (context.teacher()), else the model given (which is never modified).
- Data: the run's training-side inputs (context.calibration). Closed-loop policies (context.task set) also learn on
  the states of the teacher's own rollouts and, with DAgger rounds, on states the student visits itself, labelled by
  the teacher (robopt.training.dagger); all episodes use training seeds below 1000.
- Progressive stages: `stages` lists intermediate widths, e.g. stages=(0.5,) with width=0.25 runs 1.0 -> 0.5 ->
  0.25. Each stage's student is thinned from the previous stage's distilled student (so it starts from weights that
  already work at that width); it learns from the original teacher (stage_teacher="original", the default: its
  targets carry no assistant's error) or from the previous stage's student (stage_teacher="previous": the
  teacher-assistant chain of Mirzadeh et al. 2020). Depth and kernel changes happen in the first stage.
- Feature matching (feature_weight > 0): every hidden Linear/Conv the student kept is paired with the teacher's layer
  of the same name (students keep their teacher's layer names); forward hooks capture both outputs and a learned
  linear projection (student channels -> teacher channels) maps the student's features before an MSE normalised by
  the teacher features' mean square (FitNets, Romero et al. 2015).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
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
from robopt.tools.techniques import _layers
from robopt.tools.threads import torch_threads
from robopt.training.fit import Sample, TrainBudget, TrainResult, fit_to_teacher, teacher_targets
from robopt.training.students import WEIGHTED, StudentDesign, design_student, hidden_blocks

_SUPPORTED_FAMILIES = ("cnn", "mlp-policy", "unknown")
_TRANSFORMER_FAMILIES = ("transformer-encoder", "decoder-llm", "vision-language-action")
_MILDER_WIDTHS = (0.25, 0.375, 0.5, 0.75)
SMALL_NET_FLOPS = 5_000_000  # below this, per-operator overhead dominates CPU latency
ASSUMED_TEACHER_KERNEL = 3  # the census has no kernel sizes; the estimate assumes 3x3 convolutions


class DistillConfig(TechniqueConfig):
    """The student's shape, the distillation loss, the stages and the training budget per stage."""

    width: float = Field(default=0.5, gt=0.0, le=1.0, description="Share of channels/neurons the final student keeps.")
    depth: int | None = Field(
        default=None, ge=0, description="Hidden blocks the student keeps (None: the model's depth)."
    )
    kernel_size: int | None = Field(default=None, ge=1, description="Odd Conv2d kernel size (None: unchanged).")
    loss: Literal["auto", "kl", "mse"] = Field(
        default="auto", description="kl: softened logits; mse: values (actions); auto: by architecture."
    )
    temperature: float = Field(default=2.0, gt=0.0, description="Softmax temperature of the KL loss.")
    feature_weight: float = Field(default=0.0, ge=0.0, description="Weight of hidden-feature matching (0 disables it).")
    stages: tuple[float, ...] = Field(
        default=(), description="Intermediate widths before `width`, decreasing (e.g. [0.5] for 1 -> 0.5 -> width)."
    )
    stage_teacher: Literal["original", "previous"] = Field(
        default="original", description="What later stages learn from: the original teacher or the previous student."
    )
    steps: int = Field(default=600, ge=1, description="Optimizer steps per fit (per stage and per DAgger round).")
    seconds: float | None = Field(default=None, gt=0.0, description="Time budget per fit, in seconds.")
    lr: float = Field(default=3e-3, gt=0.0, description="AdamW learning rate.")
    batch_size: int = Field(default=64, ge=1, description="Samples per optimizer step.")
    samples: int = Field(default=1024, ge=1, description="Calibration (training-side) samples to distil on.")
    rollout_episodes: int = Field(
        default=40, ge=0, description="Closed loop: training episodes the teacher drives to collect states."
    )
    dagger_rounds: int = Field(default=2, ge=0, description="Closed loop: DAgger rounds after the first fit.")
    dagger_episodes: int = Field(default=20, ge=1, description="Closed loop: episodes the student drives per round.")

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.kernel_size is not None and self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (keeps the spatial shape), got {self.kernel_size}")
        # stages step down from the model's full width to `width`; width 1.0 itself (a student cut in depth or
        # kernel size only) is a real student
        chain = (1.0, *self.stages)
        if (
            any(not 0.0 < w <= 1.0 for w in self.stages)
            or any(a <= b for a, b in itertools.pairwise(chain))
            or any(w <= self.width for w in self.stages)
        ):
            raise ValueError(
                f"stages must be widths decreasing from below 1.0 to above width={self.width}, got {list(self.stages)}"
            )
        return self


def _availability() -> Availability:
    try:
        import torch_pruning  # noqa: F401
    except ImportError as e:
        return Availability(False, f"torch-pruning is not importable (students are designed with it): {e}")
    return Availability(True, backend=f"torch-pruning {version('torch-pruning')} student + robopt fit_to_teacher")


@register_technique
class Distill(Technique):
    name = "distill"
    family = "distillation"
    description = (
        "Knowledge distillation into a student designed from the model (thinner via torch-pruning, optionally "
        "shallower and with other kernel sizes): logits with temperature or actions, optional hidden-feature "
        "matching, progressive stages, and DAgger on the student's own rollouts for closed-loop policies."
    )
    config_cls = DistillConfig

    def availability(self) -> Availability:
        return _availability()

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        reason = _layers.not_eager_reason(analysis) or _layers.already_quantized_reason(analysis)
        if reason:
            return Applicability(False, reason)
        if analysis.architecture in _TRANSFORMER_FAMILIES:
            return Applicability(
                False, "students of transformers need config-aware (HF) redesign, which is not supported yet"
            )
        if analysis.architecture not in _SUPPORTED_FAMILIES:
            return Applicability(False, f"distillation supports cnn and mlp-policy models, not {analysis.architecture}")
        if _layers.linear_params(analysis) + _layers.conv_params(analysis) <= 0:
            return Applicability(False, "the model has no Linear or Conv layers to thin")
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, DistillConfig)
        return estimate_student(analysis, config)

    def stronger(self, config: TechniqueConfig) -> TechniqueConfig | None:
        """The next narrower width of the ladder (0.375, 0.25), for size targets the default cannot reach."""
        assert isinstance(config, DistillConfig)
        narrower = [w for w in reversed(_MILDER_WIDTHS) if w < config.width - 1e-9]
        if not narrower or config.stages:
            return None
        return config.model_copy(update={"width": narrower[0]})

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, DistillConfig)
        if config.depth is not None or config.kernel_size is not None:
            return config.model_copy(update={"depth": None, "kernel_size": None})
        wider = [w for w in _MILDER_WIDTHS if w > config.width + 1e-9]
        if not wider:
            return None
        return config.model_copy(update={"width": wider[0], "stages": tuple(s for s in config.stages if s > wider[0])})

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, DistillConfig)
        _layers.require_eager_float_module(model, self.name)
        calibration = context.calibration(config.samples) if context.calibration is not None else None
        samples: list[Sample] = list(calibration.samples) if calibration is not None else []
        if not samples and context.task is None:
            raise TechniqueNotApplicableError(
                "distillation trains the student on the run's inputs, and this run has no calibration data",
                "give the run an evaluator with training data (e.g. classification:digits) or --calibration FILE",
            )
        inputs = tuple(context.example_inputs) if context.example_inputs is not None else None
        if inputs is None and samples:
            inputs = samples[0]
        if inputs is None:
            raise TechniqueNotApplicableError(
                "the student is designed by tracing the model, which needs example inputs", "pass --input-shape"
            )
        teacher = context.teacher() if context.teacher is not None else model
        teacher_name = "the run's original model" if context.teacher is not None else "the given model"
        started = time.perf_counter()
        stages: list[dict[str, Any]] = []
        current, previous_width = model, 1.0
        with torch_threads(1):
            for index, width in enumerate((*config.stages, config.width)):
                stage_started = time.perf_counter()
                design = design_student(
                    current,
                    inputs,
                    width=width / previous_width,
                    depth=config.depth if index == 0 else None,
                    kernel_size=config.kernel_size if index == 0 else None,
                    seed=context.seed,
                )
                from_previous = index > 0 and config.stage_teacher == "previous"
                stage_teacher = current if from_previous else teacher
                record = {
                    "stage": index + 1,
                    "width": width,
                    "design": design.description,
                    "params": design.params,
                    "teacher": f"stage {index} student" if from_previous else teacher_name,
                }
                record |= _train_stage(design, stage_teacher, samples, inputs, config, context, f"stage {index + 1}")
                record["seconds"] = round(time.perf_counter() - stage_started, 3)
                stages.append(record)
                context.progress.message(self.name, f"stage {index + 1}: {design.params:,} parameters")
                current, previous_width = design.model, width
        student = current.eval()
        _check_outputs(student, teacher, inputs)
        params_before = _layers.count_params(model)
        params_after = _layers.count_params(student)
        details: dict[str, Any] = {
            "params_before": params_before,
            "params_after": params_after,
            "param_ratio": round(params_after / max(params_before, 1), 6),
            "teacher": teacher_name,
            "teacher_params": _layers.count_params(teacher),
            "stages": stages,
            "seconds": round(time.perf_counter() - started, 3),
        }
        if calibration is not None:
            details["data"] = {"samples": len(calibration), "source": calibration.source}
        if context.task is not None:
            details["task"] = context.task
        return TechniqueResult(
            model=student,
            backend=_availability().backend,
            notes=f"distilled from {teacher_name} into {params_after:,} parameters in {len(stages)} stage(s)",
            details=details,
        )


# -- training ------------------------------------------------------------------------------------------


def _train_stage(
    design: StudentDesign,
    teacher: nn.Module,
    samples: list[Sample],
    inputs: Sample,
    config: DistillConfig,
    context: ApplyContext,
    stage: str,
) -> dict[str, Any]:
    """Fit one stage's student: on the calibration inputs, or in closed loop with DAgger when the run has a task."""
    student = design.model
    architecture = context.analysis.architecture
    with FeatureMatcher(student, teacher, inputs, config.feature_weight, context.seed) as matcher:

        def fit(data: Sequence[Sample], targets: Sequence[torch.Tensor], name: str) -> TrainResult:
            return fit_to_teacher(
                student,
                data,
                targets,
                budget=TrainBudget(config.steps, config.seconds),
                loss=config.loss,
                architecture=architecture,
                temperature=config.temperature,
                lr=config.lr,
                batch_size=config.batch_size,
                params=[*student.parameters(), *matcher.parameters()],
                extra_loss=matcher.loss if matcher.pairs else None,
                progress=context.progress,
                stage=f"{stage} {name}",
                seed=context.seed,
            )

        record: dict[str, Any] = {"feature_pairs": matcher.describe()}
        if context.task is None:
            targets = teacher_targets(teacher, samples, max(config.batch_size, 256))
            result = fit(samples, targets, "distill")
            record |= {"data_size": len(samples), "holdout_loss": result.holdout_after, "fit": result.as_dict()}
            return record
        from robopt.robotics.task import make_task
        from robopt.training.dagger import DaggerPlan, distill_with_dagger

        # seed + 1: an episode order other than that of the calibration's expert episodes (which use the run seed)
        plan = DaggerPlan.spread(
            config.rollout_episodes, config.dagger_rounds, config.dagger_episodes, context.seed + 1
        )
        task = make_task(context.task)
        try:
            dagger = distill_with_dagger(
                student, teacher, task, plan, fit, extra_samples=samples, progress=context.progress
            )
        finally:
            task.close()
        last = dagger.rounds[-1]
        record |= {
            "data_size": last.data_size,
            "holdout_loss": last.fit.holdout_after,
            "calibration_states": len(samples),
            "rounds": [r.as_dict() for r in dagger.rounds],
        }
        return record


class FeatureMatcher:
    """Hidden-feature matching between a student and its teacher by layer name, as an extra loss for fit_to_teacher.

    A context manager: hooks are registered on entry and removed on exit. `loss(student, batch)` runs the teacher on
    the batch (no grad) and compares its captured features with the student's from the forward pass just made.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, inputs: Sample, weight: float, seed: int) -> None:
        self.student, self.teacher, self.weight = student, teacher, weight
        self.pairs: list[tuple[str, nn.Module, nn.Module, nn.Linear | None, int]] = []
        self._captured: dict[tuple[str, str], torch.Tensor] = {}
        self._handles: list[Any] = []
        if weight <= 0 or not inputs:
            return
        teacher_layers = dict(_layers.weighted_layers(teacher, WEIGHTED))
        heads = _layers.find_head_layers(student, inputs)
        shapes = _output_shapes(teacher, inputs, list(teacher_layers.values()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for block in hidden_blocks(student, inputs, heads):
                t_layer = teacher_layers.get(block.name)
                if t_layer is None or type(t_layer) is not type(block.layer) or id(t_layer) not in shapes:
                    continue
                t_shape, c = shapes[id(t_layer)], block.channel_dim
                if len(t_shape) != len(block.out_shape) or any(
                    a != b for i, (a, b) in enumerate(zip(t_shape, block.out_shape, strict=True)) if i != c
                ):
                    continue
                s_width, t_width = block.out_shape[c], t_shape[c]
                projection = nn.Linear(s_width, t_width, bias=False) if s_width != t_width else None
                self.pairs.append((block.name, block.layer, t_layer, projection, c))

    def __enter__(self) -> FeatureMatcher:
        for name, s_layer, t_layer, _, _ in self.pairs:
            self._handles.append(s_layer.register_forward_hook(self._capture(("student", name))))
            self._handles.append(t_layer.register_forward_hook(self._capture(("teacher", name))))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._captured.clear()

    def _capture(self, key: tuple[str, str]):
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self._captured[key] = output

        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [p for *_, proj, _ in self.pairs if proj is not None for p in proj.parameters()]

    def describe(self) -> list[str]:
        return [f"{name}{' (projected)' if proj is not None else ''}" for name, _, _, proj, _ in self.pairs]

    def loss(self, student: nn.Module, batch: Sample) -> torch.Tensor:
        with torch.no_grad():
            self.teacher(*batch)
        total = torch.zeros(())
        for name, _, _, projection, c in self.pairs:
            s = self._captured[("student", name)]
            t = self._captured[("teacher", name)].detach().float()
            if s.shape[0] != t.shape[0]:
                raise TechniqueFailedError("feature matching saw student and teacher features of different batches")
            s = s.float().movedim(c, -1)
            if projection is not None:
                s = projection(s)
            t = t.movedim(c, -1)
            total = total + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-8)
        return self.weight * total / max(len(self.pairs), 1)


def _output_shapes(model: nn.Module, inputs: Sample, layers: list[nn.Module]) -> dict[int, tuple[int, ...]]:
    shapes: dict[int, tuple[int, ...]] = {}

    def record(module: nn.Module, _args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            shapes.setdefault(id(module), tuple(output.shape))

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        with torch.no_grad():
            model.eval()
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _check_outputs(student: nn.Module, teacher: nn.Module, inputs: Sample) -> None:
    with torch.no_grad():
        got, want = _layers.output_shapes(student, inputs), _layers.output_shapes(teacher, inputs)
        finite = all(bool(torch.isfinite(t).all()) for t in _layers.flatten_tensors(student(*inputs)))
    if got != want:
        raise TechniqueFailedError(f"the student's output shapes {got} differ from the teacher's {want}")
    if not finite:
        raise TechniqueFailedError("the distilled student produces non-finite outputs", "lower lr")


# -- estimate ----------------------------------------------------------------------------------------


def estimate_student(analysis: AnalysisReport, config: DistillConfig) -> Estimate:
    """Rule of thumb from the layer census (see the note it returns)."""
    w = config.width
    weighted_layers = sum(analysis.layer_census.get(t, 0) for t in (*_layers.LINEAR_TYPES, *_layers.CONV_TYPES))
    linear, conv = _layers.linear_params(analysis), _layers.conv_params(analysis)
    total = max(analysis.param_count, 1)
    kernel_factor = 1.0
    if config.kernel_size is not None:
        kernel_factor = (config.kernel_size / ASSUMED_TEACHER_KERNEL) ** 2
    kept_layers = 1.0
    hidden = max(weighted_layers - 1, 0)
    if config.depth is not None and hidden > 0 and config.depth < hidden:
        kept_layers = (config.depth + 1) / weighted_layers
    weighted_after = (linear + conv * kernel_factor) * w * w * kept_layers
    ratio = min(1.0, max(total - linear - conv + weighted_after, 1.0) / total)
    overhead = 0.6 if (analysis.flops or 0) < SMALL_NET_FLOPS else 0.2
    speedup = 1.0 / (overhead + (1.0 - overhead) * ratio)
    risk = "medium" if w >= 0.5 and config.depth is None and config.kernel_size is None else "high"
    note = (
        f"rule of thumb: a layer thinned on both sides keeps width^2 = {w * w:.3f} of its weights (first and output "
        "layers keep more, so the student is somewhat larger)"
        + (
            f"; depth {config.depth} keeps about {kept_layers:.0%} of the {weighted_layers} Linear/Conv layers' "
            "weights (equal shares assumed)"
            if kept_layers < 1.0
            else ""
        )
        + (
            f"; kernel {config.kernel_size}x{config.kernel_size} scales conv weights by {kernel_factor:.2f} "
            f"(3x3 teachers assumed)"
            if config.kernel_size is not None
            else ""
        )
        + f". FLOPs scale like the weights; the speedup is damped by a {overhead:.0%} fixed per-operator share "
        "(small nets are overhead-bound on CPU), to be measured. The accuracy is recovered by training against "
        "the teacher within the step budget."
    )
    return Estimate(size_ratio=ratio, speedup=speedup, accuracy_risk=risk, note=note)
