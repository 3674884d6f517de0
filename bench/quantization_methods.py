"""Benchmark: every quantization technique, one at a time, on the zoo models it applies to.

    .venv/bin/python bench/quantization_methods.py [--models minilm tiny-lm mini-vla reacher-policy]
                                                   [--techniques NAME ...] [--out ...] [--update]

For each model, each registered quantization technique runs alone through the whole pipeline (robopt.optimize
with `techniques=[NAME]` and the card's criteria, its default config), each in a fresh data directory sharing
the zoo, so every figure is measured the same way: artifact size, latency in an isolated process on this
machine, and the card's task metric (closed-loop success for robot models). Plain torch dynamic INT8
(`quantize_dynamic_int8`) and ONNX Runtime INT8 (`onnx_static_int8`, `onnx_dynamic_int8`) are among the
techniques, so the baselines are in the same run. A technique that is unavailable or does not apply is
recorded with the reason; one that fails or is rejected is recorded with its measurement where there is one.
Ratios are baseline / model (size_ratio 4 = four times smaller; speedup < 1 = slower).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import fresh_run_dir, machine, measurement

DEFAULT_MODELS = ["reacher-policy", "mini-vla", "minilm", "tiny-lm"]


def _attempt(result: Any) -> dict[str, Any]:
    """The technique's first attempt: status, reason, backend and its measurement beside the baseline's."""
    base = result.baseline.measurement
    if not result.attempts:
        return {"status": "not planned", "reason": result.stop_reason}
    attempt = result.attempts[0]
    entry: dict[str, Any] = {
        "status": attempt.status,
        "reason": attempt.reason,
        "config": attempt.step.config,
        "backend": attempt.backend,
        "duration_s": round(attempt.duration_s, 2),
    }
    m = attempt.measurement
    if m is not None:
        entry["measurement"] = measurement(m)
        entry["size_ratio"] = base.size_bytes / m.size_bytes if m.size_bytes else None
        entry["speedup_p50"] = base.latency_ms_p50 / m.latency_ms_p50 if m.latency_ms_p50 else None
        entry["metric"] = m.metrics.get(base.primary_metric or "")
        entry["slower_than_original"] = bool(m.latency_ms_p50 and m.latency_ms_p50 > 1.1 * base.latency_ms_p50)
    return entry


def run(models: list[str], techniques: list[str] | None) -> dict[str, Any]:
    os.environ["ROBOPT_DATA_DIR"] = tempfile.mkdtemp(prefix="robopt-bench-")
    from robopt import api, zoo
    from robopt.domain.criteria import criteria_from_strings
    from robopt.errors import RoboptError
    from robopt.graph.context import Context
    from robopt.settings import get_settings
    from robopt.tools.registry import list_techniques

    settings = get_settings()
    quantizers = [t for t in list_techniques() if t.family == "quantization"]
    if techniques:
        quantizers = [t for t in quantizers if t.name in techniques]
    report: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "models": {}}
    for name in models:
        _, card = zoo.resolve(name, settings.zoo_dir)
        criteria = criteria_from_strings(**card.suggested_criteria)
        entry: dict[str, Any] = {
            "criteria": criteria.model_dump(exclude_none=True),
            "evaluator": card.evaluator.model_dump(exclude={"options"}),
            "techniques": {},
        }
        for technique in quantizers:
            print(f"== {name}: {technique.name}", file=sys.stderr, flush=True)
            availability = technique.availability()
            if not availability.available:
                entry["techniques"][technique.name] = {"status": "unavailable", "reason": availability.reason}
                continue
            started = time.perf_counter()
            try:
                result = api.optimize(
                    name,
                    criteria,
                    techniques=[technique.name],
                    context=Context(data_dir=str(fresh_run_dir(settings.zoo_dir, technique.name))),
                )
            except RoboptError as e:  # recorded, never hidden: the other techniques still run
                entry["techniques"][technique.name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
                continue
            entry.setdefault("baseline", measurement(result.baseline.measurement))
            entry.setdefault("primary_metric", result.baseline.measurement.primary_metric)
            entry["techniques"][technique.name] = {
                **_attempt(result),
                "wall_time_s": round(time.perf_counter() - started, 2),
            }
        report["models"][name] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantization_methods.json")
    parser.add_argument("--models", nargs="*", default=None, help=f"zoo entries (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--techniques", nargs="*", default=None, help="quantization techniques (default: all)")
    parser.add_argument("--update", action="store_true", help="keep the other models' entries already in --out")
    args = parser.parse_args()
    report = run(args.models or DEFAULT_MODELS, args.techniques)
    if args.update and args.out.is_file():
        previous = json.loads(args.out.read_text())
        for name, entry in report["models"].items():
            old = previous.get("models", {}).get(name, {})
            entry["techniques"] = {**old.get("techniques", {}), **entry["techniques"]}
        report["models"] = {**previous.get("models", {}), **report["models"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
