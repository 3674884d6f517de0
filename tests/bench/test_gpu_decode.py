"""The GPU decode bench's own logic, on a 2-layer model on CPU (the bench itself runs only where a GPU is lent)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_decode.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_static_decode_step_matches_transformers_and_quantized_layers_are_checked(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "gpu_decode.json"
    rc = _load().main(
        ["--tiny", "--device", "cpu", "--context", "10", "--reps", "2", "--out", str(out),
         "--formats", "bf16,bnb_int8_no_outliers,bnb_nf4"]
    )  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    bf16, int8, nf4 = (result["formats"][k] for k in ("bf16", "bnb_int8_no_outliers", "bnb_nf4"))
    # the graph-capturable step computes what LlamaForCausalLM.forward computes (fp32 on CPU)
    assert bf16["step_vs_hf_rel_err"] < 1e-4
    assert "error" not in int8 and "error" not in nf4
    # quantized layers are compared with their originals: int8 is close, 4-bit further off, neither broken
    assert 0 < int8["layer_checks"]["rows1_max_rel_err"] < 0.03
    assert 0.03 < nf4["layer_checks"]["rows1_max_rel_err"] < 0.2
    # bytes read per step shrink with the weight format
    assert nf4["step_bytes"] < int8["step_bytes"] < bf16["step_bytes"]
    assert int8["step_bytes_vs_bf16"] == pytest.approx(int8["step_bytes"] / bf16["step_bytes"])


def test_refuses_without_cuda_and_unknown_formats(tmp_path, capsys):
    module = _load()
    if not module.torch.cuda.is_available():
        assert module.main(["--out", str(tmp_path / "x.json")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["--device", "cpu", "--out", str(tmp_path / "x.json"), "--formats", "bf16,int3"])
