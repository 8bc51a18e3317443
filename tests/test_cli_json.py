"""Every command that prints a result takes --json and then prints exactly one JSON document on
stdout (progress and tables go to stderr): each is run on small real stores and parsed.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from embedstore.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import expected, write_units  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
ONNX = "mobilenetv2-onnx-int8"
UNITS = [0, 1, 2, 3]


def as_json(*args: object, code: int = 0) -> Any:
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--json"], catch_exceptions=True)
    assert r.exit_code == code, (args, r.exit_code, r.stderr, r.exception)
    return json.loads(r.stdout)          # one document: anything else on stdout fails here


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    st = tmp_path_factory.mktemp("json") / "st"
    write_units(st, UNITS)
    return st


@pytest.fixture()
def copy(synth: Path, tmp_path: Path) -> Path:
    """A fresh copy of the synthetic store, for commands that change it."""
    return Path(shutil.copytree(synth, tmp_path / "st"))


def test_info_verify_errors(synth: Path) -> None:
    n = len(expected(UNITS))
    d = as_json("info", synth)
    assert d["rows"] == n and d["dim"] == 16 and d["backbone"] == "synthetic" and d["slides"] == len(UNITS)
    d = as_json("verify", synth)
    assert d["ok"] is True and d["rows"] == n and d["problems"] == []
    d = as_json("errors", synth)
    assert d["errors"] == []


def test_labels_delete_compact(copy: Path, tmp_path: Path) -> None:
    rows = expected(UNITS)
    keys = sorted(rows)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label"])
        w.writerows([k, "a" if i % 2 else "b"] for i, k in enumerate(keys))
    d = as_json("labels", copy, labels, "--task", "ab")
    assert d["task"] == "ab" and d["n"] == len(keys) and set(d["classes"]) == {"a", "b"}
    d = as_json("delete", copy, "--key", keys[0], "--key", keys[1])
    assert d["deleted"] == 2
    d = as_json("compact", copy)
    assert d["removed_rows"] == 2 and d["rewritten"] >= 1
    assert as_json("info", copy)["rows"] == len(keys) - 2


def test_export_and_import_h5(synth: Path, tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    d = as_json("export-h5", synth, "--out", tmp_path / "h5")
    assert d["files"] == len(UNITS) and d["rows"] == len(expected(UNITS))
    d = as_json("import-h5", tmp_path / "h5", "--store", tmp_path / "back", "--backbone-name", "synthetic")
    assert d["files"] == len(UNITS) and d["rows"] == len(expected(UNITS))


def test_index_and_search(copy: Path) -> None:
    d = as_json("index", copy, "--kind", "flat")
    assert d["kind"] == "flat" and d["n_covered"] == len(expected(UNITS)) and d["recall_at_10"] == 1.0
    key = sorted(expected(UNITS))[3]
    hits = as_json("search", copy, "--key", key, "-k", "3")
    assert len(hits) == 1 and hits[0]["keys"][0] == key and len(hits[0]["neighbours"]) == 3
    assert hits[0]["neighbours"][0]["slide"] == expected(UNITS)[key][1]


def test_backbones() -> None:
    specs = as_json("backbones", "mobilenet*")
    assert [s["name"] for s in specs] == [ONNX] and specs[0]["kind"] == "onnx" and specs[0]["dim"] == 1280


def test_train_head_and_predict(synth: Path, tmp_path: Path) -> None:
    d = as_json("train-head", synth, "--split", "kfold:2", "--seeds", "1", "--epochs", "3",
                "--out", tmp_path / "head")
    assert set(d["summary"]) >= {"f1", "balanced_accuracy"} and d["classes"] == ["normal", "tumor"]
    assert d["head"] == str(tmp_path / "head")
    d = as_json("predict", synth, "--head", tmp_path / "head", "--out", tmp_path / "p.arrow")
    assert d["rows"] == len(expected(UNITS)) and Path(d["path"]).exists()


def test_extract_and_select_on_real_tiles(tmp_path: Path) -> None:
    proxy = tmp_path / "proxy.csv"
    with proxy.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for cls in ("lung_aca", "lung_n", "lung_scc"):
            w.writerows([p, cls] for p in sorted((SAMPLE / "lung" / cls).glob("*.jpeg"))[:6])
    fast = ["--workers", "0", "--threads", "1", "--quiet"]
    d = as_json("extract", proxy, "--store", tmp_path / "st", "--backbone", ONNX, *fast)
    assert d["tiles_written"] == 18 and d["exit_code"] == 0 and d["errors"] == []
    d = as_json("select", "--proxy", proxy, "--backbone", ONNX, "--folds", "2", "--k", "3",
                "--out", tmp_path / "sel", *fast)
    assert [c["backbone"] for c in d["candidates"]] == [ONNX] and d["candidates"][0]["rank"] == 1
    assert d["proxy"]["tiles"] == 18 and Path(d["files"]["json"]).exists()
