"""Calibration samples against a model's InputSpec: validation, dtype casts, seeded selection.

Every source (zoo data, user files, random inputs) ends here, so every set a technique receives holds batch-1
tensors in the InputSpec's order and dtypes, and a file that does not fit the model fails with one clear error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import CalibrationDataError
from robopt.tools.example_inputs import torch_dtype

Sample = tuple[torch.Tensor, ...]

FILE_HINT = (
    "pass --calibration FILE with inputs that fit the model: a .npz with one array per input name (first axis = "
    "samples, the rest = the input's shape without batch), a .pt file holding a tensor, a dict of tensors or a list "
    "of samples, or a .txt/.jsonl text for token models"
)


def describe_spec(spec: InputSpec) -> str:
    """'input_ids [N, 64] int64 (< 2048), ...' as the error messages show it."""
    parts = []
    for t in spec.inputs:
        bound = f" (< {t.high})" if t.high is not None else ""
        parts.append(f"{t.name} [N, {', '.join(map(str, t.shape[1:]))}] {t.dtype}{bound}".replace("[N, ]", "[N]"))
    return "; ".join(parts)


def seeded_order(count: int, seed: int) -> list[int]:
    """A permutation of range(count) fixed by `seed`: sets of n and m > n samples share their first n."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int"


def conform_tensor(
    tensor: torch.Tensor, spec: TensorSpec, where: str, *, free_length: bool = False, batched: bool = True
) -> torch.Tensor:
    """One input of one sample as a batch-1 tensor of the spec's dtype (a fresh copy, owning its storage).

    `batched`: the tensor has its batch axis (size 1) already; otherwise it is the input without batch.
    `free_length`: the last axis may differ from the spec (token sequences of a caller-chosen length).
    """
    if not isinstance(tensor, torch.Tensor):
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} is a {type(tensor).__name__}, not a tensor", FILE_HINT
        )
    shape = list(tensor.shape[1:]) if batched else list(tensor.shape)
    if batched and (tensor.ndim == 0 or tensor.shape[0] != 1):
        raise CalibrationDataError(f"{where}: input {spec.name!r} has shape {list(tensor.shape)}, not batch 1")
    expected = list(spec.shape[1:])
    fits = shape == expected or (free_length and len(shape) == len(expected) and shape[:-1] == expected[:-1])
    if not fits:
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} has per-sample shape {shape}, the model takes {expected} "
            f"(input shape {spec.shape} with the batch axis)",
            FILE_HINT,
        )
    target = torch_dtype(spec.dtype)
    if _kind(tensor.dtype) != _kind(target):
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} is {str(tensor.dtype).removeprefix('torch.')}, the model takes {spec.dtype}",
            "convert the data to the model's input type before saving it (e.g. scale uint8 images to floats "
            "as the model expects, or store token ids as integers)",
        )
    out = tensor.detach().to("cpu", target).reshape([1, *shape]).clone()
    if target.is_floating_point and not bool(torch.isfinite(out).all()):
        raise CalibrationDataError(f"{where}: input {spec.name!r} holds NaN or infinite values", FILE_HINT)
    if spec.high is not None and out.numel() and (int(out.min()) < 0 or int(out.max()) >= spec.high):
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} holds values in [{int(out.min())}, {int(out.max())}], the model takes "
            f"ids in [0, {spec.high})",
            "token ids must come from the model's own tokenizer (its vocabulary size is the bound)",
        )
    return out


def conform_sample(
    tensors: Sequence[torch.Tensor],
    spec: InputSpec | None,
    where: str,
    *,
    free_length: bool = False,
    batched: bool = True,
) -> Sample:
    """One model call's inputs checked against `spec` (names are the caller's business; order is the spec's)."""
    if spec is None:  # nothing to check against: batch-1 copies as they are
        return tuple((t if batched else t.unsqueeze(0)).detach().cpu().clone() for t in tensors)
    if len(tensors) != len(spec.inputs):
        raise CalibrationDataError(
            f"{where}: a sample has {len(tensors)} tensor(s); the model takes {describe_spec(spec)}",
            FILE_HINT,
        )
    return tuple(
        conform_tensor(t, s, where, free_length=free_length, batched=batched)
        for t, s in zip(tensors, spec.inputs, strict=True)
    )


def batch_one(spec: InputSpec) -> InputSpec:
    """The spec with every input's batch axis set to 1 (calibration samples are single model calls)."""
    inputs = [t.model_copy(update={"shape": [1, *t.shape[1:]]}) if t.shape else t for t in spec.inputs]
    return spec.model_copy(update={"inputs": inputs})


def count_phrase(got: int, requested: int, available: int | None, unit: str = "samples") -> str:
    """'128 of 1,347 samples', or 'all 50 samples (128 requested)' when the source has fewer than asked for."""
    if got < requested:
        return f"all {got:,} {unit} ({requested:,} requested)"
    return f"{got:,} of {available:,} {unit}" if available is not None else f"{got:,} {unit}"
