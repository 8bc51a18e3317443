"""The writer's open shard: rows of finished (or spilled) units encoded into a base shard file,
with their augmented views in a view shard file beside it, and what the commit will need
(keys, slide runs, units).

View rows written beside a base shard name their tile by ``base_row`` (its row in that base
shard) and key: ids are only known at commit.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import ShapeError
from ._pending import Pending, slide_runs
from ._shardfile import ShardFile, fixed_list
from .atomic import fsync_dir
from .layout import Layout, shard_name, view_name
from .schema import META_COLUMNS, base_schema, view_schema

__all__ = ["OpenShard", "Sealed", "drop_units", "views_table"]


class OpenShard:
    """The base shard being filled (and its view shard, opened with the first views)."""

    def __init__(self, lay: Layout, token: str, seq: int, dim: int, dtype: str,
                 schema_meta: dict[bytes, bytes] | None = None) -> None:
        self.lay, self.token, self.seq, self.dim, self.dtype = lay, token, seq, dim, dtype
        self.schema_meta = schema_meta   # the store's record in every shard's schema
        self.base = ShardFile(lay, shard_name(token, seq), base_schema(dim, dtype, metadata=schema_meta))
        self.view: ShardFile | None = None
        self.units: list[tuple[str, dict[str, Any]]] = []
        self.keys: list[str] = []
        self.kbytes: list[bytes] = []           # the keys encoded
        self.slide_runs: list[list[Any]] = []   # [slide, start_row, count]
        self.row_units: list[list[Any]] = []    # [unit, start_row, count]: whose rows these are
        self.opened = time.monotonic()

    @property
    def rows(self) -> int:
        return self.base.rows

    @property
    def name(self) -> str:
        return self.base.name

    def append(self, p: Pending, unit: str | None = None) -> None:
        """Write the rows of ``p`` (of ``unit``), one record batch per block of ``p``."""
        views = (np.concatenate(p.views) if len(p.views) > 1 else p.views[0]) if p.views else None
        if views is not None and self.view is None:
            if self.rows:
                raise ShapeError("views given for some units and not others in one shard")
            # a view file shares its base's seq
            self.view = ShardFile(self.lay, shard_name(self.token, self.seq, view=True),
                                  view_schema(self.dim, self.dtype, metadata=self.schema_meta))
        elif views is None and self.view is not None:
            raise ShapeError("views given for some units and not others in one shard")
        first = self.rows
        cols = {c: p.column(c) for c in META_COLUMNS}
        for a, b, emb in p.batches():
            arrays = [cols[c].slice(a, b - a) for c in META_COLUMNS] + [fixed_list(emb)]
            self.base.write(pa.RecordBatch.from_arrays(arrays, schema=self.base.schema))
            if views is not None:
                self._write_views(p.keys[a:b], views[a:b], first + a)
        runs = slide_runs(cols["slide"], first)
        last = self.slide_runs[-1] if self.slide_runs else None
        if runs and last is not None and last[0] == runs[0][0] and last[1] + last[2] == runs[0][1]:
            last[2] += runs.pop(0)[2]   # the slide's run goes on across units
        self.slide_runs.extend(runs)
        self.keys.extend(p.keys)
        self.kbytes.extend(p.kbytes)
        p.written()
        self.row_units.append([unit, first, p.rows])

    def _write_views(self, keys: list[str], vb: np.ndarray, first_row: int) -> None:
        assert self.view is not None
        self.view.write(views_table(keys, vb, self.dim, self.dtype, base_row=first_row,
                                    schema_meta=self.schema_meta))

    def sealed(self, recs: dict[str, dict[str, Any]]) -> "Sealed":
        """What the commit needs of this file once sealed (``recs``: the seal's records)."""
        return Sealed(self.name, self.view.name if self.view is not None else None, self.rows, self.keys,
                      self.slide_runs, self.units, self.row_units, recs, self.kbytes)

    def files(self) -> list[ShardFile]:
        return [self.base] + ([self.view] if self.view is not None else [])

    def discard(self) -> None:
        for f in self.files():
            f.discard()


def views_table(keys: Sequence[str], views: np.ndarray, dim: int, dtype: str, *,
                base_row: int | None = None, ids: np.ndarray | None = None,
                schema_meta: dict[bytes, bytes] | None = None) -> pa.Table:
    """View rows of tiles ``keys`` with ``views`` (n, K, dim): row j*K + v is view v+1 of tile j.

    Written beside their base shard, tiles are named by row: ``base_row`` is tile 0's. Added to
    committed tiles, they are named by ``ids`` (n,) int64, and ``base_row`` is -1."""
    n, k = views.shape[0], views.shape[1]
    rows = (np.full(n * k, -1, np.int32) if base_row is None
            else np.repeat(np.arange(base_row, base_row + n, dtype=np.int32), k))
    cols = [pa.array(np.repeat(np.array(keys, dtype=object), k), pa.string()), pa.array(rows),
            pa.array(np.tile(np.arange(1, k + 1, dtype=np.uint8), n)), fixed_list(views.reshape(n * k, dim))]
    if ids is not None:
        cols.append(pa.array(np.repeat(np.asarray(ids, dtype=np.int64), k)))
    return pa.Table.from_arrays(cols, schema=view_schema(dim, dtype, with_id=ids is not None,
                                                         metadata=schema_meta))


@dataclass
class Sealed:
    """A sealed (renamed, not yet registered) base shard and its view shard: what its commit needs."""
    name: str
    view: str | None
    rows: int
    keys: list[str]
    slide_runs: list[list[Any]]
    units: list[tuple[str, dict[str, Any]]]    # units the commit marks done
    row_units: list[list[Any]]                 # [unit, start_row, count]
    recs: dict[str, dict[str, Any]]            # file name -> {rows, size, hash, digest}
    kbytes: list[bytes]                        # keys encoded


def drop_units(lay: Layout, s: Sealed, drop: set[str], name: str,
               schema_meta: dict[bytes, bytes] | None) -> Sealed | None:
    """Rewrite sealed shard ``s`` as ``name`` without the rows of the units in ``drop`` (finished
    by another writer meanwhile), its view shard likewise; the old files go. None when no row is
    left (the files go too)."""
    keep = np.ones(s.rows, bool)
    for u, a, c in s.row_units:
        if u in drop:
            keep[a:a + c] = False
    newpos = np.cumsum(keep) - 1             # old row -> its row in the rewritten shard
    runs: list[list[Any]] = [[u, int(newpos[a]), c] for u, a, c in s.row_units if u not in drop]
    old = [lay.shard(s.name)] + ([lay.shard(s.view)] if s.view else [])
    out = None
    if keep.any():
        with pa.memory_map(str(old[0])) as m:
            table = pa.ipc.open_file(m).read_all().filter(pa.array(keep))
        base = ShardFile(lay, name, table.schema.with_metadata(schema_meta) if schema_meta else table.schema)
        base.write_table(table)
        recs = {name: base.seal()}
        view = None
        if s.view:
            view = view_name(name)
            with pa.memory_map(str(old[1])) as m:
                vt = pa.ipc.open_file(m).read_all()
            rows = vt.column("base_row").to_numpy().astype(np.int64)
            vt = vt.filter(pa.array(keep[rows]))
            vt = vt.set_column(1, pa.field("base_row", pa.int32(), nullable=False), pa.array(newpos[rows[keep[rows]]].astype(np.int32)))
            vf = ShardFile(lay, view, vt.schema)
            vf.write_table(vt)
            recs[view] = vf.seal()
        kept = np.flatnonzero(keep).tolist()
        out = Sealed(name, view, table.num_rows, [s.keys[i] for i in kept], slide_runs(table.column("slide"), 0),
                     [(u, i) for u, i in s.units if u not in drop], runs, recs, [s.kbytes[i] for i in kept])
        for d in lay.homes():    # the new files' renames durable before the catalog names them
            fsync_dir(d)
    for f in old:
        f.unlink(missing_ok=True)
    return out
