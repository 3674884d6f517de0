"""Loading user tensor files (.pt) safely: weights-only unpickling with errors that say what went wrong."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from robopt.errors import RoboptError, UnsafePickleError


def load_weights_only(
    path: Path, what: str, error: Callable[[str, str], RoboptError], hint: str, unsafe_hint: str
) -> Any:
    """torch.load(weights_only=True) of `path`; `what` names the file in messages ("dataset file 'x.pt'").

    Garbage or truncated files raise `error(message, hint)`; files holding pickled objects other than tensors
    raise UnsafePickleError with `unsafe_hint` (they are never unpickled)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e):  # garbage bytes also fail the weights-only unpickler, without naming a global
            raise error(f"{what} is not a readable torch file", hint) from e
        raise UnsafePickleError(
            f"{what} holds objects other than tensors, which are not loaded for safety", unsafe_hint
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise error(f"{what} is not a readable torch file: {e}", hint) from e
