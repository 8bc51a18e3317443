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


def test_a_slide_tile_is_the_stored_tiles_pixels(client: TestClient, stores: tuple[Path, Path]) -> None:
    """A slide's tile, read through the server's open reader of that slide, holds the same
    pixels as reading the tile back from the store (``readback.read_tiles``)."""
    from embedstore.extract.readback import read_tiles

    st = open_store(stores[1])
    keys = client.get("/api/wsi/keys?limit=40").json()["keys"][::13]
    want = read_tiles(st, st.ids(keys), size=224)
    for key, img in zip(keys, want):
        got = np.asarray(_png(client.get(f"/api/wsi/tile/{key}")).convert("RGB"))
        assert img is not None and got.shape == img.shape == (224, 224, 3)
        np.testing.assert_array_equal(got, img)


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
    assert "--head" in CliRunner().invoke(main, ["serve", "--help"]).output


def test_cli_serve_bad_head_is_one_line(stores: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from embedstore.cli import main
    r = CliRunner().invoke(main, ["serve", str(stores[1]), "--head", str(tmp_path / "nohead"), "--port", "0"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "nohead" in r.stderr, r.stderr


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


# -- DeepZoom tiles (the OpenSeadragon viewer) ------------------------------------------------
DZ_NS = "{http://schemas.microsoft.com/deepzoom/2008}"


def _jpeg(r) -> Image.Image:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG"
    img.load()
    return img


def test_dzi_descriptor_is_the_slide_level0_size(client: TestClient) -> None:
    import xml.etree.ElementTree as ET

    from embedstore.extract.wsi import SlideReader
    r = client.get(f"/api/wsi/slide/{SLIDE}/dzi")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml"), r.text
    root = ET.fromstring(r.text)
    assert root.tag == f"{DZ_NS}Image"
    assert (root.get("Format"), root.get("TileSize"), root.get("Overlap")) == ("jpeg", "254", "1")
    size = root.find(f"{DZ_NS}Size")
    assert size is not None
    with SlideReader(SAMPLE / "wsi" / SLIDE) as reader:
        width, height = reader.dimensions
        assert (int(size.get("Width", 0)), int(size.get("Height", 0))) == (width, height) == (2220, 2967)
        info = client.get(f"/api/wsi/slide/{SLIDE}/info").json()
        assert (info["width"], info["height"]) == (width, height)
        # a full-resolution interior tile: 254 px and one px of overlap on each side, the slide's
        # own pixels at (253, 253) (within JPEG rounding)
        top = 12                                            # ceil(log2(2967))
        mid = _jpeg(client.get(f"/api/wsi/slide/{SLIDE}/dzi_files/{top}/1_1.jpeg"))
        assert mid.size == (256, 256) and mid.mode == "RGB"
        truth = reader.read_region(253, 253, 0, 256, 256).astype(np.float32)
    assert np.abs(np.asarray(mid, np.float32) - truth).mean() < 4.0


def test_dz_tiles_at_the_corners_and_the_coarsest_levels(client: TestClient) -> None:
    base = f"/api/wsi/slide/{SLIDE}/dzi_files"
    first = _jpeg(client.get(f"{base}/12/0_0.jpeg"))
    assert first.size == (255, 255)                        # overlap only towards neighbours
    last = _jpeg(client.get(f"{base}/12/8_11.jpeg"))        # 9 x 12 tiles; the last is the remainder
    assert last.size == (2220 - 8 * 254 + 1, 2967 - 11 * 254 + 1)
    assert _jpeg(client.get(f"{base}/0/0_0.jpeg")).size == (1, 1)
    whole = _jpeg(client.get(f"{base}/8/0_0.jpeg"))         # level 8: the slide / 16 in one tile
    assert whole.size == (139, 186) and max(whole.size) <= 256
    # the downsampled level looks like the thumbnail (the same tissue, not noise)
    thumb = _png(client.get(f"/api/wsi/slide/{SLIDE}/thumbnail")).convert("RGB").resize(whole.size)
    a, b = np.asarray(whole, np.float32).mean(axis=2), np.asarray(thumb, np.float32).mean(axis=2)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("url", [
    f"/api/wsi/slide/{SLIDE}/dzi_files/13/0_0.jpeg", f"/api/wsi/slide/{SLIDE}/dzi_files/12/9_0.jpeg",
    f"/api/wsi/slide/{SLIDE}/dzi_files/12/0_12.jpeg", f"/api/wsi/slide/{SLIDE}/dzi_files/0/1_0.jpeg",
    f"/api/wsi/slide/{SLIDE}/dzi_files/-1/0_0.jpeg", f"/api/wsi/slide/{SLIDE}/dzi_files/12/a_b.jpeg",
    f"/api/wsi/slide/{SLIDE}/dzi_files/12/0_0.png", f"/api/wsi/slide/{SLIDE}/dzi_files/99999999999999999999/0_0.jpeg",
    "/api/wsi/slide/other.svs/dzi", "/api/wsi/slide/other.svs/dzi_files/0/0_0.jpeg",
    "/api/wsi/slide/..%2F..%2Fetc%2Fpasswd/dzi", "/api/wsi/slide/%2Fetc%2Fpasswd/dzi_files/0/0_0.jpeg",
    f"/api/wsi/slide/..%2F{SLIDE}/dzi", f"/api/wsi/slide/x/..%2F..%2F{SLIDE}/dzi_files/0/0_0.jpeg",
    f"/api/lung/slide/{SLIDE}/dzi", f"/api/nosuch/slide/{SLIDE}/dzi",
    f"/api/wsi/slide/{SLIDE}/prediction?head=nosuch",
])
def test_dz_and_prediction_refusals_are_404_one_line(client: TestClient, url: str) -> None:
    _one_line_error(client.get(url), 404)


def test_dz_tiles_raw_traversal_through_the_real_server(stores: tuple[Path, Path]) -> None:
    """A literal ``../`` in a DeepZoom URL, sent unnormalised, is refused by the running app."""
    import http.client
    import socket
    import threading
    import time

    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(list(stores)), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=60)
        for raw in (f"/api/wsi/slide/../../../etc/passwd/dzi", f"/api/wsi/slide/../{SLIDE}/dzi",
                    f"/api/wsi/slide/x/../../{SLIDE}/dzi_files/0/0_0.jpeg", "/api/wsi/slide/../../STORE.json/dzi"):
            conn.request("GET", raw)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 404 and b"\n" not in body and set(json.loads(body)) == {"error"}, (raw, body)
        conn.request("GET", f"/api/wsi/slide/{SLIDE}/dzi_files/12/0_0.jpeg")
        assert conn.getresponse().read()[:2] == b"\xff\xd8"          # the real tile still serves
        conn.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


# -- prediction heatmaps from a head served with the store ----------------------------------
def train_halves_head(store: Path, out: Path) -> Path:
    """A head trained on the slide store ``store``: the left half of the slide against the right
    half (a second or so), saved to ``out``."""
    from embedstore.heads import HeadConfig, save_head, train_head
    st = open_store(store)
    bag = st.slide(SLIDE)
    y = np.where(bag.coords[:, 0] < np.median(bag.coords[:, 0]), "left", "right")
    head = train_head(np.asarray(bag.emb, np.float32), y,
                      config=HeadConfig(kind="linear", epochs=60, positive="right"), seed=0)
    head.fingerprint = st.fingerprint()
    return save_head(head, out)


@pytest.fixture(scope="module")
def head_dir(stores: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_halves_head(stores[1], tmp_path_factory.mktemp("heads") / "halves")


@pytest.fixture(scope="module")
def head_client(stores: tuple[Path, Path], head_dir: Path) -> TestClient:
    return TestClient(create_app(list(stores), heads=[head_dir]), raise_server_exceptions=False)


def _coloured_brightness(img: Image.Image, side: str) -> float:
    rgba = np.asarray(img, np.float32)
    half = rgba[:, : rgba.shape[1] // 2] if side == "left" else rgba[:, rgba.shape[1] // 2:]
    on = half[..., 3] > 0
    return float(half[..., :3].mean(axis=2)[on].mean())


def test_prediction_heatmap_of_a_served_head(head_client: TestClient, stores: tuple[Path, Path]) -> None:
    heads = head_client.get("/api/wsi/heads").json()
    assert heads == [{"name": "halves", "classes": ["left", "right"], "default": "right", "source": "head"}]
    assert {s["name"]: s["heads"] for s in head_client.get("/api/stores").json()}["wsi"] == heads
    assert "/api/{store}/slide/{slide}/prediction" in head_client.get("/openapi.json").json()["paths"]
    thumb = _png(head_client.get(f"/api/wsi/slide/{SLIDE}/thumbnail"))
    url = f"/api/wsi/slide/{SLIDE}/prediction"
    right = _png(head_client.get(url, params={"head": "halves", "cls": "right"}))
    left = _png(head_client.get(url, params={"head": "halves", "cls": "left"}))
    default = _png(head_client.get(url, params={"head": "halves"}))
    assert right.size == left.size == thumb.size and right.mode == "RGBA"
    assert np.array_equal(np.asarray(default), np.asarray(right))
    alpha = np.asarray(right)[..., 3]
    assert alpha.max() > 0 and (alpha == 0).any()        # tiles coloured, background clear
    assert np.array_equal(alpha, np.asarray(left)[..., 3])
    # viridis is bright where P is high: P(right) bright on the right half, P(left) on the left
    assert _coloured_brightness(right, "right") > _coloured_brightness(right, "left") + 40
    assert _coloured_brightness(left, "left") > _coloured_brightness(left, "right") + 40
    assert "classes" in _one_line_error(head_client.get(url, params={"head": "halves", "cls": "middle"}), 404)
    _one_line_error(head_client.get(url), 422)
    _one_line_error(head_client.get(f"/api/wsi/slide/other.svs/prediction", params={"head": "halves"}), 404)


def test_a_head_of_another_space_is_refused_at_start(stores: tuple[Path, Path], tmp_path: Path) -> None:
    from embedstore.errors import ConfigError
    from embedstore.heads import save_head, train_head
    rng = np.random.default_rng(0)
    head = train_head(rng.normal(size=(40, 1280)).astype(np.float32), np.repeat(["a", "b"], 20))
    save_head(head, tmp_path / "loose")                     # trained from arrays: no store's space
    with pytest.raises(ConfigError, match="'loose' fits none of the served stores"):
        create_app(list(stores), heads=[tmp_path / "loose"])


def test_a_predictions_file_draws_the_same_heatmap_as_its_head(stores: tuple[Path, Path], head_dir: Path,
                                                               head_client: TestClient, tmp_path: Path) -> None:
    """``embedstore predict``'s Arrow file, served with --predictions, gives the overlay the head
    itself gives (the same probabilities where its rows say the tiles are)."""
    from embedstore.errors import ConfigError, SourceError
    from embedstore.heads import load_head, predict_store
    out = tmp_path / "halves.arrow"
    predict_store(open_store(stores[1]), load_head(head_dir), out)
    client = TestClient(create_app(list(stores), predictions=[out]), raise_server_exceptions=False)
    listed = client.get("/api/wsi/heads").json()
    assert listed == [{"name": "halves.arrow", "classes": ["left", "right"], "default": "right", "source": "file"}]
    assert client.get("/api/lung/heads").json() == []          # the file names no slide of the lung store
    url = f"/api/wsi/slide/{SLIDE}/prediction"
    for cls in ("left", "right"):
        from_file = np.asarray(_png(client.get(url, params={"head": "halves.arrow", "cls": cls})))
        from_head = np.asarray(_png(head_client.get(url, params={"head": "halves", "cls": cls})))
        assert from_file.shape == from_head.shape and np.array_equal(from_file, from_head), cls
    _one_line_error(client.get(url, params={"head": "halves.arrow", "cls": "up"}), 404)
    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"not arrow")
    with pytest.raises(SourceError, match="not readable as Arrow"):
        create_app(list(stores), predictions=[bad])
    with pytest.raises(ConfigError, match="names none of the served stores' slides"):
        create_app([stores[0]], predictions=[out])
