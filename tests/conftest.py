"""Shared fixtures: an isolated data directory for the whole run (subprocesses inherit it) and offline settings."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports robopt so every Settings() and every subprocess sees the test data dir.
_DATA_DIR = Path(tempfile.mkdtemp(prefix="robopt-test-data-"))
os.environ["ROBOPT_DATA_DIR"] = str(_DATA_DIR)
os.environ.pop("ROBOPT_LLM", None)
os.environ.pop("ROBOPT_DATABASE_URL", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The run-wide data directory (zoo models are built once into it and shared)."""
    return _DATA_DIR


@pytest.fixture
def fresh_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Path:
    """A per-test data directory that reuses the shared zoo cache (so digits-cnn is trained once)."""
    fresh = tmp_path / "data"
    fresh.mkdir()
    (fresh / "zoo").symlink_to(data_dir / "zoo", target_is_directory=True)
    (data_dir / "zoo").mkdir(exist_ok=True)
    monkeypatch.setenv("ROBOPT_DATA_DIR", str(fresh))
    return fresh
