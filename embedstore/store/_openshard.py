"""The writer's open shard: rows of finished (or spilled) units encoded into a base shard file,
with their augmented views in a view shard file beside it, and what the commit will need
(keys, slide runs, units).

View rows written beside a base shard name their tile by ``base_row`` (its row in that base
shard) and key: ids are only known at commit.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import pyarrow as pa

from ..errors import ShapeError, WriterError
from ._shardfile import ShardFile, fixed_list
from .layout import Layout, shard_name, view_name
from .schema import META_COLUMNS, base_schema, view_schema

__all__ = ["Pending", "OpenShard", "Sealed", "drop_units", "is_seq", "views_table"]


def is_seq(v: Any) -> TypeGuard[Iterable[Any]]:
    """Whether a metadata value is one value per row (else one value for all rows)."""
    return isinstance(v, (list, tuple, np.ndarray, pa.Array))


@dataclass
class Pending:
    """Rows of one unit not yet written to a file."""
    cols: dict[str, list[Any]] = field(default_factory=dict)
    emb: list[np.ndarray] = field(default_factory=list)
    views: list[np.ndarray] = field(default_factory=list)   # (n, K, dim) per add
    rows: int = 0

    def extend(self, keys: list[str], emb: np.ndarray, views: np.ndarray | None,
               meta: dict[str, Any], unit: str | None) -> None:
        """Add rows: ``emb`` (n, dim) and ``views`` (n, K, dim) in the store dtype; ``meta``
        maps columns of META_COLUMNS to one value for all rows or a sequence of n."""
        n = len(keys)
        if views is None and self.views:
            raise ShapeError(f"unit {unit!r}: views given for some rows and not others")
        cols: dict[str, list[Any]] = {}
        for c in META_COLUMNS:
            v = keys if c == "key" else meta.get(c)
            cols[c] = list(v) if is_seq(v) else [v] * n
            if len(cols[c]) != n:
                raise ShapeError(f"metadata column {c!r} has {len(cols[c])} values for {n} rows")
        for c, vals in cols.items():  # checked first: a bad column adds nothing
            self.cols.setdefault(c, []).extend(vals)
        self.emb.append(emb)
        if views is not None:
            self.views.append(views)
        self.rows += n


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
        self.slide_runs: list[list[Any]] = []   # [slide, start_row, count]
        self.row_units: list[list[Any]] = []    # [unit, start_row, count]: whose rows these are
        self.opened = time.monotonic()

    @property
    def rows(self) -> int:
        return self.base.rows

    @property
    def name(self) -> str:
        return self.base.name

    def append(self, p: Pending, batch_rows: int, unit: str | None = None) -> None:
        """Write the rows of ``p`` (of ``unit``) in batches of ``batch_rows``."""
        emb = np.concatenate(p.emb) if len(p.emb) > 1 else p.emb[0]
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
        for a in range(0, p.rows, batch_rows):
            b = min(a + batch_rows, p.rows)
            self._write_base(p, emb, a, b)
            if views is not None:
                self._write_views(p.cols["key"][a:b], views[a:b], first + a)
        self._note_slides(p.cols["slide"], first)
        self.keys.extend(p.cols["key"])
        self.row_units.append([unit, first, p.rows])

    def _write_base(self, p: Pending, emb: np.ndarray, a: int, b: int) -> None:
        arrays = [pa.array(p.cols["key"][a:b], pa.string())]
        for c, t in list(META_COLUMNS.items())[1:]:
            arrays.append(pa.array(p.cols[c][a:b], t))
        arrays.append(fixed_list(emb[a:b]))
        at = self.rows
        try:
            self.base.write(pa.RecordBatch.from_arrays(arrays, schema=self.base.schema))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise WriterError(f"{self.name} rows {at}..{at + b - a}: bad metadata ({e})") from e

    def _write_views(self, keys: list[str], vb: np.ndarray, first_row: int) -> None:
        assert self.view is not None
        self.view.write(views_table(keys, vb, self.dim, self.dtype, base_row=first_row,
                                    schema_meta=self.schema_meta))

    def _note_slides(self, slides: list[Any], first: int) -> None:
        """Extend the runs of consecutive rows of one slide (the catalog's slide -> ids map)."""
        runs = self.slide_runs
        for i, s in enumerate(slides):
            if s is None:
                continue
            if runs and runs[-1][0] == s and runs[-1][1] + runs[-1][2] == first + i:
                runs[-1][2] += 1
            else:
                runs.append([s, first + i, 1])

    def sealed(self, recs: dict[str, dict[str, Any]]) -> "Sealed":
        """What the commit needs of this file once sealed (``recs``: the seal's records)."""
        return Sealed(self.name, self.view.name if self.view is not None else None, self.rows, self.keys,
                      self.slide_runs, self.units, self.row_units, recs)

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
    recs: dict[str, dict[str, Any]]            # file name -> {rows, sha256, size}


def drop_units(lay: Layout, s: Sealed, drop: set[str], name: str,
               schema_meta: dict[bytes, bytes] | None) -> Sealed | None:
    """Rewrite sealed shard ``s`` as ``name`` without the rows of the units in ``drop`` (finished
    by another writer meanwhile), its view shard likewise; the old files go. None when no row is
    left (the files go too)."""
    keep = np.ones(s.rows, bool)
    runs: list[list[Any]] = []
    for u, a, c in s.row_units:
        if u in drop:
            keep[a:a + c] = False
        else:
            runs.append([u, int(keep[:a].sum()), c])
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
            newpos = np.cumsum(keep) - 1
            vt = vt.filter(pa.array(keep[rows]))
            vt = vt.set_column(1, pa.field("base_row", pa.int32(), nullable=False), pa.array(newpos[rows[keep[rows]]].astype(np.int32)))
            vf = ShardFile(lay, view, vt.schema)
            vf.write_table(vt)
            recs[view] = vf.seal()
        keys = table.column("key").to_pylist()
        out = Sealed(name, view, table.num_rows, keys, _slide_runs(table.column("slide").to_pylist()),
                     [(u, i) for u, i in s.units if u not in drop], runs, recs)
    for f in old:
        f.unlink(missing_ok=True)
    return out


def _slide_runs(slides: list[Any]) -> list[list[Any]]:
    runs: list[list[Any]] = []
    for i, sl in enumerate(slides):
        if sl is None:
            continue
        if runs and runs[-1][0] == sl and runs[-1][1] + runs[-1][2] == i:
            runs[-1][2] += 1
        else:
            runs.append([sl, i, 1])
    return runs
