"""Validate and load a user's model (any supported format, detected by content) into an eval-mode CPU module."""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import (
    ArchitectureRequiredError,
    CorruptModelError,
    UnsafePickleError,
    UnsupportedFormatError,
)
from robopt.tools.architectures import ARCHITECTURE_HINT, ArchitectureFactory, build_architecture
from robopt.tools.formats import ModelFormat, detect_format, parse_onnx_model, pickle_globals, read_safetensors_header

TRUST_PICKLE_HINT = (
    "only if you trust where the file came from, allow it with --trust-pickle (CLI) or "
    "LoadOptions(trust_pickle=True) (Python)"
)
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
_MODULE_KEYS = ("model", "module", "ema", "net")
# Globals every torch checkpoint references to rebuild tensors; listing them would hide the ones that matter.
_TENSOR_GLOBAL_PREFIXES = (
    "torch._utils._rebuild",
    "collections.OrderedDict",
    "torch.Size",
    "torch.device",
    "__builtin__.set",
    "builtins.set",
)
_ONNX_DTYPES = {
    1: "float32",  # onnx.TensorProto.FLOAT
    10: "float16",
    16: "bfloat16",
    11: "float64",
    7: "int64",
    6: "int32",
    9: "bool",
}
_HF_SEQUENCE_LENGTH = 16


class LoadOptions(BaseModel):
    """How to load a model: the architecture for weight-only files, pickle trust, and input shapes."""

    model_config = ConfigDict(extra="forbid")

    architecture: str | None = Field(
        default=None,
        description="'package.module:ClassName' (an import path) that rebuilds a state dict or bare .safetensors file.",
    )
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict, description="Constructor kwargs for it.")
    trust_pickle: bool = Field(
        default=False,
        description="Allow unpickling full nn.Module pickles and Hugging Face custom code (both can run code).",
    )
    input_shape: list[PositiveInt] | None = Field(
        default=None, min_length=1, description="Caller-given float32 input shape, batch dimension included."
    )
    input_spec: InputSpec | None = Field(default=None, description="Full caller-given input spec (beats input_shape).")


@dataclass
class LoadedModel:
    """A loaded model and what was learned about it while loading."""

    module: nn.Module
    format: ModelFormat
    source: Path
    input_spec: InputSpec | None
    onnx_path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class StateDictMismatchError(CorruptModelError):
    """The weights do not fit the given architecture (missing/unexpected keys or different shapes)."""


def load_model(
    path: str | Path,
    options: LoadOptions | None = None,
    *,
    architecture: ArchitectureFactory | None = None,
) -> LoadedModel:
    """Detect the format of `path` by content and load it; the module is returned in eval mode on CPU.

    `architecture` (a class or factory) takes precedence over `options.architecture` (an import path).
    Raises typed RoboptErrors (ModelNotFoundError, UnsupportedFormatError, CorruptModelError,
    UnsafePickleError, ArchitectureRequiredError, MissingExtraError), each with a hint.
    """
    options = options or LoadOptions()
    path = Path(path).expanduser()
    fmt = detect_format(path)
    factory: ArchitectureFactory | str | None = architecture or options.architecture
    if fmt == "torchscript":
        loaded = _load_torchscript(path)
    elif fmt == "torch-pickle":
        loaded = _load_torch_checkpoint(path, options, factory)
    elif fmt == "safetensors":
        loaded = _load_safetensors_file(path, options, factory)
    elif fmt == "hf-folder":
        loaded = _load_hf_folder(path, options)
    elif fmt == "onnx":
        loaded = _load_onnx(path, path, "onnx")
    else:
        from robopt.tools.tf_convert import convert_tensorflow_to_onnx

        onnx_path = convert_tensorflow_to_onnx(path, fmt)
        loaded = _load_onnx(onnx_path, path, fmt)
        loaded.metadata["converted_with"] = "tf2onnx"
    if factory is not None:
        if fmt in ("torch-pickle", "safetensors") and "state_dict_tensors" in loaded.metadata:
            loaded.metadata["architecture"] = factory if isinstance(factory, str) else _qualified_name(factory)
        else:
            loaded.metadata["architecture_note"] = f"the given architecture was not used: a {fmt} model carries its own"
    loaded.module.eval()
    loaded.input_spec = _resolve_input_spec(loaded, options)
    return loaded


# -- PyTorch -------------------------------------------------------------------------------------------


def _load_torchscript(path: Path) -> LoadedModel:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as e:
        raise CorruptModelError(
            f"{path} is a TorchScript archive but torch.jit.load failed: {_first_line(e)}",
            "re-export it with torch.jit.script/trace + torch.jit.save using torch "
            f"{torch.__version__.split('+')[0]} or older",
        ) from e
    return LoadedModel(module=module, format="torchscript", source=path, input_spec=None)


def _load_torch_checkpoint(path: Path, options: LoadOptions, factory: ArchitectureFactory | str | None) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write before refusing them; the refusal is reported.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
        trusted = False
    except pickle.UnpicklingError as e:
        obj = _load_pickle_beyond_weights(path, options, e)
        trusted = True
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CorruptModelError(
            f"{path} could not be read by torch.load: {_first_line(e)}",
            "the file is truncated or corrupt, or was not written by torch.save: save or download it again",
        ) from e
    metadata: dict[str, Any] = {"unpickled_with_trust": trusted}

    if isinstance(obj, nn.Module):
        return LoadedModel(module=obj, format="torch-pickle", source=path, input_spec=None, metadata=metadata)
    if isinstance(obj, Mapping):
        for key in _MODULE_KEYS:
            if isinstance(obj.get(key), nn.Module):
                metadata["module_key"] = key
                return LoadedModel(
                    module=obj[key], format="torch-pickle", source=path, input_spec=None, metadata=metadata
                )
        state, state_key = _find_state_dict(obj)
        if state is not None:
            metadata["state_dict_key"] = state_key
            module = _module_from_state_dict(path, state, options, factory)
            metadata["state_dict_tensors"] = len(state)
            return LoadedModel(module=module, format="torch-pickle", source=path, input_spec=None, metadata=metadata)
        found = f"a {type(obj).__name__} with keys {_preview(list(obj))}"
    else:
        found = f"a {type(obj).__name__}"
    raise UnsupportedFormatError(
        f"{path} is a torch.save file but holds {found}: neither a model nor a state dict of tensors",
        "save the model with torch.save(model.state_dict(), path) (and pass --architecture pkg.module:Class) or "
        "export TorchScript/ONNX",
    )


def _load_pickle_beyond_weights(path: Path, options: LoadOptions, error: pickle.UnpicklingError) -> Any:
    """torch.load refused the file with weights_only=True; unpickle fully only when the caller trusts it."""
    # Opcodes are read first so that a damaged file is reported as damaged, and never unpickled.
    imports = [g for g in pickle_globals(path) if not _is_tensor_global(g)]
    if not options.trust_pickle:
        what = f"it imports {_preview(imports)}" if imports else f"the safe loader says: {_wo_reason(error)}"
        raise UnsafePickleError(
            f"{path} is a pickle that torch.load(weights_only=True) refuses: {what}. It probably holds a whole "
            "pickled nn.Module; unpickling it can run arbitrary code on this machine",
            f"{TRUST_PICKLE_HINT}; safer: save only the weights (torch.save(model.state_dict(), path)) and pass "
            "--architecture pkg.module:Class, or export TorchScript/ONNX",
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as e:
        raise ArchitectureRequiredError(
            f"{path} is a pickled model whose code cannot be imported: {_first_line(e)}",
            "make the module that defines the model class importable (install its package or add it to "
            "PYTHONPATH), or save a state dict and pass --architecture pkg.module:Class",
        ) from e
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise CorruptModelError(
            f"{path} could not be unpickled by torch.load: {_first_line(e)}",
            "the file is corrupt or not a torch.save file (a plain pickle.dump is not supported): save the model "
            "again with torch.save",
        ) from e


def _find_state_dict(obj: Mapping[Any, Any]) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return dict(obj), None
    for key in _STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            state, _ = _find_state_dict(inner)
            if state is not None:
                return state, key
    return None, None


def _module_from_state_dict(
    path: Path, state: dict[str, torch.Tensor], options: LoadOptions, factory: ArchitectureFactory | str | None
) -> nn.Module:
    if factory is None:
        hint = ARCHITECTURE_HINT
        if (path.parent / "config.json").is_file():
            hint = f"{path.parent} has a config.json: pass that folder to load it as a Hugging Face model, or " + hint
        raise ArchitectureRequiredError(
            f"{path} holds only weights (a state dict of {len(state)} tensors, e.g. {_preview(list(state), 3)}); "
            "the model class that uses them is needed to rebuild the model",
            hint,
        )
    module = build_architecture(factory, options.architecture_kwargs)
    load_state_dict_strict(module, state, path)
    return module


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """`module.load_state_dict(state, strict=True)` with an actionable error listing what does not fit."""
    expected = module.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel/DDP
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_preview(mismatched)}")
    hint = (
        "check that --architecture names the class the weights were trained with, and that its constructor "
        "arguments (architecture_kwargs) match, e.g. layer sizes"
    )
    if problems:
        raise StateDictMismatchError(
            f"the weights in {source} do not fit {type(module).__name__}: " + "; ".join(problems), hint
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise StateDictMismatchError(f"the weights in {source} do not fit {type(module).__name__}: {e}", hint) from e


def _load_safetensors_file(path: Path, options: LoadOptions, factory: ArchitectureFactory | str | None) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = read_safetensors_header(path)
    try:
        state = load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise CorruptModelError(
            f"{path} is not a readable SafeTensors file: {e}",
            "the file is truncated or corrupt: re-export it or download it again",
        ) from e
    module = _module_from_state_dict(path, state, options, factory)
    metadata = {"state_dict_tensors": len(state), "safetensors_metadata": header.get("__metadata__", {})}
    return LoadedModel(module=module, format="safetensors", source=path, input_spec=None, metadata=metadata)


# -- Hugging Face --------------------------------------------------------------------------------------


def _load_hf_folder(path: Path, options: LoadOptions) -> LoadedModel:
    import transformers
    from safetensors import SafetensorError
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptModelError(
            f"{path / 'config.json'} is not valid JSON: {e}", "save the model again with save_pretrained"
        ) from e
    if not isinstance(raw, dict):
        raise CorruptModelError(
            f"{path / 'config.json'} is not a JSON object", "save the model again with save_pretrained"
        )
    needs_code = "auto_map" in raw and raw.get("model_type") not in CONFIG_MAPPING
    if needs_code and not options.trust_pickle:
        raise UnsafePickleError(
            f"{path} needs its own Python code to load (config.json auto_map {_preview(list(raw['auto_map']))}, "
            f"model_type {raw.get('model_type')!r} unknown to transformers {transformers.__version__}); that code "
            "would run on this machine",
            TRUST_PICKLE_HINT + " (it enables transformers' trust_remote_code)",
        )
    for weights in sorted(path.glob("*.safetensors")):
        read_safetensors_header(weights)  # a clear "truncated" error instead of a deep loader failure

    try:
        config = transformers.AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=options.trust_pickle
        )
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedFormatError(
            f"transformers {transformers.__version__} cannot read {path / 'config.json'}: {_first_line(e)}",
            "check config.json has a model_type transformers knows (upgrade transformers for new models)",
        ) from e
    model_cls = _hf_model_class(config, raw, options.trust_pickle)
    try:
        model, info = model_cls.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            trust_remote_code=options.trust_pickle,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except pickle.UnpicklingError as e:
        imports = [g for b in sorted(path.glob("*.bin")) for g in pickle_globals(b) if not _is_tensor_global(g)]
        what = f"it imports {_preview(imports)}" if imports else _wo_reason(e)
        raise UnsafePickleError(
            f"the pytorch_model.bin weights in {path} hold more than tensors ({what}); transformers refuses to "
            "unpickle them because that can run arbitrary code",
            "in an environment you trust, load the model and save_pretrained it again: it writes model.safetensors",
        ) from e
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise CorruptModelError(
            f"{model_cls.__name__}.from_pretrained could not load {path}: {_first_line(e)}",
            "the weights are incomplete, corrupt or do not match config.json: save the model again with "
            "save_pretrained",
        ) from e
    # transformers fills weights missing from the checkpoint with random values and only logs it.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise StateDictMismatchError(
            f"the weights in {path} do not fit {type(model).__name__} built from its config.json: "
            f"{len(missing)} missing keys: {_preview(missing)}",
            "the weight files and config.json come from different models, or the files are incomplete: save the "
            "model again with save_pretrained",
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    metadata = {"hf_config": config.to_dict(), "hf_class": type(model).__name__, "hf_unexpected_keys": unexpected}
    return LoadedModel(
        module=model, format="hf-folder", source=path, input_spec=_hf_input_spec(model, config), metadata=metadata
    )


def _hf_model_class(config: Any, raw: dict[str, Any], trust: bool) -> Any:
    import transformers

    names = getattr(config, "architectures", None) or []
    if names and hasattr(transformers, names[0]):
        return getattr(transformers, names[0])
    if trust and names and isinstance(raw.get("auto_map"), dict):
        for auto_name, target in raw["auto_map"].items():
            ref = target[0] if isinstance(target, list) else target
            if isinstance(ref, str) and ref.endswith("." + names[0]) and hasattr(transformers, auto_name):
                return getattr(transformers, auto_name)
    return transformers.AutoModel


def _hf_input_spec(model: nn.Module, config: Any) -> InputSpec | None:
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input == "input_ids":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = getattr(text, "vocab_size", None)
        if not vocab:
            return None
        length = min(_HF_SEQUENCE_LENGTH, getattr(text, "max_position_embeddings", None) or _HF_SEQUENCE_LENGTH)
        spec = TensorSpec(name="input_ids", shape=[1, length], dtype="int64", high=int(vocab))
        return InputSpec(inputs=[spec], source="metadata")
    if main_input == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", None)
        if isinstance(size, int):
            height = width = size
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            height, width = size
        elif isinstance(size, dict) and {"height", "width"} <= size.keys():
            height, width = size["height"], size["width"]
        else:
            return None
        channels = getattr(vision, "num_channels", 3) or 3
        return InputSpec(
            inputs=[TensorSpec(name="pixel_values", shape=[1, int(channels), int(height), int(width)])],
            source="metadata",
        )
    return None


# -- ONNX ----------------------------------------------------------------------------------------------


def _load_onnx(onnx_path: Path, source: Path, fmt: ModelFormat) -> LoadedModel:
    import onnx
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    from robopt.tools.onnx_module import OnnxModule

    model = parse_onnx_model(onnx_path)
    if model is None:
        raise CorruptModelError(f"{onnx_path} is not a parseable ONNX model", "export or convert it again")
    try:
        onnx.checker.check_model(str(onnx_path))  # the path form also checks external data and >2 GB models
    except onnx.checker.ValidationError as e:
        raise CorruptModelError(
            f"{onnx_path} is an ONNX model but onnx.checker rejects it: {_first_line(e)}",
            f"re-export it (torch.onnx.export, tf2onnx) with an opset onnx {onnx.__version__} supports, and keep "
            "any .onnx.data file next to it",
        ) from e
    ort_failures = tuple(
        getattr(ort_errors, n)
        for n in ("Fail", "InvalidGraph", "NotImplemented", "InvalidArgument", "NoSuchFile", "InvalidProtobuf")
        if hasattr(ort_errors, n)
    )
    try:
        module = OnnxModule(onnx_path)
    except ort_failures as e:
        raise CorruptModelError(
            f"onnxruntime cannot run {onnx_path}: {_first_line(e)}",
            "re-export it with a lower opset or without custom operators",
        ) from e
    metadata: dict[str, Any] = {
        "ir_version": model.ir_version,
        "opset_import": {entry.domain or "ai.onnx": entry.version for entry in model.opset_import},
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "graph_inputs": module.input_names,
        "graph_outputs": [o.name for o in model.graph.output],
    }
    spec, note = _onnx_input_spec(model)
    if note:
        metadata["input_spec_note"] = note
    return LoadedModel(
        module=module, format=fmt, source=source, input_spec=spec, onnx_path=onnx_path, metadata=metadata
    )


def _onnx_input_spec(model: Any) -> tuple[InputSpec | None, str]:
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            return None, f"input {value.name!r} is not a tensor"
        tensor = value.type.tensor_type
        dtype = _ONNX_DTYPES.get(tensor.elem_type)
        if dtype is None:
            return None, f"input {value.name!r} has ONNX element type {tensor.elem_type}, which robopt cannot generate"
        # Symbolic or unknown dimensions (batch, sequence) become 1.
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tensor.shape.dim]
        specs.append(TensorSpec(name=value.name, shape=shape, dtype=dtype))
    return (InputSpec(inputs=specs, source="metadata"), "") if specs else (None, "the graph has no inputs")


# -- shared --------------------------------------------------------------------------------------------


def _resolve_input_spec(loaded: LoadedModel, options: LoadOptions) -> InputSpec | None:
    """Caller spec > caller shape > format metadata > the module's `input_spec` attribute > None."""
    if options.input_spec is not None:
        return options.input_spec
    if options.input_shape is not None:
        name = loaded.input_spec.inputs[0].name if loaded.input_spec and len(loaded.input_spec.inputs) == 1 else "input"
        return InputSpec(inputs=[TensorSpec(name=name, shape=list(options.input_shape))], source="caller")
    if loaded.input_spec is not None:
        return loaded.input_spec
    attribute = getattr(loaded.module, "input_spec", None)
    if isinstance(attribute, InputSpec):
        return attribute
    if isinstance(attribute, Mapping):
        try:
            return InputSpec.model_validate({"source": "model", **attribute})
        except ValueError as e:
            loaded.metadata["input_spec_note"] = f"the module's input_spec attribute is not a valid InputSpec: {e}"
    return None


def _qualified_name(factory: ArchitectureFactory) -> str:
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', repr(factory))}"


def _is_tensor_global(name: str) -> bool:
    return name.startswith(_TENSOR_GLOBAL_PREFIXES) or (name.startswith("torch.") and name.endswith("Storage"))


def _wo_reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines if line.startswith(("Unsupported", "WeightsUnpickler"))]
    return (detail or lines or ["no reason given"])[-1]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _preview(items: list[Any], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")
