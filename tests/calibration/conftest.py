"""Zoo models for the calibration tests, built once per test session into the shared zoo cache."""

from __future__ import annotations

import pytest
import torch

from robopt import zoo
from robopt.calibration import CalibrationSet
from robopt.domain.records import InputSpec
from robopt.tools.example_inputs import torch_dtype


@pytest.fixture(scope="session")
def digits_cnn(data_dir):
    return zoo.resolve("digits-cnn", data_dir / "zoo")


@pytest.fixture(scope="session")
def reacher_policy(data_dir):
    return zoo.resolve("reacher-policy", data_dir / "zoo")


@pytest.fixture(scope="session")
def tiny_lm(data_dir):
    return zoo.resolve("tiny-lm", data_dir / "zoo")


@pytest.fixture(scope="session")
def minilm(data_dir):
    return zoo.resolve("minilm", data_dir / "zoo")


def assert_fits(calibration: CalibrationSet, spec: InputSpec, n: int) -> None:
    """n batch-1 samples in the spec's order, shapes and dtypes, ids inside their bound."""
    assert len(calibration) == n
    for sample in calibration.samples:
        assert len(sample) == len(spec.inputs)
        for tensor, t in zip(sample, spec.inputs, strict=True):
            assert list(tensor.shape) == [1, *t.shape[1:]] and tensor.dtype == torch_dtype(t.dtype)
            if t.high is not None:
                assert int(tensor.min()) >= 0 and int(tensor.max()) < t.high
            if tensor.is_floating_point():
                assert bool(torch.isfinite(tensor).all())
