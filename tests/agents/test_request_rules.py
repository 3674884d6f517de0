import pytest

from robopt.agents.deciders.request_rules import parse_request
from robopt.errors import RequestNotUnderstoodError

ZOO = ["digits-cnn", "reacher-policy"]


def test_issue_example():
    parsed = parse_request("shrink digits-cnn to under 100 KB and lose at most 1% accuracy", ZOO)
    criteria = parsed.criteria()
    assert parsed.model == "digits-cnn"
    assert criteria.max_size_bytes == 100_000
    assert criteria.max_metric_drop == pytest.approx(0.01)


def test_path_ratio_latency_target_budget():
    parsed = parse_request(
        "make ./models/policy.pt 4x smaller, under 5 ms, for a Jetson Orin, within 10 minutes, "
        "keeping within 0.5 points of the original accuracy",
        ZOO,
    )
    c = parsed.criteria()
    assert parsed.model == "./models/policy.pt"
    assert c.max_size_ratio == pytest.approx(0.25)
    assert c.max_latency_ms == 5
    assert c.target == "jetson orin"
    assert c.time_budget_s == 600
    assert c.max_metric_drop == pytest.approx(0.005)


def test_control_rate_becomes_latency():
    c = parse_request("run reacher-policy at 50 Hz with no accuracy loss", ZOO).criteria()
    assert c.max_latency_ms == pytest.approx(20.0)
    assert c.max_metric_drop == 0.0


def test_no_model_is_an_actionable_error():
    with pytest.raises(RequestNotUnderstoodError) as e:
        parse_request("make it smaller please", ZOO)
    assert "digits-cnn" in e.value.hint
