"""Backbone selection by a proxy task: embed one labelled tile set with every candidate, score
each embedding space with a cross-validated kNN classifier (`embedstore.select.knn`), rank them.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..arrays import average_ranks
from ..plots import plot_selection
from ..errors import EmbedstoreError, SelectionError, UnknownBackboneError
from .knn import METRICS, KnnConfig, fold_scores

__all__ = ["SelectConfig", "ProxySet", "Candidate", "SelectionResult", "read_proxy", "plan_folds",
           "select_backbones", "spearman", "average_ranks", "seed_noise_notes", "store_dir_name",
           "small_class_note"]

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
    temperature: float = 0.07            # kNN vote weight exp(sim / temperature)
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


@dataclass
class Candidate:
    backbone: str                  # the name given
    weights: str                   # "pretrained" | "random init"
    store: str                     # its proxy store
    dim: int = 0                   # embedding dimension
    fold_scores: list[float] = field(default_factory=list)
    mean: float = float("nan")     # metric mean over folds
    std: float = float("nan")      # metric std over folds (population)
    extract_s: float = 0.0         # extract() wall time (a cached run: the time to find it done)
    tiles_written: int = 0         # tiles embedded by this run (0 when the cache held them all)
    extract_errors: int = 0        # inputs extract() recorded as errors
    knn_s: float = 0.0             # kNN fit + predict over all folds
    rank: int = 0                  # 1 = best proxy score
    downstream: dict[str, Any] | None = None   # validate: f1/balanced accuracy mean, std, times

    @property
    def label(self) -> str:
        return self.backbone + (" (random init)" if self.weights == "random init" else "")


@dataclass
class SelectionResult:
    config: dict[str, Any]                 # the SelectConfig, JSON-ready
    proxy: dict[str, Any]                  # source, tiles, classes, groups, folds
    candidates: list[Candidate]            # best first
    spearman: float | None = None          # proxy score vs downstream F1 (validate only)
    elapsed: float = 0.0                   # the whole selection, seconds
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)   # caveats about this proxy and these settings

    def table(self) -> str:
        metric = self.config["metric"]
        head = ["rank", "backbone", "weights", f"{metric} (mean ± std)", "extract s", "kNN s"]
        if any(c.downstream for c in self.candidates):
            head.append("downstream F1")
        rows = []
        for c in self.candidates:
            ex = f"{c.extract_s:.1f}" + (" (cached)" if c.tiles_written == 0 else "")
            row = [str(c.rank), c.backbone, c.weights, f"{c.mean:.4f} ± {c.std:.4f}", ex, f"{c.knn_s:.3f}"]
            if len(head) == 7:
                d = c.downstream
                row.append(f"{d['f1'][0]:.4f} ± {d['f1'][1]:.4f}" if d else "-")
            rows.append(row)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
        p = self.proxy
        lines.append(f"proxy {p['source']}: {p['tiles']} tiles, {len(p['classes'])} classes, "
                     f"{p['folds']}-fold CV " + (f"grouped by {p['group_by']} ({p['groups']} groups)"
                                                 if p["group_by"] else "ungrouped")
                     + f", k={self.config['k']}" + (", centred" if self.config["centre"] else ""))
        lines += [f"note: {n}" for n in self.notes]
        if p["tiles_missing"]:
            lines.append(f"{p['tiles_missing']} proxy tile(s) missing from some store (unreadable: "
                         f"`embedstore errors STORE`); every candidate is scored on the same {p['tiles']}")
        rnd = [c.backbone for c in self.candidates if c.weights == "random init"]
        kept = [c.backbone for c in self.candidates if c.weights != "random init"]
        if self.config["random_init"]:
            lines.append(f"random init applied to: {', '.join(rnd) or 'none'}"
                         + (f"; not to {', '.join(kept)} (own weights)" if kept else ""))
        if self.spearman is not None:
            lines.append(f"Spearman(proxy score, downstream F1) = {self.spearman:.3f}")
        elif any(c.downstream for c in self.candidates):
            lines.append("Spearman undefined (fewer than 2 candidates or constant scores)")
        lines.append(f"selection time {self.elapsed:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "proxy": self.proxy,
                "candidates": [asdict(c) for c in self.candidates], "spearman": self.spearman,
                "elapsed_s": self.elapsed, "files": self.files, "notes": self.notes}


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


def _group_codes(groups: np.ndarray) -> np.ndarray:
    """(n,) int64 codes; a missing group (None) is a group of its own."""
    named = np.array([f"g:{g}" if g is not None else f"row:{i}" for i, g in enumerate(groups)],
                     dtype=object)
    _, codes = np.unique(named.astype(str), return_inverse=True)
    return codes.astype(np.int64).reshape(-1)


def plan_folds(y: np.ndarray, groups: np.ndarray | None, folds: int, k: int, seed: int = 0,
               classes: Sequence[str] | None = None, group_by: str | None = None) -> np.ndarray:
    """Fold of each row, (n,) int64 in ``0..folds-1``: stratified by ``y`` ((n,) int), grouped by
    ``groups`` ((n,) object, None = own group) so no group has rows in two folds. Pure and seeded;
    refuses inputs that cannot give a fair k-fold kNN, in one line each."""
    from ..heads.splits import stratified_group_kfold
    y = np.asarray(y, dtype=np.int64)
    name = (lambda c: str(classes[c])) if classes is not None else str  # noqa: E731
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    if present.size < 2:
        raise SelectionError(f"the proxy has one class ({name(int(present[0])) if present.size else 'none'}); "
                             f"a proxy needs tiles of at least two classes")
    low = [int(c) for c in present if counts[c] < folds]
    if low:
        c = low[0]
        raise SelectionError(f"class {name(c)!r} has {counts[c]} tile(s), fewer than the {folds} folds; "
                             f"add tiles, drop the class or use --folds {max(2, int(counts[c]))}")
    codes = None if groups is None else _group_codes(np.asarray(groups, dtype=object))
    if codes is not None:
        n_groups = int(codes.max()) + 1
        if n_groups < folds:
            raise SelectionError(f"only {n_groups} distinct {group_by or 'group'} value(s) for {folds} folds; "
                                 f"use --folds {max(2, n_groups)} or --group-by none")
    fold = stratified_group_kfold(y, codes, folds, seed=seed)
    sizes = np.bincount(fold, minlength=folds)
    if (sizes == 0).any():
        raise SelectionError(f"grouping by {group_by or 'group'} leaves fold {int(np.argmin(sizes))} empty; "
                             f"use fewer --folds")
    smallest_train = int(y.size - sizes.max())
    if k > smallest_train:
        raise SelectionError(f"k={k} is larger than the smallest training fold ({smallest_train} tiles); "
                             f"use --k {smallest_train} or less, or fewer --folds")
    if codes is not None:
        for f in range(folds):
            assert not np.isin(codes[fold == f], codes[fold != f]).any(), "a group straddles folds"
    return fold


def small_class_note(y: np.ndarray, fold: np.ndarray, k: int, classes: Sequence[str]) -> str | None:
    """A caveat when ``k`` exceeds some class's training tiles in some fold: the k neighbours
    then cannot all come from that class, and large classes outvote it."""
    y, fold = np.asarray(y, dtype=np.int64), np.asarray(fold, dtype=np.int64)
    n_classes = len(classes)
    train = np.array([np.bincount(y[fold != f], minlength=n_classes) for f in np.unique(fold)])
    present = train[:, np.bincount(y, minlength=n_classes) > 0]
    low = int(present.min())
    if k <= low:
        return None
    c = int(np.flatnonzero(np.bincount(y, minlength=n_classes) > 0)[np.argmin(present.min(axis=0))])
    return (f"k={k} exceeds the {low} training tiles of class {classes[c]!r} in some fold: larger "
            f"classes outvote it (--k {max(1, low)} or less avoids that)")


# -- ranking statistics -------------------------------------------------------------------

def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two (n,) arrays (average ranks for ties); NaN when n < 2 or
    either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two (n,) arrays, got {a.shape} and {b.shape}")
    if a.size < 2:
        return float("nan")
    ra, rb = average_ranks(a) - (a.size + 1) / 2, average_ranks(b) - (b.size + 1) / 2
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


# -- the run -------------------------------------------------------------------------------

def seed_noise_notes(runs: Sequence[tuple[str, Sequence[float]]], z: float = 2.0) -> list[str]:
    """Downstream neighbours (by mean F1) whose gap is under ``z`` standard errors of the
    difference of their seed means: their downstream order, and so Spearman, is not resolved."""
    stats = sorted(((float(np.mean(r)), float(np.var(r, ddof=1)) / len(r) if len(r) > 1 else float("nan"), n)
                    for n, r in runs), reverse=True)
    out = []
    for (ma, va, a), (mb, vb, b) in zip(stats, stats[1:]):
        se = float(np.sqrt(va + vb))
        if not np.isfinite(se):
            out.append(f"downstream F1 of {a} and {b} comes from one head each: their order is not "
                       f"tested against seed noise; use --head-seeds 5 or more")
        elif ma - mb < z * se:
            out.append(f"downstream F1 of {a} ({ma:.4f}) and {b} ({mb:.4f}) differ by {ma - mb:.4f}, "
                       f"under {z:g} standard errors ({z * se:.4f}) of seed noise: their downstream "
                       f"order is not resolved, nor is Spearman; raise --head-seeds")
    return out


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


def _embed(source: Path, store: Path, name: str, random_init: bool, cfg: SelectConfig) -> Any:
    from ..extract.runner import ExtractConfig, extract
    ecfg = ExtractConfig(store=store, backbone=name, random_init=random_init,
                         batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         num_threads=cfg.num_threads, devices=cfg.devices, progress=cfg.progress)
    return extract([source], ecfg)


def _rows_in_store(store: Any, proxy: ProxySet) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, ids)``: positions of the proxy tiles the store holds and their ids; labels checked."""
    present = set(store.keys())
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
    res = _embed(task.source, store, name, random_init, cfg)
    s = open_store(store)
    rows, ids = _rows_in_store(s, task)
    X = np.asarray(s.gather(ids), dtype=np.float32)
    y, sp = task.labels[rows], task.split[rows]  # type: ignore[index]
    g = None if task.groups is None else task.groups[rows]
    tr, va = sp == "train", sp == "valid"
    t0 = time.perf_counter()
    rep = run_seeds(X[tr], y[tr], X[va], y[va], groups=None if g is None else g[tr],
                    config=HeadConfig(kind="linear"), seeds=cfg.head_seeds)
    f1 = [float(r["f1"]) for r in rep.runs]
    return {"f1": rep.summary["f1"], "balanced_accuracy": rep.summary["balanced_accuracy"],
            "auroc": rep.summary.get("auroc", (float("nan"), float("nan"))),
            "f1_runs": f1, "seeds": len(f1),
            "train_tiles": int(tr.sum()), "valid_tiles": int(va.sum()), "store": str(store),
            "extract_s": res.elapsed, "tiles_written": res.tiles_written,
            "head_s": time.perf_counter() - t0}


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
    from ..store import open_store
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

    results, stores = [], []
    for name, rnd in cands:
        path = root / store_dir_name(name)
        res = _embed(proxy.source, path, name, rnd, cfg)
        s = open_store(path)
        results.append(Candidate(name, "random init" if rnd else "pretrained", str(path), s.dim,
                                 extract_s=res.elapsed, tiles_written=res.tiles_written,
                                 extract_errors=len(res.errors)))
        stores.append(s)
    for c, s in zip(results[1:], stores[1:]):
        if s.meta.tile != stores[0].meta.tile:
            raise SelectionError(f"stores {stores[0].path} and {s.path} hold tiles of different geometry "
                                 f"({stores[0].meta.tile} vs {s.meta.tile}); compare backbones on one geometry")

    found = [_rows_in_store(s, proxy) for s in stores]
    common = np.flatnonzero(np.logical_and.reduce([np.isin(np.arange(len(proxy.keys)), r) for r, _ in found]))
    used = proxy.take(common)
    fold = plan_folds(used.y, used.groups, cfg.folds, cfg.k, cfg.seed, used.classes, used.group_by)
    knn = KnnConfig(cfg.k, cfg.temperature, cfg.centre)
    for c, s, (rows, ids) in zip(results, stores, found):
        at = {int(r): i for i, r in enumerate(rows)}
        X = np.asarray(s.gather(ids[[at[int(r)] for r in common]]), dtype=np.float32)
        sc, c.knn_s = fold_scores(X, used.y, fold, knn, cfg.metric, n_classes=len(used.classes))
        c.fold_scores, c.mean, c.std = sc.tolist(), float(sc.mean()), float(sc.std())
    order = sorted(range(len(results)), key=lambda i: (-results[i].mean, results[i].std, i))
    ranked = [results[i] for i in order]
    for r, c in enumerate(ranked, start=1):
        c.rank = r

    rho = None
    if task is not None:
        f1, runs = [], []
        for c, (name, rnd) in zip(results, cands):
            c.downstream = d = _downstream(cfg, task, name, rnd, vroot)
            f1.append(d["f1"][0])
            runs.append((c.backbone, d["f1_runs"]))
        rho_v = spearman(np.array([c.mean for c in results]), np.array(f1))
        rho = None if np.isnan(rho_v) else rho_v
        notes_v = seed_noise_notes(runs)
    else:
        notes_v = []

    counts = {c: int((used.labels == c).sum()) for c in used.classes}
    proxy_info = {"source": str(proxy.source), "tiles": int(common.size),
                  "tiles_missing": int(len(proxy.keys) - common.size), "classes": counts,
                  "group_by": used.group_by,
                  "groups": int(_group_codes(used.groups).max() + 1) if used.groups is not None else None,
                  "folds": cfg.folds, "fold_sizes": np.bincount(fold, minlength=cfg.folds).tolist(),
                  "tile": proxy.tile}
    conf = {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(cfg).items()}
    note = small_class_note(used.y, fold, cfg.k, used.classes)
    result = SelectionResult(conf, proxy_info, ranked, rho, notes=([note] if note else []) + notes_v)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result.files = {"json": str(out / "selection.json"), "plot": str(out / "selection.png")}
    plot_selection(result, out / "selection.png")
    result.elapsed = time.perf_counter() - t_start
    (out / "selection.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
