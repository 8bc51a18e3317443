"""The ``embedstore serve`` page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by ``.ci/run``) driven by selenium against uvicorn on a free
local port. Picks the slide store, clicks a slide and a point on it, waits for the gallery,
checks it; then uploads an image to the lung store. Saves a screenshot (also /tmp/serve.png).
The DeepZoom test opens the slide in the OpenSeadragon viewer, clicks in it, checks the gallery,
clicks a result and checks the viewer moved to it, then overlays a head's prediction
(screenshots /tmp/serve-osd-click.png, /tmp/serve-osd-result.png)."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from embedstore.serve import create_app  # noqa: E402

from test_serve_api import SAMPLE, build_lung_store, build_slide_store, train_halves_head  # noqa: E402

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
K = 6

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("serve-browser")
    wsi = build_slide_store(base / "wsi")
    app = create_app([wsi, build_lung_store(base / "lung", per_class=3)],
                     heads=[train_halves_head(wsi, base / "halves")])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start within 30 s"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {DRIVER} (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _loaded(driver: webdriver.Chrome, css: str) -> bool:
    return bool(driver.execute_script(
        "const ims = document.querySelectorAll(arguments[0]);"
        "return ims.length > 0 && [...ims].every(i => i.complete && i.naturalWidth > 0);", css))


def _open_page(server: str, browser: webdriver.Chrome) -> WebDriverWait:
    """The page loaded with both stores listed, k set to K and the slide store picked."""
    wait = WebDriverWait(browser, 60)
    browser.get(server + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#store option")) == 2)
    k_box = browser.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys(str(K))
    Select(browser.find_element(By.ID, "store")).select_by_value("wsi")
    return wait


def test_click_a_slide_region_shows_the_gallery(server: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    wait = _open_page(server, browser)
    thumb = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".slide-thumb"))[0]
    thumb.click()
    img = wait.until(lambda d: d.find_element(By.ID, "viewer-img") if _loaded(d, "#viewer-img") else None)
    ActionChains(browser).move_to_element_with_offset(img, 10, -20).click().perform()   # near the centre
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .result")) == K)
    scores = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .result .score")]
    assert len(scores) == K and scores == sorted(scores, reverse=True) and abs(scores[0] - 1) < 1e-3
    assert all(-1.0 <= s <= 1.0 + 1e-3 for s in scores)
    wheres = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .result .where")]
    assert all(w.startswith("CMU-1-Small-Region.svs (") for w in wheres), wheres
    assert browser.find_element(By.ID, "marker").is_displayed()
    wait.until(lambda d: _loaded(d, "#gallery .result img") and _loaded(d, "#heatmap"))
    assert "results" in browser.find_element(By.ID, "status").text
    # a result opens its slide with the spot marked
    browser.find_elements(By.CSS_SELECTOR, "#gallery .result")[2].click()
    wait.until(lambda d: d.find_element(By.ID, "marker").is_displayed())
    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
    shutil.copy(shot, "/tmp/serve.png")


def test_upload_an_image_to_the_lung_store(server: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    wait = WebDriverWait(browser, 60)
    browser.get(server + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#store option")) == 2)
    Select(browser.find_element(By.ID, "store")).select_by_value("lung")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".key-thumb")) == 9)
    image = sorted((SAMPLE / "lung" / "lung_scc").glob("*.jpeg"))[0]
    file_input = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].hidden = false;", file_input)
    file_input.send_keys(str(image))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .result")) == 9)
    first = browser.find_elements(By.CSS_SELECTOR, "#gallery .result")[0]
    assert first.get_attribute("title").startswith(f"lung_scc/{image.name}")
    assert float(first.find_element(By.CLASS_NAME, "score").text) > 0.999
    wait.until(lambda d: _loaded(d, "#gallery .result img"))
    browser.save_screenshot(str(tmp_path / "serve-upload.png"))
    shutil.copy(tmp_path / "serve-upload.png", "/tmp/serve-upload.png")


def _osd(driver: webdriver.Chrome, body: str) -> object:
    """Run ``body`` with ``v`` the page's OpenSeadragon viewer (null before a slide opens)."""
    return driver.execute_script("const v = window.embedstore.viewer(); " + body)


def _view(driver: webdriver.Chrome) -> list[float]:
    return list(_osd(driver, "const c = v.viewport.getCenter(); return [c.x, c.y, v.viewport.getZoom()];"))  # type: ignore[arg-type]


def _settled(driver: webdriver.Chrome) -> bool:
    """The slide open, every layer drawn at the current view, the viewer not animating."""
    return bool(_osd(driver, "if (!v || !v.world.getItemCount()) return false;"
                             "for (let i = 0; i < v.world.getItemCount(); i++)"
                             "  if (!v.world.getItemAt(i).getFullyLoaded()) return false;"
                             "return !v.viewport.getZoom(false) || "
                             "Math.abs(v.viewport.getZoom(true) - v.viewport.getZoom(false)) < 1e-6;"))


def test_deepzoom_viewer_click_search_and_jump_to_a_result(server: str, browser: webdriver.Chrome,
                                                          tmp_path: Path) -> None:
    wait = _open_page(server, browser)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".slide-thumb"))[0].click()
    wait.until(_settled)
    level0 = _osd(browser, "return [v.world.getItemAt(0).source.width, v.world.getItemAt(0).source.height];")
    assert level0 == [2220, 2967]                            # the DZI's size: the slide's level 0
    home = _view(browser)
    # a click in the viewer (not a drag) searches by the tile under it, the view stays put
    osd = browser.find_element(By.ID, "osd")
    ActionChains(browser).move_to_element_with_offset(osd, -40, 60).click().perform()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .result")) == K)
    scores = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .result .score")]
    assert scores == sorted(scores, reverse=True) and abs(scores[0] - 1) < 1e-3
    assert browser.find_element(By.ID, "osd-marker").is_displayed()
    wait.until(lambda d: _osd(d, "return window.embedstore.layers.similarity.item !== null "
                                 "&& v.world.getItemCount() === 2;"))
    wait.until(lambda d: _settled(d) and _loaded(d, "#gallery .result img"))
    assert _view(browser) == pytest.approx(home)
    shot = tmp_path / "serve-osd-click.png"
    assert browser.save_screenshot(str(shot))
    shutil.copy(shot, "/tmp/serve-osd-click.png")
    # a result opens its slide at that spot: the viewer zooms onto the tile and marks it
    result = browser.find_elements(By.CSS_SELECTOR, "#gallery .result")[3]
    x, y = (int(v) for v in result.find_element(By.CLASS_NAME, "where").text.split("(")[1].rstrip(")").split(","))
    side = float(_osd(browser, "return window.embedstore.state.info.tile_side;"))  # type: ignore[arg-type]
    result.click()
    want = [(x + side / 2) / 2220, (y + side / 2) / 2220]     # viewport units: the slide is 1 wide
    wait.until(lambda d: _view(d)[:2] == pytest.approx(want, abs=2e-3) and _view(d)[2] > 2 * home[2])
    wait.until(_settled)
    marker = browser.find_element(By.ID, "osd-marker")
    assert marker.is_displayed()
    box = osd.rect
    centre = (marker.rect["x"] + marker.rect["width"] / 2, marker.rect["y"] + marker.rect["height"] / 2)
    assert abs(centre[0] - (box["x"] + box["width"] / 2)) < 5 and abs(centre[1] - (box["y"] + box["height"] / 2)) < 5
    levels = _osd(browser, "return performance.getEntriesByType('resource').map(e => e.name)"
                           ".filter(n => n.includes('/dzi_files/')).map(n => +n.split('/dzi_files/')[1].split('/')[0]);")
    assert max(levels) >= 11, levels                          # full-resolution DeepZoom tiles were drawn
    # a head's prediction as a second overlay
    Select(browser.find_element(By.ID, "prediction")).select_by_visible_text("halves: P(right)")
    wait.until(lambda d: _osd(d, "return window.embedstore.layers.prediction.item !== null "
                                 "&& v.world.getItemCount() === 3;") and _loaded(d, "#prediction-overlay"))
    wait.until(_settled)
    shot = tmp_path / "serve-osd-result.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
    shutil.copy(shot, "/tmp/serve-osd-result.png")
