import pytest
from langgraph.store.memory import InMemoryStore

from robopt.domain.records import Attempt, Measurement, PlanStep
from robopt.errors import InvalidCriteriaError, MissingExtraError
from robopt.memory.checkpointer import open_persistence
from robopt.memory.history import past_attempts, record_attempt
from robopt.settings import Settings


def attempt(session, index, fingerprint="cnn|torch-module|100|classification:digits"):
    return Attempt(
        index=index,
        step=PlanStep(technique="quantize_dynamic_int8"),
        status="rejected",
        input_artifact="x",
        session=session,
        model_fingerprint=fingerprint,
        measurement=Measurement(size_bytes=10, metrics={"accuracy": 0.5}, primary_metric="accuracy"),
    )


def test_attempts_are_kept_per_model_and_evaluator():
    store = InMemoryStore()
    record_attempt(store, attempt("s1", 0))
    record_attempt(store, attempt("s2", 0))
    record_attempt(store, attempt("s2", 1, fingerprint="other"))
    found = past_attempts(store, "cnn|torch-module|100|classification:digits")
    assert [(a.session, a.index) for a in found] == [("s1", 0), ("s2", 0)]
    assert found[0].measurement.metrics == {"accuracy": 0.5}
    assert [
        a.session for a in past_attempts(store, "cnn|torch-module|100|classification:digits", exclude_session="s1")
    ] == ["s2"]


def test_sqlite_persistence_is_shared_across_opens(tmp_path):
    settings = Settings(data_dir=tmp_path)
    with open_persistence(settings) as p:
        record_attempt(p.store, attempt("s1", 0))
    with open_persistence(settings) as p:
        assert len(past_attempts(p.store, "cnn|torch-module|100|classification:digits")) == 1
    assert (tmp_path / "robopt.sqlite").is_file()


def test_database_url_errors_are_actionable(tmp_path):
    with pytest.raises(InvalidCriteriaError), open_persistence(Settings(data_dir=tmp_path, database_url="mysql://x")):
        pass
    try:
        import langgraph.checkpoint.postgres  # noqa: F401
    except ImportError:
        with (
            pytest.raises(MissingExtraError) as e,
            open_persistence(Settings(data_dir=tmp_path, database_url="postgresql://localhost/robopt")),
        ):
            pass
        assert "robopt[postgres]" in e.value.hint
