"""HQQ 8/4/3/2-bit on a small MLP and on the zoo's reacher-policy: packed size, error against bits, pickling."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from robopt import zoo
from robopt.errors import TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.registry import ApplyContext, TechniqueResult, get_technique, parse_config
from robopt.tools.techniques.hqq_quant import bytes_per_weight, group_size_for, layer_class, quantize_linear
from tests.tools.test_techniques import analyze, serialized_size


def make_mlp(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)).eval()


MLP = make_mlp()
X = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))


def run_hqq(
    model: nn.Module, events: list | None = None, example: torch.Tensor = X[:1], **config: object
) -> TechniqueResult:
    technique = get_technique("hqq")
    progress = Progress(emit=events.append) if events is not None else Progress()
    context = ApplyContext(analysis=analyze(model, "mlp-policy"), example_inputs=(example,), progress=progress)
    return technique.apply(copy.deepcopy(model), parse_config(technique, config), context)


def relative_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = reference(x)
        return float((model(x) - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def per_bits() -> dict[int, TechniqueResult]:
    return {b: run_hqq(MLP, nbits=b, skip_head=False) for b in (8, 4, 3, 2)}


def test_every_linear_becomes_a_packed_hqq_layer(per_bits: dict[int, TechniqueResult]) -> None:
    for bits, result in per_bits.items():
        layers = [m for m in result.model.modules() if isinstance(m, layer_class())]
        assert len(layers) == 3 and not any(type(m) is nn.Linear for m in result.model.modules())
        packed = layers[1].W_q
        assert packed.dtype == (torch.int32 if bits == 3 else torch.uint8)
        # 8/4/2-bit: 1/2/4 values per byte; 3-bit: 10 values per int32 (rows padded to a multiple of 10)
        expected = {8: 256 * 256, 4: 256 * 256 // 2, 2: 256 * 256 // 4, 3: 4 * ((256 * 256 // 64 + 9) // 10) * 64}
        assert packed.numel() * packed.element_size() == expected[bits]
        assert result.details["layers_quantized"] == 3 and result.details["layers_skipped"] == []
        assert result.backend.startswith("hqq 0.2") and "CPU" in result.backend


def test_size_shrinks_by_the_expected_factor(per_bits: dict[int, TechniqueResult]) -> None:
    weights = 64 * 256 + 256 * 256 + 256 * 8
    biases = 256 + 256 + 8
    fp32 = serialized_size(MLP)
    for bits, result in per_bits.items():
        expected = weights * bytes_per_weight(bits, 64) + 4 * biases
        assert result.details["linear_bytes_before"] == 4 * (weights + biases)
        assert result.details["linear_bytes_after"] == pytest.approx(expected, rel=0.02)
        size = serialized_size(result.model)  # what torch.save writes: packed tensors plus pickle overhead
        assert expected < size < expected * 1.05 + 12_000
    # measured: fp32 ~350 KB; 8-bit 3.5x, 4-bit 6x, 3-bit 7x, 2-bit 9x smaller (scales/zeros: 1 bit per weight)
    assert fp32 / serialized_size(per_bits[8].model) > 3.2
    assert fp32 / serialized_size(per_bits[4].model) > 5.5
    assert fp32 / serialized_size(per_bits[2].model) > 8.5


def test_error_grows_as_bits_drop(per_bits: dict[int, TechniqueResult]) -> None:
    errors = [relative_error(per_bits[b].model, MLP, X) for b in (8, 4, 3, 2)]
    assert errors == sorted(errors) and len(set(errors)) == 4
    assert errors[0] < 0.01 and errors[1] < 0.15 and errors[3] < 0.8


def test_survives_torch_save_and_load_in_a_fresh_process(per_bits: dict[int, TechniqueResult], tmp_path: Path) -> None:
    for bits in (4, 3):
        model = per_bits[bits].model
        torch.save(model, tmp_path / f"m{bits}.pt")
        torch.save(X, tmp_path / "x.pt")
        with torch.no_grad():
            expected = model(X)
        # A fresh interpreter has never constructed an HQQ layer: the forward must come from the class itself.
        code = (
            "import sys, torch; d = sys.argv[1]; "
            f"m = torch.load(d + '/m{bits}.pt', weights_only=False); x = torch.load(d + '/x.pt'); "
            f"torch.save(m(x).detach(), d + '/y{bits}.pt')"
        )
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
        assert torch.equal(torch.load(tmp_path / f"y{bits}.pt"), expected)


def test_in_process_pickle_round_trip_and_grad_mode(per_bits: dict[int, TechniqueResult]) -> None:
    model = per_bits[2].model
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = X.clone().requires_grad_(True)  # gradients flow to the input through the dequantized weights
    out = loaded(x)
    out.sum().backward()
    assert x.grad is not None and torch.equal(out.detach(), model(X).detach())


def test_skip_head_keeps_the_head_in_float_and_progress_is_reported() -> None:
    events: list[dict] = []
    result = run_hqq(MLP, events, nbits=4)
    assert type(result.model[4]) is nn.Linear and result.details["layers_skipped"] == ["4"]
    assert isinstance(result.model[0], layer_class()) and isinstance(result.model[2], layer_class())
    stages = [e for e in events if e.get("stage") == "hqq"]
    assert stages[0]["current"] == 0 and stages[-1]["current"] == stages[-1]["total"] == 2


def test_reacher_policy_keeps_its_actions(data_dir: Path) -> None:
    weights, card = zoo.resolve("reacher-policy", data_dir / "zoo")
    policy = zoo.load_card_model(weights, card).eval()
    states = torch.randn(256, 10, generator=torch.Generator().manual_seed(2))
    errors = {}
    for bits in (8, 4, 2):
        result = run_hqq(policy, example=states[:1], nbits=bits)
        assert type(result.model.net[4]) is nn.Linear  # the action head stays fp32 (skip_head)
        assert isinstance(result.model.net[0], layer_class()) and isinstance(result.model.net[2], layer_class())
        errors[bits] = relative_error(result.model, policy, states)
        # measured: 281 KB fp32 -> 89 / 55 / 38 KB (the 10-wide first layer gets one group per 10-weight row)
        assert serialized_size(policy) / serialized_size(result.model) > {8: 3.0, 4: 4.5, 2: 6.5}[bits]
    # measured relative action error on random states: 0.002 / 0.065 / 0.31
    assert errors[8] < 0.01 < errors[2] and errors[8] < errors[4] < errors[2]


def test_layers_hqq_cannot_pack_stay_float() -> None:
    # 10 -> 2 head: 20 weights, neither 64-groups nor one group per row (2 rows) pack four 2-bit values a byte.
    assert group_size_for(nn.Linear(10, 2), 2, 64, 1) is None
    assert group_size_for(nn.Linear(10, 2), 8, 64, 1) == 10  # 8-bit needs no packing: one group per row
    assert group_size_for(nn.Linear(96, 4), 4, 64, 1) == 96
    assert quantize_linear(nn.Linear(10, 2), 2, 64, 1) is None
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    result = run_hqq(model, nbits=2, skip_head=False)
    assert result.details["layers_skipped"] == ["2"] and type(result.model[2]) is nn.Linear


def test_already_quantized_model_is_refused(per_bits: dict[int, TechniqueResult]) -> None:
    with pytest.raises(TechniqueNotApplicableError, match="already quantized"):
        run_hqq(per_bits[4].model, nbits=4)


def test_milder_chain_and_config_validation() -> None:
    technique = get_technique("hqq")
    chain, config = [], parse_config(technique, {"nbits": 2})
    while config is not None:
        chain.append(config.nbits)
        config = technique.milder(config)
    assert chain == [2, 3, 4, 8]
    for bad in ({"nbits": 5}, {"group_size": 60}, {"axis": 2}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            parse_config(technique, bad)
    config = parse_config(technique, {"nbits": 3, "group_size": 128, "axis": 0})
    assert parse_config(technique, config.model_dump(mode="json")) == config


def test_axis_zero_works_and_estimates_follow_bits() -> None:
    result = run_hqq(MLP, nbits=4, axis=0, skip_head=False)
    assert relative_error(result.model, MLP, X) < 0.15
    technique, analysis = get_technique("hqq"), analyze(MLP, "mlp-policy")
    ratios = [technique.estimate(analysis, parse_config(technique, {"nbits": b})).size_ratio for b in (8, 4, 2)]
    assert ratios == sorted(ratios, reverse=True) and ratios[0] < 0.4
    assert technique.estimate(analysis, parse_config(technique, {})).speedup < 1.0
