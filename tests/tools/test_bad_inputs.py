"""Bad inputs give typed, actionable errors: damaged files, unsafe pickles, wrong names, wrong architectures."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import save_file

from robopt.errors import (
    ArchitectureRequiredError,
    CorruptModelError,
    ModelNotFoundError,
    RoboptError,
    UnsafePickleError,
    UnsupportedFormatError,
)
from robopt.tools.architectures import resolve_architecture
from robopt.tools.loading import LoadOptions, StateDictMismatchError, load_model
from tests.tools.intake_models import TinyNet, make_tiny_net


class WritesMarkerWhenUnpickled:
    """Unpickling this object calls open(marker, "w"): the file appears if the pickle is ever executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _load_error(path: Path, options: LoadOptions | None = None, **kwargs: object) -> RoboptError:
    with pytest.raises(RoboptError) as e:
        load_model(path, options, **kwargs)  # type: ignore[arg-type]
    assert e.value.hint, f"{type(e.value).__name__} without a hint: {e.value}"
    assert e.value.message
    return e.value


@pytest.fixture(scope="module")
def net() -> TinyNet:
    return make_tiny_net(seed=5)


# -- damaged files -------------------------------------------------------------------------------------


def test_random_bytes_named_pt_are_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(bytes([0x13, 0x37]) + os.urandom(4094))
    error = _load_error(path)
    assert isinstance(error, CorruptModelError)
    assert "model.pt" in error.message and "unrecognised binary" in error.message
    assert "supported:" in error.hint


def test_random_bytes_with_an_unknown_name_are_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "blob.dat"
    path.write_bytes(bytes([0x13, 0x37]) + os.urandom(2046))
    assert isinstance(_load_error(path), UnsupportedFormatError)


def test_truncated_safetensors(tmp_path: Path, net: TinyNet) -> None:
    path = tmp_path / "weights.safetensors"
    save_file(net.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    error = _load_error(path, LoadOptions(architecture="tests.tools.intake_models:TinyNet"))
    assert isinstance(error, CorruptModelError)
    assert "truncated" in error.message
    assert "re-export" in error.hint and "download" in error.hint

    path.write_bytes(data[:20])  # cut inside the JSON header
    error = _load_error(path)
    assert isinstance(error, CorruptModelError) and "header" in error.message


def test_truncated_torch_zip(tmp_path: Path, net: TinyNet) -> None:
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    error = _load_error(path, architecture=TinyNet)
    assert isinstance(error, CorruptModelError)
    assert "truncated or corrupt" in error.message


def test_truncated_legacy_pickle(tmp_path: Path, net: TinyNet) -> None:
    path = tmp_path / "full.pt"
    torch.save(net, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:200])
    # Even with trust, a damaged pickle is reported as damaged rather than handed to the unpickler.
    error = _load_error(path, LoadOptions(trust_pickle=True))
    assert isinstance(error, CorruptModelError)


def test_onnx_rejected_by_the_checker(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["undefined_input"], ["y"])
    graph = helper.make_graph(
        [node],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "broken.onnx"))
    error = _load_error(tmp_path / "broken.onnx")
    assert isinstance(error, CorruptModelError)
    assert "onnx.checker" in error.message and "undefined_input" in error.message


# -- unsafe pickles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["pickle.dump", "torch.save"])
def test_code_executing_pickle_is_refused_and_never_run(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = WritesMarkerWhenUnpickled(marker)
    if writer == "pickle.dump":
        with path.open("wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save({"weights": payload}, path)
    assert not marker.exists()
    error = _load_error(path)
    assert isinstance(error, UnsafePickleError)
    assert "arbitrary code" in error.message
    assert "open" in error.message  # the global it would call is named
    assert "--trust-pickle" in error.hint and "trust_pickle=True" in error.hint
    assert not marker.exists()


def test_full_module_pickle_without_trust(tmp_path: Path, net: TinyNet) -> None:
    torch.save(net, tmp_path / "full.pt")
    error = _load_error(tmp_path / "full.pt")
    assert isinstance(error, UnsafePickleError)
    assert "tests.tools.intake_models.TinyNet" in error.message


def test_hf_custom_code_needs_trust(tmp_path: Path, net: TinyNet) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    config = {"model_type": "robopt-test-custom", "auto_map": {"AutoModel": "modeling_custom.CustomModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(net.state_dict(), str(folder / "model.safetensors"))
    error = _load_error(folder)
    assert isinstance(error, UnsafePickleError)
    assert "auto_map" in error.message and "--trust-pickle" in error.hint


# -- wrong names, missing and empty files -------------------------------------------------------------


def test_valid_onnx_named_pt_loads_as_onnx(tmp_path: Path, net: TinyNet) -> None:
    x = torch.randn(2, 8)
    torch.onnx.export(net, (x,), str(tmp_path / "model.pt"), dynamo=False)
    loaded = load_model(tmp_path / "model.pt")
    assert loaded.format == "onnx"
    assert torch.allclose(loaded.module(x), net(x), atol=1e-5)


def test_text_file_named_onnx_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("this is not a model\nbut a note about one\n")
    error = _load_error(path)
    assert isinstance(error, UnsupportedFormatError)
    assert "text file" in error.message and "this is not a model" in error.message
    assert "ONNX" in error.hint


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"")
    error = _load_error(tmp_path / "model.pt")
    assert isinstance(error, CorruptModelError) and "empty (0 bytes)" in error.message


def test_missing_file(tmp_path: Path) -> None:
    error = _load_error(tmp_path / "nope.pt")
    assert isinstance(error, ModelNotFoundError) and "nope.pt" in error.message


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "data.csv").write_text("1,2")
    error = _load_error(tmp_path)
    assert isinstance(error, UnsupportedFormatError)
    assert "data.csv" in error.message and "notes.txt" in error.message


def test_json_config_file_points_to_its_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    error = _load_error(tmp_path / "config.json")
    assert isinstance(error, UnsupportedFormatError) and "pass the folder" in error.message


# -- architectures -------------------------------------------------------------------------------------


def test_state_dict_without_architecture(tmp_path: Path, net: TinyNet) -> None:
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    error = _load_error(tmp_path / "weights.pt")
    assert isinstance(error, ArchitectureRequiredError)
    assert "state dict of 9 tensors" in error.message
    assert "--architecture pkg.module:ClassName" in error.hint


def test_safetensors_without_architecture(tmp_path: Path, net: TinyNet) -> None:
    save_file(net.state_dict(), str(tmp_path / "weights.safetensors"))
    assert isinstance(_load_error(tmp_path / "weights.safetensors"), ArchitectureRequiredError)


def test_state_dict_that_does_not_fit_the_architecture(tmp_path: Path) -> None:
    torch.save(make_tiny_net(hidden=32).state_dict(), tmp_path / "wide.pt")
    error = _load_error(tmp_path / "wide.pt", architecture=TinyNet)
    assert isinstance(error, StateDictMismatchError) and isinstance(error, CorruptModelError)
    assert "shape mismatches" in error.message and "fc1.weight (file [32, 8], model [16, 8])" in error.message

    state = make_tiny_net().state_dict()
    state["head.weight"] = state.pop("fc2.weight")
    torch.save(state, tmp_path / "renamed.pt")
    error = _load_error(tmp_path / "renamed.pt", architecture=TinyNet)
    assert "1 missing keys: fc2.weight" in error.message and "1 unexpected keys: head.weight" in error.message
    assert "architecture" in error.hint


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("no_colon_here", "import path of the form"),
        ("robopt_no_such_module_xyz:Net", "cannot import module"),
        ("tests.tools.intake_models:Missing", "has no attribute"),
        ("tests.tools.intake_models:NotAModule", "not a torch.nn.Module"),
    ],
)
def test_bad_architecture_strings(spec: str, expected: str) -> None:
    with pytest.raises(ArchitectureRequiredError, match=expected) as e:
        resolve_architecture(spec)
    assert e.value.hint and "pkg.module:ClassName" in e.value.hint


def test_architecture_kwargs_that_do_not_fit(tmp_path: Path, net: TinyNet) -> None:
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    options = LoadOptions(architecture="tests.tools.intake_models:TinyNet", architecture_kwargs={"depth": 3})
    error = _load_error(tmp_path / "weights.pt", options)
    assert isinstance(error, ArchitectureRequiredError) and "depth" in error.message


def test_truncated_onnx(tmp_path: Path, net: TinyNet) -> None:
    torch.onnx.export(net, (torch.randn(2, 8),), str(tmp_path / "model.onnx"), dynamo=False)
    data = (tmp_path / "model.onnx").read_bytes()
    (tmp_path / "model.onnx").write_bytes(data[: len(data) - 30])
    error = _load_error(tmp_path / "model.onnx")
    assert isinstance(error, CorruptModelError) and "does not parse as ONNX" in error.message


def test_hf_folder_whose_weights_belong_to_another_model(
    tmp_path: Path, net: TinyNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import BertConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "bert"
    BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    save_file(net.state_dict(), str(folder / "model.safetensors"))
    # transformers itself would fill the missing weights with random values and only log a warning.
    error = _load_error(folder)
    assert isinstance(error, StateDictMismatchError)
    assert "missing keys" in error.message and "embeddings.word_embeddings.weight" in error.message


def test_hf_pytorch_model_bin_that_would_execute_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import BertConfig, BertModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "bert"
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.architectures = ["BertModel"]
    config.save_pretrained(folder)
    marker = tmp_path / "pwned"
    state = {**BertModel(config).state_dict(), "extra": WritesMarkerWhenUnpickled(marker)}
    torch.save(state, folder / "pytorch_model.bin")
    error = _load_error(folder, LoadOptions(trust_pickle=True))
    assert isinstance(error, UnsafePickleError) and "open" in error.message
    assert not marker.exists()
