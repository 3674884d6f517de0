"""Unstructured and N:M weight sparsity for Linear layers: masks (magnitude, Wanda), SparseGPT's reconstruction,
layer-input statistics gathered from calibration data, and measured sparsity / reconstruction error.

Written from the papers because no maintained implementation fits robopt's environment (torch 2.13 CPU,
transformers 5): llmcompressor downgrades transformers and auto-round (see ENVIRONMENT.md); neural-compressor's
Wanda/SparseGPT drivers are hard-wired to Llama decoder layers of transformers 4 (they replay layers with
`position_ids`, transformers 5 layers need `position_embeddings`) and to CUDA devices; torchao's WandaSparsifier only
ranks scores across a whole layer (not per output row, the paper's choice for LLMs), works through torch.ao
quantization observers, and there is no SparseGPT in torchao.

- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"): score
  |W_ij| * ||X_j||_2 (the weight times the L2 norm of its input feature over all calibration tokens), and prune the
  lowest scores of each output row (or of the whole layer). It is the exact error of removing one weight when input
  features are uncorrelated, so it pays where feature norms differ widely (LLM outlier features, image borders); on
  tiny-lm, whose features barely differ, it is on a par with magnitude pruning.
- SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"):
  OBS-style pruning with the inverse Hessian H^-1 of the layer-wise problem (H = X X^T of the layer inputs): column by
  column, prune the weights of least saliency w^2 / [H^-1]_cc^2 (mask chosen per block of columns) and move each pruned
  weight's error onto the columns not yet processed; lazy batched updates over column blocks.
- Both are applied layer by layer in execution order: `prune_linear_layers` collects each group's input statistics
  with the groups before it already pruned (a group is one block of a ModuleList, e.g. a decoder layer, else one
  Linear), as the papers do; `sequential=False` instead takes every layer's statistics from the dense model in one
  pass.

Zeros stay in dense storage: the files keep their size and dense kernels do the same work, so none of this is
faster or smaller on this CPU by itself (torch's 2:4 kernels, `to_sparse_semi_structured`, run on CUDA only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robopt.errors import RoboptError, TechniqueFailedError, TechniqueNotApplicableError
from robopt.progress import Progress

NO_SPEEDUP_NOTE = (
    "no speed-up expected on this CPU: zeros stay in dense tensors, so dense kernels do the same work and files keep "
    "their size (sparse kernels for 2:4, torch.sparse.to_sparse_semi_structured, run on CUDA only)"
)
FULL_STATISTICS_LIMIT = 4096
"""Input widths up to this keep the full X X^T (for the measured reconstruction error); wider keep its diagonal."""

Sample = tuple[torch.Tensor, ...]


# -- masks -----------------------------------------------------------------------------------------------------------


def row_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is pruned: the round(cols * sparsity) lowest scores of each output row (Wanda's group)."""
    k = round(scores.shape[1] * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def layer_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is pruned: the round(numel * sparsity) lowest scores of the whole layer."""
    k = round(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def nm_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: the n lowest scores in every group of m consecutive input columns."""
    rows, cols = scores.shape
    if cols % m:
        raise TechniqueNotApplicableError(f"{cols} input columns do not split into groups of {m}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, from the per-feature sums of squared inputs over all calibration tokens."""
    return weight.abs().float() * input_sq_norms.float().clamp_min(0).sqrt().unsqueeze(0)


def nm_pattern_holds(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of m consecutive input weights of every row has at least n zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=2)
    return bool((zeros >= n).all())


# -- SparseGPT -------------------------------------------------------------------------------------------------------


def sparsegpt_prune(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    *,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT on one Linear weight [out, in] given H = X X^T of its inputs [in, in]; returns the new weight.

    Unstructured: in each block of `blocksize` columns the share `sparsity` of the block's weights with the lowest
    OBS saliency w^2 / [H^-1]_cc^2 is pruned (adaptive mask selection). `nm=(n, m)`: n of every m consecutive columns
    of each row instead, chosen when the group's first column is reached (on the updated weights). Each pruned
    column's error, divided by its [H^-1]_cc, is spread over the later columns through the upper Cholesky factor of
    H^-1 (rows of H^-1 restricted to the columns not yet processed), within the block at once and to later blocks in
    one matrix product (lazy batch updates). `percdamp` adds that share of the mean diagonal to H first.
    """
    if nm is not None and blocksize % nm[1]:
        raise TechniqueNotApplicableError(f"blocksize {blocksize} is not a multiple of m={nm[1]}")
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = xtx.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(cols, dtype=h.dtype) * (percdamp * torch.diag(h).mean())
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    except torch.linalg.LinAlgError as e:
        raise TechniqueFailedError(
            f"the Hessian of a {rows}x{cols} layer is not positive definite even after dampening: {e}",
            "raise percdamp or give more calibration samples",
        ) from e
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = w[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = torch.diag(hinv_block)
        errors = torch.zeros_like(block)
        if nm is None:
            saliency = block.pow(2) / diag.pow(2).unsqueeze(0)
            mask = layer_prune_mask(saliency, sparsity)
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = block[:, i : i + m].pow(2) / diag[i : i + m].pow(2).unsqueeze(0)
                mask[:, i : i + m].scatter_(1, torch.topk(saliency, n, dim=1, largest=False).indices, True)
            column = block[:, i]
            kept = torch.where(mask[:, i], torch.zeros_like(column), column)
            error = (column - kept) / diag[i]
            block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w.to(weight.dtype)


# -- measurement -----------------------------------------------------------------------------------------------------


def zero_share(tensors: Sequence[torch.Tensor]) -> float:
    """The share of exactly-zero entries over the given tensors."""
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / total if total else 0.0


def relative_reconstruction_error(before: torch.Tensor, after: torch.Tensor, xtx: torch.Tensor) -> float:
    """||(W - W') X|| / ||W X|| over the inputs X whose X X^T is `xtx` (the bias cancels out)."""
    h = xtx.double()
    delta = (before.double() - after.double()) @ h
    num = float((delta * (before.double() - after.double())).sum())
    den = float(((before.double() @ h) * before.double()).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


# -- layer-input statistics from calibration ------------------------------------------------------------------------


@dataclass
class InputStatistics:
    """Running statistics of one Linear layer's inputs: token count, sum of squares per feature and, for widths up to
    FULL_STATISTICS_LIMIT (or when `full`), the full X X^T (float64)."""

    in_features: int
    full: bool
    tokens: int = 0
    sq_norms: torch.Tensor = field(init=False)
    xtx: torch.Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        self.sq_norms = torch.zeros(self.in_features, dtype=torch.float64)
        self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64) if self.full else None

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()  # float32 products, float64 running sums
        self.tokens += x.shape[0]
        self.sq_norms += x.pow(2).sum(dim=0).double()
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()


class _StopForward(Exception):
    """Raised by a hook once every layer of the current group has run: the rest of the model is not needed."""


def _call(model: nn.Module, sample: Sample) -> None:
    with contextlib.suppress(_StopForward):
        model(*sample)


def batches(samples: Sequence[Sample], batch_size: int) -> list[Sample]:
    """Consecutive batch-1 samples of equal shapes concatenated along dim 0, up to `batch_size` per call."""
    out: list[Sample] = []
    run: list[Sample] = []

    def signature(sample: Sample) -> tuple[Any, ...]:
        return tuple((t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else id(t) for t in sample)

    def flush() -> None:
        if run:
            out.append(run[0] if len(run) == 1 else tuple(torch.cat(parts) for parts in zip(*run, strict=True)))
            run.clear()

    for sample in samples:
        batchable = all(isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == 1 for t in sample)
        if not batchable or (run and (len(run) >= batch_size or signature(sample) != signature(run[0]))):
            flush()
        run.append(sample)
        if not batchable:
            flush()
    flush()
    return out


def execution_order(model: nn.Module, layers: dict[str, nn.Linear], sample: Sample) -> tuple[list[str], bool]:
    """The layers' names in the order they first run on `sample`, and whether each ran exactly once."""
    calls: dict[str, int] = {}
    order: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any) -> None:
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model(*sample)
    except RoboptError:
        raise
    except Exception as e:  # a model may raise anything on inputs it does not take; reported, never hidden
        shapes = [list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in sample]
        raise TechniqueNotApplicableError(
            f"the model failed on a calibration sample (inputs {shapes}): {type(e).__name__}: {e}",
            "give calibration data in the model's input format (--calibration FILE)",
        ) from e
    finally:
        for h in handles:
            h.remove()
    never = [n for n in layers if n not in calls]
    if never:
        raise TechniqueNotApplicableError(
            f"{len(never)} Linear layers never ran on the calibration inputs (e.g. {never[0]}), so they have no input "
            "statistics",
            "give calibration data that exercises every layer, or use magnitude pruning (prune_unstructured)",
        )
    return order, all(c == 1 for c in calls.values())


def layer_groups(model: nn.Module, order: Sequence[str]) -> list[list[str]]:
    """Layers grouped as the papers process them: all Linear layers of one element of an nn.ModuleList (e.g. one
    transformer block) form a group, any other Linear is a group of its own; groups in execution order."""
    lists = {name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}

    def key(name: str) -> str:
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            if ".".join(parts[:i]) in lists and parts[i].isdigit():
                return ".".join(parts[: i + 1])
        return name

    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(key(name), []).append(name)
    return list(groups.values())


def collect_input_statistics(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    samples: Sequence[Sample],
    *,
    full: bool | None = None,
    stop_after: str | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    stage: str = "calibrate",
) -> dict[str, InputStatistics]:
    """Run the calibration samples through `model` and gather each layer's input statistics.

    `full`: keep X X^T (None: when the width is at most FULL_STATISTICS_LIMIT). `stop_after`: the name of the layer
    after which the forward pass is cut short (the rest of the model cannot change these layers' inputs). Samples
    of equal shapes run `batch_size` per call (one per call if the model fails on the first batch).
    """
    progress = progress or Progress()

    def fresh() -> dict[str, InputStatistics]:
        return {
            n: InputStatistics(m.in_features, full if full is not None else m.in_features <= FULL_STATISTICS_LIMIT)
            for n, m in layers.items()
        }

    stats = fresh()

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            stats[name].add(inputs[0])

        return record

    def stop(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        raise _StopForward

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    if stop_after is not None:
        handles.append(layers[stop_after].register_forward_hook(stop))
    calls = batches(samples, batch_size)
    try:
        with torch.no_grad():
            for i, call in enumerate(progress.track(calls, stage)):
                try:
                    _call(model, call)
                except (RuntimeError, ValueError, TypeError, IndexError):
                    if i > 0 or len(calls) == len(samples):
                        raise
                    # The model did not take a batch: restart one sample per call.
                    stats = fresh()
                    for sample in progress.track(samples, stage):
                        _call(model, sample)
                    break
    finally:
        for h in handles:
            h.remove()
    return stats


# -- the driver ------------------------------------------------------------------------------------------------------

PruneLayer = Callable[[str, nn.Linear, InputStatistics], torch.Tensor]
"""(name, layer, its input statistics) -> the layer's new weight."""


@dataclass
class LayerReport:
    sparsity: float
    reconstruction_error: float | None


def prune_linear_layers(
    model: nn.Module,
    layers: dict[str, nn.Linear],
    samples: Sequence[Sample],
    prune_layer: PruneLayer,
    *,
    sequential: bool = True,
    full_statistics: bool | None = None,
    progress: Progress | None = None,
    stage: str = "prune",
) -> dict[str, LayerReport]:
    """Prune `layers` of `model` in place with `prune_layer`, group by group in execution order.

    Sequential: each group's inputs are gathered with every earlier group already pruned (one forward pass per group,
    cut short after the group's last layer when each layer runs once per call). Otherwise every layer's inputs come
    from the dense model in one pass. Returns per layer the measured sparsity and the relative reconstruction error
    ||W X - W' X|| / ||W X|| on the inputs it was pruned for (None where only the diagonal of X X^T was kept).
    """
    progress = progress or Progress()
    if not samples:
        raise TechniqueNotApplicableError("the calibration set is empty", "give at least one calibration sample")
    order, once = execution_order(model, layers, samples[0])
    groups = layer_groups(model, order) if sequential else [order]
    reports: dict[str, LayerReport] = {}
    for g, group in enumerate(groups, 1):
        progress.message(stage, f"group {g}/{len(groups)}: {', '.join(group[:3])}{' ...' if len(group) > 3 else ''}")
        stats = collect_input_statistics(
            model,
            {n: layers[n] for n in group},
            samples,
            full=full_statistics,
            stop_after=group[-1] if once else None,
            progress=progress,
            stage=f"{stage}: calibrate group {g}/{len(groups)}",
        )
        for name in progress.track(group, f"{stage}: group {g}/{len(groups)}"):
            layer, stat = layers[name], stats[name]
            with torch.no_grad():
                before = layer.weight.detach().clone()
                after = prune_layer(name, layer, stat).to(before.dtype)
                layer.weight.copy_(after)
            error = relative_reconstruction_error(before, after, stat.xtx) if stat.xtx is not None else None
            reports[name] = LayerReport(zero_share([after]), error)
    return reports


def calibration_samples(context: Any, n: int, technique: str) -> tuple[list[Sample], str]:
    """n calibration samples from the ApplyContext (TechniqueNotApplicableError when it has none) and their source."""
    if context.calibration is None:
        raise TechniqueNotApplicableError(
            f"{technique} needs calibration inputs (the activations of each Linear layer), but none were given",
            "run it inside an optimization run (it provides calibration data), pass --calibration FILE, or use "
            "prune_unstructured (magnitude, no data needed)",
        )
    calibration = context.calibration(n)
    if len(calibration) == 0:
        raise TechniqueNotApplicableError("the calibration set is empty", "give at least one calibration sample")
    return list(calibration.samples), calibration.source


def layer_details(reports: dict[str, LayerReport]) -> dict[str, Any]:
    """Per-layer measured sparsity and reconstruction error, rounded, for TechniqueResult.details."""
    errors = {n: round(r.reconstruction_error, 6) for n, r in reports.items() if r.reconstruction_error is not None}
    out: dict[str, Any] = {"sparsity_per_layer": {n: round(r.sparsity, 6) for n, r in reports.items()}}
    if errors:
        out["reconstruction_error_per_layer"] = errors
        out["mean_reconstruction_error"] = round(sum(errors.values()) / len(errors), 6)
    return out
