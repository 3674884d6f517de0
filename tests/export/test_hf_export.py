"""tiny-lm (a Hugging Face LlamaForCausalLM folder) exports as a save_pretrained folder that plain transformers
reloads; INT8 from torch.ao is refused there (TorchScript instead); bitsandbytes via transformers keeps its config."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from robopt import zoo
from robopt.export import NotExportableError, export_artifact
from robopt.tools.example_inputs import make_example_inputs
from robopt.tools.loading import LoadOptions, load_model
from tests.export.conftest import Stored
from tests.export.helpers import apply_technique, read_json, robopt_outputs, run_without_robopt, store_module

TEXT = "the robot picks up the red ball"
# Runs after the export's own load snippet (which defines model and tokenizer) in a process without robopt.
GENERATE = (
    "import torch\n"
    f"ids = tokenizer({TEXT!r}, return_tensors='pt').input_ids\n"
    "assert ids.tolist() == data['ids'].tolist(), (ids.tolist(), data['ids'].tolist())\n"
    "with torch.no_grad():\n"
    "    result = model(ids).logits.numpy()\n"
)


@pytest.fixture(scope="module")
def tiny_lm_folder(data_dir: Path) -> Path:
    return zoo.resolve("tiny-lm", data_dir / "zoo")[0]


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_folder: Path, data_dir: Path, export_store) -> Stored:
    _, card = zoo.resolve("tiny-lm", data_dir / "zoo")
    model = load_model(tiny_lm_folder, LoadOptions(input_spec=card.input_spec)).module
    return Stored(store_module(export_store, model, card.input_spec), export_store, card.input_spec)


def token_ids(folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt").input_ids


def test_tiny_lm_hf_folder_reloads_with_plain_transformers(tiny_lm, tiny_lm_folder, tmp_path):
    result = export_artifact(tiny_lm.ref, tmp_path / "out", "auto", store=tiny_lm.store)
    assert result.format == "hf" and result.verified and result.max_abs_diff <= 1e-5
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(result.files)
    assert "AutoModelForCausalLM.from_pretrained(folder)" in result.load_snippet
    assert any(str(tiny_lm_folder) in n for n in result.notes)  # the tokenizer came from the zoo folder
    ids = token_ids(tmp_path / "out")
    got = run_without_robopt(result.load_snippet, GENERATE, {"ids": ids.numpy()}, tmp_path)
    want = robopt_outputs(tiny_lm.store, tiny_lm.ref, ids).numpy()
    assert got.shape == want.shape == (1, ids.shape[1], 2048)
    assert np.abs(got - want).max() <= 1e-5
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_torch_ao_int8_lm_is_refused_as_hf_and_auto_traces_it(tiny_lm, tmp_path):
    model = tiny_lm.store.load(tiny_lm.ref)
    quantized = apply_technique("quantize_dynamic_int8", copy.deepcopy(model), make_example_inputs(tiny_lm.spec))
    ref = store_module(tiny_lm.store, quantized.model, tiny_lm.spec, technique="quantize_dynamic_int8")
    with pytest.raises(NotExportableError) as error:
        export_artifact(ref, tmp_path / "hf", "hf", store=tiny_lm.store)
    assert "torch.ao dynamic INT8" in error.value.message and "--format torchscript" in error.value.hint
    result = export_artifact(ref, tmp_path / "auto", "auto", store=tiny_lm.store)
    assert result.format == "torchscript" and result.verified and result.max_abs_diff <= 1e-5
    assert "auto chose torchscript" in result.notes[0]


def test_bitsandbytes_4bit_through_transformers_keeps_its_quantization_config(tiny_lm, tiny_lm_folder, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_lm_folder, quantization_config=config, dtype=torch.float32, device_map="cpu"
    ).eval()
    ref = store_module(tiny_lm.store, model, tiny_lm.spec, technique="bnb-4bit")
    result = export_artifact(ref, tmp_path / "out", "auto", store=tiny_lm.store)
    assert result.format == "hf" and result.verified and result.max_abs_diff <= 1e-5
    quantization = read_json(tmp_path / "out" / "config.json")["quantization_config"]
    assert quantization["quant_method"] == "bitsandbytes" and quantization["load_in_4bit"] is True
    # smaller than the fp32 folder: the packed 4-bit weights were saved, not dequantized ones
    fp32_bytes = (tiny_lm_folder / "model.safetensors").stat().st_size
    assert (tmp_path / "out" / "model.safetensors").stat().st_size < fp32_bytes
