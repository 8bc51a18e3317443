"""Appending tiles to a store: the commit protocol.

Rows arrive grouped in *units* (a slide, a chunk of files). A unit's rows are buffered until the
unit ends, then written to the open shard file under ``tmp/`` (a unit too large for memory
spills into it early). When the open file holds only finished units and is big enough, it is
sealed: fsync, rename into ``shards/``, then **one** LMDB transaction assigns its ids,
registers it, and marks its units done. A crash at any point leaves a committed shard or
nothing visible; the next writer to open the store removes the dead writer's leftovers.

Ids are only known at commit, so view shards written beside a base shard refer to their tiles
by ``base_row`` (the row in that base shard) and by key.
"""
from __future__ import annotations

import fcntl
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DimensionMismatchError, StoreExistsError, StoreNotFoundError
from ._background import Background
from ._openshard import OpenShard, Sealed, drop_units, views_table
from ._pending import BlockPool, Pending, check_rows, screen_keys, take_rows
from ._process import crash_point, process_identity
from ._shardfile import write_shard
from . import schema
from .atomic import fsync_dir
from .catalog import Catalog, open_catalog
from .claims import claim_unit, release_claims
from .commit import (UnitsTaken, apply_commit, apply_staged, register_file_writer, stage_commit,
                     unregister_file_writer)
from .creation import clean_leftovers, create_store
from .layout import Layout, shard_name
from .meta import StoreMeta, check_compatible, read_store_meta
from .snapshot import check_meta_against_shards

__all__ = ["StoreWriter", "create_store", "clean_leftovers"]


class StoreWriter(Background):
    """Append tiles to a store (creating it with ``meta`` if missing). A context manager.

    Several processes may write one store at once, each with its own writer (and shards).
    ``add`` is cheap for the caller; shard writing, hashing, fsync and the catalog commit run
    in a background thread. An error there is re-raised at the next call, naming the file.
    """

    def __init__(self, path: Path | str, meta: StoreMeta | None = None, *,
                 rows_per_shard: int = 65536, spill_rows: int = 65536, batch_rows: int = 16384,
                 on_duplicate: str = "error", background: bool = True,
                 commit_every_s: float = 30.0, staged: bool = False) -> None:
        self.lay = Layout(Path(path))
        if not self.lay.meta.exists():
            if meta is None:
                raise StoreNotFoundError(f"{path} holds no store and no metadata was given to create one")
            try:
                create_store(self.lay.root, meta)
            except StoreExistsError:
                if not self.lay.meta.exists():
                    raise
        self.meta = read_store_meta(self.lay.root)   # a store without its catalog is damaged, not new
        if meta is not None:
            check_compatible(self.meta, meta, self.lay.root)
        if on_duplicate not in ("error", "skip"):
            raise ConfigError(f"on_duplicate must be 'error' or 'skip', got {on_duplicate!r}")
        self.on_duplicate = on_duplicate
        self.dim, self.dtype = self.meta.dim, np.dtype(self.meta.dtype)
        self.rows_per_shard, self.spill_rows, self.batch_rows = rows_per_shard, spill_rows, batch_rows
        self.commit_every_s = commit_every_s  # bounds what a crash can lose
        self.lay.make_dirs()
        self._lockf = open(self.lay.lockfile, "a+")
        fcntl.flock(self._lockf, fcntl.LOCK_SH)      # compaction takes it exclusively
        self.token = secrets.token_hex(6)
        ident = process_identity()
        # staged: this process may not write the catalog (another node owns it); its commits
        # are staged as files and applied by the committing process (see store/commit.py)
        self.staged = staged
        self.cat: Catalog | None  # None when staged
        if staged:
            self.cat = None
            register_file_writer(self.lay, self.token, ident)
        else:
            try:
                self.cat = open_catalog(self.lay.root)
                check_meta_against_shards(self.lay, self.cat, self.meta)
            except BaseException:
                fcntl.flock(self._lockf, fcntl.LOCK_UN)
                self._lockf.close()
                raise
            self.cat.write(lambda t: self._catalog.put_json(t, "writers", self.token, ident))
            apply_staged(self.lay, self.cat)
            clean_leftovers(self.lay, self.cat)
        self._seq = 0
        self._pending: dict[str | None, Pending] = {}
        self._pending_keys: set[str] = set()
        # add() screens keys against _pending_keys while the background thread commits shards and
        # takes their keys out of it: a commit between add()'s length checks made a spurious
        # DuplicateKeyError. The lock makes each screen and each removal whole.
        self._keys_lock = threading.Lock()
        self._blocks = BlockPool()              # embedding memory reused unit after unit
        self._spilled: set[str] = set()         # units with rows in the open file, not ended
        self._file: OpenShard | None = None
        self._exc: BaseException | None = None
        self.rows_committed = 0                 # rows really committed (duplicates and lost units not)
        self.committed: dict[str, int] = {}     # unit -> rows this writer really committed for it
        self.discarded: dict[str, int] = {}     # unit -> rows dropped: another writer finished it first
        self._claims: set[str] = set()
        self.stats = {"write_s": 0.0, "commit_s": 0.0, "shards": 0}
        self._q: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._q = queue.Queue(maxsize=4)
            self._thread = threading.Thread(target=self._run, name="embedstore-writer", daemon=True)
            self._thread.start()
        self._closed = False

    # -- public -----------------------------------------------------------------------
    def units_done(self) -> set[str]:
        if self.staged:
            return set()
        return self._catalog.key_set("units")

    def claim(self, unit: str) -> bool:
        """Claim ``unit`` for this writer before working on it (one catalog transaction): False
        when it is done, or claimed by another writer that is alive (or on another host); a dead
        writer's claim is taken over. Claims go when the writer closes. A staged writer cannot
        see the catalog: it always gets True (its node's work is planned by the run)."""
        if self.staged:
            return True
        ok = claim_unit(self._catalog, self.token, unit)
        if ok:
            self._claims.add(unit)
        return ok

    def add(self, emb: np.ndarray, keys: Sequence[str], *, unit: str | None = None,
            views: np.ndarray | None = None, **meta: Any) -> None:
        """Buffer rows. ``emb``: (n, dim); ``views``: (n, K, dim) augmented views or None;
        ``meta``: columns of META_COLUMNS (slide, source, x, y, level, tile_size, mpp, label),
        each a scalar for all rows or a sequence of n."""
        self._raise_pending()
        n = len(keys)
        emb, views = check_rows(emb, n, views, meta, self.dim, self.lay.root)
        keys = list(map(str, keys))
        kb = Catalog.encode_keys(keys)   # a key too long for the catalog is refused here
        with self._keys_lock:
            done, keep = screen_keys(self.cat, keys, kb, unit, self._pending_keys, self.on_duplicate,
                                     self.lay.root)
        if done:   # committed meanwhile by another writer: kept once, theirs
            self._discard_unit(unit, n)
            return
        if keep is not None:
            if not keep.any():
                return
            emb = emb[keep]
            views = views[keep] if views is not None else None
            meta = {c: take_rows(v, keep) for c, v in meta.items()}
            keys, kb = [k for k, m in zip(keys, keep) if m], [b for b, m in zip(kb, keep) if m]
        p = self._pending.get(unit)
        if p is None:
            p = self._pending[unit] = Pending(self.dim, self.meta.dtype, self.batch_rows, self._blocks)
        try:
            p.extend(keys, kb, emb, views, meta, unit)   # copies emb and views
        except BaseException:
            with self._keys_lock:
                self._pending_keys.difference_update(keys)   # a rejected add leaves nothing behind
            raise
        if unit is None:
            self.end_unit(None)
        elif p.rows >= self.spill_rows:
            self._submit(("spill", unit, self._pending.pop(unit)))
            self._spilled.add(unit)

    def end_unit(self, unit: str | None, *, done: bool = True,
                 info: dict[str, Any] | None = None) -> None:
        """Declare ``unit`` complete: its rows may now be committed. ``done=False`` commits the
        rows without marking the unit finished (some of its inputs failed: a re-run retries it);
        ``info`` is kept with the unit's record (e.g. a slide's size and content hash)."""
        self._raise_pending()
        p = self._pending.pop(unit, None)
        self._submit(("end", unit, (p, done, info)))

    def add_views(self, ids: np.ndarray, keys: Sequence[str], views: np.ndarray, *,
                  unit: str | None = None) -> None:
        """Add augmented views to tiles already committed: ``ids`` (n,) int64 with their ``keys``,
        ``views`` (n, K, dim). Written as one view shard, committed with ``unit`` marked done."""
        self._raise_pending()
        views = np.asarray(views)
        ids = np.asarray(ids, dtype=np.int64)
        if views.ndim != 3 or views.shape[0] != len(ids) or views.shape[2] != self.dim or len(keys) != len(ids):
            raise DimensionMismatchError(f"views must be (n={len(ids)}, K, {self.dim}) for n ids and keys, "
                                         f"got {views.shape}")
        self._submit(("views", unit, (ids, [str(k) for k in keys], views.astype(self.dtype, copy=True))))

    def add_error(self, unit: str, reason: str, **info: Any) -> None:
        """Record that ``unit`` failed (committed with the next shard, or at close)."""
        self._submit(("error", unit, {"reason": reason, **info}))

    def flush(self) -> None:
        """Commit every finished unit now and wait for it."""
        self._submit(("flush", None, None))
        self._wait()

    def close(self, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not abort and self._exc is None:
                if None in self._pending:
                    self._submit(("end", None, (self._pending.pop(None), True, None)))
                self._submit(("flush", None, None))
        finally:
            if self._q is not None:
                self._q.put(("stop", None, None))
            if self._thread is not None:
                self._thread.join()
            self._discard_open_file()
            self._release()
        self._raise_pending()

    def _release(self) -> None:
        try:
            if self.staged:
                unregister_file_writer(self.lay, self.token)
            else:
                release_claims(self._catalog, self.token, self._claims)
        finally:
            fcntl.flock(self._lockf, fcntl.LOCK_UN)
            self._lockf.close()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        # On an error or Ctrl-C: units already ended are still committed; partial ones are not.
        if et is not None and self._exc is None:
            self._pending.clear()
        self.close(abort=False)

    # -- internals --------------------------------------------------------------------
    @property
    def _catalog(self) -> Catalog:
        """The catalog: only a writer that is not staged has one, and only it asks."""
        assert self.cat is not None, "a staged writer has no catalog"
        return self.cat

    def _done_elsewhere(self, unit: str | None) -> bool:
        """Whether ``unit`` is marked done in the catalog although this writer has not ended it."""
        if self.staged or unit is None:
            return False
        cat = self._catalog
        return cat.read(lambda t: t.get(unit.encode(), db=cat.db["units"])) is not None

    def _discard_unit(self, unit: str | None, rows: int) -> None:
        """Drop what is buffered of ``unit`` (another writer committed it); rows it spilled into
        the open file are dropped when that file is committed."""
        p = self._pending.pop(unit, None)
        if p is not None:
            with self._keys_lock:
                self._pending_keys.difference_update(p.keys)
            rows += p.rows
        if unit is not None:
            self.discarded[unit] = self.discarded.get(unit, 0) + rows

    def _do(self, op: tuple[str, Any, Any]) -> None:
        kind, unit, arg = op
        if kind == "spill":
            self._write_rows(arg, unit)
        elif kind == "end":
            p, done, info = arg
            if self._done_elsewhere(unit):   # finished by another writer meanwhile: theirs stands
                self._spilled.discard(unit)
                self.discarded[unit] = self.discarded.get(unit, 0) + (p.rows if p is not None else 0)
                return
            if p is not None and p.rows:
                self._write_rows(p, unit)
            self._spilled.discard(unit)
            if unit is not None and done:
                if self._file is not None:
                    self._file.units.append((unit, info or {}))
                else:
                    self._commit([(unit, info or {})])   # a unit without rows (no tissue)
            f = self._file
            if f is not None and not self._spilled and (
                    f.rows >= self.rows_per_shard or time.monotonic() - f.opened > self.commit_every_s):
                self._seal_and_commit()
        elif kind == "views":
            self._commit_views(unit, *arg)
        elif kind == "error":
            self._record_error(unit, arg)
        elif kind == "flush":
            if self._file is not None and not self._spilled:
                self._seal_and_commit()
        elif kind == "sync":
            arg.set()
        elif kind == "stop":
            pass

    def _write_rows(self, p: Pending, unit: str | None) -> None:
        t0 = time.perf_counter()
        if self._file is None:
            self._file = OpenShard(self.lay, self.token, self._seq, self.dim, self.meta.dtype,
                                   schema.shard_metadata(self.meta))
        self._file.append(p, unit)
        self.stats["write_s"] += time.perf_counter() - t0

    def _seal_and_commit(self) -> None:
        f = self._file
        assert f is not None
        t0 = time.perf_counter()
        crash_point("after_write")
        recs = {g.name: g.seal() for g in f.files()}
        for d in self.lay.homes():
            fsync_dir(d)
        crash_point("after_rename")
        self._file = None
        self._seq += 1
        self._commit_rows(f.sealed(recs))
        self.stats["commit_s"] += time.perf_counter() - t0
        self.stats["shards"] += 1

    def _commit_rows(self, s: Sealed) -> None:
        """Register sealed shard ``s``. Units with rows in it that another writer finished
        meanwhile lose their rows first (the shard is rewritten without them), so nothing is
        stored twice; ``committed`` counts what really went in, per unit. Its keys stay pending
        until the catalog holds them, so add() always sees a key in one of the two."""
        try:
            self._commit_sealed(s)
        finally:
            with self._keys_lock:
                self._pending_keys.difference_update(s.keys)

    def _commit_sealed(self, s: Sealed) -> None:
        while True:
            guard = {u for u, _, _ in s.row_units if u is not None} if not self.staged else set()
            p: dict[str, Any] = {
                "kind": "rows", "base": s.name, "base_rec": s.recs[s.name], "rows": s.rows, "view": s.view,
                "view_rec": s.recs.get(s.view) if s.view else None, "keys": s.keys,
                **({} if self.staged else {"key_bytes": s.kbytes}),   # staged payloads are JSON
                "slide_runs": s.slide_runs, "units": s.units, "writer": self.token, "time": time.time()}
            try:
                res = self._apply(p, s.name, guard)
                break
            except UnitsTaken as e:
                for u, _, c in s.row_units:
                    if u in e.units:
                        self.discarded[u] = self.discarded.get(u, 0) + c
                left = drop_units(self.lay, s, set(e.units), shard_name(self.token, self._seq),
                                  schema.shard_metadata(self.meta))
                self._seq += 1
                if left is None:   # nothing of the shard is left; its other units had no rows
                    units = [(u, i) for u, i in s.units if u not in e.units]
                    if units:
                        self._commit(units)
                    return
                s = left
        dups = np.zeros(s.rows, bool)
        dups[res["dups"]] = True
        for u, a, c in s.row_units:
            if u is not None:
                self.committed[u] = self.committed.get(u, 0) + int(c - dups[a:a + c].sum())
        self.rows_committed += int(s.rows - dups.sum())
        for u, _ in s.units:
            self.committed.setdefault(u, 0)

    def _commit(self, units: list[tuple[str, dict[str, Any]]]) -> None:
        """Mark ``units`` (without rows) done."""
        self._apply({"kind": "units", "units": units, "time": time.time()}, f"units-{self.token}-{self._seq}")
        for u, _ in units:
            self.committed.setdefault(u, 0)

    def _apply(self, p: dict[str, Any], name: str, guard: set[str] | None = None) -> dict[str, Any]:
        if self.staged:
            stage_commit(self.lay, p, name)
            return {"dups": []}
        return apply_commit(self._catalog, p, guard or ())

    def _commit_views(self, unit: str | None, ids: np.ndarray, keys: list[str], views: np.ndarray) -> None:
        name = shard_name(self.token, self._seq, view=True)
        self._seq += 1
        table = views_table(keys, views, self.dim, self.meta.dtype, ids=ids,
                            schema_meta=schema.shard_metadata(self.meta))
        rec = write_shard(self.lay, name, table)
        fsync_dir(self.lay.views)
        self._apply({"kind": "views", "name": name, "rec": rec, "writer": self.token, "time": time.time(),
                     "units": [(unit, {})] if unit is not None else []}, name)

    def _record_error(self, unit: str, info: dict[str, Any]) -> None:
        self._apply({"kind": "error", "unit": unit, "info": info, "time": time.time()},
                    f"error-{self.token}-{time.time_ns()}")

    def _discard_open_file(self) -> None:
        if self._file is not None:
            self._file.discard()
            self._file = None
            self._seq += 1
