"""Example tensors built from an InputSpec, for measurement, FLOP counting and output checks."""

from __future__ import annotations

import torch

from robopt.domain.records import InputSpec

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported input dtype {name!r}; one of {sorted(_DTYPES)}") from None


def make_example_inputs(spec: InputSpec, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic random inputs: standard normal for floats, uniform ints below `high` for integers."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for t in spec.inputs:
        dtype = torch_dtype(t.dtype)
        if dtype.is_floating_point:
            tensors.append(torch.randn(t.shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.ones(t.shape, dtype=torch.bool))
        else:
            tensors.append(torch.randint(0, t.high or 2, t.shape, generator=gen, dtype=dtype))
    return tuple(tensors)
