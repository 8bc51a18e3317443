"""``StoreLike``: what the parts above the store read from one.

The real :class:`~embedstore.store.reader.Store` satisfies it, and so does every fake used in
tests; ``tests/store_contract.py`` is the one suite run over all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

__all__ = ["StoreLike"]


class StoreLike(Protocol):
    """What the index needs from a store (embedstore.store's reader provides it)."""

    path: Path
    dim: int
    dtype: Any

    def __len__(self) -> int: ...
    @property
    def n_rows_committed(self) -> int: ...
    def scan(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def all_ids(self) -> np.ndarray: ...
    def gather(self, ids: np.ndarray) -> np.ndarray: ...
    def ids(self, keys: Sequence[str]) -> np.ndarray: ...
    def keys_of(self, ids: np.ndarray) -> list[str]: ...
    def metadata(self, ids: np.ndarray, columns: Sequence[str] = ...) -> dict[str, np.ndarray]: ...
    def labels(self, keys: Sequence[str], task: str | None = None) -> np.ndarray: ...
    # optional: is_deleted(ids) -> (m,) bool; without it, tombstones come from all_ids()
