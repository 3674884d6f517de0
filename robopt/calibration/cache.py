"""The calibration cache: one file per (recipe, input spec, n, seed) under <data_dir>/calibration/, written atomically.

A file holds the samples, the source line and the set's fingerprint; loading checks the fingerprint, so a damaged
file is rebuilt rather than trusted. Files hold tensors, lists and strings only and load with weights_only=True.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import uuid
from pathlib import Path
from typing import Any

import torch

from robopt.calibration.base import CalibrationSet

CACHE_VERSION = 1  # bump when a recipe's output changes for the same key
CACHE_SUBDIR = "calibration"


def cache_key(recipe: dict[str, Any], input_spec: dict[str, Any] | None, n: int, seed: int) -> str:
    """sha256 over everything the set depends on: the recipe (its data, tokenizer and file hashes included),
    the input spec (shapes and dtypes; not where they came from), n and the seed."""
    payload = {"version": CACHE_VERSION, "recipe": recipe, "input_spec": input_spec, "n": n, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(data_dir: Path, key: str) -> Path:
    return Path(data_dir) / CACHE_SUBDIR / f"{key}.pt"


def load_cached(path: Path) -> CalibrationSet | None:
    """The set stored at `path`, or None when there is none or it is unreadable or damaged (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        samples = tuple(tuple(sample) for sample in data["samples"])
        calibration = CalibrationSet(samples=samples, source=str(data["source"]))
        ok = data.get("version") == CACHE_VERSION and calibration.fingerprint == data["fingerprint"]
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError):
        return None
    return calibration if ok else None


def store(path: Path, calibration: CalibrationSet, fingerprint: str) -> None:
    """Write the set atomically (temp file + rename): readers see the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    data = {
        "version": CACHE_VERSION,
        "source": calibration.source,
        "fingerprint": fingerprint,
        "samples": [list(sample) for sample in calibration.samples],
    }
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
