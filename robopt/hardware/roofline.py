"""Roofline predictions of batch-1 latency and memory of a model on a device profile.

These are *lower bounds* on latency (and best-case memory): a stage cannot run faster than its arithmetic at
the device's peak FLOP/s, nor faster than streaming its bytes at the peak bandwidth, so
    latency >= max(flops / peak_flops[dtype], bytes_moved / bandwidth).
Real kernels reach a fraction of both peaks (kernel launches, attention, dequantization, caches), so measured
latencies are higher. A decoder LLM generating one token at batch 1 reads every weight once and does ~2 FLOPs
per weight: it is memory-bound, and its per-token latency is weight bytes / bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from robopt.errors import InvalidCriteriaError
from robopt.hardware.devices import DeviceProfile, get_device

Precision = Literal["fp32", "bf16", "fp16", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "int8", "int4")

# The peak used for a compute dtype, first available wins: a device without bf16 arithmetic runs bf16 models at
# its fp16 (else fp32) rate; int4 falls back to int8 then 16-bit (weight-only int4 kernels dequantize).
_PEAK_ORDER: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "fp16": ("fp16", "bf16", "fp32"),
    "bf16": ("bf16", "fp16", "fp32"),
    "int8": ("int8", "fp16", "bf16", "fp32"),
    "int4": ("int4", "int8", "fp16", "bf16", "fp32"),
}
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "qint8": "int8",
    "w8a8": "int8",
    "w4a4": "int4",
}

# What each precision computes in. int8 = W8A8 (int8 arithmetic); int4 = weight-only W4A16 (AWQ, GPTQ, nf4):
# 4-bit weights, 16-bit arithmetic.
PRECISION_COMPUTE_DTYPE: dict[Precision, str] = {
    "fp32": "fp32",
    "bf16": "bf16",
    "fp16": "fp16",
    "int8": "int8",
    "int4": "bf16",
}
INT4_GROUP_SIZE = 128


def normalize_dtype(dtype: str) -> str:
    """'fp32', 'fp16', 'bf16', 'int8' or 'int4' for any usual spelling (float32, torch.bfloat16, half...)."""
    key = dtype.strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in _PEAK_ORDER:
        raise InvalidCriteriaError(f"unknown compute dtype {dtype!r}", f"one of: {', '.join(_PEAK_ORDER)}")
    return key


def _profile(device: DeviceProfile | str) -> DeviceProfile:
    return device if isinstance(device, DeviceProfile) else get_device(device)


def peak_flops_for(device: DeviceProfile | str, dtype: str) -> tuple[str, float]:
    """(the dtype whose peak applies, that peak in FLOP/s) for compute in `dtype` on `device`."""
    profile = _profile(device)
    for key in _PEAK_ORDER[normalize_dtype(dtype)]:
        if key in profile.peak_flops:
            return key, profile.peak_flops[key]  # type: ignore[index]
    raise InvalidCriteriaError(
        f"device {profile.name!r} lists no peak FLOP/s usable for {dtype!r}", "give its peak_flops an fp32 entry"
    )


@dataclass(frozen=True)
class RooflinePoint:
    """One stage on one device: both bounds, the binding one, and which peak was used."""

    compute_ms: float
    memory_ms: float
    peak_dtype: str

    @property
    def latency_ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def bound(self) -> Literal["compute", "memory"]:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


def roofline(flops: float, bytes_moved: float, dtype: str, device: DeviceProfile | str) -> RooflinePoint:
    """Compute-time and memory-time lower bounds of a stage doing `flops` and moving `bytes_moved`."""
    if flops < 0 or bytes_moved < 0:
        raise InvalidCriteriaError(
            f"flops ({flops}) and bytes ({bytes_moved}) must not be negative", "pass counts from the model"
        )
    profile = _profile(device)
    peak_dtype, peak = peak_flops_for(profile, dtype)
    return RooflinePoint(
        compute_ms=1e3 * flops / peak,
        memory_ms=1e3 * bytes_moved / profile.memory_bandwidth_Bps,
        peak_dtype=peak_dtype,
    )


def predict_latency_ms(flops: float, weight_bytes: float, dtype: str, device: DeviceProfile | str) -> float:
    """Roofline lower bound of one batch-1 forward: max(flops / peak_flops[dtype], weight_bytes / bandwidth), ms.

    `dtype` is the arithmetic's dtype (fp32, fp16, bf16, int8, int4; see `peak_flops_for` for fallbacks);
    `weight_bytes` the bytes the forward reads (its weights, activations being small at batch 1).
    """
    return roofline(flops, weight_bytes, dtype, device).latency_ms


def decode_token_latency_ms(weight_bytes: float, device: DeviceProfile | str, kv_cache_bytes: float = 0.0) -> float:
    """Memory-bound time of one decoder-LLM token at batch 1: (weights + KV cache read) / bandwidth, in ms."""
    return 1e3 * (weight_bytes + kv_cache_bytes) / _profile(device).memory_bandwidth_Bps


@dataclass(frozen=True)
class WeightCensus:
    """Parameter counts split by how quantization schemes store them.

    `linear_weights`: elements of nn.Linear weight matrices (what int8/int4 schemes quantize); `linear_rows`:
    their output channels; `other`: every other parameter (embeddings, norms, biases, convolutions, tokens),
    which stays in 16-bit under int8/int4 schemes.
    """

    linear_weights: int
    linear_rows: int
    other: int

    @property
    def total(self) -> int:
        return self.linear_weights + self.other

    @classmethod
    def of(cls, modules: Iterable[nn.Module], exclude: Iterable[nn.Module] = ()) -> WeightCensus:
        """Census of the parameters under `modules` (each counted once), leaving out those under `exclude`."""
        skip = {id(p) for m in exclude for p in m.parameters()}
        seen: set[int] = set()
        linear_weights = linear_rows = other = 0
        for module in modules:
            for sub in module.modules():
                for name, p in sub.named_parameters(recurse=False):
                    if id(p) in seen or id(p) in skip:
                        continue
                    seen.add(id(p))
                    if isinstance(sub, nn.Linear) and name == "weight":
                        linear_weights += p.numel()
                        linear_rows += p.shape[0]
                    else:
                        other += p.numel()
        return cls(linear_weights, linear_rows, other)


def weight_bytes(census: WeightCensus, precision: Precision, group_size: int = INT4_GROUP_SIZE) -> int:
    """Bytes of the weights stored at `precision`, scales included.

    fp32: 4 B/param; bf16/fp16: 2 B/param; int8: 1 B per Linear weight + one fp32 scale per output channel;
    int4: 0.5 B per Linear weight + an fp16 scale and an fp16 zero point per group of `group_size` weights
    (AWQ/GPTQ layout). Under int8/int4 the other parameters stay in 16-bit.
    """
    match precision:
        case "fp32":
            return 4 * census.total
        case "bf16" | "fp16":
            return 2 * census.total
        case "int8":
            return census.linear_weights + 4 * census.linear_rows + 2 * census.other
        case "int4":
            return (
                math.ceil(census.linear_weights / 2)
                + 4 * math.ceil(census.linear_weights / group_size)
                + (2 * census.other)
            )
    raise InvalidCriteriaError(f"unknown precision {precision!r}", f"one of: {', '.join(PRECISIONS)}, fp16")


def kv_element_bytes(precision: Precision) -> int:
    """KV-cache element size: fp32 models keep an fp32 cache, every other precision a 16-bit one."""
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class MemoryFit:
    """Memory a model needs on a device against what the device has (best case: nothing else resident)."""

    required_bytes: int
    device_bytes: int

    @property
    def fits(self) -> bool:
        return self.required_bytes <= self.device_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.device_bytes - self.required_bytes


def memory_fit(required_bytes: int, device: DeviceProfile | str) -> MemoryFit:
    """Whether `required_bytes` fits the device's memory (on SoCs the OS shares it: a real margin is smaller)."""
    return MemoryFit(required_bytes=int(required_bytes), device_bytes=_profile(device).memory_bytes)
