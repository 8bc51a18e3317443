"""train-head and predict through the CLI, on real tiles and the shipped slide."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from embedstore.extract.runner import ExtractConfig, extract

from synthetic import write_units
from clirun import run as _run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
ONNX = "mobilenetv2-onnx-int8"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedstore", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("heads")
    tiles, slide = d / "pcam", d / "slide"
    base = dict(backbone=ONNX, progress=False, num_workers=1, num_threads=1)
    extract([SAMPLE / "pcam" / "labels.csv"], ExtractConfig(store=tiles, views=2, **base))
    extract([SAMPLE / "wsi"], ExtractConfig(store=slide, target_mpp=0.5, **base))
    return tiles, slide


def test_train_head_with_views_then_predict_with_heatmap(stores: tuple[Path, Path], tmp_path: Path) -> None:
    tiles, slide = stores
    head = tmp_path / "head"
    r = _cli("train-head", str(tiles), "--task", "pcam", "--split", "column", "--augment", "views",
             "--seeds", "2", "--epochs", "30", "--out", str(head))
    assert r.returncode == 0, r.stderr
    assert "f1" in r.stdout and "±" in r.stdout
    assert (head / "head.json").exists() and any(head.glob("*.safetensors"))
    out = tmp_path / "preds.arrow"
    r = _cli("predict", str(slide), "--head", str(head), "--out", str(out),
             "--heatmap", "CMU-1-Small-Region.svs", "--heatmap-class", "tumor")
    assert r.returncode == 0, r.stderr
    t = pa.ipc.open_file(out).read_all()
    assert {"key", "pred", "prob_normal", "prob_tumor", "slide", "x", "y", "tile_size_level0"} <= set(t.column_names)
    side = t.column("tile_size_level0").to_numpy()      # level-0 px per tile, for QuPath/wsinfer
    xs = np.unique(t.column("x").to_numpy())
    assert np.allclose(side, side[0]) and abs(side[0] - np.diff(xs).min()) <= 1.0, (side[0], xs[:4])
    p = np.stack([t.column("prob_normal").to_numpy(), t.column("prob_tumor").to_numpy()], 1)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    png = tmp_path / "preds-heatmap.png"
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 200 and img.std() > 10                       # a real picture, not blank


def test_predict_refuses_a_store_of_another_backbone(stores: tuple[Path, Path], tmp_path: Path) -> None:
    tiles, _ = stores
    other = tmp_path / "rand"
    extract([SAMPLE / "lung"], ExtractConfig(store=other, backbone="resnet18", random_init=True,
                                             progress=False, num_workers=0, num_threads=1, files_per_unit=64))
    head = tmp_path / "h"
    assert _cli("train-head", str(other), "--task", "lung", "--split", "kfold:3", "--seeds", "1",
                "--epochs", "5", "--out", str(head)).returncode == 0
    r = _cli("predict", str(tiles), "--head", str(head), "--out", str(tmp_path / "p.arrow"))
    assert r.returncode == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1
    assert not (tmp_path / "p.arrow").exists()


# ---------------------------------------------------------------- crafted heads, in-process

@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A synthetic store (labels recorded at extraction) and a head trained on it."""
    d = tmp_path_factory.mktemp("crafted")
    store, head = d / "store", d / "head"
    write_units(store, list(range(6)))
    code, out, err = _run("train-head", store, "--split", "kfold:3", "--seeds", "1", "--epochs", "3",
                          "--out", head)
    assert code == 0, err
    return store, head


def _edit(meta: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for p in parents:
        meta = meta[p]
    meta[last] = value


CRAFTED = [  # (case id, {head.json field: value}, weights bytes or None, what the line must name)
    ("hidden-1e8", {"config.kind": "mlp", "config.hidden": 1e8}, None, "config.hidden"),
    ("hidden-huge", {"config.kind": "mlp", "config.hidden": 100_000_000}, None, "config.hidden"),
    ("dim-negative", {"dim": -5}, None, "dim"),
    ("dim-text", {"dim": "16"}, None, "dim"),
    ("classes-empty", {"classes": []}, None, "classes"),
    ("threshold-outside", {"threshold": 1.5}, None, "threshold"),
    ("config-wrong-type", {"config.epochs": [5]}, None, "config.epochs"),
    ("shapes-disagree", {"dim": 32}, None, "dim 32"),
    ("mlp-over-linear-weights", {"config.kind": "mlp", "config.hidden": 65536}, None, "body.0.weight"),
    ("weights-garbage", {}, b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}" + b"\x00" * 64, "head.safetensors"),
    ("weights-garbage-old-layout", {"weights_sha256": None}, b"\x00" * 40, "head.safetensors"),
]


@pytest.mark.parametrize("case, fields, weights, names", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_predict_with_a_crafted_head_is_one_line_exit_2(small: tuple[Path, Path], tmp_path: Path, case: str,
                                                       fields: dict, weights: bytes | None, names: str) -> None:
    store, head = small
    bad = tmp_path / "crafted"
    shutil.copytree(head, bad)
    meta = json.loads((bad / "head.json").read_text())
    for k, v in fields.items():
        _edit(meta, k, v)
    (bad / "head.json").write_text(json.dumps(meta))
    if weights is not None:
        (bad / "head.safetensors").write_bytes(weights)
    code, out, err = _run("predict", store, "--head", bad, "--out", tmp_path / "p.arrow")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, (case, code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, (case, err)
    assert names in lines[0] and str(bad) in lines[0], (case, lines[0])
    assert not (tmp_path / "p.arrow").exists()


def test_predict_with_the_uncrafted_head_works(small: tuple[Path, Path], tmp_path: Path) -> None:
    store, head = small
    code, out, err = _run("predict", store, "--head", head, "--out", tmp_path / "p.arrow")
    assert code == 0, err
    assert pa.ipc.open_file(tmp_path / "p.arrow").read_all().num_rows > 0


def test_train_head_refuses_an_out_directory_holding_other_files(small: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = small
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = _run("train-head", store, "--split", "kfold:3", "--seeds", "1", "--epochs", "2", "--out", out)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "notes.txt" in lines[0], err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_train_head_memory_budget_streams_and_the_head_predicts(small: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = small
    head = tmp_path / "streamed"
    code, out, err = _run("train-head", store, "--split", "kfold:3", "--seeds", "1", "--epochs", "3",
                          "--augment", "views", "--memory-budget", "8K", "--out", head, "--json")
    assert code == 0, err
    assert json.loads(out)["streamed"] is True
    assert json.loads((head / "head.json").read_text())["classes"] == ["normal", "tumor"]
    code, _, err = _run("predict", store, "--head", head, "--out", tmp_path / "p.arrow")
    assert code == 0, err


@pytest.mark.parametrize("bad", ["lots", "0", "-5G"])
def test_train_head_refuses_a_bad_memory_budget_in_one_line(small: tuple[Path, Path], bad: str) -> None:
    store, _ = small
    code, _, err = _run("train-head", store, "--split", "kfold:3", "--memory-budget", bad)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "--memory-budget" in lines[0], err
