"""End to end: `robopt optimize reacher-policy` through the graph, judged by closed-loop success at real timing."""

from __future__ import annotations

import re

from robopt import api
from robopt.domain.criteria import criteria_from_strings
from tests.cli.test_cli import robopt


def test_cli_optimizes_reacher_policy_judged_by_closed_loop_success(fresh_data_dir):
    done = robopt("optimize", "reacher-policy")  # no criteria: the card's (33% size, 10 points, 50 Hz)
    out = done.stdout
    assert "using the model card's suggestion" in done.stderr
    ideal = re.search(r"ideal timing: ([\d.]+) \[.*?\] → ([\d.]+)", out)
    real = re.search(r"real timing:\s+([\d.]+) .*?\(([\d.]+) ms measured, (\d+) tick\(s\)\) → ([\d.]+)", out)
    assert ideal and real, out
    assert float(ideal.group(1)) >= 0.85 and float(real.group(4)) >= 0.85
    assert "Tango score test" in out and "success_real_drop" in out
    assert "criteria met" in out and "quantize_dynamic_int8" in out


def test_control_rate_and_episodes_criteria_reach_the_evaluator(fresh_data_dir):
    # At 100 kHz a control tick lasts 10 µs: the policy's measured inference (tens of µs in Python) spans several
    # ticks, so the same accurate policy fails at real timing, and the report shows it.
    criteria = criteria_from_strings(max_size="33%", max_accuracy_drop="10%", control_rate="100kHz", episodes=20)
    result = api.optimize("reacher-policy", criteria)
    base = result.baseline.measurement.metrics
    assert base["episodes"] == 20 and base["control_rate_hz"] == 100_000
    assert base["ticks_per_inference"] > 1
    assert base["success_ideal"] >= 0.8 and base["success_real"] <= base["success_ideal"] - 0.3
