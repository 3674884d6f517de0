import pytest
import torch
from torch import nn

from robopt.errors import ModelNotFoundError
from robopt.memory.artifacts import ArtifactStore
from robopt.tools.ingest import ingest_model


def test_zoo_name_becomes_a_baseline_artifact(fresh_data_dir):
    store = ArtifactStore(fresh_data_dir / "artifacts")
    ingested = ingest_model("digits-cnn", store=store, zoo_dir=fresh_data_dir / "zoo")
    assert ingested.source_format == "safetensors" and ingested.card["name"] == "digits-cnn"
    assert ingested.artifact.input_spec.inputs[0].shape == [1, 1, 8, 8]
    store.verify(ingested.artifact)
    # the same model again is the same content-addressed artifact
    again = ingest_model("digits-cnn", store=store, zoo_dir=fresh_data_dir / "zoo")
    assert again.artifact.sha256 == ingested.artifact.sha256


def test_artifact_reference_by_prefix(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = store.put_module(nn.Linear(4, 2))
    ingested = ingest_model(f"artifact:{ref.sha256[:10]}", store=store, zoo_dir=tmp_path / "zoo")
    assert ingested.artifact == ref
    with pytest.raises(ModelNotFoundError):
        ingest_model("artifact:ffffffffff", store=store, zoo_dir=tmp_path / "zoo")


def test_unknown_name_points_at_files_and_the_zoo(tmp_path):
    with pytest.raises(ModelNotFoundError) as e:
        ingest_model("no-such-model", store=ArtifactStore(tmp_path), zoo_dir=tmp_path / "zoo")
    assert "digits-cnn" in e.value.hint


def test_torchscript_file_is_stored_as_torchscript(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(4, 2))), str(path))
    ingested = ingest_model(str(path), store=ArtifactStore(tmp_path / "a"), zoo_dir=tmp_path / "zoo")
    assert ingested.artifact.format == "torchscript" and ingested.source_format == "torchscript"
