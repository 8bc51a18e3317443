"""``StoreLike``: what the parts above the store read from one, and the values those reads return
(:class:`Bag`, :class:`StoredViews`).

The real :class:`~embedstore.store.reader.Store` satisfies it (mypy checks that, see the end of
``reader.py``), and so does every fake used in tests, for what its part reads:
``tests/store_contract.py`` is the one suite run over all of them.

Ids are int64 and increasing in commit order; deleted (tombstoned) rows keep their ids, which
no read returns again. Reads of unknown or deleted ids or keys raise ``UnknownKeyError``.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from .matrix import Matrix
    from .meta import StoreMeta

__all__ = ["StoreLike", "Bag", "StoredViews", "CORE", "OPTIONAL"]


@dataclass(frozen=True)
class Bag:
    """All live tiles of one slide, in id order (a MIL bag)."""
    slide: str
    ids: np.ndarray        # (n,) int64
    keys: list[str]        # (n,)
    coords: np.ndarray     # (n, 2) int64 level-0 x, y (-1 where unknown)
    emb: np.ndarray        # (n, dim) store dtype


@dataclass(frozen=True)
class StoredViews:
    """The augmented views a store holds: row j is view ``view[j]`` of the tile with id ``ids[j]``."""
    ids: np.ndarray        # (m,) int64 base tile ids
    view: np.ndarray       # (m,) uint8 view number 1..K
    emb: Matrix            # (m', dim) view embeddings; row j is ``emb[rows[j]]``
    rows: np.ndarray       # (m,) int64 rows of ``emb``

    def gather(self, j: np.ndarray) -> np.ndarray:
        """(len(j), dim) embeddings of rows ``j`` (positions in ``ids``)."""
        return self.emb.take(self.rows[np.asarray(j)])


class StoreLike(Protocol):
    """A store as the parts above it read it. Rows and ids (``CORE``) are what every store and
    fake provides; the index reads nothing else. The rest (slides, views, tasks, metadata of
    the embedding space) is read by heads, extract's read-back and the HDF5 export; a fake
    made for the index may leave it out, and the contract suite skips what a store lacks.
    ``OPTIONAL`` names what callers look up with ``getattr`` and do without."""

    # -- rows and ids (CORE) ---------------------------------------------------------------
    @property
    def path(self) -> Path: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
    def __len__(self) -> int:
        """Live rows."""
    @property
    def n_rows_committed(self) -> int:
        """Rows committed, deleted ones included (what an index must cover)."""
    def scan(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids (b,) int64, emb (b, dim)) blocks over live rows in id order."""
    def all_ids(self) -> np.ndarray:
        """(n,) int64 live ids, increasing."""
    def gather(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) rows of ``ids`` in the order given."""
    def ids(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys),) int64 ids of tile keys."""
    def keys_of(self, ids: np.ndarray) -> list[str]:
        """Tile keys of ``ids``, in the order given."""
    def metadata(self, ids: np.ndarray, columns: Sequence[str] = ...) -> dict[str, np.ndarray]:
        """Columns of META_COLUMNS for ``ids`` in the order given: strings as object arrays
        (None = null), integers with -1 for null."""
    def labels(self, keys: Sequence[str], task: str | None = None) -> np.ndarray:
        """Labels of ``keys`` (object array, None where unlabelled); ``task=None``: the label
        recorded at extraction."""

    # -- slides, views, tasks, the embedding space -----------------------------------------
    @property
    def meta(self) -> StoreMeta:
        """STORE.json (backbone, tile geometry, view recipe)."""
    def fingerprint(self) -> dict[str, Any]:
        """What defines the embedding space (heads and indexes bind to it)."""
    def slides(self) -> list[str]:
        """Names of slides with at least one live tile, sorted."""
    def slide(self, name: str) -> Bag:
        """All live tiles of one slide."""
    def views(self) -> StoredViews:
        """The augmented views of live tiles (empty when there are none)."""
    def task_table(self, task: str | None) -> dict[str, Any]:
        """Every live labelled tile of a task: ``keys``, ``ids`` (increasing), ``label``,
        ``split``, ``group`` (object arrays, or None when the task has no such column)."""
    def units(self) -> dict[str, dict[str, Any]]:
        """Finished work units and what was recorded with each."""


# the members every store and fake has (see StoreLike); the others may be missing from a fake
CORE = ("path", "dim", "dtype", "__len__", "n_rows_committed", "scan", "all_ids", "gather", "ids",
        "keys_of", "metadata", "labels")
# looked up with getattr by callers that do without: is_deleted(ids) -> (len(ids),) bool, True
# for deleted ids (without it, tombstones are found from all_ids()); slide_ids(name) -> (n,)
# int64 ids of the slide's live tiles (without it, slide(name).ids); metadata_arrow(ids, columns)
# -> {column: pa.Array} with nulls (without it, metadata(ids, columns))
OPTIONAL = ("is_deleted", "slide_ids", "metadata_arrow")
