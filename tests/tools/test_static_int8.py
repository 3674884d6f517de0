"""Static INT8 (ONNX Runtime QDQ) and SmoothQuant INT8 (NNCF) on zoo models: digits-cnn, reacher-policy, minilm."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from robopt import api, zoo
from robopt.calibration import CalibrationSet, CalibrationSource
from robopt.domain.analysis import AnalysisReport
from robopt.domain.criteria import Criteria
from robopt.domain.records import InputSpec
from robopt.errors import CancelledError, TechniqueNotApplicableError
from robopt.evaluation.base import EvaluationSetup, EvaluatorSpec, build_evaluator
from robopt.evaluation.datasets import digits_split
from robopt.evaluation.embedding import load_sentences
from robopt.graph.context import Context
from robopt.memory.artifacts import ArtifactStore
from robopt.progress import Progress
from robopt.robotics.reacher_task import ReacherTask
from robopt.tools.analysis import profile_module
from robopt.tools.loading import load_model
from robopt.tools.onnx_export import export_onnx
from robopt.tools.onnx_module import OnnxModule
from robopt.tools.registry import ApplyContext, TechniqueResult, get_technique, parse_config
from robopt.tools.techniques._onnx_static import DYNAMIC_INTEGER_OPS

STATIC = "onnx_static_int8"
SMOOTHQUANT = "smoothquant_int8"


# -- helpers --------------------------------------------------------------------------------------


def analysis_of(model: nn.Module, input_spec: InputSpec | None, fmt: str) -> AnalysisReport:
    """robopt's static profile of the model (no FLOP count), as the pipeline's analysis reports it."""
    profile = profile_module(model, None)
    return AnalysisReport(
        format=fmt,
        source="test",
        param_count=profile.param_count,
        size_on_disk_bytes=profile.size_in_memory_bytes,
        size_in_memory_bytes=profile.size_in_memory_bytes,
        layer_census=profile.layer_census,
        params_by_layer_type=profile.params_by_layer_type,
        architecture=profile.architecture,
        input_spec=input_spec,
    )


def source_of(samples: Sequence[tuple[torch.Tensor, ...]], name: str) -> CalibrationSource:
    return lambda n: CalibrationSet(tuple(samples[:n]), name)


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(name: str, model: nn.Module, analysis: AnalysisReport, workdir: Path, calibration, **config) -> TechniqueResult:
    technique = get_technique(name)
    workdir.mkdir(parents=True, exist_ok=True)
    context = ApplyContext(analysis=analysis, workdir=workdir, calibration=calibration, progress=Progress())
    return technique.apply(model, parse_config(technique, config), context)


def assert_static_qdq(result: TechniqueResult) -> None:
    """A QDQ graph with int8 weights, no dynamic integer op, run by ONNX Runtime's integer kernels."""
    ops = op_types(result.onnx_path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert not ops & DYNAMIC_INTEGER_OPS
    assert result.details["integer_kernels"], result.details
    assert result.details["execution_provider"] == "CPUExecutionProvider"


# -- digits-cnn: convolutions as integer kernels ------------------------------------------------


@pytest.fixture(scope="module")
def digits_cnn(data_dir):
    weights, card = zoo.resolve("digits-cnn", data_dir / "zoo")
    return zoo.load_card_model(weights, card), card


@pytest.fixture(scope="module")
def digits_calibration() -> CalibrationSource:
    x_train = digits_split()[0]
    return source_of([(x_train[i : i + 1],) for i in range(0, 640, 10)], "digits-train every 10th")


@pytest.fixture(scope="module")
def digits_static(digits_cnn, digits_calibration, tmp_path_factory) -> TechniqueResult:
    model, card = digits_cnn
    analysis = analysis_of(model, card.input_spec, "torch-module")
    return run(STATIC, model, analysis, tmp_path_factory.mktemp("digits"), digits_calibration)


def accuracy(model: nn.Module) -> float:
    _, _, x_test, y_test = digits_split()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def test_digits_cnn_becomes_a_smaller_qdq_model_with_the_same_accuracy(digits_cnn, digits_static, digits_calibration):
    model, _ = digits_cnn
    result = digits_static
    assert result.onnx_path is not None and result.onnx_path.suffix == ".onnx"
    assert isinstance(result.model, OnnxModule) and result.model.path == str(result.onnx_path)
    assert_static_qdq(result)
    assert result.details["quantized_ops"]["Conv"] == 2 and result.details["quantized_ops"]["Gemm"] == 2
    assert result.details["integer_kernels"]["com.microsoft:QLinearConv"] == 2  # not ConvInteger: the fast path
    assert result.details["activation_type"] == "uint8" and result.details["per_channel"] is True
    assert result.details["opset"] >= 17
    # what it calibrated on: named in the notes; the optimize node records size, source and fingerprint once
    assert result.notes == f"calibrated on 64 samples from {digits_calibration(64).source}"
    assert not {"calibration", "calibration_source", "calibration_fingerprint", "calibration_samples"} & set(
        result.details
    )
    # 450 held-out digits: within one point of the float model
    assert accuracy(result.model) >= accuracy(model) - 0.01
    fp32_file = result.onnx_path.parent / "model.fp32.onnx"
    assert result.onnx_path.stat().st_size < 0.3 * fp32_file.stat().st_size


def test_the_stored_file_loads_in_plain_onnxruntime_with_the_same_outputs(digits_static, tmp_path):
    """What robopt stores is a standard ONNX file: a process that never imports robopt reproduces its outputs."""
    x = digits_split()[2][:64]
    np.save(tmp_path / "x.npy", x.numpy())
    code = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "out = s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[2])})[0]\n"
        "np.save(sys.argv[3], out)\n"
        "assert not any(m.startswith('robopt') for m in sys.modules), 'robopt was imported'\n"
    )
    args = [str(digits_static.onnx_path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")]
    subprocess.run([sys.executable, "-c", code, *args], check=True, timeout=120)
    with torch.no_grad():
        ours = digits_static.model(x).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), ours)


def test_the_result_survives_the_artifact_store(digits_static, tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    ref = store.put_onnx(onnx.load(str(digits_static.onnx_path)), technique=STATIC)
    assert ref.format == "onnx" and ref.size_bytes == digits_static.onnx_path.stat().st_size
    x = digits_split()[2][:32]
    with torch.no_grad():
        assert torch.equal(store.load(ref)(x), digits_static.model(x))


def test_calibration_reports_progress_and_can_be_cancelled(digits_cnn, digits_calibration, tmp_path):
    model, card = digits_cnn
    events: list[dict] = []
    progress = Progress(emit=events.append)

    def cancel_during_calibration(event: dict) -> None:
        events.append(event)
        if event.get("stage") == "calibrate":
            progress.cancel.set()

    progress.emit = cancel_during_calibration
    context = ApplyContext(
        analysis=analysis_of(model, card.input_spec, "torch-module"),
        workdir=tmp_path,
        calibration=digits_calibration,
        progress=progress,
    )
    technique = get_technique(STATIC)
    with pytest.raises(CancelledError):
        technique.apply(model, technique.default_config(), context)
    calibrating = [e for e in events if e.get("stage") == "calibrate"]
    assert calibrating and calibrating[0]["total"] == 64
    assert not (tmp_path / "model.qdq.onnx").exists()


def test_histogram_calibration_methods_run(digits_cnn, digits_calibration, tmp_path):
    model, card = digits_cnn
    analysis = analysis_of(model, card.input_spec, "torch-module")
    result = run(STATIC, model, analysis, tmp_path, digits_calibration, calibrate_method="percentile", samples=32)
    assert result.details["calibrate_method"] == "percentile" and result.notes.startswith("calibrated on 32 samples")
    assert_static_qdq(result)
    assert accuracy(result.model) >= accuracy(model) - 0.01


# -- reacher-policy: an MLP (Gemm) in closed loop ---------------------------------------------------


@pytest.fixture(scope="module")
def reacher(data_dir):
    weights, card = zoo.resolve("reacher-policy", data_dir / "zoo")
    return zoo.load_card_model(weights, card), card


def policy_observations(model: nn.Module, seeds: range) -> list[tuple[torch.Tensor]]:
    """Observations the float policy visits in Reacher-v5 (seeds apart from training and evaluation)."""
    task = ReacherTask()
    samples = []
    try:
        for seed in seeds:
            observation = task.reset(seed)
            for _ in range(task.max_steps):
                inputs = task.model_inputs(observation)
                samples.append(inputs)
                with torch.no_grad():
                    observation = task.step(task.decode_action(model(*inputs))).observation
    finally:
        task.close()
    return samples


def test_reacher_policy_gemms_are_quantized_and_it_still_reaches(reacher, tmp_path):
    model, card = reacher
    analysis = analysis_of(model, card.input_spec, "torch-module")
    assert analysis.architecture == "mlp-policy"
    calibration = source_of(policy_observations(model, range(5000, 5004)), "reacher rollouts, seeds 5000-5003")
    result = run(STATIC, model, analysis, tmp_path / "a", calibration, samples=200)
    assert_static_qdq(result)
    assert set(result.details["quantized_ops"]) & {"Gemm", "MatMul"}
    assert not set(result.details["float_kernels"]) & {"Gemm", "MatMul", "FusedGemm", "FusedMatMul"}
    held_out = torch.cat([x for (x,) in policy_observations(model, range(6000, 6002))])
    with torch.no_grad():
        error = (result.model(held_out) - model(held_out)).abs().max().item()
    assert error < 0.1  # actions are torques in [-1, 1]
    spec = card.evaluator.model_copy(update={"options": {**card.evaluator.options, "episodes": 20}})
    evaluator = build_evaluator(spec, EvaluationSetup(reference=model, input_spec=card.input_spec))
    fp32, int8 = (evaluator.evaluate(m, Progress())["success_ideal"] for m in (model, result.model))
    assert int8 >= fp32 - 0.1
    # the same calibration set gives the same file, byte for byte
    again = run(STATIC, model, analysis, tmp_path / "b", calibration, samples=200)
    assert sha256(again.onnx_path) == sha256(result.onnx_path)


# -- minilm: a pretrained transformer, ONNX Runtime static vs NNCF SmoothQuant ----------------------


@pytest.fixture(scope="module")
def minilm(data_dir, tmp_path_factory):
    """The encoder, its ONNX export (shared by both techniques), its analysis, calibration and held-out sentences."""
    from transformers import AutoTokenizer

    folder, card = zoo.resolve("minilm", data_dir / "zoo")
    model = load_model(folder).module
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sentences = load_sentences("sentences")
    work = tmp_path_factory.mktemp("minilm")
    held_out = work / "held_out.txt"
    held_out.write_text("\n".join(sentences[1::2]))
    calibration = [(torch.tensor([tokenizer(s)["input_ids"]]),) for s in sentences[::2][:16]]
    exported = export_onnx(
        model, (torch.zeros(1, 16, dtype=torch.int64),), work / "minilm.onnx", input_names=["input_ids"]
    )
    onnx_model = OnnxModule(exported.path)
    return {
        "folder": folder,
        "model": model,
        "onnx": onnx_model,
        "analysis": analysis_of(onnx_model, card.input_spec, "onnx"),
        "calibration": source_of(calibration, "sentences, even lines"),
        "held_out": held_out,
        "work": work,
    }


def mean_cosine(minilm, model: nn.Module) -> float:
    """robopt's embedding-fidelity evaluator on sentences not used for calibration."""
    spec = EvaluatorSpec(
        name="embedding-fidelity", dataset=str(minilm["held_out"]), options={"model_dir": str(minilm["folder"])}
    )
    return build_evaluator(spec, EvaluationSetup(reference=minilm["model"])).evaluate(model, Progress())["mean_cosine"]


def test_minilm_export_is_exact(minilm):
    assert minilm["analysis"].architecture == "transformer-encoder"
    assert mean_cosine(minilm, minilm["onnx"]) > 0.99999


def test_minilm_static_int8(minilm):
    result = run(
        STATIC, minilm["onnx"], minilm["analysis"], minilm["work"] / "static", minilm["calibration"],
        calibrate_method="entropy", samples=16,
    )  # fmt: skip
    assert_static_qdq(result)
    assert result.details["op_types_requested"] == ["Conv", "MatMul", "Gemm", "Gather"]  # weights only
    assert result.details["quantized_ops"]["MatMul"] >= 36  # 6 layers x (q, k, v, out, ffn up, ffn down)
    assert result.onnx_path.stat().st_size < 0.3 * Path(minilm["onnx"].path).stat().st_size
    assert (
        mean_cosine(minilm, result.model) > 0.9
    )  # measured 0.948: calibrated activation ranges cost more than SmoothQuant's path below


def test_minilm_smoothquant_int8(minilm):
    technique = get_technique(SMOOTHQUANT)
    assert technique.availability().available
    assert technique.applicable(minilm["analysis"]).applicable
    result = run(
        SMOOTHQUANT, minilm["onnx"], minilm["analysis"], minilm["work"] / "sq", minilm["calibration"], samples=16
    )
    assert_static_qdq(result)
    assert result.details["smoothquant_alpha"] == 0.5 and result.details["smoothquant_scales"] > 0
    assert result.details["quantized_ops"]["MatMul"] >= 36
    assert result.onnx_path.stat().st_size < 0.3 * Path(minilm["onnx"].path).stat().st_size
    assert mean_cosine(minilm, result.model) > 0.98  # measured 0.994


# -- applicability, configs and typed errors --------------------------------------------------------


def test_without_calibration_both_techniques_refuse_with_a_hint(digits_cnn, tmp_path):
    model, card = digits_cnn
    analysis = analysis_of(model, card.input_spec, "torch-module")
    for name in (STATIC, SMOOTHQUANT):
        with pytest.raises(TechniqueNotApplicableError, match="needs calibration data") as err:
            run(name, model, analysis, tmp_path, None)
        assert "robopt.calibration" in (err.value.hint or "")


def test_samples_that_do_not_match_the_inputs_are_refused(digits_cnn, tmp_path):
    model, card = digits_cnn
    analysis = analysis_of(model, card.input_spec, "torch-module")
    two_tensors = source_of([(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))], "wrong")
    with pytest.raises(TechniqueNotApplicableError, match="hold 2 tensors but the model takes 1 inputs"):
        run(STATIC, model, analysis, tmp_path, two_tensors)


def test_applicability(digits_cnn, digits_static, minilm):
    model, card = digits_cnn
    static, smooth = get_technique(STATIC), get_technique(SMOOTHQUANT)
    cnn = analysis_of(model, card.input_spec, "torch-module")
    assert static.applicable(cnn).applicable
    assert not smooth.applicable(cnn).applicable and "transformer" in smooth.applicable(cnn).reason
    assert static.applicable(minilm["analysis"]).applicable  # ONNX input
    assert not static.applicable(cnn.model_copy(update={"format": "torchscript"})).applicable
    quantized = analysis_of(digits_static.model, card.input_spec, "onnx")  # QDQ graph: already quantized
    assert not static.applicable(quantized).applicable
    estimate = static.estimate(cnn, static.default_config())
    assert 0.2 < estimate.size_ratio < 0.35


def test_configs_round_trip_and_reject_bad_values():
    static, smooth = get_technique(STATIC), get_technique(SMOOTHQUANT)
    config = parse_config(static, {"calibrate_method": "entropy", "op_types": ["MatMul"], "samples": 8})
    assert parse_config(static, json.loads(config.model_dump_json())) == config
    assert static.milder(static.default_config()).op_types == ("Conv", "MatMul", "Gemm")
    assert parse_config(smooth, {"alpha": 0.8}).alpha == 0.8
    for technique, bad in ((static, {"calibrate_method": "mse"}), (static, {"samples": 0}), (smooth, {"alpha": 1.5})):
        with pytest.raises(ValueError):
            parse_config(technique, bad)


# -- end to end: robopt.api.optimize stores the QDQ model as an ONNX artifact ---------------------


def test_optimize_digits_cnn_with_static_int8(fresh_data_dir):
    """Needs the optimize node to pass the zoo's calibration set to the technique (ApplyContext.calibration)."""
    result = api.optimize(
        "digits-cnn",
        Criteria(max_size_ratio=1 / 3, max_metric_drop=0.01),
        techniques=[STATIC],
        context=Context(isolated_measurement=False),
    )
    attempt = result.attempts[0]
    assert attempt.step.technique == STATIC
    assert attempt.status == "accepted", attempt.reason
    assert attempt.artifact.format == "onnx" and Path(attempt.artifact.path).name == "model.onnx"
    assert "onnxruntime" in (attempt.backend or "")
    assert result.criteria_met
