"""index and search through the CLI on real tiles: by key, by image, gallery, bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedstore.extract.runner import ExtractConfig, extract

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
ONNX = "mobilenetv2-onnx-int8"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedstore", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture()
def lung(tmp_path: Path) -> Path:
    src = tmp_path / "tiles"
    for cls in ("lung_n", "lung_scc"):
        (src / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / "lung" / cls).glob("*.jpeg"))[:10]:
            shutil.copy(p, src / cls / p.name)
    st = tmp_path / "st"
    extract([src], ExtractConfig(store=st, backbone=ONNX, progress=False, num_workers=0, num_threads=1))
    return st


def test_search_by_key_and_by_image(lung: Path, tmp_path: Path) -> None:
    assert _cli("index", str(lung)).returncode == 0
    r = _cli("search", str(lung), "--key", "lung_n/" + sorted((SAMPLE / "lung" / "lung_n").glob("*.jpeg"))[0].name,
             "-k", "4", "--json", "--gallery", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr
    hit = json.loads(r.stdout)[0]
    assert hit["keys"][0].startswith("lung_n/") and abs(hit["scores"][0] - 1) < 1e-3
    assert (tmp_path / "g.png").stat().st_size > 10_000
    image = sorted((SAMPLE / "lung" / "lung_scc").glob("*.jpeg"))[3]
    r = _cli("search", str(lung), "--image", str(image), "-k", "3", "--json")
    hit = json.loads(r.stdout)[0]
    assert hit["keys"][0] == f"lung_scc/{image.name}" and hit["scores"][0] > 0.999  # the store's own backbone


def test_search_bad_input_one_line_each(lung: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.ones(7, np.float32))
    cases = [(["--key", "no/such.png"], "no/such.png"), (["--vector", str(tmp_path / "v.npy")], "7")]
    for args, word in cases:
        r = _cli("search", str(lung), *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and word in r.stderr, r.stderr
    assert _cli("index", str(lung)).returncode == 0
    # rows committed after the build make the index stale: say so and how to update
    from embedstore.store import StoreWriter
    with StoreWriter(lung) as w:
        w.add(np.ones((1, 1280), np.float32), ["extra/tile.png"])
    r = _cli("search", str(lung), "--key", "extra/tile.png")
    assert r.returncode == 2 and "--update" in r.stderr
    assert _cli("index", str(lung), "--update").returncode == 0
    r = _cli("search", str(lung), "--key", "extra/tile.png", "--json")
    assert json.loads(r.stdout)[0]["keys"][0] == "extra/tile.png"


def test_search_draws_the_similarity_heatmap_over_a_slide(tmp_path: Path) -> None:
    from PIL import Image

    st = tmp_path / "slide"
    extract([SAMPLE / "wsi"], ExtractConfig(store=st, backbone=ONNX, target_mpp=0.5, progress=False,
                                            num_workers=0, num_threads=1))
    from embedstore.store import open_store
    slide = "CMU-1-Small-Region.svs"
    key = open_store(st).slide(slide).keys[0]
    png = tmp_path / "sim.png"
    r = _cli("search", str(st), "--key", key, "-k", "3", "--slide-heatmap", slide, "--heatmap-out", str(png))
    assert r.returncode == 0, r.stderr
    assert f"similarity heatmap over {slide}: {png}" in r.stdout
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 200 and img.std() > 10                       # a real picture, not blank
    # search --json carries each neighbour's level-0 tile side (what QuPath and wsinfer need)
    r = _cli("search", str(st), "--key", key, "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    import json
    nb = json.loads(r.stdout)[0]["neighbours"]
    xs = np.unique(open_store(st).slide(slide).coords[:, 0])
    assert all(abs(n["tile_size_level0"] - np.diff(xs).min()) <= 1.0 for n in nb), nb
