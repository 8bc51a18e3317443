"""``rebuild-catalog``: a new catalog from the shards, for a catalog that is damaged or gone.

The shards hold every row (key, slide, coordinates, embedding); the journal
(:mod:`embedstore.store.journal`) holds what only the catalog knew — each shard's ids and
commit order, the units it finished, deletions, compaction swaps. What neither holds (labels
imported from CSV, recorded errors) is taken from the old catalog when it can still be read,
in a child process (a damaged LMDB file can crash the process reading it), else reported lost.

The new catalog is built in a sibling directory and swapped in whole (``publish_dir``): the
old one is never touched before the new one is complete, and a rebuild killed at any moment
leaves the old catalog (or, killed between the swap's two renames, one that the next open
puts back) and gives the same result when run again.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreLockedError
from . import journal
from ._checksum import default_kind, digest_record, file_digest
from ._process import crash_point
from .atomic import publish_dir, recover_dir
from .catalog import Catalog, _j, _uj, from_u64, label_key, slide_key, u64
from .layout import Layout, base_of, is_view
from .matrix import MappedShard
from .meta import StoreMeta, read_meta
from .schema import check_shard_schema

__all__ = ["rebuild_catalog"]

STAGING = ".catalog.rebuild"


def rebuild_catalog(path: Path | str) -> dict[str, Any]:
    """Rebuild the catalog of the store at ``path`` from its shards (no writer may be open).
    Returns what was rebuilt and, under ``lost``, what could not be recovered."""
    lay = Layout(Path(path))
    meta = read_meta(lay.root)
    recover_dir(lay.catalog)
    lay.lockfile.touch(exist_ok=True)
    with open(lay.lockfile, "a+") as lockf:
        try:
            fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(f"{path} is being written by another process; rebuild its catalog "
                                   "when no extraction or writer is running") from None
        try:
            return _rebuild(lay, meta)
        finally:
            fcntl.flock(lockf, fcntl.LOCK_UN)


def _rebuild(lay: Layout, meta: StoreMeta) -> dict[str, Any]:
    old, why = _salvage(lay)
    plan = _Plan(lay, journal.read(lay.root), old)
    staged = lay.root / STAGING
    shutil.rmtree(staged, ignore_errors=True)
    cat = Catalog(lay.root, create=True, dirname=STAGING)
    try:
        report = plan.fill(cat, meta)
        plan.carry(cat, old)
        crash_point("rebuild_mid")
        cat.env.sync(True)
    finally:
        cat.env.close()
    (staged / "lock.mdb").unlink(missing_ok=True)
    publish_dir(staged, lay.catalog)
    report["lost"] = plan.lost(old, why)
    report["store"] = str(lay.root)
    return report


def _checksum(path: Path) -> dict[str, str]:
    """A shard's checksum record, recomputed from the file, of the kind new shards get."""
    kind = default_kind()
    return digest_record(kind, file_digest(path, kind))


def _salvage(lay: Layout) -> tuple[dict[str, Any] | None, str]:
    """What the old catalog still tells (read in a child process), or None and why not."""
    if not (lay.catalog / "data.mdb").exists():
        return None, "the old catalog is gone"
    code = "import sys; from embedstore.store.rebuild import _dump; _dump(sys.argv[1])"
    try:
        r = subprocess.run([sys.executable, "-c", code, str(lay.root)], capture_output=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"the old catalog could not be read ({e})"
    if r.returncode != 0:
        last = (r.stderr.decode(errors="replace").strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return None, f"the old catalog is unreadable ({last[:200]})"
    try:
        return json.loads(r.stdout), ""
    except ValueError:
        return None, "the old catalog is unreadable"


def _dump(store: str) -> None:
    """Child process of :func:`_salvage`: print the old catalog's readable parts as JSON."""
    cat = Catalog(Path(store), create=False, lock=False)

    def read(t: Any) -> dict[str, Any]:
        out: dict[str, Any] = {db: {k.decode(): _uj(v) for k, v in cat.items(t, db)}
                               for db in ("tasks", "errors", "units", "shards")}
        out["labels"] = [[k.decode(), _uj(v)] for k, v in cat.items(t, "labels")]
        out["deleted"] = {str(from_u64(k)): _uj(v) for k, v in cat.items(t, "deleted")}
        return out
    sys.stdout.write(json.dumps(cat.read(read)))


class _Plan:
    """Which shard files the new catalog registers, with which ids, order and units."""

    def __init__(self, lay: Layout, entries: list[dict[str, Any]], old: dict[str, Any] | None) -> None:  # one replay of the journal, kept whole
        self.lay = lay
        by_seq: dict[int, dict[str, Any]] = {}
        mentioned: set[str] = set()
        self.deleted: dict[int, str] = {}
        self.labels: dict[str, dict[str, Any]] = {}   # task -> its last journaled import
        self.next_id = 0
        for n, e in enumerate(entries):  # the last line of a seq is the commit that holds (journal.py)
            if e["op"] == "rows":
                by_seq[e["seq"]] = dict(e, line=n)
                self.next_id = max(self.next_id, e["first_id"] + e["rows"])
                mentioned.update(x for x in (e["base"], e.get("view")) if x)
            elif e["op"] == "compact":
                for old_name, new, seq, vnew in e["replaced"]:
                    mentioned.update(x for x in (old_name, new, vnew) if x)
                    if seq in by_seq and by_seq[seq]["base"] == old_name:
                        by_seq[seq].update(base=new, view=vnew)
            elif e["op"] == "views":
                mentioned.add(e["name"])
            elif e["op"] == "delete":
                self.deleted.update((int(i), e.get("reason", "deleted")) for i in e["ids"])
            elif e["op"] == "labels":   # an import replaces its task: the last record wins
                self.labels[e["task"]] = e
        on_disk = {f.name for f in lay.committed_files()}
        self.base = {s: e for s, e in sorted(by_seq.items()) if e["base"] in on_disk}
        self.missing = sorted(e["base"] for e in by_seq.values() if e["base"] not in on_disk)
        for e in self.base.values():
            self.deleted.update((int(i), "duplicate") for i in e.get("dups", []))
        self.units: dict[str, dict[str, Any]] = {}
        for n, e in enumerate(entries):
            rows_ok = e["op"] == "rows" and by_seq[e["seq"]]["line"] == n and by_seq[e["seq"]]["base"] in on_disk
            shard = (by_seq[e["seq"]]["base"] if rows_ok else e.get("name") if e["op"] == "views" else None)
            if e["op"] in ("units", "views") or rows_ok:
                for u, info in e.get("units", []):
                    if e["op"] == "units" and u in self.units:
                        continue
                    self.units[u] = dict(info, shard=shard, time=e.get("time"))
        self.views: dict[str, str | None] = {e["name"]: None for e in entries if e["op"] == "views" and e["name"] in on_disk}
        for e in self.base.values():
            if e.get("view") and e["view"] in on_disk:
                self.views[e["view"]] = e["base"]
        # shards the journal does not know (a store older than it): the old catalog's record, or new ids
        self.fresh: list[str] = []
        old_shards = (old or {}).get("shards", {})
        seqs = set(self.base)
        for name in sorted(on_disk - mentioned):
            if is_view(name):
                continue
            rec = old_shards.get(name)
            if rec and rec.get("kind") == "base" and rec["seq"] not in seqs:
                self.base[rec["seq"]] = {"base": name, "first_id": rec["first_id"], "seq": rec["seq"],
                                         "units": [[u, {}] for u in rec.get("units", [])]}
                self.next_id = max(self.next_id, rec["first_id"] + rec["rows"])
            else:
                self.fresh.append(name)
            seqs = set(self.base)
        for u, info in (old or {}).get("units", {}).items():
            self.units.setdefault(u, info)
        for i, rec in (old or {}).get("deleted", {}).items():
            self.deleted.setdefault(int(i), rec.get("reason", "deleted"))
        bases = {e["base"] for e in self.base.values()} | set(self.fresh)
        for name in sorted(on_disk - mentioned):
            if is_view(name):
                base = base_of(name)
                if base in bases:
                    self.views[name] = base
                elif "id" in MappedShard(lay.shard(name)).schema.names:
                    self.views[name] = None

    def fill(self, cat: Catalog, meta: StoreMeta) -> dict[str, Any]:  # one transaction per shard
        lay = self.lay
        next_seq = max(self.base, default=-1) + 1
        order = list(self.base.values())
        # shards without a record: compacted ones carry their ids (they go first, by id); the
        # others get new ids above every id in use, in the order they were written
        fresh = {name: MappedShard(lay.shard(name)) for name in self.fresh}
        with_ids = sorted((int(sh.row_ids(0)[0]) if sh.rows else 0, n) for n, sh in fresh.items()
                          if "id" in sh.schema.names)
        for n, sh in fresh.items():
            if "id" in sh.schema.names and sh.rows:
                self.next_id = max(self.next_id, int(sh.row_ids(0)[-1]) + 1)
        plain = sorted((lay.shard(n).stat().st_mtime, n) for n, sh in fresh.items() if "id" not in sh.schema.names)
        for _, name in with_ids + plain:
            first = 0 if "id" in fresh[name].schema.names else self.next_id
            order.append({"base": name, "first_id": first, "seq": next_seq, "units": []})
            if "id" not in fresh[name].schema.names:
                self.next_id += fresh[name].rows
            next_seq += 1
        rows = 0
        for e in order:
            name = e["base"]
            sh = MappedShard(lay.shard(name))
            check_shard_schema(meta, sh.schema, name, lay.meta)
            ids = sh.row_ids(e["first_id"])
            keys = [k for b in sh.batches for k in b.column("key").to_pylist()]
            slides = [s for b in sh.batches for s in b.column("slide").to_pylist()]
            rec = {"rows": sh.rows, **_checksum(lay.shard(name)), "size": lay.shard(name).stat().st_size,
                   "kind": "base", "first_id": e["first_id"], "seq": e["seq"],
                   "units": [u for u, _ in e.get("units", [])], "writer": e.get("writer", "rebuild"),
                   "time": e.get("time")}
            rows += sh.rows
            cat.write(lambda t: self._put_base(cat, t, name, rec, keys, ids, slides))
        for name, base in self.views.items():
            f = lay.shard(name)
            vrec = {"rows": MappedShard(f).rows, **_checksum(f), "size": f.stat().st_size,
                    "kind": "view", "base": base}
            cat.write(lambda t: cat.put_json(t, "shards", name, vrec))

        def rest(t: Any) -> None:
            for i, reason in self.deleted.items():
                t.put(u64(i), _j({"reason": reason}), db=cat.db["deleted"])
            for u, info in self.units.items():
                cat.put_json(t, "units", u, info)
            t.put(b"next_id", u64(self.next_id), db=cat.db["meta"])
            t.put(b"next_seq", u64(next_seq), db=cat.db["meta"])
            t.put(b"tomb_gen", u64(1 if self.deleted else 0), db=cat.db["meta"])
        cat.write(rest)
        return {"shards": len(order), "view_shards": len(self.views), "rows": rows,
                "deleted": len(self.deleted), "units": len(self.units), "ids_preserved": not self.fresh,
                "missing_shards": self.missing}

    def _put_base(self, cat: Catalog, t: Any, name: str, rec: dict[str, Any], keys: list[str],
                  ids: np.ndarray, slides: list[Any]) -> None:
        kdb, ddb = cat.db["keys"], cat.db["deleted"]
        for k, i in zip(keys, ids.tolist()):
            if i in self.deleted:
                continue
            if not t.put(k.encode(), u64(i), db=kdb, overwrite=False):
                self.deleted[i] = "duplicate"
                t.put(u64(i), _j({"reason": "duplicate"}), db=ddb)
        cat.put_json(t, "shards", name, rec)
        t.put(u64(rec["seq"]), name.encode(), db=cat.db["order"])
        run: list[Any] = []   # [slide, first id, count]: consecutive ids of one slide
        for s, i in zip(slides + [None], ids.tolist() + [-1]):
            if run and (s != run[0] or i != run[1] + run[2]):
                t.put(slide_key(run[0], run[1]), u64(run[2]), db=cat.db["slides"])
                run = []
            if s is not None:
                run = run or [s, i, 0]
                run[2] += 1

    def lost(self, old: dict[str, Any] | None, why: str) -> list[str]:
        """What the new catalog lacks, in words."""
        out = []
        if self.fresh:
            out.append(f"ids and finished units of {len(self.fresh)} shard(s) older than the journal "
                       "(their rows got new ids: rebuild any vector index; extract re-runs their units "
                       "and finds their tiles already present)")
        if self.missing:
            out.append(f"{len(self.missing)} journaled shard file(s) missing: {', '.join(self.missing[:3])}")
        if old is None and not self.labels:
            out.append(f"labels imported with `embedstore labels` ({why}; the tasks are not in the shards: "
                       "re-import each labels CSV)")
            out.append("recorded errors (a re-run of extract records them again)")
        return out

    def carry(self, cat: Catalog, old: dict[str, Any] | None) -> None:
        """Labels and tasks (the journal's imports, else the old catalog's when it could be
        read) and errors (the old catalog's)."""
        def txn(t: Any) -> None:
            db = cat.db["labels"]
            for task, rec in (old or {}).get("tasks", {}).items():
                if task not in self.labels:
                    cat.put_json(t, "tasks", task, rec)
            for k, v in (old or {}).get("labels", []):
                task, _, key = k.partition("\x00")
                if task not in self.labels:
                    t.put(label_key(task, key), _j(v), db=db)
            for task, e in self.labels.items():
                for key, label, split, group in e["rows"]:
                    t.put(label_key(task, key), _j([label, split, group]), db=db)
                cat.put_json(t, "tasks", task, e["record"])
            for u, rec in (old or {}).get("errors", {}).items():
                cat.put_json(t, "errors", u, rec)
        if old is not None or self.labels:
            cat.write(txn)
