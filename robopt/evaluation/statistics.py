"""Statistics for success rates: Wilson intervals and the paired non-inferiority test behind closed-loop decisions.

Why a paired non-inferiority test. Before and after compression the same seeded episodes are run, so each
episode gives a pair (original succeeded?, candidate succeeded?). The question is not "did success change?"
(McNemar's test) but "is the candidate no worse than the original by more than a margin?", and it must hold at
a stated confidence so that the luck of a few episodes neither passes a broken model nor rejects a good one.
An unpaired two-proportion test would throw the pairing away (most episodes agree, which is information); a
Wald interval on the paired difference collapses when there are few discordant pairs. Tango's score test
(Tango 1998, Statistics in Medicine 17:891-908) is the standard test of non-inferiority for paired binary
outcomes and keeps its level at small sample sizes, so it is the one used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import norm

from robopt.errors import EvaluationError


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval for a binomial proportion (good coverage even at 0% or 100%)."""
    _check_confidence(confidence)
    if n <= 0:
        raise EvaluationError("a success-rate interval needs at least one episode", "run more episodes")
    if not 0 <= successes <= n:
        raise EvaluationError(f"successes ({successes}) must lie between 0 and the episode count ({n})")
    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class NonInferiority:
    """Outcome of the paired test of H0: p_candidate - p_original <= -margin against H1: > -margin."""

    non_inferior: bool
    difference: float  # observed p_candidate - p_original
    lower_bound: float  # one-sided lower confidence bound of the difference (inverted score test)
    z: float
    p_value: float
    losses: int  # episodes the original solved and the candidate failed
    gains: int  # episodes the candidate solved and the original failed
    n: int
    margin: float
    confidence: float

    def describe(self) -> str:
        verdict = "non-inferior" if self.non_inferior else "NOT shown non-inferior"
        return (
            f"{verdict}: success change {self.difference:+.3f} over {self.n} paired episodes "
            f"({self.losses} lost, {self.gains} gained), one-sided {self.confidence:.0%} lower bound "
            f"{self.lower_bound:+.3f} vs margin -{self.margin:.3f} (Tango score test, p={self.p_value:.3g})"
        )


def smallest_demonstrable_margin(n: int, confidence: float = 0.95) -> float:
    """The smallest margin for which even n identical outcomes establish non-inferiority: z^2 / (n + z^2)."""
    z = float(norm.ppf(confidence))
    return z * z / (n + z * z)


def _constrained_p10(losses: int, gains: int, n: int, delta0: float) -> float:
    """Maximum-likelihood P(original succeeds, candidate fails) under p01 - p10 = delta0.

    Setting the derivative of b*log(p) + c*log(p + d) + (n-b-c)*log(1 - 2p - d) to zero gives
    2n p^2 - B p - b d (1 - d) = 0 with B = (b + c) - d (2n + b - c); the positive root is the MLE.
    """
    b, c = losses, gains
    big_b = (b + c) - delta0 * (2 * n + b - c)
    discriminant = big_b * big_b + 8 * n * b * delta0 * (1 - delta0)
    p = (big_b + math.sqrt(max(discriminant, 0.0))) / (4 * n)
    return min(max(p, max(0.0, -delta0)), (1 - delta0) / 2)


def _score_z(losses: int, gains: int, n: int, delta0: float) -> float:
    p10 = _constrained_p10(losses, gains, n, delta0)
    variance = n * (2 * p10 + delta0 - delta0 * delta0)
    excess = gains - losses - n * delta0
    if variance <= 1e-15:
        return math.inf if excess > 0 else (0.0 if excess == 0 else -math.inf)
    return excess / math.sqrt(variance)


def paired_noninferiority(
    original: Sequence[float | bool], candidate: Sequence[float | bool], margin: float, confidence: float = 0.95
) -> NonInferiority:
    """Tango's score test for paired binary outcomes (same episodes, same seeds, same order)."""
    _check_confidence(confidence)
    if len(original) != len(candidate):
        raise EvaluationError(
            f"paired outcomes differ in length ({len(original)} vs {len(candidate)})",
            "both models must be evaluated on the same seeded episodes (same --episodes)",
        )
    n = len(original)
    if n == 0:
        raise EvaluationError("no paired episodes to compare", "run at least one episode")
    if not 0 <= margin < 1:
        raise EvaluationError(f"non-inferiority margin must be in [0, 1), got {margin}")
    losses = sum(1 for a, b in zip(original, candidate, strict=True) if bool(a) and not bool(b))
    gains = sum(1 for a, b in zip(original, candidate, strict=True) if not bool(a) and bool(b))
    z_crit = float(norm.ppf(confidence))
    z = _score_z(losses, gains, n, -margin)
    difference = (gains - losses) / n
    return NonInferiority(
        non_inferior=z > z_crit,
        difference=difference,
        lower_bound=_lower_bound(losses, gains, n, z_crit, difference),
        z=z,
        p_value=float(norm.sf(z)) if math.isfinite(z) else (0.0 if z > 0 else 1.0),
        losses=losses,
        gains=gains,
        n=n,
        margin=margin,
        confidence=confidence,
    )


def _lower_bound(losses: int, gains: int, n: int, z_crit: float, difference: float) -> float:
    """The smallest delta0 the score test does not reject at z_crit (bisection; z falls as delta0 rises)."""
    low, high = -1.0 + 1e-9, difference
    if _score_z(losses, gains, n, low) <= z_crit:
        return -1.0
    for _ in range(60):
        mid = (low + high) / 2
        if _score_z(losses, gains, n, mid) > z_crit:
            low = mid
        else:
            high = mid
    return low


def _check_confidence(confidence: float) -> None:
    if not 0.5 <= confidence < 1:
        raise EvaluationError(f"confidence must be in [0.5, 1), got {confidence}", "e.g. 0.95")
