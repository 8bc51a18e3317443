// The embedstore search page: plain JS over the JSON API (see /docs) and the vendored
// OpenSeadragon viewer (DeepZoom tiles from /api/<store>/slide/<slide>/dzi); nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const enc = (s) => s.split("/").map(encodeURIComponent).join("/");   // keys and slides keep their "/"
const state = { store: null, slide: null, info: null, query: null, heads: [] };  // query: {key} | {vector, name}
// overlays drawn over the slide: an <img> over the thumbnail and an image layer in the viewer
const layers = { similarity: { img: "heatmap", item: null, url: null, gen: 0 },
                 prediction: { img: "prediction-overlay", item: null, url: null, gen: 0 } };
let viewer = null, osdMarker = null;
window.embedstore = { state, layers, viewer: () => viewer };   // for the browser test and debugging

function api(path) { return "/api/" + encodeURIComponent(state.store) + path; }

async function getJSON(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function getBlob(url, options) {
  const r = await fetch(url, options);
  if (!r.ok) throw new Error((await r.json().catch(() => ({ error: r.statusText }))).error);
  return r.blob();
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function filters() {
  const p = new URLSearchParams({ k: $("k").value || "10" });
  const label = $("label").value.trim();
  if (label) p.set("label", label);
  return p;
}

async function loadStores() {
  const stores = await getJSON("/api/stores");
  const sel = $("store");
  sel.innerHTML = "";
  for (const s of stores) {
    const o = document.createElement("option");
    o.value = s.name;
    o.textContent = `${s.name} (${s.rows} tiles, ${s.slides} slides)`;
    o.dataset.heads = JSON.stringify(s.heads || []);
    sel.appendChild(o);
  }
  if (stores.length) await pickStore(stores[0].name);
}

function showHeads(heads) {
  state.heads = heads;
  const sel = $("prediction");
  sel.innerHTML = `<option value="">none</option>`;
  for (const h of heads) {
    for (const c of h.classes) {
      const o = document.createElement("option");
      o.value = JSON.stringify({ head: h.name, cls: c });
      o.textContent = `${h.name}: P(${c})`;
      sel.appendChild(o);
    }
  }
  $("prediction-box").hidden = !heads.length;
}

async function pickStore(name) {
  state.store = name;
  state.slide = state.info = state.query = null;
  $("viewer").hidden = $("osd").hidden = $("query").hidden = true;
  $("gallery").innerHTML = "";
  const opt = [...$("store").options].find((o) => o.value === name);
  showHeads(opt ? JSON.parse(opt.dataset.heads || "[]") : []);
  const box = $("slides");
  box.innerHTML = "";
  const slides = await getJSON(api("/slides"));
  $("view-title").textContent = slides.length ? "Pick a slide, then click a region of it"
    : "Click a tile, or drop an image, to search by it";
  if (slides.length) {
    $("browse-title").textContent = `Slides (${slides.length})`;
    box.className = "";
    for (const s of slides) {
      const div = document.createElement("div");
      div.className = "slide-thumb";
      div.dataset.slide = s.slide;
      div.innerHTML = `<img loading="lazy" alt=""><div></div>`;
      div.querySelector("img").src = api(`/slide/${enc(s.slide)}/thumbnail`);
      div.querySelector("div").textContent = s.slide;
      div.addEventListener("click", () => openSlide(s.slide).catch((e) => setStatus(e.message, true)));
      box.appendChild(div);
    }
  } else {                                   // a store of tile files: browse its tiles instead
    const page = await getJSON(api("/keys?limit=60"));
    $("browse-title").textContent = `Tiles (first ${page.keys.length} of ${page.total}): click one`;
    box.className = "keys";
    for (const key of page.keys) {
      const div = document.createElement("div");
      div.className = "key-thumb";
      div.title = key;
      div.innerHTML = `<img loading="lazy" alt="">`;
      div.querySelector("img").src = api(`/tile/${enc(key)}?size=64`);
      div.addEventListener("click", () => searchKey(key));
      box.appendChild(div);
    }
  }
}

// -- the DeepZoom viewer -------------------------------------------------------------------
function makeViewer() {
  viewer = OpenSeadragon({
    element: $("osd"), prefixUrl: "/static/vendor/openseadragon/images/",
    showNavigator: true, navigatorPosition: "TOP_RIGHT", showRotationControl: false,
    gestureSettingsMouse: { clickToZoom: false }, maxZoomPixelRatio: 2, animationTime: 0.6,
  });
  osdMarker = document.createElement("div");
  osdMarker.id = "osd-marker";
  viewer.addHandler("canvas-click", (e) => {
    if (!e.quick || !state.slide || !viewer.world.getItemAt(0)) return;
    const p = viewer.world.getItemAt(0).viewerElementToImageCoordinates(e.position);
    searchAt(p.x, p.y, false);
  });
}

function openDzi(url) {
  return new Promise((ok, fail) => {
    const done = () => { viewer.removeHandler("open", opened); viewer.removeHandler("open-failed", failed); };
    const opened = () => { done(); ok(); };
    const failed = (e) => { done(); fail(new Error("viewer: " + (e.message || "cannot open the slide"))); };
    viewer.addHandler("open", opened);
    viewer.addHandler("open-failed", failed);
    viewer.open(url);
  });
}

function slideRect(x, y, w, h) {   // level-0 pixels -> viewport rectangle of the slide
  return viewer.world.getItemAt(0).imageToViewportRectangle(x, y, w, h);
}

function focusTile(x, y, side) {   // the tile with three tiles' context each side
  viewer.viewport.fitBounds(slideRect(x - 1.5 * side, y - 1.5 * side, 4 * side, 4 * side));
}

async function openSlide(slide, mark) {
  if (state.slide !== slide) {
    state.slide = slide;
    state.info = await getJSON(api(`/slide/${enc(slide)}/info`));
    $("viewer").hidden = $("osd").hidden = false;
    if (!viewer) makeViewer();
    for (const L of Object.values(layers)) clearLayer(L);     // the viewer drops its layers on open
    const img = $("viewer-img");
    await Promise.all([
      new Promise((ok) => { img.onload = ok; img.onerror = ok; img.src = api(`/slide/${enc(slide)}/thumbnail`); }),
      openDzi(api(`/slide/${enc(slide)}/dzi`)),
    ]);
  }
  for (const d of document.querySelectorAll(".slide-thumb")) d.classList.toggle("active", d.dataset.slide === slide);
  $("view-title").textContent = `${slide}: click a region to search by the tile under it`;
  if (mark) {
    markTile(mark.x, mark.y, state.info.tile_side);
    focusTile(mark.x, mark.y, state.info.tile_side);
  } else {
    $("marker").hidden = true;
    viewer.removeOverlay(osdMarker);
  }
  await Promise.all([drawHeatmap(), drawPrediction()]);
}

function markTile(x, y, side) {
  const info = state.info, m = $("marker");
  m.style.left = (100 * x / info.width) + "%";
  m.style.top = (100 * y / info.height) + "%";
  m.style.width = (100 * side / info.width) + "%";
  m.style.height = (100 * side / info.height) + "%";
  m.hidden = false;
  viewer.removeOverlay(osdMarker);
  viewer.addOverlay({ element: osdMarker, location: slideRect(x, y, side, side) });
}

// a click on the thumbnail (which also moves the viewer there) or in the viewer
async function searchAt(x, y, focus) {
  try {
    const tile = await getJSON(api(`/slide/${enc(state.slide)}/tile_at?x=${Math.max(0, x)}&y=${Math.max(0, y)}`));
    markTile(tile.x, tile.y, tile.side);
    if (focus) focusTile(tile.x, tile.y, tile.side);
    await searchKey(tile.key);
  } catch (e) { setStatus(e.message, true); }
}

function clickThumbnail(ev) {
  const rect = $("viewer-img").getBoundingClientRect();
  searchAt((ev.clientX - rect.left) / rect.width * state.info.width,
           (ev.clientY - rect.top) / rect.height * state.info.height, true);
}

// -- search ----------------------------------------------------------------------------------
function showQuery(html) { $("query").innerHTML = html; $("query").hidden = false; }

async function searchKey(key) {
  state.query = { key };
  const p = filters();
  p.set("key", key);
  if ($("exclude-same-slide").checked) p.set("exclude_same_slide", "true");
  showQuery(`query <img alt="" src="${api("/tile/" + enc(key))}?size=96"><span></span>`);
  $("query").querySelector("span").textContent = key;
  await run(() => getJSON(api("/search?" + p)));
}

async function searchFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  state.query = null;
  showQuery(`query <img alt=""><span></span>`);
  $("query").querySelector("img").src = URL.createObjectURL(file);
  $("query").querySelector("span").textContent = file.name;
  const out = await run(() => getJSON(api("/search/image?" + filters()), { method: "POST", body: form }));
  if (out) {
    state.query = { vector: out.vector, name: file.name };
    if (state.slide) await drawHeatmap();
  }
}

async function run(request) {
  setStatus("searching...");
  $("gallery").innerHTML = "";
  try {
    const out = await request();
    showResults(out.results);
    setStatus(`${out.results.length} results (${out.method})`);
    if (!state.slide && out.results.length && out.results[0].slide) {
      await openSlide(out.results[0].slide, out.results[0]);   // an image query: the best match's slide
    } else {
      await drawHeatmap();
    }
    return out;
  } catch (e) { setStatus(e.message, true); return null; }
}

function showResults(results) {
  const g = $("gallery");
  results.forEach((r, i) => {
    const div = document.createElement("div");
    div.className = "result";
    div.innerHTML = `<img loading="lazy" alt=""><div><span class="rank">#${i + 1}</span> ` +
      `<span class="score"></span></div><div class="where"></div>`;
    div.querySelector("img").src = api(`/tile/${enc(r.key)}?size=160`);
    div.querySelector(".score").textContent = r.score.toFixed(4);
    div.querySelector(".where").textContent = r.slide ? `${r.slide} (${r.x}, ${r.y})` : r.key;
    div.title = r.key + (r.label != null ? ` — label ${r.label}` : "");
    if (r.slide) div.addEventListener("click", () => openSlide(r.slide, r).catch((e) => setStatus(e.message, true)));
    g.appendChild(div);
  });
}

// -- overlays --------------------------------------------------------------------------------
function clearLayer(L) {
  if (L.item && viewer && viewer.world.getIndexOfItem(L.item) >= 0) viewer.world.removeItem(L.item);
  L.item = null;
  $(L.img).hidden = true;
  if (L.url) URL.revokeObjectURL(L.url);
  L.url = null;
}

// show the PNG ``load()`` fetches as layer ``name`` (over the thumbnail and in the viewer); null: clear
async function setLayer(name, load) {
  const L = layers[name], gen = ++L.gen;
  let blob = null;
  if (load) {
    try { blob = await load(); } catch (e) { if (gen === L.gen) { clearLayer(L); setStatus(`${name}: ${e.message}`, true); } return; }
  }
  if (gen !== L.gen) return;                 // a newer request replaced this one
  clearLayer(L);
  if (!blob) return;
  L.url = URL.createObjectURL(blob);
  $(L.img).src = L.url;
  $(L.img).hidden = false;
  await new Promise((ok) => viewer.addTiledImage({
    tileSource: { type: "image", url: L.url }, x: 0, y: 0, width: 1,
    success: (ev) => { if (gen === L.gen) L.item = ev.item; else viewer.world.removeItem(ev.item); ok(); },
    error: () => ok(),
  }));
}

async function drawHeatmap() {
  if (!$("show-heatmap").checked || !state.slide || !state.query) return setLayer("similarity", null);
  const url = api(`/slide/${enc(state.slide)}/heatmap`), q = state.query;
  return setLayer("similarity", () => q.key ? getBlob(`${url}?key=${encodeURIComponent(q.key)}`)
    : getBlob(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(q.vector) }));
}

async function drawPrediction() {
  const choice = $("prediction").value;
  if (!choice || !state.slide) return setLayer("prediction", null);
  const { head, cls } = JSON.parse(choice);
  const p = new URLSearchParams({ head, cls });
  return setLayer("prediction", () => getBlob(api(`/slide/${enc(state.slide)}/prediction?${p}`)));
}

function setupDrop() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    searchFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
}

window.addEventListener("DOMContentLoaded", () => {
  $("store").addEventListener("change", (e) => pickStore(e.target.value).catch((x) => setStatus(x.message, true)));
  $("viewer-img").addEventListener("click", clickThumbnail);
  $("show-heatmap").addEventListener("change", drawHeatmap);
  $("prediction").addEventListener("change", drawPrediction);
  setupDrop();
  loadStores().catch((e) => setStatus(e.message, true));
});
