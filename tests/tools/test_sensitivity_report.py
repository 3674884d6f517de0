"""Per-layer sensitivity in the analysis report: measured within the time budget, predictions that add up, reuse
by mixed precision, and the reasons given when it is not measured."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from robopt.calibration import CalibrationSet
from robopt.domain.analysis import AnalysisReport, SensitivityReport
from robopt.progress import Progress
from robopt.tools.registry import ApplyContext, get_technique, parse_config
from robopt.tools.sensitivity_report import (
    from_report,
    measure_for_analysis,
    predicted_sqnr_db,
    reusable_table,
    risk_from_sqnr,
    uniform_prediction,
)
from tests.tools.test_sensitivity import ScaledResidualMLP, samples
from tests.tools.test_techniques import analyze

MODEL = ScaledResidualMLP().eval()
CALIBRATION = CalibrationSet(tuple(samples(32, seed=0)), "test: standard-normal inputs, seed 0")


def calibration(n: int) -> CalibrationSet:
    return CalibrationSet(CALIBRATION.samples[:n], CALIBRATION.source)


@pytest.fixture(scope="module")
def report() -> SensitivityReport:
    result = measure_for_analysis(MODEL, calibration, budget_s=60, progress=Progress())
    assert isinstance(result, SensitivityReport), result
    return result


def test_the_report_holds_every_linear_most_sensitive_first(report: SensitivityReport) -> None:
    linears = [n for n, m in MODEL.named_modules() if type(m) is nn.Linear]
    assert sorted(r.name for r in report.layers) == sorted(linears)
    assert report.bits == [8, 4, 3, 2] and report.samples == 32 and report.calibration_source == CALIBRATION.source
    assert report.calibration_fingerprint == CALIBRATION.fingerprint
    worst = [r.sqnr_db[2] for r in report.layers]
    assert worst == sorted(worst)
    # the branch the model scales up most is the most sensitive one (ScaledResidualMLP: branch i scaled by 4^-i)
    branches = [r.name for r in report.layers if r.name.startswith("branches.")]
    assert branches.index("branches.0") < branches.index("branches.3")
    assert report.uniform_sqnr_db[8] > report.uniform_sqnr_db[4] > report.uniform_sqnr_db[2]
    assert report.spread_db[4] > 6  # the branches differ by orders of magnitude


def test_the_report_survives_json_and_its_prediction_matches_a_real_quantization(report: SensitivityReport) -> None:
    again = SensitivityReport.model_validate_json(report.model_dump_json())
    assert again == report
    table = from_report(again)
    predicted = predicted_sqnr_db(table, {t.name: 4 for t in table})
    assert predicted == pytest.approx(report.uniform_sqnr_db[4])
    # quantize every layer at 4 bits for real and measure: the summed per-layer noise predicts it within 3 dB
    technique = get_technique("hqq")
    result = technique.apply(
        copy.deepcopy(MODEL),
        parse_config(technique, {"nbits": 4, "skip_head": False}),
        ApplyContext(analysis=analyze(MODEL, "mlp-policy"), example_inputs=samples(1)[0]),
    )
    inputs = torch.cat([s[0] for s in CALIBRATION.samples])
    with torch.no_grad():
        ref = MODEL(inputs)
        measured = -10 * math.log10(float(((result.model(inputs) - ref) ** 2).sum() / (ref**2).sum()))
    assert abs(measured - predicted) < 3.0


def test_risk_follows_the_predicted_sqnr(report: SensitivityReport) -> None:
    assert [risk_from_sqnr(v) for v in (40.0, 25.0, 20.0, 15.0, 3.0)] == ["low", "low", "medium", "medium", "high"]
    assert risk_from_sqnr(None) is None
    with_head, n_all = uniform_prediction(report, 4)
    without_head, n_body = uniform_prediction(report, 4, skip_roles=("action_head",))
    assert n_body < n_all and without_head >= with_head  # keeping the head in float removes its noise


def test_not_measured_says_why() -> None:
    assert "turned off" in measure_for_analysis(MODEL, calibration, budget_s=0, progress=Progress())
    tight = measure_for_analysis(MODEL, calibration, budget_s=1e-4, progress=Progress())
    assert isinstance(tight, str) and "budget" in tight and "Linear layers" in tight
    convs = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    assert "no nn.Linear" in measure_for_analysis(convs, calibration, budget_s=60, progress=Progress())


def test_mixed_precision_reuses_the_reports_sensitivity(report: SensitivityReport) -> None:
    analysis: AnalysisReport = analyze(MODEL, "mlp-policy").model_copy(update={"layer_sensitivity": report})
    technique = get_technique("mixed_precision")
    config = parse_config(technique, {"average_bits": 4, "keep_roles": []})
    reused = technique.apply(
        copy.deepcopy(MODEL), config, ApplyContext(analysis=analysis, example_inputs=samples(1)[0], calibration=None)
    )
    assert reused.details["sensitivity_from"] == "analysis report"
    measured = technique.apply(
        copy.deepcopy(MODEL),
        config,
        ApplyContext(analysis=analyze(MODEL, "mlp-policy"), example_inputs=samples(1)[0], calibration=calibration),
    )
    assert measured.details["sensitivity_from"] == "measured in this step"
    assert reused.details["bits"] == measured.details["bits"]  # same data, same sensitivity, same assignment
    # a report measured on another model, or with fewer samples than the config asks for, is not reused
    other = nn.Sequential(nn.Linear(8, 8))
    assert reusable_table(report, other, (8, 4), 64, 32) is None
    assert reusable_table(report, MODEL, (8, 4), 64, 64) is None
    assert reusable_table(report, MODEL, (8, 4), 32, 32) is None
