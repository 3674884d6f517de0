"""Run a block with a fixed torch thread count, restoring the previous count afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """One thread makes float reductions (hence training and rollouts) identical on machines with any core count,
    and keeps idle worker threads from competing with a simulator on small machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
