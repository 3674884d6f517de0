"""Resolve and build a caller-given model architecture ("package.module:ClassName") for weight-only checkpoints."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from robopt.errors import ArchitectureRequiredError

ArchitectureFactory = type[nn.Module] | Callable[..., nn.Module]

ARCHITECTURE_HINT = (
    "give the class that built the weights as an import path: --architecture pkg.module:ClassName on the CLI, "
    "LoadOptions(architecture='pkg.module:ClassName') or load_model(..., architecture=ClassName) in Python; "
    "the module must be importable (installed, or on PYTHONPATH)"
)


def resolve_architecture(spec: str) -> ArchitectureFactory:
    """Import `package.module:ClassName` (dots after the colon reach nested attributes)."""
    module_name, sep, attr_path = spec.strip().partition(":")
    if not sep or not module_name or not attr_path:
        raise ArchitectureRequiredError(
            f"architecture {spec!r} is not an import path of the form 'package.module:ClassName'", ARCHITECTURE_HINT
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ArchitectureRequiredError(
            f"cannot import module {module_name!r} for architecture {spec!r}: {e}", ARCHITECTURE_HINT
        ) from e
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ArchitectureRequiredError(
                f"module {module_name!r} has no attribute {attr_path!r} (architecture {spec!r})", ARCHITECTURE_HINT
            )
        target = getattr(target, part)
    if isinstance(target, type) and not issubclass(target, nn.Module):
        raise ArchitectureRequiredError(
            f"architecture {spec!r} is the class {target.__qualname__}, which is not a torch.nn.Module",
            ARCHITECTURE_HINT,
        )
    if not callable(target):
        raise ArchitectureRequiredError(
            f"architecture {spec!r} is a {type(target).__name__}, not a class or factory function", ARCHITECTURE_HINT
        )
    return target


def build_architecture(architecture: ArchitectureFactory | str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate the architecture with `kwargs`; the result must be an nn.Module."""
    factory = resolve_architecture(architecture) if isinstance(architecture, str) else architecture
    name = getattr(factory, "__qualname__", repr(factory))
    try:
        module = factory(**(kwargs or {}))
    except (TypeError, ValueError) as e:
        raise ArchitectureRequiredError(
            f"could not build architecture {name} with arguments {kwargs or {}}: {e}",
            "pass the constructor arguments the weights were trained with (--architecture-kwargs as JSON on the "
            "CLI, LoadOptions(architecture_kwargs={...}) in Python)",
        ) from e
    if not isinstance(module, nn.Module):
        raise ArchitectureRequiredError(
            f"architecture {name} returned a {type(module).__name__}, not a torch.nn.Module", ARCHITECTURE_HINT
        )
    return module
