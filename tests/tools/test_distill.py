"""The "distill" technique on zoo models: digits-cnn to a quarter of its width (accuracy on the digits test split),
reacher-policy to a quarter of its width with DAgger (closed-loop success on evaluation seeds 1000+)."""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from robopt import zoo
from robopt.calibration import calibration_source
from robopt.domain.analysis import AnalysisReport
from robopt.errors import CancelledError, TechniqueNotApplicableError
from robopt.evaluation.datasets import digits_split
from robopt.progress import Progress
from robopt.robotics.reacher_task import ReacherTask
from robopt.tools.analysis import profile_module
from robopt.tools.registry import ApplyContext, TechniqueResult, get_technique, parse_config
from robopt.tools.techniques.distill import DistillConfig, FeatureMatcher
from robopt.tools.threads import torch_threads
from robopt.training.dagger import visited_states
from robopt.training.students import design_student

EVAL_SEEDS = range(1000, 1100)  # closed-loop evaluation seeds: never used for training


def analysis_of(model: nn.Module, example: tuple[torch.Tensor, ...]) -> AnalysisReport:
    profile = profile_module(model, example)
    return AnalysisReport(
        format="torch-module",
        source="test",
        param_count=profile.param_count,
        size_on_disk_bytes=profile.size_in_memory_bytes,
        size_in_memory_bytes=profile.size_in_memory_bytes,
        flops=profile.flops,
        layer_census=profile.layer_census,
        params_by_layer_type=profile.params_by_layer_type,
        architecture=profile.architecture,
    )


def distill(model: nn.Module, context: ApplyContext, **config) -> TechniqueResult:
    technique = get_technique("distill")
    return technique.apply(copy.deepcopy(model), parse_config(technique, config), context)


def roundtrip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# -- digits-cnn -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(data_dir, tmp_path_factory):
    weights, card = zoo.resolve("digits-cnn", data_dir / "zoo")
    model = zoo.load_card_model(weights, card).eval()
    example = (torch.zeros(1, 1, 8, 8),)
    calibration = calibration_source(card.evaluator, card.input_spec, tmp_path_factory.mktemp("calibration"), seed=0)
    context = ApplyContext(analysis=analysis_of(model, example), example_inputs=example, calibration=calibration)
    return model, context


def test_accuracy(model: nn.Module) -> float:
    _, _, x_test, y_test = digits_split()
    with torch.no_grad():
        return (model.eval()(x_test).argmax(-1) == y_test).float().mean().item()


test_accuracy.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def digits_quarter(digits) -> TechniqueResult:
    model, context = digits
    return distill(model, context, width=0.25)


def label_trained_baseline(like: nn.Module, images: list[torch.Tensor], config: DistillConfig) -> float:
    """The same student architecture, freshly initialised, trained on the same training images with their TRUE
    labels (no teacher) for the same steps, batch size and learning rate; its digits test accuracy."""
    x_train, y_train, _, _ = digits_split()
    row_of = {x_train[i].numpy().tobytes(): i for i in range(len(x_train))}
    rows = torch.tensor([row_of[image[0].numpy().tobytes()] for image in images])
    x, y = x_train[rows], y_train[rows]
    student = copy.deepcopy(like)
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(0)
        for module in student.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr)
        order = torch.Generator().manual_seed(0)
        student.train()
        for _ in range(config.steps):
            idx = torch.randint(len(x), (config.batch_size,), generator=order)
            optimizer.zero_grad()
            F.cross_entropy(student(x[idx]), y[idx]).backward()
            optimizer.step()
    return test_accuracy(student)


def test_digits_cnn_distilled_to_a_quarter_width_keeps_its_accuracy(digits, digits_quarter):
    teacher, context = digits
    result = digits_quarter
    teacher_acc, student_acc = test_accuracy(teacher), test_accuracy(result.model)
    params_before, params_after = result.details["params_before"], result.details["params_after"]
    assert params_after == 9_242 and params_before == 138_698  # 15x fewer parameters
    # the undistilled student (the teacher thinned to 25%) is badly broken; distillation brings it back
    thinned = design_student(teacher, context.example_inputs, width=0.25).model
    thinned_acc = test_accuracy(thinned)
    config = DistillConfig()
    images = [sample[0] for sample in context.calibration(config.samples).samples]
    baseline_acc = label_trained_baseline(thinned, images, config)
    print(
        f"digits test accuracy: teacher {teacher_acc:.4f}, thinned {thinned_acc:.4f}, "
        f"distilled {student_acc:.4f}, label-trained student {baseline_acc:.4f}"
    )
    assert student_acc >= teacher_acc - 0.03
    assert student_acc >= thinned_acc + 0.4
    # distillation never sees a label, yet lands within noise (450 test images) of the same architecture trained on
    # the true labels of the same images for the same budget
    assert student_acc >= baseline_acc - 0.02
    stage = result.details["stages"][0]
    assert stage["fit"]["holdout_loss_before"] > 10 * stage["holdout_loss"]
    assert stage["data_size"] == result.details["data"]["samples"] == config.samples
    assert "digits train split" in result.details["data"]["source"]
    assert result.details["teacher"] == "the given model"
    # the estimate's rule of thumb is close to what the design gives
    estimate = get_technique("distill").estimate(context.analysis, DistillConfig(width=0.25))
    assert estimate.size_ratio == pytest.approx(params_after / params_before, rel=0.15)
    assert estimate.accuracy_risk == "high"
    x_test = digits_split()[2]
    with torch.no_grad():
        assert torch.equal(roundtrip(result.model)(x_test), result.model(x_test))


def test_progressive_stages_with_feature_matching_from_the_runs_original(digits):
    teacher, context = digits
    calls: list[int] = []

    def original() -> nn.Module:
        calls.append(1)
        return copy.deepcopy(teacher)

    staged = ApplyContext(
        analysis=context.analysis,
        example_inputs=context.example_inputs,
        calibration=context.calibration,
        teacher=original,
    )
    result = distill(teacher, staged, width=0.25, stages=(0.5,), feature_weight=1.0, steps=200)
    first, second = result.details["stages"]
    assert (first["width"], first["params"]) == (0.5, 35_434)
    assert (second["width"], second["params"]) == (0.25, 9_242)
    assert first["teacher"] == second["teacher"] == "the run's original model" and calls == [1]
    # hidden layers are paired by name, through learned projections since the widths differ
    assert first["feature_pairs"] == ["features.0 (projected)", "features.2 (projected)", "classifier.1 (projected)"]
    assert all(s["holdout_loss"] < s["fit"]["holdout_loss_before"] for s in (first, second))
    assert test_accuracy(result.model) >= test_accuracy(teacher) - 0.03


def test_feature_matching_is_zero_for_an_identical_student_and_trains_its_projection(digits):
    teacher, context = digits
    batch = (digits_split()[0][:16],)
    same = copy.deepcopy(teacher)
    with FeatureMatcher(same, teacher, context.example_inputs, 1.0, seed=0) as matcher:
        same(*batch)
        assert [p[0] for p in matcher.pairs] == ["features.0", "features.2", "classifier.1"]
        assert matcher.parameters() == []
        assert float(matcher.loss(same, batch)) == pytest.approx(0.0, abs=1e-10)
    thin = design_student(teacher, context.example_inputs, width=0.5).model.train()
    with FeatureMatcher(thin, teacher, context.example_inputs, 1.0, seed=0) as matcher:
        thin(*batch)
        loss = matcher.loss(thin, batch)
        loss.backward()
        assert float(loss) > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in matcher.parameters())
    assert not thin.features[0]._forward_hooks and not teacher.features[0]._forward_hooks  # hooks removed


def test_distillation_reports_progress_and_can_be_cancelled(digits):
    teacher, context = digits
    cancel = threading.Event()
    seen: list[dict] = []

    def emit(event: dict) -> None:
        seen.append(event)
        if "stage 1 distill" in str(event.get("stage")) and (event.get("current") or 0) >= 25:
            cancel.set()

    cancelled = ApplyContext(
        analysis=context.analysis,
        example_inputs=context.example_inputs,
        calibration=context.calibration,
        progress=Progress(emit=emit, cancel=cancel, min_interval_s=0.0),
    )
    with pytest.raises(CancelledError):
        distill(teacher, cancelled, width=0.5)
    assert any(e.get("stage") == "stage 1 distill" for e in seen)


def test_without_data_or_for_the_wrong_models_it_refuses_with_a_hint(digits):
    teacher, context = digits
    technique = get_technique("distill")
    bare = ApplyContext(analysis=context.analysis, example_inputs=context.example_inputs)
    with pytest.raises(TechniqueNotApplicableError, match="no calibration data") as err:
        technique.apply(copy.deepcopy(teacher), DistillConfig(), bare)
    assert err.value.hint
    assert technique.applicable(context.analysis).applicable
    for update in ({"architecture": "decoder-llm"}, {"format": "onnx"}, {"layer_census": {"QuantizedLinear": 2}}):
        assert not technique.applicable(context.analysis.model_copy(update=update)).applicable
    for bad in ({"kernel_size": 4}, {"stages": [0.25], "width": 0.5}, {"stages": [1.0]}, {"width": 0.0}):
        with pytest.raises(ValidationError):
            parse_config(technique, bad)
    config = parse_config(technique, {"width": 0.25, "depth": 1, "stages": [0.5]})
    assert parse_config(technique, config.model_dump(mode="json")) == config  # JSON round trip
    milder = technique.milder(config)
    assert milder.depth is None and milder.width == 0.25
    assert technique.milder(milder).width == 0.375 and technique.milder(milder).stages == (0.5,)
    assert technique.milder(DistillConfig(width=0.75)) is None


# -- reacher-policy: action-space distillation in closed loop with DAgger --------------------------------------


@pytest.fixture(scope="module")
def reacher(data_dir, tmp_path_factory):
    weights, card = zoo.resolve("reacher-policy", data_dir / "zoo")
    model = zoo.load_card_model(weights, card).eval()
    example = (torch.zeros(1, 10),)
    calibration = calibration_source(card.evaluator, card.input_spec, tmp_path_factory.mktemp("calibration"), seed=0)
    context = ApplyContext(
        analysis=analysis_of(model, example), example_inputs=example, calibration=calibration, task="reacher"
    )
    return model, context


@pytest.fixture(scope="module")
def reacher_task():
    task = ReacherTask()
    yield task
    task.close()


def drive(task: ReacherTask, model: nn.Module, teacher: nn.Module) -> tuple[float, float]:
    """The model's success rate on the evaluation seeds, and its mean squared action difference to the teacher on
    the states it visits there itself."""
    states, success = visited_states(task, model, EVAL_SEEDS, Progress(), "evaluation")
    x = torch.cat([s[0] for s in states])
    with torch.no_grad():
        return success, float(F.mse_loss(model(x), teacher(x)))


def test_reacher_policy_distilled_with_dagger_drives_like_its_teacher(reacher, reacher_task):
    teacher, context = reacher
    config = DistillConfig(width=0.25)
    result = distill(teacher, context, width=0.25)
    assert result.details["params_after"] == 4_994 and result.details["params_before"] == 69_122  # 13.8x fewer
    teacher_success, _ = drive(reacher_task, teacher, teacher)
    success, error = drive(reacher_task, result.model, teacher)
    print(
        f"reacher, {len(EVAL_SEEDS)} evaluation episodes: teacher {teacher_success:.2f}, student {success:.2f} "
        f"(action MSE on its own states {error:.5f})"
    )
    assert success >= teacher_success - 0.05
    rounds = result.details["stages"][0]["rounds"]
    assert [r["driver"] for r in rounds] == ["teacher", "student", "student"]
    first = rounds[0]
    assert first["episodes"] == config.rollout_episodes
    # the expert calibration states plus every tick of the teacher's episodes (reacher episodes last 50 ticks)
    assert first["data_size"] == config.samples + config.rollout_episodes * 50
    assert [r["data_size"] for r in rounds[1:]] == [
        first["data_size"] + k * config.dagger_episodes * 50 for k in (1, 2)
    ]
    assert all(r["fit"]["steps"] == config.steps for r in rounds)
    assert result.details["task"] == "reacher"
    x = torch.randn(64, 10)
    with torch.no_grad():
        assert torch.equal(roundtrip(result.model)(x), result.model(x))
    # deterministic: the same run gives the same student
    small = {"width": 0.25, "dagger_rounds": 1, "steps": 50, "rollout_episodes": 5, "dagger_episodes": 5}
    again, twice = distill(teacher, context, **small), distill(teacher, context, **small)
    with torch.no_grad():
        assert torch.equal(again.model(x), twice.model(x))


def test_dagger_beats_the_same_budget_on_the_teachers_states_alone(reacher, reacher_task):
    """The classic DAgger setting: few teacher episodes and no other data. With the same number of optimizer
    steps, the student refit on the states it visits itself errs less there and succeeds at least as often."""
    teacher, context = reacher
    alone = ApplyContext(analysis=context.analysis, example_inputs=context.example_inputs, task="reacher")
    config = {"width": 0.25, "rollout_episodes": 20, "steps": 400}
    dagger = distill(teacher, alone, **config, dagger_rounds=2)
    plain = distill(teacher, alone, **config | {"steps": 3 * 400}, dagger_rounds=0)
    assert "data" not in dagger.details  # no calibration set was used
    dagger_success, dagger_error = drive(reacher_task, dagger.model, teacher)
    plain_success, plain_error = drive(reacher_task, plain.model, teacher)
    print(
        f"reacher from 20 teacher episodes, {len(EVAL_SEEDS)} evaluation episodes: DAgger success {dagger_success:.2f}"
        f" (action MSE on its own states {dagger_error:.5f}), no DAgger {plain_success:.2f} ({plain_error:.5f})"
    )
    assert dagger_error < plain_error
    assert dagger_success >= plain_success
