"""Format detection by content: real files of every format, renamed files, and the safe pickle scan."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from robopt.errors import CorruptModelError, UnsupportedFormatError
from robopt.tools.formats import detect_format, pickle_globals, read_safetensors_header
from tests.tools.intake_models import make_tiny_net


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return make_tiny_net()


def _export_onnx(module: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(module, (torch.randn(2, 8),), str(path), dynamo=False, input_names=["x"])
    return path


def test_torchscript_archive_is_torchscript(tmp_path: Path, net: torch.nn.Module) -> None:
    torch.jit.save(torch.jit.script(net), str(tmp_path / "model.pt"))
    assert detect_format(tmp_path / "model.pt") == "torchscript"


def test_torch_save_zip_and_legacy_pickle_are_torch_pickle(tmp_path: Path, net: torch.nn.Module) -> None:
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    torch.save(net.state_dict(), tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert detect_format(tmp_path / "weights.pth") == "torch-pickle"
    assert detect_format(tmp_path / "legacy.bin") == "torch-pickle"
    assert (tmp_path / "legacy.bin").read_bytes()[:2] == b"\x80\x02"


def test_safetensors_is_detected_and_its_header_validated(tmp_path: Path, net: torch.nn.Module) -> None:
    save_file(net.state_dict(), str(tmp_path / "weights.safetensors"), metadata={"producer": "test"})
    assert detect_format(tmp_path / "weights.safetensors") == "safetensors"
    header = read_safetensors_header(tmp_path / "weights.safetensors")
    assert header["__metadata__"] == {"producer": "test"}
    assert header["fc1.weight"]["shape"] == [16, 8]
    assert header["fc1.weight"]["dtype"] == "F32"


def test_safetensors_without_extension_is_still_safetensors(tmp_path: Path, net: torch.nn.Module) -> None:
    save_file(net.state_dict(), str(tmp_path / "weights"))
    assert detect_format(tmp_path / "weights") == "safetensors"


def test_onnx_is_detected_by_parsing_even_under_a_torch_extension(tmp_path: Path, net: torch.nn.Module) -> None:
    _export_onnx(net, tmp_path / "model.onnx")
    (tmp_path / "model.pt").write_bytes((tmp_path / "model.onnx").read_bytes())
    assert detect_format(tmp_path / "model.onnx") == "onnx"
    assert detect_format(tmp_path / "model.pt") == "onnx"


def test_hf_folder_needs_config_and_weights(tmp_path: Path, net: torch.nn.Module) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CorruptModelError, match="no weights") as e:
        detect_format(folder)
    assert e.value.hint
    save_file(net.state_dict(), str(folder / "model.safetensors"))
    assert detect_format(folder) == "hf-folder"


def test_savedmodel_folder_and_its_pb_file(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"\x08\x01\x12\x00")
    assert detect_format(folder) == "tf-savedmodel"
    assert detect_format(folder / "saved_model.pb") == "tf-savedmodel"


def test_keras_zip_and_hdf5_are_keras(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "model.keras", "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("metadata.json", "{}")
        archive.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(504))
    assert detect_format(tmp_path / "model.keras") == "keras"
    assert detect_format(tmp_path / "model.h5") == "keras"


def test_other_zip_archives_are_unsupported(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "data.pt", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(UnsupportedFormatError, match=r"readme\.txt") as e:
        detect_format(tmp_path / "data.pt")
    assert "supported:" in (e.value.hint or "")


def test_torch_export_archive_is_named_and_refused(tmp_path: Path, net: torch.nn.Module) -> None:
    program = torch.export.export(net, (torch.randn(2, 8),))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    with pytest.raises(UnsupportedFormatError, match=r"torch\.export") as e:
        detect_format(tmp_path / "model.pt2")
    assert "torch.export.load" in (e.value.hint or "")


def test_safetensors_length_prefix_starting_like_a_pickle_is_not_a_pickle(tmp_path: Path) -> None:
    # A 640-byte header makes the file start with 0x80 0x02, the bytes a protocol-2 pickle starts with.
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    text = json.dumps(header).encode()
    text += b" " * (640 - len(text))
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", 640) + text + bytes(8))
    assert (tmp_path / "w.safetensors").read_bytes()[:2] == b"\x80\x02"
    assert detect_format(tmp_path / "w.safetensors") == "safetensors"


def test_pickle_globals_lists_module_classes_without_unpickling(tmp_path: Path, net: torch.nn.Module) -> None:
    torch.save(net, tmp_path / "full.pt")
    torch.save(net, tmp_path / "full_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    for name in ("full.pt", "full_legacy.pt"):
        found = pickle_globals(tmp_path / name)
        assert "tests.tools.intake_models.TinyNet" in found
        assert "torch.nn.modules.linear.Linear" in found
    weights_globals = pickle_globals(tmp_path / "weights.pt")
    assert "tests.tools.intake_models.TinyNet" not in weights_globals
    assert "torch._utils._rebuild_tensor_v2" in weights_globals
