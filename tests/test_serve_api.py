"""``embedstore serve``'s JSON API over two small real stores (the shipped lung tiles and the
shipped slide), through FastAPI's TestClient: search by key, image and vector, tile and slide
images, and the requests it must refuse with one line of JSON (traversal, unknown names, bad
and oversized uploads)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from embedstore.extract.runner import ExtractConfig, extract  # noqa: E402
from embedstore.index import build_index  # noqa: E402
from embedstore.serve import create_app  # noqa: E402
from embedstore.serve.stores import short_names  # noqa: E402
from embedstore.store import open_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
ONNX = "mobilenetv2-onnx-int8"
SLIDE = "CMU-1-Small-Region.svs"


def build_lung_store(path: Path, per_class: int = 6) -> Path:
    """A store of the first ``per_class`` shipped lung tiles of each class (a store of files)."""
    src = path.parent / f"{path.name}-tiles"
    for cls in ("lung_aca", "lung_n", "lung_scc"):
        (src / cls).mkdir(parents=True)
        for p in sorted((SAMPLE / "lung" / cls).glob("*.jpeg"))[:per_class]:
            shutil.copy(p, src / cls / p.name)
    extract([src], ExtractConfig(store=path, backbone=ONNX, progress=False, num_workers=0, num_threads=1))
    build_index(open_store(path), kind="flat")
    return path


def build_slide_store(path: Path) -> Path:
    """A store of the shipped slide's tiles at 0.5 µm/px (no index: search scans exactly)."""
    extract([SAMPLE / "wsi"], ExtractConfig(store=path, target_mpp=0.5, backbone=ONNX, progress=False,
                                            num_workers=0, num_threads=1))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("serve")
    return build_lung_store(base / "lung"), build_slide_store(base / "wsi")


@pytest.fixture(scope="module")
def client(stores: tuple[Path, Path]) -> TestClient:
    app = create_app(list(stores), max_upload=1 << 20)
    return TestClient(app, raise_server_exceptions=False)


def _one_line_error(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert "\n" not in r.text and "Traceback" not in r.text, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"], body
    return body["error"]


def _png(r) -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


def test_short_names_are_directory_names_deduplicated(tmp_path: Path) -> None:
    assert short_names([tmp_path / "a" / "lung", tmp_path / "b" / "lung", tmp_path / "my store"]) == \
        ["lung", "lung-2", "my_store"]


def test_stores_slides_and_openapi(client: TestClient) -> None:
    stores = {s["name"]: s for s in client.get("/api/stores").json()}
    assert set(stores) == {"lung", "wsi"}
    assert stores["lung"]["rows"] == 18 and stores["lung"]["dim"] == 1280 and stores["lung"]["slides"] == 0
    assert client.get("/api/wsi/slides").json() == [{"slide": SLIDE}]
    assert client.get("/api/lung/slides").json() == []
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/stores", "/api/{store}/search", "/api/{store}/search/image", "/api/{store}/search/vector",
              "/api/{store}/tile/{key}", "/api/{store}/slide/{slide}/thumbnail",
              "/api/{store}/slide/{slide}/heatmap", "/api/{store}/slide/{slide}/tile_at"):
        assert p in paths, p
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "fetch(" in client.get("/static/app.js").text


def test_search_by_key_finds_itself_then_neighbours(client: TestClient) -> None:
    key = client.get("/api/lung/keys?limit=5").json()["keys"][2]
    out = client.get("/api/lung/search", params={"key": key, "k": 5}).json()
    res = out["results"]
    assert len(res) == 5 and res[0]["key"] == key and abs(res[0]["score"] - 1) < 1e-3
    assert set(res[0]) >= {"key", "id", "score", "slide", "x", "y"}
    assert [r["score"] for r in res] == sorted((r["score"] for r in res), reverse=True)
    assert "index" in out["method"]                       # the flat index built above
    # filters: a label recorded at extraction (the class folder)
    label = client.get("/api/lung/search", params={"key": key, "k": 3, "label": "lung_scc"}).json()
    assert len(label["results"]) == 3 and all(r["key"].startswith("lung_scc/") for r in label["results"])


def test_search_on_a_slide_excludes_its_slide(client: TestClient) -> None:
    info = client.get(f"/api/wsi/slide/{SLIDE}/info").json()
    tile = client.get(f"/api/wsi/slide/{SLIDE}/tile_at", params={"x": info["width"] / 2, "y": info["height"] / 2}).json()
    assert tile["inside"] and tile["slide"] == SLIDE
    res = client.get("/api/wsi/search", params={"key": tile["key"], "k": 4}).json()["results"]
    assert res[0]["key"] == tile["key"] and (res[0]["x"], res[0]["y"]) == (tile["x"], tile["y"])
    none = client.get("/api/wsi/search", params={"key": tile["key"], "exclude_same_slide": "true"}).json()
    assert none["results"] == []                          # the store holds one slide


def test_search_by_image_and_by_vector(client: TestClient) -> None:
    image = sorted((SAMPLE / "lung" / "lung_n").glob("*.jpeg"))[1]
    r = client.post("/api/lung/search/image?k=3", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["results"][0]["key"] == f"lung_n/{image.name}" and out["results"][0]["score"] > 0.999
    vector = out["vector"]
    assert len(vector) == 1280
    by_vec = client.post("/api/lung/search/vector?k=3", json=vector).json()
    assert [x["key"] for x in by_vec["results"]] == [x["key"] for x in out["results"]]


def test_tile_thumbnail_and_heatmap_images(client: TestClient) -> None:
    key = client.get("/api/lung/keys?limit=1").json()["keys"][0]
    assert _png(client.get(f"/api/lung/tile/{key}")).size == (224, 224)
    assert _png(client.get(f"/api/lung/tile/{key}?size=64")).size == (64, 64)
    wsi_key = client.get("/api/wsi/keys?limit=1").json()["keys"][0]
    assert _png(client.get(f"/api/wsi/tile/{wsi_key}")).size == (224, 224)
    info = client.get(f"/api/wsi/slide/{SLIDE}/info").json()
    thumb = _png(client.get(f"/api/wsi/slide/{SLIDE}/thumbnail"))
    assert thumb.size == (info["thumb_width"], info["thumb_height"]) and max(thumb.size) <= 1024
    heat = _png(client.get(f"/api/wsi/slide/{SLIDE}/heatmap", params={"key": wsi_key}))
    assert heat.size == thumb.size and heat.mode == "RGBA"
    alpha = np.asarray(heat)[..., 3]
    assert alpha.max() > 0 and (alpha == 0).any()        # tiles coloured, background clear
    vec = client.post("/api/lung/search/vector?k=1", json=[0.1] * 1280)
    assert vec.status_code == 200
    post = client.post(f"/api/wsi/slide/{SLIDE}/heatmap", json=[0.1] * 1280)
    assert _png(post).size == thumb.size


@pytest.mark.parametrize("url", [
    "/api/lung/tile/../STORE.json", "/api/lung/tile/%2e%2e/STORE.json", "/api/lung/tile/%2e%2e%2fSTORE.json",
    "/api/lung/tile//etc/passwd", "/api/lung/tile/%2Fetc%2Fpasswd", "/api/lung/tile/lung_n/../../STORE.json",
    "/api/lung/tile/STORE.json", "/api/lung/tile/no/such.jpeg",
    "/api/wsi/slide/..%2F..%2Fetc%2Fpasswd/thumbnail", "/api/wsi/slide/%2Fetc%2Fpasswd/thumbnail",
    "/api/wsi/slide/other.svs/thumbnail", "/api/wsi/slide/other.svs/heatmap?key=x",
    "/api/nosuch/slides", "/api/..%2Flung/slides", "/api/lung/search?key=..%2FSTORE.json",
    "/api/nothing/here/at/all",
])
def test_refused_requests_are_404_one_line(client: TestClient, url: str) -> None:
    r = client.get(url)
    # httpx may normalise a literal "../" away; whatever reaches the app must be refused
    error = _one_line_error(r, 404)
    assert "passwd" not in r.text or "not in store" in error or "no API" in error or "no store" in error


def test_bad_requests_are_4xx_one_line(client: TestClient) -> None:
    key = client.get("/api/lung/keys?limit=1").json()["keys"][0]
    _one_line_error(client.get("/api/lung/search", params={"key": key, "k": 0}), 422)
    _one_line_error(client.get("/api/lung/search", params={"key": key, "k": "many"}), 422)
    _one_line_error(client.get("/api/lung/search"), 422)
    _one_line_error(client.get("/api/lung/search", params={"key": key, "task": "t"}), 400)
    assert "1280" in _one_line_error(client.post("/api/lung/search/vector", json=[1.0, 2.0]), 400)
    _one_line_error(client.post("/api/lung/search/vector", json={"not": "a list"}), 422)
    _one_line_error(client.post("/api/lung/search/vector", content=b"{", headers={"content-type": "application/json"}), 422)
    _one_line_error(client.post("/api/wsi/slide/x.svs/heatmap", json=[0.0] * 1280), 404)
    _one_line_error(client.get(f"/api/wsi/slide/{SLIDE}/tile_at", params={"x": -1, "y": 3}), 422)


def test_bad_and_oversized_uploads(client: TestClient) -> None:
    text = _one_line_error(client.post("/api/lung/search/image", files={"file": ("x.png", b"not an image", "image/png")}), 400)
    assert "not a readable image" in text
    _one_line_error(client.post("/api/lung/search/image", files={"other": ("x.png", b"x", "image/png")}), 422)
    big = b"\0" * ((1 << 20) + 10)                            # the test app's cap is 1 MB
    assert "bytes" in _one_line_error(client.post("/api/lung/search/image", files={"file": ("big.png", big, "image/png")}), 413)
    huge = io.BytesIO()
    Image.new("RGB", (9000, 8000)).save(huge, format="PNG")   # small file, too many pixels
    assert "pixels" in _one_line_error(client.post("/api/lung/search/image", files={"file": ("h.png", huge.getvalue(), "image/png")}), 400)
    _one_line_error(client.post("/api/nosuch/search/image", files={"file": ("x.png", b"x", "image/png")}), 404)


def test_unexpected_error_is_500_one_line(stores: tuple[Path, Path]) -> None:
    from embedstore.serve.stores import served_stores
    served = served_stores(list(stores))

    def broken(*args: object, **kw: object) -> dict:
        raise RuntimeError("boom\nwith a second line")
    served["lung"].search = broken  # type: ignore[method-assign]
    client = TestClient(create_app(served), raise_server_exceptions=False)
    text = _one_line_error(client.get("/api/lung/search", params={"key": "x"}), 500)
    assert "RuntimeError" in text and "boom" not in text


def test_cli_serve_help_and_bad_store(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedstore.cli import main
    r = CliRunner().invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "--host" in r.output and "127.0.0.1" in r.output
    r = CliRunner().invoke(main, ["serve", str(tmp_path / "missing")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr


def test_cli_serve_binds_localhost_and_prints_the_url(stores: tuple[Path, Path]) -> None:
    import http.client
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "embedstore", "serve", *map(str, stores), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("embedstore serve: http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)   # bound before the line
        conn.request("GET", "/api/stores")
        resp = conn.getresponse()
        assert resp.status == 200 and {s["name"] for s in json.loads(resp.read())} == {"lung", "wsi"}
        # a raw request line, not normalised by any client, reaches the real server
        for raw in ("/api/lung/tile/../../STORE.json", "/api/lung/tile/lung_n/../STORE.json",
                    "/api/wsi/slide/../../../etc/passwd/thumbnail"):
            conn.request("GET", raw)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 404 and b"\n" not in body and set(json.loads(body)) == {"error"}, (raw, body)
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
