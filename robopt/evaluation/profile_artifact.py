"""Measure one artifact end to end: static profile, finite outputs, latency, peak memory and the task metric."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.domain.records import ArtifactRef, Measurement
from robopt.errors import EvaluationError
from robopt.evaluation.base import Evaluator, ModelFacts
from robopt.evaluation.measure import measure_isolated, measure_latency
from robopt.memory.artifacts import ArtifactStore
from robopt.progress import Progress
from robopt.tools.analysis import StaticProfile, profile_module
from robopt.tools.example_inputs import make_example_inputs
from robopt.tools.onnx_analysis import profile_onnx
from robopt.tools.outputs import all_finite


@dataclass
class ArtifactProfile:
    """The analysis and the measurement of one artifact, taken from a single load of the model."""

    analysis: AnalysisReport
    measurement: Measurement


def profile_artifact(
    store: ArtifactStore,
    ref: ArtifactRef,
    *,
    evaluator: Evaluator | None,
    threads: int,
    progress: Progress,
    seed: int = 0,
    isolated: bool = True,
    source: str | None = None,
    hf_config: dict | None = None,
    model: nn.Module | None = None,
) -> ArtifactProfile:
    """Load `ref` (unless `model` is given), profile it and measure it. Raises EvaluationError if the
    evaluator fails; everything else that cannot be measured is recorded in `unmeasured` with its reason.

    With `isolated` (the default) latency and peak memory come from a fresh benchmark process, so every
    model is timed under the same conditions; otherwise latency is timed in this process and memory skipped.
    """
    model = model if model is not None else store.load(ref)
    inputs = make_example_inputs(ref.input_spec, seed) if ref.input_spec else None
    unmeasured: dict[str, str] = {}

    progress.message("profile", "static analysis")
    static: StaticProfile = (
        profile_onnx(Path(ref.path), input_spec=ref.input_spec)
        if ref.format == "onnx"
        else profile_module(model, inputs, hf_config=hf_config)
    )
    unmeasured.update(static.unmeasured)

    finite = True
    latency = None
    peak = None
    if inputs is None:
        unmeasured["latency"] = "no input shape is known: pass --input-shape (e.g. 1,3,224,224)"
    else:
        with torch.no_grad():
            finite = all_finite(model(*inputs))
        if not isolated:
            progress.message("latency", "measuring latency in-process")
            latency = measure_latency(model, inputs, threads=threads, progress=progress)
    if isolated:
        progress.message("benchmark", f"measuring latency ({threads} threads) and peak memory in a fresh process")
        bench = measure_isolated(ref, threads=threads, latency=inputs is not None)
        peak, latency = bench.peak_memory_bytes, bench.latency
        if bench.reason:
            unmeasured.setdefault("latency", bench.reason)
            unmeasured["peak_memory"] = bench.reason
    else:
        unmeasured["peak_memory"] = "not measured: isolated measurement is off for this run"

    metrics: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    if evaluator is not None:
        progress.message("evaluate", f"task metric: {evaluator.name}")
        facts = ModelFacts(
            latency_ms=latency.p50_ms if latency else None,
            latency_source="measured on this machine" + (" (fresh process)" if isolated else " (in-process)"),
            flops=static.flops,
            weight_bytes=ref.size_bytes,
            param_count=static.param_count,
        )
        try:
            evaluation = evaluator.evaluate_detailed(model, progress, facts)
            metrics, samples = evaluation.metrics, evaluation.samples
        except EvaluationError:
            raise
        except (RuntimeError, ValueError, TypeError) as e:
            raise EvaluationError(
                f"evaluator {evaluator.name!r} failed on this model: {e}",
                "check that the evaluator's data matches the model's inputs and outputs",
            ) from e

    measurement = Measurement(
        size_bytes=ref.size_bytes,
        param_count=static.param_count,
        latency_ms_p50=latency.p50_ms if latency else None,
        latency_ms_p95=latency.p95_ms if latency else None,
        latency_threads=latency.threads if latency else None,
        peak_memory_bytes=peak,
        metrics=metrics,
        samples=samples,
        primary_metric=evaluator.primary_metric if evaluator else None,
        higher_is_better=evaluator.higher_is_better if evaluator else True,
        outputs_finite=finite,
        unmeasured=unmeasured,
    )
    analysis = AnalysisReport(
        format=ref.format,
        source=source or ref.path,
        param_count=static.param_count,
        trainable_param_count=static.trainable_param_count,
        size_on_disk_bytes=ref.size_bytes,
        size_in_memory_bytes=static.size_in_memory_bytes,
        flops=static.flops,
        macs=static.macs,
        layer_census=static.layer_census,
        params_by_layer_type=static.params_by_layer_type,
        architecture=static.architecture,
        architecture_evidence=static.architecture_evidence,
        input_spec=ref.input_spec,
        output_shapes=static.output_shapes,
        latency_ms_p50=measurement.latency_ms_p50,
        latency_ms_p95=measurement.latency_ms_p95,
        peak_memory_bytes=peak,
        unmeasured=unmeasured,
    )
    return ArtifactProfile(analysis=analysis, measurement=measurement)
