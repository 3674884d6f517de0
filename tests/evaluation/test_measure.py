"""Latency, peak memory (in a probe subprocess) and payload size of real small models."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import CancelledError, EvaluationError, ModelNotFoundError
from robopt.evaluation.measure import artifact_size_bytes, measure_latency, measure_peak_memory
from robopt.memory.artifacts import ArtifactStore
from robopt.progress import Progress

MB = 1_000_000


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def test_latency_stats_and_thread_setting_restored(mlp: nn.Module) -> None:
    events: list[dict] = []
    before = torch.get_num_threads()
    seen_threads: list[int] = []
    mlp.register_forward_hook(lambda m, i, o: seen_threads.append(torch.get_num_threads()))
    stats = measure_latency(
        mlp,
        (torch.randn(1, 32),),
        threads=1,
        warmup=3,
        min_iterations=20,
        min_time_s=0.05,
        progress=Progress(emit=events.append, min_interval_s=0),
    )
    assert torch.get_num_threads() == before
    assert set(seen_threads) == {1}
    assert stats.p50_ms > 0 and stats.mean_ms > 0
    assert stats.p95_ms >= stats.p50_ms
    assert 20 <= stats.iterations <= 2000
    assert (stats.threads, stats.warmup) == (1, 3)
    latency_events = [e for e in events if e.get("stage") == "latency"]
    assert latency_events[-1]["current"] == latency_events[-1]["total"] == stats.iterations
    assert len(seen_threads) == 3 + stats.iterations


def test_latency_runs_in_eval_mode_and_restores_training(mlp: nn.Module) -> None:
    modes: list[bool] = []
    mlp.train()
    mlp.register_forward_hook(lambda m, i, o: modes.append(m.training))
    measure_latency(mlp, (torch.randn(1, 32),), threads=1, warmup=1, min_iterations=2, min_time_s=0)
    assert modes and not any(modes)
    assert mlp.training


def test_latency_honours_cancellation(mlp: nn.Module) -> None:
    cancel = threading.Event()
    cancel.set()
    before = torch.get_num_threads()
    with pytest.raises(CancelledError):
        measure_latency(mlp, (torch.randn(1, 32),), threads=1, progress=Progress(cancel=cancel))
    assert torch.get_num_threads() == before


def test_latency_rejects_zero_threads(mlp: nn.Module) -> None:
    with pytest.raises(EvaluationError):
        measure_latency(mlp, (torch.randn(1, 32),), threads=0)


def spec(*shape: int) -> InputSpec:
    return InputSpec(inputs=[TensorSpec(shape=list(shape))], source="caller")


def test_peak_memory_grows_with_the_model(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    big = nn.Sequential(nn.Linear(2048, 2048))  # 4.2M fp32 params: ~16.8 MB of weights
    tiny = nn.Sequential(nn.Linear(8, 4))
    big_ref = store.put_module(big, input_spec=spec(1, 2048))
    tiny_ref = store.put_module(tiny, input_spec=spec(1, 8))

    big_peak, big_reason = measure_peak_memory(big_ref, runs=2)
    tiny_peak, tiny_reason = measure_peak_memory(tiny_ref, runs=2)
    assert big_reason is None and tiny_reason is None
    assert big_peak is not None and tiny_peak is not None
    assert big_peak >= 16 * MB
    assert big_peak - tiny_peak >= 12 * MB  # the difference is mostly the 16.8 MB of weights


def test_peak_memory_without_input_spec_gives_a_reason(tmp_path: Path) -> None:
    ref = ArtifactStore(tmp_path / "artifacts").put_module(nn.Linear(4, 4))
    peak, reason = measure_peak_memory(ref)
    assert peak is None
    assert reason and "input_spec" in reason


def test_peak_memory_reports_probe_failure(tmp_path: Path) -> None:
    # the spec does not match the model: the probe's forward fails and its error comes back
    ref = ArtifactStore(tmp_path / "artifacts").put_module(nn.Linear(4, 4), input_spec=spec(1, 5))
    peak, reason = measure_peak_memory(ref, runs=1)
    assert peak is None
    assert reason and "RuntimeError" in reason


def test_artifact_size_counts_payload_not_manifest(tmp_path: Path, mlp: nn.Module) -> None:
    ref = ArtifactStore(tmp_path / "artifacts").put_module(mlp)
    payload = Path(ref.path)
    size = artifact_size_bytes(payload)
    assert size == payload.stat().st_size == ref.size_bytes
    assert (payload.parent / "manifest.json").is_file()


def test_artifact_size_of_onnx_with_external_data(tmp_path: Path, mlp: nn.Module) -> None:
    import onnx

    path = tmp_path / "loose" / "mlp.onnx"
    path.parent.mkdir()
    torch.onnx.export(mlp, (torch.randn(1, 32),), str(tmp_path / "inline.onnx"), dynamo=False)
    model = onnx.load(str(tmp_path / "inline.onnx"))
    onnx.save_model(model, str(path), save_as_external_data=True, location="mlp.onnx.data", size_threshold=0)
    (path.parent / "unrelated.bin").write_bytes(b"x" * 10_000)
    data = path.parent / "mlp.onnx.data"
    assert artifact_size_bytes(path) == path.stat().st_size + data.stat().st_size
    assert data.stat().st_size >= 4 * (32 * 64 + 64 + 64 * 4 + 4)


def test_artifact_size_of_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        artifact_size_bytes(tmp_path / "missing.pt")
