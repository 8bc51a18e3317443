"""train-head and predict through the CLI, on real tiles and the shipped slide."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from embedstore.extract.runner import ExtractConfig, extract

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
    assert {"key", "pred", "prob_normal", "prob_tumor", "slide", "x", "y"} <= set(t.column_names)
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
