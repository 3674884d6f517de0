"""Where a search keeps its trials: an optuna study in a SQLite file under the data dir, named by what it searches.

The study's identity (`study_key`) is a hash of everything that decides a trial's outcome: the fingerprints of the
model the students are designed from, of the teacher and of the training inputs, the search space, the per-trial
training and latency settings, the sampler and the seed. The budget (trials, seconds) is not part of it, so a
search asked for more trials later extends the same study. The file is `<storage_dir>/<key>.sqlite` and the study
`students-<key>`; a rerun after a crash or SIGKILL loads it (load_if_exists) and keeps every finished trial.

A SIGKILLed search leaves its trial in optuna's RUNNING state forever; `recover_interrupted` marks such trials FAIL
(tagged `interrupted`) and enqueues their parameters again, so the interrupted configuration is retried and no
finished one is redone. That is only safe while no other process works on the study, which `exclusive` ensures
with a file lock (released by the OS when its holder dies, so a killed search never blocks its rerun).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import torch
from filelock import FileLock, Timeout
from optuna.trial import TrialState
from torch import nn

from robopt.errors import ResourceLimitError

KEY_VERSION = 1
INTERRUPTED_ATTR = "interrupted"
RETRY_ATTR = "retry_of"


def module_fingerprint(model: nn.Module) -> str:
    """sha256 over the module's class, structure (repr) and every parameter and buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return digest.hexdigest()


def samples_fingerprint(samples: Sequence[tuple[torch.Tensor, ...]]) -> str:
    """The calibration-set fingerprint (robopt.calibration.CalibrationSet) of the training inputs."""
    from robopt.calibration.base import CalibrationSet

    return CalibrationSet(tuple(tuple(s) for s in samples), "search").fingerprint


def study_key(material: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the JSON of `material` (sorted keys), versioned."""
    text = json.dumps({"version": KEY_VERSION, **material}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def storage_path(storage_dir: Path, key: str) -> Path:
    return Path(storage_dir) / f"{key}.sqlite"


def study_name(key: str) -> str:
    return f"students-{key}"


def open_storage(path: Path) -> optuna.storages.RDBStorage:
    """An optuna RDB storage on the SQLite file `path` (created with its folder when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 30}})


def close_storage(storage: optuna.storages.RDBStorage) -> None:
    """Release the SQLite connections (the file can then be moved or removed)."""
    storage.remove_session()
    storage.engine.dispose()


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold `<path>.lock` for the duration; ResourceLimitError when another process holds it."""
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ResourceLimitError(
            f"another process is running the search stored in {path}",
            "wait for it to finish (its trials are kept), or stop it; a killed search releases the lock",
        ) from None
    try:
        yield
    finally:
        lock.release()


def recover_interrupted(study: optuna.Study, storage: optuna.storages.RDBStorage) -> list[int]:
    """Mark trials left RUNNING by a killed process FAIL (tagged) and enqueue their parameters again; returns the
    numbers of the trials recovered. Call only while holding the study's lock."""
    study_id = storage.get_study_id_from_name(study.study_name)
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, True)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={RETRY_ATTR: trial.number})
        recovered.append(trial.number)
    return recovered


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count against the budget: completed ones and ones rejected for a reason (PRUNED)."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
