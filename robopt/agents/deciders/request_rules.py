"""Deterministic natural-language intake: pull the model and the criteria out of a request with patterns."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from robopt.domain.criteria import Criteria, criteria_from_strings
from robopt.errors import RequestNotUnderstoodError

_NUM = r"(\d+(?:\.\d+)?)"
_SIZE_UNIT = r"(?:[kmg]i?b|bytes?)"
_MODEL_EXTENSIONS = (".pt", ".pth", ".onnx", ".safetensors", ".keras", ".h5", ".bin", ".ts")
_HARDWARE = (
    r"jetson(?:[ -](?:agx|orin|nano|xavier|nx|tx2))*|orin(?:[ -](?:nano|nx|agx))?|raspberry[ -]?pi(?:[ -]?\d)?|"
    r"coral(?:[ -]tpu)?|hailo[\w-]*|x86(?:[-_]64)?|arm(?:64|v8|v9)?|apple[ -]m\d|cpu|gpu|h100|h200|a100|l4|t4"
)

EXAMPLES = (
    '"shrink digits-cnn to under 100 KB and lose at most 1% accuracy", '
    '"make ./policy.pt 4x smaller, under 5 ms, for a jetson orin"'
)


class ParsedRequest(BaseModel):
    """What a request asks for, with the fragments each value came from."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_size: str | None = None
    max_accuracy_drop: str | None = None
    max_latency: str | None = None
    target: str | None = None
    time_budget: str | None = None
    understood: list[str] = Field(default_factory=list)

    def criteria(self) -> Criteria:
        return criteria_from_strings(
            max_size=self.max_size,
            max_accuracy_drop=self.max_accuracy_drop,
            max_latency=self.max_latency,
            target=self.target,
            time_budget=self.time_budget,
        )


def _find_model(text: str, zoo_names: list[str]) -> str | None:
    for name in sorted(zoo_names, key=len, reverse=True):
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.IGNORECASE):
            return name
    for token in re.findall(r"[^\s'\"`,;]+", text):
        token = token.rstrip(".")
        if token.lower().endswith(_MODEL_EXTENSIONS) or token.startswith(("/", "./", "~/", "../", "artifact:")):
            return token
    return None


def _find_size(text: str) -> str | None:
    if m := re.search(rf"{_NUM}\s*(?:x|times)\s*smaller", text):
        return f"{m.group(1)}x"
    if m := re.search(rf"{_NUM}\s*%\s*of\s*(?:the|its)?\s*(?:original\s*)?size", text):
        return f"{m.group(1)}%"
    if m := re.search(rf"{_NUM}\s*({_SIZE_UNIT})\b", text):
        unit = m.group(2).lower()
        return f"{m.group(1)}{'b' if unit.startswith('byte') else unit}"
    return None


def _find_accuracy_drop(text: str) -> str | None:
    patterns = [
        rf"(?:lose|losing|loss of|drop(?:ping)?|sacrifice|give up)\D{{0,30}}?{_NUM}\s*(%|points?|pts?)",
        rf"{_NUM}\s*(%|points?|pts?)\s*(?:of\s*)?(?:accuracy|success)\s*(?:drop|loss)",
        rf"(?:accuracy|success)\s*(?:drop|loss)\D{{0,20}}?{_NUM}\s*(%|points?|pts?)",
        rf"(?:within|keep(?:ing)?)\s*{_NUM}\s*(%|points?|pts?)\s*of\s*(?:the\s*)?(?:original\s*)?(?:accuracy|success)",
    ]
    for pattern in patterns:
        if m := re.search(pattern, text):
            unit = "%" if m.group(2) == "%" else "pt"
            return f"{m.group(1)}{unit}"
    if re.search(r"(?:without|no)\s*(?:any\s*)?(?:accuracy|success)\s*(?:drop|loss)|lossless", text):
        return "0%"
    return None


def _find_latency(text: str) -> str | None:
    if m := re.search(rf"{_NUM}\s*(ms|milliseconds?|us|µs|microseconds?)\b", text):
        unit = {"m": "ms", "u": "us", "µ": "us"}[m.group(2)[0]]
        if m.group(2).startswith("micro"):
            unit = "us"
        return f"{m.group(1)}{unit}"
    if m := re.search(rf"{_NUM}\s*hz\b", text):
        hz = float(m.group(1))
        if hz > 0:
            return f"{1000.0 / hz:g}ms"
    return None


def _find_target(text: str) -> str | None:
    if m := re.search(
        rf"\b(?:on|for|to run on|deploy(?:ed)? (?:on|to))\s+(?:an?\s+|the\s+|my\s+)?({_HARDWARE})\b", text
    ):
        return m.group(1)
    return None


def _find_time_budget(text: str) -> str | None:
    if m := re.search(
        rf"(?:time budget|budget|within|in|spend(?:ing)? at most)\s*(?:of\s*)?{_NUM}\s*(minutes?|mins?|hours?|h)\b",
        text,
    ):
        return f"{m.group(1)}{'h' if m.group(2).startswith('h') else 'm'}"
    return None


def parse_request(text: str, zoo_names: list[str]) -> ParsedRequest:
    """Parse a request like "shrink digits-cnn to under 100 KB and lose at most 1% accuracy"."""
    lowered = text.lower()
    parsed = ParsedRequest(
        model=_find_model(text, zoo_names),
        max_size=_find_size(lowered),
        max_accuracy_drop=_find_accuracy_drop(lowered),
        max_latency=_find_latency(lowered),
        target=_find_target(lowered),
        time_budget=_find_time_budget(lowered),
    )
    parsed.understood = [f"{k}={v}" for k, v in parsed.model_dump(exclude={"understood"}).items() if v is not None]
    if parsed.model is None:
        raise RequestNotUnderstoodError(
            f"could not tell which model to optimize from: {text!r}",
            f"name a zoo model ({', '.join(zoo_names)}) or a model path; e.g. {EXAMPLES}",
        )
    return parsed
