"""Architecture family detection on small real models of each family, torch and ONNX."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from robopt.tools.analysis import profile_module
from robopt.tools.family import detect_family, detect_family_onnx
from robopt.tools.onnx_analysis import profile_onnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class TinyVLA(nn.Module):
    """A VLA-shaped model: conv vision encoder, token embedding + transformer backbone, action head."""

    def __init__(self, vocab: int = 100, d: int = 32, actions: int = 7) -> None:
        super().__init__()
        self.vision = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, d)
        )
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, batch_first=True)
        self.backbone = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.action_head = nn.Linear(d, actions)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        sequence = torch.cat([self.vision(image).unsqueeze(1), self.embed(tokens)], dim=1)
        return self.action_head(self.backbone(sequence)[:, 0])


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )


class Decoder(nn.Module):
    """A hand-made decoder LM without an HF config: embedding, attention, lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lm_head = nn.Linear(16, 50)


@pytest.mark.parametrize(
    ("build", "family"),
    [
        (lambda: nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10)), "cnn"),
        (lambda: nn.Sequential(nn.Linear(17, 64), nn.Tanh(), nn.LayerNorm(64), nn.Linear(64, 6)), "mlp-policy"),
        (tiny_bert, "transformer-encoder"),
        (tiny_llama, "decoder-llm"),
        (Decoder, "decoder-llm"),
        (TinyVLA, "vision-language-action"),
        (lambda: nn.Sequential(nn.LSTM(8, 8)), "unknown"),
    ],
)
def test_detect_family(build, family: str) -> None:
    detected, evidence = detect_family(build())
    assert detected == family, evidence
    assert evidence


def test_hf_config_decides_when_given() -> None:
    mlp = nn.Sequential(nn.Linear(4, 4))
    family, evidence = detect_family(mlp, hf_config={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"})
    assert family == "decoder-llm" and "Qwen2ForCausalLM" in evidence
    assert detect_family(mlp, hf_config={"model_type": "roberta"})[0] == "transformer-encoder"
    assert detect_family(mlp, hf_config={"model_type": "openvla"})[0] == "vision-language-action"


def test_vla_needs_its_action_head() -> None:
    model = TinyVLA()
    del model.action_head
    model.head = nn.Linear(32, 7)
    assert detect_family(model)[0] == "transformer-encoder"


def test_vla_profile_counts_every_part() -> None:
    model = TinyVLA()
    profile = profile_module(model, (torch.randn(1, 3, 16, 16), torch.randint(0, 100, (1, 6))))
    d = 32
    vision = 3 * 8 * 9 + 8 + 8 * d + d
    backbone = (3 * d * d + 3 * d) + (d * d + d) + (d * 64 + 64) + (64 * d + d) + 4 * d
    assert profile.param_count == vision + 100 * d + backbone + d * 7 + 7
    assert profile.architecture == "vision-language-action"
    assert profile.output_shapes == [[1, 7]]


def test_onnx_family_rules() -> None:
    assert detect_family_onnx({"Conv": 3, "Relu": 3, "Gemm": 1})[0] == "cnn"
    assert detect_family_onnx({"Gemm": 3, "Tanh": 2})[0] == "mlp-policy"
    attention = {"Gather": 1, "MatMul": 6, "Softmax": 2, "Add": 4, "LayerNormalization": 2}
    assert detect_family_onnx(attention)[0] == "transformer-encoder"
    assert detect_family_onnx(attention, ["embed.weight", "lm_head.weight"])[0] == "decoder-llm"
    vla = {**attention, "Conv": 2}
    assert detect_family_onnx(vla, ["vision.0.weight", "action_head.weight"])[0] == "vision-language-action"
    assert detect_family_onnx({"LSTM": 1})[0] == "unknown"


def test_onnx_export_of_cnn_detected(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (torch.randn(1, 1, 8, 8),), str(path), dynamo=False)
    assert profile_onnx(path).architecture == "cnn"
