"""Calibration sources are lazy, reproducible and cached: the same (data, input spec, n, seed) gives the same tensors,
a second run reads them back without rebuilding, a damaged cache file is rebuilt, and building can be cancelled.

Uses closed-loop:reacher, whose set needs expert rollouts (the slow kind of source) but no trained model.
"""

from __future__ import annotations

import threading

import pytest
import torch

from robopt.calibration import calibration_source
from robopt.calibration.cache import CACHE_SUBDIR
from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import CancelledError, TechniqueNotApplicableError
from robopt.evaluation.base import EvaluatorSpec
from robopt.progress import Progress

REACHER = EvaluatorSpec(name="closed-loop", dataset="reacher", options={"episodes": 50})
SPEC = InputSpec(inputs=[TensorSpec(name="observation", shape=[1, 10])], source="zoo")


def _source(data_dir, seed=0, events=None):
    progress = Progress(emit=events.append if events is not None else lambda e: None)
    return calibration_source(REACHER, SPEC, data_dir, seed, progress=progress)


def _built(events) -> bool:
    return any(e.get("stage") == "calibration rollouts" for e in events)


def test_nothing_is_built_until_a_technique_asks(tmp_path) -> None:
    events: list[dict] = []
    source = _source(tmp_path, events=events)
    assert not events and not (tmp_path / CACHE_SUBDIR).exists()
    calibration = source(16)
    assert len(calibration) == 16 and _built(events)
    files = list((tmp_path / CACHE_SUBDIR).iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # written by rename: no temporary file is left behind
    assert source(16) is calibration  # asked again in the same run: the same set, nothing rebuilt or reread


def test_same_seed_same_tensors_and_other_seeds_other_tensors(tmp_path) -> None:
    first = _source(tmp_path / "a")(16)
    again = _source(tmp_path / "b")(16)  # another cache directory: built from scratch a second time
    assert again.fingerprint == first.fingerprint and again.source == first.source
    pairs = zip(first.samples, again.samples, strict=True)
    assert all(torch.equal(x, y) for a, b in pairs for x, y in zip(a, b, strict=True))
    other_seed = _source(tmp_path / "a", seed=1)(16)
    assert other_seed.fingerprint != first.fingerprint and "seed 1" in other_seed.source
    assert _source(tmp_path / "a")(24).fingerprint != first.fingerprint


def test_a_cache_hit_reads_the_file_and_does_not_rebuild(tmp_path) -> None:
    built = _source(tmp_path)(16)
    events: list[dict] = []
    cached = _source(tmp_path, events=events)(16)
    assert not _built(events)
    assert any("from the cache" in e.get("message", "") for e in events)
    assert cached.fingerprint == built.fingerprint and cached.source == built.source


def test_a_damaged_cache_file_is_rebuilt(tmp_path) -> None:
    built = _source(tmp_path)(16)
    (path,) = (tmp_path / CACHE_SUBDIR).iterdir()
    path.write_bytes(path.read_bytes()[:100])
    events: list[dict] = []
    rebuilt = _source(tmp_path, events=events)(16)
    assert _built(events) and rebuilt.fingerprint == built.fingerprint
    events.clear()
    assert _source(tmp_path, events=events)(16).fingerprint == built.fingerprint and not _built(events)


def test_building_reports_progress_and_can_be_cancelled(tmp_path) -> None:
    cancel = threading.Event()
    events: list[dict] = []

    def emit(event: dict) -> None:
        events.append(event)
        if event.get("stage") == "calibration rollouts" and event.get("current") == 1:
            cancel.set()  # the user cancels while the second episode is rolled out

    progress = Progress(emit=emit, cancel=cancel, min_interval_s=0)  # every event, not rate-limited
    source = calibration_source(REACHER, SPEC, tmp_path, 0, progress=progress)
    with pytest.raises(CancelledError):
        source(64)
    rollouts = [e for e in events if e.get("stage") == "calibration rollouts"]
    assert rollouts[0]["total"] == 8 and rollouts[-1]["current"] == 1  # 64 states / 8 per episode; stopped at 1
    assert not (tmp_path / CACHE_SUBDIR).exists() or not list((tmp_path / CACHE_SUBDIR).iterdir())


def test_a_set_needs_at_least_one_sample(tmp_path) -> None:
    with pytest.raises(TechniqueNotApplicableError):
        _source(tmp_path)(0)
