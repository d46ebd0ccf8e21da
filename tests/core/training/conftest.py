"""The training tests' synthetic data set (tests/training_data.py), written once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_data import make_dataset

from core.data import load_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def dataset(data_root: Path):
    return load_dataset(f"jsonl:{data_root}")
