"""Student architectures designed from their teacher: the teacher thinned in width, cut in depth, re-kernelled.

`design_student(teacher, example_inputs, width=, depth=, kernel_size=)` returns a new model (the teacher is left
untouched) whose outputs have the teacher's shapes, built generically from the teacher's own modules rather than
from a per-architecture recipe:

- width: a deep copy of the teacher thinned with torch-pruning's dependency graph, keeping `width` of the
  channels/neurons of every prunable group, ranked by group L2 weight magnitude; the output layers are left intact.
  The student so starts from the teacher's most important weights, and keeps its buffers (e.g. MLPPolicy's
  observation normalisation).
- depth: hidden blocks are dropped (replaced by nn.Identity, so the kept layers keep the teacher's names and
  feature matching can pair them by name) until `depth` hidden blocks remain. A hidden block is a non-output
  Linear/Conv layer inside an nn.Sequential together with the elementwise modules that follow it there
  (activations, dropout, normalisation). A block whose output has its input's shape ([Linear(h, h), ReLU], a
  stride-1 Conv with equal in/out channels) is dropped as it is; a block whose output is only wider than its input
  (same spatial shape) is first narrowed to its input width with torch-pruning (its weakest output channels go,
  and with them the next layer's matching inputs), then dropped. Shape-preserving blocks go first, deepest first,
  then widening blocks, the least widening first. The depth counts every non-output Linear/Conv that runs, so a
  layer outside a Sequential counts but is never dropped.
- kernel_size: every spatial Conv2d (square odd kernel > 1, dilation 1, numeric padding; output layers excepted)
  gets a `kernel_size` x `kernel_size` kernel, initialised from the teacher's by centre-cropping (smaller kernels
  keep the centre taps) or zero-padding (larger kernels compute exactly the teacher's function); the padding
  grows by (new - old) / 2, so every output keeps its spatial shape.

Transforms run in that order; `seed` seeds torch's global RNG for the duration (none of the transforms draws random
numbers today, so equal arguments give equal students).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.training.fit import all_trainable

WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)
# Modules that may follow a hidden layer inside its block: they keep the tensor's shape element for element.
_FOLLOWERS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass(frozen=True)
class StudentDesign:
    """A student model and how it was derived from its teacher (`params` and `teacher_params` count parameters)."""

    model: nn.Module
    width: float
    depth: int | None
    kernel_size: int | None
    params: int
    teacher_params: int
    description: str

    @property
    def param_ratio(self) -> float:
        return self.params / max(self.teacher_params, 1)


@dataclass
class HiddenBlock:
    """A hidden layer and the elementwise modules after it in its Sequential (indices first..last of `parent`)."""

    name: str
    layer: nn.Module
    parent: nn.Sequential | None
    first: int
    last: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    order: int

    @property
    def channel_dim(self) -> int:
        return 1 if isinstance(self.layer, nn.modules.conv._ConvNd) else len(self.out_shape) - 1

    @property
    def preserving(self) -> bool:
        return self.parent is not None and self.in_shape == self.out_shape

    @property
    def widening(self) -> bool:
        """Output wider than input in the channel dimension only (so narrowing it makes it shape-preserving)."""
        if self.parent is None or len(self.in_shape) != len(self.out_shape):
            return False
        c = self.channel_dim
        same_rest = all(a == b for i, (a, b) in enumerate(zip(self.in_shape, self.out_shape, strict=True)) if i != c)
        grouped = isinstance(self.layer, nn.modules.conv._ConvNd) and self.layer.groups != 1
        return same_rest and not grouped and self.out_shape[c] > self.in_shape[c]


def design_student(
    teacher: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    width: float = 0.5,
    depth: int | None = None,
    kernel_size: int | None = None,
    seed: int = 0,
) -> StudentDesign:
    """A student derived from `teacher` (not modified): `width` of its channels per prunable group, at most `depth`
    hidden blocks, Conv2d kernels of `kernel_size` (see the module docstring). Output shapes equal the teacher's.

    Raises TechniqueNotApplicableError for arguments out of range, a model that cannot be traced or thinned, or a
    depth the structure cannot reach; TechniqueFailedError if the student's output shapes came out different.
    """
    if not 0.0 < width <= 1.0:
        raise TechniqueNotApplicableError(f"width must lie in (0, 1], got {width}", "e.g. width=0.5 keeps half")
    if depth is not None and depth < 0:
        raise TechniqueNotApplicableError(f"depth must be >= 0 hidden blocks, got {depth}")
    if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
        raise TechniqueNotApplicableError(
            f"kernel_size must be a positive odd number, got {kernel_size}", "odd kernels keep the spatial shape"
        )
    from robopt.tools.techniques import _layers  # not at import: the technique package imports this module

    _layers.require_eager_float_module(teacher, "student design")
    inputs = tuple(example_inputs)
    student = copy.deepcopy(teacher).eval()
    try:
        shapes = _layers.output_shapes(student, inputs)
    except Exception as e:  # any model code may fail on the given inputs; report it with the shapes
        raise TechniqueNotApplicableError(
            f"the teacher does not run on the example inputs {[tuple(t.shape) for t in inputs]}: {e}",
            "give example inputs that match the model",
        ) from e
    teacher_params = _layers.count_params(student)
    heads = _layers.find_head_layers(student, inputs)
    notes: list[str] = []
    with torch.random.fork_rng(devices=[]), all_trainable(student):
        torch.manual_seed(seed)
        if width < 1.0:
            notes.append(_thin(student, inputs, width, heads))
        if depth is not None:
            notes.append(_reduce_depth(student, inputs, depth, heads))
        if kernel_size is not None:
            notes.append(_resize_kernels(student, kernel_size, heads))
    student.eval()
    after = _layers.output_shapes(student, inputs)
    if after != shapes:
        raise TechniqueFailedError(
            f"the student's output shapes {after} differ from the teacher's {shapes}",
            "the output layer was not recognised; keep width=1.0 or name a model whose head is a Linear/Conv",
        )
    params = _layers.count_params(student)
    summary = f"{params:,} parameters ({params / max(teacher_params, 1):.1%} of the teacher's {teacher_params:,})"
    description = "; ".join([*notes, summary]) if notes else f"a copy of the teacher: {summary}"
    return StudentDesign(student, width, depth, kernel_size, params, teacher_params, description)


# -- helpers -------------------------------------------------------------------------------------------


def _forward(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs)


def _widths(model: nn.Module) -> dict[str, int]:
    """Output width (out_features / out_channels) of every Linear/Conv, by name."""
    from robopt.tools.techniques import _layers

    return {
        name: (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
        for name, m in _layers.weighted_layers(model, WEIGHTED)
    }


def _thin(model: nn.Module, inputs: tuple[torch.Tensor, ...], width: float, heads: list[nn.Module]) -> str:
    import torch_pruning as tp

    from robopt.tools.techniques import _layers

    before = _widths(model)
    params = _layers.count_params(model)
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=1.0 - width,
            ignored_layers=heads,
            forward_fn=_forward,
        )
        pruner.step()
    except Exception as e:  # torch-pruning raises plain errors on graphs it cannot trace
        raise TechniqueNotApplicableError(
            f"torch-pruning could not thin this model: {type(e).__name__}: {e}",
            "width scaling needs a model torch-pruning can trace (Linear/Conv networks); keep width=1.0",
        ) from e
    if _layers.count_params(model) >= params:
        raise TechniqueNotApplicableError(
            f"width {width} removed no channel: the layers are too narrow or all of them are output layers",
            "choose a smaller width, or scale depth instead",
        )
    after = _widths(model)
    changed = [f"{n} {before[n]}->{after[n]}" for n in before if after.get(n, before[n]) != before[n]]
    return f"width {width:g}: kept {width:.0%} of each prunable group's channels by L2 magnitude ({', '.join(changed)})"


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def hidden_blocks(model: nn.Module, inputs: tuple[torch.Tensor, ...], heads: list[nn.Module]) -> list[HiddenBlock]:
    """The non-output Linear/Conv layers that run on `inputs`, in execution order, each with its block."""
    from robopt.tools.techniques import _layers

    layers = [(n, m) for n, m in _layers.weighted_layers(model, WEIGHTED) if all(m is not h for h in heads)]
    seen: dict[int, tuple[tuple[int, ...], tuple[int, ...], int]] = {}

    def recorder(module: nn.Module):
        def hook(_m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if id(module) not in seen and args and isinstance(args[0], torch.Tensor) and torch.is_tensor(output):
                seen[id(module)] = (tuple(args[0].shape), tuple(output.shape), len(seen))

        return hook

    handles = [m.register_forward_hook(recorder(m)) for _, m in layers]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    blocks = []
    for name, layer in layers:
        if id(layer) not in seen:
            continue
        in_shape, out_shape, order = seen[id(layer)]
        parent, attr = _parent_of(model, name)
        if isinstance(parent, nn.Sequential) and attr.isdigit():
            first = last = int(attr)
            while last + 1 < len(parent) and isinstance(parent[last + 1], _FOLLOWERS):
                last += 1
            blocks.append(HiddenBlock(name, layer, parent, first, last, in_shape, out_shape, order))
        else:
            blocks.append(HiddenBlock(name, layer, None, 0, 0, in_shape, out_shape, order))
    return sorted(blocks, key=lambda b: b.order)


def _narrow(model: nn.Module, inputs: tuple[torch.Tensor, ...], block: HiddenBlock) -> None:
    """Remove the block layer's weakest output channels (group L2 magnitude) until it is as wide as its input."""
    import torch_pruning as tp

    c = block.channel_dim
    keep, total = block.in_shape[c], block.out_shape[c]
    prune_fn = tp.prune_linear_out_channels if isinstance(block.layer, nn.Linear) else tp.prune_conv_out_channels
    graph = tp.DependencyGraph().build_dependency(model, inputs, forward_fn=_forward, verbose=False)
    scores = tp.importance.GroupMagnitudeImportance(p=2)(graph.get_pruning_group(block.layer, prune_fn, range(total)))
    drop = sorted(torch.argsort(scores)[: total - keep].tolist())
    graph.get_pruning_group(block.layer, prune_fn, drop).prune()


def _reduce_depth(model: nn.Module, inputs: tuple[torch.Tensor, ...], depth: int, heads: list[nn.Module]) -> str:
    blocks = hidden_blocks(model, inputs, heads)
    start = len(blocks)
    if depth > start:
        raise TechniqueNotApplicableError(
            f"depth {depth} exceeds the teacher's {start} hidden block(s); a student is never deeper than its teacher",
            f"choose depth <= {start}",
        )
    dropped: list[str] = []
    while len(blocks) > depth:
        preserving = [b for b in blocks if b.preserving]
        widening = [b for b in blocks if b.widening]
        if preserving:
            block = max(preserving, key=lambda b: b.order)
        elif widening:
            block = max(widening, key=lambda b: (b.in_shape[b.channel_dim] / b.out_shape[b.channel_dim], b.order))
        else:
            raise TechniqueNotApplicableError(
                f"cannot reduce the depth to {depth}: the remaining {len(blocks)} hidden block(s) "
                f"({', '.join(b.name for b in blocks)}) neither keep nor only widen their input's shape inside an "
                "nn.Sequential, so none can be dropped",
                f"choose depth >= {len(blocks)}, or scale width instead",
            )
        label = f"{block.name} ({type(block.layer).__name__} {list(block.in_shape)}->{list(block.out_shape)})"
        if not block.preserving:
            try:
                _narrow(model, inputs, block)
            except Exception as e:  # torch-pruning raises plain errors on graphs it cannot trace
                raise TechniqueNotApplicableError(
                    f"cannot narrow {block.name} to drop it: {type(e).__name__}: {e}", f"choose depth >= {len(blocks)}"
                ) from e
            label += f", narrowed to {block.in_shape[block.channel_dim]} channels first"
        assert block.parent is not None
        for i in range(block.first, block.last + 1):
            block.parent[i] = nn.Identity()
        dropped.append(label)
        blocks = hidden_blocks(model, inputs, heads)
    kept = ", ".join(b.name for b in blocks) or "none"
    if not dropped:
        return f"depth {depth}: unchanged (the teacher has {start} hidden block(s))"
    return f"depth {start}->{depth}: dropped {'; '.join(dropped)}; hidden layers kept: {kept}"


def _resize_kernels(model: nn.Module, k: int, heads: list[nn.Module]) -> str:
    changed, skipped = [], []
    verbs: set[str] = set()
    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or any(conv is h for h in heads):
            continue
        kh, kw = conv.kernel_size
        if kh != kw or kh % 2 == 0 or kh == 1:
            continue  # pointwise and non-square kernels are not spatial convolutions to resize
        if kh == k:
            continue
        pad = conv.padding
        if isinstance(pad, str) or conv.dilation != (1, 1) or pad[0] != pad[1] or pad[0] + (k - kh) // 2 < 0:
            skipped.append(f"{name} (padding {pad}, dilation {conv.dilation})")
            continue
        new = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            k,
            stride=conv.stride,
            padding=pad[0] + (k - kh) // 2,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            new.weight.zero_()
            if k > kh:
                o = (k - kh) // 2
                new.weight[:, :, o : o + kh, o : o + kh] = conv.weight
            else:
                o = (kh - k) // 2
                new.weight.copy_(conv.weight[:, :, o : o + k, o : o + k])
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.train(conv.training)
        parent, attr = _parent_of(model, name)
        setattr(parent, attr, new)
        changed.append(f"{name} {kh}x{kh}->{k}x{k}")
        verbs.add("zero-padded (the same function)" if k > kh else "centre-cropped")
    if not changed:
        raise TechniqueNotApplicableError(
            f"kernel_size {k}: no Conv2d kernel to resize"
            + (
                f" (skipped: {', '.join(skipped)})" if skipped else " (the model has no spatial Conv2d besides outputs)"
            ),
            "leave kernel_size unset for this model",
        )
    note = f"kernel {k}x{k}: {', '.join(changed)}, {' or '.join(sorted(verbs))} from the teacher's kernels"
    return note + (f"; kept {', '.join(skipped)}" if skipped else "")
