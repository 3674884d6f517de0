"""Target hardware: device profiles (published peaks, or measured for this machine) and roofline predictions."""

from robopt.hardware.devices import DeviceProfile, calibrate_this_machine, device_names, get_device
from robopt.hardware.roofline import decode_token_latency_ms, predict_latency_ms, roofline

__all__ = [
    "DeviceProfile",
    "calibrate_this_machine",
    "decode_token_latency_ms",
    "device_names",
    "get_device",
    "predict_latency_ms",
    "roofline",
]
