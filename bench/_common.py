"""Helpers shared by the bench scripts: machine facts, measurement summaries, one fresh data dir per run."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    import torch

    from robopt.settings import get_settings

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": get_settings().effective_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def measurement(m: Any) -> dict[str, Any]:
    """Size, latency, memory and metrics (without per-episode samples) of a robopt Measurement."""
    return {
        "size_bytes": m.size_bytes,
        "latency_ms_p50": m.latency_ms_p50,
        "latency_ms_p95": m.latency_ms_p95,
        "peak_memory_bytes": m.peak_memory_bytes,
        "metrics": {k: v for k, v in m.metrics.items() if k != "samples"},
    }


def success(base: Any, best: Any) -> dict[str, Any] | None:
    """Closed-loop success before/after at ideal and real timing, or None for models without a simulator."""
    if "success_real" not in base.metrics:
        return None
    keys = ("success_ideal", "success_real", "inference_latency_ms", "ticks_per_inference")
    return {
        "episodes": base.metrics.get("episodes"),
        "control_rate_hz": base.metrics.get("control_rate_hz"),
        "baseline": {k: base.metrics.get(k) for k in keys},
        "best": {k: best.metrics.get(k) for k in keys},
    }


def fresh_run_dir(zoo_dir: Path, label: str) -> Path:
    """A new data dir sharing the zoo: one run's attempt history must not steer another run."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"robopt-bench-{label}-"))
    zoo_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "zoo").symlink_to(zoo_dir, target_is_directory=True)
    return run_dir
