"""Benchmark: robopt on every zoo model with its card's criteria, beside the plain recipe (torch dynamic INT8).

    .venv/bin/python bench/optimize_zoo.py [--out bench/results/optimize_zoo.json] [--models digits-cnn ...]

Each model is run twice in the same process and data directory, measured by the same pipeline (isolated
benchmark process, fixed threads): robopt's own plan, and the plain recipe alone. A fresh temporary data
directory keeps past sessions' history out of the plans. Writes JSON; ratios are baseline / model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any


def _summary(result: Any) -> dict[str, Any]:
    def model(m: Any) -> dict[str, Any]:
        return {
            "size_bytes": m.size_bytes,
            "latency_ms_p50": m.latency_ms_p50,
            "latency_ms_p95": m.latency_ms_p95,
            "peak_memory_bytes": m.peak_memory_bytes,
            "metrics": {k: v for k, v in m.metrics.items() if k != "samples"},
        }

    base, best = result.baseline.measurement, result.best.measurement
    return {
        "baseline": model(base),
        "best": model(best),
        "size_ratio": base.size_bytes / best.size_bytes,
        "speedup_p50": (base.latency_ms_p50 / best.latency_ms_p50) if best.latency_ms_p50 else None,
        "chain": [a.step.technique for a in result.attempts if a.status == "accepted"],
        "candidates_tried": len(result.attempts),
        "criteria_met": result.criteria_met,
        "stop_reason": result.stop_reason,
    }


def run(models: list[str]) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="robopt-bench-")
    os.environ["ROBOPT_DATA_DIR"] = data_dir
    import torch

    from robopt import api, zoo
    from robopt.domain.criteria import criteria_from_strings
    from robopt.settings import get_settings

    settings = get_settings()
    report: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": settings.effective_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
        "models": {},
    }
    for name in models:
        _, card = zoo.resolve(name, settings.zoo_dir)
        criteria = criteria_from_strings(**card.suggested_criteria)
        entry: dict[str, Any] = {"criteria": criteria.model_dump(exclude_none=True)}
        for label, techniques in (("robopt", None), ("plain_dynamic_int8", ["quantize_dynamic_int8"])):
            started = time.perf_counter()
            result = api.optimize(name, criteria, techniques=techniques)
            entry[label] = {**_summary(result), "wall_time_s": round(time.perf_counter() - started, 2)}
        report["models"][name] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "optimize_zoo.json")
    parser.add_argument("--models", nargs="*", default=None, help="zoo entries (default: all)")
    args = parser.parse_args()
    from robopt import zoo

    report = run(args.models or zoo.list_entries())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
