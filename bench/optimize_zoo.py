"""Benchmark: robopt on every zoo model with its card's criteria, beside the plain recipe (torch dynamic INT8).

    .venv/bin/python bench/optimize_zoo.py [--out bench/results/optimize_zoo.json] [--models digits-cnn ...]

Each model is run twice in the same process, measured by the same pipeline (isolated benchmark process, the
faster of 1 and all threads): robopt's own plan, and the plain recipe alone. Each run gets a fresh data
directory (sharing the zoo), so no run's attempt history steers another. Robotics models are judged by
closed-loop success at real timing (success at ideal timing is recorded beside it). Shape-only models
(openvla-7b-shape) have no weights: their entry holds the analysis and roofline predictions instead.
Writes JSON; ratios are baseline / model.
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

from _common import fresh_run_dir, machine, measurement, success


def _summary(result: Any) -> dict[str, Any]:
    base, best = result.baseline.measurement, result.best.measurement
    return {
        "primary_metric": base.primary_metric,
        "metric_baseline": base.primary_value,
        "metric_best": best.primary_value,
        "success": success(base, best),
        "baseline": measurement(base),
        "best": measurement(best),
        "size_ratio": base.size_bytes / best.size_bytes,
        "speedup_p50": (base.latency_ms_p50 / best.latency_ms_p50) if best.latency_ms_p50 else None,
        "chain": [a.step.technique for a in result.attempts if a.status == "accepted"],
        "candidates_tried": len(result.attempts),
        "criteria_met": result.criteria_met,
        "stop_reason": result.stop_reason,
    }


def _shape_only(name: str) -> dict[str, Any]:
    from robopt import api

    report = api.shape_report(name)
    return {
        "kind": "shape-only",
        "note": "no weights: analysis and roofline predictions only (lower bounds on latency)",
        "params": report["params"],
        "flops": {k: v for k, v in report["flops"].items() if k != "by_stage"},
        "memory": report["memory"],
        "devices": {
            device: {
                precision: {k: p[k] for k in ("fits", "decode_token_ms", "action_ms", "control_rate_hz")}
                for precision, p in info["precisions"].items()
            }
            for device, info in report["devices"].items()
        },
    }


def run(models: list[str]) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix="robopt-bench-")
    os.environ["ROBOPT_DATA_DIR"] = data_dir
    from robopt import api, zoo
    from robopt.domain.criteria import criteria_from_strings
    from robopt.errors import RoboptError
    from robopt.graph.context import Context
    from robopt.settings import get_settings

    settings = get_settings()
    report: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "models": {},
    }
    for name in models:
        print(f"== {name}", file=sys.stderr, flush=True)
        _, card = zoo.resolve(name, settings.zoo_dir)
        if card.kind == "shape-only":
            report["models"][name] = _shape_only(name)
            continue
        criteria = criteria_from_strings(**card.suggested_criteria)
        entry: dict[str, Any] = {
            "criteria": criteria.model_dump(exclude_none=True),
            "evaluator": card.evaluator.model_dump(exclude={"options"}),
            "zoo_build_seconds": card.build_seconds,
            "measured": time.strftime("%Y-%m-%d %H:%M"),
        }
        for label, techniques in (("robopt", None), ("plain_dynamic_int8", ["quantize_dynamic_int8"])):
            started = time.perf_counter()
            run_dir = fresh_run_dir(settings.zoo_dir, label)
            try:
                result = api.optimize(name, criteria, techniques=techniques, context=Context(data_dir=str(run_dir)))
                entry[label] = {**_summary(result), "wall_time_s": round(time.perf_counter() - started, 2)}
            except RoboptError as e:  # recorded, never hidden: the other models still run
                entry[label] = {"error": f"{type(e).__name__}: {e.message}", "hint": e.hint}
        report["models"][name] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "optimize_zoo.json")
    parser.add_argument("--models", nargs="*", default=None, help="zoo entries (default: all)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the other models' entries already in --out (each model's "
        "entry holds its own baseline from the same run, so entries stay comparable within themselves)",
    )
    args = parser.parse_args()
    from robopt import zoo

    report = run(args.models or zoo.list_entries())
    if args.update and args.out.is_file():
        previous = json.loads(args.out.read_text())
        report["models"] = {**previous.get("models", {}), **report["models"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
