"""Every supported format loads from a real file and computes what the source model computes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import MissingExtraError
from robopt.tools.loading import LoadedModel, LoadOptions, load_model
from robopt.tools.onnx_module import OnnxModule
from robopt.tools.tf_convert import missing_tensorflow_packages
from tests.tools.intake_models import TinyNet, TinyNetWithSpec, make_tiny_net, tiny_net_factory

ARCH = "tests.tools.intake_models:TinyNet"


@pytest.fixture(scope="module")
def net() -> TinyNet:
    return make_tiny_net(seed=1)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _assert_same_outputs(loaded: LoadedModel, reference: torch.nn.Module, x: torch.Tensor, atol: float = 0.0) -> None:
    assert not loaded.module.training
    with torch.no_grad():
        expected = reference(x)
        got = loaded.module(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=atol, rtol=0), (got - expected).abs().max()


# -- PyTorch -------------------------------------------------------------------------------------------


def test_torchscript_loads(tmp_path: Path, net: TinyNet, x: torch.Tensor) -> None:
    torch.jit.save(torch.jit.script(net), str(tmp_path / "model.pt"))
    loaded = load_model(tmp_path / "model.pt", architecture=TinyNet)
    assert loaded.format == "torchscript"
    assert "not used" in loaded.metadata["architecture_note"]
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert loaded.source == tmp_path / "model.pt"
    assert loaded.onnx_path is None
    _assert_same_outputs(loaded, net, x)


def test_state_dict_with_architecture_import_path(tmp_path: Path, net: TinyNet, x: torch.Tensor) -> None:
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    loaded = load_model(tmp_path / "weights.pt", LoadOptions(architecture=ARCH))
    assert loaded.format == "torch-pickle"
    assert type(loaded.module) is TinyNet
    assert loaded.metadata["state_dict_tensors"] == len(net.state_dict()) == 9
    assert loaded.metadata["unpickled_with_trust"] is False
    _assert_same_outputs(loaded, net, x)


def test_state_dict_with_architecture_class_and_kwargs(tmp_path: Path, x: torch.Tensor) -> None:
    wide = make_tiny_net(seed=3, hidden=32)
    torch.save({"epoch": 7, "model_state_dict": wide.state_dict()}, tmp_path / "ckpt.pth")
    by_class = load_model(tmp_path / "ckpt.pth", LoadOptions(architecture_kwargs={"hidden": 32}), architecture=TinyNet)
    by_factory = load_model(
        tmp_path / "ckpt.pth", LoadOptions(architecture_kwargs={"hidden": 32}), architecture=tiny_net_factory
    )
    by_path = load_model(tmp_path / "ckpt.pth", LoadOptions(architecture=ARCH, architecture_kwargs={"hidden": 32}))
    assert by_class.metadata["architecture"] == "tests.tools.intake_models:TinyNet"
    assert by_factory.metadata["architecture"] == "tests.tools.intake_models:tiny_net_factory"
    assert by_path.metadata["architecture"] == ARCH
    for loaded in (by_class, by_factory, by_path):
        assert loaded.metadata["state_dict_key"] == "model_state_dict"
        _assert_same_outputs(loaded, wide, x)


def test_legacy_state_dict_and_data_parallel_prefix(tmp_path: Path, net: TinyNet, x: torch.Tensor) -> None:
    prefixed = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": prefixed}, tmp_path / "dp.pt", _use_new_zipfile_serialization=False)
    loaded = load_model(tmp_path / "dp.pt", architecture=TinyNet)
    _assert_same_outputs(loaded, net, x)


def test_full_pickle_loads_with_trust(tmp_path: Path, net: TinyNet, x: torch.Tensor) -> None:
    torch.save(net, tmp_path / "full.pt")
    loaded = load_model(tmp_path / "full.pt", LoadOptions(trust_pickle=True))
    assert type(loaded.module) is TinyNet
    assert loaded.metadata["unpickled_with_trust"] is True
    _assert_same_outputs(loaded, net, x)


def test_trusted_checkpoint_dict_holding_a_module(tmp_path: Path, net: TinyNet, x: torch.Tensor) -> None:
    torch.save({"model": net, "epoch": 3}, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", LoadOptions(trust_pickle=True))
    assert loaded.metadata["module_key"] == "model"
    _assert_same_outputs(loaded, net, x)


def test_safetensors_file_with_architecture(tmp_path: Path, net: TinyNet, x: torch.Tensor) -> None:
    save_file(net.state_dict(), str(tmp_path / "weights.safetensors"), metadata={"epoch": "4"})
    loaded = load_model(tmp_path / "weights.safetensors", LoadOptions(architecture=ARCH))
    assert loaded.format == "safetensors"
    assert loaded.metadata["safetensors_metadata"] == {"epoch": "4"}
    _assert_same_outputs(loaded, net, x)


# -- input specs ---------------------------------------------------------------------------------------


def test_input_spec_precedence(tmp_path: Path, net: TinyNet) -> None:
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    path = tmp_path / "weights.pt"

    from_attribute = load_model(path, architecture=TinyNetWithSpec)
    assert from_attribute.input_spec == InputSpec(inputs=[TensorSpec(name="obs", shape=[2, 8])], source="model")

    assert load_model(path, architecture=TinyNet).input_spec is None

    from_shape = load_model(path, LoadOptions(input_shape=[4, 8]), architecture=TinyNetWithSpec)
    assert from_shape.input_spec == InputSpec(inputs=[TensorSpec(name="input", shape=[4, 8])], source="caller")

    spec = InputSpec(inputs=[TensorSpec(name="state", shape=[1, 8])], source="caller")
    both = load_model(path, LoadOptions(input_shape=[4, 8], input_spec=spec), architecture=TinyNetWithSpec)
    assert both.input_spec == spec


def test_load_options_forbid_unknown_fields_and_bad_shapes() -> None:
    with pytest.raises(ValueError):
        LoadOptions(architecure="x:Y")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        LoadOptions(input_shape=[1, 0])
    assert LoadOptions.model_validate_json('{"trust_pickle": true, "input_shape": [1, 8]}').input_shape == [1, 8]


# -- ONNX ----------------------------------------------------------------------------------------------


def test_onnx_loads_with_graph_input_spec(tmp_path: Path, net: TinyNet, x: torch.Tensor) -> None:
    torch.onnx.export(
        net, (x,), str(tmp_path / "model.onnx"), dynamo=False, input_names=["obs"], dynamic_axes={"obs": {0: "batch"}}
    )
    loaded = load_model(tmp_path / "model.onnx")
    assert loaded.format == "onnx"
    assert isinstance(loaded.module, OnnxModule)
    assert loaded.onnx_path == tmp_path / "model.onnx"
    assert loaded.input_spec == InputSpec(inputs=[TensorSpec(name="obs", shape=[1, 8])], source="metadata")
    assert loaded.metadata["producer_name"] == "pytorch"
    assert loaded.metadata["opset_import"]["ai.onnx"] >= 17
    _assert_same_outputs(loaded, net, x, atol=1e-5)


def test_onnx_int64_inputs_and_caller_shape(tmp_path: Path) -> None:
    embed = torch.nn.Embedding(50, 4).eval()
    ids = torch.tensor([[1, 2, 3]])
    torch.onnx.export(embed, (ids,), str(tmp_path / "embed.onnx"), dynamo=False, input_names=["ids"])
    loaded = load_model(tmp_path / "embed.onnx")
    assert loaded.input_spec == InputSpec(
        inputs=[TensorSpec(name="ids", shape=[1, 3], dtype="int64")], source="metadata"
    )
    assert torch.allclose(loaded.module(ids), embed(ids), atol=1e-6)
    overridden = load_model(tmp_path / "embed.onnx", LoadOptions(input_shape=[1, 3]))
    assert overridden.input_spec.inputs[0].name == "ids" and overridden.input_spec.source == "caller"


# -- Hugging Face --------------------------------------------------------------------------------------


def test_hf_bert_folder(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    model = BertModel(config).eval()
    model.save_pretrained(tmp_path / "bert")
    loaded = load_model(tmp_path / "bert")
    assert loaded.format == "hf-folder"
    assert type(loaded.module) is BertModel
    assert loaded.metadata["hf_config"]["vocab_size"] == 99
    assert loaded.input_spec == InputSpec(
        inputs=[TensorSpec(name="input_ids", shape=[1, 16], dtype="int64", high=99)], source="metadata"
    )
    ids = torch.randint(0, 99, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.module(ids).last_hidden_state, model(ids).last_hidden_state)


def test_hf_llama_folder_from_pytorch_model_bin(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=8,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path / "llama"
    folder.mkdir()
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    # The legacy .bin layout; transformers reads it with torch.load(weights_only=True).
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded = load_model(folder)
    assert type(loaded.module) is LlamaForCausalLM
    assert loaded.metadata["hf_class"] == "LlamaForCausalLM"
    assert loaded.input_spec is not None and loaded.input_spec.inputs[0].shape == [1, 8]
    assert loaded.input_spec.inputs[0].high == 128
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.module(ids).logits, model(ids).logits, atol=1e-6)


def test_hf_vision_folder_gets_pixel_values_spec(tmp_path: Path) -> None:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    ViTModel(config).save_pretrained(tmp_path / "vit")
    loaded = load_model(tmp_path / "vit")
    assert loaded.input_spec == InputSpec(
        inputs=[TensorSpec(name="pixel_values", shape=[1, 3, 32, 32])], source="metadata"
    )


# -- TensorFlow ----------------------------------------------------------------------------------------


def _write_keras_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential"}))
        archive.writestr("metadata.json", "{}")
        archive.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    return path


@pytest.mark.skipif(not missing_tensorflow_packages(), reason="the tensorflow extra is installed here")
def test_tensorflow_inputs_need_the_extra(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"\x08\x01")
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(504))
    for path in (saved, _write_keras_zip(tmp_path / "model.keras"), tmp_path / "model.h5"):
        with pytest.raises(MissingExtraError) as e:
            load_model(path)
        assert e.value.extra == "tensorflow"
        assert e.value.package == "tensorflow-cpu and tf2onnx"
        assert "pip install 'robopt[tensorflow]'" in (e.value.hint or "")
        assert str(path) in e.value.message


def test_keras_model_converts_to_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    import numpy as np

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    model = keras.Sequential(
        [keras.Input((8,), name="obs"), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)]
    )
    model.save(tmp_path / "policy.keras")
    model.export(str(tmp_path / "saved"))
    obs = np.random.default_rng(0).standard_normal((3, 8)).astype("float32")
    expected = torch.from_numpy(np.asarray(model(obs)))
    for path, fmt in ((tmp_path / "policy.keras", "keras"), (tmp_path / "saved", "tf-savedmodel")):
        loaded = load_model(path)
        assert loaded.format == fmt
        assert isinstance(loaded.module, OnnxModule)
        assert loaded.onnx_path is not None and loaded.onnx_path.is_file()
        assert loaded.metadata["converted_with"] == "tf2onnx"
        assert loaded.input_spec == InputSpec(inputs=[TensorSpec(name="obs", shape=[1, 8])], source="metadata")
        assert torch.allclose(loaded.module(torch.from_numpy(obs)), expected, atol=1e-5)
