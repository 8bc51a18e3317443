"""The catalog's journal: an append-only file of what each catalog transaction recorded that
the shards themselves cannot tell — which ids and commit order a shard got, the units it
finished, deletions and compaction swaps. ``rebuild-catalog`` replays it over the shards.

``STORE/journal.jsonl``, one JSON object a line, appended (and fsynced) inside the transaction
it describes, just before the commit; LMDB's write lock orders the lines. A line whose
transaction never committed (a crash in between) is told apart on replay: its commit sequence
number is taken again by the next commit, whose line comes later and wins.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["JOURNAL", "append", "read"]

JOURNAL = "journal.jsonl"


def append(store_dir: Path, rec: dict[str, Any]) -> None:
    """Append one record (durably: the file is fsynced)."""
    line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
    fd = os.open(Path(store_dir) / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(store_dir: Path) -> list[dict[str, Any]]:
    """Every complete record in order (a torn last line, from a crash mid-append, is skipped)."""
    try:
        raw = (Path(store_dir) / JOURNAL).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "op" in rec:
            out.append(rec)
    return out
