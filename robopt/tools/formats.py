"""Model format detection by content (magic bytes, archive entries, headers), never by file extension alone."""

from __future__ import annotations

import io
import json
import pickletools
import struct
import zipfile
from pathlib import Path
from typing import Any, Literal, get_args

from robopt.errors import CorruptModelError, ModelNotFoundError, UnsupportedFormatError

ModelFormat = Literal["torchscript", "torch-pickle", "safetensors", "onnx", "hf-folder", "tf-savedmodel", "keras"]
MODEL_FORMATS: tuple[str, ...] = get_args(ModelFormat)

SUPPORTED_FORMATS_HINT = (
    "supported: TorchScript (.pt), torch.save checkpoints (state dict + --architecture, or a full module with "
    "--trust-pickle), .safetensors (+ --architecture), a Hugging Face folder (config.json + weights), ONNX (.onnx), "
    "and with the 'tensorflow' extra a TensorFlow SavedModel folder or a Keras .keras/.h5 file"
)

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers
_ONNX_PARSE_LIMIT = 2_000_000_000  # protobuf cannot parse a single message above 2 GB
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Extensions users give model files; unrecognised binary content under one of them is a damaged model.
_MODEL_EXTENSIONS = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".safetensors", ".onnx", ".h5", ".hdf5", ".keras", ".ts"}
_EXPECTED_BY_EXTENSION = {
    ".onnx": "an ONNX model",
    ".safetensors": "a SafeTensors file",
    ".h5": "a Keras HDF5 file",
    ".keras": "a Keras archive",
    ".pt": "a PyTorch file",
    ".pth": "a PyTorch file",
    ".bin": "a PyTorch file",
    ".ckpt": "a PyTorch checkpoint",
}
_SAFETENSORS_DTYPES = {
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
    "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
}  # fmt: skip


def detect_format(path: str | Path) -> ModelFormat:
    """The format of the model at `path`, decided from its content.

    Raises ModelNotFoundError (no such path), CorruptModelError (a recognisable but damaged or empty model
    file) or UnsupportedFormatError (something that is not a model robopt reads).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"no model file or directory at {str(path)!r}",
            "check the path (relative paths are resolved from the current directory); " + SUPPORTED_FORMATS_HINT,
        )
    if path.is_dir():
        return _detect_directory(path)
    if not path.is_file():
        raise UnsupportedFormatError(f"{path} is not a regular file or directory", SUPPORTED_FORMATS_HINT)
    return _detect_file(path)


def _detect_directory(path: Path) -> ModelFormat:
    if (path / "config.json").is_file():
        if any((path / name).is_file() for name in _HF_WEIGHT_FILES):
            return "hf-folder"
        if not (path / "saved_model.pb").is_file():
            raise CorruptModelError(
                f"{path} has a config.json but no weights ({', '.join(_HF_WEIGHT_FILES)})",
                "save the whole model with model.save_pretrained(folder), or copy the missing weight files into it",
            )
    if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
        return "tf-savedmodel"
    entries = sorted(p.name for p in path.iterdir())
    shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
    raise UnsupportedFormatError(
        f"directory {path} is neither a Hugging Face model folder (config.json + weights) nor a TensorFlow "
        f"SavedModel (saved_model.pb); it contains: {shown or 'nothing'}",
        "point at the model file itself, or at a folder written by save_pretrained / tf.saved_model.save; "
        + SUPPORTED_FORMATS_HINT,
    )


def _detect_file(path: Path) -> ModelFormat:
    size = path.stat().st_size
    if size == 0:
        raise CorruptModelError(
            f"{path} is empty (0 bytes)",
            "the file was probably not written completely: export or download it again; " + SUPPORTED_FORMATS_HINT,
        )
    if path.name == "saved_model.pb":
        return "tf-savedmodel"
    with path.open("rb") as f:
        head = f.read(4096)

    if head.startswith(_ZIP_MAGIC):
        return _detect_zip(path)
    if head.startswith(_HDF5_MAGIC):
        return "keras"
    # Before the pickle check: a SafeTensors length prefix can itself start with the bytes 0x80 0x02.
    if _looks_like_safetensors(head):
        read_safetensors_header(path)  # raises CorruptModelError when truncated or malformed
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-pickle"
    if size < _ONNX_PARSE_LIMIT and parse_onnx_model(path) is not None:
        return "onnx"

    if _is_text(head):
        preview = head[:60].decode("utf-8", errors="replace").splitlines()[0] if head.strip() else ""
        what = "a JSON file" if head.lstrip()[:1] in (b"{", b"[") else "a text file"
        extra = " (a Hugging Face config.json? pass the folder that holds it)" if path.name == "config.json" else ""
        raise UnsupportedFormatError(
            f"{path} is {what}, not a model{extra}; it starts with {preview!r}",
            "pass the exported model file; " + SUPPORTED_FORMATS_HINT,
        )
    found = f"unrecognised binary data ({size} bytes, starts with {head[:8].hex(' ')})"
    if path.suffix.lower() in _MODEL_EXTENSIONS:
        expected = _EXPECTED_BY_EXTENSION.get(path.suffix.lower(), "a model")
        raise CorruptModelError(
            f"{path} is named like {expected} but holds {found}: it does not parse as ONNX, and no PyTorch, "
            "SafeTensors or Keras signature was found",
            "the file is damaged or not what its name says: export or download it again; " + SUPPORTED_FORMATS_HINT,
        )
    raise UnsupportedFormatError(f"{path} holds {found}, not a model format robopt reads", SUPPORTED_FORMATS_HINT)


def zip_entries(path: Path) -> list[str]:
    """Entry names of a zip archive; CorruptModelError when the archive is truncated or damaged."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CorruptModelError(
            f"{path} is a zip archive (as written by torch.save, torch.jit.save or Keras) but it is truncated or "
            f"corrupt: {e}",
            "the file was probably cut short while saving or downloading: export or download it again",
        ) from e


def _detect_zip(path: Path) -> ModelFormat:
    names = zip_entries(path)
    parts = [name.split("/") for name in names]
    if any(len(p) >= 3 and p[1] == "code" for p in parts) or any(p[-1] == "constants.pkl" for p in parts):
        return "torchscript"
    if any(p[-1] == "archive_format" for p in parts):
        raise UnsupportedFormatError(
            f"{path} is a torch.export program archive (.pt2), which robopt does not load",
            "load it with torch.export.load(path).module() and save it with torch.jit.script/torch.save, or "
            "export ONNX; " + SUPPORTED_FORMATS_HINT,
        )
    if any(p[-1] == "data.pkl" for p in parts):
        return "torch-pickle"
    top = {p[0] for p in parts if len(p) == 1}
    if "config.json" in top and ("model.weights.h5" in top or "metadata.json" in top):
        return "keras"
    shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
    raise UnsupportedFormatError(
        f"{path} is a zip archive but not a PyTorch or Keras model; it contains: {shown or 'no entries'}",
        SUPPORTED_FORMATS_HINT,
    )


def _looks_like_safetensors(head: bytes) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= _SAFETENSORS_MAX_HEADER


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The parsed JSON header of a .safetensors file, checked against the file size.

    Raises CorruptModelError when the header is malformed or the file is shorter than the header says.
    """
    path = Path(path)
    size = path.stat().st_size

    def corrupt(what: str) -> CorruptModelError:
        return CorruptModelError(
            f"{path} is not a valid SafeTensors file: {what}",
            "the file is truncated or corrupt: re-export it (safetensors.torch.save_file / save_pretrained) "
            "or download it again",
        )

    if size < 8:
        raise corrupt(f"it is only {size} bytes, shorter than the 8-byte header length")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _SAFETENSORS_MAX_HEADER:
            raise corrupt(f"its header length field says {header_len} bytes, more than any SafeTensors header")
        if 8 + header_len > size:
            raise corrupt(f"its header needs {header_len} bytes but the file has only {size - 8} after the length")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")

    data_len = size - 8 - header_len
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise corrupt(f"tensor {name!r} has no dtype/shape/data_offsets")
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise corrupt(f"tensor {name!r} has unknown dtype {entry['dtype']!r}")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end:
            raise corrupt(f"tensor {name!r} has invalid data offsets {entry['data_offsets']}")
        end_max = max(end_max, end)
    if end_max > data_len:
        raise corrupt(f"its tensors need {end_max} data bytes but only {data_len} are present (truncated)")
    return header


def parse_onnx_model(path: str | Path) -> Any | None:
    """The onnx.ModelProto at `path` (external data not loaded), or None when the bytes are not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        # format="protobuf": onnx would otherwise pick a JSON or text parser from a .json/.txtpb extension.
        model = onnx.load_model(str(path), format="protobuf", load_external_data=False)
    except (DecodeError, ValueError, UnicodeDecodeError):
        return None
    # Protobuf happily parses many byte strings into a message of unknown fields; a real model names its IR
    # version, an opset and a graph with outputs.
    if model.ir_version <= 0 or not model.opset_import or not model.HasField("graph") or not model.graph.output:
        return None
    return model


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_LEGACY_TORCH_PICKLES = 4  # torch's legacy format: magic number, protocol, sys info, then the object


def pickle_globals(path: str | Path) -> list[str]:
    """The Python objects ("module.name") a torch checkpoint's pickle would import, read without unpickling.

    Reads the opcodes only (pickletools), so nothing in the file runs. Raises CorruptModelError when the
    pickle data is truncated or not valid pickle.
    """
    path = Path(path)
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    if name.rsplit("/", 1)[-1] == "data.pkl":
                        found += _scan_pickle(io.BytesIO(archive.read(name)))
        else:
            with path.open("rb") as f:
                for _ in range(_LEGACY_TORCH_PICKLES):
                    if f.read(1) != b"\x80":  # each pickle of protocol 2+ starts with the PROTO opcode
                        break
                    f.seek(-1, io.SEEK_CUR)
                    found += _scan_pickle(f)
    except (ValueError, EOFError, zipfile.BadZipFile, struct.error) as e:
        raise CorruptModelError(
            f"{path} holds pickle data that is truncated or corrupt ({e})",
            "the file was probably cut short or damaged: save it again with torch.save, or download it again",
        ) from e
    return list(dict.fromkeys(found))


def _scan_pickle(stream: Any) -> list[str]:
    found: list[str] = []
    strings: list[str] = []
    memo: dict[Any, Any] = {}
    last_pushed: Any = None
    for op, arg, _pos in pickletools.genops(stream):
        pushed: Any = None
        if op.name in _STRING_OPS:
            pushed = arg.decode("latin-1") if isinstance(arg, bytes) else arg
        elif op.name in _GET_OPS:
            pushed = memo.get(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last_pushed
            continue
        elif op.name in _PUT_OPS:
            memo[arg] = last_pushed
            continue
        elif op.name == "GLOBAL":
            found.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "INST":
            found.append(str(arg).replace(" ", "."))
        if isinstance(pushed, str):
            strings.append(pushed)
        last_pushed = pushed
    return found


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a multi-byte character cut at the end of the sample is still text
            return False
        text = head[: e.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text)
    return printable >= 0.95 * max(len(text), 1)
