"""The package type-checks: ``mypy embedstore`` with the [mypy] config in setup.cfg is clean."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_clean() -> None:
    pytest.importorskip("mypy", reason="mypy not installed (pip install -e '.[test]')")
    # Same command as `make typecheck`, from the repository root so setup.cfg's [mypy] applies.
    # The cache (.mypy_cache/, ignored by git) makes repeat runs take about a second.
    out = subprocess.run([sys.executable, "-m", "mypy", "embedstore"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"mypy found type errors:\n{out.stdout}{out.stderr}"
