"""Device profiles (published peaks, this machine measured and cached) and roofline predictions."""

from __future__ import annotations

import json

import pytest
from torch import nn

from robopt.errors import InvalidCriteriaError
from robopt.hardware import calibrate_this_machine, device_names, get_device, predict_latency_ms
from robopt.hardware.devices import CALIBRATION_FILE, PUBLISHED_DEVICES
from robopt.hardware.roofline import (
    WeightCensus,
    decode_token_latency_ms,
    memory_fit,
    peak_flops_for,
    roofline,
    weight_bytes,
)


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("jetson orin nano", "jetson-orin-nano-8gb"),
        ("Jetson_Orin_Nano_8GB", "jetson-orin-nano-8gb"),
        ("Orin Nano Super", "jetson-orin-nano-8gb-super"),
        ("jetson AGX orin", "jetson-agx-orin-64gb"),
        ("Raspberry Pi 5", "raspberry-pi-5"),
        ("rpi5", "raspberry-pi-5"),
        ("H100", "nvidia-h100-sxm"),
        ("RTX 4090", "nvidia-rtx-4090"),
        ("nvidia-rtx-4090", "nvidia-rtx-4090"),
    ],
)
def test_lookup_by_alias(alias: str, name: str) -> None:
    assert get_device(alias).name == name


def test_unknown_device_lists_the_known_ones() -> None:
    with pytest.raises(InvalidCriteriaError, match="unknown target device 'tpu v9'") as err:
        get_device("tpu v9")
    for name in device_names():
        assert name in (err.value.hint or "")


def test_published_profiles_are_labelled_and_consistent() -> None:
    assert set(PUBLISHED_DEVICES) >= {
        "jetson-orin-nano-8gb",
        "jetson-agx-orin-64gb",
        "raspberry-pi-5",
        "nvidia-h100-sxm",
        "nvidia-rtx-4090",
    }
    for device in PUBLISHED_DEVICES.values():
        assert device.figures == "published-peak" and device.source
        peaks = device.peak_flops
        assert peaks["fp32"] < peaks["fp16"] < peaks["int8"]  # lower precision, more throughput everywhere here
        assert peaks.get("int4", peaks["int8"]) >= peaks["int8"]
    assert PUBLISHED_DEVICES["nvidia-h100-sxm"].memory_bandwidth_Bps == 3.35e12
    assert "int4" in PUBLISHED_DEVICES["nvidia-rtx-4090"].peak_flops
    assert "int4" not in PUBLISHED_DEVICES["nvidia-h100-sxm"].peak_flops


def test_roofline_scales_with_bytes_and_flops() -> None:
    rtx = get_device("rtx 4090")
    memory_bound = [predict_latency_ms(1e9, b, "bf16", rtx) for b in (1e9, 2e9, 4e9, 8e9)]
    assert memory_bound == sorted(memory_bound)
    assert memory_bound[1] == pytest.approx(2 * memory_bound[0]) and memory_bound[3] == pytest.approx(
        8 * memory_bound[0]
    )
    assert memory_bound[0] == pytest.approx(1e3 * 1e9 / 1008e9)
    compute_bound = predict_latency_ms(2e15, 1e6, "bf16", rtx)
    assert compute_bound == pytest.approx(1e3 * 2e15 / 165.2e12)
    assert predict_latency_ms(4e15, 1e6, "bf16", rtx) == pytest.approx(2 * compute_bound)
    assert predict_latency_ms(2e15, 1e6, "int8", rtx) == pytest.approx(1e3 * 2e15 / 660.6e12)
    point = roofline(2e15, 1e9, "bf16", "nvidia-rtx-4090")
    assert point.bound == "compute" and point.latency_ms == point.compute_ms > point.memory_ms
    assert decode_token_latency_ms(14e9, rtx) == pytest.approx(1e3 * 14e9 / 1008e9)
    assert decode_token_latency_ms(14e9, rtx, kv_cache_bytes=14e9) == pytest.approx(2e3 * 14e9 / 1008e9)


def test_peak_dtype_fallbacks_and_errors() -> None:
    assert peak_flops_for("raspberry-pi-5", "bfloat16") == ("fp16", 307.2e9)  # the A76 has no bf16 arithmetic
    assert peak_flops_for("h100", "int4")[0] == "int8"
    assert peak_flops_for("rtx 4090", "torch.float32") == ("fp32", 82.6e12)
    with pytest.raises(InvalidCriteriaError, match="unknown compute dtype"):
        predict_latency_ms(1.0, 1.0, "fp8", "h100")
    with pytest.raises(InvalidCriteriaError, match="must not be negative"):
        predict_latency_ms(-1.0, 1.0, "fp32", "h100")


def test_weight_bytes_per_precision() -> None:
    census = WeightCensus.of([nn.Sequential(nn.Linear(256, 128), nn.LayerNorm(128))])
    assert census == WeightCensus(linear_weights=256 * 128, linear_rows=128, other=128 + 2 * 128)
    assert weight_bytes(census, "fp32") == 4 * census.total
    assert weight_bytes(census, "bf16") == 2 * census.total
    assert weight_bytes(census, "int8") == 256 * 128 + 4 * 128 + 2 * 384
    assert weight_bytes(census, "int4") == 256 * 128 // 2 + 4 * (256 * 128 // 128) + 2 * 384
    shared = nn.Linear(8, 8)
    assert WeightCensus.of([nn.Sequential(shared, shared)]).total == 72  # a shared layer counts once
    assert WeightCensus.of([nn.Sequential(shared, nn.Linear(8, 2))], exclude=[shared]).total == 18


def test_memory_fit() -> None:
    bf16_7b = 2 * 7_541_239_232
    assert not memory_fit(bf16_7b, "jetson orin nano").fits
    fit = memory_fit(bf16_7b, "jetson agx orin")
    assert fit.fits and fit.headroom_bytes == 64 * 2**30 - bf16_7b


def test_this_machine_is_measured_once_and_cached(tmp_path) -> None:
    events: list[dict] = []
    from robopt.progress import Progress

    profile = calibrate_this_machine(tmp_path, progress=Progress(emit=events.append, min_interval_s=0))
    assert profile.name == "this-machine" and profile.figures == "measured" and profile.kind == "cpu"
    assert profile.memory_bandwidth_Bps > 1e8 and profile.peak_flops["fp32"] > 1e8
    assert profile.memory_bytes > 2**30
    assert [e["current"] for e in events if e["stage"] == "calibrate"][-1] == 5
    cache = tmp_path / CALIBRATION_FILE
    mtime = cache.stat().st_mtime_ns
    events.clear()
    again = get_device("This Machine", data_dir=tmp_path, progress=Progress(emit=events.append))
    assert again == profile and cache.stat().st_mtime_ns == mtime and events == []
    # a calibration from another machine (here: other thread count) is measured again, not reused
    stored = json.loads(cache.read_text())
    stored["key"]["threads"] += 1
    stored["profile"]["memory_bandwidth_Bps"] = 1.0
    cache.write_text(json.dumps(stored))
    remeasured = calibrate_this_machine(tmp_path)
    assert remeasured.memory_bandwidth_Bps > 1e8
    assert json.loads(cache.read_text())["key"]["threads"] == stored["key"]["threads"] - 1
