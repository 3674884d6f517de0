"""Measurements of one model on this machine: payload size on disk, latency percentiles, peak memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robopt.domain.records import ArtifactRef
from robopt.errors import EvaluationError, ModelNotFoundError
from robopt.memory.artifacts import MANIFEST
from robopt.progress import Progress
from robopt.tools.analysis import eval_mode
from robopt.tools.onnx_module import OnnxModule

_STDERR_TAIL = 2000


@dataclass
class LatencyStats:
    """Per-call wall time of a forward pass, in milliseconds, at a fixed thread count."""

    p50_ms: float
    p95_ms: float
    mean_ms: float
    iterations: int
    threads: int
    warmup: int


def measure_latency(
    module: nn.Module,
    example_inputs: tuple,
    *,
    threads: int,
    warmup: int = 10,
    min_iterations: int = 30,
    min_time_s: float = 0.5,
    max_iterations: int = 2000,
    progress: Progress | None = None,
) -> LatencyStats:
    """Time single forward calls after `warmup` untimed ones, until both `min_iterations` and `min_time_s`
    are reached (never past `max_iterations`).

    Runs under torch.no_grad() (not inference_mode: quanto/bitsandbytes-style modules break there), with
    every submodule in eval mode and torch's thread count set to `threads`; both are restored afterwards.
    An ONNX-backed module gets a session built with `threads` intra-op threads for the measurement.
    """
    if threads < 1:
        raise EvaluationError(f"latency needs threads >= 1, got {threads}", "pass the resolved thread count, e.g. 1")
    if min_iterations < 1 or max_iterations < min_iterations:
        raise EvaluationError(
            f"bad iteration bounds: min_iterations={min_iterations}, max_iterations={max_iterations}",
            "use 1 <= min_iterations <= max_iterations",
        )
    progress = progress or Progress()
    if isinstance(module, OnnxModule):
        module = OnnxModule(module.path, threads=threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with eval_mode(module), torch.no_grad():
            warm_times = []
            for _ in range(warmup):
                progress.check()
                start = time.perf_counter()
                module(*example_inputs)
                warm_times.append(time.perf_counter() - start)
            total = min_iterations
            if warm_times:
                per_call = float(np.median(warm_times)) or 1e-9
                total = min(max(min_iterations, math.ceil(min_time_s / per_call)), max_iterations)
            times: list[float] = []
            progress.update("latency", 0, total)
            elapsed = 0.0
            while len(times) < total:
                start = time.perf_counter()
                module(*example_inputs)
                duration = time.perf_counter() - start
                times.append(duration)
                elapsed += duration
                if len(times) == total and elapsed < min_time_s and total < max_iterations:
                    # the warm-up estimate was optimistic: extend to reach min_time_s
                    total = min(max_iterations, math.ceil(len(times) * min_time_s / max(elapsed, 1e-9)) + 1)
                progress.update("latency", len(times), total)
    finally:
        torch.set_num_threads(previous_threads)
    ms = np.asarray(times) * 1000.0
    return LatencyStats(
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        mean_ms=float(ms.mean()),
        iterations=len(times),
        threads=threads,
        warmup=warmup,
    )


@dataclass
class IsolatedMeasurement:
    """What the isolated benchmark process measured; `reason` says why a value is missing."""

    peak_memory_bytes: int | None
    latency: LatencyStats | None
    reason: str | None = None


def measure_isolated(
    artifact: ArtifactRef,
    *,
    threads: int = 1,
    runs: int = 3,
    latency: bool = True,
    latency_options: dict | None = None,
    latency_threads: list[int] | None = None,
    timeout_s: float = 300,
) -> IsolatedMeasurement:
    """Peak resident memory (bytes above the post-import baseline) of loading `artifact` and running it
    `runs` times, and then its latency, measured in a fresh `python -m robopt.evaluation.bench_probe`.

    Latency is timed at each of `latency_threads` (default: 1 and `threads`) and the fastest is kept, with
    its thread count: a deployment picks the faster setting, and for small models extra intra-op threads
    only add synchronisation (on a busy 2-core machine a 70k-parameter MLP took 16 ms with 2 threads and
    0.05 ms with 1).

    Missing values come back as None with the reason (no input spec, probe failure, timeout).
    """
    if artifact.input_spec is None:
        return IsolatedMeasurement(
            None, None, "the artifact has no input_spec, so the model cannot be run: pass --input-shape"
        )
    request = json.dumps(
        {
            "artifact": artifact.model_dump(mode="json"),
            "threads": threads,
            "runs": runs,
            "latency": (latency_options or {}) if latency else None,
            "latency_threads": latency_threads or sorted({1, threads}),
        }
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "robopt.evaluation.bench_probe"],
            input=request,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    except subprocess.TimeoutExpired:
        return IsolatedMeasurement(None, None, f"the benchmark probe ran past {timeout_s:g} s")
    if done.returncode != 0:
        tail = done.stderr.strip()[-_STDERR_TAIL:] or done.stdout.strip()[-_STDERR_TAIL:]
        return IsolatedMeasurement(None, None, f"the benchmark probe failed (exit code {done.returncode}): {tail}")
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
        peak, baseline = int(result["peak_rss_bytes"]), int(result["baseline_rss_bytes"])
        timings = [LatencyStats(**t) for t in result.get("latency") or []]
        stats = min(timings, key=lambda t: t.p50_ms) if timings else None
    except (IndexError, ValueError, KeyError, TypeError) as err:
        return IsolatedMeasurement(
            None,
            None,
            f"the benchmark probe printed no result ({type(err).__name__}): {done.stdout.strip()[-_STDERR_TAIL:]}",
        )
    return IsolatedMeasurement(max(peak - baseline, 0), stats)


def measure_peak_memory(
    artifact: ArtifactRef, *, threads: int = 1, runs: int = 3, timeout_s: float = 300
) -> tuple[int | None, str | None]:
    """Peak memory only (see measure_isolated): (bytes, None) or (None, reason)."""
    result = measure_isolated(artifact, threads=threads, runs=runs, latency=False, timeout_s=timeout_s)
    return result.peak_memory_bytes, result.reason


def artifact_size_bytes(path: Path) -> int:
    """Bytes of a model's payload: the file, plus its side files.

    Inside an artifact directory (a manifest.json beside the file) every other file there counts; a
    directory (an HF model folder) counts all its files; a loose ONNX file counts the external-data
    files it names; any other loose file counts alone.
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist", "check the model path or the artifact store location")
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    if (path.parent / MANIFEST).is_file():
        return sum(p.stat().st_size for p in path.parent.rglob("*") if p.is_file() and p.name != MANIFEST)
    size = path.stat().st_size
    if path.suffix == ".onnx":
        size += sum(side.stat().st_size for side in _onnx_external_files(path))
    return size


def _onnx_external_files(path: Path) -> list[Path]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value for tensor in model.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }
    return [path.parent / loc for loc in sorted(locations) if (path.parent / loc).is_file()]
