"""Shared fixtures: the shipped sample data, and the fuller data in ../shared when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SHARED = ROOT.parent / "shared" / "data"
ONNX_MODEL = SAMPLE / "models" / "mobilenetv2-12-int8.onnx"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present (plain clone)")
    return SHARED


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("EMBEDSTORE_LMDB_MAP", str(1 << 20))  # small maps exercise growth
