"""Labeled datasets for evaluators: the bundled scikit-learn digits split and user data files (.npz, .pt)."""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np
import torch

from robopt.errors import EvaluationError
from robopt.tools.tensor_files import load_weights_only

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0

BUNDLED_DATASETS: dict[str, str] = {
    "digits": "scikit-learn digits, test split (450 images 1x8x8 in [0,1], 10 classes)",
    "digits-test": "same as 'digits'",
    "digits-train": "scikit-learn digits, train split (1,347 images 1x8x8 in [0,1], 10 classes)",
}

_DATA_HINT = (
    "give a .npz file with arrays 'x' (inputs, first dim = samples) and 'y' (integer class labels), "
    "or a .pt file holding a dict {'x': tensor, 'y': tensor}, or a bundled dataset: " + ", ".join(BUNDLED_DATASETS)
)


@functools.cache
def _digits_split_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    for array in (x_train, x_test, y_train, y_test):
        array.flags.writeable = False
    return x_train, y_train, x_test, y_test


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): float32 [N,1,8,8] in [0,1] and int64 labels; a fixed stratified 75/25 split.

    The split is computed once per process; each call returns fresh tensors, so callers may modify them.
    """
    return tuple(torch.from_numpy(a.copy()) for a in _digits_split_arrays())  # type: ignore[return-value]


def load_labeled_data(spec_dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and int64 labels for a bundled dataset name or a user .npz/.pt file."""
    name = spec_dataset.strip()
    if name in ("digits", "digits-test"):
        _, _, x, y = digits_split()
        return x, y
    if name == "digits-train":
        x, y, _, _ = digits_split()
        return x, y
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".pt", ".pth"):
        raise EvaluationError(
            f"unknown dataset {spec_dataset!r}: not a bundled dataset nor a .npz/.pt file", _DATA_HINT
        )
    if not path.is_file():
        raise EvaluationError(f"dataset file {str(path)!r} does not exist", _DATA_HINT)
    x, y = _load_npz(path) if suffix == ".npz" else _load_pt(path)
    return _validated(x, y, path)


def _load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it instead
        raise EvaluationError(f"dataset file {str(path)!r} is not a readable .npz archive", _DATA_HINT)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise EvaluationError(
                    f"dataset file {str(path)!r} lacks array(s) {missing}; it holds {sorted(data.files)}", _DATA_HINT
                )
            x, y = data["x"], data["y"]
    except ValueError as e:  # object arrays need pickle, which is refused for data files
        raise EvaluationError(f"cannot read dataset file {str(path)!r}: {e}", _DATA_HINT) from e
    except (OSError, zipfile.BadZipFile) as e:
        raise EvaluationError(f"dataset file {str(path)!r} is not a readable .npz archive: {e}", _DATA_HINT) from e
    if x.dtype == object or y.dtype == object:
        raise EvaluationError(f"dataset file {str(path)!r} holds object arrays", _DATA_HINT)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def _load_pt(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_weights_only(
        path,
        f"dataset file {str(path)!r}",
        EvaluationError,
        _DATA_HINT,
        "save the data as a dict of tensors: torch.save({'x': x, 'y': y}, path), or as a .npz file",
    )
    if not isinstance(data, dict):
        raise EvaluationError(f"dataset file {str(path)!r} holds a {type(data).__name__}, not a dict", _DATA_HINT)
    missing = [k for k in ("x", "y") if k not in data]
    if missing:
        raise EvaluationError(
            f"dataset file {str(path)!r} lacks key(s) {missing}; it holds {sorted(map(str, data))}", _DATA_HINT
        )
    x, y = data["x"], data["y"]
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise EvaluationError(f"dataset file {str(path)!r}: 'x' and 'y' must be tensors", _DATA_HINT)
    return x, y


def _validated(x: torch.Tensor, y: torch.Tensor, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"dataset file {str(path)!r}"
    if x.ndim < 1 or x.shape[0] == 0:
        raise EvaluationError(f"{where}: 'x' has shape {list(x.shape)}, with no samples", _DATA_HINT)
    if y.ndim != 1:
        raise EvaluationError(f"{where}: 'y' must be 1-D class labels, got shape {list(y.shape)}", _DATA_HINT)
    if y.shape[0] != x.shape[0]:
        raise EvaluationError(f"{where}: {x.shape[0]} inputs but {y.shape[0]} labels", _DATA_HINT)
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise EvaluationError(f"{where}: labels 'y' must be integers, got {y.dtype}", _DATA_HINT)
    if int(y.min()) < 0:
        raise EvaluationError(f"{where}: labels must be >= 0, found {int(y.min())}", _DATA_HINT)
    if x.dtype == torch.float64:
        x = x.float()  # models take float32; float64 files are common from numpy
    return x, y.long()
