"""Size, memory and roofline latency report of a VLA from its structure alone (works on meta-device models).

FLOPs come from formulas, counting a multiply-accumulate as 2 FLOPs (norms, activations and softmax, <1%, are
left out), for batch 1 with P image patches, a prefix of S = P + T tokens (T prompt tokens) and A action tokens:
- vision tower (per image, N tokens = P + CLS/register tokens, only the blocks the VLA runs):
  2 * N * (Linear weights of the blocks run) + 2 * P * (patch-embedding weights) + 4 * N^2 * d_attn * blocks run
  (QK^T and AV: 2 * N^2 * d_attn each);
- projector: 2 * P * (its Linear weights);
- LLM prefill: 2 * S * W + 4 * L * S^2 * d_attn + 2 * V * d (lm_head on the last position only), where W is the
  Linear weights of the decoder layers, L the layers, V the lm_head rows and d the hidden size; the attention
  term counts the full S x S scores, as fused kernels compute them;
- LLM decode step k = 1..A-1 (feeding action token k, the cache holding S + k - 1 positions):
  2 * W + 4 * L * (S + k) * d_attn + 2 * V * d.
Bytes moved per stage: the weights the stage reads at the given precision (the LLM's input embedding table is
not streamed: one row per token), plus the KV cache written in prefill and read in each decode step.
The whole action = vision towers + projector + prefill + (A - 1) decode steps, each stage bounded by the roofline
(robopt.hardware.roofline): a lower bound on latency, an upper bound on the control rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from robopt.errors import UnsupportedFormatError
from robopt.hardware.devices import DeviceProfile, device_names, get_device
from robopt.hardware.roofline import (
    PRECISION_COMPUTE_DTYPE,
    PRECISIONS,
    Precision,
    WeightCensus,
    kv_element_bytes,
    memory_fit,
    roofline,
    weight_bytes,
)
from robopt.progress import Progress

BASIS = (
    "roofline lower bound: per stage max(FLOPs / peak FLOP/s, bytes / peak bandwidth), batch 1; published "
    "datasheet peaks for named devices, measured rates for this-machine. Real latency is higher."
)


@dataclass(frozen=True)
class VisionTowerShape:
    """One vision tower: the whole module (for parameters) and what one forward of the VLA runs of it."""

    label: str
    module: nn.Module
    run: tuple[nn.Module, ...]
    tokens: int  # sequence length through the blocks: patches + CLS/register tokens
    patches: int
    attention_dim: int  # heads x head_dim
    layers_run: int


@dataclass(frozen=True)
class VLAStructure:
    """A VLA's components as the report sees them; `llm` is a Hugging Face causal LM (config + embeddings)."""

    vision: tuple[VisionTowerShape, ...]
    projector: nn.Module
    llm: nn.Module
    action_head: nn.Module
    image_tokens: int
    text_tokens: int
    action_tokens: int
    action_bins: int


@dataclass(frozen=True)
class Stage:
    """One step of inference: its FLOPs, the weights it reads, KV-cache elements it moves, how often it runs."""

    name: str
    flops: int
    census: WeightCensus
    kv_elements: int = 0
    repeats: int = 1

    def bytes_moved(self, precision: Precision) -> int:
        return weight_bytes(self.census, precision) + self.kv_elements * kv_element_bytes(precision)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _matmul_weights(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """(Linear weight elements, Conv weight elements) under `modules`, each module counted once."""
    seen: set[int] = set()
    linear = conv = 0
    for module in modules:
        for sub in module.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            if isinstance(sub, nn.Linear):
                linear += sub.weight.numel()
            elif isinstance(sub, nn.modules.conv._ConvNd):
                conv += sub.weight.numel()
    return linear, conv


def vision_flops(tower: VisionTowerShape) -> int:
    linear, conv = _matmul_weights(tower.run)
    attention = 4 * tower.tokens**2 * tower.attention_dim * tower.layers_run
    return 2 * tower.tokens * linear + 2 * tower.patches * conv + attention


def _llm_dims(llm: nn.Module) -> tuple[int, int, int, int]:
    """(layers, attention dim = heads x head_dim, KV dim = kv heads x head_dim, lm_head rows x hidden)."""
    config = llm.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head = llm.get_output_embeddings()
    return config.num_hidden_layers, heads * head_dim, kv_heads * head_dim, head.weight.numel()


def inference_stages(structure: VLAStructure) -> list[Stage]:
    """The stages of one action (see the module docstring for the formulas)."""
    llm = structure.llm
    layers, attn_dim, kv_dim, head_weights = _llm_dims(llm)
    decoder_linear = _matmul_weights([llm])[0] - head_weights
    llm_read = WeightCensus.of([llm], exclude=[llm.get_input_embeddings()])
    prefix = structure.image_tokens + structure.text_tokens
    kv_per_position = 2 * layers * kv_dim  # keys and values, every layer
    stages = [Stage(f"vision:{t.label}", vision_flops(t), WeightCensus.of(t.run)) for t in structure.vision]
    stages.append(
        Stage(
            "projector",
            2 * structure.image_tokens * _matmul_weights([structure.projector])[0],
            WeightCensus.of([structure.projector]),
        )
    )
    stages.append(
        Stage(
            "prefill",
            2 * prefix * decoder_linear + 4 * layers * prefix**2 * attn_dim + 2 * head_weights,
            llm_read,
            kv_elements=prefix * kv_per_position,
        )
    )
    for k in range(1, structure.action_tokens):
        stages.append(
            Stage(
                f"decode:{k}",
                2 * decoder_linear + 4 * layers * (prefix + k) * attn_dim + 2 * head_weights,
                llm_read,
                kv_elements=(prefix + k) * kv_per_position,
            )
        )
    return stages


def component_params(module: nn.Module, structure: VLAStructure) -> dict[str, int]:
    """Parameters per component; they sum to the module's total (anything outside them is `other`)."""
    counts = {t.label: _params(t.module) for t in structure.vision}
    counts["projector"] = _params(structure.projector)
    counts["llm"] = _params(structure.llm)
    counts["action_head"] = _params(structure.action_head)
    other = _params(module) - sum(counts.values())
    if other:
        counts["other"] = other
    return counts


def _device_report(
    device: DeviceProfile, stages: list[Stage], memory: dict[Precision, int], action_tokens: int
) -> dict[str, Any]:
    per_precision: dict[str, Any] = {}
    for precision in PRECISIONS:
        dtype = PRECISION_COMPUTE_DTYPE[precision]
        points = [(s, roofline(s.flops, s.bytes_moved(precision), dtype, device)) for s in stages]
        action_ms = sum(p.latency_ms * s.repeats for s, p in points)
        decode = [p for s, p in points if s.name.startswith("decode:")]
        by_stage: dict[str, float] = {}
        for s, p in points:
            group = s.name.split(":")[0]
            by_stage[group] = by_stage.get(group, 0.0) + p.latency_ms * s.repeats
        fit = memory_fit(memory[precision], device)
        per_precision[precision] = {
            "compute_dtype": dtype,
            "peak_dtype_used": points[0][1].peak_dtype,
            "fits": fit.fits,
            "memory_required_bytes": fit.required_bytes,
            "memory_headroom_bytes": fit.headroom_bytes,
            "decode_token_ms": sum(p.latency_ms for p in decode) / len(decode) if decode else None,
            "decode_bound": decode[0].bound if decode else None,
            "action_ms": action_ms,
            "action_ms_by_stage": by_stage,
            "control_rate_hz": 1e3 / action_ms if action_ms > 0 else None,
        }
    return {
        "kind": device.kind,
        "figures": device.figures,
        "source": device.source,
        "memory_bytes": device.memory_bytes,
        "memory_bandwidth_Bps": device.memory_bandwidth_Bps,
        "peak_flops": dict(device.peak_flops),
        "precisions": per_precision,
        "action_tokens": action_tokens,
    }


def shape_report(
    module: nn.Module,
    *,
    text_tokens: int,
    structure: VLAStructure | None = None,
    devices: Iterable[str] | None = None,
    data_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Parameters, bytes per precision, FLOPs and roofline predictions per device of a VLA (JSON-able dict).

    `structure` defaults to `module.structure(text_tokens)` (OpenVLA-shaped zoo models provide it). `devices`
    defaults to every profile, `this-machine` included (measured once, cached under `data_dir`).
    """
    if structure is None:
        describe = getattr(module, "structure", None)
        if not callable(describe):
            raise UnsupportedFormatError(
                f"{type(module).__name__} does not describe its VLA structure, so no shape report can be made",
                "pass structure=VLAStructure(...) naming its vision towers, projector and language model, or use "
                "an OpenVLA-shaped zoo model (openvla-7b-shape, openvla-mini)",
            )
        structure = describe(text_tokens)
    progress = progress or Progress()
    stages = inference_stages(structure)
    whole = WeightCensus.of([module])
    prefix = structure.image_tokens + structure.text_tokens
    layers, _, kv_dim, _ = _llm_dims(structure.llm)
    kv_max_elements = 2 * layers * kv_dim * (prefix + structure.action_tokens)
    memory: dict[Precision, int] = {
        p: weight_bytes(whole, p) + kv_max_elements * kv_element_bytes(p) for p in PRECISIONS
    }
    names = list(devices) if devices is not None else device_names()
    device_reports = {}
    for name in progress.track(names, "devices"):
        profile = get_device(name, data_dir=data_dir, progress=progress)
        device_reports[profile.name] = _device_report(profile, stages, memory, structure.action_tokens)
    flops_by_stage = {s.name: s.flops for s in stages}
    return {
        "basis": BASIS,
        "params": {
            "total": whole.total,
            "components": component_params(module, structure),
            "action_head_note": f"the action head is the last {structure.action_bins} rows of the LLM's lm_head "
            f"({structure.action_bins * structure.llm.get_output_embeddings().weight.shape[1]:,} weights, "
            "counted in llm)",
            "linear_weights": whole.linear_weights,
        },
        "tokens": {
            "image": structure.image_tokens,
            "text": structure.text_tokens,
            "prefix": prefix,
            "action": structure.action_tokens,
        },
        "flops": {
            "vision": sum(s.flops for s in stages if s.name.startswith("vision:")),
            "projector": flops_by_stage["projector"],
            "prefill": flops_by_stage["prefill"],
            "decode_per_token": (
                sum(s.flops for s in stages if s.name.startswith("decode:")) // max(structure.action_tokens - 1, 1)
            ),
            "action": sum(s.flops * s.repeats for s in stages),
            "by_stage": flops_by_stage,
        },
        "memory": {
            p: {
                "weight_bytes": weight_bytes(whole, p),
                "kv_cache_bytes": kv_max_elements * kv_element_bytes(p),
                "total_bytes": memory[p],
            }
            for p in PRECISIONS
        },
        "precisions_note": "int8 = W8A8 (int8 weights and arithmetic, fp32 per-channel scales); int4 = weight-only "
        "W4A16 (group-128 fp16 scale + zero point, 16-bit arithmetic); non-Linear parameters stay 16-bit.",
        "devices": device_reports,
    }


def zoo_shape_report(
    name: str,
    *,
    zoo_dir: Path | None = None,
    devices: Iterable[str] | None = None,
    data_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`shape_report` of a zoo model (openvla-7b-shape builds on the meta device: no memory, ~1 s)."""
    from robopt import zoo
    from robopt.settings import Settings

    settings = Settings(**({"data_dir": data_dir} if data_dir is not None else {}))
    _, card = zoo.resolve(name, zoo_dir or settings.zoo_dir, progress=progress)
    module = card.instantiate()
    text_tokens = next((t.shape[-1] for t in card.input_spec.inputs if t.name == "input_ids"), None)
    if text_tokens is None or not callable(getattr(module, "structure", None)):
        raise UnsupportedFormatError(
            f"zoo model {name!r} is not an OpenVLA-shaped VLA, so no shape report can be made",
            "shape reports cover openvla-7b-shape and openvla-mini; `robopt analyze` profiles the others",
        )
    report = shape_report(
        module, text_tokens=text_tokens, devices=devices, data_dir=settings.data_dir, progress=progress
    )
    return {"model": name, "kind": card.kind, "description": card.description, **report}
