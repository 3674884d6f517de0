"""Optional backends that cannot share robopt's environment, each in its own virtual environment under
`<data_dir>/backends/<name>`, created only on request (`robopt backends install NAME`) and run as subprocesses.

gptqmodel is one: it pins numpy 2.2.6 and protobuf>=7.34, which conflict with robopt's own dependencies. Its
environment gets the same torch as robopt's (pinned through a constraints file, so pip never pulls a CUDA build),
and an install ends with a probe that really runs the backend on CPU; the outcome is recorded beside the
environment, so availability checks read a file instead of importing the backend (which takes seconds to a minute).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import venv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robopt.errors import BackendUnavailableError, ResourceLimitError
from robopt.progress import Progress

MARKER = "robopt-backend.json"
_OUTPUT_TAIL = 3000


@dataclass(frozen=True)
class BackendSpec:
    """An optional backend: what to pip install, and the probe that proves it runs here.

    `probe` is a Python script run with the environment's interpreter in an empty temporary folder (its working
    directory); it exits 0 when the backend works and prints one JSON object (versions, timings) as its last line.
    `run_env` holds environment variables every run needs.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    probe: str
    run_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend's environment exists and passed its probe; `reason` says why not, true for this machine."""

    name: str
    installed: bool
    available: bool
    reason: str
    python: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)


_BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> BackendSpec:
    _BACKENDS[spec.name] = spec
    return spec


def backend_names() -> list[str]:
    _ensure_builtin()
    return sorted(_BACKENDS)


def get_backend(name: str) -> BackendSpec:
    _ensure_builtin()
    try:
        return _BACKENDS[name]
    except KeyError:
        raise BackendUnavailableError(
            f"no optional backend named {name!r}", f"known backends: {', '.join(sorted(_BACKENDS)) or 'none'}"
        ) from None


def _ensure_builtin() -> None:
    import robopt.tools.techniques  # noqa: F401  (technique modules register the backends they run)


def backends_root(data_dir: Path | str | None = None) -> Path:
    """`<data_dir>/backends` (data_dir: the given one, else robopt's settings)."""
    from robopt.settings import get_settings

    return (Path(data_dir).expanduser() if data_dir else get_settings().data_dir) / "backends"


def backend_dir(name: str, data_dir: Path | str | None = None) -> Path:
    return backends_root(data_dir) / name


def env_python(env_dir: Path) -> Path:
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def backend_status(name: str, data_dir: Path | str | None = None) -> BackendStatus:
    """Read the backend's install record (cheap: no import of the backend)."""
    spec = get_backend(name)
    env_dir = backend_dir(name, data_dir)
    python = env_python(env_dir)
    install_hint = f"run `robopt backends install {spec.name}`"
    marker = env_dir / MARKER
    if not marker.is_file() or not python.is_file():
        return BackendStatus(name, False, False, f"{spec.name} environment not installed: {install_hint}")
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return BackendStatus(
            name, False, False, f"{spec.name} environment record {marker} is unreadable ({e}): {install_hint}"
        )
    if not record.get("probe_ok"):
        reason = f"{spec.name} is installed in {env_dir} but cannot run on this machine: {record.get('probe_error')}"
        return BackendStatus(name, True, False, reason, python, record)
    return BackendStatus(name, True, True, "", python, record)


def constraints_file() -> tuple[Path, bool]:
    """The repository's constraints.txt (pins torch to the CPU build), or a temporary one pinning the torch that
    runs robopt when robopt is installed without its repository. Returns (path, is_temporary)."""
    repo_file = Path(__file__).resolve().parents[2] / "constraints.txt"
    if repo_file.is_file():
        return repo_file, False
    import torch

    handle, name = tempfile.mkstemp(suffix="-constraints.txt")
    os.close(handle)
    path = Path(name)
    path.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    return path, True


def torch_pin(constraints: Path) -> str:
    """The `torch==X` line of a constraints file (installed first, so the backend's packages find it present)."""
    for line in constraints.read_text().splitlines():
        if line.strip().startswith("torch=="):
            return line.strip()
    raise BackendUnavailableError(
        f"{constraints} pins no torch version", "add a `torch==X` line matching robopt's torch (CPU build)"
    )


def install_backend(
    name: str,
    *,
    data_dir: Path | str | None = None,
    progress: Progress | None = None,
    timeout_s: float = 3600,
    reinstall: bool = False,
) -> BackendStatus:
    """Create the backend's environment (venv + torch pinned to robopt's + its packages), run its probe, and
    record the outcome. Takes minutes (gptqmodel: ~6 min on a 2-core machine, most of it building wheels).

    Raises BackendUnavailableError when pip fails; a probe that fails is recorded (the status says why).
    """
    spec = get_backend(name)
    progress = progress or Progress()
    env_dir = backend_dir(name, data_dir)
    if reinstall and env_dir.exists():
        shutil.rmtree(env_dir)
    (env_dir / MARKER).unlink(missing_ok=True)
    constraints, temporary = constraints_file()
    timings: dict[str, float] = {}
    try:
        start = time.perf_counter()
        if not env_python(env_dir).is_file():
            progress.message(f"install {name}", f"creating a virtual environment in {env_dir}")
            venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
        timings["venv_s"] = time.perf_counter() - start
        python = env_python(env_dir)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]
        for step, packages in (("torch", [torch_pin(constraints)]), (name, list(spec.packages))):
            started = time.perf_counter()
            done = run_streaming([*pip, *packages], progress, f"install {name}", timeout_s=timeout_s)
            timings[f"pip_{step}_s"] = time.perf_counter() - started
            if done.returncode != 0:
                raise BackendUnavailableError(
                    f"pip could not install {' '.join(packages)} into {env_dir} (exit {done.returncode}): "
                    f"{done.output[-_OUTPUT_TAIL:]}",
                    "check the package registry is reachable; rerun with --reinstall to start from a clean environment",
                )
    finally:
        if temporary:
            constraints.unlink(missing_ok=True)
    return probe_backend(name, data_dir=data_dir, progress=progress, extra_record={"install_timings_s": timings})


def probe_backend(
    name: str,
    *,
    data_dir: Path | str | None = None,
    progress: Progress | None = None,
    timeout_s: float = 900,
    extra_record: dict[str, Any] | None = None,
) -> BackendStatus:
    """Run the backend's probe in its environment and record whether it works (and what failed)."""
    spec = get_backend(name)
    progress = progress or Progress()
    env_dir = backend_dir(name, data_dir)
    python = env_python(env_dir)
    if not python.is_file():
        return backend_status(name, data_dir)
    progress.message(f"probe {name}", f"checking that {name} runs on this machine")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"robopt-probe-{name}-") as tmp:
        script = Path(tmp) / "probe.py"
        script.write_text(spec.probe)
        done = run_streaming(
            [str(python), str(script)], progress, f"probe {name}", timeout_s=timeout_s, cwd=Path(tmp), env=spec.run_env
        )
    record: dict[str, Any] = dict(extra_record or {})
    record |= {"packages": list(spec.packages), "probe_s": round(time.perf_counter() - started, 1)}
    if done.returncode == 0:
        record |= {"probe_ok": True, "probe": last_json_line(done.output)}
    else:
        record |= {
            "probe_ok": False,
            "probe_error": f"the probe exited {done.returncode}: {done.output[-_OUTPUT_TAIL:]}",
        }
    (env_dir / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    return backend_status(name, data_dir)


@dataclass(frozen=True)
class Finished:
    returncode: int
    output: str


def run_streaming(
    command: Sequence[str],
    progress: Progress,
    stage: str,
    *,
    timeout_s: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Finished:
    """Run `command`, forwarding its output lines as progress messages; cancellation or the timeout kill it.

    Returns the exit code and the combined output. A timeout raises ResourceLimitError; cancellation CancelledError.
    """
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    seen = 0
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise ResourceLimitError(
                    f"{' '.join(command[:3])} ... ran longer than {timeout_s:.0f} s and was stopped",
                    "raise the timeout, or check the process on its own",
                )
            progress.check()
            seen = _forward(lines, seen, progress, stage, on_line)
            time.sleep(0.2)
    except BaseException:  # cancellation, timeout, Ctrl-C: never leave the child running
        proc.kill()
        proc.wait()
        raise
    reader.join(timeout=10)
    _forward(lines, seen, progress, stage, on_line)
    return Finished(proc.returncode, "".join(lines))


def _forward(lines: list[str], seen: int, progress: Progress, stage: str, on_line: Callable[[str], None] | None) -> int:
    for line in lines[seen:]:
        text = line.strip()
        if text:
            progress.message(stage, text[-200:])
            if on_line is not None:
                on_line(text)
    return len(lines)


def last_json_line(output: str) -> dict[str, Any]:
    """The last line of `output` that parses as a JSON object ({} when none does)."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def run_in_backend(
    name: str,
    script: str,
    args: Sequence[str],
    *,
    progress: Progress,
    stage: str,
    timeout_s: float,
    cwd: Path,
    data_dir: Path | str | None = None,
) -> Finished:
    """Run a Python script (its source text) with the backend environment's interpreter.

    Raises BackendUnavailableError when the environment is missing or failed its probe.
    """
    status = backend_status(name, data_dir)
    if not status.available or status.python is None:
        raise BackendUnavailableError(status.reason, f"run `robopt backends install {name}`")
    path = cwd / f"{name}_worker.py"
    path.write_text(script)
    return run_streaming(
        [str(status.python), str(path), *args],
        progress,
        stage,
        timeout_s=timeout_s,
        cwd=cwd,
        env=get_backend(name).run_env,
    )
