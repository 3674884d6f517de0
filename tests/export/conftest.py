"""Artifacts for the export tests, made once per session from the cached zoo models with robopt's own techniques."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest

from robopt import zoo
from robopt.domain.records import ArtifactRef, InputSpec
from robopt.memory.artifacts import ArtifactStore
from robopt.tools.example_inputs import make_example_inputs
from tests.export.helpers import apply_technique, store_module


@dataclass
class Stored:
    """An artifact, its store and its input spec."""

    ref: ArtifactRef
    store: ArtifactStore
    spec: InputSpec


@pytest.fixture(scope="session")
def export_store(tmp_path_factory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("export-store") / "artifacts")


@pytest.fixture(scope="session")
def digits_fp32(data_dir: Path, export_store: ArtifactStore) -> Stored:
    path, card = zoo.resolve("digits-cnn", data_dir / "zoo")
    model = zoo.load_card_model(path, card)
    return Stored(store_module(export_store, model, card.input_spec), export_store, card.input_spec)


@pytest.fixture(scope="session")
def digits_int8(digits_fp32: Stored) -> Stored:
    """digits-cnn after robopt's quantize_dynamic_int8 technique (torch.ao dynamic INT8 Linear layers)."""
    model = digits_fp32.store.load(digits_fp32.ref)
    example = make_example_inputs(digits_fp32.spec)
    quantized = apply_technique("quantize_dynamic_int8", copy.deepcopy(model), example).model
    ref = store_module(
        digits_fp32.store, quantized, digits_fp32.spec, technique="quantize_dynamic_int8", parent=digits_fp32.ref.sha256
    )
    return Stored(ref, digits_fp32.store, digits_fp32.spec)


@pytest.fixture(scope="session")
def reacher_fp32(data_dir: Path, export_store: ArtifactStore) -> Stored:
    path, card = zoo.resolve("reacher-policy", data_dir / "zoo")
    model = zoo.load_card_model(path, card)
    return Stored(store_module(export_store, model, card.input_spec), export_store, card.input_spec)
