"""Static analysis of HQQ-quantized models: logical parameter counts and the packed bytes actually held."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from robopt.progress import Progress
from robopt.tools.analysis import profile_module
from robopt.tools.registry import ApplyContext, get_technique, parse_config
from robopt.tools.techniques.hqq_quant import bytes_per_weight, layer_class, stored_bytes
from tests.tools.test_techniques import analyze


def make_mlp() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)).eval()


MLP = make_mlp()
X = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
PARAMS = sum(p.numel() for p in MLP.parameters())
FP32_BYTES = 4 * PARAMS


def quantize(**config: object) -> nn.Module:
    technique = get_technique("hqq")
    context = ApplyContext(analysis=analyze(MLP, "mlp-policy"), example_inputs=(X,), progress=Progress())
    return technique.apply(copy.deepcopy(MLP), parse_config(technique, config), context).model


def hqq_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, layer_class())]


@pytest.mark.parametrize("nbits", [8, 4, 3, 2])
def test_every_layer_quantized_counts_logical_params_and_packed_bytes(nbits: int) -> None:
    model = quantize(nbits=nbits, skip_head=False)
    layers = hqq_layers(model)
    assert len(layers) == 3
    profile = profile_module(model, (X,))
    assert profile.param_count == PARAMS  # 64*256+256 + 256*256+256 + 256*8+8, not the packed uint8/int32 count
    assert profile.params_by_layer_type == {"CpuHQQLinear": PARAMS}
    assert profile.layer_census == {"CpuHQQLinear": 3, "ReLU": 2}
    packed = sum(stored_bytes(m) for m in layers)  # packed weights + fp32 scales and zeros + fp32 biases
    assert profile.size_in_memory_bytes == packed
    # independent of the layer's tensors: packed bits (3-bit: 10 per int32) + 1 bit per weight of fp32 scale and zero
    # per group of 64, plus fp32 biases
    weights, biases = 64 * 256 + 256 * 256 + 256 * 8, 256 + 256 + 8
    assert profile.size_in_memory_bytes == pytest.approx(weights * bytes_per_weight(nbits, 64) + 4 * biases, rel=0.02)
    assert profile.size_in_memory_bytes < FP32_BYTES / 3.5
    assert profile.trainable_param_count == 0  # packed weights and plain-tensor biases are not trainable
    assert profile.flops == profile_module(MLP, (X,)).flops  # same matmuls on dequantized weights


def test_head_left_in_fp32_is_counted_as_a_plain_linear() -> None:
    model = quantize(nbits=4, skip_head=True)
    layers = hqq_layers(model)
    assert len(layers) == 2 and type(model[4]) is nn.Linear
    profile = profile_module(model, (X,))
    head = 256 * 8 + 8
    assert profile.param_count == PARAMS
    assert profile.params_by_layer_type == {"CpuHQQLinear": PARAMS - head, "Linear": head}
    assert profile.size_in_memory_bytes == sum(stored_bytes(m) for m in layers) + 4 * head
    assert profile.trainable_param_count == head


def test_profile_survives_a_pickle_round_trip() -> None:
    model = quantize(nbits=4, skip_head=False)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    before, after = profile_module(model, (X,)), profile_module(loaded, (X,))
    assert (after.param_count, after.size_in_memory_bytes) == (before.param_count, before.size_in_memory_bytes)
    assert after.param_count == PARAMS and after.size_in_memory_bytes < FP32_BYTES / 5
