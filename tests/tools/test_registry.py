import pytest

from robopt.domain.records import PlanStep
from robopt.errors import TechniqueNotApplicableError, TechniqueNotFoundError
from robopt.tools.registry import get_technique, parse_config, plannable, technique_table, validate_step


def test_unknown_technique_lists_the_registered_ones():
    with pytest.raises(TechniqueNotFoundError) as e:
        get_technique("magic_compress")
    assert "quantize_dynamic_int8" in e.value.hint


def test_validate_step_checks_the_config_schema():
    technique, config = validate_step(PlanStep(technique="prune_structured", config={"ratio": 0.2}))
    assert technique.name == "prune_structured" and config.ratio == 0.2
    with pytest.raises(TechniqueNotApplicableError) as e:
        validate_step(PlanStep(technique="prune_structured", config={"ratio": 2.0}))
    assert "ratio" in e.value.message and "properties" in e.value.hint


def test_parse_config_refuses_another_techniques_config():
    other = get_technique("prune_structured").default_config()
    with pytest.raises(TechniqueNotApplicableError):
        parse_config(get_technique("quantize_dynamic_int8"), other)


def test_table_and_plannable():
    rows = {r["name"]: r for r in technique_table()}
    assert rows["weight_only_int4"]["family"] == "quantization"
    assert all(isinstance(r["config_schema"], dict) for r in rows.values())
    default = {t.name for t in plannable(None)}
    assert "prune_unstructured" not in default and "quantize_dynamic_int8" in default
    assert {t.name for t in plannable({"prune_unstructured"})} == {"prune_unstructured"}
