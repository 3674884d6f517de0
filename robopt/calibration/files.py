"""Calibration data from the user's file: .npz, .pt, or text (.txt / .jsonl) for token models.

- .npz: one array per model input, named like the input (a single-input model also takes 'x'; an array 'y' of
  labels is ignored), first axis = samples, the rest = the input's shape without batch.
- .pt / .pth (tensors only, loaded with weights_only=True): a tensor [N, ...] (single-input models), a dict of
  tensors as in .npz, or a list of samples, each a tensor or a tuple/list of one tensor per input (with or
  without the batch axis of size 1).
- .txt (UTF-8 text) / .jsonl (one JSON string or {"text": ...} object a line): tokenized with the evaluator's
  model_dir tokenizer into fixed-length windows, for models whose one input is token ids.
Every sample is checked against the model's InputSpec (names, per-sample shapes, dtype kinds, id bounds).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robopt.calibration.samples import FILE_HINT, Sample, conform_sample, count_phrase, describe_spec, seeded_order
from robopt.domain.records import InputSpec
from robopt.errors import CalibrationDataError
from robopt.progress import Progress
from robopt.tools.tensor_files import load_weights_only

TENSOR_SUFFIXES = (".npz", ".pt", ".pth")
TEXT_SUFFIXES = (".txt", ".jsonl")
SUFFIXES = TENSOR_SUFFIXES + TEXT_SUFFIXES


def check_calibration_path(path: Path) -> None:
    """The file exists and has a suffix robopt reads (what intake checks before anything else)."""
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {str(path)!r} does not exist", FILE_HINT)
    if path.suffix.lower() not in SUFFIXES:
        raise CalibrationDataError(f"calibration file {str(path)!r} is not one of {', '.join(SUFFIXES)}", FILE_HINT)


def is_text(path: Path) -> bool:
    return path.suffix.lower() in TEXT_SUFFIXES


# -- tensors ---------------------------------------------------------------------------------------------------


def _named_samples(arrays: dict[str, torch.Tensor], spec: InputSpec | None, where: str) -> list[Sample]:
    """Samples from one array per input name (first axis = samples)."""
    if spec is None:
        if len(arrays) != 1:
            raise CalibrationDataError(
                f"{where} holds {len(arrays)} arrays but the model's input names are unknown",
                "give one array, or a model whose inputs are known (pass --input-shape)",
            )
        columns = list(arrays.values())
    else:
        names = [t.name for t in spec.inputs]
        if len(names) == 1 and names[0] not in arrays and "x" in arrays:
            arrays = {names[0] if k == "x" else k: v for k, v in arrays.items()}
        missing = [name for name in names if name not in arrays]
        extra = sorted(set(arrays) - set(names) - {"y"})
        if missing or extra:
            raise CalibrationDataError(
                f"{where} holds arrays {sorted(arrays)}; the model takes {describe_spec(spec)}"
                + (f" (missing: {', '.join(missing)})" if missing else "")
                + (f" (unknown: {', '.join(extra)})" if extra else ""),
                FILE_HINT,
            )
        columns = [arrays[name] for name in names]
    lengths = {int(c.shape[0]) if c.ndim else 0 for c in columns}
    if len(lengths) != 1 or 0 in lengths:
        raise CalibrationDataError(
            f"{where}: the arrays must hold the same number (> 0) of samples along their first axis; "
            f"their shapes are {[list(c.shape) for c in columns]}",
            FILE_HINT,
        )
    return [conform_sample([c[i] for c in columns], spec, where, batched=False) for i in range(lengths.pop())]


def _load_npz(path: Path, spec: InputSpec | None, where: str) -> list[Sample]:
    if not zipfile.is_zipfile(path):  # np.load would try to unpickle it instead
        raise CalibrationDataError(f"{where} is not a readable .npz archive", FILE_HINT)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # object arrays need pickle, which is refused
        raise CalibrationDataError(f"cannot read {where}: {e}", FILE_HINT) from e
    if any(a.dtype == object for a in arrays.values()):
        raise CalibrationDataError(f"{where} holds object arrays", FILE_HINT)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    return _named_samples(tensors, spec, where)


def _sample_of(item: Any, spec: InputSpec | None, where: str) -> Sample:
    tensors = [item] if isinstance(item, torch.Tensor) else list(item) if isinstance(item, (list, tuple)) else None
    if tensors is None or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise CalibrationDataError(f"{where}: a sample is a {type(item).__name__}, not tensors", FILE_HINT)
    ranks = [len(s.shape) for s in spec.inputs] if spec is not None else [t.ndim for t in tensors]
    batched = len(ranks) == len(tensors) > 0 and all(t.ndim == r for t, r in zip(tensors, ranks, strict=True))
    return conform_sample(tensors, spec, where, batched=batched)


def _load_pt(path: Path, spec: InputSpec | None, where: str) -> list[Sample]:
    data = load_weights_only(
        path,
        where,
        CalibrationDataError,
        FILE_HINT,
        "save plain tensors: torch.save(tensor), torch.save({'input_name': tensor}) or a list of tensor tuples",
    )
    if isinstance(data, torch.Tensor):
        return _named_samples({spec.inputs[0].name if spec else "x": data}, spec, where) if data.ndim else []
    if isinstance(data, dict):
        if not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise CalibrationDataError(f"{where}: a dict of calibration data must map input names to tensors")
        return _named_samples({str(k): v for k, v in data.items()}, spec, where)
    if isinstance(data, (list, tuple)):
        return [_sample_of(item, spec, f"{where}, sample {i}") for i, item in enumerate(data)]
    raise CalibrationDataError(f"{where} holds a {type(data).__name__}", FILE_HINT)


def load_tensor_file(path: Path, spec: InputSpec | None) -> list[Sample]:
    """Every sample of a .npz/.pt file, checked against `spec`, in file order."""
    where = f"calibration file {str(path)!r}"
    samples = _load_npz(path, spec, where) if path.suffix.lower() == ".npz" else _load_pt(path, spec, where)
    if not samples:
        raise CalibrationDataError(f"{where} holds no samples", FILE_HINT)
    return samples


# -- text ------------------------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """The text of a .txt file, or the texts of a .jsonl file's lines joined by blank lines."""
    where = f"calibration file {str(path)!r}"
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"{where} is not UTF-8 text: {e}", "save the text as UTF-8") from e
    if path.suffix.lower() == ".txt":
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{where}, line {number}: not JSON: {e}", _JSONL_HINT) from e
        text = value.get("text") if isinstance(value, dict) else value
        if not isinstance(text, str):
            raise CalibrationDataError(f"{where}, line {number}: no text found", _JSONL_HINT)
        texts.append(text)
    return "\n\n".join(texts)


_JSONL_HINT = 'each line of a .jsonl calibration file is a JSON string or an object {"text": "..."}'


def check_text_model(path: Path, spec: InputSpec | None, model_dir: str | None) -> str:
    """The tokenizer folder for a text calibration file; raises when the model does not take token ids."""
    where = f"calibration file {str(path)!r}"
    if spec is not None and (len(spec.inputs) != 1 or spec.inputs[0].dtype not in ("int64", "int32")):
        raise CalibrationDataError(
            f"{where} is text, but the model does not take one token-id input: it takes {describe_spec(spec)}",
            FILE_HINT,
        )
    if not model_dir:
        raise CalibrationDataError(
            f"{where} is text, and no tokenizer is known to turn it into token ids",
            "text is tokenized with the tokenizer in the evaluator's model_dir (zoo language models and Hugging "
            "Face folders fill it in); otherwise give token ids in a .npz file",
        )
    return model_dir


def file_samples(
    params: dict[str, Any], n: int, seed: int, spec: InputSpec | None, progress: Progress
) -> tuple[list[Sample], str]:
    """`n` samples of the user's file (all when it has fewer), in an order fixed by `seed`."""
    from robopt.calibration.text import token_windows, window_samples

    path = Path(params["path"])
    progress.message("calibration", f"reading {path}")
    progress.check()
    where = f"calibration file {str(path)!r}"
    name = f"{path.name} (sha256 {params['sha256'][:12]})"
    if is_text(path):
        windows = token_windows(params["model_dir"], read_text(path), params["length"])
        if windows.shape[0] == 0:
            raise CalibrationDataError(
                f"{where} holds fewer tokens than one sequence of {params['length']}", "give a longer text"
            )
        samples = window_samples(windows, n, seed, spec, where, params["free_length"])
        described = (
            f"{params['length']}-token windows of user file {name}, tokenized with {params['model_dir']}: "
            f"{count_phrase(len(samples), n, windows.shape[0], 'windows')}"
        )
        return samples, f"{described}, seed {seed}"
    pool = load_tensor_file(path, spec)
    samples = [pool[i] for i in seeded_order(len(pool), seed)[:n]]
    return samples, f"user file {name}: {count_phrase(len(samples), n, len(pool))}, seed {seed}"
