"""Wilson intervals and the paired non-inferiority (Tango score) test on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from robopt.errors import EvaluationError
from robopt.evaluation.statistics import (
    _constrained_p10,
    paired_noninferiority,
    smallest_demonstrable_margin,
    wilson_interval,
)


def test_wilson_interval_known_values() -> None:
    # Reference values from the closed-form Wilson interval (e.g. Agresti & Coull 1998 tables / statsmodels).
    low, high = wilson_interval(45, 50)
    assert low == pytest.approx(0.7864, abs=1e-4) and high == pytest.approx(0.9565, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] < 1.0
    with pytest.raises(EvaluationError):
        wilson_interval(3, 0)
    with pytest.raises(EvaluationError):
        wilson_interval(11, 10)


@pytest.mark.parametrize(
    ("losses", "gains", "n", "delta0"), [(3, 1, 50, -0.1), (0, 0, 50, -0.1), (5, 0, 40, -0.05), (2, 6, 30, -0.2)]
)
def test_constrained_mle_matches_numerical_maximum(losses: int, gains: int, n: int, delta0: float) -> None:
    rest = n - losses - gains

    def negative_log_likelihood(p: float) -> float:
        return -(
            losses * math.log(max(p, 1e-300))
            + gains * math.log(max(p + delta0, 1e-300))
            + rest * math.log(max(1 - 2 * p - delta0, 1e-300))
        )

    bounds = (max(0.0, -delta0) + 1e-12, (1 - delta0) / 2 - 1e-12)
    numeric = minimize_scalar(negative_log_likelihood, bounds=bounds, method="bounded", options={"xatol": 1e-12}).x
    assert _constrained_p10(losses, gains, n, delta0) == pytest.approx(numeric, abs=1e-6)


def test_identical_outcomes_are_non_inferior_with_a_reasonable_margin() -> None:
    outcomes = [1] * 45 + [0] * 5
    result = paired_noninferiority(outcomes, outcomes, margin=0.10)
    assert result.non_inferior and result.difference == 0 and result.losses == result.gains == 0


def test_a_broken_model_is_rejected() -> None:
    result = paired_noninferiority([1] * 45 + [0] * 5, [0] * 50, margin=0.10)
    assert not result.non_inferior and result.losses == 45 and result.p_value > 0.5


def test_a_few_lost_episodes_within_noise_pass_but_a_real_drop_does_not() -> None:
    original = [1] * 90 + [0] * 10
    one_lost = [0] + [1] * 89 + [0] * 10
    assert paired_noninferiority(original, one_lost, margin=0.10).non_inferior
    twelve_lost = [0] * 12 + [1] * 78 + [0] * 10
    result = paired_noninferiority(original, twelve_lost, margin=0.10)
    assert not result.non_inferior and result.lower_bound < -0.10


def test_pairing_matters_discordant_pairs_carry_the_evidence() -> None:
    # Same marginal success (80% -> 76%) but different pairing: 2 losses vs 10 losses + 8 gains.
    original = [1] * 40 + [0] * 10
    consistent = [1] * 38 + [0] * 2 + [0] * 10
    shuffled = [0] * 10 + [1] * 30 + [1] * 8 + [0] * 2
    assert sum(consistent) == sum(shuffled)
    a = paired_noninferiority(original, consistent, margin=0.15)
    b = paired_noninferiority(original, shuffled, margin=0.15)
    assert a.lower_bound > b.lower_bound
    assert a.non_inferior and not b.non_inferior


def test_too_few_episodes_cannot_show_a_tiny_margin() -> None:
    outcomes = [1] * 20
    assert not paired_noninferiority(outcomes, outcomes, margin=0.01).non_inferior
    needed = smallest_demonstrable_margin(20)
    assert paired_noninferiority(outcomes, outcomes, margin=needed + 0.01).non_inferior


def test_lower_bound_inverts_the_test() -> None:
    rng = np.random.default_rng(0)
    original = rng.random(60) < 0.8
    candidate = np.where(rng.random(60) < 0.1, ~original, original)
    result = paired_noninferiority(list(original), list(candidate), margin=0.10)
    assert result.lower_bound <= result.difference
    # The test passes exactly for margins beyond the bound.
    assert paired_noninferiority(list(original), list(candidate), margin=-result.lower_bound + 0.01).non_inferior
    assert not paired_noninferiority(list(original), list(candidate), margin=-result.lower_bound - 0.01).non_inferior


def test_bad_inputs_raise() -> None:
    with pytest.raises(EvaluationError, match="same seeded episodes"):
        paired_noninferiority([1, 0], [1], margin=0.1)
    with pytest.raises(EvaluationError):
        paired_noninferiority([], [], margin=0.1)
    with pytest.raises(EvaluationError):
        paired_noninferiority([1], [1], margin=0.1, confidence=1.5)
