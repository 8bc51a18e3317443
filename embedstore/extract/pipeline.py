"""One process's run between the sampler, the model and the writer.

``Pipeline.batches`` is the DataLoader's batch sampler: it claims work items one ahead in a
helper thread (so planning a slide overlaps the model instead of stalling it), plans them and
yields batches of tile specs. ``embed_all`` runs the model over the decoded batches; the pipeline
adds their rows (or views) to the writer and counts each item's tiles down, committing the item
when its last tile has landed. An item is marked done only when none of its tiles failed.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ExtractResult
from .dataset import TileSpec, lower_thread_priority
from .pending import WorkItem
from .tiling import Planned, TilePlanner

if TYPE_CHECKING:
    from ..backbones import Backbone
    from ..store import StoreWriter

__all__ = ["Pipeline", "embed_all"]


class Pipeline:
    """The state shared by sampler and model loop: per work item (an index into ``items``),
    the tiles still in flight, whether one failed, its record and the views gathered so far."""

    def __init__(self, items: list[WorkItem], planner: TilePlanner, writer: StoreWriter,
                 res: ExtractResult, *, batch_size: int, claim: Callable[[], int | None],
                 tile_meta: dict[str, Any], sync: Callable[[], object] | None = None) -> None:
        self.items = items
        self.planner = planner
        self.writer = writer
        self.res = res
        self.batch_size = batch_size
        self.claim = claim                # the next item index, None when all are claimed
        self.tile_meta = tile_meta        # tile_size and mpp, stored with every row
        self.sync = sync                  # barrier of the ranks (None: one process)
        self.remaining: dict[int, int] = {}
        self.failed: set[int] = set()
        self.info: dict[int, dict[str, Any]] = {}
        self.view_parts: dict[int, list[tuple[list[str], np.ndarray]]] = {}
        # the model on every core: the planning thread runs at idle priority, on what the model leaves
        self.low_priority = False

    def record_error(self, unit: str, reason: str) -> None:
        self.res.errors.append((unit, reason))
        self.writer.add_error(unit, reason)

    # -- the sampler ----------------------------------------------------------------------
    def _claim_and_plan(self) -> Planned | None:
        index = self.claim()
        return None if index is None else self.planner.plan_timed(index, self.items[index])

    def batches(self) -> Iterator[list[TileSpec]]:
        buf: list[TileSpec] = []
        if self.sync is not None:
            self.sync()  # every rank is ready: claiming starts together
        with ThreadPoolExecutor(1, thread_name_prefix="embedstore-plan",
                                initializer=lower_thread_priority if self.low_priority else None) as ahead:
            nxt = ahead.submit(self._claim_and_plan)
            while (got := nxt.result()) is not None:
                nxt = ahead.submit(self._claim_and_plan)
                for s in self._start(got):
                    buf.append(s)
                    if len(buf) == self.batch_size:
                        yield buf
                        buf = []
        if buf:
            yield buf

    def __iter__(self) -> Iterator[list[TileSpec]]:   # DataLoader's batch_sampler protocol
        return self.batches()

    def _start(self, got: Planned) -> list[TileSpec]:
        """Take a planned item in: the specs to decode ([] when it failed or has nothing to do)."""
        self.res.stages["plan"] += got.seconds
        if got.unit is None:
            self.record_error(self.items[got.item].name, got.error or "planning failed")
            return []
        p = got.unit
        self.res.tiles_skipped += p.skipped
        self.res.conflicting_keys += p.conflicts
        for key, reason in p.errors:          # inputs refused at planning: the unit is not done
            self.failed.add(got.item)
            self.record_error(f"{self.items[got.item].name}|{key}", reason)
        if p.overlay is not None:
            self.res.overlays.append(p.overlay)
        if p.info is not None:
            self.info[got.item] = p.info
        if not p.specs:
            self.finish(got.item)
            return []
        self.remaining[got.item] = len(p.specs)
        return p.specs

    # -- results of the model ---------------------------------------------------------------
    def tiles_failed(self, failed: list[tuple[TileSpec, str]]) -> None:
        for s, reason in failed:
            self.failed.add(s.unit)
            self.record_error(f"{self.items[s.unit].name}|{s.key}", reason)

    def write(self, specs: list[TileSpec], emb: np.ndarray) -> None:
        """Add a batch: ``emb: (n, 1 + K, dim)``, row 0 the tile, rows 1.. its views."""
        n = len(specs)
        base = [j for j, sp in enumerate(specs) if not self.items[sp.unit].views_only]
        if len(base) == n:
            self._add_rows(specs, emb)
        else:  # some rows only bring views of tiles already stored
            if base:
                self._add_rows([specs[j] for j in base], emb[base])
            for j, sp in enumerate(specs):
                if self.items[sp.unit].views_only:
                    self.view_parts.setdefault(sp.unit, []).append(([sp.key], emb[j:j + 1, 1:]))
        self.res.tiles_written += len(base)     # handed to the writer; the runner reports what it committed
        self.res.views_added += n - len(base)

    def landed(self, specs: Iterable[TileSpec]) -> None:
        """These tiles are done with (embedded or failed): finish the items they complete."""
        for s in specs:
            self.remaining[s.unit] -= 1
            if self.remaining[s.unit] == 0:
                self.finish(s.unit)

    def finish(self, index: int) -> None:
        """Commit item ``index``: end its unit (done unless a tile failed), or add its views."""
        item = self.items[index]
        ok = index not in self.failed
        if not item.views_only:
            self.writer.end_unit(item.name, done=ok, info=self.info.pop(index, None))
        else:
            parts = self.view_parts.pop(index, [])
            if parts:
                keys = [k for ks, _ in parts for k in ks]
                ids = np.array(self.planner.lookup(keys), dtype=np.int64)
                self.writer.add_views(ids, keys, np.concatenate([v for _, v in parts]),
                                      unit=item.name if ok else None)
            elif ok:
                self.writer.end_unit(item.name)
        self.res.units_done += ok
        self.remaining.pop(index, None)

    def _add_rows(self, specs: list[TileSpec], emb: np.ndarray) -> None:
        """Add rows item by item (a batch may span items; an item's tiles are contiguous in it)."""
        views = emb.shape[1] > 1
        start, n = 0, len(specs)
        while start < n:
            index = specs[start].unit
            stop = start
            while stop < n and specs[stop].unit == index:
                stop += 1
            u = self.items[index].unit
            part = specs[start:stop]
            keys = [s.key for s in part]
            common = dict(unit=u.id, source=u.source, views=emb[start:stop, 1:] if views else None,
                          **self.tile_meta)
            if u.kind == "files":
                by_key = {t.key: t for t in u.files} if len(part) > 8 else None
                tiles = [by_key[kk] if by_key else next(t for t in u.files if t.key == kk)
                         for kk in keys]
                self.writer.add(emb[start:stop, 0], keys, slide=[t.slide for t in tiles],
                                label=[t.label for t in tiles], level=None, **common)
            else:
                self.writer.add(emb[start:stop, 0], keys, slide=u.slide_id, x=[s.x for s in part],
                                y=[s.y for s in part], level=part[0].level, **common)
            start = stop


def embed_all(pipe: Pipeline, bb: Backbone, loader: Iterable[dict[str, Any]], device: str,
              k: int, bar: Any) -> None:
    """The model loop: take decoded batches (tiles and, with ``k`` views, their views), embed
    them on ``device`` and hand the embeddings to ``pipe``; time each stage."""
    import torch
    it = iter(loader)
    try:
        _model_loop(pipe, bb, it, torch.device(device), k, bar)
    finally:
        close = getattr(it, "close", None)
        if close is not None:   # a generator loader (DecodeAhead): stop its thread now, not at GC
            close()


def _model_loop(pipe: Pipeline, bb: Backbone, it: Iterator[dict[str, Any]], dev: Any, k: int,
                bar: Any) -> None:
    """Batch by batch: "wait" is the time this loop waited for the next batch (the sampler's
    step included), "read+decode" the decode time summed over tiles (wherever it ran)."""
    stages = pipe.res.stages
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
        pipe.tiles_failed(batch["failed"])
        n = len(specs)
        if n:
            tiles = batch["tiles"].to(dev, non_blocking=True)
            t2 = time.perf_counter()
            stages["transfer"] += t2 - t1
            flat = tiles.reshape(n * (1 + k), *tiles.shape[-3:]) if k else tiles
            emb = bb.embed(flat).numpy()
            t3 = time.perf_counter()
            stages["forward"] += t3 - t2
            pipe.write(specs, emb.reshape(n, 1 + k, -1) if k else emb[:, None])
            stages["write"] += time.perf_counter() - t3
            bar.update(n)
        pipe.landed(specs + [s for s, _ in batch["failed"]])
