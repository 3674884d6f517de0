"""The bundled digits split and user data files (.npz, .pt) with their typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robopt.errors import EvaluationError, UnsafePickleError
from robopt.evaluation.datasets import digits_split, load_labeled_data


def test_digits_split_is_fixed_stratified_and_scaled() -> None:
    x_train, y_train, x_test, y_test = digits_split()
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_test.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert sorted(y_test.unique().tolist()) == list(range(10))
    # stratified: every class keeps its share of the full set within one sample
    full = torch.cat([y_train, y_test])
    for c in range(10):
        expected = int((full == c).sum()) * 450 / 1797
        assert abs(int((y_test == c).sum()) - expected) <= 1
    again = digits_split()
    assert torch.equal(again[2], x_test) and torch.equal(again[3], y_test)


def test_digits_split_returns_fresh_tensors() -> None:
    x_test = digits_split()[2]
    x_test.zero_()
    assert float(digits_split()[2].max()) == 1.0


def test_bundled_names() -> None:
    x_train, y_train, x_test, y_test = digits_split()
    x, y = load_labeled_data("digits")
    assert torch.equal(x, x_test) and torch.equal(y, y_test)
    x, y = load_labeled_data("digits-test")
    assert torch.equal(y, y_test)
    x, y = load_labeled_data("digits-train")
    assert torch.equal(x, x_train) and torch.equal(y, y_train)


def test_npz_round_trip(tmp_path) -> None:
    x = np.random.default_rng(0).normal(size=(20, 3, 4)).astype(np.float64)
    y = np.arange(20, dtype=np.int32) % 5
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    lx, ly = load_labeled_data(str(path))
    assert lx.dtype == torch.float32 and ly.dtype == torch.int64
    assert torch.allclose(lx, torch.from_numpy(x).float()) and ly.tolist() == y.tolist()


def test_pt_round_trip_keeps_integer_inputs(tmp_path) -> None:
    x = torch.randint(0, 100, (8, 16))
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    path = tmp_path / "data.pt"
    torch.save({"x": x, "y": y}, path)
    lx, ly = load_labeled_data(str(path))
    assert torch.equal(lx, x) and lx.dtype == torch.int64 and torch.equal(ly, y)


def test_missing_file_and_unknown_name(tmp_path) -> None:
    with pytest.raises(EvaluationError, match="does not exist") as err:
        load_labeled_data(str(tmp_path / "nope.npz"))
    assert err.value.hint and "'x'" in err.value.hint
    with pytest.raises(EvaluationError, match="unknown dataset"):
        load_labeled_data("imagenet")


def test_npz_missing_arrays(tmp_path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, inputs=np.zeros((3, 2)), y=np.zeros(3, dtype=np.int64))
    with pytest.raises(EvaluationError, match=r"lacks array\(s\) \['x'\]") as err:
        load_labeled_data(str(path))
    assert "inputs" in err.value.message


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (np.zeros((4, 2)), np.zeros(3, dtype=np.int64), "4 inputs but 3 labels"),
        (np.zeros((4, 2)), np.array([0.0, 1.0, 0.0, 1.0]), "must be integers"),
        (np.zeros((4, 2)), np.array([0, -1, 0, 1]), "must be >= 0"),
        (np.zeros((4, 2)), np.zeros((4, 2), dtype=np.int64), "1-D"),
        (np.zeros((0, 2)), np.zeros(0, dtype=np.int64), "no samples"),
    ],
)
def test_malformed_npz(tmp_path, x, y, match) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(EvaluationError, match=match):
        load_labeled_data(str(path))


def test_npz_object_arrays_are_refused(tmp_path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(EvaluationError, match="cannot read dataset file"):
        load_labeled_data(str(path))


def test_corrupt_files(tmp_path) -> None:
    npz, pt = tmp_path / "junk.npz", tmp_path / "junk.pt"
    npz.write_bytes(b"not a zip archive")
    pt.write_bytes(b"not a torch file")
    with pytest.raises(EvaluationError, match=r"not a readable \.npz"):
        load_labeled_data(str(npz))
    with pytest.raises(EvaluationError, match="not a readable torch file"):
        load_labeled_data(str(pt))


class _Payload:
    pass


def test_pt_with_objects_is_unsafe(tmp_path) -> None:
    path = tmp_path / "objects.pt"
    torch.save({"x": torch.zeros(2, 2), "y": _Payload()}, path)
    with pytest.raises(UnsafePickleError) as err:
        load_labeled_data(str(path))
    assert "torch.save({'x': x, 'y': y}" in (err.value.hint or "")


def test_pt_shapes_of_content(tmp_path) -> None:
    not_dict, missing = tmp_path / "list.pt", tmp_path / "missing.pt"
    torch.save([torch.zeros(2)], not_dict)
    torch.save({"x": torch.zeros(2, 2)}, missing)
    with pytest.raises(EvaluationError, match="not a dict"):
        load_labeled_data(str(not_dict))
    with pytest.raises(EvaluationError, match=r"lacks key\(s\) \['y'\]"):
        load_labeled_data(str(missing))
