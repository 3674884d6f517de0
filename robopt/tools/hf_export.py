"""Hugging Face model folders: find the folder (and tokenizer) a transformers model came from, load a quantized
checkpoint folder back, and export a model as a folder that plain `AutoModelForCausalLM.from_pretrained` loads.

Quantized exports carry their `quantization_config` in config.json; transformers then picks the quantizer (for
AutoRound checkpoints that is auto-round's, which must be installed where the folder is loaded). Models packed in the
GPTQ layout can also be written as GPTQ v1 checkpoints (quant_method "gptq") for GPTQ tooling.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robopt.errors import CorruptModelError, UnsupportedFormatError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def source_folder(model: nn.Module) -> Path | None:
    """The save_pretrained folder a transformers model was loaded from (its `name_or_path`), if it still exists."""
    config = getattr(model, "config", None)
    for candidate in (getattr(model, "name_or_path", None), getattr(config, "_name_or_path", None)):
        if candidate and Path(str(candidate)).is_dir():
            return Path(str(candidate))
    return None


def tokenizer_folder(model: nn.Module) -> Path | None:
    """The model's source folder when it holds a tokenizer (zoo and user HF folders do), else None."""
    folder = source_folder(model)
    if folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES[:2]):
        return folder
    return None


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def set_source_folder(model: nn.Module, folder: Path | str | None) -> None:
    """Point `name_or_path` at `folder`: a model reloaded from a scratch folder keeps pointing at its origin,
    so later steps (evaluators, exports, other techniques) still find its tokenizer."""
    if folder is None:
        return
    model.name_or_path = str(folder)  # type: ignore[assignment]
    config = getattr(model, "config", None)
    if config is not None:
        config._name_or_path = str(folder)


def load_quantized_folder(model_cls: type, folder: Path, *, gptq_format: bool = False) -> nn.Module:
    """Load a quantized checkpoint folder on CPU with transformers (eval mode).

    AutoRound-format folders load as they are. GPTQ-format folders (quant_method "gptq") need optimum plus
    gptqmodel or auto-gptq in plain transformers; auto-round reads them too, which is what
    `quantization_config=AutoRoundConfig(backend="auto")` selects.
    """
    kwargs: dict[str, Any] = {"device_map": "cpu", "local_files_only": True, "output_loading_info": True}
    if gptq_format:
        from transformers import AutoRoundConfig

        kwargs["quantization_config"] = AutoRoundConfig(backend="auto")
    try:
        model, info = model_cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError, NotImplementedError, ImportError) as e:
        raise CorruptModelError(
            f"the quantized checkpoint in {folder} does not load with {model_cls.__name__}.from_pretrained: "
            f"{type(e).__name__}: {e}",
            "check that auto-round is installed and the checkpoint's quantization_config is one it reads",
        ) from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers fills them with random values and only logs it
        raise CorruptModelError(
            f"the quantized checkpoint in {folder} loaded without {len(missing)} weights ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): the CPU kernel chosen for it does not read its packing",
            "use a packing auto-round runs on CPU (symmetric int weights, GPTQ/auto-round layout)",
        )
    return model.eval()


def export_hf_folder(
    model: nn.Module, out_dir: Path | str, *, tokenizer_dir: Path | str | None = None, gptq: bool = False
) -> Path:
    """Write `model` (a transformers PreTrainedModel, quantized or not) as a save_pretrained folder, with the
    tokenizer of its source folder (or `tokenizer_dir`), atomically: the folder appears complete or not at all.

    Quantized models keep their `quantization_config` in config.json. config.json's `dtype` is the dtype the model
    was loaded with: auto-round loads a checkpoint in that dtype and then casts the whole model (rotary tables
    included) to its kernel's compute dtype, so a reload takes the same path as the model robopt evaluated.

    `gptq=True` (models packed in the GPTQ layout: `autoround` and `gptq` results) writes a GPTQ v1 checkpoint
    instead (quant_method "gptq", g_idx tensors) for GPTQ tooling (gptqmodel, vLLM, transformers + optimum); plain
    transformers then needs optimum + gptqmodel, or `quantization_config=AutoRoundConfig(backend="auto")`.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise UnsupportedFormatError(
            f"only Hugging Face transformers models export as a model folder; this is a {type(model).__name__}",
            "export plain PyTorch models with torch.save or ONNX instead",
        )
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UnsupportedFormatError(f"{out} already exists and is not an empty folder", "choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    loaded_as = getattr(model.config, "dtype", None)
    try:
        try:
            model.save_pretrained(str(tmp))
        finally:
            # save_pretrained sets it to the runtime dtype; the caller's model keeps its own
            model.config.dtype = loaded_as
        _require_quantization_config(model, tmp / "config.json")
        if gptq:
            _as_gptq_checkpoint(tmp)
        if is_quantized(model) and isinstance(loaded_as, torch.dtype):
            _set_config_dtype(tmp / "config.json", loaded_as)
        source = Path(tokenizer_dir) if tokenizer_dir is not None else tokenizer_folder(model)
        if source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_quantized(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return getattr(model, "hf_quantizer", None) is not None or getattr(config, "quantization_config", None) is not None


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    config = json.loads(config_path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _require_quantization_config(model: nn.Module, config_path: Path) -> None:
    if is_quantized(model) and "quantization_config" not in json.loads(config_path.read_text()):
        raise UnsupportedFormatError(
            f"transformers wrote no quantization_config for this quantized {type(model).__name__}",
            "its quantization method cannot be saved as a Hugging Face folder; store the robopt artifact instead",
        )


GPTQ_PACKINGS = ("auto_round:auto_gptq", "auto_round:gptq", "auto_round:gptqmodel")


def _as_gptq_checkpoint(folder: Path) -> None:
    """Turn a saved auto-round folder whose tensors are in the GPTQ v1 layout into a GPTQ v1 checkpoint: the
    quantization_config GPTQ loaders read, and the g_idx tensors they expect (trivial: robopt never reorders)."""
    from safetensors.torch import load_file, save_file

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("packing_format") not in GPTQ_PACKINGS or not quant.get("sym", True):
        raise UnsupportedFormatError(
            f"this model is not packed in the GPTQ layout (quantization_config {quant.get('quant_method')!r}, "
            f"packing {quant.get('packing_format')!r}, sym {quant.get('sym')})",
            "GPTQ export is for symmetric `autoround` and `gptq` results; export it without --gptq",
        )
    bits, group_size = int(quant["bits"]), int(quant["group_size"])
    for weights in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(weights))
        for name in [k for k in tensors if k.endswith(".qweight")]:
            prefix = name.removesuffix(".qweight")
            in_features = tensors[name].shape[0] * 32 // bits
            positions = torch.arange(in_features, dtype=torch.int32)
            tensors[f"{prefix}.g_idx"] = positions // group_size if group_size > 0 else positions * 0
        save_file(tensors, str(weights), metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "sym": True,
        "desc_act": False,
        "checkpoint_format": "gptq",
        "lm_head": False,
        "damp_percent": 0.01,
        "true_sequential": False,
        "provider": "robopt (from an auto-round GPTQ-layout model)",
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "quantization_config.json").unlink(missing_ok=True)
