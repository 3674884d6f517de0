"""An AutoRound-quantized tiny-lm exports as a Hugging Face folder that plain transformers (with auto-round installed,
without robopt) reloads to exactly the artifact's logits.

Measured before the hf writer went through export_hf_folder: max |export - artifact| = 0.0098 (1 fp16 ulp), because
save_pretrained wrote dtype float16 into config.json and the reload then built its rotary tables in float16 instead of
casting float32 ones. With the load dtype kept the difference is 0, so the test asks for equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robopt import zoo
from robopt.calibration import CalibrationSet
from robopt.export import export_artifact
from robopt.tools.loading import LoadOptions, load_model
from robopt.tools.registry import ApplyContext, get_technique
from tests.export.conftest import Stored
from tests.export.helpers import minimal_analysis, read_json, robopt_outputs, run_without_robopt, store_module

TEXT = "def parse(path): return open(path).read().split()"
SEQUENCE = 32
# Runs after the export's own load snippet (which defines model and tokenizer) in a process without robopt.
LOGITS = (
    "import torch\n"
    f"ids = tokenizer({TEXT!r}, return_tensors='pt').input_ids\n"
    "assert ids.tolist() == data['ids'].tolist(), (ids.tolist(), data['ids'].tolist())\n"
    "with torch.no_grad():\n"
    "    result = model(ids).logits.float().numpy()\n"
)


@pytest.fixture(scope="module")
def autoround_lm(data_dir: Path, export_store) -> Stored:
    """tiny-lm after robopt's autoround technique, W4 g32 with one tuning step on one window of its training text
    (the cheapest setting that still runs auto-round's tuning; ~3 s), stored as the pipeline stores it."""
    from robopt.tools.hf_export import load_tokenizer
    from robopt.zoo.tiny_lm import training_tokens

    folder, card = zoo.resolve("tiny-lm", data_dir / "zoo")
    model = load_model(folder, LoadOptions(input_spec=card.input_spec)).module
    tokens = training_tokens(load_tokenizer(folder))

    def calibration(n: int) -> CalibrationSet:
        return CalibrationSet(
            tuple((tokens[i * SEQUENCE : (i + 1) * SEQUENCE].unsqueeze(0),) for i in range(n)), "stdlib"
        )

    technique = get_technique("autoround")
    config = technique.config_cls(bits=4, group_size=32, iters=1, nsamples=1)
    result = technique.apply(model, config, ApplyContext(minimal_analysis(model), calibration=calibration))
    assert result.details["layers_quantized"] == 14
    ref = store_module(export_store, result.model, card.input_spec, technique="autoround")
    return Stored(ref, export_store, card.input_spec)


def test_autoround_hf_folder_reloads_without_robopt_bit_for_bit(autoround_lm: Stored, tmp_path: Path) -> None:
    result = export_artifact(autoround_lm.ref, tmp_path / "out", "hf", store=autoround_lm.store)
    assert result.format == "hf" and result.verified
    assert result.max_abs_diff == 0.0  # robopt's own fresh-process check on the artifact's input spec
    config = read_json(tmp_path / "out" / "config.json")
    assert config["quantization_config"]["quant_method"] == "auto-round"
    assert config["quantization_config"]["bits"] == 4
    assert config["dtype"] == "float32"  # the load dtype: auto-round casts to float16 after loading, as for robopt
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(result.files)
    assert 'AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")' in result.load_snippet

    # Independently of robopt's verification: the user's snippet, in a process that cannot import robopt.
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tmp_path / "out")(TEXT, return_tensors="pt").input_ids
    got = run_without_robopt(result.load_snippet, LOGITS, {"ids": ids.numpy()}, tmp_path)
    want = robopt_outputs(autoround_lm.store, autoround_lm.ref, ids)
    assert want.dtype == torch.float16  # auto-round's CPU kernel runs the model in float16
    want = want.float().numpy()
    assert got.shape == want.shape == (1, ids.shape[1], 2048)
    assert np.array_equal(got, want), f"max |diff| {np.abs(got - want).max()}"
