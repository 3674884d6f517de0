"""Static analysis of torch modules and ONNX graphs: exact parameter counts, census, FLOPs and shapes."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import CorruptModelError, ModelNotFoundError
from robopt.tools.analysis import NO_INPUT_REASON, profile_module
from robopt.tools.onnx_analysis import profile_onnx
from robopt.tools.onnx_module import OnnxModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def linear_params(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


@pytest.fixture
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def test_cnn_params_census_flops_and_shapes(cnn: nn.Module) -> None:
    profile = profile_module(cnn, (torch.randn(1, 1, 28, 28),))
    conv = 8 * 1 * 3 * 3 + 8
    fc = linear_params(8 * 26 * 26, 10)
    assert profile.param_count == conv + fc == 54170
    assert profile.trainable_param_count == conv + fc
    assert profile.size_in_memory_bytes == 4 * (conv + fc)
    assert profile.layer_census == {"Conv2d": 1, "ReLU": 1, "Flatten": 1, "Linear": 1}
    assert profile.params_by_layer_type == {"Conv2d": conv, "Linear": fc}
    conv_flops = 2 * (8 * 26 * 26) * (1 * 3 * 3)
    fc_flops = 2 * (8 * 26 * 26) * 10
    assert profile.flops == conv_flops + fc_flops
    assert profile.macs == profile.flops // 2
    assert profile.output_shapes == [[1, 10]]
    assert profile.architecture == "cnn"
    assert profile.unmeasured == {}


def test_single_linear_flops() -> None:
    profile = profile_module(nn.Linear(64, 32), (torch.randn(1, 64),))
    assert profile.flops == 2 * 64 * 32
    assert profile.macs == 64 * 32


def test_without_inputs_flops_are_unmeasured_with_reason(cnn: nn.Module) -> None:
    profile = profile_module(cnn, None)
    assert profile.flops is None and profile.macs is None and profile.output_shapes == []
    assert profile.unmeasured["flops"] == NO_INPUT_REASON
    assert profile.param_count == 54170


def test_failing_forward_is_reported_not_raised() -> None:
    profile = profile_module(nn.Linear(4, 4), (torch.randn(1, 5),))  # wrong input width
    assert profile.flops is None and profile.output_shapes == []
    assert profile.unmeasured["flops"].startswith("FLOP counting failed: RuntimeError")
    assert "forward failed" in profile.unmeasured["output_shapes"]
    assert profile.param_count == linear_params(4, 4)


def test_profiling_leaves_training_mode_and_batchnorm_stats_untouched() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)).train()
    before = model[1].running_mean.clone()
    profile = profile_module(model, (torch.randn(4, 8),))
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, before)
    # BatchNorm buffers count in memory, not in parameters
    assert profile.param_count == linear_params(8, 8) + 2 * 8
    # plus buffers: running mean and var (fp32), num_batches_tracked (int64)
    assert profile.size_in_memory_bytes == 4 * profile.param_count + 4 * (8 + 8) + 8


def test_torchscript_census_from_original_names(cnn: nn.Module) -> None:
    x = torch.randn(1, 1, 28, 28)
    eager = profile_module(cnn, (x,))
    traced = profile_module(torch.jit.trace(cnn, x), (x,))
    assert traced.layer_census == eager.layer_census
    assert traced.param_count == eager.param_count
    assert traced.flops == eager.flops
    assert traced.architecture == "cnn"


def test_transformer_params_sum_and_attention_flops_counted() -> None:
    d, ff, seq = 32, 64, 5
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, ff, batch_first=True), 2, enable_nested_tensor=False)
    profile = profile_module(model, (torch.randn(1, seq, d),))
    per_layer = (3 * d * d + 3 * d) + linear_params(d, d) + linear_params(d, ff) + linear_params(ff, d) + 2 * 2 * d
    assert profile.param_count == 2 * per_layer
    assert sum(profile.params_by_layer_type.values()) == profile.param_count
    assert profile.layer_census["MultiheadAttention"] == 2
    # in/out projections, scores and weighted sum, feed-forward (the MHA fast path is bypassed to count them)
    per_layer_flops = 2 * seq * d * 3 * d + 2 * seq * d * d + 2 * (2 * seq * seq * d) + 2 * (2 * seq * d * ff)
    assert profile.flops == 2 * per_layer_flops
    assert torch.backends.mha.get_fastpath_enabled()


def test_dynamic_quantized_model_counts_packed_weights(mlp: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(mlp), {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(1, 64)
    profile = profile_module(quantized, (x,))
    weights, biases = 64 * 32 + 32 * 4, 32 + 4
    assert profile.param_count == weights + biases
    assert profile.layer_census == {"DynamicQuantizedLinear": 2, "ReLU": 1}
    assert profile.params_by_layer_type == {"DynamicQuantizedLinear": weights + biases}
    assert profile.size_in_memory_bytes == weights * 1 + biases * 4  # int8 weights, fp32 biases
    assert profile.flops == 2 * (64 * 32 + 32 * 4)
    assert profile.architecture == "mlp-policy"

    traced = profile_module(torch.jit.trace(quantized, x), (x,))
    assert traced.param_count == weights + biases
    assert traced.layer_census == {"QuantizedLinear": 2, "ReLU": 1}


def test_torchao_int8_weights_keep_logical_count_and_shrink_memory(mlp: nn.Module) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(mlp)
    quantize_(quantized, Int8WeightOnlyConfig())
    profile = profile_module(quantized, (torch.randn(1, 64),))
    fp32 = profile_module(mlp, None)
    assert profile.param_count == fp32.param_count == linear_params(64, 32) + linear_params(32, 4)
    # int8 data (1 byte per weight) + one fp32 scale per output row + fp32 biases
    assert profile.size_in_memory_bytes < fp32.size_in_memory_bytes / 2
    assert profile.flops == 2 * (64 * 32 + 32 * 4)


def test_bitsandbytes_4bit_counts_logical_params() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    source = nn.Linear(64, 32)
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4", compute_dtype=torch.float32)
    layer.load_state_dict(source.state_dict())
    model = nn.Sequential(layer.to("cpu"), nn.ReLU())
    assert model[0].weight.shape == (64 * 32 // 2, 1)  # packed: two 4-bit weights per byte
    profile = profile_module(model, (torch.randn(2, 64),))
    assert profile.param_count == 64 * 32 + 32
    assert profile.layer_census == {"Linear4bit": 1, "ReLU": 1}
    assert profile.size_in_memory_bytes < 4 * (64 * 32 + 32) / 3
    assert profile.flops == 2 * 2 * 64 * 32


def test_tiny_bert_exact_params() -> None:
    from transformers import BertConfig, BertModel

    v, h, i, layers, pos, types = 100, 32, 64, 2, 64, 2
    config = BertConfig(
        vocab_size=v,
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=i,
        max_position_embeddings=pos,
        type_vocab_size=types,
    )
    model = BertModel(config)
    profile = profile_module(model, (torch.randint(0, v, (1, 8)),))
    embeddings = v * h + pos * h + types * h + 2 * h
    per_layer = 4 * linear_params(h, h) + 2 * h + linear_params(h, i) + linear_params(i, h) + 2 * h
    pooler = linear_params(h, h)
    assert profile.param_count == embeddings + layers * per_layer + pooler
    assert sum(profile.params_by_layer_type.values()) == profile.param_count
    assert profile.layer_census["Embedding"] == 3
    assert profile.architecture == "transformer-encoder"
    assert [1, 8, h] in profile.output_shapes
    seq, heads = 8, 2
    attention = 2 * (2 * heads * seq * seq * (h // heads))  # scores and weighted sum (CPU fused SDPA kernel)
    per_layer_flops = 2 * seq * 4 * h * h + attention + 2 * seq * 2 * h * i
    assert profile.flops == layers * per_layer_flops + 2 * h * h  # the pooler sees the first token only


def test_tiny_llama_exact_params() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    v, h, i, layers, heads, kv_heads = 128, 64, 128, 2, 4, 2
    config = LlamaConfig(
        vocab_size=v,
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    profile = profile_module(model, (torch.randint(0, v, (1, 8)),))
    kv = kv_heads * (h // heads)
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h
    assert profile.param_count == v * h + layers * per_layer + h + v * h
    assert profile.params_by_layer_type["Linear"] == layers * (2 * h * h + 2 * h * kv + 3 * h * i) + v * h
    assert profile.architecture == "decoder-llm"
    assert [1, 8, v] in profile.output_shapes
    seq = 8
    attention = 2 * (2 * heads * seq * seq * (h // heads))  # kv heads are repeated to all heads
    per_layer_flops = 2 * seq * (2 * h * h + 2 * h * kv + 3 * h * i) + attention
    assert profile.flops == layers * per_layer_flops + 2 * seq * h * v


def test_onnx_backed_module_is_profiled_from_its_graph(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(mlp, (torch.randn(1, 64),), str(path), dynamo=False, input_names=["obs"])
    profile = profile_module(OnnxModule(path), None)
    assert profile.param_count == 2212 and profile.layer_census == {"Gemm": 2, "Relu": 1}


# ---- ONNX ------------------------------------------------------------------------------------


def test_onnx_profile_matches_torch(tmp_path: Path, mlp: nn.Module) -> None:
    x = torch.randn(1, 64)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(mlp, (x,), str(path), dynamo=False, input_names=["obs"])
    onnx_profile = profile_onnx(path)
    torch_profile = profile_module(mlp, (x,))
    assert onnx_profile.param_count == torch_profile.param_count == 2212
    assert onnx_profile.flops == torch_profile.flops == 2 * (64 * 32 + 32 * 4)
    assert onnx_profile.size_in_memory_bytes == 4 * 2212
    assert onnx_profile.layer_census == {"Gemm": 2, "Relu": 1}
    assert onnx_profile.params_by_layer_type == {"Gemm": 2212}
    assert onnx_profile.output_shapes == [[1, 4]]
    assert onnx_profile.trainable_param_count is None
    assert onnx_profile.architecture == "mlp-policy"


def test_onnx_cnn_flops_match_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=2),
        nn.ConvTranspose2d(8, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 49 * 49, 10),
    )
    x = torch.randn(1, 1, 28, 28)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False)
    onnx_profile = profile_onnx(path)
    torch_profile = profile_module(model, (x,))
    assert onnx_profile.flops == torch_profile.flops
    assert onnx_profile.param_count == torch_profile.param_count
    assert onnx_profile.architecture == "cnn"


def test_onnx_dynamic_batch_needs_input_spec(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(
        mlp, (torch.randn(1, 64),), str(path), dynamo=False, input_names=["obs"], dynamic_axes={"obs": {0: "batch"}}
    )
    dynamic = profile_onnx(path)
    assert dynamic.flops is None and "dynamic" in dynamic.unmeasured["flops"]
    assert "output_shapes" in dynamic.unmeasured
    fixed = profile_onnx(path, input_spec=InputSpec(inputs=[TensorSpec(name="obs", shape=[3, 64])], source="caller"))
    assert fixed.flops == 3 * 2 * (64 * 32 + 32 * 4)
    assert fixed.output_shapes == [[3, 4]]


def test_onnx_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        profile_onnx(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00 definitely not protobuf" * 10)
    with pytest.raises(CorruptModelError):
        profile_onnx(bad)
