"""A store's progress as a resumable job sees it: which keys are in, which finished units
already have their views, and the commits other nodes staged.

These read the catalog fresh (not a reader's snapshot), so a run sees what it and the other
processes of the run have committed so far. They are what extraction needs from the catalog;
parts above the store call these instead of opening LMDB themselves.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .catalog import _uj, open_catalog
from .commit import apply_staged
from .layout import Layout

__all__ = ["lookup_ids", "units_with_views", "apply_staged_commits"]


def lookup_ids(path: str | os.PathLike[str], keys: Sequence[str], *,
               lock: bool = True) -> list[int | None]:
    """The id of each of ``keys`` in the store at ``path``, None where the key is not committed
    (``lock=False``: LMDB's lock-free read-only mode, as in ``open_store``)."""
    cat = open_catalog(Path(path), lock=lock)
    keys = list(keys)
    return cat.read(lambda t: cat.lookup_ids(t, keys))


def units_with_views(path: str | os.PathLike[str], *, lock: bool = True) -> set[str]:
    """Finished units whose rows were committed together with their augmented views."""
    cat = open_catalog(Path(path), lock=lock)

    def read(t: Any) -> set[str]:
        bases = {rec["base"] for _, rec in cat.view_shards(t) if rec.get("base")}
        return {k.decode() for k, v in cat.items(t, "units")
                if _uj(v).get("shard") in bases}
    return cat.read(read)


def apply_staged_commits(path: str | os.PathLike[str]) -> int:
    """Apply the commits staged by writers that may not write the catalog (other nodes of a
    run, see ``store/commit.py``), in the order written; returns how many. Only the process that
    owns the catalog calls this."""
    lay = Layout(Path(path))
    return apply_staged(lay, open_catalog(lay.root))
