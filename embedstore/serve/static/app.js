// The embedstore search page: plain JS over the JSON API (see /docs); nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const enc = (s) => s.split("/").map(encodeURIComponent).join("/");   // keys and slides keep their "/"
const state = { store: null, slide: null, info: null, query: null };  // query: {key} | {vector, name}

function api(path) { return "/api/" + encodeURIComponent(state.store) + path; }

async function getJSON(url, options) {
  const r = await fetch(url, options);
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
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
    sel.appendChild(o);
  }
  if (stores.length) await pickStore(stores[0].name);
}

async function pickStore(name) {
  state.store = name;
  state.slide = state.info = state.query = null;
  $("viewer").hidden = true;
  $("query").hidden = true;
  $("gallery").innerHTML = "";
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
      div.addEventListener("click", () => openSlide(s.slide));
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

async function openSlide(slide, mark) {
  if (state.slide !== slide) {
    state.slide = slide;
    state.info = await getJSON(api(`/slide/${enc(slide)}/info`));
    const img = $("viewer-img");
    await new Promise((ok) => { img.onload = ok; img.onerror = ok; img.src = api(`/slide/${enc(slide)}/thumbnail`); });
  }
  for (const d of document.querySelectorAll(".slide-thumb")) d.classList.toggle("active", d.dataset.slide === slide);
  $("viewer").hidden = false;
  $("view-title").textContent = `${slide}: click a region to search by the tile under it`;
  if (mark) markTile(mark.x, mark.y, state.info.tile_side); else $("marker").hidden = true;
  await drawHeatmap();
}

function markTile(x, y, side) {
  const info = state.info, m = $("marker");
  m.style.left = (100 * x / info.width) + "%";
  m.style.top = (100 * y / info.height) + "%";
  m.style.width = (100 * side / info.width) + "%";
  m.style.height = (100 * side / info.height) + "%";
  m.hidden = false;
}

async function clickViewer(ev) {
  const img = $("viewer-img"), rect = img.getBoundingClientRect();
  const x = (ev.clientX - rect.left) / rect.width * state.info.width;
  const y = (ev.clientY - rect.top) / rect.height * state.info.height;
  try {
    const tile = await getJSON(api(`/slide/${enc(state.slide)}/tile_at?x=${Math.max(0, x)}&y=${Math.max(0, y)}`));
    markTile(tile.x, tile.y, tile.side);
    await searchKey(tile.key);
  } catch (e) { setStatus(e.message, true); }
}

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
  if (out) state.query = { vector: out.vector, name: file.name };
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

async function drawHeatmap() {
  const h = $("heatmap");
  if (!$("show-heatmap").checked || !state.slide || !state.query) { h.hidden = true; return; }
  const url = api(`/slide/${enc(state.slide)}/heatmap`);
  try {
    let r;
    if (state.query.key) r = await fetch(`${url}?key=${encodeURIComponent(state.query.key)}`);
    else r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                body: JSON.stringify(state.query.vector) });
    if (!r.ok) throw new Error((await r.json()).error);
    if (h.src.startsWith("blob:")) URL.revokeObjectURL(h.src);
    h.src = URL.createObjectURL(await r.blob());
    h.hidden = false;
  } catch (e) { h.hidden = true; setStatus("heatmap: " + e.message, true); }
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
  $("viewer-img").addEventListener("click", clickViewer);
  $("show-heatmap").addEventListener("change", drawHeatmap);
  setupDrop();
  loadStores().catch((e) => setStatus(e.message, true));
});
