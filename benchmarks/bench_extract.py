#!/usr/bin/env python
"""Extraction throughput: ``extract()`` end to end against the model alone, and against a
per-slide loop in TRIDENT's style.

    .venv/bin/python benchmarks/bench_extract.py            # the full run (~40 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_extract.py --quick    # a smoke run (small counts, 1 repeat)

Side by side, batch 64, on the same tiles and weights, in one process:

* **tiles**: tiles/s of ``extract()`` from 224 px JPEGs (LC25000 lung, ``--tiles-dir``) into a
  fresh store, wall clock of the whole call (discovery, backbone load, DataLoader start, decode,
  forward, store commit, label import), against ``bb.embed`` on the same tiles decoded in
  memory beforehand (same batch size, same intra-op thread count; one warm-up batch when the
  backbone is made, not timed). ResNet-18 (seeded random init, fp32) on ``--resnet-tiles``
  tiles, the shipped int8 ONNX MobileNetV2 on ``--onnx-tiles``. Every thread-budget setting in
  ``--configs`` (DataLoader workers x intra-op threads; ``default`` leaves both to the runner:
  ``runner.default_workers``: 0 on 2 cores, else cores - 1; torch's default thread count for
  both models; ``/ahead``, ``/plain``: ``decode_ahead`` True, False: with 0 workers the next
  batch decoded in a helper thread, or each batch in the model's thread) is measured; the best
  end-to-end setting per model is carried into the next sections.
* **slide**: the same from whole slides: ``--slide-copies-*`` copies of the shipped CMU-1 small
  region (``sample_data/wsi``) under different names in the scratch folder, tissue tiles at
  0.5 µm/px, 224 px (the runner plans, masks, saves overlays, reads, embeds), against
  ``bb.embed`` on the same tiles read beforehand with ``read_tile`` on the same grid. Each
  of those slides has 55 tissue tiles, about 200 times fewer than a real one, so the per-slide
  work (mask, overlay, open, hash) weighs about 200 times more than on a real archive.
* **trident**: ``--trident-slides`` copies of that slide, ONNX model, embedstore's one
  persistent DataLoader against the loop TRIDENT runs (reproduced here, not imported):
  segmentation + patch coordinates for every slide (here ``plan_slide`` and its saved
  overlay / mask / grid, exactly what the runner does, plus TRIDENT's per-slide ``_patches.h5``
  coordinate file), then for every slide a new ``torch.utils.data.DataLoader`` over that
  slide's tiles (TRIDENT's worker count, ``int(0.75 * cores)`` clipped to >= 1,
  ``pin_memory=False``), forward per batch, and the slide's features written to
  ``<slide>.h5`` (``features`` float32 + ``coords``, one-row chunks, ``mode='w'``). Same grid,
  same reads, same ``bb.embed`` (preprocessing included), same workers and threads on both sides.
* **bf16**: ResNet-18 model-only fp32 against bf16 autocast on this CPU: speed ratio and
  cosine agreement of the embeddings (mean, min over tiles).

Each figure is the median of ``--repeats`` runs. Every end-to-end run is paired with a
model-only run right next to it (which goes first alternates; budgets rotate) and each ratio
is the median of the per-pair ratios, because the machine is shared and its load drifts over
minutes. ``default`` resolves to w0/t2 on 2 cores and is measured once. Every end-to-end store is checked
against the model-only embeddings (cosine) so both sides did the same work. Scratch lives in
``benchmarks/scratch/bench_extract`` (removed at the end unless ``--keep``); results go to
``benchmarks/results/bench_extract-<cpu>-<cores>c-<host>-<date>.json``.
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))
import _harness as H  # noqa: E402

NAME = "bench_extract"
RESNET = "resnet18"
ONNX = "mobilenetv2-onnx-int8"
BATCH = 64
TILE = 224
MPP = 0.5
SLIDE = REPO / "sample_data" / "wsi" / "CMU-1-Small-Region.svs"
TILE_DIRS = (Path("/work/shared/data/lc25000_lung"), REPO / "sample_data" / "lung")
TARGETS = {("tiles", RESNET): 0.9, ("tiles", ONNX): 0.8, ("slide", RESNET): 0.8,
           ("slide", ONNX): 0.8, ("trident", ONNX): 1.3}
WORK = H.SCRATCH / NAME


# -- thread budget ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """DataLoader workers x intra-op threads; None leaves the choice to the runner. ``ahead``
    (label suffix ``/ahead`` or ``/plain``): ``decode_ahead`` True or False, with 0 workers
    the next batch decoded in a helper thread or each batch in the model's thread; None (no
    suffix): the runner's default (on)."""
    workers: int | None
    threads: int | None
    ahead: bool | None = None

    @property
    def label(self) -> str:
        tail = {None: "", True: "/ahead", False: "/plain"}[self.ahead]
        if self.workers is None and self.threads is None:
            return "default" + tail
        w = "def" if self.workers is None else str(self.workers)
        t = "def" if self.threads is None else str(self.threads)
        return f"w{w}/t{t}{tail}"

    @classmethod
    def parse(cls, s: str) -> Budget:
        ahead = True if s.endswith("/ahead") else False if s.endswith("/plain") else None
        s = s.removesuffix("/ahead").removesuffix("/plain")
        if s == "default":
            return cls(None, None, ahead)
        m = re.fullmatch(r"w(\d+|def)/t(\d+|def)", s)
        if not m:
            raise argparse.ArgumentTypeError(f"bad budget {s!r}: 'default' or wN/tM, then /ahead or /plain")
        conv = lambda v: None if v == "def" else int(v)  # noqa: E731
        return cls(conv(m.group(1)), conv(m.group(2)), ahead)


_TORCH_DEFAULT_THREADS: int | None = None


def torch_default_threads() -> int:
    global _TORCH_DEFAULT_THREADS
    if _TORCH_DEFAULT_THREADS is None:
        import torch
        _TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before anything in here changes it
    return _TORCH_DEFAULT_THREADS


def set_torch_threads(n: int | None) -> None:
    import torch
    torch.set_num_threads(n or torch_default_threads())


def runner_default_workers() -> int:
    """What ExtractConfig(num_workers=None) resolves to on the CPU (runner.default_workers)."""
    from embedstore.extract.runner import default_workers
    return default_workers("cpu")


def trident_workers(batch: int) -> int:
    """TRIDENT's DataLoader worker rule (its get_num_workers with the defaults):
    75% of the cores, clipped to [1, 2 * batch]."""
    return int(np.clip(int(0.75 * (os.cpu_count() or 16)), 1, 2 * batch))


def thread_key(model: str, threads: int | None) -> int | None:
    """The model-only baseline a budget is compared with: left unset, both torch and the ONNX
    backbone run torch's default thread count."""
    return torch_default_threads() if threads is None else threads


def describe(model: str, b: Budget) -> dict[str, Any]:
    workers = runner_default_workers() if b.workers is None else b.workers
    if b.threads is not None:
        threads: Any = b.threads
    else:
        threads = torch_default_threads()
    ahead = b.ahead if b.ahead is not None else True     # the runner's default
    return {"workers": workers, "threads": threads, "decode_ahead": ahead and workers == 0}


# -- inputs ------------------------------------------------------------------------------------
def tile_files(root: Path) -> list[Path]:
    exts = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def subset(files: list[Path], n: int) -> list[Path]:
    """``n`` files spread evenly over the sorted list (every class represented)."""
    if n >= len(files):
        return list(files)
    idx = np.linspace(0, len(files) - 1, n).round().astype(int)
    return [files[i] for i in idx]


def write_csv(path: Path, files: list[Path]) -> Path:
    """A source CSV (absolute paths, class folder as label): the key of a tile is its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for f in files:
            w.writerow([str(f), f.parent.name])
    return path


def decode(files: list[Path]) -> np.ndarray:
    """The tiles decoded as the DataLoader workers decode them (PIL, RGB, HWC uint8)."""
    from PIL import Image
    out = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if a.shape != (TILE, TILE, 3):
            raise SystemExit(f"{f}: {a.shape}, expected {TILE} px tiles")
        out.append(a)
    return np.stack(out)


def slide_copies(n: int) -> list[Path]:
    d = WORK / "slides"
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"slide_{i:03d}.svs"
        if not p.exists():
            shutil.copyfile(SLIDE, p)
        out.append(p)
    return out


def slide_grid() -> tuple[Any, np.ndarray]:
    """The tissue grid of the shipped slide (as the runner plans it) and its tiles, read."""
    from embedstore.extract.wsi import SlideReader, plan_slide, read_tile
    with SlideReader(SLIDE) as r:
        g = plan_slide(r, MPP, TILE).grid
        tiles = np.stack([read_tile(r, g, i) for i in range(len(g))])
    return g, tiles


# -- measuring ---------------------------------------------------------------------------------
class Models:
    """Backbones for the model-only baselines, made once per (model, threads, precision)."""

    def __init__(self) -> None:
        self._bb: dict[tuple[str, int | None, str | None], Any] = {}

    def get(self, model: str, threads: int | None, precision: str | None = None) -> Any:
        k = (model, threads, precision)
        if k not in self._bb:
            from embedstore.backbones import create_backbone
            set_torch_threads(threads)
            kw: dict[str, Any] = {"random_init": True} if model != ONNX else {}
            bb = create_backbone(model, precision=precision, num_threads=threads, **kw)
            bb.embed(np.zeros((BATCH, TILE, TILE, 3), np.uint8))  # warm-up, not timed
            self._bb[k] = bb
        return self._bb[k]


def model_only(bb: Any, tiles: np.ndarray, n: int, threads: int | None) -> tuple[float, np.ndarray]:
    """tiles/s of ``bb.embed`` over ``n`` tiles (``tiles`` cycled), batches of BATCH."""
    set_torch_threads(threads)
    idx = np.arange(n) % len(tiles)
    gc.collect()
    outs = []
    t0 = time.perf_counter()
    for s in range(0, n, BATCH):
        outs.append(bb.embed(tiles[idx[s:s + BATCH]]).numpy())
    dt = time.perf_counter() - t0
    return n / dt, np.concatenate(outs)


_run_no = 0


def run_extract(sources: Sequence[Path], model: str, b: Budget, expect: int,
                slides: bool) -> tuple[float, Any, Path]:
    """Wall seconds of one ``extract()`` into a fresh store (a new path each time: the
    catalog of a deleted store stays cached in-process under its path)."""
    from embedstore.extract.runner import ExtractConfig, extract
    global _run_no
    _run_no += 1
    store = WORK / "stores" / f"{_run_no:04d}"
    shutil.rmtree(store, ignore_errors=True)
    set_torch_threads(None)  # extract sets the threads itself when asked
    cfg = ExtractConfig(store=store, backbone=model, random_init=model != ONNX, batch_size=BATCH,
                        num_workers=b.workers, num_threads=b.threads, progress=False,
                        target_mpp=MPP if slides else None, tile_size=TILE if slides else None,
                        decode_ahead=b.ahead)
    gc.collect()
    t0 = time.perf_counter()
    res = extract([str(s) for s in sources], cfg)
    wall = time.perf_counter() - t0
    if res.errors or res.tiles_written != expect:
        raise SystemExit(f"extract wrote {res.tiles_written} of {expect} tiles, errors {res.errors[:3]}")
    return wall, res, store


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def rotate(xs: list[Any], r: int) -> list[Any]:
    k = r % len(xs)
    return xs[k:] + xs[:k]


def summarise(per_round: list[float]) -> float:
    return float(H.median(per_round))


# -- sections ----------------------------------------------------------------------------------
def e2e_vs_model(section: str, model: str, budgets: list[Budget], sources: list[Path],
                 tiles: np.ndarray, n: int, slides: bool, repeats: int, models: Models,
                 check: Callable[[Path, np.ndarray], np.ndarray]) -> list[dict[str, Any]]:
    """``repeats`` rounds; in each, every budget (rotating order) runs ``extract()`` next to a
    model-only pass at its thread count (which goes first alternates by round). The ratio
    of a budget is the median of its per-pair ratios: the load of a shared machine drifts
    over minutes, far less over one pair."""
    for b in budgets:
        models.get(model, thread_key(model, b.threads))
    e2e: dict[Budget, list[float]] = {b: [] for b in budgets}
    base: dict[Budget, list[float]] = {b: [] for b in budgets}
    stages: dict[Budget, list[dict[str, float]]] = {b: [] for b in budgets}
    agree: dict[Budget, float] = {}
    for r in range(repeats):
        for b in rotate(budgets, r):
            k = thread_key(model, b.threads)
            emb = None
            for kind in (("model", "e2e") if r % 2 == 0 else ("e2e", "model")):
                if kind == "model":
                    tps, emb = model_only(models.get(model, k), tiles, n, k)
                    base[b].append(tps)
                    print(f"  [{section} {model}] round {r + 1} model-only t={k}: {tps:.1f} tiles/s",
                          flush=True)
                else:
                    wall, res, store = run_extract(sources, model, b, n, slides)
                    e2e[b].append(n / wall)
                    stages[b].append({s: round(v, 3) for s, v in res.stages.items()})
                    print(f"  [{section} {model}] round {r + 1} extract {b.label}: {n / wall:.1f} tiles/s "
                          f"(wall {wall:.1f} s; " + ", ".join(f"{s} {v:.1f}" for s, v in res.stages.items())
                          + ")", flush=True)
            if b not in agree and emb is not None:  # same work: same embeddings
                agree[b] = float(check(store, emb).min())
            shutil.rmtree(store, ignore_errors=True)
    rows = []
    target = TARGETS[(section, model)]
    units = len(sources) if slides else None
    for b in budgets:
        ratios = [e / m for e, m in zip(e2e[b], base[b])]
        ratio = summarise(ratios)
        plan = summarise([st.get("plan", 0.0) for st in stages[b]])
        walls = [n / e for e in e2e[b]]
        # where the end-to-end time went, beyond the forward passes: the model waiting for
        # input (planning, which runs in the sampler, included) and fixed costs (discovery,
        # backbone load, store creation, worker start, label import)
        setup = [w - sum(st.get(x, 0.0) for x in ("wait", "transfer", "forward", "write"))
                 for w, st in zip(walls, stages[b])]
        slowdown = [st.get("forward", 0.0) / (n / m) for st, m in zip(stages[b], base[b])]
        rows.append({
            "bench": section, "model": model, "config": b.label, **describe(model, b),
            "tiles": n, "slides": units, "e2e_tps": summarise(e2e[b]), "base_tps": summarise(base[b]),
            "ratio": ratio, "ratio_of_medians": summarise(e2e[b]) / summarise(base[b]),
            "ratios": ratios, "e2e_runs": e2e[b], "base_runs": base[b], "stages": stages[b],
            "plan_s": plan, "plan_s_per_slide": plan / units if units else None,
            "e2e_s": n / summarise(e2e[b]),
            "wait_s": summarise([st.get("wait", 0.0) for st in stages[b]]),
            "setup_s": summarise(setup),
            "forward_vs_model_only": summarise(slowdown),  # extract's forward s / model-only s
            "cos_min_vs_model_only": agree.get(b),
            "target": target, "met": ratio >= target,
        })
    best = max(rows, key=lambda row: row["e2e_tps"])
    for row in rows:
        row["best"] = row is best
    return rows


def distinct(model: str, budgets: list[Budget]) -> list[Budget]:
    """Budgets that resolve to different settings (for a torch model, ``default`` is
    w<default workers>/t<torch default> and is measured once, under the name ``default``)."""
    out: list[Budget] = []
    seen: set[tuple[Any, Any, Any]] = set()
    for b in budgets:
        d = describe(model, b)
        key = (d["workers"], d["threads"], d["decode_ahead"])
        if key not in seen:
            seen.add(key)
            out.append(b)
    return out


def store_check_files(files: list[Path]) -> Callable[[Path, np.ndarray], np.ndarray]:
    def check(store: Path, ref: np.ndarray) -> np.ndarray:
        from embedstore.store.reader import open_store
        got = open_store(store).get([str(f) for f in files])
        return cosine(got, ref[:len(files)])
    return check


def store_check_slides(grid: Any) -> Callable[[Path, np.ndarray], np.ndarray]:
    def check(store: Path, ref: np.ndarray) -> np.ndarray:
        from embedstore.store.reader import open_store
        s = open_store(store)
        out = []
        pos = {(int(x), int(y)): i for i, (x, y) in enumerate(zip(grid.x, grid.y))}
        for name in s.slides():
            bag = s.slide(name)
            order = [pos[(int(x), int(y))] for x, y in bag.coords]
            out.append(cosine(np.asarray(bag.emb), ref[order]))
        return np.concatenate(out)
    return check


# -- TRIDENT's loop, reproduced ----------------------------------------------------------------
def _save_h5(path: Path, assets: dict[str, np.ndarray], attrs: dict[str, dict[str, Any]]) -> None:
    """Per-slide h5 as TRIDENT writes it: each array chunked one row per chunk, growable,
    file opened with mode 'w'."""
    import h5py
    with h5py.File(path, "w") as f:
        for name, a in assets.items():
            d = f.create_dataset(name, shape=a.shape, dtype=a.dtype, chunks=(1,) + a.shape[1:],
                                 maxshape=(None,) + a.shape[1:])
            d[:] = a
            for k, v in attrs.get(name, {}).items():
                d.attrs[k] = v


def _read_coords(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import h5py
    with h5py.File(path, "r") as f:
        return f["coords"][:], dict(f["coords"].attrs)


def _slide_dataset_cls() -> type:
    import torch

    class SlideTiles(torch.utils.data.Dataset):
        """One slide's tiles, item i = the tile at coords[i] (TRIDENT's per-slide patch dataset);
        the slide is opened in the worker on first use."""

        def __init__(self, path: str, coords: np.ndarray, level: int, read_size: int, tile: int) -> None:
            self.path, self.coords = path, coords
            self.level, self.read_size, self.tile = level, read_size, tile
            self._reader: Any = None

        def __len__(self) -> int:
            return len(self.coords)

        def __getitem__(self, i: int) -> tuple[Any, np.ndarray]:
            from embedstore.extract.wsi import SlideReader
            if self._reader is None:
                self._reader = SlideReader(self.path)
            x, y = self.coords[i]
            a = self._reader.read_region(int(x), int(y), self.level, self.read_size, self.read_size)
            if self.read_size != self.tile:
                from PIL import Image
                a = np.asarray(Image.fromarray(a).resize((self.tile, self.tile), Image.Resampling.LANCZOS))
            return torch.from_numpy(np.ascontiguousarray(a)), self.coords[i]

    return SlideTiles


def trident_loop(slides: list[Path], out: Path, workers: int, threads: int | None) -> dict[str, float]:
    """TRIDENT's job structure on ``slides``: segmentation + coordinates for every slide, then
    per slide a fresh DataLoader, forward per batch, features + coords to ``<slide>.h5``."""
    import torch

    from embedstore.backbones import create_backbone
    from embedstore.extract.wsi import SlideReader, plan_slide
    SlideTiles = _slide_dataset_cls()
    set_torch_threads(threads)
    t0 = time.perf_counter()
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "patches").mkdir(parents=True, exist_ok=True)
    (out / "features").mkdir(parents=True, exist_ok=True)
    for p in slides:  # segmentation + patching jobs
        with SlideReader(p) as r:
            plan = plan_slide(r, MPP, TILE)
        plan.save(out / "masks", p.stem)
        g = plan.grid
        _save_h5(out / "patches" / f"{p.stem}_patches.h5",
                 {"coords": np.stack([g.x, g.y], axis=1).astype(np.int64)},
                 {"coords": {"patch_size": TILE, "target_mpp": MPP, "slide_mpp": g.slide_mpp,
                             "level": g.level, "read_size": g.read_size, "name": p.stem}})
    t1 = time.perf_counter()
    bb = create_backbone(ONNX, num_threads=threads)  # the encoder, loaded once for the job
    for p in slides:  # feature extraction job
        coords, attrs = _read_coords(out / "patches" / f"{p.stem}_patches.h5")
        with SlideReader(p):  # the WSI object is opened (metadata) before its loader is built
            pass
        ds = SlideTiles(str(p), coords, int(attrs["level"]), int(attrs["read_size"]), TILE)
        loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers, pin_memory=False)
        feats = [bb.embed(imgs).numpy() for imgs, _ in loader]
        features = np.concatenate(feats) if feats else np.zeros((0, bb.dim), np.float32)
        _save_h5(out / "features" / f"{p.stem}.h5", {"features": features, "coords": coords},
                 {"features": {"name": p.stem}, "coords": attrs})
    t2 = time.perf_counter()
    return {"total": t2 - t0, "segment_patch": t1 - t0, "features": t2 - t1}


def trident_section(slides: list[Path], threads: int | None, repeats: int,
                    per_slide: int) -> dict[str, Any]:
    workers = trident_workers(BATCH)
    b = Budget(workers, threads)
    n = per_slide * len(slides)
    es: list[float] = []
    tr: list[dict[str, float]] = []
    es_stages: list[dict[str, float]] = []
    cos_min = None
    for r in range(repeats):
        for side in rotate(["embedstore", "trident"], r):
            if side == "embedstore":
                wall, res, store = run_extract(slides, ONNX, b, n, slides=True)
                es.append(wall)
                es_stages.append({k: round(v, 3) for k, v in res.stages.items()})
                keep_store = store
                print(f"  [trident] round {r + 1} embedstore: {wall:.1f} s ({n / wall:.1f} tiles/s; "
                      + ", ".join(f"{k} {v:.1f}" for k, v in res.stages.items()) + ")", flush=True)
            else:
                out = WORK / "trident" / f"{r}"
                shutil.rmtree(out, ignore_errors=True)
                gc.collect()
                t = trident_loop(slides, out, workers, threads)
                tr.append(t)
                print(f"  [trident] round {r + 1} per-slide loop: {t['total']:.1f} s ({n / t['total']:.1f} "
                      f"tiles/s; segment+patch {t['segment_patch']:.1f}, features {t['features']:.1f})",
                      flush=True)
            if es and tr and cos_min is None:  # same work: same features for a slide
                import h5py

                from embedstore.store.reader import open_store
                s = open_store(keep_store)
                bag = s.slide(slides[0].name)
                with h5py.File(out / "features" / f"{slides[0].stem}.h5", "r") as f:
                    fe, co = f["features"][:], f["coords"][:]
                pos = {(int(x), int(y)): i for i, (x, y) in enumerate(co)}
                cos_min = float(cosine(np.asarray(bag.emb), fe[[pos[(int(x), int(y))] for x, y in bag.coords]]).min())
        shutil.rmtree(WORK / "stores", ignore_errors=True)
        shutil.rmtree(WORK / "trident", ignore_errors=True)
    totals = [t["total"] for t in tr]
    ratios = [t / e for t, e in zip(totals, es)]
    ratio = summarise(ratios)
    target = TARGETS[("trident", ONNX)]
    return {
        "bench": "trident", "model": ONNX, "config": b.label, **describe(ONNX, b),
        "slides": len(slides), "tiles": n, "e2e_tps": n / summarise(es),
        "base_tps": n / summarise(totals), "ratio": ratio, "ratios": ratios,
        "embedstore_s": es, "embedstore_stages": es_stages, "trident_s": tr,
        "trident_features_only_s": summarise([t["features"] for t in tr]),
        "trident_segment_patch_s": summarise([t["segment_patch"] for t in tr]),
        "cos_min_vs_model_only": cos_min, "target": target, "met": ratio >= target,
    }


def bf16_section(tiles: np.ndarray, n: int, threads: int | None, repeats: int,
                 models: Models) -> dict[str, Any]:
    k = thread_key(RESNET, threads)
    fp, bf = models.get(RESNET, k, "fp32"), models.get(RESNET, k, "bf16")
    runs: dict[str, list[float]] = {"fp32": [], "bf16": []}
    embs: dict[str, np.ndarray] = {}
    for r in range(repeats):
        for name in rotate(["fp32", "bf16"], r):
            tps, e = model_only(fp if name == "fp32" else bf, tiles, n, k)
            runs[name].append(tps)
            embs[name] = e
            print(f"  [bf16] round {r + 1} {name}: {tps:.1f} tiles/s", flush=True)
    f32, b16 = embs["fp32"], embs["bf16"]
    cos = cosine(b16, f32)
    # embeddings of one backbone share a large common component (random-init ResNet-18: mean
    # cosine between different tiles ~0.99), so also compare them with the fp32 mean removed
    mu = f32.mean(0, keepdims=True)
    cos_c = cosine(b16 - mu, f32 - mu)
    u = f32 / np.linalg.norm(f32, axis=1, keepdims=True)
    between = (u @ u.T)[np.triu_indices(len(u), 1)]
    rel = np.linalg.norm(b16 - f32, axis=1) / np.linalg.norm(f32, axis=1)
    ratios = [b / f for b, f in zip(runs["bf16"], runs["fp32"])]
    return {"bench": "bf16", "model": RESNET, "config": f"t{k}", "threads": k, "tiles": n,
            "e2e_tps": summarise(runs["bf16"]), "base_tps": summarise(runs["fp32"]),
            "ratio": summarise(ratios), "ratios": ratios, "runs": runs,
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "cos_centred_mean": float(cos_c.mean()), "cos_centred_min": float(cos_c.min()),
            "rel_err_max": float(rel.max()), "fp32_between_tiles_cos_mean": float(between.mean()),
            "target": None, "met": None,
            "note": (f"cos mean {cos.mean():.6f} min {cos.min():.6f}; mean-removed: mean "
                     f"{cos_c.mean():.4f} min {cos_c.min():.4f}")}


# -- main --------------------------------------------------------------------------------------
def cpu_tag(m: dict[str, Any]) -> str:
    cpu = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", str(m.get("cpu") or "cpu"))
    cpu = re.sub(r"[^A-Za-z0-9]+", "_", cpu).strip("_")[:40] or "cpu"
    return f"{cpu}-{m.get('cores_usable') or m.get('cores')}c"


def main(argv: list[str] | None = None) -> int:  # long: ~20 flags, then the sections in order
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles-dir", type=Path, default=next((d for d in TILE_DIRS if d.is_dir()), TILE_DIRS[-1]))
    ap.add_argument("--resnet-tiles", type=int, default=192)
    ap.add_argument("--onnx-tiles", type=int, default=1500)
    ap.add_argument("--slide-copies-resnet", type=int, default=4)
    ap.add_argument("--slide-copies-onnx", type=int, default=16)
    ap.add_argument("--trident-slides", type=int, default=50)
    ap.add_argument("--bf16-tiles", type=int, default=256)
    ap.add_argument("--configs", type=Budget.parse, nargs="+",
                    default=[Budget.parse(s) for s in ("default", "default/ahead", "default/plain", "w1/t2",
                                                       "w1/t1", "w0/t2", "w0/t1")])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", nargs="+", default=["tiles", "slide", "trident", "bf16"],
                    choices=["tiles", "slide", "trident", "bf16"])
    ap.add_argument("--quick", action="store_true", help="small counts, one repeat (a smoke run)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    if args.quick:
        args.resnet_tiles, args.onnx_tiles, args.bf16_tiles = 64, 192, 64
        args.slide_copies_resnet, args.slide_copies_onnx, args.trident_slides = 1, 3, 4
        args.repeats = 1

    torch_default_threads()
    m = H.machine()
    print(f"{NAME}: {m['cpu']}, {m['cores']} cores ({m.get('cores_usable')} usable), load {m.get('loadavg')}; "
          f"torch default threads {torch_default_threads()}, runner default workers "
          f"{runner_default_workers()}, TRIDENT workers {trident_workers(BATCH)}", flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    models = Models()
    rows: list[dict[str, Any]] = []
    best: dict[str, Budget] = {}
    t_start = time.perf_counter()
    try:
        all_files = tile_files(args.tiles_dir)
        if "tiles" in args.sections:
            for model, n in ((RESNET, args.resnet_tiles), (ONNX, args.onnx_tiles)):
                files = subset(all_files, n)
                src = write_csv(WORK / f"tiles_{model}.csv", files)
                tiles = decode(files)
                got = e2e_vs_model("tiles", model, distinct(model, args.configs), [src], tiles, len(files), False,
                                   args.repeats, models, store_check_files(files))
                rows += got
                b = next(r for r in got if r["best"])
                best[model] = Budget.parse(b["config"])
        for model in (RESNET, ONNX):
            best.setdefault(model, Budget(None, None))
        if "slide" in args.sections or "trident" in args.sections:
            grid, slide_tiles = slide_grid()
            print(f"  slide: {len(grid)} tissue tiles at {MPP} um/px (level {grid.level}, "
                  f"read {grid.read_size} px)", flush=True)
        if "slide" in args.sections:
            for model, copies in ((RESNET, args.slide_copies_resnet), (ONNX, args.slide_copies_onnx)):
                slides = slide_copies(copies)
                budgets = distinct(model, [Budget(None, None), Budget(None, None, True),
                                           Budget(None, None, False), best[model], Budget(1, 1)])
                rows += e2e_vs_model("slide", model, budgets, slides, slide_tiles,
                                     len(grid) * copies, True, args.repeats, models,
                                     store_check_slides(grid))
        if "trident" in args.sections:
            slides = slide_copies(args.trident_slides)
            rows.append(trident_section(slides, best[ONNX].threads, args.repeats, len(grid)))
        if "bf16" in args.sections:
            files = subset(all_files, args.bf16_tiles)
            rows.append(bf16_section(decode(files), len(files), best[RESNET].threads, args.repeats, models))
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)

    for r in rows:
        r["ratio_s"] = f"{r['ratio']:.3f}x"
        r["target_s"] = f">={r['target']:.2f}x" if r.get("target") else "-"
        r["note"] = r.get("note") or ("best" if r.get("best") else "")
        if r["bench"] == "trident":
            r["note"] = (f"embedstore vs per-slide loop, {r['slides']} slides; cos min "
                         f"{r['cos_min_vs_model_only']:.4f}")
        elif r.get("cos_min_vs_model_only") is not None and r["bench"] in ("tiles", "slide"):
            r["note"] = (r["note"] + "; " if r["note"] else "") + f"cos min {r['cos_min_vs_model_only']:.4f}"
            if r.get("plan_s_per_slide"):
                r["note"] += (f"; plan {r['plan_s_per_slide']:.2f} s/slide = "
                              f"{100 * r['plan_s'] / r['e2e_s']:.0f}% of wall")
    print()
    text = H.print_table(rows, [
        ("bench", "bench", None), ("model", "model", None), ("config", "workers/threads", None),
        ("tiles", "tiles", "d"), ("e2e_tps", "measured tiles/s", ".1f"),
        ("base_tps", "baseline tiles/s", ".1f"), ("ratio_s", "ratio", ""),
        ("target_s", "target", None), ("met", "met", None), ("note", "note", None)],
        title=(f"{NAME} on {m['cpu']} ({m['cores']} cores), batch {BATCH}, median of {args.repeats}; "
               "measured = extract() end to end (trident: embedstore; bf16: bf16 autocast), "
               "baseline = bb.embed on pre-decoded tiles (trident: per-slide loop; bf16: fp32)"))
    doc_rows = [{k: v for k, v in r.items() if k not in ("target_s", "ratio_s")} for r in rows]
    extra = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k != "configs"},
             "configs": [b.label for b in args.configs],
             "torch_default_threads": torch_default_threads(),
             "runner_default_workers": runner_default_workers(),
             "trident_workers": trident_workers(BATCH),
             "best": {k: v.label for k, v in best.items()},
             "elapsed_s": time.perf_counter() - t_start, "table": text}
    path = H.write_results(NAME, doc_rows, extra, tag=f"{cpu_tag(m)}-{H.machine_tag()}",
                           machine_info=m)
    print(f"\nresults: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
