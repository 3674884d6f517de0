"""The user's calibration file overrides the evaluator's data: .npz, .pt, .txt and .jsonl, checked against the
model's input spec with errors that say what is wrong and how to fix it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robopt.calibration import calibration_source, validate_calibration_file
from robopt.domain.records import InputSpec, TensorSpec
from robopt.errors import CalibrationDataError, UnsafePickleError
from robopt.evaluation.base import EvaluatorSpec
from robopt.evaluation.text_corpus import module_source
from tests.calibration.conftest import assert_fits

DIGITS = InputSpec(inputs=[TensorSpec(name="input", shape=[1, 1, 8, 8])], source="zoo")
VLA = InputSpec(
    inputs=[
        TensorSpec(name="image", shape=[1, 3, 16, 16]),
        TensorSpec(name="instruction", shape=[1, 6], dtype="int64", high=13),
    ],
    source="zoo",
)
DIGITS_EVALUATOR = EvaluatorSpec(name="classification", dataset="digits")


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(0).random((count, 1, 8, 8))  # float64, as numpy makes them


def _from_file(path, spec=DIGITS, evaluator=DIGITS_EVALUATOR, n=8, seed=0, data_dir=None):
    return calibration_source(evaluator, spec, data_dir or path.parent / "data", seed, user_file=path)(n)


def test_npz_overrides_the_evaluator_data(tmp_path) -> None:
    path = tmp_path / "calib.npz"
    images = _images(20)
    np.savez(path, input=images)
    calibration = _from_file(path, n=8)
    assert_fits(calibration, DIGITS, 8)
    assert calibration.source.startswith("user file calib.npz (sha256 ") and "8 of 20 samples" in calibration.source
    rows = {images[i].astype(np.float32).tobytes() for i in range(20)}
    assert all(s[0][0].numpy().tobytes() in rows for s in calibration.samples)  # float64 -> float32, same values
    assert _from_file(path, n=8).fingerprint == calibration.fingerprint
    assert validate_calibration_file(path, DIGITS_EVALUATOR, DIGITS).endswith("20 samples")


def test_a_labelled_dataset_file_works_for_a_single_input_model(tmp_path) -> None:
    path = tmp_path / "labelled.npz"
    np.savez(path, x=_images(6).astype(np.float32), y=np.arange(6))
    calibration = _from_file(path, n=10)
    assert len(calibration) == 6 and "all 6 samples (10 requested)" in calibration.source


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"pixels": _images(4)}, "holds arrays ['pixels']; the model takes input [N, 1, 8, 8] float32"),
        ({"input": _images(4), "extra": _images(4)}, "(unknown: extra)"),
        ({"input": np.zeros((4, 1, 9, 9))}, "per-sample shape [1, 9, 9], the model takes [1, 8, 8]"),
        ({"input": np.zeros((4, 8, 8))}, "per-sample shape [8, 8], the model takes [1, 8, 8]"),
        ({"input": np.zeros((4, 1, 8, 8), dtype=np.uint8)}, "is uint8, the model takes float32"),
        ({"input": np.full((4, 1, 8, 8), np.nan)}, "NaN or infinite"),
    ],
)
def test_npz_that_does_not_fit_the_model_is_refused_with_a_hint(tmp_path, arrays, message) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(CalibrationDataError) as refused:
        _from_file(path)
    assert message in refused.value.message and refused.value.hint
    with pytest.raises(CalibrationDataError):  # intake runs the same checks before the run starts
        validate_calibration_file(path, DIGITS_EVALUATOR, DIGITS)


def test_multi_input_npz_by_name_and_id_bounds(tmp_path) -> None:
    rng = np.random.default_rng(1)
    images, ids = rng.random((5, 3, 16, 16)).astype(np.float32), rng.integers(0, 13, (5, 6))
    good = tmp_path / "vla.npz"
    np.savez(good, instruction=ids, image=images)  # any order in the file: the spec's order in the samples
    calibration = _from_file(good, spec=VLA, evaluator=None, n=5)
    assert_fits(calibration, VLA, 5)
    assert {s[1][0].numpy().tobytes() for s in calibration.samples} == {row.tobytes() for row in ids}
    missing = tmp_path / "images-only.npz"
    np.savez(missing, image=images)
    with pytest.raises(CalibrationDataError, match="missing: instruction"):
        _from_file(missing, spec=VLA, evaluator=None)
    out_of_vocabulary = tmp_path / "big-ids.npz"
    np.savez(out_of_vocabulary, image=images, instruction=ids + 13)
    with pytest.raises(CalibrationDataError, match=r"the model takes ids in \[0, 13\)"):
        _from_file(out_of_vocabulary, spec=VLA, evaluator=None)
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, image=images, instruction=ids[:3])
    with pytest.raises(CalibrationDataError, match="same number"):
        _from_file(uneven, spec=VLA, evaluator=None)


def test_pt_files_tensor_dict_and_list_of_samples(tmp_path) -> None:
    images = torch.from_numpy(_images(6)).float()
    forms = {
        "tensor.pt": images,
        "dict.pt": {"input": images},
        "batched-list.pt": [images[i : i + 1] for i in range(6)],
        "unbatched-list.pt": [images[i] for i in range(6)],
        "tuples.pt": [(images[i : i + 1],) for i in range(6)],
    }
    fingerprints = set()
    for name, data in forms.items():
        torch.save(data, tmp_path / name)
        calibration = _from_file(tmp_path / name, n=6)
        assert_fits(calibration, DIGITS, 6)
        fingerprints.add(calibration.fingerprint)
    assert len(fingerprints) == 1  # every form gives the same set
    vla = [(torch.rand(1, 3, 16, 16), torch.randint(0, 13, (1, 6))) for _ in range(3)]
    torch.save(vla, tmp_path / "vla.pt")
    assert_fits(_from_file(tmp_path / "vla.pt", spec=VLA, evaluator=None, n=3), VLA, 3)
    torch.save([(torch.rand(1, 3, 16, 16),)], tmp_path / "short.pt")
    with pytest.raises(CalibrationDataError, match="a sample has 1 tensor"):
        _from_file(tmp_path / "short.pt", spec=VLA, evaluator=None)


class _Payload:
    """Not a tensor: a pickled object that the weights-only loader must refuse."""


def test_pt_with_pickled_objects_is_refused(tmp_path) -> None:
    path = tmp_path / "objects.pt"
    torch.save([_Payload()], path)
    with pytest.raises(UnsafePickleError):
        _from_file(path)


@pytest.mark.parametrize(
    ("name", "content", "message"), [("absent.npz", None, "does not exist"), ("data.csv", "1,2", "is not one of")]
)
def test_missing_and_unknown_files(tmp_path, name, content, message) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationDataError, match=message):
        _from_file(path)


def test_text_file_is_tokenized_with_the_model_tokenizer(tiny_lm, tmp_path) -> None:
    from transformers import AutoTokenizer

    folder, card = tiny_lm
    path = tmp_path / "notes.txt"
    path.write_text(module_source("textwrap"))
    calibration = _from_file(path, spec=card.input_spec, evaluator=card.evaluator, n=16)
    assert_fits(calibration, card.input_spec, 16)
    assert "64-token windows of user file notes.txt" in calibration.source
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = path.read_text()
    decoded = [tokenizer.decode(s[0][0].tolist(), clean_up_tokenization_spaces=False) for s in calibration.samples]
    assert sum(d in text for d in decoded) >= 15
    lines = tmp_path / "notes.jsonl"
    lines.write_text("\n".join(json.dumps({"text": t}) for t in text.split("\n\n")) + "\n")
    assert_fits(_from_file(lines, spec=card.input_spec, evaluator=card.evaluator, n=4), card.input_spec, 4)
    # a longer sequence on request: the length is the caller's, the rest of the spec still holds
    longer = calibration_source(
        card.evaluator, card.input_spec, tmp_path / "data", 0, user_file=path, sequence_length=128
    )(2)
    assert [list(t.shape) for s in longer.samples for t in s] == [[1, 128], [1, 128]]


def test_text_needs_a_token_model_and_its_tokenizer(tiny_lm, tmp_path) -> None:
    _, card = tiny_lm
    path = tmp_path / "notes.txt"
    path.write_text("some text " * 100)
    with pytest.raises(CalibrationDataError, match="does not take one token-id input") as refused:
        _from_file(path)  # digits-cnn takes images
    assert "npz" in refused.value.hint
    with pytest.raises(CalibrationDataError, match="no tokenizer is known") as refused:
        _from_file(path, spec=card.input_spec, evaluator=EvaluatorSpec(name="perplexity"))
    assert "model_dir" in refused.value.hint
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": 3}\n')
    with pytest.raises(CalibrationDataError, match="line 2: no text found"):
        _from_file(bad, spec=card.input_spec, evaluator=card.evaluator)
