"""Backbone selection by a proxy task: embed one labelled tile set with every candidate, score
each embedding space with a cross-validated kNN classifier (`embedstore.select.knn`) on folds
from `embedstore.select.folds`, rank them (`embedstore.select.ranking`).

Each candidate's embeddings live in their own store, ``CACHE/<backbone>`` (default cache:
``OUT/stores``), made by the same pipeline as ``embedstore extract``; a second run finds every
unit done and embeds nothing. Folds are stratified and, when tiles carry a slide (or another
group column), grouped: no slide has tiles on both sides of a fold, so a tile never votes with
neighbours from its own slide. ``validate`` also trains a linear head per candidate on a
downstream task (``split`` train -> valid) and reports the Spearman correlation between the proxy
scores and the downstream F1.

``random_init`` applies to every candidate that can be built with untrained weights (timm and
other torch models); ONNX models always run their own weights. The result says which did.
"""
from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..plots import plot_selection
from ..errors import EmbedstoreError, SelectionError, UnknownBackboneError
from ..sizes import parse_size
from ..store.atomic import atomic_write_text
from ..store.protocol import StoreLike
from .folds import group_codes, plan_folds, small_class_note
from .knn import METRICS, KnnConfig, fold_scores
from .stream import knn_ram_bytes, streamed_fold_scores
from .ranking import Candidate, SelectionResult, rank_candidates, seed_noise_notes, spearman

if TYPE_CHECKING:
    from ..extract.runner import ExtractResult
    from ..store import Store

__all__ = ["SelectConfig", "ProxySet", "read_proxy", "select_backbones", "store_dir_name"]

GROUP_AUTO, GROUP_NONE = "auto", "none"


@dataclass(frozen=True)
class SelectConfig:
    proxy: Path                          # CSV (path,label[,split,slide]) or folder of class folders
    backbones: tuple[str, ...]           # candidate names: registry, timm, hf-hub:ORG/M, .onnx path
    out: Path                            # selection.json, selection.png (and stores/ by default)
    k: int = 20                          # neighbours that vote
    folds: int = 5                       # cross-validation folds
    group_by: str = GROUP_AUTO           # auto (slide when known) | none | slide | a CSV column
    metric: str = "balanced_accuracy"    # balanced_accuracy | f1 (macro)
    random_init: bool = False            # untrained weights for candidates that can have them
    centre: bool = False                 # subtract the training-fold mean before normalising
    temperature: float = 0.07            # kNN vote weight exp(score / temperature)
    seed: int = 0                        # fold assignment seed
    cache: Path | None = None            # stores root (None: OUT/stores)
    validate: Path | None = None         # downstream task CSV (path,label,split)
    validate_cache: Path | None = None   # its stores (None: CACHE/validate-<csv stem>)
    head_seeds: int = 10                 # downstream heads trained per candidate (seed noise ~1/sqrt)
    batch_size: int = 64                 # extraction: tiles per forward pass
    num_workers: int | None = None       # extraction: DataLoader workers (None: runner default)
    num_threads: int | None = None       # extraction: intra-op threads
    devices: str = "cpu"                 # extraction: devices, as `extract --devices`
    progress: bool = True                # extraction progress bars
    memory_budget: int | str | None = None  # bytes or "8G" the kNN may hold (None: a quarter of RAM);
                                         # a candidate's proxy rows past it are scored from the store

    def __post_init__(self) -> None:
        if not self.backbones:
            raise SelectionError("no candidate backbones; give --backbone at least once")
        if self.metric not in METRICS:
            raise SelectionError(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if self.folds < 2:
            raise SelectionError(f"--folds must be at least 2, got {self.folds}")
        if self.head_seeds < 1:
            raise SelectionError(f"--head-seeds must be at least 1, got {self.head_seeds}")
        KnnConfig(self.k, self.temperature, self.centre)      # validates k and temperature
        if self.memory_budget is not None:
            parse_size(self.memory_budget, "--memory-budget")  # a bad size fails before embedding

    @property
    def cache_root(self) -> Path:
        return Path(self.cache) if self.cache is not None else Path(self.out) / "stores"


@dataclass(frozen=True)
class ProxySet:
    source: Path                 # the CSV or folder
    keys: np.ndarray             # (n,) object tile keys, as the stores record them
    labels: np.ndarray           # (n,) object class names
    groups: np.ndarray | None    # (n,) object group per tile (None entries: a group of its own)
    group_by: str | None         # the column the groups come from (None: ungrouped)
    tile: dict[str, Any]         # tile geometry the stores will have (kind, tile_size, mpp)
    split: np.ndarray | None = None  # (n,) object train/valid/test/"?" when the CSV has a split

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.tolist()))

    @property
    def y(self) -> np.ndarray:
        """(n,) int64 class indices into ``classes``."""
        return np.searchsorted(np.array(self.classes, dtype=object), self.labels).astype(np.int64)

    def take(self, rows: np.ndarray) -> "ProxySet":
        g = None if self.groups is None else self.groups[rows]
        sp = None if self.split is None else self.split[rows]
        return ProxySet(self.source, self.keys[rows], self.labels[rows], g, self.group_by, self.tile, sp)


# -- the proxy set (pure reading, no decoding beyond one image's size) -------------------------

def _first_size(tiles: Sequence[Any]) -> int:
    from ..extract.sources import first_image_side
    side = first_image_side(t.path for t in tiles)
    if side is None:
        raise SelectionError("no readable image among the proxy tiles")
    return side


def _csv_column(csv_path: Path, column: str, keys: Sequence[str]) -> np.ndarray:
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in reader.fieldnames or []]
        if column not in cols:
            raise SelectionError(f"--group-by {column}: {csv_path} has no {column!r} column "
                                 f"(columns: {', '.join(cols)})")
        by_path = {(r.get("path") or "").strip(): (r.get(column) or "").strip() or None
                   for r in ({k.strip(): v for k, v in row.items() if k} for row in reader)}
    return np.array([by_path.get(k) for k in keys], dtype=object)


def read_proxy(source: str | Path, group_by: str = GROUP_AUTO, task_name: str = "proxy") -> ProxySet:
    """The labelled tiles of a CSV or class-folder ``source`` and their groups.

    ``group_by``: ``auto`` groups by the CSV ``slide`` column when any tile has one, ``none``
    never groups, any other name is a required CSV column (``slide``, ``patient``...). Tiles
    without a value form a group of their own.
    """
    from ..extract.sources import discover
    src = Path(source)
    try:
        disc = discover([src])
    except EmbedstoreError as e:
        raise SelectionError(f"{task_name} {src}: {e}") from None
    if disc.kind != "files":
        raise SelectionError(f"{task_name} {src} holds whole slides; a proxy is a CSV or a folder "
                             f"of labelled tiles")
    tiles = [t for u in disc.units for t in u.files]
    unlabelled = [t.key for t in tiles if not t.label]
    if unlabelled:
        raise SelectionError(f"{task_name} {src}: {len(unlabelled)} tile(s) without a label (first: "
                             f"{unlabelled[0]!r}); put tiles in class folders or fill the label column")
    keys = np.array([t.key for t in tiles], dtype=object)
    labels = np.array([t.label for t in tiles], dtype=object)
    column: str | None = None if group_by == GROUP_NONE else group_by
    groups: np.ndarray | None = None
    if column is not None:
        if column in (GROUP_AUTO, "slide"):
            groups = np.array([t.slide for t in tiles], dtype=object)
        elif src.suffix.lower() == ".csv":
            groups = _csv_column(src, column, keys.tolist())
        else:
            raise SelectionError(f"--group-by {column}: {src} is a folder, which has no columns; "
                                 f"give a CSV with a {column} column")
        if all(g is None for g in groups):
            if column != GROUP_AUTO:
                raise SelectionError(f"--group-by {column}: no tile of {src} has a {column} value; "
                                     f"fill the column or use --group-by none")
            groups, column = None, None
        elif column == GROUP_AUTO:
            column = "slide"
    tile = {"kind": "files", "tile_size": _first_size(tiles), "mpp": None}  # as extract records it
    split = None
    if any(t.split for t in tiles):
        from ..heads.splits import SPLIT_NAMES
        split = np.array([SPLIT_NAMES.get((t.split or "").lower(), "?") for t in tiles], dtype=object)
    return ProxySet(src, keys, labels, groups, column, tile, split)


# -- the run -------------------------------------------------------------------------------

def store_dir_name(backbone: str) -> str:
    """A directory name for a backbone name (``hf-hub:ORG/M`` and paths included)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", backbone).strip("._") or "backbone"


def _resolve(names: Sequence[str], random_init: bool) -> list[tuple[str, bool]]:
    """Each candidate and whether it runs random-init weights; unknown names fail first."""
    from ..backbones import get_spec
    out: list[tuple[str, bool]] = []
    dirs: dict[str, str] = {}
    for name in names:
        try:
            spec = get_spec(name)
        except UnknownBackboneError as e:
            raise SelectionError(str(e)) from None
        d = store_dir_name(name)
        if d in dirs:
            raise SelectionError(f"backbone {name!r} is listed twice (as {dirs[d]!r}); give each once")
        dirs[d] = name
        out.append((name, random_init and spec.kind != "onnx"))
    return out


def _check_geometry(store: Path, tile: dict[str, Any], what: str) -> None:
    from ..store.meta import read_meta
    if (store / "STORE.json").exists():
        have = read_meta(store).tile
        if have != tile:
            raise SelectionError(f"cached store {store} holds tiles of another geometry ({have}) than "
                                 f"the {what} ({tile}); use another --cache or delete that store")


def _embed(tiles: ProxySet, store: Path, name: str, random_init: bool, cfg: SelectConfig) -> ExtractResult:
    """Embed a proxy or task set into ``store`` at the set's own tile size (the stores of all
    candidates then share one geometry, whatever each backbone's input size)."""
    from ..extract.runner import ExtractConfig, extract
    ecfg = ExtractConfig(store=store, backbone=name, random_init=random_init,
                         tile_size=tiles.tile["tile_size"],
                         batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         num_threads=cfg.num_threads, devices=cfg.devices, progress=cfg.progress)
    return extract([tiles.source], ecfg)


def _rows_in_store(store: StoreLike, proxy: ProxySet) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, ids)``: positions of the proxy tiles the store holds and their ids; labels checked."""
    present = set(store.keys_of(store.all_ids()))
    rows = np.flatnonzero([k in present for k in proxy.keys])
    ids = store.ids(proxy.keys[rows].tolist()) if rows.size else np.empty(0, np.int64)
    recorded = store.metadata(ids, ("label",))["label"]
    bad = np.flatnonzero(recorded != proxy.labels[rows])
    if bad.size:
        j = rows[bad[0]]
        raise SelectionError(f"store {store.path} labels tile {proxy.keys[j]!r} {recorded[bad[0]]!r}, the "
                             f"proxy says {proxy.labels[j]!r}: the cache holds another tile set; "
                             f"use another --cache")
    return rows, ids


def _downstream(cfg: SelectConfig, task: ProxySet, name: str, random_init: bool,
                root: Path) -> dict[str, Any]:
    from ..heads import HeadConfig, run_seeds
    from ..store import open_store
    store = root / store_dir_name(name)
    res = _embed(task, store, name, random_init, cfg)
    from ..heads.stream import LazyRows, in_ram_bytes, resolve_budget
    s = open_store(store)
    rows, ids = _rows_in_store(s, task)
    budget: int | None = resolve_budget(cfg.memory_budget)
    emb: np.ndarray | LazyRows
    if in_ram_bytes(ids.size, 0, s.dim, s.dtype.itemsize) > (budget or 0):
        emb = LazyRows.of_store(s, ids)                    # heads train from the store
    else:
        emb, budget = np.asarray(s.gather(ids), dtype=np.float32), None
    y, sp = task.labels[rows], task.split[rows]  # type: ignore[index]
    g = None if task.groups is None else task.groups[rows]
    tr, va = sp == "train", sp == "valid"
    t0 = time.perf_counter()
    rep = run_seeds(emb[tr], y[tr], emb[va], y[va], groups=None if g is None else g[tr],
                    config=HeadConfig(kind="linear"), seeds=cfg.head_seeds, memory_budget=budget)
    f1 = [float(r["f1"]) for r in rep.runs]
    return {"f1": rep.summary["f1"], "balanced_accuracy": rep.summary["balanced_accuracy"],
            "auroc": rep.summary.get("auroc", (float("nan"), float("nan"))),
            "f1_runs": f1, "seeds": len(f1),
            "train_tiles": int(tr.sum()), "valid_tiles": int(va.sum()), "store": str(store),
            "extract_s": res.elapsed, "tiles_written": res.tiles_written,
            "head_s": time.perf_counter() - t0, "streamed": budget is not None}


def _read_task(path: Path) -> ProxySet:
    task = read_proxy(path, GROUP_AUTO, "downstream task")
    for need in ("train", "valid"):
        if task.split is None or not (task.split == need).any():
            raise SelectionError(f"--validate {path}: no tile has split={need}; the downstream task "
                                 f"trains on split=train and measures F1 on split=valid")
    return task


def select_backbones(cfg: SelectConfig) -> SelectionResult:
    """Embed the proxy with every candidate (cached stores), score each by cross-validated kNN,
    rank them, write ``selection.json`` and ``selection.png`` under ``cfg.out``."""
    t_start = time.perf_counter()
    cands = _resolve(cfg.backbones, cfg.random_init)
    proxy = read_proxy(cfg.proxy, cfg.group_by)
    plan_folds(proxy.y, proxy.groups, cfg.folds, cfg.k, cfg.seed, proxy.classes, proxy.group_by)
    task = _read_task(Path(cfg.validate)) if cfg.validate is not None else None
    root = cfg.cache_root
    vroot = Path(cfg.validate_cache) if cfg.validate_cache else root / f"validate-{Path(cfg.validate or '').stem}"
    for name, _ in cands:                                # fail before any embedding
        _check_geometry(root / store_dir_name(name), proxy.tile, f"proxy {proxy.source}")
        if task is not None:
            _check_geometry(vroot / store_dir_name(name), task.tile, f"task {task.source}")
    results, stores = _embed_candidates(cfg, cands, proxy, root)
    used, fold = _score_candidates(cfg, results, stores, proxy)
    ranked = rank_candidates(results)
    rho: float | None = None
    notes: list[str] = []
    if task is not None:
        rho, notes = _validate(cfg, task, cands, results, vroot)
    note = small_class_note(used.y, fold, cfg.k, used.classes)
    conf = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(cfg).items()}
    result = SelectionResult(conf, _proxy_info(cfg, proxy, used, fold), ranked, rho,
                             notes=([note] if note else []) + notes)
    _write(result, Path(cfg.out), t_start)
    return result


def _embed_candidates(cfg: SelectConfig, cands: Sequence[tuple[str, bool]], proxy: ProxySet,
                      root: Path) -> tuple[list[Candidate], list[Store]]:
    """Each candidate's proxy store (embedded now, or found done) and its record so far."""
    from ..store import open_store
    results, stores = [], []
    for name, rnd in cands:
        path = root / store_dir_name(name)
        res = _embed(proxy, path, name, rnd, cfg)
        s = open_store(path)
        results.append(Candidate(name, "random init" if rnd else "pretrained", str(path), s.dim,
                                 extract_s=res.elapsed, tiles_written=res.tiles_written,
                                 extract_errors=len(res.errors)))
        stores.append(s)
    for s in stores[1:]:
        if s.meta.tile != stores[0].meta.tile:
            raise SelectionError(f"stores {stores[0].path} and {s.path} hold tiles of different geometry "
                                 f"({stores[0].meta.tile} vs {s.meta.tile}); compare backbones on one geometry")
    return results, stores


def _score_candidates(cfg: SelectConfig, results: list[Candidate], stores: Sequence[StoreLike],
                      proxy: ProxySet) -> tuple[ProxySet, np.ndarray]:
    """Cross-validated kNN scores of every candidate on the proxy tiles all stores hold, on one
    set of folds. Returns those tiles and their fold (n,) int64. A candidate whose proxy rows
    would take more than the memory budget in RAM is scored from its store (``select.stream``)."""
    from ..heads.stream import LazyRows, resolve_budget
    held = [_rows_in_store(s, proxy) for s in stores]
    common = np.flatnonzero(np.logical_and.reduce([np.isin(np.arange(len(proxy.keys)), r) for r, _ in held]))
    used = proxy.take(common)
    fold = plan_folds(used.y, used.groups, cfg.folds, cfg.k, cfg.seed, used.classes, used.group_by)
    knn = KnnConfig(cfg.k, cfg.temperature, cfg.centre)
    budget = resolve_budget(cfg.memory_budget)
    n_classes = len(used.classes)
    for c, s, (rows, ids) in zip(results, stores, held):
        wanted = ids[np.searchsorted(rows, common)]          # rows is increasing: proxy order
        c.streamed = knn_ram_bytes(wanted.size, s.dim, s.dtype.itemsize) > budget
        if c.streamed:
            lazy = LazyRows.of_store(s, wanted)
            scores, c.knn_s = streamed_fold_scores(lazy, used.y, fold, knn, cfg.metric, n_classes, budget)
        else:
            emb = np.asarray(s.gather(wanted), dtype=np.float32)
            scores, c.knn_s = fold_scores(emb, used.y, fold, knn, cfg.metric, n_classes=n_classes)
        c.fold_scores, c.mean, c.std = scores.tolist(), float(scores.mean()), float(scores.std())
    return used, fold


def _validate(cfg: SelectConfig, task: ProxySet, cands: Sequence[tuple[str, bool]],
              results: list[Candidate], vroot: Path) -> tuple[float | None, list[str]]:
    """Each candidate's downstream F1 (recorded on it); Spearman of proxy score vs that F1 (None
    when undefined) and the notes on differences seed noise leaves unresolved."""
    f1, runs = [], []
    for c, (name, rnd) in zip(results, cands):
        c.downstream = d = _downstream(cfg, task, name, rnd, vroot)
        f1.append(d["f1"][0])
        runs.append((c.backbone, d["f1_runs"]))
    rho = spearman(np.array([c.mean for c in results]), np.array(f1))
    return (None if np.isnan(rho) else rho), seed_noise_notes(runs)


def _proxy_info(cfg: SelectConfig, proxy: ProxySet, used: ProxySet, fold: np.ndarray) -> dict[str, Any]:
    """What the result records about the proxy: tiles scored and missing, classes, groups, folds."""
    return {"source": str(proxy.source), "tiles": int(len(used.keys)),
            "tiles_missing": int(len(proxy.keys) - len(used.keys)),
            "classes": {c: int((used.labels == c).sum()) for c in used.classes},
            "group_by": used.group_by,
            "groups": int(group_codes(used.groups).max() + 1) if used.groups is not None else None,
            "folds": cfg.folds, "fold_sizes": np.bincount(fold, minlength=cfg.folds).tolist(),
            "tile": proxy.tile}


def _write(result: SelectionResult, out: Path, t_start: float) -> None:
    """``selection.png`` then ``selection.json`` (with the whole selection's time) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    result.files = {"json": str(out / "selection.json"), "plot": str(out / "selection.png")}
    plot_selection(result, out / "selection.png")
    result.elapsed = time.perf_counter() - t_start
    atomic_write_text(out / "selection.json", json.dumps(result.to_dict(), indent=2) + "\n")
