"""Deleting tiles (tombstones), compacting shards without them, and upgrading a store's layout.

A deletion is one catalog transaction: the ids go to ``deleted`` with a reason, their keys
leave the key map, and a counter tells every open reader to honour them at once. Compaction
rewrites the shards holding tombstoned rows (keeping every surviving id: rewritten shards carry
an ``id`` column), commits the swap in one transaction, then unlinks the old files. It needs
exclusive access: no writer may be open on the store.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import StoreLockedError, StoreNotFoundError, UnknownKeyError
from . import journal
from ._process import process_identity
from ._shardfile import write_shard
from .atomic import fsync_dir
from .catalog import _j, u64
from .layout import Layout, shard_name, view_name
from .reader import Store
from .schema import base_schema, shard_metadata, view_schema

__all__ = ["delete", "compact", "upgrade"]


def delete(store_path: Path | str, keys: Sequence[str] | None = None,
           slides: Sequence[str] | None = None, reason: str = "") -> int:
    """Tombstone tiles by key and/or whole slides. Returns the number of rows deleted."""
    store = Store(store_path)
    ids: list[int] = []
    if keys:
        ids.extend(store.ids(list(keys)).tolist())
    for s in slides or ():
        try:
            ids.extend(store.slide(s).ids.tolist())
        except UnknownKeyError:
            raise UnknownKeyError(f"slide {s!r} not in {store_path} (or already deleted)") from None
    if not ids:
        return 0
    ids_arr = np.unique(np.array(ids, dtype=np.int64))
    key_list = store.keys_of(ids_arr)
    cat = store.cat
    rec = _j({"reason": reason or "deleted", "time": time.time()})

    def txn(t: Any) -> None:
        for i, k in zip(ids_arr.tolist(), key_list):
            t.put(u64(i), rec, db=cat.db["deleted"])
            t.delete(k.encode(), db=cat.db["keys"])
        cat.bump(t, "tomb_gen")
        journal.append(lay_root, {"op": "delete", "ids": ids_arr.tolist(), "reason": reason or "deleted",
                                  "time": time.time()})
    lay_root = Path(store.path)
    cat.write(txn)
    return int(ids_arr.size)


@contextmanager
def _exclusive(lay: Layout, what: str) -> Iterator[None]:
    """Hold the writers' lock exclusively: no writer is open while the body runs."""
    if not lay.meta.is_file():
        raise StoreNotFoundError(f"{lay.root} is not a store (no STORE.json)")
    lockf = open(lay.lockfile, "a+")
    try:
        try:
            fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"{lay.root} is being written by another process; "
                                   f"{what} when no extraction or writer is running") from None
        yield
    finally:
        fcntl.flock(lockf, fcntl.LOCK_UN)
        lockf.close()


def compact(store_path: Path | str) -> dict[str, Any]:
    """Rewrite shards without tombstoned rows. Returns counts of what was rewritten."""
    lay = Layout(Path(store_path))
    with _exclusive(lay, "compact"):
        return _compact(lay)


def upgrade(store_path: Path | str) -> dict[str, Any]:
    """Bring a store to the current layout: view shards move from ``shards/`` to ``views/``.

    Each move is one rename, and readers look in both places, so an interrupted upgrade leaves
    a store that reads the same and finishes when run again. Returns what was moved."""
    lay = Layout(Path(store_path))
    with _exclusive(lay, "upgrade"):
        legacy = lay.legacy_views()
        if not lay.views.is_dir():
            lay.views.mkdir()
            fsync_dir(lay.root)
        size = 0
        for f in legacy:
            size += f.stat().st_size
            os.rename(f, lay.views / f.name)
        if legacy:
            fsync_dir(lay.views)
            fsync_dir(lay.shards)
        return {"store": str(lay.root), "moved": len(legacy), "bytes": size}


def _compact(lay: Layout) -> dict[str, Any]:
    store = Store(lay.root)
    cat = store.cat
    if not store._dead_pos.size:
        return {"rewritten": 0, "removed_rows": 0}
    token = "c" + secrets.token_hex(5)
    cat.write(lambda t: cat.put_json(t, "writers", token, process_identity()))
    views_of = {r["base"]: (name, r) for name, r in cat.read(cat.view_shards) if r.get("base")}
    replaced: list[tuple[str, str, dict[str, Any], tuple[str, dict[str, Any]] | None]] = []
    removed = 0
    for name, rec in cat.read(cat.shards_in_order):
        start = store.snapshot.shard_start[name]
        rows = store.snapshot.mapped[name].rows
        live = store.live_mask[start:start + rows]
        if live.all():
            continue
        removed += int((~live).sum())
        new_name = shard_name(token, len(replaced))
        new_rec = _rewrite_base(store, lay, name, rec, new_name, live, token)
        view = None
        if name in views_of:
            view = _rewrite_views(store, lay, views_of[name][0], name, new_name, live)
        replaced.append((name, new_name, new_rec, view))
    for d in lay.homes():
        fsync_dir(d)

    def txn(t: Any) -> None:
        for old, new, rec, view in replaced:
            t.delete(old.encode(), db=cat.db["shards"])
            if old in views_of:
                t.delete(views_of[old][0].encode(), db=cat.db["shards"])
            cat.put_json(t, "shards", new, rec)
            t.put(u64(rec["seq"]), new.encode(), db=cat.db["order"])
            if view is not None:
                cat.put_json(t, "shards", view[0], view[1])
        # tombstones stay: readers still holding the old snapshot must keep hiding those rows
        cat.bump(t, "tomb_gen")
        t.delete(token.encode(), db=cat.db["writers"])
        journal.append(lay.root, {"op": "compact", "time": time.time(), "replaced": [
            [old, new, rec["seq"], view[0] if view is not None else None] for old, new, rec, view in replaced]})
    cat.write(txn)
    for old, _, _, _ in replaced:
        lay.shard(old).unlink(missing_ok=True)
        if old in views_of:
            lay.shard(views_of[old][0]).unlink(missing_ok=True)
    return {"rewritten": len(replaced), "removed_rows": removed}


def _shard_ids(store: Store, name: str) -> np.ndarray:
    start = store.snapshot.shard_start[name]
    return store.snapshot.row_ids[start:start + store.snapshot.mapped[name].rows]


def _rewrite_base(store: Store, lay: Layout, name: str, rec: dict[str, Any], new_name: str,
                  live: np.ndarray, token: str) -> dict[str, Any]:
    """Write the live rows of base shard ``name`` as ``new_name``, with their ids explicit."""
    ids = _shard_ids(store, name)
    table = pa.Table.from_batches(store.snapshot.mapped[name].batches).filter(pa.array(live))
    cols = [table.column(c) for c in table.schema.names if c != "id"]
    out = pa.Table.from_arrays(cols + [pa.array(ids[live])],
                               schema=base_schema(store.dim, store.meta.dtype, with_id=True,
                                                  metadata=shard_metadata(store.meta)))
    new_rec = write_shard(lay, new_name, out)
    new_rec.update(kind="base", first_id=int(ids[live][0]) if live.any() else rec["first_id"],
                   seq=rec["seq"], units=rec.get("units", []), writer=token, time=time.time(),
                   compacted_from=name)
    return new_rec


def _rewrite_views(store: Store, lay: Layout, vname: str, base: str, new_base: str,
                   live: np.ndarray) -> tuple[str, dict[str, Any]]:
    """Write the views of the live rows of ``base`` (view shard ``vname``) beside ``new_base``."""
    ids = _shard_ids(store, base)
    vt = pa.Table.from_batches(store.snapshot.mapped[vname].batches)
    vbase = vt.column("base_row").to_numpy().astype(np.int64)
    keep = live[vbase]
    vt = vt.filter(pa.array(keep))
    vcols = [vt.column(c) for c in vt.schema.names if c != "id"]
    vout = pa.Table.from_arrays(vcols + [pa.array(ids[vbase[keep]])],
                                schema=view_schema(store.dim, store.meta.dtype, with_id=True,
                                                 metadata=shard_metadata(store.meta)))
    new_vname = view_name(new_base)
    rec = write_shard(lay, new_vname, vout)
    rec.update(kind="view", base=new_base, time=time.time())
    return new_vname, rec
