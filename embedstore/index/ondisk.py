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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from embedstore.errors import VectorIndexError
from embedstore.index._make import gather_rows, new_index, random_ids, train
from embedstore.index._vectors import log, prepare
from embedstore.index.choose import IndexPlan
from embedstore.store.atomic import atomic_path
from embedstore.store.protocol import StoreLike

__all__ = ["train_empty", "write_shards", "merge_lists", "OnDiskBuild", "PREFETCH_THREADS"]

PREFETCH_THREADS = 0     # faiss's list prefetch threads at search (default 32): the lists are
                         # mapped, so the kernel's read-ahead does the work on two cores


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
    import faiss

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
    for ids, emb in store.scan(batch_size):
        if len(ids) == 0 or ids[-1] <= above_id:
            continue
        ids = np.asarray(ids, dtype=np.int64)
        keep = ids > above_id
        if skip is not None and len(skip):
            keep &= ~np.isin(ids, skip)
        if not keep.all():
            ids, emb = ids[keep], emb[keep]
        if not len(ids):
            continue
        index.add_with_ids(prepare(emb, metric), ids)
        added += len(ids)
        max_id = max(max_id, int(ids[-1]))
        if index.ntotal >= shard_rows:
            _flush(index, staging, shards)
    _flush(index, staging, shards)
    return shards, added, max_id


def rows_shard(index: Any, emb: np.ndarray, ids: np.ndarray, staging: Path,
               shards: list[Path]) -> None:
    """Prepared rows ``emb`` with ``ids`` as one more shard (``index`` trained and empty)."""
    index.add_with_ids(emb, ids)
    _flush(index, staging, shards)


def merge_lists(index: Any, sources: list[Any], path: Path) -> Any:
    """Replace ``index``'s (empty) inverted lists by on-disk lists in ``path`` holding every list
    of ``sources`` (faiss InvertedLists, e.g. mapped shards), merged list by list; returns the
    index. ``index`` must be the trained index the sources were encoded with."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(path))
    vector = faiss.InvertedListsPtrVector()
    for src in sources:
        vector.push_back(src)
    with c_stdout_to_stderr():
        ntotal = lists.merge_from_multiple(vector.data(), vector.size(), False, False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()                 # the index owns it now
    ivf.ntotal = ntotal
    index.ntotal = ntotal
    return index


def _mapped(paths: list[Path]) -> list[Any]:
    """Shard indexes read with IO_FLAG_MMAP: their lists are mapped, not loaded."""
    import faiss

    return [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in paths]


def _lists(index: Any) -> Any:
    import faiss

    return faiss.extract_index_ivf(index).invlists


def detach_lists(index: Any) -> None:
    """Unmap the on-disk lists of ``index`` (an empty ArrayInvertedLists takes their place)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    ivf.replace_invlists(faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size), True)
    ivf.ntotal = index.ntotal = 0


class OnDiskBuild:
    """Staging for one build or update under ``STORE/index/.build-<token>/``: shards, the
    merged lists for tuning, and the final ``index-<token>.ivfdata`` published atomically.
    Use as a context manager: the staging folder is removed at the end, whatever happens."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.token = uuid.uuid4().hex[:12]
        self.staging = directory / f".build-{self.token}"
        self.shards: list[Path] = []

    @property
    def ivfdata_name(self) -> str:
        return f"index-{self.token}.ivfdata"

    def __enter__(self) -> "OnDiskBuild":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def merge_shards(self, index: Any, extra: list[Any] | None = None) -> Any:
        """Merge ``extra`` lists (e.g. a published index's) and every shard into a staged file,
        then delete the shards (the merged file holds them)."""
        opened = _mapped(self.shards)
        staged = self.staging / "merged.ivfdata"
        merge_lists(index, list(extra or []) + [_lists(s) for s in opened], staged)
        del opened
        for p in self.shards:
            p.unlink()
        self.shards = []
        return index

    def publish(self, index: Any, tail: np.ndarray, tail_ids: np.ndarray) -> Any:
        """The final lists: the staged merge plus the rows ``tail`` (prepared, with ``tail_ids``),
        merged into ``index-<token>.ivfdata`` (fsynced, renamed); returns the index over it,
        with the plain file name recorded inside (load_index ignores it anyway)."""
        import faiss

        empty = faiss.clone_index(index) if False else None   # noqa: F841 (kept simple below)
        staged = _lists(index)
        holder = faiss.read_index(str(self._write_empty(index)))
        if len(tail_ids):
            rows_shard(holder, tail, tail_ids, self.staging, self.shards)
        opened = _mapped(self.shards)
        final = self.directory / self.ivfdata_name
        with atomic_path(final) as tmp:
            merge_lists(holder, [staged] + [_lists(s) for s in opened], tmp)
            del opened
            detach_lists(index)                # unmaps the staged merge
            ondisk = faiss.downcast_InvertedLists(_lists(holder))
            ondisk.filename = self.ivfdata_name
        (self.staging / "merged.ivfdata").unlink(missing_ok=True)
        return holder

    def _write_empty(self, index: Any) -> Path:
        """The trained, empty index as a file (the quantizer and codebooks, no lists)."""
        import faiss

        ivf = faiss.extract_index_ivf(index)
        keep, keep_n = ivf.invlists, ivf.ntotal
        ivf.own_invlists = False
        ivf.invlists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.ntotal = index.ntotal = 0
        path = self.staging / "empty.faiss"
        try:
            faiss.write_index(index, str(path))
        finally:
            temp = ivf.invlists
            ivf.invlists = keep
            ivf.own_invlists = True
            ivf.ntotal = index.ntotal = keep_n
            del temp
        return path
