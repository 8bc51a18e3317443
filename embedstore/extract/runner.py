"""The extraction run: sources -> work items -> one persistent DataLoader -> backbone -> writer.

The sampler (main process) claims work items one at a time, plans them (a slide's tissue grid)
and yields batches of tile specs; workers decode (with none, ``DecodeAhead``: one helper thread
decodes the next batch while the model runs this one, ``ExtractConfig.decode_ahead``); the
batch moves to the device as uint8 (pinned, non-blocking on CUDA) where the backbone resizes,
normalises and embeds; a background writer commits shards. A unit is marked done only when
all its tiles are committed, so a killed run restarted gives the same store. Failed inputs are
recorded as errors and the run goes on.

Pieces: ``pending`` (what is left: pure), ``tiling`` (a work item's tile specs), ``pipeline``
(sampler, model loop and commits of one process), ``parallel`` (one process per device).

Tile geometry (``STORE.json`` ``tile``), in order: ``--tile-size`` / ``--target-mpp``; the
store's own when it exists (same kind of source); the backbone's input size (and, for slides,
its native mpp, else 0.5 µm/px). Never the size of whichever file sorts first. Every tile file
is resized to ``tile_size`` x ``tile_size`` (bilinear, aspect ratio not kept) when each of its
sides is within a factor ``MAX_FILE_SCALE`` (4) of it; a file farther off (a 5000 px image
among 96 px tiles) is recorded as an error naming its size, and never decoded.

Labels (class folders, CSV label columns) are re-derived from the sources on every run, after
the units are known done, so a run killed after its last commit and resumed still imports them.
Keys that this run found to name another file than the one embedded under them (see
``tiling``) are left out of the labels task.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BackboneMismatchError, SourceError
from ..store import StoreWriter, import_labels, lookup_ids
from ..store.atomic import crash_point
from ..store.meta import StoreMeta, read_meta, write_meta
from .config import STAGES, ExtractConfig, ExtractResult, default_workers, model_leaves_a_core, usable_cores
from .dataset import DecodeAhead, TileDataset, collate
from .pending import WorkPlan, read_work
from .pipeline import Pipeline, embed_all
from .sources import Discovery, discover
from .tiling import TilePlanner
from .transforms import ViewRecipe

if TYPE_CHECKING:
    from ..backbones import Backbone

__all__ = ["ExtractConfig", "ExtractResult", "extract", "run_process", "store_meta_for",
           "default_workers", "usable_cores"]

# batches decoded ahead of the model without DataLoader workers (DecodeAhead's queue)
DECODE_AHEAD_BATCHES = 2


def tile_geometry(input_size: int, native_mpp: float | None, disc: Discovery, cfg: ExtractConfig,
                  existing: StoreMeta | None = None) -> dict[str, Any]:
    """The store's tile geometry: flags > the existing store's (same kind) > the backbone's."""
    have: dict[str, Any] = {}
    if existing is not None and existing.tile.get("kind") == disc.kind:
        have = existing.tile
    side = int(cfg.tile_size or have.get("tile_size") or input_size)
    if disc.kind == "slides":
        mpp = cfg.target_mpp or have.get("mpp") or native_mpp or 0.5
        return {"kind": "slides", "tile_size": side, "mpp": float(mpp)}
    return {"kind": "files", "tile_size": side,
            "mpp": cfg.target_mpp if cfg.target_mpp is not None else have.get("mpp")}


def store_meta_for(backbone: Backbone, disc: Discovery, cfg: ExtractConfig,
                   recipe: ViewRecipe | None, existing: StoreMeta | None = None) -> StoreMeta:
    spec = backbone.spec
    tile = tile_geometry(spec.input_size, spec.native_mpp, disc, cfg, existing)
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
    if disc.task and int(os.environ.get("RANK", "0")) == 0:
        crash_point("before_labels")
        _import_task_labels(store, disc, skip=set(res.conflicting_keys))
    res.elapsed = time.perf_counter() - t_start
    res.store = str(store)
    return res


def _import_task_labels(store: Path, disc: Discovery, skip: set[str]) -> None:
    """(Re)import the labels the sources carry as the run's task, for the keys the store holds
    (idempotent: every run does it, so a resumed run whose units were all done still does);
    ``skip``: keys found to hold another file's embedding."""
    rows: list[dict[str, Any]] = [
        {"key": t.key, "label": t.label, "split": t.split, "group": t.slide}
        for u in disc.units for t in u.files if t.label is not None and t.key not in skip]
    if not rows or not disc.task:
        return
    found = lookup_ids(store, [str(r["key"]) for r in rows])
    rows = [r for r, i in zip(rows, found) if i is not None]
    if rows:
        import_labels(store, None, disc.task, rows=rows, on_unknown="skip")


def run_process(cfg: ExtractConfig, disc: Discovery, recipe: ViewRecipe | None, device: str, *,
                rank: int = 0, world: int = 1, work: WorkPlan | None = None,
                claim: Callable[[], int | None] | None = None,
                sync: Callable[[], object] | None = None, staged: bool = False) -> ExtractResult:
    """The work of one process (one device): claim work items, embed, commit.

    ``work``: the list every rank computed (None: read here, once the writer has opened the
    store); ``claim``: the next index into it (None: in order); ``sync``: the ranks' barrier;
    ``staged``: this rank stages its commits for rank 0 (see ``parallel``)."""
    import torch

    from ..backbones import create_backbone
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    res = ExtractResult(stages=dict.fromkeys(STAGES, 0.0))
    bb = create_backbone(cfg.backbone, weights=cfg.weights, random_init=cfg.random_init, device=device,
                         precision=cfg.precision, compile=cfg.compile, num_threads=cfg.num_threads)
    layout_meta = Path(cfg.store) / "STORE.json"
    meta = store_meta_for(bb, disc, cfg, recipe, read_meta(Path(cfg.store)) if layout_meta.exists() else None)
    if sync is not None and rank != 0:
        sync()  # rank 0 creates the store first
    w = StoreWriter(cfg.store, meta, on_duplicate="skip", rows_per_shard=cfg.rows_per_shard,
                    staged=staged)
    if sync is not None and rank == 0:
        sync()
    with w:
        if recipe is not None and w.meta.views is None and not staged:  # record the recipe the views follow
            write_meta(Path(cfg.store), w.meta.with_views(recipe.to_dict()))
        if work is None:
            work = read_work(disc, cfg.store, views=recipe is not None, lock=not staged)
        if claim is None:
            order = iter(range(len(work.items)))
            claim = lambda: next(order, None)  # noqa: E731
        pipe = _pipeline(cfg, disc, meta, work, w, res, _claiming(claim, work, w, res), sync,
                         staged, rank)
        _embed(pipe, bb, cfg, recipe, device, work, rank, world)
        t4 = time.perf_counter()
    res.stages["write"] += time.perf_counter() - t4  # the final flush and commit
    _committed(res, w, failed={work.items[i].name for i in pipe.failed})
    return res


def _claiming(nxt: Callable[[], int | None], work: WorkPlan, w: StoreWriter,
              res: ExtractResult) -> Callable[[], int | None]:
    """``nxt`` (the next index into ``work``), skipping the units the store will not let this
    writer have: done meanwhile or claimed by another live extract (counted in ``units_left``).
    Items that only add views are not claimed: their unit is done, so a claim would refuse."""
    def claim() -> int | None:
        while (index := nxt()) is not None:
            item = work.items[index]
            if item.views_only or w.claim(item.name):
                return index
            res.units_left += 1
        return None
    return claim


def _committed(res: ExtractResult, w: StoreWriter, failed: set[str]) -> None:
    """Report what the closed writer really committed, not what the pipeline handed it: rows
    another run committed first were dropped at commit, and so were the units they belong to
    (``failed``: units the pipeline did not count done)."""
    res.tiles_written = w.rows_committed
    res.tiles_discarded = sum(w.discarded.values())
    lost = [u for u in w.discarded if u not in w.committed]
    res.units_done -= sum(u not in failed for u in lost)
    res.units_left += len(lost)


def _pipeline(cfg: ExtractConfig, disc: Discovery, meta: StoreMeta, work: WorkPlan, w: StoreWriter,
              res: ExtractResult, claim: Callable[[], int | None],
              sync: Callable[[], object] | None, staged: bool, rank: int = 0) -> Pipeline:
    """The pipeline of this process, with the errors and skipped units of ``work`` recorded."""
    tile_size = int(meta.tile["tile_size"])
    planner = TilePlanner(Path(cfg.store), tile_size=tile_size,
                          file_size=tile_size if disc.kind == "files" else None,
                          target_mpp=meta.tile["mpp"], slide_mpp=cfg.slide_mpp,
                          min_tissue=cfg.min_tissue, lock=not staged)
    pipe = Pipeline(work.items, planner, w, res, batch_size=cfg.batch_size, claim=claim,
                    tile_meta={"tile_size": meta.tile["tile_size"], "mpp": meta.tile.get("mpp")},
                    sync=sync)
    res.units_skipped += work.skipped
    if rank == 0:   # every rank computed the same plan: one records what it found
        res.conflicting_keys += work.conflicting
        for unit, reason in work.changed:
            pipe.record_error(unit, reason)
    return pipe


def _embed(pipe: Pipeline, bb: Backbone, cfg: ExtractConfig, recipe: ViewRecipe | None,
           device: str, work: WorkPlan, rank: int, world: int) -> None:
    """One persistent DataLoader over every work item, driven by the pipeline's sampler."""
    import torch
    from tqdm import tqdm
    workers = cfg.num_workers if cfg.num_workers is not None else default_workers(device)
    file_size = pipe.planner.file_size
    dataset = TileDataset(recipe, file_size, decode_threads=usable_cores() if workers == 0 else 1)
    pin = torch.device(device).type == "cuda"
    loader: DecodeAhead | torch.utils.data.DataLoader[Any]
    threads = cfg.num_threads or torch.get_num_threads()
    free_core = model_leaves_a_core(device, threads)
    ahead = cfg.decode_ahead is not False          # None: on
    pipe.low_priority = not free_core
    if workers == 0 and ahead:   # the next batch decodes in a thread while the model runs
        loader = DecodeAhead(dataset, pipe, pin_memory=pin, low_priority=not free_core,
                             depth=DECODE_AHEAD_BATCHES)
    else:
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=pipe, num_workers=workers, collate_fn=collate, pin_memory=pin,
            prefetch_factor=4 if workers else None, persistent_workers=False)
    bar = tqdm(total=work.n_files if file_size is not None else None, unit="tile",
               desc=f"extract[{device}]" if world > 1 else "extract",
               disable=not cfg.progress, position=rank, dynamic_ncols=True, leave=True)
    try:
        embed_all(pipe, bb, loader, device, recipe.k if recipe else 0, bar)
    finally:
        bar.close()
        if isinstance(loader, DecodeAhead):
            loader.close()    # its thread is done with the slides before they are closed
        dataset.close()   # slides opened here (workers=0); workers closed theirs on exit
