"""The space of students a search draws from: width, depth and Conv2d kernel size, read off the teacher.

Depths run from `min_depth` to the model's hidden blocks (robopt.training.students.hidden_blocks); every depth is
probed once with design_student at full width, so depths the structure cannot reach are left out and the kernel size
is only asked for where a spatial Conv2d survives the depth cut (a shallow CNN student may keep none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from robopt.errors import TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.training.students import design_student, hidden_blocks

Sample = tuple[Any, ...]


class SearchSpace(BaseModel):
    """Which student configurations a search may try (all values are part of the study's identity)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_width: float = Field(default=0.1, gt=0.0, le=1.0, description="Narrowest width (share of channels kept).")
    max_width: float = Field(default=1.0, gt=0.0, le=1.0, description="Widest width tried.")
    width_step: float = Field(default=0.05, gt=0.0, le=1.0, description="Widths are multiples of this from min_width.")
    min_depth: int = Field(default=1, ge=0, description="Fewest hidden blocks a student keeps.")
    max_depth: int | None = Field(default=None, ge=0, description="Most hidden blocks (None: the model's own).")
    kernel_sizes: tuple[int, ...] = Field(default=(1, 3, 5), description="Odd Conv2d kernel sizes tried (CNNs).")

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if self.max_width < self.min_width:
            raise ValueError(f"max_width {self.max_width} is below min_width {self.min_width}")
        steps = (self.max_width - self.min_width) / self.width_step
        if abs(steps - round(steps)) > 1e-6:
            raise ValueError(
                f"the width range {self.min_width}..{self.max_width} is not a whole number of width_step "
                f"{self.width_step} steps"
            )
        if self.max_depth is not None and self.max_depth < self.min_depth:
            raise ValueError(f"max_depth {self.max_depth} is below min_depth {self.min_depth}")
        if not self.kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be positive odd numbers, got {list(self.kernel_sizes)}")
        if len(set(self.kernel_sizes)) != len(self.kernel_sizes):
            raise ValueError(f"kernel_sizes has repeats: {list(self.kernel_sizes)}")
        return self


@dataclass(frozen=True)
class StudentConfig:
    """One point of the space. `kernel_size` None: the student keeps the model's kernels (or has no spatial conv)."""

    width: float
    depth: int
    kernel_size: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"width": self.width, "depth": self.depth, "kernel_size": self.kernel_size}


@dataclass(frozen=True)
class ReachableSpace:
    """The space as this model allows it: each reachable depth with the kernel sizes its spatial convs have."""

    space: SearchSpace
    kernels_at_depth: dict[int, tuple[int, ...]]
    model_depth: int

    @property
    def depths(self) -> list[int]:
        return sorted(self.kernels_at_depth)

    def describe(self) -> dict[str, Any]:
        return {
            "widths": [self.space.min_width, self.space.max_width, self.space.width_step],
            "depths": self.depths,
            "model_depth": self.model_depth,
            "kernel_sizes": list(self.space.kernel_sizes) if any(self.kernels_at_depth.values()) else [],
            "depths_with_spatial_convs": [d for d, k in sorted(self.kernels_at_depth.items()) if k],
        }

    def suggest(self, trial: optuna.Trial) -> StudentConfig:
        """Draw a configuration: width on its grid, depth among the reachable ones, a kernel where convs remain."""
        s = self.space
        width = trial.suggest_float("width", s.min_width, s.max_width, step=s.width_step)
        depths = self.depths
        depth = trial.suggest_int("depth", depths[0], depths[-1])
        if depth not in self.kernels_at_depth:  # a gap in the reachable depths: take the next reachable one up
            depth = min(d for d in depths if d > depth)
        kernel = None
        if self.kernels_at_depth[depth]:
            kernel = trial.suggest_categorical("kernel_size", list(s.kernel_sizes))
        return StudentConfig(round(width, 6), depth, kernel)

    def design_kernel(self, config: StudentConfig) -> int | None:
        """The kernel_size to pass to design_student: None when the student's convs already have that kernel."""
        kept = self.kernels_at_depth.get(config.depth, ())
        if config.kernel_size is None or set(kept) == {config.kernel_size}:
            return None
        return config.kernel_size


def spatial_kernels(model: nn.Module, heads: list[nn.Module]) -> tuple[int, ...]:
    """Kernel sizes of the square, odd, larger-than-1 Conv2d layers that are not output layers (the ones
    design_student resizes), sorted."""
    sizes = set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and all(m is not h for h in heads):
            kh, kw = m.kernel_size
            if kh == kw and kh % 2 == 1 and kh > 1:
                sizes.add(kh)
    return tuple(sorted(sizes))


def reachable_space(
    model: nn.Module, inputs: Sample, space: SearchSpace, seed: int, progress: Progress | None = None
) -> ReachableSpace:
    """Probe which depths design_student can reach on `model` and which kernels survive at each (see the module
    docstring). Raises TechniqueNotApplicableError when no depth in the range can be reached."""
    from robopt.tools.techniques import _layers

    progress = progress or Progress()
    heads = _layers.find_head_layers(model, inputs)
    model_depth = len(hidden_blocks(model, inputs, heads))
    top = model_depth if space.max_depth is None else min(space.max_depth, model_depth)
    if top < space.min_depth:
        raise TechniqueNotApplicableError(
            f"the model has {model_depth} hidden block(s), fewer than the search's min_depth {space.min_depth}",
            f"set min_depth <= {model_depth}",
        )
    kernels: dict[int, tuple[int, ...]] = {}
    reasons: list[str] = []
    for depth in progress.track(range(space.min_depth, top + 1), "search space"):
        if depth == model_depth:
            kernels[depth] = spatial_kernels(model, heads)
            continue
        try:
            design = design_student(model, inputs, width=1.0, depth=depth, seed=seed)
        except TechniqueNotApplicableError as e:
            reasons.append(f"depth {depth}: {e.message}")
            continue
        kernels[depth] = spatial_kernels(design.model, _layers.find_head_layers(design.model, inputs))
    if not kernels:
        raise TechniqueNotApplicableError(
            f"no depth in {space.min_depth}..{top} can be reached: {'; '.join(reasons)}",
            "widen the depth range (max_depth) or search width only",
        )
    return ReachableSpace(space, kernels, model_depth)
