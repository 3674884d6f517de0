"""Attention-head and MLP-channel pruning of Hugging Face transformers (Llama-family decoders, BERT encoders), with
the config updated so that the save_pretrained folder reloads with plain `from_pretrained`.

Why hand-written: transformers 5 removed `PreTrainedModel.prune_heads` and `config.pruned_heads` (4.x had them for
BERT), and torch-pruning cannot update a Hugging Face config. What the library still has is used:
`transformers.pytorch_utils.prune_linear_layer` slices every projection.

What a standard config can express, and so what is pruned:
- Llama-family (q/k/v/o_proj + gate/up/down_proj, `config.head_dim`): whole key/value groups (a KV head with its
  query heads) and MLP channels. `num_attention_heads`, `num_key_value_heads` and `intermediate_size` are single
  numbers for every layer, so every layer keeps the same count; *which* heads and channels each layer keeps is
  ranked per layer. The kept head count must divide hidden_size (transformers 5 validates that even with an
  explicit head_dim), so head counts snap to the nearest legal one (4 heads of width 128: 2, not 3).
- BERT: MLP channels only (same count per layer). BertSelfAttention derives its head size from
  hidden_size / num_attention_heads and BertConfig has no head_dim, so a BERT with fewer heads cannot be written
  as a standard config: asking for heads_ratio > 0 on BERT is refused.

Importance: "activation" (on the run's training inputs) = each head's / channel's contribution to the block output
(norm of its slice of o_proj / down_proj applied to its input); "magnitude" = weight norms (no data). Optional
rounds with recovery fine-tuning towards the teacher, as in prune_structured (robopt.tools.pruning_schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from robopt.domain.analysis import AnalysisReport
from robopt.errors import TechniqueFailedError, TechniqueNotApplicableError
from robopt.tools import pruning_schedule as schedule_lib
from robopt.tools.registry import (
    Applicability,
    ApplyContext,
    Availability,
    Estimate,
    Technique,
    TechniqueConfig,
    TechniqueResult,
    register_technique,
)
from robopt.tools.techniques import _layers
from robopt.tools.threads import torch_threads
from robopt.training.fit import all_trainable, collate

_FAMILIES = ("decoder-llm", "transformer-encoder")
_AUTO_HEADS_RATIO = 0.5  # halving: legal head counts are divisors of hidden_size (powers of 2 in most models)
_MILDER = (0.5, 0.3, 0.15)
_MAX_SPEEDUP = 2.0
_BERT_HEADS_REASON = (
    "a BERT with fewer attention heads cannot be saved as a standard config: BertSelfAttention sizes heads as "
    "hidden_size / num_attention_heads, BertConfig has no head_dim, and transformers 5 dropped prune_heads / "
    "config.pruned_heads"
)


class PruneHeadsConfig(TechniqueConfig):
    """Shares of attention heads and MLP channels to remove per layer, how to rank them, rounds and recovery."""

    heads_ratio: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="Share of attention heads (whole key/value groups) removed from every layer, snapped to the "
        "nearest head count the config accepts (a divisor of hidden_size). null = "
        f"{_AUTO_HEADS_RATIO} where the architecture's config can hold fewer heads (Llama family), 0 for BERT "
        "(its config cannot; an explicit value > 0 is refused there).",
    )
    mlp_ratio: float = Field(
        default=0.5, ge=0.0, lt=0.95, description="Share of MLP intermediate channels removed from every layer."
    )
    importance: Literal["activation", "magnitude"] = Field(
        default="activation",
        description="activation: each head's/channel's contribution to the block output on the run's training "
        "inputs (needs them); magnitude: weight norms of the head's/channel's rows and columns (no data).",
    )
    round_to: int = Field(
        default=32,
        ge=1,
        le=256,
        description="Kept MLP channels are a multiple of this (32 keeps every weight-only quantizer applicable).",
    )
    steps: int = Field(
        default=1, ge=1, le=10, description="Pruning rounds; the removed shares grow linearly to the targets."
    )
    recovery_steps: int = Field(
        default=100,
        ge=0,
        le=20_000,
        description="Optimizer steps of recovery fine-tuning towards the teacher after each round, on the run's "
        "training inputs (skipped, and said so, when there are none; 0 turns it off).",
    )
    recovery_lr: float = Field(default=2e-4, gt=0.0, le=1.0, description="AdamW learning rate of recovery.")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Samples per recovery step.")
    calibration_samples: int = Field(
        default=256,
        ge=8,
        le=20_000,
        description="Training inputs drawn for importance and recovery (a tenth held out to measure fidelity).",
    )
    importance_samples: int = Field(
        default=64, ge=1, le=4096, description="Samples whose activations rank heads and channels."
    )

    @model_validator(mode="after")
    def _removes_something(self) -> PruneHeadsConfig:
        if self.mlp_ratio == 0.0 and self.heads_ratio == 0.0:
            raise ValueError("heads_ratio and mlp_ratio are both 0: nothing would be pruned")
        return self


@dataclass
class _Slot:
    """A Linear layer addressed by its parent module and attribute, so it can be replaced by a sliced copy."""

    holder: nn.Module
    attr: str

    @property
    def layer(self) -> nn.Linear:
        return getattr(self.holder, self.attr)

    def keep(self, index: torch.Tensor, dim: int) -> None:
        from transformers.pytorch_utils import prune_linear_layer

        old = self.layer
        new = prune_linear_layer(old, index, dim).to(dtype=old.weight.dtype)
        new.weight.requires_grad_(old.weight.requires_grad)
        if new.bias is not None and old.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        new.train(old.training)
        setattr(self.holder, self.attr, new)


@dataclass
class _Block:
    """One transformer layer's prunable projections (attention slots are None where heads cannot be pruned)."""

    name: str
    mlp_in: list[_Slot]
    mlp_out: _Slot
    mlp_holder: nn.Module
    q: _Slot | None = None
    k: _Slot | None = None
    v: _Slot | None = None
    o: _Slot | None = None


@dataclass
class _Layout:
    """The model's transformer layers and the per-layer sizes its config states."""

    kind: Literal["llama", "bert"]
    blocks: list[_Block]
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    configs: list[Any] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


def _linear(module: Any, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config object the model and its submodules hold (normally one, shared)."""
    seen: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            seen.setdefault(id(config), config)
    return list(seen.values())


def _llama_blocks(model: nn.Module) -> list[_Block]:
    blocks = []
    for name, m in model.named_modules():
        attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        if _linear(attn, "q_proj", "k_proj", "v_proj", "o_proj") and _linear(mlp, "gate_proj", "up_proj", "down_proj"):
            blocks.append(
                _Block(
                    name,
                    mlp_in=[_Slot(mlp, "gate_proj"), _Slot(mlp, "up_proj")],
                    mlp_out=_Slot(mlp, "down_proj"),
                    mlp_holder=mlp,
                    q=_Slot(attn, "q_proj"),
                    k=_Slot(attn, "k_proj"),
                    v=_Slot(attn, "v_proj"),
                    o=_Slot(attn, "o_proj"),
                )
            )
    return blocks


def _bert_blocks(model: nn.Module) -> list[_Block]:
    blocks = []
    for name, m in model.named_modules():
        inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
        if getattr(m, "attention", None) is not None and _linear(inter, "dense") and _linear(out, "dense"):
            blocks.append(_Block(name, mlp_in=[_Slot(inter, "dense")], mlp_out=_Slot(out, "dense"), mlp_holder=inter))
    return blocks


def _layout(model: nn.Module) -> _Layout:
    """Find the prunable layers; raise TechniqueNotApplicableError for models this technique does not know."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise TechniqueNotApplicableError(
            f"prune_heads needs a Hugging Face transformers model, got {type(model).__name__}",
            "load the model from its save_pretrained folder, or use prune_structured for plain torch modules",
        )
    blocks = _llama_blocks(model)
    kind: Literal["llama", "bert"] = "llama"
    if not blocks:
        blocks, kind = _bert_blocks(model), "bert"
    if not blocks:
        raise TechniqueNotApplicableError(
            f"no Llama-style (q/k/v/o_proj + gate/up/down_proj) or BERT-style layers found in {type(model).__name__}",
            "prune_heads supports Llama-family decoders and BERT encoders",
        )
    intermediate = int(getattr(config, "intermediate_size", 0) or 0)
    widths = {b.mlp_out.layer.in_features for b in blocks}
    if widths != {intermediate}:
        raise TechniqueNotApplicableError(
            f"MLP widths {sorted(widths)} differ from config.intermediate_size {intermediate}",
            "the config must state one intermediate_size that every layer has",
        )
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or 0) if kind == "llama" else 0
    if kind == "llama":
        assert blocks[0].q is not None and blocks[0].k is not None
        if (
            not head_dim
            or heads % kv_heads
            or any(
                b.q is None
                or b.k is None
                or b.q.layer.out_features != heads * head_dim
                or b.k.layer.out_features != kv_heads * head_dim
                for b in blocks
            )
        ):
            raise TechniqueNotApplicableError(
                "the attention projections do not match config num_attention_heads / num_key_value_heads / head_dim",
                "the config must state head_dim and one head count for every layer",
            )
    return _Layout(kind, blocks, heads, kv_heads, head_dim, intermediate, _configs(model))


def _legal_groups(layout: _Layout, original: int, ratio: float) -> int:
    """Key/value groups to keep: the count nearest to removing `ratio` (ties: the smaller) among those a config
    accepts. transformers 5 validates hidden_size % num_attention_heads == 0 even with an explicit head_dim, so e.g.
    4 heads of a 128-wide model go to 2, never 3, and Llama-7B's 32 heads to 16 or 8."""
    if ratio <= 0.0:
        return original
    hidden = int(getattr(layout.configs[0], "hidden_size", 0) or 0) if layout.configs else 0
    legal = [g for g in range(1, original + 1) if not hidden or hidden % (g * layout.group_size) == 0]
    wanted = original * (1.0 - ratio)
    return min(legal, key=lambda g: (abs(g - wanted), g))


def _keep_count(original: int, ratio: float, multiple: int = 1) -> int:
    """How many of `original` units stay after removing `ratio` of them (rounded to `multiple`, at least one)."""
    if ratio <= 0.0:
        return original
    kept = original * (1.0 - ratio)
    if multiple > 1 and original >= multiple:
        return int(min(original, max(multiple, multiple * round(kept / multiple))))
    return int(min(original, max(1, round(kept))))


# -- importance ------------------------------------------------------------------------------------------------------


def _magnitude_scores(layout: _Layout, block: _Block) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Per key/value group and per MLP channel: the L2 norm of every weight that belongs to it."""
    with torch.no_grad():
        mlp = block.mlp_out.layer.weight.float().square().sum(0)
        for slot in block.mlp_in:
            mlp = mlp + slot.layer.weight.float().square().sum(1)
        groups = None
        if block.q is not None and block.k is not None and block.v is not None and block.o is not None:
            d = layout.head_dim
            q = block.q.layer.weight.float().square().reshape(layout.heads, d, -1).sum((1, 2))
            o = block.o.layer.weight.float().square().reshape(-1, layout.heads, d).sum((0, 2))
            kv = sum(
                s.layer.weight.float().square().reshape(layout.kv_heads, d, -1).sum((1, 2)) for s in (block.k, block.v)
            )
            groups = ((q + o).reshape(layout.kv_heads, layout.group_size).sum(1) + kv).sqrt()
    return groups, mlp.sqrt()


def _activation_scores(
    model: nn.Module,
    layout: _Layout,
    samples: list[tuple[torch.Tensor, ...]],
    context: ApplyContext,
    stage: str,
    batch_size: int,
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """Per key/value group: the mean norm of its heads' share of the attention output (o_proj applied to the head's
    slice of o_proj's input); per MLP channel: RMS of its activation times the norm of its down-projection column."""
    heads_on = layout.kind == "llama" and layout.blocks[0].o is not None
    group_sum = [torch.zeros(layout.kv_heads) for _ in layout.blocks]
    channel_sq = [torch.zeros(layout.intermediate) for _ in layout.blocks]
    tokens = [0 for _ in layout.blocks]
    hooks = []

    def on_mlp(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            channel_sq[i].add_(x.square().sum(0))
            tokens[i] += x.shape[0]

        return hook

    def on_attention(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            d, h = layout.head_dim, layout.heads
            x = args[0].detach().float().reshape(-1, h, d)
            w = module.weight.detach().float().reshape(-1, h, d)
            contribution = torch.einsum("nhd,ohd->nho", x, w).norm(dim=-1).sum(0)
            group_sum[i].add_(contribution.reshape(layout.kv_heads, layout.group_size).sum(1))

        return hook

    for i, block in enumerate(layout.blocks):
        hooks.append(block.mlp_out.layer.register_forward_pre_hook(on_mlp(i)))
        if heads_on:
            assert block.o is not None
            hooks.append(block.o.layer.register_forward_pre_hook(on_attention(i)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(samples), batch_size)
            for start in context.progress.track(starts, stage):
                model(*collate(samples[start : start + batch_size]))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    scores = []
    for i, block in enumerate(layout.blocks):
        n = max(tokens[i], 1)
        column = block.mlp_out.layer.weight.detach().float().norm(dim=0)
        channels = (channel_sq[i] / n).sqrt() * column
        scores.append((group_sum[i] / n if heads_on else None, channels))
    return scores


# -- pruning ---------------------------------------------------------------------------------------------------------


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, keep).indices).values


def _prune_block(layout: _Layout, block: _Block, groups: torch.Tensor | None, channels: torch.Tensor | None) -> None:
    """Keep the given key/value groups (with their query heads) and MLP channels of one layer."""
    if groups is not None:
        assert block.q is not None and block.k is not None and block.v is not None and block.o is not None
        d, n_rep = layout.head_dim, layout.group_size
        query_heads = [int(g) * n_rep + r for g in groups for r in range(n_rep)]
        q_index = torch.cat([torch.arange(h * d, (h + 1) * d) for h in query_heads])
        kv_index = torch.cat([torch.arange(int(g) * d, (int(g) + 1) * d) for g in groups])
        block.q.keep(q_index, 0)
        block.k.keep(kv_index, 0)
        block.v.keep(kv_index, 0)
        block.o.keep(q_index, 1)
    if channels is not None:
        for slot in block.mlp_in:
            slot.keep(channels, 0)
        block.mlp_out.keep(channels, 1)
        if hasattr(block.mlp_holder, "intermediate_size"):
            block.mlp_holder.intermediate_size = len(channels)


def _set_config(layout: _Layout, kv_heads: int, intermediate: int) -> dict[str, int]:
    """Write the new sizes into every config object the model holds (they are saved by save_pretrained)."""
    changes = {"intermediate_size": intermediate}
    if layout.kind == "llama":
        changes |= {"num_attention_heads": kv_heads * layout.group_size, "num_key_value_heads": kv_heads}
    for config in layout.configs:
        for key, value in changes.items():
            setattr(config, key, value)
        validate = getattr(config, "validate", None)  # transformers 5 configs check themselves before saving
        if callable(validate):
            from huggingface_hub.errors import StrictDataclassError

            try:
                validate()
            except (StrictDataclassError, ValueError) as e:
                raise TechniqueFailedError(
                    f"the pruned sizes {changes} do not form a valid {type(config).__name__}: {e}",
                    "choose other ratios",
                ) from e
    layout.heads = changes.get("num_attention_heads", layout.heads)
    layout.kv_heads = changes.get("num_key_value_heads", layout.kv_heads)
    layout.intermediate = intermediate
    return changes


# -- estimate --------------------------------------------------------------------------------------------------------


def _split_linear(analysis: AnalysisReport) -> tuple[float, float, str]:
    """(attention, MLP) Linear parameters in the transformer layers, inferred from the census, and how."""
    linear = _layers.linear_params(analysis)
    count = analysis.layer_census.get("Linear", 0)
    out_dim = analysis.output_shapes[0][-1] if analysis.output_shapes and analysis.output_shapes[0] else 0
    embedding = _layers.params_of(analysis, ("Embedding",))
    if analysis.architecture == "decoder-llm" and out_dim:
        hidden, per_layer = embedding // out_dim, 7
        head = out_dim * hidden if count % per_layer == 1 else 0  # an untied LM head is a Linear of its own
    else:
        hidden, per_layer = out_dim, 6
        head = hidden * hidden + hidden if count % per_layer == 1 else 0  # BERT's pooler
    layers = count // per_layer
    if hidden and layers:
        attention = layers * 4 * hidden * hidden
        mlp = linear - head - attention
        if mlp > 0:
            return float(attention), float(mlp), f"{layers} layers of width {hidden} inferred from the layer census"
    return linear / 3.0, 2.0 * linear / 3.0, "layer shapes unknown: assumed 1/3 attention, 2/3 MLP"


def _heads_ratio(config: PruneHeadsConfig, bert_like: bool) -> float:
    if config.heads_ratio is not None:
        return config.heads_ratio
    return 0.0 if bert_like else _AUTO_HEADS_RATIO


@register_technique
class PruneHeads(Technique):
    name = "prune_heads"
    family = "pruning"
    description = (
        "Removes attention heads (Llama family) and MLP channels (Llama family, BERT) from Hugging Face "
        "transformers, ranked by activation contribution or weight magnitude, and updates the config so the saved "
        "folder reloads with plain from_pretrained; optional rounds with distillation recovery."
    )
    config_cls = PruneHeadsConfig

    def availability(self) -> Availability:
        try:
            from transformers.pytorch_utils import prune_linear_layer  # noqa: F401
        except ImportError as e:
            return Availability(False, f"transformers.pytorch_utils.prune_linear_layer is not importable: {e}")
        from importlib.metadata import version

        return Availability(True, backend=f"transformers {version('transformers')} prune_linear_layer")

    def applicable(self, analysis: AnalysisReport) -> Applicability:
        reason = _layers.not_eager_reason(analysis) or _layers.already_quantized_reason(analysis)
        if reason:
            return Applicability(False, reason)
        if analysis.architecture not in _FAMILIES:
            return Applicability(
                False,
                f"head/channel pruning supports Hugging Face decoder LLMs and encoders, not {analysis.architecture!r}",
            )
        if _layers.linear_params(analysis) <= 0:
            return Applicability(False, "the model has no Linear layers to prune")
        return Applicability(True)

    def estimate(self, analysis: AnalysisReport, config: TechniqueConfig) -> Estimate:
        assert isinstance(config, PruneHeadsConfig)
        heads_ratio = _heads_ratio(config, analysis.architecture == "transformer-encoder")
        attention, mlp, how = _split_linear(analysis)
        cut = attention * heads_ratio + mlp * config.mlp_ratio
        total = max(analysis.param_count, 1)
        flop_share = cut / max(_layers.linear_params(analysis), 1)
        return Estimate(
            size_ratio=max(total - cut, 1.0) / total,
            speedup=min(1.0 / (1.0 - 0.5 * flop_share), _MAX_SPEEDUP),
            accuracy_risk="low"
            if max(heads_ratio, config.mlp_ratio) <= 0.15
            else "medium"
            if max(heads_ratio, config.mlp_ratio) <= 0.5
            else "high",
            note=(
                f"rule of thumb: removes {heads_ratio:.0%} of each layer's attention and {config.mlp_ratio:.0%} of its "
                f"MLP Linear weights ({how}; 4*h^2 attention weights per layer, fewer with grouped KV heads); "
                "embeddings and the LM head stay. Speed-up is half the Linear FLOP cut, capped at "
                f"{_MAX_SPEEDUP}x (overhead-bound on CPU). BERT keeps its heads (its config cannot hold fewer)."
            ),
        )

    def milder(self, config: TechniqueConfig) -> TechniqueConfig | None:
        assert isinstance(config, PruneHeadsConfig)

        def lower(x: float) -> float:
            return next((r for r in _MILDER if r < x - 1e-9), 0.0)

        # An automatic heads_ratio stays automatic (it means 0 on BERT); the ladder ends when the MLP share would
        # reach 0 with it, or when both explicit shares would.
        new_mlp = lower(config.mlp_ratio)
        new_heads = None if config.heads_ratio is None else lower(config.heads_ratio)
        if new_mlp == 0.0 and not new_heads:
            return None
        return PruneHeadsConfig(**{**config.model_dump(), "mlp_ratio": new_mlp, "heads_ratio": new_heads})

    def apply(self, model: nn.Module, config: TechniqueConfig, context: ApplyContext) -> TechniqueResult:
        assert isinstance(config, PruneHeadsConfig)
        # One thread: gradients, rankings and recovery come out identical on machines with any core count (and
        # small models train faster than with threads competing for a busy CPU).
        with torch_threads(1):
            return self._apply(model, config, context)

    def _apply(self, model: nn.Module, config: PruneHeadsConfig, context: ApplyContext) -> TechniqueResult:
        _layers.require_eager_float_module(model, self.name)
        layout = _layout(model)
        heads_ratio = _heads_ratio(config, layout.kind == "bert")
        if layout.kind == "bert" and heads_ratio > 0:
            raise TechniqueNotApplicableError(
                f"heads_ratio={heads_ratio} on a BERT model: {_BERT_HEADS_REASON}",
                "set heads_ratio to 0 or null (MLP channels only)",
            )
        if heads_ratio == 0.0 and config.mlp_ratio == 0.0:
            raise TechniqueNotApplicableError("nothing to prune: heads_ratio and mlp_ratio are both 0 for this model")
        if layout.kind == "bert":
            for block in layout.blocks:
                block.q = block.k = block.v = block.o = None
        model.eval()
        params_before = _layers.count_params(model)
        before = {"heads": layout.heads, "kv_heads": layout.kv_heads, "intermediate": layout.intermediate}
        needs_data = config.importance == "activation"
        data, note = schedule_lib.training_data(
            model,
            context,
            required_for=f"{self.name} with activation importance" if needs_data else None,
            recovery=config.recovery_steps > 0,
            samples=config.calibration_samples,
            batch_size=config.batch_size,
        )
        recovering = data is not None and config.recovery_steps > 0
        rounds = []
        kept: list[dict[str, list[int]]] = [{} for _ in layout.blocks]
        for k, share in enumerate(schedule_lib.schedule(1.0, config.steps), 1):
            stage = f"{self.name} round {k}/{config.steps}"
            kv_target = _legal_groups(layout, before["kv_heads"], heads_ratio * share)
            mlp_target = _keep_count(before["intermediate"], config.mlp_ratio * share, config.round_to)
            if data is not None and needs_data:
                picks = data.train[: config.importance_samples]
                scores = _activation_scores(model, layout, picks, context, f"{stage}: activations", config.batch_size)
            else:
                scores = [_magnitude_scores(layout, b) for b in layout.blocks]
            for i, (block, (group_scores, channel_scores)) in enumerate(zip(layout.blocks, scores, strict=True)):
                groups = (
                    _top(group_scores, kv_target) if group_scores is not None and kv_target < layout.kv_heads else None
                )
                channels = _top(channel_scores, mlp_target) if mlp_target < layout.intermediate else None
                if groups is not None:
                    kept[i]["kv_groups"] = _original_ids(kept[i].get("kv_groups"), groups, before["kv_heads"])
                if channels is not None:
                    kept[i]["channels"] = _original_ids(kept[i].get("channels"), channels, before["intermediate"])
                _prune_block(layout, block, groups, channels)
                context.progress.update(stage, i + 1, len(layout.blocks), f"pruned {block.name}")
            _set_config(layout, min(kv_target, layout.kv_heads), min(mlp_target, layout.intermediate))
            rounds.append(self._round(model, k, layout, data, config, context, stage, recovering))
        model.eval()
        if context.example_inputs is not None:
            schedule_lib.ensure_finite(model, tuple(context.example_inputs))
        params_after = _layers.count_params(model)
        if params_after >= params_before:
            raise TechniqueFailedError(
                "prune_heads removed nothing (the layers are too narrow for these ratios)", "raise the ratios"
            )
        details: dict[str, Any] = {
            "params_before": params_before,
            "params_after": params_after,
            "param_ratio": round(params_after / params_before, 6),
            "architecture": layout.kind,
            "importance": config.importance,
            "heads_ratio": heads_ratio,
            "mlp_ratio": config.mlp_ratio,
            "before": before,
            "after": {"heads": layout.heads, "kv_heads": layout.kv_heads, "intermediate": layout.intermediate},
            "config_updates": {
                "intermediate_size": layout.intermediate,
                **(
                    {"num_attention_heads": layout.heads, "num_key_value_heads": layout.kv_heads}
                    if layout.kind == "llama"
                    else {}
                ),
            },
            "kept_per_layer": {b.name: kept[i] for i, b in enumerate(layout.blocks)},
            "uniform_per_layer": "every layer keeps the same counts: the config holds one head count and one "
            "intermediate_size for all layers",
            "steps": config.steps,
            "rounds": rounds,
            "recovery": "on" if recovering else (note or "off"),
        }
        if layout.kind == "bert":
            details["heads_kept_because"] = _BERT_HEADS_REASON
        if data is not None:
            details["teacher_data"] = data.describe()
        return TechniqueResult(
            model=model,
            backend=f"{self.availability().backend} ({config.importance} importance)",
            notes=note,
            details=details,
        )

    def _round(
        self,
        model: nn.Module,
        k: int,
        layout: _Layout,
        data: schedule_lib.TeacherData | None,
        config: PruneHeadsConfig,
        context: ApplyContext,
        stage: str,
        recovering: bool,
    ) -> dict[str, Any]:
        """Measure a finished round (sizes, held-out fidelity) and run its recovery fine-tuning."""
        record: dict[str, Any] = {
            "round": k,
            "params": _layers.count_params(model),
            "heads": layout.heads,
            "kv_heads": layout.kv_heads,
            "intermediate": layout.intermediate,
        }
        if data is None:
            return record
        record["heldout_loss_pruned"] = schedule_lib.heldout_loss(model, data, config.batch_size)
        if recovering:
            with all_trainable(model):
                record["recovery"] = schedule_lib.recover(
                    model,
                    data,
                    config.recovery_steps,
                    lr=config.recovery_lr,
                    batch_size=config.batch_size,
                    progress=context.progress,
                    stage=f"{stage}: recovery",
                    seed=context.seed + k,
                )
            record["heldout_loss_recovered"] = schedule_lib.heldout_loss(model, data, config.batch_size)
        return record


def _original_ids(previous: list[int] | None, kept_now: torch.Tensor, original: int) -> list[int]:
    """Indices (in the unpruned layer) of the units kept, composing this round's choice with earlier rounds'."""
    base = previous if previous is not None else list(range(original))
    return [base[int(i)] for i in kept_now]
