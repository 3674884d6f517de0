"""Architecture search over distillation students: Pareto set, measured latency, resume after SIGKILL, nas_distill."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from filelock import FileLock
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError
from torch import nn

from robopt import zoo
from robopt.calibration.base import CalibrationSet
from robopt.calibration.zoo_data import expert_state_samples
from robopt.errors import CancelledError, ResourceLimitError, TechniqueNotApplicableError
from robopt.evaluation.datasets import digits_split
from robopt.progress import Progress
from robopt.search import (
    SearchBudget,
    SearchSpace,
    StudentConfig,
    StudentPoint,
    TrialTraining,
    choose_student,
    search_students,
)
from robopt.search.student_search import LatencySettings, student_latency
from robopt.tools.registry import ApplyContext, get_technique, parse_config
from robopt.training.students import design_student
from tests.tools.test_techniques import analyze

REPO = Path(__file__).resolve().parents[2]
RESUME_TRIALS = 6


@pytest.fixture(scope="module")
def reacher(data_dir: Path) -> tuple[nn.Module, list[tuple[torch.Tensor, ...]]]:
    weights, card = zoo.resolve("reacher-policy", data_dir / "zoo")
    params = {"task": "reacher", "excluded_seeds": [1000, 1010], "states_per_episode": 8}
    samples, _ = expert_state_samples(params, 300, 0, None, Progress())
    return zoo.load_card_model(weights, card), samples


@pytest.fixture(scope="module")
def digits(data_dir: Path) -> nn.Module:
    weights, card = zoo.resolve("digits-cnn", data_dir / "zoo")
    return zoo.load_card_model(weights, card)


def reacher_search(model: nn.Module, samples, storage_dir: Path, n_trials: int, progress: Progress | None = None):
    """The search the kill/resume test runs twice (once in a subprocess that is killed, once here)."""
    return search_students(
        model,
        model,
        samples,
        storage_dir=storage_dir,
        training=TrialTraining(steps=80),
        latency=LatencySettings(min_time_s=0.05),
        budget=SearchBudget(n_trials),
        architecture="mlp-policy",
        population=4,
        seed=3,
        progress=progress,
    )


def run_search_from_file(path: str) -> None:
    """Subprocess entry point: the model and samples come from a torch.save file."""
    data = torch.load(path, weights_only=False)
    reacher_search(data["model"], data["samples"], Path(data["storage"]), data["n_trials"])


def _study_trials(storage_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """Every trial of the one study under `storage_dir`, read through optuna while another process may write it."""
    files = list(storage_dir.glob("*.sqlite"))
    if not files:
        return []
    storage = None
    try:
        # skip_table_creation: a reader must not race the search process in creating optuna's tables
        storage = optuna.storages.RDBStorage(f"sqlite:///{files[0]}", skip_table_creation=True)
        studies = storage.get_all_studies()
        if not studies:
            return []
        return storage.get_all_trials(storage.get_study_id_from_name(studies[0].study_name))
    except (RuntimeError, SQLAlchemyError):  # the file exists before optuna has created its tables
        return []
    finally:
        if storage is not None:
            storage.remove_session()
            storage.engine.dispose()


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def _kl(student: nn.Module, teacher: nn.Module, x: torch.Tensor, t: float = 2.0) -> float:
    with torch.no_grad():
        s, q = student.eval()(x) / t, teacher.eval()(x) / t
        return float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(q, -1), log_target=True, reduction="batchmean"))


# -- the technique on digits-cnn (one search, several checks) ----------------------------------------------------


@pytest.fixture(scope="module")
def nas_digits(digits: nn.Module):
    x_train = digits_split()[0]
    samples = tuple((x_train[i : i + 1],) for i in range(600))
    events: list[dict] = []
    context = ApplyContext(
        analysis=analyze(digits, "cnn"),
        example_inputs=(x_train[:1],),
        progress=Progress(emit=events.append),
        calibration=lambda n: CalibrationSet(samples[:n], "digits train split"),
    )
    technique = get_technique("nas_distill")
    config = parse_config(technique, {"n_trials": 8, "trial_steps": 60, "final_steps": 400, "samples": 600})
    started = time.perf_counter()
    result = technique.apply(digits, config, context)
    return result, events, time.perf_counter() - started


def test_pareto_set_is_non_dominated_and_covers_every_trial(nas_digits) -> None:
    result, events, _ = nas_digits
    search = result.details["search"]
    assert search["objectives"] == ["metric", "latency_ms", "params"]
    pareto = [(p["metric"], p["latency_ms"], float(p["params"])) for p in search["pareto"]]
    assert pareto
    for i, a in enumerate(pareto):
        for j, b in enumerate(pareto):
            assert i == j or not _dominates(a, b), (a, b)
    storage = Path(search["storage"])
    from robopt.settings import get_settings

    assert storage.parent == get_settings().data_dir / "search" and storage.is_file()
    study = optuna.load_study(study_name=search["study"], storage=f"sqlite:///{storage}")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) + len(search["trials_rejected"]) == 8 == search["trials_run_now"]
    # every completed trial is either a Pareto point (up to repeats of a configuration) or dominated by one
    exact = [tuple(t.values) for t in study.best_trials]
    for trial in complete:
        values = tuple(trial.values)
        assert values in exact or any(_dominates(p, values) for p in exact), values
    for trial in complete:  # latencies are real timings: positive, from many timed calls
        assert trial.values[1] > 0 and trial.user_attrs["latency_iterations"] >= 30
    configs = {(t.user_attrs["width"], t.user_attrs["depth"], t.user_attrs["kernel_size"]) for t in complete}
    assert len(configs) >= 4
    searched = [e for e in events if e.get("stage") == "architecture search" and e.get("total") == 8]
    assert [e["current"] for e in searched][-1] == 8


def test_nas_distill_returns_a_smaller_student_that_learned_the_teacher(nas_digits, digits: nn.Module) -> None:
    result, _, seconds = nas_digits
    details, chosen = result.details, result.details["chosen"]
    student = result.model
    teacher_params = sum(p.numel() for p in digits.parameters())
    params = sum(p.numel() for p in student.parameters())
    assert params == details["params_after"] == chosen["params"] < teacher_params
    # the chosen point is on the Pareto set and obeys the rule: fewest params within tolerance of the best metric
    pareto = details["search"]["pareto"]
    assert chosen in pareto
    best = min(p["metric"] for p in pareto)
    assert chosen["params"] == min(p["params"] for p in pareto if p["metric"] <= best + 0.05)
    # held-out (digits test split, never calibrated on): far closer to the teacher than the same design untrained
    x_test, y_test = digits_split()[2:]
    design = details["chosen_design"]
    assert (design["width"], design["depth"]) == (chosen["width"], chosen["depth"])
    untrained = design_student(digits, (x_test[:1],), **design).model
    assert sum(p.numel() for p in untrained.parameters()) == params
    trained_kl, untrained_kl = _kl(student, digits, x_test), _kl(untrained, digits, x_test)
    assert trained_kl < 0.2 * untrained_kl, (trained_kl, untrained_kl)
    with torch.no_grad():
        accuracy = float((student(x_test).argmax(-1) == y_test).float().mean())
        teacher_accuracy = float((digits(x_test).argmax(-1) == y_test).float().mean())
    assert accuracy >= teacher_accuracy - 0.05, (accuracy, teacher_accuracy)
    # survives the pipeline's storage: full pickle, identical outputs
    buffer = io.BytesIO()
    torch.save(student, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x_test), student(x_test))
    assert details["seconds"]["search"] > 0 and details["search"]["trials_run_now"] == 8
    print(
        f"nas_distill on digits-cnn: {seconds:.1f} s; {params:,}/{teacher_params:,} params; KL {trained_kl:.4f} vs "
        f"untrained {untrained_kl:.4f}; accuracy {accuracy:.3f} (teacher {teacher_accuracy:.3f})"
    )


def test_rerun_of_the_technique_reuses_the_stored_search(nas_digits, digits: nn.Module) -> None:
    """milder() only tightens the choice: the search is not run again, its trials come from storage."""
    result, _, _ = nas_digits
    technique = get_technique("nas_distill")
    config = parse_config(technique, {"n_trials": 8, "trial_steps": 60, "final_steps": 20, "samples": 600})
    milder = technique.milder(config)
    assert milder is not None and milder.tolerance == 0.025
    x_train = digits_split()[0]
    samples = tuple((x_train[i : i + 1],) for i in range(600))
    context = ApplyContext(
        analysis=analyze(digits, "cnn"),
        example_inputs=(x_train[:1],),
        calibration=lambda n: CalibrationSet(samples[:n], "digits train split"),
    )
    again = technique.apply(digits, milder, context)
    search = again.details["search"]
    assert search["trials_run_now"] == 0 and search["trials_resumed"] == 8
    assert search["pareto"] == result.details["search"]["pareto"]
    assert again.details["chosen"]["metric"] <= result.details["chosen"]["metric"]


# -- resume after SIGKILL, cancellation, locking ----------------------------------------------------------------


def test_killed_search_resumes_from_its_storage(reacher, tmp_path: Path) -> None:
    model, samples = reacher
    storage_dir = tmp_path / "search"
    job = tmp_path / "job.pt"
    torch.save({"model": model, "samples": samples, "storage": str(storage_dir), "n_trials": RESUME_TRIALS}, job)
    code = f"from tests.search.test_student_search import run_search_from_file; run_search_from_file({str(job)!r})"
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ
    )
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if sum(t.state == TrialState.COMPLETE for t in _study_trials(storage_dir)) >= 2:
                break
            time.sleep(0.1)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    before = {t.number: t for t in _study_trials(storage_dir) if t.state == TrialState.COMPLETE}
    running = [t.number for t in _study_trials(storage_dir) if t.state == TrialState.RUNNING]
    assert 2 <= len(before) < RESUME_TRIALS

    events: list[dict] = []
    result = reacher_search(model, samples, storage_dir, RESUME_TRIALS, Progress(emit=events.append))
    assert result.resumed == len(before)
    assert result.run_now == RESUME_TRIALS - len(before)
    assert result.finished == RESUME_TRIALS
    assert result.interrupted == running
    after = _study_trials(storage_dir)
    complete = {t.number: t for t in after if t.state == TrialState.COMPLETE}
    pruned = [t for t in after if t.state == TrialState.PRUNED]
    assert len(complete) + len(pruned) == RESUME_TRIALS
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number, trial in before.items():  # the trials finished before the kill were kept, not redone
        assert complete[number].values == trial.values
        assert complete[number].datetime_complete == trial.datetime_complete
    if running:  # the trial the kill interrupted was retried with its parameters
        failed = {t.number: t for t in after if t.state == TrialState.FAIL}
        assert set(failed) == set(running)
        retried = [t for t in after if t.user_attrs.get("retry_of") == running[0]]
        # with the parameters it had drawn (none when it was killed before drawing them)
        assert len(retried) == 1 and failed[running[0]].params.items() <= retried[0].params.items()
    assert any("resuming" in e.get("message", "") for e in events)
    # a complete study is not searched again
    again = reacher_search(model, samples, storage_dir, RESUME_TRIALS)
    assert again.run_now == 0 and again.resumed == RESUME_TRIALS and again.pareto == result.pareto


def test_cancelled_search_retries_its_trial_and_a_second_process_is_refused(reacher, tmp_path: Path) -> None:
    model, samples = reacher
    progress = Progress()

    def cancel_while_training_the_second_trial(event: dict) -> None:
        if event.get("stage") == "search trial 1":
            progress.cancel.set()

    progress.emit = cancel_while_training_the_second_trial
    args = {
        "storage_dir": tmp_path,
        "training": TrialTraining(steps=10),
        "latency": LatencySettings(min_time_s=0.02),
        "budget": SearchBudget(3),
        "population": 2,
    }
    with pytest.raises(CancelledError):
        search_students(model, model, samples, progress=progress, **args)
    result = search_students(model, model, samples, **args)
    assert result.resumed == 1 and result.run_now == 2 and result.finished == 3
    trials = _study_trials(tmp_path)
    cancelled = [t for t in trials if t.state == TrialState.FAIL]
    retried = [t for t in trials if t.user_attrs.get("retry_of") is not None]
    assert [t.number for t in cancelled] == [1] and len(retried) == 1  # the cancelled trial ran again, same config
    assert retried[0].user_attrs["retry_of"] == 1 and retried[0].params == cancelled[0].params
    assert retried[0].state == TrialState.COMPLETE
    with FileLock(str(result.storage) + ".lock"), pytest.raises(ResourceLimitError):
        search_students(model, model, samples, **args)
    # a time budget stops the search between trials, short of n_trials, and says so
    timed = search_students(
        model, model, samples, **{**args, "storage_dir": tmp_path / "timed", "budget": SearchBudget(50, seconds=0.5)}
    )
    assert timed.stopped_by == "time" and 1 <= timed.finished < 50 and timed.run_now == timed.finished


# -- latency, choice rule, errors -----------------------------------------------------------------------------


def test_latency_is_measured_and_grows_with_width() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 4))
    inputs = (torch.randn(1, 32),)
    settings = LatencySettings(min_time_s=0.2)
    latency = {}
    for width in (0.1, 1.0):
        student = design_student(teacher, inputs, width=width).model
        latency[width] = student_latency(student, inputs, settings, Progress()).p50_ms
    assert latency[0.1] > 0 and latency[1.0] > 3 * latency[0.1], latency


def _point(trial: int, metric: float, latency: float, params: int) -> StudentPoint:
    return StudentPoint(trial, StudentConfig(1.0, 1, None), params, metric, latency, latency, None, metric, "")


def test_choice_rule_takes_the_smallest_student_within_tolerance() -> None:
    pareto = [
        _point(0, 0.0, 0.2, 1000),
        _point(1, 0.04, 0.1, 300),
        _point(2, 0.04, 0.09, 300),
        _point(3, 0.3, 0.05, 50),
    ]
    assert choose_student(pareto, 0.05) == (pareto[2], True)  # 300 params, the faster of the two
    assert choose_student(pareto, 0.0) == (pareto[0], True)
    assert choose_student(pareto, 0.5) == (pareto[3], True)
    # a point as large as the model is no student: it sets the best metric but is never chosen
    assert choose_student(pareto, 0.01, smaller_than=1000) == (pareto[2], False)
    assert choose_student(pareto, 0.05, smaller_than=1000) == (pareto[2], True)
    with pytest.raises(TechniqueNotApplicableError, match="fewer than"):
        choose_student(pareto[:1], 0.05, smaller_than=1000)
    with pytest.raises(TechniqueNotApplicableError):
        choose_student([], 0.1)


def test_same_seed_gives_the_same_students_and_metrics(reacher, tmp_path: Path) -> None:
    model, samples = reacher
    runs = []
    for folder in ("a", "b"):
        result = search_students(
            model,
            model,
            samples,
            storage_dir=tmp_path / folder,
            training=TrialTraining(steps=20),
            latency=LatencySettings(min_time_s=0.02),
            budget=SearchBudget(3),
            population=3,
            seed=7,
        )
        runs.append([(p.config, p.params, p.metric) for p in result.trials])
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_bad_inputs_raise_typed_errors(reacher, tmp_path: Path) -> None:
    model, samples = reacher
    with pytest.raises(ValueError, match="width_step"):
        SearchSpace(min_width=0.1, max_width=0.5, width_step=0.15)
    with pytest.raises(TechniqueNotApplicableError, match="min_depth"):
        search_students(model, model, samples, storage_dir=tmp_path, space=SearchSpace(min_depth=5))
    with pytest.raises(TechniqueNotApplicableError, match="at least 10"):
        search_students(model, model, samples[:5], storage_dir=tmp_path)
    with pytest.raises(TechniqueNotApplicableError, match="n_trials"):
        SearchBudget(0)
    technique = get_technique("nas_distill")
    with pytest.raises(TechniqueNotApplicableError, match="calibration"):
        technique.apply(model, technique.default_config(), ApplyContext(analysis=analyze(model, "mlp-policy")))
    assert not technique.planned_by_default and technique.family == "distillation"
    estimate = technique.estimate(analyze(model, "mlp-policy"), technique.default_config())
    assert 0 < estimate.size_ratio < 1 and "rule of thumb" in estimate.note
    assert technique.milder(parse_config(technique, {"tolerance": 0.0})) is None
