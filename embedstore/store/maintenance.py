"""Deleting tiles (tombstones) and compacting shards without them.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import StoreLockedError, UnknownKeyError
from . import _atomic
from .catalog import _j, open_catalog, u64
from .layout import Layout, shard_name
from .reader import Store
from .schema import base_schema, view_schema

__all__ = ["delete", "compact"]


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
    cat.write(txn)
    return int(ids_arr.size)


def compact(store_path: Path | str) -> dict[str, Any]:
    """Rewrite shards without tombstoned rows. Returns counts of what was rewritten."""
    lay = Layout(Path(store_path))
    lockf = open(lay.lockfile, "a+")
    try:
        try:
            fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"{store_path} is being written by another process; "
                                   "compact when no extraction or writer is running") from None
        return _compact(lay)
    finally:
        fcntl.flock(lockf, fcntl.LOCK_UN)
        lockf.close()


def _compact(lay: Layout) -> dict[str, Any]:
    store = Store(lay.root)
    cat = store.cat
    dead_pos = store._dead_pos
    if not dead_pos.size:
        return {"rewritten": 0, "removed_rows": 0}
    token = "c" + secrets.token_hex(5)
    cat.write(lambda t: cat.put_json(t, "writers", token, _atomic.process_identity()))
    live = store.live_mask
    base_recs = cat.read(cat.shards_in_order)
    views_of = {}
    for name, rec in cat.read(lambda t: [(bytes(k).decode(), bytes(v)) for k, v in t.cursor(db=cat.db["shards"])]):
        import json
        r = json.loads(rec)
        if r.get("kind") == "view" and r.get("base"):
            views_of[r["base"]] = (name, r)
    replaced: list[tuple[str, str, dict[str, Any], tuple[str, dict[str, Any]] | None]] = []
    removed_ids: list[int] = []
    seq = 0
    for name, rec in base_recs:
        start = store._shard_start[name]
        sh = store._mapped[name]
        m = live[start:start + sh.rows]
        if m.all():
            continue
        ids = store._row_ids[start:start + sh.rows]
        removed_ids.extend(ids[~m].tolist())
        table = pa.Table.from_batches(sh.batches).filter(pa.array(m))
        new_name = shard_name(token, seq)
        seq += 1
        cols = [table.column(c) for c in table.schema.names if c != "id"]
        schema = base_schema(store.dim, store.meta.dtype, with_id=True)
        out = pa.Table.from_arrays(cols + [pa.array(ids[m])], schema=schema)
        new_rec = _write_table(lay, new_name, out)
        new_rec.update(kind="base", first_id=int(ids[m][0]) if m.any() else rec["first_id"],
                       seq=rec["seq"], units=rec.get("units", []), writer=token, time=time.time(),
                       compacted_from=name)
        view = None
        if name in views_of:
            vname, vrec = views_of[name]
            vt = pa.Table.from_batches(store._mapped[vname].batches)
            vbase = vt.column("base_row").to_numpy().astype(np.int64)
            keep = m[vbase]
            vt = vt.filter(pa.array(keep))
            vids = ids[vbase[keep]]
            vschema = view_schema(store.dim, store.meta.dtype, with_id=True)
            vcols = [vt.column(c) for c in vt.schema.names if c != "id"]
            vout = pa.Table.from_arrays(vcols + [pa.array(vids)], schema=vschema)
            new_vname = new_name[:-len(".arrow")] + ".v.arrow"
            nv = _write_table(lay, new_vname, vout)
            nv.update(kind="view", base=new_name, time=time.time())
            view = (new_vname, nv)
        replaced.append((name, new_name, new_rec, view))
    _atomic.fsync_dir(lay.shards)

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
    cat.write(txn)
    for old, _, _, _ in replaced:
        lay.shard(old).unlink(missing_ok=True)
        if old in views_of:
            lay.shard(views_of[old][0]).unlink(missing_ok=True)
    return {"rewritten": len(replaced), "removed_rows": len(removed_ids)}


def _write_table(lay: Layout, name: str, table: pa.Table) -> dict[str, Any]:
    sink = _atomic.HashingFile(lay.partial(name))
    with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), table.schema) as w:
        w.write_table(table, max_chunksize=65536)
    sink.fsync_close()
    os.replace(lay.partial(name), lay.shard(name))
    return {"rows": table.num_rows, "sha256": sink.sha.hexdigest(), "size": sink.size}
