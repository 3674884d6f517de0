"""`robopt export` and robopt.export.export: a real session's best model by session id, an artifact by sha prefix,
and typed errors with exit codes. The command is mounted as robopt/cli/main.py registers it."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from robopt import api
from robopt.cli.export_cmd import export as export_command
from robopt.cli.main import _handle_errors
from robopt.domain.criteria import Criteria
from robopt.export import export
from robopt.graph.context import Context

app = typer.Typer()
app.command("export")(_handle_errors(export_command))
app.command("noop", hidden=True)(lambda: None)  # two commands: typer then routes by command name, as in main.py


@pytest.fixture(scope="module")
def session(data_dir, tmp_path_factory) -> tuple[str, str]:
    """A real optimization session of digits-cnn (quantize_dynamic_int8), in its own data directory."""
    home = tmp_path_factory.mktemp("cli-data")
    (data_dir / "zoo").mkdir(parents=True, exist_ok=True)
    (home / "zoo").symlink_to(data_dir / "zoo", target_is_directory=True)
    context = Context(data_dir=str(home), isolated_measurement=False)
    result = api.optimize(
        "digits-cnn",
        Criteria(max_size_ratio=0.5),
        techniques=["quantize_dynamic_int8"],
        session="export-cli",
        context=context,
    )
    assert result.best.artifact.technique == "quantize_dynamic_int8"
    return str(home), result.best.artifact.sha256


def invoke(*args: str):
    return CliRunner().invoke(app, ["export", *args], catch_exceptions=False)


def test_session_best_exports_as_state_dict_with_the_zoo_card(session, tmp_path):
    home, sha = session
    done = invoke("export-cli", str(tmp_path / "out"), "--format", "state-dict", "--data-dir", home, "--json")
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout)
    assert result["artifact"] == sha and result["format"] == "state-dict" and result["verified"] is True
    assert result["max_abs_diff"] <= 1e-5
    arch = json.loads((tmp_path / "out" / "architecture.json").read_text())
    assert arch["kwargs_source"] == "zoo card digits-cnn" and arch["quantization"]["layers"]


def test_sha_prefix_exports_and_prints_the_snippet(session, tmp_path):
    home, sha = session
    done = invoke(sha[:12], str(tmp_path / "out"), "--data-dir", home)
    assert done.exit_code == 0, done.output
    assert "torchscript export of artifact" in done.stdout and "verified" in done.stdout
    assert "torch.jit.load" in done.stdout
    again = invoke(sha[:12], str(tmp_path / "out"), "--data-dir", home, "--json")
    assert again.exit_code == 2
    assert json.loads(again.stdout)["error"] == "export_failed"


def test_unknown_reference_and_refused_format_exit_with_hints(session, tmp_path):
    home, sha = session
    missing = invoke("no-such-session", str(tmp_path / "a"), "--data-dir", home)
    assert missing.exit_code == 2 and "robopt sessions" in missing.output
    refused = invoke(sha, str(tmp_path / "b"), "--format", "onnx", "--data-dir", home, "--json")
    error = json.loads(refused.stdout)
    assert refused.exit_code == 2 and error["error"] == "not_exportable" and "onnx_dynamic_int8" in error["hint"]


def test_python_api_takes_a_result_artifact_path(session, tmp_path):
    home, sha = session
    store_path = f"{home}/artifacts/{sha}/model.pt"
    result = export(store_path, tmp_path / "out", "torchscript", context=Context(data_dir=home))
    assert result.artifact == sha and result.verified and result.max_abs_diff <= 1e-5
