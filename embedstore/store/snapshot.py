"""What a reader sees: the shards committed when it looked, stitched into one matrix, with
the id of every row and the augmented views of those rows.

Rows are in commit order, which is id order (ids are assigned at commit, increasing). Shards
rewritten by compaction carry their ids in an ``id`` column, so ids may have gaps; positions
are then found by binary search, otherwise by subtraction.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .catalog import Catalog
from .layout import Layout
from .matrix import MappedShard, Matrix, Piece, embedding_view, primitive_view
from .meta import StoreMeta
from .schema import check_shard_schema

__all__ = ["Snapshot", "read_snapshot", "check_meta_against_shards", "Keys", "key_list", "pick_keys"]

# tile keys as a caller may hold them: a list, a numpy string array, an Arrow string array
Keys = Union[Sequence[str], np.ndarray, pa.Array, pa.ChunkedArray]


def key_list(keys: Keys) -> list[str]:
    """``keys`` as a list of str (one str is one key)."""
    if isinstance(keys, str):
        return [keys]
    if isinstance(keys, (pa.Array, pa.ChunkedArray, np.ndarray)):
        return list(keys.tolist() if isinstance(keys, np.ndarray) else keys.to_pylist())
    return list(keys)


def pick_keys(keys: Keys, idx: np.ndarray) -> list[str]:
    """The keys at positions ``idx`` of ``keys``, as str."""
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        return list(keys.take(pa.array(idx, pa.int64())).to_pylist())
    if isinstance(keys, np.ndarray):
        return list(keys[idx].tolist())
    return [keys[i] for i in idx.tolist()]


@dataclass
class Snapshot:
    mapped: dict[str, MappedShard]     # every shard file of the snapshot, base and view
    embeddings: Matrix                 # (n_rows_committed, dim) over the base shards
    row_ids: np.ndarray                # (n_rows_committed,) int64, increasing
    shard_start: dict[str, int]        # base shard -> position of its first row
    # the view shards, in view-row order: (name, base shard or None), already mapped (a mapped
    # file stays readable after compaction unlinks it), read into ``views`` on first use
    view_shards: list[tuple[str, str | None]] = field(default_factory=list)
    identity: bool = field(init=False)  # row p has id p (nothing compacted away)

    def __post_init__(self) -> None:
        n = len(self.row_ids)
        self.identity = n == 0 or bool(self.row_ids[0] == 0 and self.row_ids[-1] == n - 1)
        self._views: tuple[Matrix, np.ndarray, np.ndarray] | None = None

    @property
    def view_rows(self) -> int:
        """Rows in the view shards (from their footers: no view row is read)."""
        return sum(self.mapped[name].rows for name, _ in self.view_shards)

    # Views are read when first asked for, not at open: at 10M rows x 8 views their ``base_row``
    # and ``view`` columns are 80M rows the open would otherwise read (from disk when cold)
    # for every reader, though most (search, info, predict) never look at a view.
    @property
    def views(self) -> Matrix:
        """(m, dim) over the view shards."""
        return self._read_views()[0]

    @property
    def view_ids(self) -> np.ndarray:
        """(m,) int64 base tile id of each view row."""
        return self._read_views()[1]

    @property
    def view_num(self) -> np.ndarray:
        """(m,) uint8 view number 1..K of each view row."""
        return self._read_views()[2]

    def _read_views(self) -> tuple[Matrix, np.ndarray, np.ndarray]:
        if self._views is None:
            dim, dtype = self.embeddings.dim, self.embeddings.dtype
            pieces, ids, num, pos = [], [], [], 0
            for name, base_name in self.view_shards:
                sh = self.mapped[name]
                for b in sh.batches:
                    pieces.append(Piece(pos, embedding_view(b, dim), b, sh))
                    pos += b.num_rows
                    if "id" in b.schema.names:
                        ids.append(primitive_view(b.column("id")))
                    else:
                        assert base_name is not None, f"view shard {name} names neither ids nor a base shard"
                        at = self.shard_start[base_name]
                        ids.append(self.row_ids[at + primitive_view(b.column("base_row")).astype(np.int64)])
                    num.append(primitive_view(b.column("view")))
            self._views = (Matrix(pieces, dim, dtype),
                           np.concatenate(ids) if ids else np.empty(0, np.int64),
                           np.concatenate(num) if num else np.empty(0, np.uint8))
        return self._views

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pos, ok): the row of each id, and whether the id is in the snapshot at all
        (``pos`` is 0 where it is not)."""
        ids = np.asarray(ids, dtype=np.int64)
        n = len(self.row_ids)
        if self.identity and n:
            pos = ids - self.row_ids[0]
            ok = (pos >= 0) & (pos < n)
            return np.where(ok, pos, 0), ok
        pos = np.searchsorted(self.row_ids, ids)
        pos = np.minimum(pos, max(n - 1, 0))
        ok = (self.row_ids[pos] == ids) if n else np.zeros(ids.shape, bool)
        return pos, ok

    def key_column(self) -> pa.ChunkedArray:
        """The ``key`` of every row in position order: zero-copy over the mapped shards."""
        return pa.chunked_array([p.batch.column("key") for p in self.embeddings.pieces], pa.string())

    def find(self, keys: Keys, live: np.ndarray | None) -> np.ndarray:
        """(len(keys),) int64: the position of each key among the rows (``live``: those not
        tombstoned), -1 where absent. One pass of Arrow's hash lookup over the key column,
        with a hash table of ``keys`` only: for many keys at once (a repeated key is found
        once, its repeats are -1)."""
        q: Any = keys
        if isinstance(q, pa.ChunkedArray):
            q = q.combine_chunks()
        elif not isinstance(q, pa.Array):
            q = pa.array(key_list(keys), pa.string())
        if q.type != pa.string():
            q = q.cast(pa.string())
        which = np.array(pc.index_in(self.key_column(), value_set=q).fill_null(-1).to_numpy(), np.int64)
        if live is not None:
            which[~live] = -1
        rows = np.flatnonzero(which >= 0)
        pos = np.full(len(q), -1, np.int64)
        pos[which[rows]] = rows
        return pos

    def columns_at(self, pos: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        """Metadata columns of the rows at ``pos`` (in the order given): strings as object
        arrays (None = null), integers with -1 for null, floats with NaN."""
        return {c: _to_numpy(a) for c, a in self.arrow_columns_at(pos, columns).items()}

    def arrow_columns_at(self, pos: np.ndarray, columns: Sequence[str]) -> dict[str, pa.Array]:
        """The same columns as Arrow arrays, nulls kept: no Python object per row (a 10M-row
        prediction writes its keys and slides straight from the shards' columns)."""
        m = self.embeddings
        order, spos, bounds, piece = m.locate(np.asarray(pos, dtype=np.int64))
        parts: dict[str, list[pa.Array]] = {c: [] for c in columns}
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a == b:
                continue
            p = m.pieces[piece[a]]
            lo, hi = int(spos[a] - p.start), int(spos[b - 1] - p.start) + 1
            dense = hi - lo == b - a            # consecutive rows (a scan): a zero-copy slice
            local = None if dense else pa.array(spos[a:b] - p.start)
            for c in columns:
                col = p.batch.column(c)
                parts[c].append(col.slice(lo, hi - lo) if dense else col.take(local))
        out = {}
        for c in columns:
            if not parts[c]:
                out[c] = pa.array([], type=m.pieces[0].batch.schema.field(c).type if m.pieces
                                  else pa.string())
                continue
            arr = parts[c][0] if len(parts[c]) == 1 else pa.concat_arrays(parts[c])
            if order is not None:               # back to the order asked for
                inv = np.empty_like(order)
                inv[order] = np.arange(order.size)
                arr = arr.take(pa.array(inv))
            out[c] = arr
        return out


def check_meta_against_shards(lay: Layout, cat: Catalog, meta: StoreMeta) -> None:
    """STORE.json against the first and the last committed base shard (what a writer checks
    before appending: a full check maps every shard, as opening a store for reading does)."""
    base = cat.read(cat.shards_in_order)
    for name, rec in {n: r for n, r in (base[:1] + base[-1:])}.items():
        check_shard_schema(meta, MappedShard(lay.shard(name), rec["size"]).schema, name, lay.meta)


def read_snapshot(lay: Layout, cat: Catalog, dim: int, dtype: np.dtype,
                  mapped: dict[str, MappedShard], meta: StoreMeta | None = None) -> Snapshot:
    """The shards committed now. Files already in ``mapped`` (a previous snapshot) are reused;
    each newly mapped one is checked against ``meta`` (STORE.json)."""
    base, views = cat.read(lambda t: (cat.shards_in_order(t), cat.view_shards(t)))
    now: dict[str, MappedShard] = {}

    def new(name: str, size: int) -> MappedShard:
        sh = MappedShard(lay.shard(name), size)
        if meta is not None:
            check_shard_schema(meta, sh.schema, name, lay.meta)
        return sh
    pieces, ids, pos = [], [], 0
    start: dict[str, int] = {}
    for name, rec in base:
        sh = now[name] = mapped.get(name) or new(name, rec["size"])
        start[name] = pos
        for b in sh.batches:
            pieces.append(Piece(pos, embedding_view(b, dim), b, sh))
            pos += b.num_rows
        ids.append(sh.row_ids(rec["first_id"]))
    row_ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
    vshards: list[tuple[str, str | None]] = []
    for name, rec in sorted(views, key=lambda x: (start.get(x[1].get("base") or "", -1), x[0])):
        base_name = rec.get("base")
        if base_name is not None and base_name not in start:
            continue  # its base shard is not in this snapshot
        now[name] = mapped.get(name) or new(name, rec["size"])
        vshards.append((name, base_name))
    return Snapshot(mapped=now, embeddings=Matrix(pieces, dim, dtype), row_ids=row_ids, shard_start=start,
                    view_shards=vshards)


def _to_numpy(arr: pa.Array) -> np.ndarray:
    t = arr.type
    if pa.types.is_integer(t):
        return arr.fill_null(-1).to_numpy()
    if pa.types.is_floating(t):
        return arr.to_numpy(zero_copy_only=False)
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=object)  # strings; None = null
