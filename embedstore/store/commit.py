"""Catalog commits as data: a *payload* describes one commit (a sealed shard with its keys,
slides and units; views for committed tiles; units without rows; an error) and
:func:`apply_commit` turns it into one LMDB transaction.

Writers on the machine that owns the catalog apply their payloads directly. Writers elsewhere —
other nodes of a ``torchrun`` job, where the store sits on a shared filesystem and LMDB's locks
do not hold — *stage* them: the shard is renamed into ``shards/`` first, then the payload is
written atomically to ``staged/``. One process (rank 0, or the next writer to open the store)
applies staged payloads in order and removes them. Applying is idempotent, so a crash between
the transaction and the removal only repeats a no-op.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from . import journal
from ._process import crash_point
from .atomic import atomic_write_bytes
from .catalog import Catalog, slide_key, u64
from .layout import Layout

__all__ = ["apply_commit", "stage_commit", "apply_staged", "STAGED", "UnitsTaken"]

STAGED = "staged"


class UnitsTaken(Exception):
    """Internal signal (never leaves the writer): units with rows in a shard about to be
    registered were finished by another writer meanwhile; their rows must go first."""

    def __init__(self, units: list[str]) -> None:
        super().__init__(units)
        self.units = units


def apply_commit(cat: Catalog, p: dict[str, Any], guard: Collection[str] = ()) -> dict[str, Any]:
    """Apply one payload in one transaction (a no-op when it was applied before). ``guard``:
    units with rows in the shard; if another writer finished one of them, nothing is written
    and :class:`UnitsTaken` is raised. Returns ``{"dups": [row, ...]}``: rows of the shard
    tombstoned because their key was already present."""
    kind = p["kind"]
    out: dict[str, Any] = {"dups": []}
    keys: list[bytes] = []   # encoded outside the write lock (the writer hands them over encoded)
    if kind == "rows":
        keys = p["key_bytes"] if "key_bytes" in p else Catalog.encode_keys(p["keys"])

    def txn(t: Any) -> None:
        crash_point("in_txn")
        now = p.get("time", time.time())
        shard = None
        udb = cat.db["units"]
        taken = [u for u in guard if t.get(u.encode(), db=udb) is not None]
        if taken:
            raise UnitsTaken(taken)
        rec: dict[str, Any] = {"op": kind, "units": p.get("units", []), "time": now}
        if kind == "rows":
            if t.get(p["base"].encode(), db=cat.db["shards"]) is not None:
                return  # applied before
            first = cat.bump(t, "next_id", p["rows"])
            seq = cat.bump(t, "next_seq")
            dups = out["dups"] = cat.put_new_ids(t, keys, first)
            for i in dups:   # a key already present is kept once: this row is tombstoned
                t.put(u64(first + i), b'{"reason":"duplicate"}', db=cat.db["deleted"])
            if dups:
                cat.bump(t, "tomb_gen")
            rec.update(base=p["base"], view=p.get("view"), first_id=first, seq=seq, rows=p["rows"],
                       dups=[first + i for i in dups], writer=p["writer"])
            cat.put_json(t, "shards", p["base"], dict(p["base_rec"], kind="base", first_id=first, seq=seq,
                                                       units=[u for u, _ in p["units"]],
                                                       writer=p["writer"], time=now))
            t.put(u64(seq), p["base"].encode(), db=cat.db["order"])
            if p.get("view"):
                cat.put_json(t, "shards", p["view"], dict(p["view_rec"], kind="view", base=p["base"], time=now))
            for s, start, count in p["slide_runs"]:
                t.put(slide_key(s, first + start), u64(count), db=cat.db["slides"])
            shard = p["base"]
        elif kind == "views":
            if t.get(p["name"].encode(), db=cat.db["shards"]) is not None:
                return
            cat.put_json(t, "shards", p["name"], dict(p["rec"], kind="view", base=None,
                                                       writer=p["writer"], time=now))
            shard = p["name"]
            rec.update(name=shard)
        elif kind == "error":
            cat.put_json(t, "errors", p["unit"], dict(p["info"], time=now))
            return
        for u, info in p.get("units", []):
            if kind == "units" and t.get(u.encode(), db=udb) is not None:
                continue  # finished by another writer: its record stands
            cat.put_json(t, "units", u, dict(info, shard=shard, time=now))
            t.delete(u.encode(), db=cat.db["errors"])
            for ek, _ in list(cat.items(t, "errors", (u + "|").encode())):  # per-input errors
                t.delete(ek, db=cat.db["errors"])
        journal.append(cat.store_dir, rec)   # last: what a rebuild of the catalog replays
    cat.write(txn)
    return out


def stage_commit(lay: Layout, p: dict[str, Any], name: str) -> None:
    """Write a payload for the committing process (after its shard files are in place)."""
    d = lay.root / STAGED
    d.mkdir(exist_ok=True)
    atomic_write_bytes(d / f"{time.time_ns():020d}-{name}.json",
                       json.dumps(p, separators=(",", ":")).encode())


def apply_staged(lay: Layout, cat: Catalog) -> int:
    """Apply every staged payload in the order written; returns how many."""
    d = lay.root / STAGED
    if not d.is_dir():
        return 0
    n = 0
    for f in sorted(d.glob("*.json")):
        try:
            p = json.loads(f.read_bytes())
        except (OSError, json.JSONDecodeError):
            continue  # not complete yet (atomic writes make this rare) — next time
        apply_commit(cat, p)
        f.unlink(missing_ok=True)
        n += 1
    return n


def writers_dir(lay: Layout) -> Path:
    return lay.root / "writers"


def register_file_writer(lay: Layout, token: str, ident: dict[str, Any]) -> None:
    """Staging writers record their owner in a file (they cannot write the catalog)."""
    d = writers_dir(lay)
    d.mkdir(exist_ok=True)
    atomic_write_bytes(d / f"{token}.json", json.dumps(ident).encode())


def file_writers(lay: Layout) -> dict[str, dict[str, Any]]:
    d = writers_dir(lay)
    out = {}
    if d.is_dir():
        for f in d.glob("*.json"):
            try:
                out[f.stem] = json.loads(f.read_bytes())
            except (OSError, json.JSONDecodeError):
                out[f.stem] = {"host": "?", "pid": -1}
    return out


def unregister_file_writer(lay: Layout, token: str) -> None:
    try:
        os.unlink(writers_dir(lay) / f"{token}.json")
    except FileNotFoundError:
        pass
