"""An index larger than RAM: an IVF whose inverted lists live in ``STORE/index/index-<token>.ivfdata``
(faiss ``OnDiskInvertedLists``) and are memory-mapped at search time.

Building never holds the store's matrix, nor all of its codes:

1. the coarse quantizer and the PQ / SQ codebooks are trained on at most ``plan.train_size``
   (<= 262,144) rows gathered by seeded random id, in ``batch_size`` batches;
2. ``store.scan(batch_size)`` batches are encoded into an in-memory IVF of at most
   ``plan.shard_rows`` rows, written as a shard file (``faiss.write_index``) and emptied;
3. the shards, memory-mapped (``IO_FLAG_MMAP``), are merged list by list into one compact
   ``.ivfdata`` file (``OnDiskInvertedLists.merge_from_multiple``, faiss's ``contrib.ondisk``
   recipe), the shards are deleted, the search parameters are tuned on held-out rows, and those
   rows are merged in last (a second merge: faiss cannot append to merged lists safely).

The ``.faiss`` file holds the quantizer, codebooks and list offsets; the ``.ivfdata`` file name
inside it is ignored on load: ``stored.load_index`` reads the file with ``IO_FLAG_SKIP_IVF_DATA``
and maps the ``.ivfdata`` it finds by the store layout (``index-<token>.ivfdata`` beside the
``.faiss`` file of the same token, a plain file of the recorded size). Search is the normal IVF
search over mapped lists: resident memory is the quantizer plus the pages the probed lists touch
(page cache, reclaimable), and PQ candidates are re-ranked exactly from the store.

Disk: the shards, then the merged file, then a copy with the held-out rows: about twice the
``.ivfdata`` size at the peak. ``update_on_disk`` merges the published lists and shards of the
new rows into a new file, published like a build (the old one is removed once index.json names
the new one).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from embedstore.errors import VectorIndexError
from embedstore.index._make import gather_rows, new_index, random_ids, train
from embedstore.index._vectors import log, prepare, rows_after
from embedstore.index.choose import IndexPlan
from embedstore.store.atomic import atomic_path
from embedstore.store.protocol import StoreLike

__all__ = ["OnDiskBuild", "open_on_disk", "empty_copy", "merge_lists", "write_shards", "train_empty",
           "PREFETCH_THREADS"]

PREFETCH_THREADS = 0     # faiss's list prefetch threads at search (default 32): the lists are
                         # mapped, so the kernel's read-ahead does the work on two cores


def _faiss() -> Any:
    """faiss, untyped: its SWIG stubs lack the on-disk list API used here."""
    import faiss

    return faiss


@contextmanager
def c_stdout_to_stderr() -> Iterator[None]:
    """faiss's on-disk lists ``printf`` to stdout ("resizing ... bytes"); send that to stderr
    so that ``--json`` output stays one document."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def train_empty(store: StoreLike, plan: IndexPlan, metric: str, seed: int,
                batch_size: int) -> Any:
    """The empty CPU index of ``plan``, trained on its sample gathered by random id."""
    index = new_index(plan)
    if plan.needs_training:
        t0 = time.perf_counter()
        pick_ids = random_ids(store.all_ids(), plan.train_size, seed)
        sample = gather_rows(store, pick_ids, metric, batch_size)
        train(index, sample, plan, seed, False)
        del sample
        log.info("trained %s on %d sampled rows in %.1fs", plan.factory, len(pick_ids),
                 time.perf_counter() - t0)
    return index


def _flush(index: Any, staging: Path, shards: list[Path]) -> None:
    faiss = _faiss()

    if index.ntotal == 0:
        return
    path = staging / f"shard-{len(shards):05d}.faiss"
    faiss.write_index(index, str(path))
    shards.append(path)
    index.reset()


def write_shards(index: Any, store: StoreLike, metric: str, batch_size: int, shard_rows: int,
                 staging: Path, above_id: int = -1, skip: np.ndarray | None = None
                 ) -> tuple[list[Path], int, int]:
    """Encode every live row with id > ``above_id`` and not in sorted ``skip`` into shard files
    under ``staging`` of at most ~``shard_rows`` rows each (``index`` is trained and empty, and
    is left empty): (shard paths, rows added, largest id seen)."""
    shards: list[Path] = []
    added, max_id = 0, above_id
    for ids, emb in rows_after(store, batch_size, above_id, skip):
        index.add_with_ids(prepare(emb, metric), ids)
        added += len(ids)
        max_id = max(max_id, int(ids[-1]))
        if index.ntotal >= shard_rows:
            _flush(index, staging, shards)
    _flush(index, staging, shards)
    return shards, added, max_id


def merge_lists(index: Any, sources: list[Any], path: Path) -> Any:
    """Give ``index`` (trained, empty) on-disk lists in ``path`` holding every list of
    ``sources`` (faiss InvertedLists, e.g. mapped shards), merged list by list; returns it."""
    faiss = _faiss()

    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    vector = faiss.InvertedListsPtrVector()
    for src in sources:
        vector.push_back(src)
    with c_stdout_to_stderr():
        ntotal = lists.merge_from_multiple(vector.data(), vector.size(), False, False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()                 # the index owns it now
    ivf.ntotal = index.ntotal = ntotal
    return index


def empty_copy(path: Path, flags: int = 0) -> Any:
    """The index in faiss file ``path`` with empty in-memory lists: its quantizer and codebooks
    (``flags``: IO_FLAG_SKIP_IVF_DATA for a published on-disk index, whose lists stay unmapped)."""
    faiss = _faiss()

    index = faiss.read_index(str(path), flags)
    ivf = faiss.extract_index_ivf(index)
    fresh = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(fresh, True)
    fresh.this.disown()
    ivf.ntotal = index.ntotal = 0
    return index


def lists_of(index: Any) -> Any:
    """The inverted lists of an IVF index (maybe under a pre-transform)."""
    faiss = _faiss()

    return faiss.extract_index_ivf(index).invlists


def open_on_disk(path: Path, ivfdata: Path) -> Any:
    """The published index ``path`` over the lists of ``ivfdata``, mapped read-only; the file
    name recorded inside ``path`` is never opened. VectorIndexError when ``path`` does not hold
    on-disk lists or ``ivfdata`` is shorter than they need (RuntimeError from faiss on a damaged
    file is left to the caller)."""
    faiss = _faiss()

    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise VectorIndexError(f"{path} holds no on-disk inverted lists but index.json says "
                               "on_disk")
    size = ivfdata.stat().st_size
    if lists.totsize > size:
        raise VectorIndexError(f"{ivfdata} is {size:,} bytes but {path.name} needs "
                               f"{int(lists.totsize):,} (truncated)")
    lists.filename = str(ivfdata)
    lists.prefetch_nthread = PREFETCH_THREADS
    lists.do_mmap()
    return index


class OnDiskBuild:
    """One build or update of an on-disk index, staged under ``STORE/index/.build-<token>/``
    (removed at the end, whatever happens): the trained empty index, the shards, the merge
    searched while tuning, and the published ``index-<token>.ivfdata``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.token = uuid.uuid4().hex[:12]
        self.staging = directory / f".build-{self.token}"
        self.shards: list[Path] = []
        self.empty = self.staging / "empty.faiss"

    @property
    def ivfdata_name(self) -> str:
        return f"index-{self.token}.ivfdata"

    def __enter__(self) -> "OnDiskBuild":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def encode(self, work: Any, store: StoreLike, metric: str, batch_size: int,
               shard_rows: int, skip: np.ndarray | None = None, above_id: int = -1
               ) -> tuple[int, int]:
        """Encode the rows (id > ``above_id``, not in ``skip``) with ``work`` (trained, empty;
        also kept as the staged ``empty.faiss``) into shards: (rows added, largest id seen)."""
        faiss = _faiss()

        faiss.write_index(work, str(self.empty))
        self.shards, added, max_id = write_shards(work, store, metric, batch_size,
                                                  max(1, shard_rows), self.staging,
                                                  above_id, skip)
        return added, max_id

    def merge(self, extra: list[Any], tail: Iterable[tuple[np.ndarray, np.ndarray]] = (),
              final: bool = False) -> Any:
        """The lists ``extra`` (a staged or published index's), the shards and the prepared
        rows of ``tail`` (batches of (ids, rows)) merged into one file: staged (for tuning), or
        with ``final`` ``index-<token>.ivfdata``, fsynced and renamed into place. Returns the
        index over it; the shards are deleted."""
        faiss = _faiss()

        part = None
        for ids, rows in tail:
            if part is None:
                part = empty_copy(self.empty)
            part.add_with_ids(np.ascontiguousarray(rows, dtype=np.float32), ids)
        if part is not None and part.ntotal:
            _flush(part, self.staging, self.shards)
        del part
        opened = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in self.shards]
        sources = list(extra) + [lists_of(s) for s in opened]
        if not final:
            index = merge_lists(empty_copy(self.empty), sources, self.staging / "merged.ivfdata")
        else:
            with atomic_path(self.directory / self.ivfdata_name) as tmp:
                index = merge_lists(empty_copy(self.empty), sources, tmp)
                faiss.downcast_InvertedLists(lists_of(index)).filename = self.ivfdata_name
        del sources, opened
        for p in self.shards:
            p.unlink()
        self.shards = []
        return index
