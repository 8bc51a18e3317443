"""The data sets of ``bench_index.py``, each written once into a real store with held-out
queries beside it (``ROOT/store``, ``ROOT/queries.npy``; ``ROOT/truth.npy`` is the exact top-10
that the Flat phase writes), and the helpers every phase shares (opening, recall, timing).

* ``clustered``: isotropic clusters plus a rank-32 spread (n / 1000 clusters), float16;
* ``spectrum``: one Gaussian whose covariance eigenvalues decay as exp(-i / 50) under a random
  rotation: a participation ratio (sum l)^2 / sum l^2 of ~100, i.e. intrinsic dimension ~100,
  no clusters;
* ``pcam``: real embeddings: the PatchCamelyon tiles of ``../shared/data/pcam`` embedded by the
  shipped ONNX MobileNetV2 (1280-d) with K = 8 stored augmented views per tile (the store
  ``bench_pcam_heads.py`` extracts; extracted here if absent). Indexed: every ``train`` tile
  and its views, each tile with its views as one slide (one source image: PCam names no
  slides); queries: the ``valid`` tiles, from other slides, whose views are left out.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import _harness as H
from embedstore.store.atomic import atomic_write_text

__all__ = ["K", "SETS", "PCAM_STORE", "PCAM_CSV", "parse_set", "set_root", "write_set",
           "write_synthetic",
           "open_root", "recall", "best_seconds"]

K = 10
SETS = ("clustered", "spectrum", "pcam")
TILES_PER_SLIDE = 2000           # rows per unit (one synthetic slide) in the store
PCAM_CSV = H.HERE.parents[1] / "shared" / "data" / "pcam" / "labels.csv"
PCAM_STORE = H.SCRATCH / "pcam_heads" / "mobilenetv2-onnx-int8-v8"
PCAM_VIEWS = 8


def parse_set(text: str) -> tuple[str, int, int]:
    """``clustered:300000x768`` -> ("clustered", 300000, 768); ``pcam`` -> ("pcam", 0, 0)
    (its size is the data's)."""
    name, _, size = text.partition(":")
    if name not in SETS:
        raise SystemExit(f"unknown data set {name!r} in {text!r}; choose from {', '.join(SETS)}")
    if name == "pcam":
        return name, 0, 0
    try:
        n, dim = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"data set {text!r}: give its size as NAME:NxDIM, e.g. "
                         "spectrum:300000x768") from None
    return name, n, dim


def set_root(name: str, n: int, dim: int) -> Path:
    return H.SCRATCH / (f"index-{name}" if name == "pcam" else f"index-{name}-{n}x{dim}")


def _clustered(dim: int, n_clusters: int, seed: int) -> Callable[[int, int], np.ndarray]:
    """Clustered embeddings: cluster centre + rank-32 spread + isotropic noise (float16)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    basis = (rng.normal(size=(32, dim)) / np.sqrt(32)).astype(np.float32)

    def draw(count: int, draw_seed: int) -> np.ndarray:
        r = np.random.default_rng(draw_seed)
        z = r.integers(0, n_clusters, size=count)
        x = centres[z] + 0.8 * (r.standard_normal((count, 32), dtype=np.float32) @ basis)
        x += 0.3 * r.standard_normal((count, dim), dtype=np.float32)
        return x.astype(np.float16)
    return draw


def _spectrum(dim: int, seed: int, tau: float = 50.0) -> Callable[[int, int], np.ndarray]:
    """Decaying spectrum: eigenvalues exp(-i / tau) (participation ratio ~2 tau) under a random
    rotation, plus a small common offset; float16."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    scale = np.exp(-np.arange(dim) / (2 * tau)).astype(np.float32)      # sqrt of eigenvalues
    basis = (scale[:, None] * rotation.T).astype(np.float32)
    offset = (0.2 * rng.normal(size=dim) / np.sqrt(dim)).astype(np.float32)

    def draw(count: int, draw_seed: int) -> np.ndarray:
        r = np.random.default_rng(draw_seed)
        return (r.standard_normal((count, dim), dtype=np.float32) @ basis + offset).astype(np.float16)
    return draw


def _save_queries(root: Path, q: np.ndarray) -> None:
    from embedstore.store.atomic import atomic_path

    with atomic_path(root / "queries.npy") as tmp:      # written last: the store is complete
        with open(tmp, "wb") as f:
            np.save(f, q)


def write_synthetic(root: Path, name: str, n: int, dim: int, n_queries: int,
                    tiles_per_slide: int = TILES_PER_SLIDE) -> dict[str, Any]:
    """``n`` rows of the ``clustered`` or ``spectrum`` set into ``root/store`` (one unit per
    ``tiles_per_slide`` rows, with slide and x metadata), then its held-out queries."""
    from embedstore.store import StoreMeta, StoreWriter

    draw = _clustered(dim, max(100, n // 1000), seed=0) if name == "clustered" else \
        _spectrum(dim, seed=0)
    meta = StoreMeta(dim=dim, dtype="float16", backbone={"name": f"synthetic-{name}"},
                     tile={"tile_size": 224})
    with StoreWriter(root / "store", meta) as w:
        for s in range(0, n, tiles_per_slide):
            count = min(tiles_per_slide, n - s)
            slide = f"slide{s // tiles_per_slide:04d}"
            w.add(draw(count, 1000 + s // tiles_per_slide),
                  [f"{slide}/{i}" for i in range(s, s + count)], unit=slide, slide=slide,
                  x=224 * np.arange(count), y=0)
            w.end_unit(slide)
    _save_queries(root, draw(n_queries, 7))                 # held out: never stored
    return {"n": n, "dim": dim, "queries": n_queries}


def _pcam_source(source: Path, csv_path: Path) -> Any:
    """The ONNX MobileNetV2 pcam store with its views: opened, or extracted when absent."""
    from embedstore.store import open_store

    if not (source / "STORE.json").exists():
        from embedstore.extract.runner import ExtractConfig, extract

        source.parent.mkdir(parents=True, exist_ok=True)
        res = extract([str(csv_path)], ExtractConfig(store=source, backbone="mobilenetv2-onnx-int8",
                                                     views=PCAM_VIEWS, progress=False))
        if res.errors:
            raise SystemExit(f"extracting {csv_path} into {source}: {len(res.errors)} errors")
    return open_store(source)


def _write_pcam(root: Path, source: Path, csv_path: Path) -> dict[str, Any]:
    """Every train tile and its stored views -> the indexed store; valid tiles -> queries."""
    from embedstore.store import StoreWriter

    src = _pcam_source(source, csv_path)
    with open(csv_path, newline="") as f:
        split = {row["path"]: row["split"] for row in csv.DictReader(f)}
    ids = np.asarray(src.all_ids(), dtype=np.int64)
    keys = np.asarray(src.keys_of(ids), dtype=object)
    unknown = [k for k in keys if k not in split]
    if unknown:
        raise SystemExit(f"{source}: tile {unknown[0]!r} is not in {csv_path}")
    is_train = np.array([split[k] == "train" for k in keys])
    views = src.views()
    if not len(views.ids):
        raise SystemExit(f"{source} holds no augmented views; extract it with --views {PCAM_VIEWS}")
    meta = src.meta
    n_rows = 0
    with StoreWriter(root / "store", meta.__class__(dim=meta.dim, dtype=meta.dtype,
                                                    backbone=meta.backbone, tile=meta.tile)) as w:
        train_ids = ids[is_train]
        for u, s in enumerate(range(0, len(train_ids), 500)):
            chunk = train_ids[s:s + 500]
            j = np.flatnonzero(np.isin(views.ids, chunk))
            emb = np.concatenate([src.gather(chunk), views.gather(j)])
            tiles = list(src.keys_of(chunk)) + list(src.keys_of(views.ids[j]))
            names = tiles[:len(chunk)] + [f"{k}#view{v}" for k, v in
                                          zip(tiles[len(chunk):], views.view[j])]
            unit = f"train{u:03d}"
            # a tile and its views share a "slide": one source image (PCam gives no slide ids)
            w.add(emb, names, unit=unit, slide=tiles)
            w.end_unit(unit)
            n_rows += len(names)
    _save_queries(root, src.gather(ids[~is_train]))
    return {"n": n_rows, "dim": int(meta.dim), "queries": int((~is_train).sum()),
            "source": str(source), "tiles": int(is_train.sum()),
            "views_per_tile": PCAM_VIEWS, "backbone": str(meta.backbone.get("name"))}


def write_set(root: Path, name: str, n: int, dim: int, n_queries: int,
              pcam_source: Path = PCAM_STORE, pcam_csv: Path = PCAM_CSV) -> dict[str, Any]:
    """Write the data set's store and queries under ``root`` (reused when complete)."""
    done = root / "set.json"
    if done.exists() and (root / "queries.npy").exists():
        return {**json.loads(done.read_text()), "seconds": 0.0, "reused": True}
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = _write_pcam(root, pcam_source, pcam_csv) if name == "pcam" else \
        write_synthetic(root, name, n, dim, n_queries)
    atomic_write_text(done, json.dumps(out))
    return {**out, "seconds": round(time.perf_counter() - t0, 1), "reused": False}


def open_root(root: Path) -> Any:
    from embedstore.store import open_store
    return open_store(root / "store")


def recall(ids: np.ndarray, root: Path) -> float:
    """recall@10 of ``ids`` (nq, >= 10) against the exact top-10 the Flat phase wrote."""
    truth = np.load(root / "truth.npy")
    hits = (ids[:, :K, None] == truth[:, None, :K]).any(axis=1).sum(axis=1)
    return round(float(np.mean(hits / K)), 4)


def best_seconds(run: Callable[[], Any], repeats: int = 3, budget_s: float = 4.0
                 ) -> tuple[float, Any]:
    """(fastest wall time of up to ``repeats`` calls of ``run``, its last result): the box is
    shared, so one timing can be several times too slow; repeats stop once ``budget_s`` is
    spent (a slow method is timed once or twice)."""
    best, out, start = float("inf"), None, time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best, out
