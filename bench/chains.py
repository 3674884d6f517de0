"""Benchmark: the best chain against single techniques, per zoo model, in the same run (issue 5).

    .venv/bin/python bench/chains.py [--models digits-cnn reacher-policy] [--size-ratios 0.125 0.0625] [--out ...]

For each model the card's accuracy/success budget is kept and the size target is each of `--size-ratios` of FP32
(0.125 = 8x smaller: every run; tighter targets: the planner and the named chains, since a single step stops as
soon as the criteria are met). Each run goes through the whole pipeline (robopt.optimize) in a fresh data dir
sharing the zoo:
- "planner": every technique the planner may use by default — its own chain;
- each technique alone (`techniques=[NAME]`, the planner picks its config);
- named chains: the planner restricted to the chain's techniques (e.g. prune_structured + finetune +
  quantize_dynamic_int8 plans prune -> recover -> quantize).
Each entry records whether the criteria were met, the final size ratio against FP32 (baseline / model), the task
metric, latency, and the chain with size and metric after every accepted step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import fresh_run_dir, machine, measurement

DEFAULT_MODELS = ["digits-cnn", "reacher-policy"]
SINGLES = ["quantize_dynamic_int8", "onnx_static_int8", "prune_structured", "low_rank", "distill"]
CHAINS = {
    "prune -> recover -> int8": ["prune_structured", "finetune", "quantize_dynamic_int8"],
    "low_rank -> recover -> int8": ["low_rank", "finetune", "quantize_dynamic_int8"],
    "distill -> int8": ["distill", "quantize_dynamic_int8"],
    "distill -> static int8": ["distill", "onnx_static_int8"],
}


def _summary(result: Any) -> dict[str, Any]:
    base = result.baseline.measurement
    best = result.best.measurement
    metric = base.primary_metric or ""
    return {
        "criteria_met": result.criteria_met,
        "stop_reason": result.stop_reason,
        "size_ratio": base.size_bytes / best.size_bytes,
        "speedup_p50": base.latency_ms_p50 / best.latency_ms_p50 if best.latency_ms_p50 else None,
        "metric": best.metrics.get(metric),
        "best": measurement(best),
        "chain": [
            {
                "index": a.index,
                "technique": a.step.technique,
                "config": a.step.config,
                "size_ratio": base.size_bytes / a.measurement.size_bytes,
                "metric": a.measurement.metrics.get(metric),
                "latency_ms_p50": a.measurement.latency_ms_p50,
            }
            for a in result.chain()
            if a.measurement is not None
        ],
        "attempts": [
            {"technique": a.step.technique, "config": a.step.config, "status": a.status, "reason": a.reason}
            for a in result.attempts
        ],
    }


def run(models: list[str], size_ratios: list[float], only: list[str] | None) -> dict[str, Any]:
    os.environ["ROBOPT_DATA_DIR"] = tempfile.mkdtemp(prefix="robopt-bench-")
    from robopt import api, zoo
    from robopt.domain.criteria import criteria_from_strings
    from robopt.errors import RoboptError
    from robopt.graph.context import Context
    from robopt.settings import get_settings

    settings = get_settings()
    runs: dict[str, list[str] | None] = {"planner": None}
    runs.update({name: [name] for name in SINGLES})
    runs.update(CHAINS)
    if only:
        runs = {k: v for k, v in runs.items() if k in only}
    report: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "models": {}}
    for name, size_ratio in itertools.product(models, size_ratios):
        _, card = zoo.resolve(name, settings.zoo_dir)
        criteria = criteria_from_strings(**card.suggested_criteria).model_copy(
            update={"max_size_ratio": size_ratio, "max_size_bytes": None}
        )
        entry: dict[str, Any] = {"criteria": criteria.model_dump(exclude_none=True), "runs": {}}
        todo = runs if size_ratio == size_ratios[0] else {k: v for k, v in runs.items() if k not in SINGLES}
        for label, techniques in todo.items():
            print(f"== {name} at {size_ratio:g}: {label}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                result = api.optimize(
                    name,
                    criteria,
                    techniques=techniques,
                    context=Context(data_dir=str(fresh_run_dir(settings.zoo_dir, label.replace(" ", "")))),
                )
            except RoboptError as e:  # recorded, never hidden: the other runs still go
                entry["runs"][label] = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
                continue
            entry.setdefault("baseline", measurement(result.baseline.measurement))
            entry.setdefault("primary_metric", result.baseline.measurement.primary_metric)
            entry["runs"][label] = {
                "techniques": techniques,
                **_summary(result),
                "wall_time_s": round(time.perf_counter() - started, 1),
            }
            print(json.dumps({k: v for k, v in entry["runs"][label].items() if k != "best"}), file=sys.stderr)
        report["models"][f"{name} @ {1 / size_ratio:g}x"] = entry
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chains.json")
    parser.add_argument("--models", nargs="*", default=None, help=f"zoo entries (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument(
        "--size-ratios", nargs="*", type=float, default=[0.125, 0.0625], help="size targets as shares of FP32"
    )
    parser.add_argument("--runs", nargs="*", default=None, help="only these runs (labels)")
    args = parser.parse_args()
    report = run(args.models or DEFAULT_MODELS, args.size_ratios, args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
