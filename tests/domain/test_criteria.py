import pytest

from robopt.domain.criteria import (
    Criteria,
    criteria_from_strings,
    parse_duration_s,
    parse_latency_ms,
    parse_metric_drop,
    parse_size,
)
from robopt.errors import InvalidCriteriaError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2MB", (2_000_000, None)),
        ("500 KB", (500_000, None)),
        ("1.5MiB", (int(1.5 * 1024**2), None)),
        ("1234", (1234, None)),
        ("25%", (None, 0.25)),
        ("4x", (None, 0.25)),
        ("3x smaller", (None, 1 / 3)),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == pytest.approx(expected) if expected[0] is None else parse_size(text) == expected


@pytest.mark.parametrize("text", ["big", "0.5x", "150%", "-3MB", "2 parsecs"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(InvalidCriteriaError) as e:
        parse_size(text)
    assert e.value.hint


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1%", (0.01, None)), ("0.5pt", (0.005, None)), ("0.02", (0.02, None)), ("2%rel", (None, 0.02))],
)
def test_parse_metric_drop(text, expected):
    got = parse_metric_drop(text)
    assert got[0] == pytest.approx(expected[0]) if expected[0] is not None else got[0] is None
    assert got[1] == pytest.approx(expected[1]) if expected[1] is not None else got[1] is None


def test_bare_number_drop_above_one_is_ambiguous():
    with pytest.raises(InvalidCriteriaError):
        parse_metric_drop("1")


def test_latency_and_duration_units():
    assert parse_latency_ms("5ms") == 5.0
    assert parse_latency_ms("0.2s") == 200.0
    assert parse_latency_ms("500us") == pytest.approx(0.5)
    assert parse_duration_s("10m") == 600
    assert parse_duration_s("1h") == 3600
    with pytest.raises(InvalidCriteriaError):
        parse_latency_ms("fast")


def test_default_accuracy_guard_and_limits():
    c = Criteria()
    assert c.max_metric_drop == 0.01
    c = criteria_from_strings(max_size="25%", max_accuracy_drop="2%rel")
    assert c.max_metric_drop is None and c.max_metric_drop_relative == pytest.approx(0.02)
    assert c.size_limit(1000) == 250
    assert c.allowed_drop(0.9) == pytest.approx(0.018)
    both = Criteria(max_size_bytes=200, max_size_ratio=0.5, max_metric_drop=0.01, max_metric_drop_relative=0.5)
    assert both.size_limit(1000) == 200
    assert both.allowed_drop(0.9) == pytest.approx(0.01)


def test_criteria_json_round_trip_and_strictness():
    c = criteria_from_strings(
        max_size="2MB", max_accuracy_drop="1%", max_latency="5ms", target="jetson orin", time_budget="10m"
    )
    assert Criteria.model_validate_json(c.model_dump_json()) == c
    with pytest.raises(ValueError):
        Criteria.model_validate({"max_sise_bytes": 3})


def test_control_rate_and_episodes():
    from robopt.domain.criteria import parse_rate_hz

    assert parse_rate_hz("20Hz") == 20 and parse_rate_hz("20") == 20 and parse_rate_hz("1kHz") == 1000
    assert parse_rate_hz("50ms") == pytest.approx(20)
    c = criteria_from_strings(control_rate="5 Hz", episodes="30")
    assert c.control_rate_hz == 5 and c.episodes == 30 and "control rate 5 Hz" in c.describe()
    with pytest.raises(InvalidCriteriaError):
        parse_rate_hz("fast")
    with pytest.raises(InvalidCriteriaError):
        criteria_from_strings(episodes="many")
