"""Reading a store: ``open_store(path)`` -> :class:`Store`.

A store opened for reading sees the shards committed when it opened (a snapshot) until
``refresh()``. Tombstones are different: every call checks a counter in the catalog and honours
deletions at once. Nothing loads the embedding matrix unless asked.
"""
from __future__ import annotations

import difflib
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..errors import UnknownKeyError
from .catalog import Catalog, JsonCache, from_u64, label_key, open_catalog
from .layout import Layout, is_view
from .meta import StoreMeta, read_meta, read_store_meta
from .protocol import Bag, StoredViews
from .snapshot import Keys, Snapshot, key_list, pick_keys, read_snapshot

if TYPE_CHECKING:
    from .protocol import StoreLike
    from .writer import StoreWriter

__all__ = ["Store", "Bag", "StoredViews", "open_store"]

# Looking up at least 1/SCAN_RATIO of the rows' keys (and SCAN_MIN keys) probes the shards'
# key column once with a hash table of the keys (~30 ns a row) instead of one LMDB get per
# key (~1 us): the break-even is near one key in 30 rows.
SCAN_RATIO, SCAN_MIN = 16, 4096


def open_store(path: str | os.PathLike[str], *, lock: bool = True) -> "Store":
    """Open a store for reading. ``lock=False`` uses LMDB's lock-free read-only mode, for a
    store that nothing is writing (e.g. on a network filesystem, read from another machine)."""
    return Store(path, lock=lock)


class Store:
    def __init__(self, path: str | os.PathLike[str], *, lock: bool = True) -> None:
        self.path = Path(path)
        self.lay = Layout(self.path)
        self.meta: StoreMeta = read_store_meta(self.path)
        self._lock_mode = lock
        self.dim, self.dtype = self.meta.dim, np.dtype(self.meta.dtype)
        self.refresh()

    @property
    def cat(self) -> Catalog:
        """This process's catalog (a store object that crossed a fork reopens it)."""
        return open_catalog(self.path, lock=self._lock_mode)

    # -- snapshot -----------------------------------------------------------------------
    def refresh(self) -> "Store":
        """Take a new snapshot of the committed shards (and tombstones)."""
        self.meta = read_meta(self.path)
        mapped = self.snapshot.mapped if hasattr(self, "snapshot") else {}  # files stay mapped
        self.snapshot: Snapshot = read_snapshot(self.lay, self.cat, self.dim, self.dtype, mapped,
                                                self.meta)
        self.embeddings = self.snapshot.embeddings
        self._row_ids = self.snapshot.row_ids
        self._ranges: dict[str, list[tuple[int, int]]] | None = None
        self._tomb_gen = -1
        self._check_tombstones()
        return self

    def _check_tombstones(self) -> None:
        gen = self.cat.read(lambda t: self.cat.counter(t, "tomb_gen"))
        if gen == self._tomb_gen:
            return
        dead = np.array(self.cat.read(self.cat.deleted_ids), dtype=np.int64)
        pos, ok = self._positions(dead)
        self._dead_pos = np.sort(pos[ok])
        self._live: np.ndarray | None = None
        self._tomb_gen = gen

    @property
    def live_mask(self) -> np.ndarray:
        """(n_rows_committed,) bool: False for tombstoned rows."""
        self._check_tombstones()
        if self._live is None:
            live = np.ones(len(self._row_ids), bool)
            live[self._dead_pos] = False
            self._live = live
        return self._live

    def _positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.snapshot.positions(ids)

    def _live_positions(self, ids: np.ndarray) -> np.ndarray:
        pos, ok = self._positions(ids)
        if ok.all():
            live = self.live_mask[pos] if self._dead_pos.size else ok
        else:
            live = ok
        if not np.all(live):
            bad = np.asarray(ids)[~np.asarray(live, bool)]
            raise UnknownKeyError(f"{bad.size} id(s) not in {self.path} (deleted or never "
                                  f"committed), first: {int(bad[0])}")
        return pos

    # -- size and ids -------------------------------------------------------------------
    @property
    def n_rows_committed(self) -> int:
        """Rows in the snapshot, tombstoned ones included (what an index must cover)."""
        return len(self._row_ids)

    def __len__(self) -> int:
        self._check_tombstones()
        return len(self._row_ids) - len(self._dead_pos)

    def all_ids(self) -> np.ndarray:
        """(n,) int64: live ids in increasing order."""
        self._check_tombstones()
        return self._row_ids if not self._dead_pos.size else self._row_ids[self.live_mask]

    def ids(self, keys: Keys) -> np.ndarray:
        """(n,) int64 ids of ``keys`` (a list, numpy or Arrow string array); an unknown or
        deleted key raises UnknownKeyError."""
        ids = self.find_ids(keys)
        if not ids.size or ids.min() >= 0:
            return ids
        missing = pick_keys(keys if not isinstance(keys, str) else [keys], np.flatnonzero(ids < 0))
        found = self.cat.read(lambda t: self.cat.lookup_ids(t, missing))
        unknown = [k for k, i in zip(missing, found) if i is None]
        if unknown:
            raise UnknownKeyError(f"{len(unknown)} key(s) not in {self.path}, first: {unknown[0]!r}")
        raise UnknownKeyError(f"key {missing[0]!r} was committed after this store was opened; call refresh()")

    def find_ids(self, keys: Keys) -> np.ndarray:
        """(n,) int64 ids of ``keys`` live in this snapshot; -1 where a key is unknown,
        deleted or committed after the snapshot. Vectorised for many keys (see SCAN_RATIO)."""
        self._check_tombstones()
        n = 1 if isinstance(keys, str) else len(keys)
        if n >= SCAN_MIN and n * SCAN_RATIO >= self.n_rows_committed:
            pos = self.snapshot.find(keys, self.live_mask if self._dead_pos.size else None)
            out = np.where(pos >= 0, self._row_ids[np.maximum(pos, 0)], -1)
            miss = np.flatnonzero(pos < 0)
            if miss.size:  # repeated keys, or keys of rows outside the snapshot
                out[miss] = self._find_in_catalog(pick_keys(keys, miss))
            return out
        return self._find_in_catalog(key_list(keys))

    def _find_in_catalog(self, keys: list[str]) -> np.ndarray:
        found = self.cat.read(lambda t: self.cat.lookup_ids(t, keys))
        ids = np.array([-1 if i is None else i for i in found], dtype=np.int64)
        pos, ok = self._positions(ids)
        ok &= ids >= 0
        if self._dead_pos.size and ok.any():
            ok[ok] = self.live_mask[pos[ok]]
        return np.where(ok, ids, -1)

    def keys(self) -> list[str]:
        """Live tile keys in id order (a list: :meth:`keys_array` is the same without one
        Python object per key)."""
        return list(self.keys_array().to_pylist())

    def keys_array(self) -> pa.ChunkedArray:
        """Live tile keys in id order as an Arrow string array: zero-copy over the mapped
        shards' key column (filtered, a copy, when rows are tombstoned)."""
        col = self.snapshot.key_column()
        return col if not self._dead_pos.size else col.filter(pa.array(self.live_mask))

    def keys_of(self, ids: np.ndarray) -> list[str]:
        return list(self.metadata(ids, ("key",))["key"])

    # -- embeddings -----------------------------------------------------------------------
    def gather(self, ids: np.ndarray, prefetch: bool | None = None) -> np.ndarray:
        """(len(ids), dim) in the store dtype, in the order given. Rows that are not in the
        page cache are first requested from disk all at once (``prefetch=None``: when a
        sample of them is not cached; True: always; False: never, each is read when touched)."""
        return self.embeddings.take(self._live_positions(ids), prefetch=prefetch)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        return self.gather(self.ids(keys))

    def scan(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids (b,) int64, emb (b, dim)) over live rows in id order; blocks are
        zero-copy views unless a tombstone falls inside them."""
        live = self.live_mask if self._dead_pos.size else None
        for s, block in self.embeddings.batches(batch_size):   # past RAM/4 it releases behind
            ids = self._row_ids[s:s + len(block)]
            if live is not None:
                m = live[s:s + len(block)]
                if not m.all():
                    ids, block = ids[m], block[m]
                    if not len(ids):
                        continue
            yield ids, block

    def to_numpy(self, dtype: Any = None) -> np.ndarray:
        """Load every live row: (n, dim). Only when asked: this reads the whole matrix."""
        out = np.empty((len(self), self.dim), self.dtype if dtype is None else dtype)
        at = 0
        for _, block in self.scan():           # each block copied in and dropped: one matrix held
            out[at:at + len(block)] = block
            at += len(block)
        return out

    # -- metadata -----------------------------------------------------------------------
    def metadata(self, ids: np.ndarray,
                 columns: Sequence[str] = ("key", "slide", "x", "y", "label")) -> dict[str, np.ndarray]:
        """Columns for ``ids`` (in the order given): strings as object arrays (None = null),
        integers with -1 for null, mpp as float with NaN."""
        pos = self._live_positions(ids)
        return self._columns_at(pos, columns)

    def metadata_arrow(self, ids: np.ndarray, columns: Sequence[str] = ("key", "slide", "x", "y")
                       ) -> dict[str, pa.Array]:
        """:meth:`metadata` as Arrow arrays with their nulls, made without a Python object per
        row: what a writer of Arrow files (``predict``) wants for millions of rows."""
        return self.snapshot.arrow_columns_at(self._live_positions(ids), columns)

    def _columns_at(self, pos: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        return self.snapshot.columns_at(pos, columns)

    # -- slides ---------------------------------------------------------------------------
    def _slide_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """Slide -> id ranges, read once per snapshot (a MIL epoch calls slide() per slide)."""
        if self._ranges is None:
            self._ranges = self._read_slide_ranges()
        return self._ranges

    def _read_slide_ranges(self) -> dict[str, list[tuple[int, int]]]:
        def read(t: Any) -> dict[str, list[tuple[int, int]]]:
            out: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for k, v in t.cursor(db=self.cat.db["slides"]):
                k = bytes(k)
                name, first = k[:-9].decode(), from_u64(k[-8:])
                out[name].append((first, from_u64(v)))
            return out
        return self.cat.read(read)

    def slides(self) -> list[str]:
        """Names of slides with at least one live tile in this snapshot."""
        out = []
        for name, ranges in self._slide_ranges().items():
            ids = np.concatenate([np.arange(a, a + c) for a, c in ranges])
            pos, ok = self._positions(ids)
            if ok.any() and self.live_mask[pos[ok]].any():
                out.append(name)
        return sorted(out)

    def _slide_positions(self, name: str) -> list[np.ndarray]:
        """Positions of the live tiles of slide ``name``, one array per id range, none empty."""
        ranges = self._slide_ranges().get(name)
        if not ranges:
            raise UnknownKeyError(f"slide {name!r} not in {self.path}")
        poss = []
        for first, count in sorted(ranges):
            pos, ok = self._positions(np.arange(first, first + count, dtype=np.int64))
            pos = pos[ok]
            pos = pos[self.live_mask[pos]]
            if pos.size:
                poss.append(pos)
        if not poss:
            raise UnknownKeyError(f"slide {name!r} has no live tiles in {self.path}")
        return poss

    def slide_ids(self, name: str) -> np.ndarray:
        """(n,) int64 ids of the live tiles of slide ``name``, in id order: from the catalog's
        slide ranges alone (no row, key or coordinate is read)."""
        return self._row_ids[np.concatenate(self._slide_positions(name))]

    def slide(self, name: str) -> Bag:
        """All live tiles of slide ``name``: embeddings, level-0 coordinates, keys, ids."""
        poss = self._slide_positions(name)
        embs = []
        for pos in poss:
            contiguous = pos[-1] - pos[0] == pos.size - 1
            embs.append(self.embeddings[int(pos[0]):int(pos[-1]) + 1] if contiguous else self.embeddings.take(pos))
        pos = np.concatenate(poss)
        meta = self._columns_at(pos, ("key", "x", "y"))
        emb = embs[0] if len(embs) == 1 else np.concatenate(embs)
        return Bag(name, self._row_ids[pos], list(meta["key"]),
                   np.stack([meta["x"], meta["y"]], axis=1).astype(np.int64), emb)

    # -- views ----------------------------------------------------------------------------
    def views(self) -> StoredViews:
        """The augmented views of live tiles (empty when the store has none)."""
        snap = self.snapshot
        rows = np.arange(len(snap.views), dtype=np.int64)
        ids, num = snap.view_ids, snap.view_num
        if self._dead_pos.size and len(ids):
            pos, ok = self._positions(ids)
            keep = ok & self.live_mask[pos]
            rows, ids, num = rows[keep], ids[keep], num[keep]
        return StoredViews(ids, num, snap.views, rows)

    # -- labels -----------------------------------------------------------------------
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.cat.json_map("tasks")

    def labels(self, keys: Sequence[str], task: str | None = None) -> np.ndarray:
        """Labels of ``keys`` as an object array (None where unlabelled). ``task=None`` reads
        the label recorded at extraction (class folder, CSV column)."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        if task is None:
            return self.metadata(self.ids(keys), ("label",))["label"]
        self._require_task(task)

        cache = JsonCache()

        def read(t: Any) -> list[Any]:
            db = self.cat.db["labels"]
            out = []
            for k in keys:
                v = t.get(label_key(task, k), db=db)
                out.append(None if v is None else cache[bytes(v)][0])
            return out
        return np.array(self.cat.read(read), dtype=object)

    def labels_by_id(self, ids: np.ndarray, task: str | None = None) -> np.ndarray:
        return self.labels(self.keys_of(ids), task)

    def _require_task(self, task: str) -> None:
        tasks = self.tasks()
        if task not in tasks:
            close = difflib.get_close_matches(task, list(tasks), n=3)
            raise UnknownKeyError(f"task {task!r} not in {self.path}; tasks: {sorted(tasks) or 'none'}"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""))

    def task_table(self, task: str | None) -> dict[str, Any]:
        """Every live labelled tile of a task: keys, ids, label, split, group (object arrays;
        split/group None when the task has no such column). ``task=None``: labels recorded at
        extraction."""
        if task is None:
            ids = self.all_ids()
            meta = self.metadata(ids, ("key", "label"))
            m = np.array([x is not None for x in meta["label"]], bool)
            return {"keys": list(meta["key"][m]), "ids": ids[m], "label": meta["label"][m],
                    "split": None, "group": None}
        self._require_task(task)
        prefix, cache = task.encode() + b"\x00", JsonCache()
        rows = self.cat.read(lambda t: [(k[len(prefix):], cache[v]) for k, v in self.cat.items(t, "labels", prefix)])
        keys = pa.array([k for k, _ in rows], pa.binary()).cast(pa.string())
        ids = self.find_ids(keys)
        sel = np.flatnonzero(ids >= 0)
        sel = sel[np.argsort(ids[sel], kind="stable")]
        vals = [rows[j][1] for j in sel.tolist()]
        info = self.tasks()[task]
        col = lambda i: np.array([v[i] for v in vals], dtype=object)  # noqa: E731
        return {"keys": keys.take(pa.array(sel, pa.int64())).to_pylist(), "ids": ids[sel], "label": col(0),
                "split": col(1) if info.get("has_split") else None,
                "group": col(2) if info.get("has_group") else None}

    # -- bookkeeping --------------------------------------------------------------------
    def units_done(self) -> set[str]:
        return self.cat.key_set("units")

    def units(self) -> dict[str, dict[str, Any]]:
        """Finished work units and what was recorded with each (shard, time, slide identity)."""
        return self.cat.json_map("units")

    def errors(self) -> dict[str, dict[str, Any]]:
        return self.cat.json_map("errors")

    def fingerprint(self) -> dict[str, Any]:
        """What defines the embedding space (backbone spec, weights, transform, dim)."""
        return self.meta.space()

    def shard_files(self) -> list[Path]:
        return [self.lay.shard(n) for n in self.snapshot.mapped]

    def info(self) -> dict[str, Any]:
        size = sum(f.stat().st_size for f in self.shard_files() if f.exists())
        bb = self.meta.backbone or {}
        return {
            "path": str(self.path), "rows": len(self), "rows_committed": self.n_rows_committed,
            "deleted": int(len(self._dead_pos)), "dim": self.dim, "dtype": self.meta.dtype,
            "backbone": bb.get("name") or bb.get("model_id") or "unknown",
            "weights_sha256": self.meta.weights_sha256,
            "tile": self.meta.tile, "views": self.snapshot.view_rows, "view_recipe": self.meta.views,
            "shards": sum(1 for p in self.snapshot.mapped if not is_view(p)),
            "view_shards": sum(1 for p in self.snapshot.mapped if is_view(p)),
            "bytes": size, "units_done": self.cat.count("units"), "slides": len(self._slide_ranges()),
            "tasks": {k: v.get("n", 0) for k, v in self.tasks().items()},
            "errors": self.cat.count("errors"),
        }

    def writer(self, **kw: Any) -> StoreWriter:
        from .writer import StoreWriter
        return StoreWriter(self.path, **kw)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, rows={len(self)}, dim={self.dim}, dtype={self.meta.dtype})"


if TYPE_CHECKING:  # mypy checks here that the real store is a StoreLike
    _store_is_storelike: StoreLike = Store(".")
