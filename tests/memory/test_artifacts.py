import os
import pickle
import stat

import pytest
import torch
from torch import nn

from robopt.errors import ArtifactIntegrityError
from robopt.memory.artifacts import ArtifactStore


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_put_and_load_round_trip(tmp_path, model):
    store = ArtifactStore(tmp_path)
    ref = store.put_module(model)
    x = torch.randn(3, 8)
    assert torch.equal(store.load(ref)(x), model(x))
    assert ref.size_bytes == os.path.getsize(ref.path)
    assert store.get(ref.sha256) == ref


def test_content_addressed_and_deduplicated(tmp_path, model):
    store = ArtifactStore(tmp_path)
    a = store.put_module(model)
    b = store.put_module(model)
    assert a.sha256 == b.sha256 and len(store.list()) == 1
    with torch.no_grad():
        model[0].weight.add_(1)
    assert store.put_module(model).sha256 != a.sha256


def test_payload_is_read_only_and_tampering_is_detected(tmp_path, model):
    store = ArtifactStore(tmp_path)
    ref = store.put_module(model)
    assert not os.stat(ref.path).st_mode & stat.S_IWUSR
    os.chmod(ref.path, 0o644)
    with open(ref.path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactIntegrityError) as e:
        store.load(ref)
    assert "modified" in e.value.message


def test_failed_write_leaves_nothing_behind(tmp_path):
    store = ArtifactStore(tmp_path)

    class Unpicklable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fn = lambda x: x  # lambdas cannot be pickled

    with pytest.raises((pickle.PicklingError, AttributeError)):
        store.put_module(Unpicklable())
    assert store.list() == []
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_torchscript_artifacts(tmp_path, model):
    store = ArtifactStore(tmp_path)
    scripted = torch.jit.script(model)
    ref = store.put_module(scripted)
    assert ref.format == "torchscript"
    x = torch.randn(2, 8)
    assert torch.allclose(store.load(ref)(x), model(x))
