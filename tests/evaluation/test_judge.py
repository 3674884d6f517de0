from robopt.domain.criteria import Criteria
from robopt.domain.records import Measurement
from robopt.evaluation.judge import check_criteria, judge_candidate


def m(size, latency, acc, finite=True, **extra):
    return Measurement(
        size_bytes=size,
        latency_ms_p50=latency,
        metrics={"accuracy": acc, **extra},
        primary_metric="accuracy",
        outputs_finite=finite,
    )


BASE = m(1000, 1.0, 0.95)


def test_accepts_smaller_within_accuracy_budget_and_reports_criteria():
    v = judge_candidate(m(300, 0.9, 0.945), BASE, BASE, Criteria(max_size_ratio=0.33, max_metric_drop=0.01))
    assert v.accepted and v.criteria_met


def test_rejects_accuracy_drop_beyond_budget():
    v = judge_candidate(m(300, 0.9, 0.93), BASE, BASE, Criteria(max_metric_drop=0.01))
    assert not v.accepted and "dropped" in v.reason


def test_relative_budget():
    c = Criteria(max_metric_drop_relative=0.05)
    assert judge_candidate(m(300, 0.9, 0.91), BASE, BASE, c).accepted
    assert not judge_candidate(m(300, 0.9, 0.90), BASE, BASE, c).accepted


def test_rejects_nan_outputs_even_if_metric_looks_fine():
    assert not judge_candidate(m(300, 0.9, 0.95, finite=False), BASE, BASE, Criteria()).accepted
    assert not judge_candidate(m(300, 0.9, 0.95, nonfinite_outputs=0.5), BASE, BASE, Criteria()).accepted


def test_rejects_no_gain_and_slower_under_latency_limit():
    assert "no gain" in judge_candidate(m(995, 0.99, 0.95), BASE, BASE, Criteria()).reason
    slower = judge_candidate(m(250, 3.0, 0.95), BASE, BASE, Criteria(max_latency_ms=5))
    assert not slower.accepted
    # without a latency limit, smaller-but-slower is kept and flagged
    kept = judge_candidate(m(250, 3.0, 0.95), BASE, BASE, Criteria())
    assert kept.accepted and "SLOWER" in kept.reason


def test_check_criteria_values_are_the_measurements():
    checks = {
        c.name: c for c in check_criteria(m(400, 2.0, 0.94), BASE, Criteria(max_size_bytes=500, max_latency_ms=1.5))
    }
    assert checks["size_bytes"].met and checks["size_bytes"].value == 400
    assert not checks["latency_ms_p50"].met and checks["latency_ms_p50"].value == 2.0
    assert checks["accuracy_drop"].value == 0.95 - 0.94


def closed_loop(size, outcomes):
    return Measurement(
        size_bytes=size,
        latency_ms_p50=0.1,
        metrics={"success_real": sum(outcomes) / len(outcomes)},
        samples={"success_real": [float(o) for o in outcomes]},
        primary_metric="success_real",
    )


CL_BASE = closed_loop(1000, [1] * 45 + [0] * 5)


def test_success_is_judged_by_paired_noninferiority_not_raw_difference():
    criteria = Criteria(max_size_ratio=0.5, max_metric_drop=0.10)
    # Raw drop 0.02 is within 0.10, and the paired test agrees: accepted.
    ok = closed_loop(300, [0] + [1] * 44 + [0] * 5)
    verdict = judge_candidate(ok, CL_BASE, CL_BASE, criteria)
    assert verdict.accepted and verdict.criteria_met
    check = next(c for c in check_criteria(ok, CL_BASE, criteria) if c.name == "success_real_drop")
    assert "Tango" in check.detail and check.met
    # Raw drop 0.08 is within 0.10, but 4 lost and 0 gained out of 50 cannot show the drop is under 0.10.
    lossy = closed_loop(300, [0] * 4 + [1] * 41 + [0] * 5)
    verdict = judge_candidate(lossy, CL_BASE, CL_BASE, criteria)
    assert not verdict.accepted and "NOT shown non-inferior" in verdict.reason


def test_success_margin_too_small_for_the_episode_count_says_how_to_fix_it():
    same = closed_loop(300, [1] * 45 + [0] * 5)
    verdict = judge_candidate(same, CL_BASE, CL_BASE, Criteria(max_metric_drop=0.01))
    assert not verdict.accepted and "--episodes" in verdict.reason


def test_unpaired_samples_fall_back_to_the_raw_difference():
    other = closed_loop(300, [1] * 44 + [0] * 5)  # 49 episodes: not the same seeds
    check = next(c for c in check_criteria(other, CL_BASE, Criteria(max_metric_drop=0.10)) if "drop" in c.name)
    assert check.met and check.detail == ""


def test_a_provisional_step_may_exceed_the_metric_budget_but_must_still_gain():
    c = Criteria(max_size_ratio=0.2, max_metric_drop=0.01)
    broken_but_small = m(100, 0.8, 0.80)
    v = judge_candidate(broken_but_small, BASE, BASE, c, provisional=True)
    assert v.accepted and v.provisional and not v.criteria_met
    assert v.reason.startswith("provisionally accepted") and "judged after the next step" in v.reason
    assert not judge_candidate(broken_but_small, BASE, BASE, c).accepted  # judged in full: rejected
    # deferring the metric never excuses NaN outputs or a step that gains nothing
    assert not judge_candidate(m(100, 0.8, 0.80, finite=False), BASE, BASE, c, provisional=True).accepted
    assert not judge_candidate(m(1000, 1.0, 0.80), BASE, BASE, c, provisional=True).accepted
    # within budget anyway: an ordinary acceptance, nothing deferred
    fine = judge_candidate(m(100, 0.8, 0.945), BASE, BASE, c, provisional=True)
    assert fine.accepted and not fine.provisional and fine.criteria_met
