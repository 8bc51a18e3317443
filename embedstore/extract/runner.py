"""The extraction run: sources -> units -> one persistent DataLoader -> backbone -> writer.

The sampler (main process) claims units one at a time, plans them (a slide's tissue grid) and
yields batches of tile specs; workers decode; the batch moves to the device as uint8 (pinned,
non-blocking on CUDA) where the backbone resizes, normalises and embeds; a background writer
commits shards. A unit is marked done only when all its tiles are committed, so a killed run
restarted gives the same store. Failed inputs are recorded as errors and the run goes on.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackboneMismatchError, SlideError, SourceError
from ..store.meta import StoreMeta, read_meta
from .dataset import TileDataset, TileSpec, collate
from .sources import Discovery, Unit, discover, first_image_side
from .transforms import ViewRecipe

__all__ = ["ExtractConfig", "ExtractResult", "extract", "store_meta_for"]


@dataclass(frozen=True)
class ExtractConfig:
    store: Path                       # the store directory (created when missing)
    backbone: str                     # registry name, timm name, hf-hub: id or .onnx path
    weights: str | None = None        # weights file (safetensors / torch / onnx)
    random_init: bool = False         # explicit: seeded untrained weights
    target_mpp: float | None = None   # µm/px tiles are cut at (default: backbone native, else 0.5)
    slide_mpp: float | None = None    # µm/px of slides whose metadata lacks it
    tile_size: int | None = None      # tile side in px (slides: 224; files: their own size)
    views: int | None = None          # K augmented views per tile (None: the store's recipe)
    view_seed: int = 0                # seed of the view recipe
    batch_size: int = 64              # tiles per forward pass
    num_workers: int | None = None    # DataLoader workers per process (None: default_workers)
    precision: str | None = None      # fp32 | bf16 | fp16 (None: backbone default)
    dtype: str = "float16"            # on-disk embedding dtype
    task: str | None = None           # name of the labels task (default: the source's name)
    devices: str = "cpu"              # "cpu", "cuda:0,cuda:1", "all", "cpu,cpu" (processes)
    compile: bool = False             # torch.compile the model
    min_tissue: float = 0.25          # tissue fraction a slide tile needs
    rows_per_shard: int = 65536       # rows per committed shard
    progress: bool = True             # tqdm bar
    num_threads: int | None = None    # intra-op threads per process (torch / onnxruntime)
    files_per_unit: int = 256         # files per work unit (the resume granularity)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 2


def default_workers(device: str) -> int:
    """DataLoader workers when not given: cores - 1 (at most 8), except a model on a CPU with
    at most 2 cores, which decodes in its own process: there a decode process only takes turns
    with the model's threads (measured on 2 cores, benchmarks/bench_extract.py: workers=0 was
    faster and closer to the model alone than 1 worker in every case, tiles and slides)."""
    cores = usable_cores()
    if device.startswith("cpu") and cores <= 2:
        return 0
    return max(0, min(8, cores - 1))


@dataclass
class ExtractResult:
    tiles_written: int = 0
    tiles_skipped: int = 0            # already in the store
    views_added: int = 0              # tiles of earlier runs given their views
    units_done: int = 0
    units_skipped: int = 0            # done in an earlier run
    errors: list[tuple[str, str]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    overlays: list[str] = field(default_factory=list)
    store: str = ""

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_written / self.elapsed if self.elapsed else 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def merge(self, other: "ExtractResult") -> None:
        self.tiles_written += other.tiles_written
        self.tiles_skipped += other.tiles_skipped
        self.views_added += other.views_added
        self.units_done += other.units_done
        self.errors += other.errors
        self.overlays += other.overlays
        for k, v in other.stages.items():
            self.stages[k] = self.stages.get(k, 0.0) + v

    def summary(self) -> str:
        st = self.stages
        lines = [
            f"extracted into {self.store}: {self.tiles_written:,} tiles written, "
            f"{self.tiles_skipped:,} already present, "
            + (f"{self.views_added:,} given views, " if self.views_added else "")
            + f"{self.units_done} units done "
            f"({self.units_skipped} done before), {len(self.errors)} error(s)",
            f"time {self.elapsed:.1f} s, {self.tiles_per_s:.1f} tiles/s",
            "stages (s): " + ", ".join(f"{k} {st.get(k, 0.0):.1f}" for k in
                                       ("plan", "read+decode", "wait", "transfer", "forward", "write")),
        ]
        if "read+decode" in st:
            lines.append("  (read+decode is summed over DataLoader workers; wait is the time the "
                         "model waited for input)")
        for unit, reason in self.errors[:10]:
            lines.append(f"  error {unit}: {reason}")
        if len(self.errors) > 10:
            lines.append(f"  ... {len(self.errors) - 10} more (embedstore errors STORE)")
        return "\n".join(lines)


def _file_size(disc: Discovery) -> int:
    side = first_image_side(t.path for u in disc.units for t in u.files)
    if side is None:
        raise SourceError("no readable image among the sources")
    return side


def store_meta_for(backbone: Any, disc: Discovery, cfg: ExtractConfig,
                   recipe: ViewRecipe | None) -> StoreMeta:
    spec = backbone.spec
    if disc.kind == "slides":
        tile = {"kind": "slides", "tile_size": cfg.tile_size or 224,
                "mpp": float(cfg.target_mpp or spec.native_mpp or 0.5)}
    else:
        tile = {"kind": "files", "tile_size": cfg.tile_size or _file_size(disc),
                "mpp": cfg.target_mpp}
    transform = {"input_size": spec.input_size, "crop_pct": spec.crop_pct, "mean": list(spec.mean),
                 "std": list(spec.std), "interpolation": spec.interpolation}
    return StoreMeta(dim=backbone.dim, dtype=cfg.dtype, backbone=spec.to_dict(),
                     weights_sha256=backbone.weights_sha256, transform=transform, tile=tile,
                     views=recipe.to_dict() if recipe else None)


def _recipe(cfg: ExtractConfig, existing: StoreMeta | None) -> ViewRecipe | None:
    have = existing.views if existing else None
    if cfg.views is None:  # CLI flag > store metadata
        return ViewRecipe(**have) if have else None
    want = ViewRecipe(k=cfg.views, seed=cfg.view_seed) if cfg.views else None
    if have is not None and (want is None or want.to_dict() != have):
        raise BackboneMismatchError(
            f"{cfg.store} holds views made with recipe {have}; this run asks for "
            f"{want.to_dict() if want else 'no views'}: use the same --views/--view-seed or a new store")
    return want  # on a store of tiles without views, the run adds their views


def _devices(spec: str) -> list[str]:
    import torch
    if spec == "all":
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    out = [d.strip() for d in spec.split(",") if d.strip()]
    for d in out:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise SourceError(f"device {d!r} asked for but CUDA is not available; use --devices cpu")
    return out or ["cpu"]


def extract(sources: list[str | Path], cfg: ExtractConfig) -> ExtractResult:
    """Embed every tile of ``sources`` into ``cfg.store``; resumable, see the module doc."""
    t_start = time.perf_counter()
    disc = discover(sources, cfg.task, cfg.files_per_unit)
    store = Path(cfg.store)
    existing = read_meta(store) if (store / "STORE.json").exists() else None
    recipe = _recipe(cfg, existing)
    devices = _devices(cfg.devices)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 or len(devices) > 1:
        from .parallel import run_parallel
        res = run_parallel(sources, cfg, disc, recipe, devices)
    else:
        res = run_process(cfg, disc, recipe, devices[0], rank=0, world=1, claim=None)
    if disc.task and res.tiles_written + res.tiles_skipped and int(os.environ.get("RANK", "0")) == 0:
        _import_task_labels(store, disc)
    res.elapsed = time.perf_counter() - t_start
    res.store = str(store)
    return res


def _import_task_labels(store: Path, disc: Discovery) -> None:
    from ..store.labels import import_labels
    rows = [{"key": t.key, "label": t.label, "split": t.split, "group": t.slide}
            for u in disc.units for t in u.files if t.label is not None]
    if rows and disc.task:
        import_labels(store, None, disc.task, rows=rows, on_unknown="skip")


VIEWS = "views:"  # prefix of the unit that adds views to a unit embedded without them


def _pending_units(disc: Discovery, store: Path, res: ExtractResult,
                   record_error: Callable[[str, str], None], views: bool = False,
                   lock: bool = True) -> list[int]:
    """Work still to do, largest first (balanced claiming): unit indices ``i`` to embed, and
    ``len(units) + i`` to add the views of unit ``i`` (embedded before it had a view recipe)."""
    done: dict[str, dict[str, Any]] = {}
    with_views: set[str] = set()
    if (store / "STORE.json").exists():
        from ..store.reader import open_store
        s = open_store(store, lock=lock)
        done = s.units()
        if views:
            with_views = {rec["base"] for _, rec in s.cat.read(
                lambda t: [(k, json.loads(bytes(v))) for k, v in t.cursor(db=s.cat.db["shards"])])
                if rec.get("kind") == "view" and rec.get("base")}
    todo = []
    for i, u in enumerate(disc.units):
        rec = done.get(u.id)
        if rec is None:
            todo.append(i)
            continue
        res.units_skipped += 1
        if views and rec.get("shard") and rec["shard"] not in with_views and VIEWS + u.id not in done:
            todo.append(len(disc.units) + i)
        if u.kind == "slide" and rec.get("identity"):
            from .wsi import slide_identity
            try:
                now = slide_identity(u.slide_path)
            except OSError as e:
                now = {"error": str(e)}
            if now != rec["identity"]:
                record_error(u.id, f"slide {u.slide_id} changed since it was embedded (size or content "
                                   "hash differs); delete its tiles (embedstore delete --slide) and re-run")
    todo.sort(key=lambda i: -disc.units[i % len(disc.units)].weight)
    return todo


def run_process(cfg: ExtractConfig, disc: Discovery, recipe: ViewRecipe | None, device: str, *,
                rank: int, world: int, claim: Callable[[], int | None] | None,
                sync: Callable[[], object] | None = None, staged: bool = False) -> ExtractResult:
    """The work of one process (one device): claim units, embed, commit."""
    import torch
    from tqdm import tqdm

    from ..backbones import create_backbone
    from ..store.writer import StoreWriter

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    res = ExtractResult()
    stages = res.stages
    for stage in ("plan", "read+decode", "wait", "transfer", "forward", "write"):
        stages[stage] = 0.0
    bb = create_backbone(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init, device=device, precision=cfg.precision,
                         compile=cfg.compile, num_threads=cfg.num_threads)
    meta = store_meta_for(bb, disc, cfg, recipe)
    store = Path(cfg.store)
    file_size = meta.tile["tile_size"] if disc.kind == "files" else None
    target_mpp = meta.tile["mpp"]
    tile_size = int(meta.tile["tile_size"])
    masks_dir = store / "masks"

    if sync is not None and rank != 0:
        sync()  # rank 0 creates the store first
    w = StoreWriter(store, meta, on_duplicate="skip", rows_per_shard=cfg.rows_per_shard, staged=staged)
    from ..store.catalog import open_catalog
    # a staging rank may not write the catalog: it reads it lock-free (see store/commit.py)
    cat = open_catalog(store, lock=False) if staged else w.cat
    assert cat is not None                  # a writer that is not staged has its catalog

    def lookup(keys: list[str]) -> list[int | None]:
        return cat.read(lambda t: cat.lookup_ids(t, keys))
    if sync is not None and rank == 0:
        sync()
    with w:
        def record_error(unit: str, reason: str) -> None:
            res.errors.append((unit, reason))
            w.add_error(unit, reason)

        if recipe is not None and w.meta.views is None and not staged:  # record the recipe the views follow
            from ..store.meta import write_meta
            write_meta(store, w.meta.with_views(recipe.to_dict()))
        nu = len(disc.units)
        todo = _pending_units(disc, store, res, record_error, views=recipe is not None, lock=not staged)
        if claim is None:
            order = iter(todo)
            claim = lambda: next(order, None)  # noqa: E731
        remaining: dict[int, int] = {}
        failed: dict[int, bool] = {}
        info: dict[int, dict[str, Any]] = {}
        view_parts: dict[int, list[tuple[list[str], np.ndarray]]] = {}

        def unit_name(wi: int) -> str:
            return disc.units[wi].id if wi < nu else VIEWS + disc.units[wi - nu].id

        def finish(wi: int) -> None:
            ok = not failed.get(wi)
            if wi < nu:
                w.end_unit(disc.units[wi].id, done=ok, info=info.pop(wi, None))
            else:
                parts = view_parts.pop(wi, [])
                if parts:
                    keys = [k for ks, _ in parts for k in ks]
                    ids = np.array(lookup(keys), dtype=np.int64)
                    w.add_views(ids, keys, np.concatenate([v for _, v in parts]),
                                unit=unit_name(wi) if ok else None)
                elif ok:
                    w.end_unit(unit_name(wi))
            res.units_done += ok
            remaining.pop(wi, None)

        def plan_views(wi: int) -> list[TileSpec]:
            """Tiles of a unit embedded before the store had views: embed their views only."""
            u = disc.units[wi - nu]
            if u.kind == "files":
                keys = [t.key for t in u.files]
                ids = lookup(keys)
                return [TileSpec(wi, t.key, t.path, tile_size=file_size or 0)
                        for t, i in zip(u.files, ids) if i is not None]
            from ..store.reader import open_store
            st = open_store(store, lock=not staged)
            rec = st.units()[u.id]
            bag = st.slide(u.slide_id)
            rs = int(rec.get("read_size", tile_size))
            return [TileSpec(wi, k, u.slide_path, int(x), int(y), int(rec.get("level", 0)), rs, rs, tile_size)
                    for k, (x, y) in zip(bag.keys, bag.coords)]

        def plan(ui: int) -> list[TileSpec]:
            if ui >= nu:
                return plan_views(ui)
            u = disc.units[ui]
            if u.kind == "files":
                keys = [t.key for t in u.files]
                present = set(k for k, i in zip(keys, lookup(keys)) if i is not None)
                res.tiles_skipped += len(present)
                return [TileSpec(ui, t.key, t.path, tile_size=file_size or 0)
                        for t in u.files if t.key not in present]
            from .wsi import SlideReader, plan_slide, slide_identity, tile_key
            with SlideReader(u.slide_path) as r:
                p = plan_slide(r, target_mpp, tile_size, slide_mpp=cfg.slide_mpp, min_tissue=cfg.min_tissue)
            stem = u.slide_id.replace("/", "__")
            paths = p.save(masks_dir, stem)
            res.overlays.append(str(paths["overlay"]))
            g = p.grid
            info[ui] = {"identity": slide_identity(u.slide_path), "tiles": len(g),
                        "slide_mpp": g.slide_mpp, "level": g.level, "read_size": g.read_size}
            keys = [tile_key(u.slide_id, int(x), int(y)) for x, y in zip(g.x, g.y)]
            present = set(k for k, i in zip(keys, lookup(keys)) if i is not None)
            res.tiles_skipped += len(present)
            return [TileSpec(ui, k, u.slide_path, int(x), int(y), g.level, g.read_size, g.read_size, tile_size)
                    for k, x, y in zip(keys, g.x, g.y) if k not in present]

        def claim_and_plan() -> tuple[int, list[TileSpec] | None, str | None, float] | None:
            """Claim the next unit and plan it (a slide's tissue grid): runs in a helper thread,
            one unit ahead, so planning overlaps the model instead of stalling it."""
            ui = claim()
            if ui is None:
                return None
            t0 = time.perf_counter()
            try:
                return ui, plan(ui), None, time.perf_counter() - t0
            except (SlideError, SourceError, OSError, ValueError) as e:
                return ui, None, str(e).splitlines()[0], time.perf_counter() - t0
            except Exception as e:  # an unreadable slide must not stop the run
                return ui, None, f"{type(e).__name__}: {e}".splitlines()[0], time.perf_counter() - t0

        def batches() -> Iterator[list[TileSpec]]:
            from concurrent.futures import ThreadPoolExecutor
            buf: list[TileSpec] = []
            if sync is not None:
                sync()  # every rank is ready: claiming starts together
            with ThreadPoolExecutor(1, thread_name_prefix="embedstore-plan") as ahead:
                nxt = ahead.submit(claim_and_plan)
                while (got := nxt.result()) is not None:
                    nxt = ahead.submit(claim_and_plan)
                    ui, specs, err, dt = got
                    stages["plan"] += dt
                    if err is not None or specs is None:
                        record_error(unit_name(ui), err or "planning failed")
                        continue
                    if not specs:
                        finish(ui)
                        continue
                    remaining[ui] = len(specs)
                    for s in specs:
                        buf.append(s)
                        if len(buf) == cfg.batch_size:
                            yield buf
                            buf = []
            if buf:
                yield buf

        class _Sampler:
            def __iter__(self) -> Iterator[list[TileSpec]]:
                return batches()

        workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
        dev = torch.device(device)
        dataset = TileDataset(recipe, file_size, decode_threads=usable_cores() if workers == 0 else 1)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Sampler(), num_workers=workers,
            collate_fn=collate, pin_memory=dev.type == "cuda",
            prefetch_factor=4 if workers else None, persistent_workers=False)
        total = sum(len(disc.units[i % nu].files) for i in todo) if disc.kind == "files" else None
        bar = tqdm(total=total, unit="tile", desc=f"extract[{device}]" if world > 1 else "extract",
                   disable=not cfg.progress, position=rank, dynamic_ncols=True, leave=True)
        k = recipe.k if recipe else 0
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            stages["wait"] += t1 - t0
            stages["read+decode"] += batch["read_s"]
            specs: list[TileSpec] = batch["specs"]
            for s, reason in batch["failed"]:
                failed[s.unit] = True
                record_error(f"{unit_name(s.unit)}|{s.key}", reason)
            n = len(specs)
            if n:
                tiles = batch["tiles"].to(dev, non_blocking=True)
                t2 = time.perf_counter()
                stages["transfer"] += t2 - t1
                flat = tiles.reshape(n * (1 + k), *tiles.shape[-3:]) if k else tiles
                emb = bb.embed(flat).numpy()
                t3 = time.perf_counter()
                stages["forward"] += t3 - t2
                emb = emb.reshape(n, 1 + k, -1) if k else emb[:, None]
                base = [j for j, sp in enumerate(specs) if sp.unit < nu]
                if len(base) == n:
                    _add_rows(w, disc, specs, emb, k, meta)
                else:  # some rows only bring views of tiles already stored
                    if base:
                        _add_rows(w, disc, [specs[j] for j in base], emb[base], k, meta)
                    for j, sp in enumerate(specs):
                        if sp.unit >= nu:
                            view_parts.setdefault(sp.unit, []).append(([sp.key], emb[j:j + 1, 1:]))
                stages["write"] += time.perf_counter() - t3
                res.tiles_written += len(base)
                res.views_added += n - len(base)
                bar.update(n)
            for s in specs + [f[0] for f in batch["failed"]]:
                remaining[s.unit] -= 1
                if remaining[s.unit] == 0:
                    finish(s.unit)
        bar.close()
        dataset.close()   # slides opened here (workers=0); workers closed theirs on exit
        t4 = time.perf_counter()
    stages["write"] += time.perf_counter() - t4  # the final flush and commit
    return res


def _add_rows(w: Any, disc: Discovery, specs: list[TileSpec], emb: np.ndarray, k: int,
              meta: StoreMeta) -> None:
    """Add a batch's rows unit by unit (a batch may span units; units are contiguous in it)."""
    start = 0
    n = len(specs)
    while start < n:
        ui = specs[start].unit
        stop = start
        while stop < n and specs[stop].unit == ui:
            stop += 1
        u = disc.units[ui]
        part = specs[start:stop]
        keys = [s.key for s in part]
        common = {"unit": u.id, "source": u.source, "tile_size": meta.tile["tile_size"],
                  "mpp": meta.tile.get("mpp")}
        if u.kind == "files":
            by_key = {t.key: t for t in u.files} if len(part) > 8 else None
            tiles = [by_key[kk] if by_key else next(t for t in u.files if t.key == kk) for kk in keys]
            w.add(emb[start:stop, 0], keys, slide=[t.slide for t in tiles],
                  label=[t.label for t in tiles], level=None,
                  views=emb[start:stop, 1:] if k else None, **common)
        else:
            w.add(emb[start:stop, 0], keys, slide=u.slide_id, x=[s.x for s in part],
                  y=[s.y for s in part], level=part[0].level,
                  views=emb[start:stop, 1:] if k else None, **common)
        start = stop
