"""Per-layer quantization sensitivity: how much the model's OUTPUT degrades when one layer alone is quantized.

Proxy (measured, not estimated): for each Linear layer (optionally each Conv layer) and each candidate bit
width, the layer's weights are replaced by their HQQ-quantized-then-dequantized values (fake quantization
through hqq's own quantizer, so exactly the weights the deployed CpuHQQLinear computes with), every other
layer stays in float, the calibration samples are run, and the model's primary output is compared with the
unquantized model's:

    relative_error = sum_s ||y_q(s) - y(s)||^2 / sum_s ||y(s)||^2,     output SQNR = -10 log10(relative_error) dB

Why this proxy: it measures what the deployment sees (the output, through every downstream nonlinearity,
normalization and attention), needs no gradients or labels (a Fisher estimate needs a loss and backward
passes, which a policy or VLA given to robopt often lacks), and its noise powers add up approximately when
several layers are quantized at once (independent, small perturbations), which is what makes the summed
per-layer error a usable objective for mixed precision (robopt.tools.techniques.mixed_precision).
Why fake quantization instead of swapping in CpuHQQLinear modules: the numbers are identical, and putting a
tensor back is cheaper and leaves the model's structure untouched between measurements.

Each layer also gets a role tag (vision_tower, projector, backbone, action_head, other) so that a planner can
keep the parts that VLAs are known to be fragile in (projector, action head) at higher precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from robopt.calibration.base import CalibrationSet
from robopt.errors import TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.analysis import eval_mode
from robopt.tools.threads import torch_threads

Role = Literal["vision_tower", "projector", "backbone", "action_head", "other"]
ROLES: tuple[Role, ...] = ("vision_tower", "projector", "backbone", "action_head", "other")
MAX_SQNR_DB = 200.0  # reported when quantizing a layer does not change the output at all

# Module-name segments (lower case) per role, checked in this order after the structural head detection.
# mini-vla: vision.*, projector.*, blocks.*, head; OpenVLA: vision_backbone.*, projector.fc*, language_model.*.
_ROLE_SEGMENTS: tuple[tuple[Role, tuple[str, ...]], ...] = (
    (
        "vision_tower",
        (
            "vision",
            "visual",
            "vision_backbone",
            "vision_tower",
            "vision_model",
            "vision_encoder",
            "image_encoder",
            "featurizer",
            "fused_featurizer",
            "patch_embed",
            "backbone_cnn",
        ),
    ),
    ("projector", ("projector", "mm_projector", "multi_modal_projector", "connector", "resampler")),
    (
        "backbone",
        ("blocks", "layers", "layer", "h", "encoder", "decoder", "transformer", "language_model", "llm", "model"),
    ),
)


@dataclass(frozen=True)
class LayerSensitivity:
    """Output degradation when this layer alone is quantized, per candidate bit width.

    `relative_error[b]` is the output noise power over signal power (see the module docstring), `sqnr_db[b]` the
    same in decibels (higher is better), `stored_bytes[b]` what the packed weights with their group scales and zero
    points take (bias excluded). A bit width HQQ cannot pack for this layer's shape is absent.
    """

    name: str
    layer_type: str
    role: Role
    params: int
    relative_error: dict[int, float] = field(default_factory=dict)
    sqnr_db: dict[int, float] = field(default_factory=dict)
    stored_bytes: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite errors become None)."""

        def finite(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {
            "name": self.name,
            "layer_type": self.layer_type,
            "role": self.role,
            "params": self.params,
            "relative_error": {str(b): finite(v) for b, v in self.relative_error.items()},
            "sqnr_db": {str(b): finite(v) for b, v in self.sqnr_db.items()},
            "stored_bytes": {str(b): v for b, v in self.stored_bytes.items()},
        }


def sqnr_db(relative_error: float) -> float:
    if not math.isfinite(relative_error):
        return -math.inf
    if relative_error <= 0:
        return MAX_SQNR_DB
    return min(MAX_SQNR_DB, -10.0 * math.log10(relative_error))


def layer_roles(
    model: nn.Module, example_inputs: tuple[Any, ...] | None = None, names: Iterable[str] | None = None
) -> dict[str, Role]:
    """Role of every Linear and Conv layer (or of `names`): action_head for the layers that produce the model's outputs
    (found by running it on `example_inputs`: robopt.tools.techniques._layers.find_head_layers), then by module
    name: vision tower, projector, backbone (transformer blocks / language model), else other."""
    from robopt.tools.techniques import _layers  # not at import: the techniques package imports this module

    heads = _layers.find_head_layers(model, example_inputs)
    modules = dict(model.named_modules())
    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    wanted = list(names) if names is not None else [n for n, _ in _layers.weighted_layers(model, kinds)]
    roles: dict[str, Role] = {}
    for name in wanted:
        module = modules.get(name)
        if module is not None and any(module is h for h in heads):
            roles[name] = "action_head"
            continue
        segments = set(name.lower().split("."))
        roles[name] = next((role for role, keys in _ROLE_SEGMENTS if segments & set(keys)), "other")
    return roles


def _weight_2d(layer: nn.Module) -> nn.Linear:
    """A Linear view of a layer's weight ([out, in*k...]) for the quantizer (which copies it before quantizing)."""
    weight = layer.weight.detach()
    flat = weight.reshape(weight.shape[0], -1)
    view = nn.Linear(flat.shape[1], flat.shape[0], bias=False, device="meta")
    view.weight = nn.Parameter(flat, requires_grad=False)
    return view


def _as_samples(samples: CalibrationSet | Sequence[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    items = list(samples.samples if isinstance(samples, CalibrationSet) else samples)
    if not items:
        raise TechniqueNotApplicableError(
            "layer sensitivity needs at least one calibration sample", "pass a non-empty calibration set"
        )
    return [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in items]


def _outputs(model: nn.Module, samples: list[tuple[torch.Tensor, ...]], progress: Progress) -> list[torch.Tensor]:
    from robopt.evaluation.classification import call_model

    outputs = []
    for sample in samples:
        progress.check()
        outputs.append(call_model(model, sample).detach().to(torch.float64))
    return outputs


def _noise_power(
    model: nn.Module, samples: list[tuple[torch.Tensor, ...]], reference: list[torch.Tensor], progress: Progress
) -> float:
    total = 0.0
    for out, ref in zip(_outputs(model, samples, progress), reference, strict=True):
        if out.shape != ref.shape:
            return math.inf
        total += float(((out - ref) ** 2).sum())
    return total if math.isfinite(total) else math.inf


def layer_sensitivity(
    model: nn.Module,
    samples: CalibrationSet | Sequence[tuple[torch.Tensor, ...]],
    candidates: Sequence[int] = (8, 4, 2),
    progress: Progress | None = None,
    *,
    group_size: int = 64,
    axis: int = 1,
    include_conv: bool = False,
    example_inputs: tuple[Any, ...] | None = None,
    stage: str = "sensitivity",
    threads: int = 1,
) -> list[LayerSensitivity]:
    """Quantize one layer at a time (HQQ at each of `candidates` bits) and measure the model's output error.

    Layers: every exact nn.Linear (the layers HQQ replaces), plus Conv layers with `include_conv` (their weights
    flattened to [out, in*k*k]; informative only, HQQ itself quantizes Linear layers). Roles come from
    `layer_roles(model, example_inputs or the first sample)`. Runs with `threads` torch threads (1: the same
    numbers on any machine); progress is reported (and cancellation honoured) per layer. The model is left
    unchanged, also when cancelled.
    """
    from robopt.tools.techniques import _layers
    from robopt.tools.techniques.hqq_quant import HQQ_BITS, fake_quantized

    progress = progress or Progress()
    bad = [b for b in candidates if b not in HQQ_BITS]
    if bad or not candidates:
        raise TechniqueNotApplicableError(
            f"unsupported candidate bit widths {bad or list(candidates)}", f"choose from {list(HQQ_BITS)}"
        )
    _layers.require_eager_float_module(model, "layer sensitivity")
    batch = _as_samples(samples)
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd) if include_conv else (nn.Linear,)
    layers = [
        (n, m)
        for n, m in _layers.weighted_layers(model, kinds)
        if type(m) is nn.Linear or (include_conv and isinstance(m, nn.modules.conv._ConvNd))
    ]
    if not layers:
        raise TechniqueNotApplicableError(
            "the model has no Linear layer to measure" + ("" if include_conv else " (Conv layers: include_conv=True)")
        )
    bits = sorted(set(candidates), reverse=True)
    results: list[LayerSensitivity] = []
    with eval_mode(model), torch.no_grad(), torch_threads(threads):
        roles = layer_roles(model, example_inputs or batch[0], [n for n, _ in layers])
        reference = _outputs(model, batch, progress)
        signal = sum(float((r**2).sum()) for r in reference) or 1e-30
        for name, layer in progress.track(layers, stage):
            original = layer.weight.data
            errors: dict[int, float] = {}
            packed: dict[int, int] = {}
            try:
                for b in bits:
                    quantized = fake_quantized(_weight_2d(layer), b, group_size, axis)
                    if quantized is None:
                        continue
                    layer.weight.data = quantized[0].reshape(original.shape).to(original.dtype)
                    errors[b] = _noise_power(model, batch, reference, progress) / signal
                    packed[b] = quantized[1]
            finally:
                layer.weight.data = original
            results.append(
                LayerSensitivity(
                    name=name,
                    layer_type=type(layer).__name__,
                    role=roles[name],
                    params=layer.weight.numel(),
                    relative_error=errors,
                    sqnr_db={b: sqnr_db(e) for b, e in errors.items()},
                    stored_bytes=packed,
                )
            )
    return results


def sensitivity_table(results: Sequence[LayerSensitivity]) -> list[dict[str, Any]]:
    """JSON-ready rows, most sensitive first (lowest SQNR at the lowest measured bit width)."""

    def worst(r: LayerSensitivity) -> float:
        return r.sqnr_db[min(r.sqnr_db)] if r.sqnr_db else MAX_SQNR_DB

    return [r.to_dict() for r in sorted(results, key=worst)]
