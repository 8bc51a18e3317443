"""Shared fixtures: the shipped sample data, and the fuller data in ../shared when present."""
from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def one_faiss_thread() -> Iterator[None]:
    """Tiny indexes: OpenMP start-up and spin-waits cost more than they save on a shared box.
    Index test modules use it with ``pytestmark = pytest.mark.usefixtures("one_faiss_thread")``."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("EMBEDSTORE_LMDB_MAP", str(1 << 20))  # small maps exercise growth
