"""Making a store directory, and clearing what dead writers left in it.

A store exists once ``STORE.json`` is renamed into place (last). A creation killed before that
resumes on the next attempt. Temporary and uncommitted shard files carry their writer's token in
their name; they are removed only when that writer is known to be dead.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..errors import StoreExistsError
from ._process import process_alive
from .atomic import fsync_dir
from .catalog import Catalog, open_catalog
from .commit import file_writers, unregister_file_writer
from .layout import Layout, owner_of
from .meta import StoreMeta, write_meta

__all__ = ["create_store", "clean_leftovers"]

# what a store directory holds before STORE.json appears (an interrupted creation)
_OURS = {"catalog", "shards", "views", "tmp", ".writers.lock", "staged", "writers", "journal.jsonl"}


def create_store(path: Path | str, meta: StoreMeta) -> None:
    """Create an empty store at ``path`` (a new or empty directory) bound to ``meta``."""
    lay = Layout(Path(path))
    if lay.meta.exists():
        raise StoreExistsError(f"{path} already holds a store; open it instead")
    if lay.root.exists() and any(f.name not in _OURS and not f.name.startswith(".STORE.json.")
                                 for f in lay.root.iterdir()):
        raise StoreExistsError(f"{path} exists and is not empty; choose a new directory")
    lay.make_dirs()
    open_catalog(lay.root, create=True)
    if not meta.created:
        meta = replace(meta, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_meta(lay.root, meta)
    fsync_dir(lay.root)


def clean_leftovers(lay: Layout, cat: Catalog) -> list[str]:
    """Remove temporary and uncommitted shard files of writers that are dead.

    A live writer's files (same host, pid alive with the same start time) are never touched;
    files of writers on other hosts are left alone (their liveness cannot be known here).
    """
    writers = cat.json_map("writers")
    writers.update(file_writers(lay))  # staging writers (other nodes) register in files
    committed = cat.key_set("shards")
    dead: dict[str, bool] = {}

    def is_dead(token: str) -> bool:
        if token not in dead:
            ident = writers.get(token)
            dead[token] = ident is None or process_alive(ident) is False
        return dead[token]

    removed = []
    for d, is_tmp in ((lay.tmp, True), (lay.shards, False), (lay.views, False)):
        if not d.exists():
            continue
        for f in d.iterdir():
            if not is_tmp and f.name in committed:
                continue
            if is_dead(owner_of(f.name)):
                f.unlink(missing_ok=True)
                removed.append(f.name)
    gone = [t for t, v in dead.items() if v and t in writers]
    for t in gone:
        unregister_file_writer(lay, t)
    if gone:
        cat.write(lambda t: [t.delete(x.encode(), db=cat.db["writers"]) for x in gone])
    return removed
