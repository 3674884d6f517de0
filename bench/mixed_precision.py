"""Benchmark (issue 4): sensitivity-driven mixed precision against uniform HQQ at the same artifact size.

    .venv/bin/python bench/mixed_precision.py [--out bench/results/mixed_precision.json]
        [--models mini-vla tiny-lm] [--data-dir DIR]

For each zoo model, in one process, every candidate is made from the same fp32 model and calibrated on the same
set: the run's calibration source for the model's evaluator (robopt.calibration.calibration_source: for mini-vla
expert demonstration states on training seeds < 1000, for tiny-lm token windows of the stdlib training corpus),
64 samples, seed 0. Pairs:

  uniform: HQQ at one setting on every Linear (head included): 3-bit and 4-bit with group size 64, and 2-bit with
           group size 32 (0.5 bytes per weight with its scales and zeros)
  mixed:   mixed_precision (HQQ 8/4/3/2-bit per layer, group size 64) with the same budget: average_bits=b for the
           g64 baselines, size_ratio = the uniform model's stored Linear weight bytes / fp32 for 2-bit g32; once
           with no protected roles (bits from the measured sensitivity alone) and once with the default ones
           (action head and projector >= 8-bit) where that budget is feasible

A pair counts only if the measured artifact sizes (torch.save of the whole model, as robopt's artifact store
writes it) agree within 2%. Each candidate is judged by the card's evaluator (mini-vla: closed-loop success over
30 seeded episodes at real timing, plus a 200-episode confirmation on the same seeds for both models with a paired
sign test; tiny-lm: perplexity on held-out stdlib modules), with its latency (p50, in-process, 1 thread) and the
evaluator's cheap proxies. "mixed_beats_uniform": equal size and a better primary metric (for closed loop: better
over 30 episodes AND over the 200-episode confirmation; its sign test says whether that is significant).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CALIBRATION_SAMPLES = 64
SEED = 0
SIZE_TOLERANCE = 0.02
CONFIRM_EPISODES = 200
# The uniform baselines: HQQ at one setting on every Linear (head included).
UNIFORM: tuple[tuple[str, dict[str, int]], ...] = (
    ("3-bit g64", {"nbits": 3}),
    ("4-bit g64", {"nbits": 4}),
    ("2-bit g32", {"nbits": 2, "group_size": 32}),
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def artifact_bytes(model: Any) -> int:
    """What the artifact store writes for an eager model: a full torch.save pickle."""
    import torch

    from robopt.tools.picklable import make_picklable

    buf = io.BytesIO()
    torch.save(make_picklable(model), buf)
    return len(buf.getvalue())


def load_fp32(name: str, zoo_dir: Path) -> tuple[Any, Any]:
    from robopt import zoo

    weights, card = zoo.resolve(name, zoo_dir)
    if card.kind == "hf-folder":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(weights).eval(), card
    return zoo.load_card_model(weights, card), card


class Judge:
    """The card's evaluator with the fp32 model as reference, plus size and latency. For closed-loop models also a
    confirmation run over CONFIRM_EPISODES episodes (30 episodes resolve success only to ~1/30)."""

    def __init__(self, card: Any, reference: Any) -> None:
        from robopt.evaluation.base import EvaluationSetup, build_evaluator
        from robopt.tools.example_inputs import make_example_inputs

        setup = EvaluationSetup(reference, card.input_spec, SEED)
        self.evaluator = build_evaluator(card.evaluator, setup)
        self.confirm = None
        if card.evaluator.name == "closed-loop":
            options = {**card.evaluator.options, "episodes": CONFIRM_EPISODES}
            self.confirm = build_evaluator(card.evaluator.model_copy(update={"options": options}), setup)
        self.example = make_example_inputs(card.input_spec, SEED)

    def measure(self, model: Any) -> dict[str, Any]:
        from robopt.evaluation.measure import measure_latency

        latency = measure_latency(model, self.example, threads=1, min_time_s=0.5)
        row: dict[str, Any] = {"size_bytes": artifact_bytes(model), "latency_ms_p50": latency.p50_ms}
        row |= self._evaluate(self.evaluator, model)
        if self.confirm is not None:
            confirm = self._evaluate(self.confirm, model)
            row["confirmation"] = {"episodes": CONFIRM_EPISODES, **confirm}
        return row

    def _evaluate(self, evaluator: Any, model: Any) -> dict[str, Any]:
        from robopt.errors import RoboptError
        from robopt.progress import Progress

        started = time.perf_counter()
        row: dict[str, Any] = {}
        try:
            evaluation = evaluator.evaluate_detailed(model, Progress())
            metrics, samples = evaluation.metrics, evaluation.samples
        except RoboptError as e:  # e.g. the closed-loop pre-filter: recorded as what happened
            row["evaluation_error"] = f"{type(e).__name__}: {e.message}"
            metrics, samples = {}, {}
        row["metrics"] = metrics
        row["primary"] = metrics.get(evaluator.primary_metric)
        if evaluator.primary_metric in samples:
            row["per_episode"] = samples[evaluator.primary_metric]
        row["evaluation_seconds"] = round(time.perf_counter() - started, 2)
        return row


def linear_weight_bytes(model: Any) -> tuple[int, int]:
    """(stored bytes of the model's HQQ Linear weights, biases excluded; their weight count)."""
    from robopt.tools.techniques.hqq_quant import layer_class, stored_bytes

    stored = weights = 0
    for module in model.modules():
        if isinstance(module, layer_class()):
            bias = module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
            stored += stored_bytes(module) - bias
            weights += module.in_features * module.out_features
    return stored, weights


def apply(technique_name: str, config: dict[str, Any], fp32: Any, context: Any) -> tuple[Any, dict[str, Any]]:
    from robopt.tools.registry import get_technique, parse_config

    technique = get_technique(technique_name)
    started = time.perf_counter()
    result = technique.apply(copy.deepcopy(fp32), parse_config(technique, config), context)
    info: dict[str, Any] = {
        "technique": technique_name,
        "config": config,
        "backend": result.backend,
        "apply_seconds": round(time.perf_counter() - started, 2),
    }
    details = result.details
    if technique_name == "mixed_precision":
        info |= {
            "bits": details["bits"],
            "bits_histogram": details["bits_histogram"],
            "average_bits": details["average_bits"],
            "predicted_output_error": details["predicted_output_error"],
        }
        info["_sensitivity"] = details["sensitivity"]
    else:
        info |= {"layers_skipped": details["layers_skipped"], "nbits": details["nbits"]}
    return result.model, info


def verdict(uniform: Any, mixed: Any, higher_is_better: bool) -> str | None:
    if uniform is not None and mixed is not None:
        return "tie" if mixed == uniform else ("mixed" if (mixed > uniform) == higher_is_better else "uniform")
    return "mixed" if mixed is not None else None  # None: the uniform model was rejected by the evaluator


def paired(uniform: dict[str, Any], mixed: dict[str, Any]) -> dict[str, Any] | None:
    """Episodes (same seeds) only one of the two solved, and the two-sided sign-test p-value on them."""
    from scipy.stats import binomtest

    if "per_episode" not in uniform or "per_episode" not in mixed:
        return None
    pairs = list(zip(uniform["per_episode"], mixed["per_episode"], strict=True))
    mixed_only = sum(1 for u, m in pairs if m > u)
    uniform_only = sum(1 for u, m in pairs if u > m)
    discordant = mixed_only + uniform_only
    p = binomtest(mixed_only, discordant).pvalue if discordant else 1.0
    return {"mixed_only": mixed_only, "uniform_only": uniform_only, "sign_test_p": p}


def compare(uniform: dict[str, Any], mixed: dict[str, Any], higher_is_better: bool) -> dict[str, Any]:
    """Size ratio and which is better; for closed-loop models "mixed_beats_uniform" also needs the 200-episode
    confirmation to agree (30 episodes resolve success only to 1/30)."""
    ratio = mixed["size_bytes"] / uniform["size_bytes"]
    equal = abs(ratio - 1) <= SIZE_TOLERANCE
    better = verdict(uniform.get("primary"), mixed.get("primary"), higher_is_better)
    result: dict[str, Any] = {
        "size_ratio_mixed_over_uniform": ratio,
        "equal_size": equal,
        "better": better,
        "paired_episodes": paired(uniform, mixed),
    }
    confirmed = True
    if "confirmation" in uniform and "confirmation" in mixed:
        u, m = uniform["confirmation"], mixed["confirmation"]
        test = paired(u, m)
        confirmation = {
            "episodes": CONFIRM_EPISODES,
            "better": verdict(u.get("primary"), m.get("primary"), higher_is_better),
            "paired_episodes": test,
            "significant_at_5pct": bool(test and test["sign_test_p"] < 0.05),
        }
        result["confirmation"] = confirmation
        confirmed = confirmation["better"] == "mixed"
    result["mixed_beats_uniform"] = equal and better == "mixed" and confirmed
    return result


def run_model(name: str, zoo_dir: Path, data_dir: Path) -> dict[str, Any]:
    from robopt.calibration import calibration_source
    from robopt.errors import TechniqueNotApplicableError
    from robopt.tools.analysis import profile_module
    from robopt.tools.registry import ApplyContext

    fp32, card = load_fp32(name, zoo_dir)
    source = calibration_source(card.evaluator, card.input_spec, data_dir, SEED)
    calibration = source(CALIBRATION_SAMPLES)
    judge = Judge(card, fp32)
    profile = profile_module(fp32, judge.example)
    from robopt.domain.analysis import AnalysisReport

    analysis = AnalysisReport(
        format="torch-module",
        source=name,
        param_count=profile.param_count,
        size_on_disk_bytes=artifact_bytes(fp32),
        size_in_memory_bytes=profile.size_in_memory_bytes,
        layer_census=profile.layer_census,
        params_by_layer_type=profile.params_by_layer_type,
        architecture=profile.architecture,
        input_spec=card.input_spec,
    )
    context = ApplyContext(analysis=analysis, example_inputs=judge.example, seed=SEED, calibration=source)
    _log(f"== {name}: fp32")
    entry: dict[str, Any] = {
        "evaluator": card.evaluator.model_dump(exclude={"options"}) | {"options": _plain_options(card)},
        "primary_metric": judge.evaluator.primary_metric,
        "higher_is_better": judge.evaluator.higher_is_better,
        "calibration": {
            "source": calibration.source,
            "samples": len(calibration),
            "fingerprint": calibration.fingerprint,
        },
        "fp32": judge.measure(fp32),
        "pairs": [],
    }
    sensitivity = None
    for label, uniform_config in UNIFORM:
        _log(f"== {name}: uniform {label}")
        model, info = apply("hqq", {**uniform_config, "skip_head": False}, fp32, context)
        uniform = {**info, **judge.measure(model)}
        if uniform_config.get("group_size", 64) == 64:  # the same format family: budget in average bits
            budget: dict[str, Any] = {"average_bits": uniform_config["nbits"]}
        else:  # budget = the uniform model's stored Linear weight bytes
            stored, weights = linear_weight_bytes(model)
            budget = {"average_bits": None, "size_ratio": stored / (4 * weights)}
        for keep in ({"keep_roles": []}, {"keep_roles": ["action_head", "projector"]}):
            config = {**budget, **keep, "calibration_samples": CALIBRATION_SAMPLES}
            _log(f"== {name}: mixed {config}")
            try:
                model, info = apply("mixed_precision", config, fp32, context)
            except TechniqueNotApplicableError as e:
                entry["pairs"].append({"pair": label, "mixed_config": config, "not_applicable": e.message})
                continue
            sensitivity = info.pop("_sensitivity")
            mixed = {**info, **judge.measure(model)}
            pair = {"pair": label, "uniform": uniform, "mixed": mixed}
            entry["pairs"].append(pair | compare(uniform, mixed, judge.evaluator.higher_is_better))
    entry["sensitivity"] = sensitivity
    entry["mixed_beats_uniform_at_equal_size"] = any(p.get("mixed_beats_uniform") for p in entry["pairs"])
    return entry


def _plain_options(card: Any) -> dict[str, Any]:
    return {k: v for k, v in card.evaluator.options.items() if k != "model_dir"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mixed_precision.json")
    parser.add_argument("--models", nargs="*", default=["mini-vla", "tiny-lm"])
    parser.add_argument("--data-dir", type=Path, default=None, help="data dir holding the zoo (default: a temp dir)")
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="robopt-bench-mixed-"))
    os.environ["ROBOPT_DATA_DIR"] = str(data_dir)
    import torch

    from robopt.tools.techniques.hqq_quant import hqq_probe

    report: dict[str, Any] = {
        "issue": 4,
        "question": "does sensitivity-driven mixed precision beat uniform HQQ at the same artifact size?",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "backend": hqq_probe().backend,
        },
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "size_tolerance": SIZE_TOLERANCE,
        "models": {},
    }
    for name in args.models:
        started = time.perf_counter()
        report["models"][name] = run_model(name, data_dir / "zoo", data_dir)
        report["models"][name]["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["mixed_beats_uniform_on"] = [
        n for n, e in report["models"].items() if e["mixed_beats_uniform_at_equal_size"]
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _log(json.dumps(summary(report), indent=2))


def _drop_key(value: Any, key: str) -> None:
    if isinstance(value, dict):
        value.pop(key, None)
        for v in value.values():
            _drop_key(v, key)
    elif isinstance(value, list):
        for v in value:
            _drop_key(v, key)


def summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per pair: sizes, latencies and the primary metric of uniform and mixed."""
    rows = []
    for name, entry in report["models"].items():
        for pair in entry["pairs"]:
            if "uniform" not in pair:
                continue
            rows.append(
                {
                    "model": name,
                    "pair": pair["pair"],
                    "mixed_config": pair["mixed"]["config"],
                    "uniform": [
                        pair["uniform"]["size_bytes"],
                        pair["uniform"]["latency_ms_p50"],
                        pair["uniform"]["primary"],
                    ],
                    "mixed": [pair["mixed"]["size_bytes"], pair["mixed"]["latency_ms_p50"], pair["mixed"]["primary"]],
                    "better": pair["better"],
                    "better_over_200_episodes": pair.get("confirmation", {}).get("better"),
                    "equal_size": pair["equal_size"],
                    "mixed_beats_uniform": pair["mixed_beats_uniform"],
                }
            )
    return rows


if __name__ == "__main__":
    main()
