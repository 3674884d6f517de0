"""Target-device profiles: memory, bandwidth and peak FLOP/s per dtype, for roofline latency predictions.

The named profiles hold *published peak* figures (vendor datasheets and whitepapers; dense, i.e. without 2:4
sparsity). Where a datasheet gives only a headline figure, the others are derived from it and the derivation is
written in `note`. `this-machine` is *measured* once with small torch benchmarks and cached in the data dir.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from robopt.errors import InvalidCriteriaError
from robopt.progress import Progress

DeviceKind = Literal["cpu", "gpu", "soc"]
PeakDtype = Literal["fp32", "fp16", "bf16", "int8", "int4"]
THIS_MACHINE = "this-machine"
CALIBRATION_FILE = Path("hardware") / "this-machine.json"
GiB = 2**30


class DeviceProfile(BaseModel):
    """What a device can move and compute at best. Integer entries of `peak_flops` are OP/s."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: DeviceKind = Field(description="cpu, gpu, or soc (an integrated GPU sharing the CPU's memory)")
    memory_bytes: int = Field(gt=0, description="memory the model can live in (a SoC shares it with the OS)")
    memory_bandwidth_Bps: float = Field(gt=0, description="bytes per second between memory and the compute units")
    peak_flops: dict[PeakDtype, float] = Field(description="dense peak FLOP/s (OP/s for integers) by dtype")
    figures: Literal["published-peak", "measured"]
    source: str = Field(description="where the figures come from")
    note: str = ""


_PUBLISHED = [
    DeviceProfile(
        name="jetson-orin-nano-8gb",
        kind="soc",
        memory_bytes=8 * GiB,
        memory_bandwidth_Bps=68e9,
        peak_flops={"fp32": 1.28e12, "fp16": 10e12, "bf16": 10e12, "int8": 20e12},
        figures="published-peak",
        source="NVIDIA Jetson Orin Nano Series datasheet (Orin Nano 8GB module: 1024-core Ampere GPU with 32 "
        "tensor cores at 625 MHz, 8 GB 128-bit LPDDR5 at 68 GB/s, 40 sparse INT8 TOPS)",
        note="dense INT8 = the sparse 40 TOPS / 2; FP16/BF16 = dense INT8 / 2 (Ampere tensor cores); FP32 = "
        "1024 cores x 2 x 625 MHz. Memory is shared with the CPU and OS. See jetson-orin-nano-8gb-super.",
    ),
    DeviceProfile(
        name="jetson-orin-nano-8gb-super",
        kind="soc",
        memory_bytes=8 * GiB,
        memory_bandwidth_Bps=102e9,
        peak_flops={"fp32": 2.09e12, "fp16": 16.75e12, "bf16": 16.75e12, "int8": 33.5e12},
        figures="published-peak",
        source="NVIDIA Jetson Orin Nano Super announcement / JetPack 6.2 'MAXN SUPER' mode (GPU at 1020 MHz, "
        "102 GB/s, 67 sparse INT8 TOPS)",
        note="the same module as jetson-orin-nano-8gb in the higher-power mode; derived as for that profile",
    ),
    DeviceProfile(
        name="jetson-agx-orin-64gb",
        kind="soc",
        memory_bytes=64 * GiB,
        memory_bandwidth_Bps=204.8e9,
        peak_flops={"fp32": 5.3e12, "fp16": 42.5e12, "bf16": 42.5e12, "int8": 85e12},
        figures="published-peak",
        source="NVIDIA Jetson AGX Orin Series datasheet (AGX Orin 64GB: 2048-core Ampere GPU with 64 tensor "
        "cores at 1.3 GHz, 5.3 FP32 TFLOPS, 170 sparse INT8 TOPS; 64 GB 256-bit LPDDR5 at 204.8 GB/s)",
        note="GPU only: the two DLAs (105 sparse INT8 TOPS of the 275 TOPS headline) are not counted. "
        "Dense INT8 = 170 / 2; FP16/BF16 = dense INT8 / 2. Memory is shared with the CPU and OS.",
    ),
    DeviceProfile(
        name="raspberry-pi-5",
        kind="cpu",
        memory_bytes=8 * GiB,
        memory_bandwidth_Bps=17.07e9,
        peak_flops={"fp32": 153.6e9, "fp16": 307.2e9, "int8": 614.4e9},
        figures="published-peak",
        source="Raspberry Pi 5 product brief (BCM2712: 4x Arm Cortex-A76 at 2.4 GHz, LPDDR4X-4267 on a 32-bit "
        "bus) and the Arm Cortex-A76 Software Optimization Guide (two 128-bit NEON FMA pipes, SDOT)",
        note="derived: per core and cycle 16 FP32 FLOP (2 pipes x 4 lanes x FMA), 32 FP16 FLOP, 64 INT8 OP "
        "(SDOT); bandwidth = 4267 MT/s x 4 bytes. No BF16 arithmetic on the A76. The 8 GB board (4 and 16 GB "
        "exist); inference runs on the CPU cores.",
    ),
    DeviceProfile(
        name="nvidia-h100-sxm",
        kind="gpu",
        memory_bytes=80 * GiB,
        memory_bandwidth_Bps=3.35e12,
        peak_flops={"fp32": 67e12, "fp16": 989.4e12, "bf16": 989.4e12, "int8": 1978.9e12},
        figures="published-peak",
        source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (80 GB HBM3 at 3.35 TB/s)",
        note="FP16/BF16/INT8 are dense tensor-core figures (the datasheet's headline doubles them with "
        "sparsity); FP32 is the non-tensor figure (TF32 tensor: 494.7 TFLOPS). Hopper has no INT4 tensor path.",
    ),
    DeviceProfile(
        name="nvidia-rtx-4090",
        kind="gpu",
        memory_bytes=24 * GiB,
        memory_bandwidth_Bps=1008e9,
        peak_flops={"fp32": 82.6e12, "fp16": 165.2e12, "bf16": 165.2e12, "int8": 660.6e12, "int4": 1321.2e12},
        figures="published-peak",
        source="NVIDIA Ada Lovelace GPU Architecture whitepaper, appendix (GeForce RTX 4090: 24 GB GDDR6X at "
        "1008 GB/s)",
        note="dense tensor-core figures; FP16/BF16 with FP32 accumulate (what frameworks use; 330.3 TFLOPS "
        "with FP16 accumulate)",
    ),
]
PUBLISHED_DEVICES: dict[str, DeviceProfile] = {d.name: d for d in _PUBLISHED}

_ALIASES = {
    "jetson-orin-nano-8gb": ["jetson orin nano", "orin nano", "orin nano 8gb", "jetson orin nano 8gb"],
    "jetson-orin-nano-8gb-super": ["jetson orin nano super", "orin nano super"],
    "jetson-agx-orin-64gb": ["jetson agx orin", "agx orin", "agx orin 64gb", "jetson agx orin 64gb"],
    "raspberry-pi-5": ["raspberry pi 5", "raspberry pi", "rpi5", "rpi 5", "pi5", "pi 5"],
    "nvidia-h100-sxm": ["h100", "h100 sxm", "nvidia h100", "h100 sxm5", "h100 80gb"],
    "nvidia-rtx-4090": ["rtx 4090", "4090", "geforce rtx 4090", "nvidia 4090"],
    THIS_MACHINE: ["this machine", "local", "localhost", "host"],
}


def _normalize(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


_LOOKUP = {_normalize(alias): canonical for canonical, aliases in _ALIASES.items() for alias in [canonical, *aliases]}


def device_names() -> list[str]:
    """The canonical names of every profile, `this-machine` last."""
    return [*PUBLISHED_DEVICES, THIS_MACHINE]


def resolve_device_name(name: str) -> str:
    """The canonical profile name for `name` (case, spaces, hyphens and underscores ignored; aliases accepted)."""
    canonical = _LOOKUP.get(_normalize(name))
    if canonical is None:
        raise InvalidCriteriaError(
            f"unknown target device {name!r}",
            f"known devices: {', '.join(device_names())} (aliases such as 'jetson orin nano' or 'rtx 4090' work)",
        )
    return canonical


def get_device(name: str, *, data_dir: Path | None = None, progress: Progress | None = None) -> DeviceProfile:
    """The profile named `name`; `this-machine` is measured on first use and cached under `data_dir`."""
    canonical = resolve_device_name(name)
    if canonical == THIS_MACHINE:
        return calibrate_this_machine(data_dir, progress=progress)
    return PUBLISHED_DEVICES[canonical]


# ---- this machine: measured once, cached ------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int:
    """Physical memory, or the cgroup (container) limit when that is lower."""
    total = psutil.virtual_memory().total
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def _threads() -> int:
    from robopt.settings import Settings

    return Settings().effective_threads()


def _machine_key(threads: int) -> dict[str, str | int]:
    """What the calibration depends on: a cached one is reused only when all of it matches."""
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count() or 1,
        "threads": threads,
        "torch": torch.__version__,
        "memory_bytes": _memory_bytes(),
    }


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


BANDWIDTH_BYTES = 256 * 2**20  # well above any last-level cache
MATMUL_N = 1536
REPEATS = 3


def _measure_bandwidth() -> float:
    """Read bandwidth: summing a 256 MiB float32 tensor reads every byte once, like a weight-streaming GEMV."""
    x = torch.ones(BANDWIDTH_BYTES // 4)
    return BANDWIDTH_BYTES / _best_seconds(lambda: x.sum(), REPEATS + 2)


def _measure_matmul(dtype: torch.dtype) -> float:
    n = MATMUL_N
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.int8:
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=gen)
        return 2 * n**3 / _best_seconds(lambda: torch._int_mm(a, b), REPEATS)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    return 2 * n**3 / _best_seconds(lambda: a @ b, REPEATS)


_MATMUL_DTYPES: dict[PeakDtype, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.int8,
}


def _measure(threads: int, progress: Progress) -> DeviceProfile:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        steps = len(_MATMUL_DTYPES) + 1
        progress.update("calibrate", 0, steps)
        bandwidth = _measure_bandwidth()
        progress.update("calibrate", 1, steps)
        peaks: dict[PeakDtype, float] = {}
        missing: list[str] = []
        for i, (key, dtype) in enumerate(_MATMUL_DTYPES.items(), 2):
            try:
                peaks[key] = _measure_matmul(dtype)
            except (RuntimeError, NotImplementedError, AttributeError) as err:  # no kernel for this dtype here
                missing.append(f"{key} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            progress.update("calibrate", i, steps)
    finally:
        torch.set_num_threads(previous)
    note = (
        f"measured with torch {torch.__version__} on {threads} thread(s), best of {REPEATS}: bandwidth = reading a "
        f"{BANDWIDTH_BYTES // 2**20} MiB float32 tensor (sum); FLOP/s = {MATMUL_N}x{MATMUL_N} matmuls "
        "(int8: torch._int_mm). Achieved rates, below the hardware's theoretical peak. No int4 arithmetic on CPU."
    )
    if missing:
        note += f" Not measurable here: {'; '.join(missing)}."
    return DeviceProfile(
        name=THIS_MACHINE,
        kind="cpu",
        memory_bytes=_memory_bytes(),
        memory_bandwidth_Bps=bandwidth,
        peak_flops=peaks,
        figures="measured",
        source=f"measured on this machine ({_cpu_model()}, {os.cpu_count()} logical CPUs)",
        note=note,
    )


def calibrate_this_machine(
    data_dir: Path | None = None, *, force: bool = False, progress: Progress | None = None
) -> DeviceProfile:
    """This machine's profile: the cached measurement under `data_dir` when it matches this machine, else measure.

    The cache (`<data_dir>/hardware/this-machine.json`) records the CPU model, core and thread counts, torch
    version and memory it was measured with; any change re-measures (a few seconds).
    """
    if data_dir is None:
        from robopt.settings import Settings

        data_dir = Settings().data_dir
    path = Path(data_dir) / CALIBRATION_FILE
    threads = _threads()
    key = _machine_key(threads)
    if not force and (cached := _read_cached(path, key)) is not None:
        return cached
    profile = _measure(threads, progress or Progress())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps({"key": key, "profile": profile.model_dump(mode="json")}, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return profile


def _read_cached(path: Path, key: dict[str, str | int]) -> DeviceProfile | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        return DeviceProfile.model_validate(data["profile"])
    except (OSError, ValueError, KeyError, TypeError, ValidationError):
        return None  # missing or unreadable: measure again
