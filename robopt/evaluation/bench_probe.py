"""Isolated benchmark: `python -m robopt.evaluation.bench_probe` loads one artifact in a fresh process, runs it,
and prints its peak RSS and, when asked, its latency.

Reads `{"artifact": <ArtifactRef JSON>, "threads": n, "runs": n, "latency": {measure_latency kwargs} | null,
"latency_threads": [thread counts to time]}`
on stdin and prints one JSON line `{"peak_rss_bytes", "baseline_rss_bytes", "method", "latency"}`.

A fresh process gives every model the same conditions: no OpenMP pool left busy by other threads, no
other Python threads competing for the GIL, and exactly `threads` intra-op threads.

The baseline is taken after every import the load needs (torch, robopt, onnxruntime, and the modules
named in a pickled model), so peak - baseline is what loading and running the model cost. The peak is
the kernel's high-water mark (VmHWM, reset after imports through /proc/self/clear_refs), a true peak
rather than a sampled value; where that reset is not allowed, ru_maxrss is used and the import peak
may hide part of the model's.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import json
import pickletools
import resource
import sys
import zipfile
from pathlib import Path

import torch

from robopt.domain.records import ArtifactRef
from robopt.memory.artifacts import ArtifactStore
from robopt.tools.example_inputs import make_example_inputs
from robopt.tools.onnx_module import OnnxModule

_STATUS = Path("/proc/self/status")


def _status_bytes(key: str) -> int | None:
    if not _STATUS.is_file():
        return None
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def _pickled_modules(path: Path) -> list[str]:
    """Module names a torch.save zip archive's pickle refers to (GLOBAL / STACK_GLOBAL opcodes)."""
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if name is None:
            return []
        data = archive.read(name)
    modules: set[str] = set()
    strings: list[str] = []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL":
            module, name = str(arg).split(" ", 1)
        elif opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(str(arg))
            continue
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            module, name = strings[-2], strings[-1]
        else:
            continue
        # protocol-2 pickles name Python 2 modules (__builtin__, copy_reg); map them as the unpickler does
        module, _ = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        modules.add(_compat_pickle.IMPORT_MAPPING.get(module, module))
    return sorted(modules)


def _preimport(ref: ArtifactRef) -> None:
    """Import what loading the artifact will import, so the baseline includes it and the delta does not."""
    if ref.format == "onnx":
        import onnxruntime  # noqa: F401
    elif ref.format == "torch-module":
        for module in _pickled_modules(Path(ref.path)):
            importlib.import_module(module)


def main() -> None:
    request = json.loads(sys.stdin.read())
    ref = ArtifactRef.model_validate(request["artifact"])
    threads = int(request.get("threads", 1))
    runs = int(request.get("runs", 3))
    if ref.input_spec is None:
        raise SystemExit("the artifact has no input_spec; pass --input-shape")

    torch.set_num_threads(threads)
    store = ArtifactStore(Path(ref.path).parent.parent)
    store.verify(ref)  # before importing anything the pickle names
    _preimport(ref)
    inputs = make_example_inputs(ref.input_spec)

    hwm = _reset_peak()
    baseline = _status_bytes("VmRSS") if hwm else _maxrss_bytes()
    # ONNX: the session is built here so it runs with the requested thread count.
    model = OnnxModule(ref.path, threads=threads) if ref.format == "onnx" else store.load(ref, verify=False)
    model.eval()
    with torch.no_grad():
        for _ in range(runs):
            model(*inputs)
    peak = _status_bytes("VmHWM") if hwm else _maxrss_bytes()
    method = "VmHWM" if hwm else "ru_maxrss"
    latency = None
    if request.get("latency") is not None:
        from dataclasses import asdict

        from robopt.evaluation.measure import measure_latency

        # Each thread count in turn (measure_latency sets and restores it); the caller keeps the fastest.
        counts = [int(t) for t in request.get("latency_threads") or [threads]]
        latency = [asdict(measure_latency(model, inputs, threads=t, **request["latency"])) for t in counts]
    print(json.dumps({"peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "method": method, "latency": latency}))


if __name__ == "__main__":
    main()
