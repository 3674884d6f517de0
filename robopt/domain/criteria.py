"""What the user asks for: size, accuracy, latency, hardware and time limits, parsed from text or numbers."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from robopt.errors import InvalidCriteriaError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


class Criteria(BaseModel):
    """Acceptance criteria for an optimization run. Every limit is optional."""

    model_config = ConfigDict(extra="forbid")

    max_size_bytes: int | None = Field(default=None, gt=0, description="Largest acceptable model size on disk.")
    max_size_ratio: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Largest acceptable size as a fraction of the original (0.25 = 4x smaller).",
    )
    max_metric_drop: float | None = Field(
        default=None,
        ge=0,
        description="Largest acceptable drop of the task metric, absolute (0.01 = 1 point of accuracy).",
    )
    max_metric_drop_relative: float | None = Field(
        default=None, ge=0, le=1, description="Largest acceptable drop of the task metric relative to the baseline."
    )
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="Largest acceptable p50 latency on this machine."
    )
    target: str | None = Field(
        default=None,
        description="Target device (a profile name such as 'jetson-orin-nano-8gb'); closed-loop evaluation predicts "
        "the model's latency there instead of measuring it here.",
    )
    control_rate_hz: float | None = Field(
        default=None,
        gt=0,
        description="The robot's control rate: closed-loop evaluation turns inference latency into control ticks.",
    )
    confidence: float = Field(
        default=0.95, ge=0.5, lt=1, description="Confidence of statistical decisions (paired non-inferiority)."
    )
    episodes: int | None = Field(
        default=None, gt=0, le=100_000, description="Seeded closed-loop episodes per model (paired before/after)."
    )
    time_budget_s: float | None = Field(default=None, gt=0, description="Stop starting new attempts after this long.")

    @model_validator(mode="after")
    def _default_accuracy_guard(self) -> Criteria:
        # Without any accuracy limit, a run could "succeed" with a broken model; 1 point is the default guard.
        if self.max_metric_drop is None and self.max_metric_drop_relative is None:
            self.max_metric_drop = 0.01
        return self

    def size_limit(self, baseline_size: int) -> int | None:
        """The binding size limit in bytes, given the original size."""
        limits = []
        if self.max_size_bytes is not None:
            limits.append(self.max_size_bytes)
        if self.max_size_ratio is not None:
            limits.append(int(baseline_size * self.max_size_ratio))
        return min(limits) if limits else None

    def allowed_drop(self, baseline_metric: float) -> float:
        """The binding metric drop (absolute), given the original metric value."""
        drops = []
        if self.max_metric_drop is not None:
            drops.append(self.max_metric_drop)
        if self.max_metric_drop_relative is not None:
            drops.append(abs(baseline_metric) * self.max_metric_drop_relative)
        return min(drops)

    def describe(self) -> str:
        parts = []
        if self.max_size_bytes is not None:
            parts.append(f"size <= {format_bytes(self.max_size_bytes)}")
        if self.max_size_ratio is not None:
            parts.append(f"size <= {self.max_size_ratio:.0%} of original")
        if self.max_metric_drop is not None:
            parts.append(f"metric drop <= {self.max_metric_drop:g}")
        if self.max_metric_drop_relative is not None:
            parts.append(f"metric drop <= {self.max_metric_drop_relative:.1%} relative")
        if self.max_latency_ms is not None:
            parts.append(f"latency p50 <= {self.max_latency_ms:g} ms")
        if self.target:
            parts.append(f"target {self.target}")
        if self.control_rate_hz is not None:
            parts.append(f"control rate {self.control_rate_hz:g} Hz")
        if self.episodes is not None:
            parts.append(f"{self.episodes} episodes")
        if self.time_budget_s is not None:
            parts.append(f"time budget {self.time_budget_s:g} s")
        return ", ".join(parts)


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_size(text: str) -> tuple[int | None, float | None]:
    """'2MB' -> (2_000_000, None); '25%' -> (None, 0.25); '4x' -> (None, 0.25). KB/MB are decimal, KiB/MiB binary."""
    s = text.strip().lower().replace(" ", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%", s):
        ratio = float(m.group(1)) / 100
        if not 0 < ratio <= 1:
            raise InvalidCriteriaError(f"size ratio {text!r} must be between 0% and 100%", "e.g. --max-size 25%")
        return None, ratio
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)x(?:smaller)?", s):
        factor = float(m.group(1))
        if factor < 1:
            raise InvalidCriteriaError(
                f"size factor {text!r} must be at least 1x", "e.g. --max-size 4x (4 times smaller)"
            )
        return None, 1 / factor
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]i?b|b)?", s):
        value = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
        if value <= 0:
            raise InvalidCriteriaError(f"size {text!r} must be positive")
        return int(value), None
    raise InvalidCriteriaError(
        f"cannot read size {text!r}", "use bytes with a unit (500KB, 2MB, 1.5MiB), a ratio (25%) or a factor (4x)"
    )


def parse_metric_drop(text: str) -> tuple[float | None, float | None]:
    """'1%' or '0.01' or '1pt' -> (0.01, None) absolute; '2%rel' -> (None, 0.02) relative to the baseline."""
    s = text.strip().lower().replace(" ", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)%?(rel|relative)", s):
        return None, float(m.group(1)) / (100 if "%" in s else 1)
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)(%|pts?|points?)", s):
        return float(m.group(1)) / 100, None
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)", s):
        value = float(m.group(1))
        if value >= 1:
            raise InvalidCriteriaError(
                f"metric drop {text!r} is ambiguous", "write 1% (one point of accuracy) or 0.01 (same, as a fraction)"
            )
        return value, None
    raise InvalidCriteriaError(
        f"cannot read metric drop {text!r}", "use 1% or 0.01 (absolute points), or 2%rel (relative to the original)"
    )


def parse_latency_ms(text: str) -> float:
    """'5ms' -> 5.0; '0.5s' -> 500.0; '200us' -> 0.2; a bare number is milliseconds."""
    s = text.strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|us|µs)?", s)
    if not m:
        raise InvalidCriteriaError(f"cannot read latency {text!r}", "use e.g. 5ms, 0.2s or 500us")
    value = float(m.group(1)) * {"ms": 1.0, None: 1.0, "s": 1000.0, "us": 0.001, "µs": 0.001}[m.group(2)]
    if value <= 0:
        raise InvalidCriteriaError(f"latency {text!r} must be positive")
    return value


def parse_duration_s(text: str) -> float:
    """'90s', '10m', '1h', or a bare number of seconds."""
    s = text.strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|sec|m|min|h)?", s)
    if not m:
        raise InvalidCriteriaError(f"cannot read duration {text!r}", "use e.g. 90s, 10m or 1h")
    return float(m.group(1)) * {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]


def parse_rate_hz(text: str) -> float:
    """'20Hz', '20 hz', '20', '1kHz' -> Hz; '50ms' (a period) -> 20.0."""
    s = text.strip().lower().replace(" ", "")
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)(hz|khz|/s)?", s):
        value = float(m.group(1)) * (1000.0 if m.group(2) == "khz" else 1.0)
    elif re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|us|µs)", s):
        value = 1000.0 / parse_latency_ms(s)
    else:
        raise InvalidCriteriaError(f"cannot read control rate {text!r}", "use e.g. 20Hz, or a period such as 50ms")
    if value <= 0:
        raise InvalidCriteriaError(f"control rate {text!r} must be positive", "e.g. --control-rate 20Hz")
    return value


def criteria_from_strings(
    *,
    max_size: str | None = None,
    max_accuracy_drop: str | None = None,
    max_latency: str | None = None,
    target: str | None = None,
    time_budget: str | None = None,
    control_rate: str | None = None,
    episodes: int | str | None = None,
) -> Criteria:
    """Build Criteria from the CLI's textual options."""
    size_bytes, size_ratio = parse_size(max_size) if max_size else (None, None)
    drop_abs, drop_rel = parse_metric_drop(max_accuracy_drop) if max_accuracy_drop else (None, None)
    return Criteria(
        max_size_bytes=size_bytes,
        max_size_ratio=size_ratio,
        max_metric_drop=drop_abs,
        max_metric_drop_relative=drop_rel,
        max_latency_ms=parse_latency_ms(max_latency) if max_latency else None,
        target=target,
        time_budget_s=parse_duration_s(time_budget) if time_budget else None,
        control_rate_hz=parse_rate_hz(control_rate) if control_rate else None,
        episodes=_parse_episodes(episodes),
    )


def _parse_episodes(value: int | str | None) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise InvalidCriteriaError(f"cannot read episode count {value!r}", "use a whole number, e.g. 50") from None
