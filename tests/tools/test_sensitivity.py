"""Per-layer sensitivity: one layer HQQ-quantized at a time, the model's output error measured on real inputs."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from robopt.calibration import CalibrationSet
from robopt.errors import CancelledError, TechniqueNotApplicableError
from robopt.progress import Progress
from robopt.tools.sensitivity import MAX_SQNR_DB, layer_roles, layer_sensitivity, sensitivity_table
from robopt.tools.techniques.hqq_quant import quantize_linear
from robopt.zoo.mini_vla import MiniVLA
from robopt.zoo.openvla import OpenVLA


class ScaledResidualMLP(nn.Module):
    """x -> x + s_i * relu(W_i x) for branches with different scales s_i, then a head.

    Quantization noise of branch i reaches the output scaled by s_i, so its sensitivity grows with s_i^2: a
    model whose layers differ in importance by construction, for sensitivity ranking and mixed precision.
    """

    def __init__(self, scales: tuple[float, ...] = (2.0, 1.0, 0.3, 0.1), width: int = 128, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Linear(32, width)
            self.branches = nn.ModuleList(nn.Linear(width, width) for _ in scales)
            self.head = nn.Linear(width, 8)
        self.scales = scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for scale, branch in zip(self.scales, self.branches, strict=True):
            h = h + scale * torch.relu(branch(h))
        return self.head(h)


def with_fragile_layer() -> nn.Sequential:
    """An MLP whose middle layer has a huge outlier weight in every row, on an input that is always zero.

    The outliers do not change the float output, but they stretch every quantization group they sit in, so the
    other weights of that layer lose almost all their resolution: the layer is fragile at every bit width.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(32, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, 128),
            nn.ReLU(),
            nn.Linear(128, 8),
        )
    with torch.no_grad():
        model[0].weight[0] = 0.0  # unit 0 of the first hidden layer is dead: relu(-1) = 0
        model[0].bias[0] = -1.0
        model[2].weight[:, 0] = 40.0  # the outliers, on the dead input
    return model.eval()


def samples(n: int = 16, features: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, features, generator=g),) for _ in range(n)]


def worst_first(results: list) -> list[str]:
    return [row["name"] for row in sensitivity_table(results)]


def test_the_fragile_layer_is_ranked_most_sensitive() -> None:
    model = with_fragile_layer()
    results = layer_sensitivity(model, samples(), (8, 4, 2))
    by_name = {r.name: r for r in results}
    assert worst_first(results)[0] == "2"
    for bits, margin in ((8, 20), (4, 10), (2, 3)):  # dB
        others = [r.sqnr_db[bits] for r in results if r.name != "2"]
        assert by_name["2"].sqnr_db[bits] < min(others) - margin
    # measured: the fragile layer sits near 7 dB at every width; the others near 50 / 26 / 12 dB at 8 / 4 / 2 bits
    assert by_name["2"].sqnr_db[8] < 20 and by_name["0"].sqnr_db[8] > 40


def test_sensitivity_follows_how_strongly_a_layer_feeds_the_output() -> None:
    model = ScaledResidualMLP().eval()
    results = layer_sensitivity(model, samples(), (4, 2))
    branch = {r.name: r for r in results if r.name.startswith("branches.")}
    for bits in (4, 2):  # branch scales 2, 1, 0.3, 0.1: ordered by output noise power
        errors = [branch[f"branches.{i}"].relative_error[bits] for i in range(4)]
        assert errors == sorted(errors, reverse=True)
    for r in results:  # fewer bits, more output error, for every layer
        assert r.relative_error[2] > r.relative_error[4] > 0
        assert r.sqnr_db[4] == pytest.approx(-10 * torch.log10(torch.tensor(r.relative_error[4])).item(), abs=1e-4)


def test_measured_error_is_the_real_hqq_layer_error() -> None:
    """The fake quantization gives exactly the output of the deployed HQQ layer."""
    model = ScaledResidualMLP().eval()
    batch = samples(8)
    (row,) = [r for r in layer_sensitivity(model, batch, (3,)) if r.name == "branches.1"]
    with torch.no_grad():
        reference = [model(*s) for s in batch]
        model.branches[1] = quantize_linear(model.branches[1], 3, 64, 1)
        noise = sum(float(((model(*s) - r) ** 2).sum()) for s, r in zip(batch, reference, strict=True))
    signal = sum(float((r**2).sum()) for r in reference)
    assert row.relative_error[3] == pytest.approx(noise / signal, rel=1e-4)


def test_deterministic_and_the_model_is_left_unchanged() -> None:
    model = ScaledResidualMLP()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = CalibrationSet(tuple(samples()), "test")
    first = layer_sensitivity(model, calibration, (8, 2))
    second = layer_sensitivity(model, calibration, (8, 2))
    assert [r.to_dict() for r in first] == [r.to_dict() for r in second]
    assert model.training  # eval mode only while measuring
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [r.params for r in first] == [32 * 128, *[128 * 128] * 4, 128 * 8]


def test_progress_per_layer_and_cancellation_restores_the_weights() -> None:
    model = ScaledResidualMLP().eval()
    events: list[dict] = []
    layer_sensitivity(model, samples(4), (4,), Progress(emit=events.append, min_interval_s=0))
    steps = [e["current"] for e in events if e.get("stage") == "sensitivity"]
    assert steps == list(range(7))  # 0, then one event per layer (stem, 4 branches, head)

    cancel = threading.Event()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def cancel_after_two_layers(event: dict) -> None:
        if event.get("stage") == "sensitivity" and event.get("current") == 2:
            cancel.set()

    with pytest.raises(CancelledError):
        progress = Progress(emit=cancel_after_two_layers, cancel=cancel, min_interval_s=0)
        layer_sensitivity(model, samples(4), (4,), progress)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_roles_of_mini_vla_layers() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MiniVLA().eval()
    example = (torch.rand(1, 3, 64, 64), torch.randint(1, 10, (1, 6)))
    roles = layer_roles(model, example)
    assert {n: r for n, r in roles.items() if not n.startswith("blocks.")} == {
        "vision.0": "vision_tower",
        "vision.2": "vision_tower",
        "vision.4": "vision_tower",
        "projector.1": "projector",
        "projector.3": "projector",
        "film": "other",
        "head": "action_head",
    }
    assert {r for n, r in roles.items() if n.startswith("blocks.")} == {"backbone"}
    results = layer_sensitivity(model, [example], (4,), include_conv=True)
    assert {r.layer_type for r in results} == {"Linear", "Conv2d"}
    assert {r.name: r.role for r in results}["head"] == "action_head"


def test_roles_of_an_openvla_shaped_model() -> None:
    sizes = {
        "image_size": 28,
        "dino_hidden": 32,
        "dino_layers": 2,
        "dino_heads": 2,
        "dino_registers": 1,
        "siglip_hidden": 32,
        "siglip_layers": 2,
        "siglip_heads": 2,
        "siglip_intermediate": 64,
        "llm_hidden": 64,
        "llm_layers": 1,
        "llm_heads": 2,
        "llm_intermediate": 128,
        "text_vocab": 300,
        "action_bins": 16,
        "action_dims": 2,
        "max_position_embeddings": 64,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OpenVLA(**sizes).eval()
    example = (torch.rand(1, 3, 28, 28), torch.randint(0, 300, (1, 4)))
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    roles = layer_roles(model, example, linears)
    assert roles["language_model.lm_head"] == "action_head"  # the action bins are the lm_head's last rows
    assert {roles[f"projector.fc{i}"] for i in (1, 2, 3)} == {"projector"}
    assert {r for n, r in roles.items() if n.startswith("vision_backbone.")} == {"vision_tower"}
    assert {r for n, r in roles.items() if n.startswith("language_model.model.")} == {"backbone"}


def test_bad_inputs_raise_typed_errors() -> None:
    model = ScaledResidualMLP().eval()
    with pytest.raises(TechniqueNotApplicableError, match="bit widths"):
        layer_sensitivity(model, samples(2), (5,))
    with pytest.raises(TechniqueNotApplicableError, match="at least one"):
        layer_sensitivity(model, [], (4,))
    with pytest.raises(TechniqueNotApplicableError, match="no Linear"):
        layer_sensitivity(nn.Sequential(nn.Conv2d(1, 4, 3)), [(torch.randn(1, 1, 8, 8),)], (4,))
    model.head = quantize_linear(model.head, 4, 64, 1)
    with pytest.raises(TechniqueNotApplicableError, match="already quantized"):
        layer_sensitivity(model, samples(2), (4,))


def test_unchanged_output_reports_the_sqnr_cap() -> None:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight.zero_()  # the first layer no longer reaches the output
    (first, _) = layer_sensitivity(model, samples(2), (2,))
    assert first.relative_error[2] == 0 and first.sqnr_db[2] == MAX_SQNR_DB
    assert first.to_dict()["sqnr_db"] == {"2": MAX_SQNR_DB}
