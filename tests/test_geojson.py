"""export-geojson on a real slide store: the schema QuPath reads, shapely-valid polygons aligned
to the tiles, tissue contours, and a round trip through shapely."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from embedstore.extract.runner import ExtractConfig, extract
from embedstore.heads import save_head, train_head
from embedstore.interop import tissue_features
from embedstore.store import open_store

shapely = pytest.importorskip("shapely")
from shapely.geometry import mapping, shape  # noqa: E402

from clirun import run as _run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLIDE = "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def slide_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store of the shipped slide (ONNX backbone) and a head trained on its embeddings
    (left half vs right half of the slide: labels only need to exist)."""
    d = tmp_path_factory.mktemp("geojson")
    store = d / "slide"
    extract([ROOT / "sample_data" / "wsi"], ExtractConfig(store=store, target_mpp=0.5, backbone="mobilenetv2-onnx-int8",
                                                          progress=False, num_workers=1, num_threads=1))
    st = open_store(store)
    bag = st.slide(SLIDE)
    y = np.where(bag.coords[:, 0] < np.median(bag.coords[:, 0]), "left", "right")
    head = train_head(np.asarray(bag.emb, np.float32), y)
    head.fingerprint = st.fingerprint()
    save_head(head, d / "head")
    return store, d / "head"


@pytest.fixture(scope="module")
def exported(slide_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    store, head = slide_store
    out = tmp_path_factory.mktemp("out") / "slide.geojson"
    query = open_store(store).slide(SLIDE).keys[3]
    code, stdout, err = _run("export-geojson", store, "--slide", SLIDE, "--head", head, "--query", query,
                             "--clusters", 3, "--tissue", "--out", out, "--json")
    assert code == 0, err
    return json.loads(out.read_text()), json.loads(stdout)


def _tiles(doc: dict) -> list[dict[str, Any]]:
    return [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]


def test_the_schema_qupath_reads(slide_store: tuple[Path, Path], exported: tuple[dict, dict]) -> None:
    doc, summary = exported
    st = open_store(slide_store[0])
    assert doc["type"] == "FeatureCollection"
    kinds = [f["properties"]["objectType"] for f in doc["features"]]
    assert set(kinds) == {"tile", "annotation"} and kinds.count("tile") == len(st.slide(SLIDE).keys)
    for f in doc["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        c = f["properties"]["classification"]
        assert isinstance(c["name"], str) and len(c["color"]) == 3
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in c["color"])
    for f in _tiles(doc):
        p = f["properties"]
        assert p["classification"]["name"] in ("left", "right")
        m = p["measurements"]
        assert set(m) == {"prob_left", "prob_right", "similarity", "cluster"}
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())
        assert m["prob_left"] + m["prob_right"] == pytest.approx(1, abs=1e-5)
        assert -1.0001 <= m["similarity"] <= 1.0001 and m["cluster"] in (0, 1, 2)
    sims = {f["properties"]["name"]: f["properties"]["measurements"]["similarity"] for f in _tiles(doc)}
    assert sims[st.slide(SLIDE).keys[3]] == pytest.approx(1, abs=1e-4)
    assert summary["tiles"] == len(sims) and summary["geometry"] == "grid.json"


def test_polygons_are_valid_and_on_the_tiles(slide_store: tuple[Path, Path], exported: tuple[dict, dict]) -> None:
    doc, summary = exported
    st = open_store(slide_store[0])
    unit = st.units()[f"slide:{SLIDE}"]
    side = 224 * 0.5 / unit["slide_mpp"]                       # tile_size * tile mpp / slide mpp
    assert summary["tile_l0"] == pytest.approx(side)
    bag = st.slide(SLIDE)
    at = dict(zip(bag.keys, bag.coords.tolist()))
    for f in doc["features"]:
        assert shape(f["geometry"]).is_valid, f["properties"]["name"]
    for f in _tiles(doc):
        x, y = at[f["properties"]["name"]]
        assert shape(f["geometry"]).bounds == pytest.approx((x, y, x + side, y + side), abs=1e-3)
        assert shape(f["geometry"]).area == pytest.approx(side * side, rel=1e-4)
    union = shapely.union_all([shape(f["geometry"]) for f in _tiles(doc)])
    assert union.area == pytest.approx(len(bag.keys) * side * side, rel=0.01)   # a grid, not a pile


def test_tissue_contours_match_the_mask_and_hold_the_tiles(slide_store: tuple[Path, Path],
                                                           exported: tuple[dict, dict]) -> None:
    doc, _ = exported
    store = slide_store[0]
    mask = np.asarray(Image.open(store / "masks" / f"{SLIDE}.mask.png")) > 127
    dims = json.loads((store / "masks" / f"{SLIDE}.grid.json").read_text())["dims"]
    tissue = shapely.union_all([shape(f["geometry"]) for f in doc["features"]
                                if f["properties"]["objectType"] == "annotation"])
    px = dims[0] / mask.shape[1] * dims[1] / mask.shape[0]
    assert tissue.area == pytest.approx(mask.sum() * px, rel=1e-3)
    assert 0 <= tissue.bounds[0] and tissue.bounds[2] <= dims[0] and tissue.bounds[3] <= dims[1]
    covered = [shape(f["geometry"]).intersection(tissue).area / shape(f["geometry"]).area for f in _tiles(doc)]
    assert min(covered) > 0.1                                  # kept tiles had >= 25 % tissue


def test_a_round_trip_through_shapely(exported: tuple[dict, dict], tmp_path: Path) -> None:
    doc, _ = exported
    text = json.dumps(doc)
    coll = shapely.from_geojson(text)
    assert len(coll.geoms) == len(doc["features"])
    for g, f in zip(coll.geoms, doc["features"]):
        again = mapping(shape(f["geometry"]))
        assert g.equals(shape(again)) and g.equals(shape(f["geometry"]))
        assert shapely.to_geojson(g) and json.loads(shapely.to_geojson(g))["type"] == "Polygon"


def test_predictions_file_gives_the_same_classes_as_the_head(slide_store: tuple[Path, Path],
                                                             exported: tuple[dict, dict], tmp_path: Path) -> None:
    store, head = slide_store
    preds = tmp_path / "preds.arrow"
    assert _run("predict", store, "--head", head, "--out", preds)[0] == 0
    out = tmp_path / "p.geojson"
    code, _, err = _run("export-geojson", store, "--slide", SLIDE, "--predictions", preds, "--out", out)
    assert code == 0, err
    via_head = {f["properties"]["name"]: f["properties"] for f in _tiles(exported[0])}
    doc = json.loads(out.read_text())
    assert all(f["properties"]["objectType"] == "tile" for f in doc["features"])    # no --tissue
    for f in doc["features"]:
        p, q = f["properties"], via_head[f["properties"]["name"]]
        assert p["classification"] == q["classification"]
        assert p["measurements"]["prob_left"] == pytest.approx(q["measurements"]["prob_left"], abs=1e-6)


def test_tissue_features_are_valid_on_awkward_masks() -> None:
    """Holes, diagonal contacts, islands one pixel wide, tissue on the border: every polygon
    valid, none overlapping, the area that of the mask (marching squares trims convex corners
    by an eighth of a pixel and fills concave ones as much: a block with a hole is exact)."""
    block = np.zeros((40, 50), bool)
    block[10:30, 10:40] = True
    block[15:20, 15:20] = False                                # a hole
    (poly,) = [shape(f["geometry"]) for f in tissue_features(block, (500, 400))]
    assert poly.is_valid and len(poly.interiors) == 1
    assert poly.area == pytest.approx(block.sum() * 100, rel=1e-9)
    assert poly.bounds == pytest.approx((100, 100, 400, 300), abs=5.01)   # within half a pixel

    rng = np.random.default_rng(0)
    mask = rng.random((60, 80)) > 0.55
    mask[40, 40] = mask[41, 41] = True                         # touching at a corner only
    mask[0, :] = True                                          # tissue on the border
    polys = [shape(f["geometry"]) for f in tissue_features(mask, (800, 600))]
    assert len(polys) > 10 and all(p.is_valid for p in polys)
    assert shapely.union_all(polys).area == pytest.approx(sum(p.area for p in polys), rel=1e-9)
    assert 0.85 * mask.sum() * 100 < sum(p.area for p in polys) <= mask.sum() * 100
    assert tissue_features(np.zeros((5, 5), bool), (50, 50)) == []


@pytest.mark.parametrize("case", ["both-sources", "unknown-slide", "no-mask", "unknown-query"])
def test_bad_requests_are_one_line_and_write_nothing(slide_store: tuple[Path, Path], tmp_path: Path,
                                                     case: str) -> None:
    store, head = slide_store
    out = tmp_path / "x.geojson"
    args: list[object] = ["export-geojson", store, "--slide", SLIDE, "--out", out]
    if case == "both-sources":
        (tmp_path / "p.arrow").write_bytes(b"")
        args += ["--head", head, "--predictions", tmp_path / "p.arrow"]
    elif case == "unknown-slide":
        args[3] = "no-such-slide.svs"
    elif case == "no-mask":
        bare = tmp_path / "bare"
        shutil.copytree(store, bare)
        shutil.rmtree(bare / "masks")
        args[1] = bare
        args += ["--tissue"]
    else:
        args += ["--query", "nope/0_0"]
    code, _, err = _run(*args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert not out.exists()


def test_without_masks_the_side_comes_from_the_slide_mpp(slide_store: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = slide_store
    bare = tmp_path / "bare"
    shutil.copytree(store, bare)
    shutil.rmtree(bare / "masks")
    code, out, err = _run("export-geojson", bare, "--slide", SLIDE, "--out", tmp_path / "b.geojson", "--json")
    assert code == 0, err
    summary = json.loads(out)
    slide_mpp = open_store(bare).units()[f"slide:{SLIDE}"]["slide_mpp"]
    assert summary["geometry"] == "unit" and summary["tile_l0"] == pytest.approx(224 * 0.5 / slide_mpp)
