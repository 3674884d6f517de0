"""Hugging Face export: a save_pretrained folder (quantization_config and tokenizer included) for from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from robopt.errors import UnsupportedFormatError
from robopt.export.errors import NotExportableError
from robopt.export.job import ExportJob, Written
from robopt.export.quantization import TORCH_AO, is_hf_model
from robopt.tools.hf_export import export_hf_folder

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")

# Checked in order: the first Auto class whose mapping names this model's class loads it.
_AUTO_MAPPINGS = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)


def loader_class(model: nn.Module) -> str:
    """The transformers class that reloads `model`: an Auto class when one maps to it, else its own class."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    model_type = getattr(model.config, "model_type", None)
    for auto, mapping_name in _AUTO_MAPPINGS:
        value = getattr(modeling_auto, mapping_name, {}).get(model_type)
        if value == name or (isinstance(value, (tuple, list)) and name in value):
            return auto
    return name


def tokenizer_source(model: nn.Module, given: Path | None) -> Path | None:
    """The folder to take the tokenizer from: the one given, else the folder the model was loaded from."""
    candidates = [given] if given is not None else []
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if name_or_path:
        candidates.append(Path(name_or_path))
    for folder in candidates:
        if folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    return None


def _refuse_unsupported(job: ExportJob) -> None:
    if not is_hf_model(job.model):
        what = "an ONNX graph" if job.ref.format == "onnx" else f"a {type(job.model).__name__}"
        raise NotExportableError(
            f"not exportable as a Hugging Face folder: the artifact is {what}, not a transformers PreTrainedModel",
            "use --format onnx" if job.ref.format == "onnx" else "use --format torchscript or onnx (or state-dict)",
        )
    census = job.census
    if census.quantized and census.hf_quantizer is None:
        if TORCH_AO in census.libraries:
            reason = (
                "it holds torch.ao dynamic INT8 layers, which transformers cannot save or reload (save_pretrained "
                "fails on their packed weights, and from_pretrained would rebuild fp32 Linear layers)"
            )
        else:
            reason = (
                f"its layers were quantized by {', '.join(census.libraries)} outside transformers (no "
                "quantization_config), so from_pretrained would not rebuild them"
            )
        raise NotExportableError(
            f"not exportable as a Hugging Face folder: {reason}",
            "use --format torchscript (traced and verified), or export the unquantized parent artifact as hf and "
            "quantize after loading",
        )
    quantizer = getattr(job.model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_serializable():
        raise NotExportableError(
            f"not exportable as a Hugging Face folder: transformers cannot serialize {type(quantizer).__name__} models",
            "export the unquantized parent artifact as hf and quantize after loading",
        )


def quantized_by_auto_round(model: nn.Module) -> bool:
    """True when transformers holds this model through auto-round's quantizer (robopt's `autoround` and `gptq`
    results, and auto-round checkpoints loaded from a folder)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) == "auto-round"


def _save_model(job: ExportJob, folder: Path, tokenizer: Path | None) -> list[str]:
    """Write the model's weights and config.json into `folder` (auto-round models: the tokenizer files too);
    returns notes for the user."""
    if not quantized_by_auto_round(job.model):
        job.model.save_pretrained(folder)
        return []
    # auto-round loads a checkpoint in config.json's dtype and then casts the whole model to its kernel's float16:
    # export_hf_folder keeps the dtype the artifact was loaded with, so a reload takes the same path (a plain
    # save_pretrained writes float16, and the rotary tables then round differently: outputs 1 fp16 ulp off).
    export_hf_folder(job.model, folder, tokenizer_dir=tokenizer)
    dtype = json.loads((folder / "config.json").read_text()).get("dtype")
    return [
        f"config.json keeps the dtype the model was loaded in ({dtype}); auto-round casts it to float16 after loading"
    ]


def write_hf(job: ExportJob, folder: Path) -> Written:
    """model.save_pretrained(folder) plus the tokenizer; the snippet reloads it with an Auto class."""
    _refuse_unsupported(job)
    from robopt.tools.techniques._hf_quant import restore_bnb_cpu_layout

    # bitsandbytes 0.50 repacks 4-bit weights on CPU at the first forward and unpacks them wrongly at save:
    # put the saved layout back (a no-op for other models).
    restore_bnb_cpu_layout(job.model)
    source = tokenizer_source(job.model, job.tokenizer_dir)
    try:
        notes = _save_model(job, folder, source)
    except (RuntimeError, ValueError, TypeError, AttributeError, NotImplementedError, UnsupportedFormatError) as e:
        reason = e.message if isinstance(e, UnsupportedFormatError) else f"{type(e).__name__}: {e}"
        raise NotExportableError(
            f"not exportable as a Hugging Face folder: saving it failed: {reason}",
            "use --format torchscript",
        ) from e
    if job.census.hf_quantizer:
        config = getattr(job.model.config, "quantization_config", None)
        method = getattr(config, "quant_method", None) or type(config).__name__
        method = getattr(method, "value", method)
        notes.insert(0, f"quantized through transformers ({method}): config.json carries its quantization_config")
    loader = loader_class(job.model)
    device = ', device_map="cpu"' if job.census.hf_quantizer else ""
    snippet = f"from transformers import {loader}"
    body = f"\n\nmodel = {loader}.from_pretrained(folder{device}).eval()\n"
    if source is not None:
        if not quantized_by_auto_round(job.model):  # export_hf_folder copied the files already
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(source).save_pretrained(folder)
        snippet += ", AutoTokenizer"
        body += "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
        notes.append(f"tokenizer copied from {source}")
    else:
        notes.append("no tokenizer folder is known for this model: add the tokenizer files to the folder yourself")
    return Written(snippet + body, runner="hf", compare="first", notes=notes)
