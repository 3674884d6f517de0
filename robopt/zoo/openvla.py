"""OpenVLA-shaped vision-language-action models: `openvla-7b-shape` (meta device) and `openvla-mini` (CPU-sized).

OpenVLA (Kim et al., 2024; Hugging Face `openvla/openvla-7b`, 7.54B parameters) is a Prismatic VLM,
`prism-dinosiglip-224px` + Llama-2-7B, fine-tuned to emit actions as tokens:

- vision: DINOv2 ViT-L/14 with 4 registers (timm `vit_large_patch14_reg4_dinov2.lvd142m`: hidden 1024, 24 blocks,
  16 heads, MLP 4096) and SigLIP ViT-SO400M/14 (timm `vit_so400m_patch14_siglip_224`: hidden 1152, 27 blocks,
  16 heads, MLP 4304), both at 224x224 with 14x14 patches = 256 patches each. Prismatic reads each tower's
  patch tokens from its second-to-last block (`get_intermediate_layers(n={len(blocks) - 2})`, no final norm,
  prefix tokens dropped) and concatenates them channel-wise: 1024 + 1152 = 2176 channels per patch.
- projector (`fused-gelu-mlp`): Linear(2176, 8704) GELU Linear(8704, 4096) GELU Linear(4096, 4096).
- language model: Llama-2-7B (hidden 4096, 32 layers, 32 heads, MLP 11008, RMSNorm eps 1e-5, context 4096);
  the tokenizer's 32,000 ids plus `<PAD>` (id 32000), the embedding padded to a multiple of 64: 32,064 rows.
  The 256 projected patches are inserted after the BOS token: [BOS, 256 patches, prompt tokens...].
- actions: 7-DoF, each dimension discretized into 256 bins; the bin of discretized value d (1..256) is the
  token id `vocab_size - d` (vocab_size = 32,000), i.e. the last 256 ids of the tokenizer's vocabulary.
  OpenVLA decodes the 7 action tokens greedily with a KV cache (`generate(max_new_tokens=7)`).

This module follows that structure with transformers classes built from configs (no download): the same
submodule names as OpenVLA's Hugging Face port (`vision_backbone.featurizer`, `vision_backbone.fused_featurizer`,
`projector.fc1..fc3`, `language_model`), plus a parameter-free `action_head` that selects the 256 action-bin
logits. The last block, final norms and SigLIP's attention-pooling head exist (they are in OpenVLA's checkpoint
and its 7.54B count) but are not run, exactly as in Prismatic.

forward(pixel_values [B, 3, H, W], input_ids [B, T]) -> [B, 7, 256]: the logits of the 7 action tokens over the
256 bins, from one prefill pass over [BOS, patches, prompt] followed by 6 cached decode steps, each feeding the
previous step's most likely *action* token (greedy decoding constrained to the action bins; OpenVLA's own
`generate` takes the argmax over the whole vocabulary, which for a trained model is an action token anyway).
Column j of the output is discretized value d = j + 1, so columns run from the lowest action value to the highest.
One `pixel_values` tensor feeds both towers (OpenVLA normalizes the image twice, once per tower; here that
preprocessing belongs to the caller).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import ResourceLimitError
from robopt.evaluation.base import EvaluatorSpec
from robopt.progress import Progress
from robopt.tools.shape_report import VisionTowerShape, VLAStructure
from robopt.zoo.cards import ZooEntry, register_entry


class OpenVLASizes(BaseModel):
    """Every size of the architecture; the defaults are OpenVLA-7B's (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(default=224, gt=0)
    patch_size: int = Field(default=14, gt=0)
    dino_hidden: int = 1024
    dino_layers: int = Field(default=24, ge=2, description="blocks; features come from the second-to-last")
    dino_heads: int = 16
    dino_mlp_ratio: int = 4
    dino_registers: int = Field(default=4, ge=0)
    siglip_hidden: int = 1152
    siglip_layers: int = Field(default=27, ge=2, description="blocks; features come from the second-to-last")
    siglip_heads: int = 16
    siglip_intermediate: int = 4304
    llm_hidden: int = 4096
    llm_layers: int = Field(default=32, ge=1)
    llm_heads: int = 32
    llm_intermediate: int = 11008
    text_vocab: int = Field(default=32000, description="tokenizer vocabulary; the action bins are its last ids")
    pad_vocab_to_multiple_of: int = Field(default=64, gt=0, description="embedding rows = text_vocab + <PAD>, padded")
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    action_bins: int = Field(default=256, gt=1)
    action_dims: int = Field(default=7, gt=0)
    initializer_range: float = Field(default=0.02, gt=0)

    @model_validator(mode="after")
    def _check(self) -> OpenVLASizes:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name, hidden, heads in (
            ("dino", self.dino_hidden, self.dino_heads),
            ("siglip", self.siglip_hidden, self.siglip_heads),
            ("llm", self.llm_hidden, self.llm_heads),
        ):
            if hidden % heads:
                raise ValueError(f"{name}_hidden {hidden} is not divisible by {name}_heads {heads}")
        if self.action_bins >= self.text_vocab:
            raise ValueError(f"action_bins {self.action_bins} must be below text_vocab {self.text_vocab}")
        return self

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vocab_rows(self) -> int:
        """Embedding / lm_head rows: the tokenizer's ids plus <PAD>, padded (OpenVLA: 32,001 -> 32,064)."""
        multiple = self.pad_vocab_to_multiple_of
        return math.ceil((self.text_vocab + 1) / multiple) * multiple

    def approx_param_count(self) -> int:
        """Linear weights and embeddings only (within ~1%): used to refuse a real allocation that cannot fit."""
        dino = self.dino_layers * (4 * self.dino_hidden**2 + 2 * self.dino_mlp_ratio * self.dino_hidden**2)
        siglip = self.siglip_layers * (4 * self.siglip_hidden**2 + 2 * self.siglip_hidden * self.siglip_intermediate)
        llm = self.llm_layers * (4 * self.llm_hidden**2 + 3 * self.llm_hidden * self.llm_intermediate)
        return dino + siglip + llm + 2 * self.vocab_rows * self.llm_hidden


class FusedVisionBackbone(nn.Module):
    """DINOv2 (with registers) and SigLIP towers; their second-to-last-block patch features, concatenated."""

    def __init__(self, sizes: OpenVLASizes) -> None:
        super().__init__()
        from transformers import (
            Dinov2WithRegistersConfig,
            Dinov2WithRegistersModel,
            SiglipVisionConfig,
            SiglipVisionModel,
        )

        self.registers = sizes.dino_registers
        self.featurizer = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(
                hidden_size=sizes.dino_hidden,
                num_hidden_layers=sizes.dino_layers,
                num_attention_heads=sizes.dino_heads,
                mlp_ratio=sizes.dino_mlp_ratio,
                image_size=sizes.image_size,
                patch_size=sizes.patch_size,
                num_register_tokens=sizes.dino_registers,
                initializer_range=sizes.initializer_range,
            )
        )
        self.fused_featurizer = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=sizes.siglip_hidden,
                num_hidden_layers=sizes.siglip_layers,
                num_attention_heads=sizes.siglip_heads,
                intermediate_size=sizes.siglip_intermediate,
                image_size=sizes.image_size,
                patch_size=sizes.patch_size,
            )
        )

    @property
    def dino_run(self) -> tuple[nn.Module, ...]:
        """The DINOv2 modules one forward runs: embeddings and every block but the last."""
        return (self.featurizer.embeddings, *self.featurizer.encoder.layer[:-1])

    @property
    def siglip_run(self) -> tuple[nn.Module, ...]:
        return (self.fused_featurizer.embeddings, *self.fused_featurizer.encoder.layers[:-1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dino_embeddings, *dino_blocks = self.dino_run
        hidden = dino_embeddings(pixel_values.to(self.featurizer.embeddings.cls_token.dtype))
        for block in dino_blocks:
            hidden = block(hidden, None)
        dino = hidden[:, 1 + self.registers :]  # drop CLS and register tokens
        siglip_embeddings, *siglip_blocks = self.siglip_run
        hidden = siglip_embeddings(pixel_values)
        for block in siglip_blocks:
            hidden = block(hidden, None)
        return torch.cat([dino, hidden.to(dino.dtype)], dim=-1)


class Projector(nn.Module):
    """Prismatic's `fused-gelu-mlp`: vision_dim -> 4*vision_dim -> llm_dim -> llm_dim with GELUs between."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.act_fn2 = nn.GELU()
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(patches)))))


class ActionTokenHead(nn.Module):
    """Selects the action-bin logits from LM logits: column j is token id `text_vocab - 1 - j` (bin value j + 1).

    It owns no weights: the action "head" of OpenVLA is the last `bins` rows of the language model's lm_head.
    """

    def __init__(self, text_vocab: int, bins: int) -> None:
        super().__init__()
        self.register_buffer("token_ids", torch.arange(text_vocab - 1, text_vocab - 1 - bins, -1), persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_select(-1, self.token_ids)


class OpenVLA(nn.Module):
    """OpenVLA's structure at any size (defaults: OpenVLA-7B); `device="meta"` builds it without memory."""

    def __init__(self, device: str | None = None, **sizes: Any) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.sizes = OpenVLASizes(**sizes)
        s = self.sizes
        if device != "meta":
            _refuse_if_too_large(s)
        with torch.device(device) if device else contextlib.nullcontext():
            self.vision_backbone = FusedVisionBackbone(s)
            self.projector = Projector(s.dino_hidden + s.siglip_hidden, s.llm_hidden)
            self.language_model = LlamaForCausalLM(
                LlamaConfig(
                    hidden_size=s.llm_hidden,
                    num_hidden_layers=s.llm_layers,
                    num_attention_heads=s.llm_heads,
                    num_key_value_heads=s.llm_heads,
                    intermediate_size=s.llm_intermediate,
                    vocab_size=s.vocab_rows,
                    rms_norm_eps=s.rms_norm_eps,
                    max_position_embeddings=s.max_position_embeddings,
                    initializer_range=s.initializer_range,
                    tie_word_embeddings=False,
                    bos_token_id=1,
                    eos_token_id=2,
                    pad_token_id=s.text_vocab,
                )
            )
            self.action_head = ActionTokenHead(s.text_vocab, s.action_bins)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        patches = self.projector(self.vision_backbone(pixel_values))
        text = self.language_model.get_input_embeddings()(input_ids)
        prefix = torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)
        return self.decode_actions(prefix)

    def decode_actions(self, prefix_embeds: torch.Tensor) -> torch.Tensor:
        """Prefill over the multimodal prefix, then `action_dims - 1` cached greedy steps: [B, dims, bins] logits."""
        out = self.language_model(inputs_embeds=prefix_embeds, use_cache=True, logits_to_keep=1)
        steps = [self.action_head(out.logits[:, -1])]
        for _ in range(self.sizes.action_dims - 1):
            token = self.action_head.token_ids[steps[-1].argmax(dim=-1)]
            out = self.language_model(input_ids=token[:, None], past_key_values=out.past_key_values, use_cache=True)
            steps.append(self.action_head(out.logits[:, -1]))
        return torch.stack(steps, dim=1)

    def structure(self, text_tokens: int) -> VLAStructure:
        """The components and per-forward token counts the shape report's FLOP formulas need."""
        s, backbone = self.sizes, self.vision_backbone
        return VLAStructure(
            vision=(
                VisionTowerShape(
                    label="vision.dinov2",
                    module=backbone.featurizer,
                    run=backbone.dino_run,
                    tokens=s.patches + 1 + s.dino_registers,
                    patches=s.patches,
                    attention_dim=s.dino_hidden,
                    layers_run=s.dino_layers - 1,
                ),
                VisionTowerShape(
                    label="vision.siglip",
                    module=backbone.fused_featurizer,
                    run=backbone.siglip_run,
                    tokens=s.patches,
                    patches=s.patches,
                    attention_dim=s.siglip_hidden,
                    layers_run=s.siglip_layers - 1,
                ),
            ),
            projector=self.projector,
            llm=self.language_model,
            action_head=self.action_head,
            image_tokens=s.patches,
            text_tokens=text_tokens,
            action_tokens=s.action_dims,
            action_bins=s.action_bins,
        )


def _refuse_if_too_large(sizes: OpenVLASizes) -> None:
    need = 4 * sizes.approx_param_count()
    available = psutil.virtual_memory().available
    if need > available / 2:
        raise ResourceLimitError(
            f"building OpenVLA with these sizes allocates about {need / 2**30:.1f} GiB of float32 weights; "
            f"{available / 2**30:.1f} GiB of memory is available",
            "build it on the meta device for analysis (OpenVLA(device='meta', ...), zoo model openvla-7b-shape), "
            "or use the CPU-sized openvla-mini",
        )


def openvla_input_spec(sizes: OpenVLASizes, text_tokens: int) -> InputSpec:
    """One image and a `text_tokens`-long prompt whose ids stay below the tokenizer's vocabulary."""
    return InputSpec(
        inputs=[
            TensorSpec(name="pixel_values", shape=[1, 3, sizes.image_size, sizes.image_size]),
            TensorSpec(name="input_ids", shape=[1, text_tokens], dtype="int64", high=sizes.text_vocab),
        ],
        source="zoo",
    )


# OpenVLA's prompt "In: What action should the robot take to {instruction}?\nOut:" is ~20-35 Llama tokens.
OPENVLA_7B_TEXT_TOKENS = 32
OPENVLA_7B_SIZES = OpenVLASizes()

# Every dimension scaled down, the structure kept (two towers read at their second-to-last block, the
# 4x-wide projector, an untied Llama, 256 action bins at the end of a padded vocabulary). Linear widths are
# multiples of 32 (AutoRound skips other layers).
MINI_TEXT_TOKENS = 16
MINI_SIZES = OpenVLASizes(
    image_size=112,
    dino_hidden=128,
    dino_layers=3,
    dino_heads=4,
    dino_registers=4,
    siglip_hidden=160,
    siglip_layers=3,
    siglip_heads=4,
    siglip_intermediate=640,
    llm_hidden=256,
    llm_layers=4,
    llm_heads=8,
    llm_intermediate=704,
    text_vocab=2000,
    max_position_embeddings=512,
)


def build_openvla_mini(seed: int, progress: Progress, architecture_kwargs: dict[str, Any]) -> OpenVLA:
    """Random initialization with a fixed seed (no training: the mini exists for pipeline and analysis work)."""
    progress.update("init", 0, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OpenVLA(**architecture_kwargs)
    progress.update("init", 1, 1)
    return model.eval()


register_entry(
    ZooEntry(
        name="openvla-7b-shape",
        description="OpenVLA-7B's architecture (DINOv2-L + SigLIP-SO400M -> MLP projector -> Llama-2-7B, 7 action "
        "tokens over 256 bins) on the meta device: no weights, for size, memory and latency predictions only.",
        architecture=f"{OpenVLA.__module__}:{OpenVLA.__qualname__}",
        architecture_kwargs={"device": "meta", **OPENVLA_7B_SIZES.model_dump()},
        family="vision-language-action",
        input_spec=openvla_input_spec(OPENVLA_7B_SIZES, OPENVLA_7B_TEXT_TOKENS),
        evaluator=EvaluatorSpec(name="output-fidelity"),
        kind="shape-only",
    )
)

register_entry(
    ZooEntry(
        name="openvla-mini",
        description="OpenVLA's structure scaled down to ~7M random-init parameters (two 3-block vision towers at "
        "112px, a 4-layer Llama): runs on a CPU, for pipeline, analysis and quantization work on a VLA.",
        architecture=f"{OpenVLA.__module__}:{OpenVLA.__qualname__}",
        architecture_kwargs=MINI_SIZES.model_dump(),
        family="vision-language-action",
        input_spec=openvla_input_spec(MINI_SIZES, MINI_TEXT_TOKENS),
        evaluator=EvaluatorSpec(name="output-fidelity", options={"samples": 16, "primary": "top1_agreement"}),
        suggested_criteria={"max_size": "50%"},
        seed=0,
        train=build_openvla_mini,
    )
)
