"""``verify``: every shard's checksum (of the kind its record names), and agreement between the
catalog and the shards."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptShardError
from ._checksum import file_digest, record_digest, unavailable
from .catalog import _uj, from_u64, open_catalog
from .layout import PARTIAL, Layout
from .matrix import MappedShard
from .meta import read_store_meta
from .schema import check_shard_schema

__all__ = ["VerifyReport", "verify_store", "checksum_problem"]


@dataclass
class VerifyReport:
    shards: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)   # mismatches: verification fails
    notes: list[str] = field(default_factory=list)      # leftovers of live writers etc.

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        head = (f"OK: {self.shards} shards, {self.rows} rows verified" if self.ok else
                f"FAILED: {len(self.problems)} problem(s) in {self.shards} shards")
        return "\n".join([head] + [f"  problem: {p}" for p in self.problems] +
                         [f"  note: {n}" for n in self.notes])


def checksum_problem(path: Path, rec: dict[str, Any]) -> str | None:
    """What is wrong with the shard file ``path`` against its catalog record's checksum (of
    the kind the record names: sha256 for records older than the kind), or None."""
    kind, digest = record_digest(rec)
    why = unavailable(kind)
    if why is not None:
        return f"{path.name}: cannot check its checksum: {why}"
    if file_digest(path, kind) != digest:
        return f"{path.name}: {kind} checksum differs from the catalog (corrupted)"
    return None


def verify_store(path: Path | str) -> VerifyReport:
    lay = Layout(Path(path))
    meta = read_store_meta(lay.root)  # raises on a missing, foreign or damaged directory
    cat = open_catalog(lay.root)
    rep = VerifyReport()

    def snap(t: Any) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, int]]:
        shards = [(bytes(k).decode(), _uj(v)) for k, v in t.cursor(db=cat.db["shards"])]
        keys = {bytes(k).decode(): from_u64(v) for k, v in t.cursor(db=cat.db["keys"])}
        return shards, keys
    shards, keymap = cat.read(snap)
    deleted = set(cat.read(cat.deleted_ids))
    order = [n for n, _ in cat.read(cat.shards_in_order)]
    by_name = dict(shards)
    seen_ids: dict[int, str] = {}
    for name, rec in shards:
        rep.shards += 1
        f = lay.shard(name)
        if not f.exists():
            rep.problems.append(f"{name}: listed in the catalog but the file is missing")
            continue
        if f.stat().st_size != rec["size"]:
            rep.problems.append(f"{name}: {f.stat().st_size} bytes on disk, catalog says {rec['size']}")
            continue
        bad = checksum_problem(f, rec)
        if bad is not None:
            rep.problems.append(bad)
            if unavailable(record_digest(rec)[0]) is None:   # corrupted (not just uncheckable here)
                continue
        try:
            sh = MappedShard(f, rec["size"])
        except CorruptShardError as e:
            rep.problems.append(str(e))
            continue
        check_shard_schema(meta, sh.schema, name, lay.meta)  # an edited STORE.json: one line, raised
        if sh.rows != rec["rows"]:
            rep.problems.append(f"{name}: {sh.rows} rows, catalog says {rec['rows']}")
            continue
        if rec.get("kind") == "view":
            if rec.get("base") and rec["base"] not in by_name:
                rep.problems.append(f"{name}: view shard of unknown base shard {rec['base']}")
            continue
        rep.rows += sh.rows
        if name not in order:
            rep.problems.append(f"{name}: base shard missing from the commit order")
        keys = [k for b in sh.batches for k in b.column("key").to_pylist()]
        ids = sh.row_ids(rec["first_id"])
        for k, i in zip(keys, ids.tolist()):
            if i in seen_ids:
                rep.problems.append(f"{name}: id {i} also in {seen_ids[i]}")
                break
            seen_ids[i] = name
            if i in deleted:
                continue
            got = keymap.get(k)
            if got != i:
                rep.problems.append(f"{name}: key {k!r} has id {i} in the shard, {got} in the catalog")
                break
    live_ids = set(seen_ids) - deleted
    for k, i in keymap.items():
        if i not in live_ids:
            rep.problems.append(f"catalog key {k!r} -> id {i} which no shard holds")
            break
    for d in (lay.tmp, lay.shards, lay.views):
        if d.exists():
            for f in d.iterdir():
                if f.name.endswith(PARTIAL) or (d != lay.tmp and f.name not in by_name):
                    rep.notes.append(f"uncommitted file {f.relative_to(lay.root)} (removed when "
                                     "its writer is dead and the store is next opened for writing)")
    legacy = lay.legacy_views()
    if legacy:
        rep.notes.append(f"{len(legacy)} view shard(s) in shards/ (the layout before views/); "
                         f"`embedstore upgrade {lay.root}` moves them")
    return rep
