"""A shard file being written, and **the** shard seal.

A shard is written under ``tmp/`` as ``NAME.partial`` through a sink that hashes what passes
through it. Sealing closes the Arrow writer, fsyncs the file and renames it into ``shards/``;
it returns the catalog record: rows, size and the checksum of the bytes as they were written
(of the kind :mod:`embedstore.store._checksum` picks; the file is never read back to hash it).
Every shard the store writes — a writer's base and view shards, views added to committed
tiles, shards rewritten by compaction — is sealed by :meth:`ShardFile.seal`. The caller fsyncs
``shards/`` once after sealing the files of one commit, then records them in the catalog
(write, fsync, rename, then record).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ._checksum import default_kind, digest_record, new_hasher
from ._process import crash_point
from .atomic import fsync_dir
from .layout import Layout

__all__ = ["HashingFile", "ShardFile", "write_shard", "fixed_list"]


class HashingFile:
    """A write-only raw file that hashes what passes through it, for ``pa.PythonFile``.
    ``kind``: the checksum kind (default: :func:`~embedstore.store._checksum.default_kind`)."""

    def __init__(self, path: Path, kind: str | None = None) -> None:
        self.kind = kind or default_kind()
        self.hash = new_hasher(self.kind)
        self._f = open(path, "xb", buffering=0)
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        mv = memoryview(data)
        self.hash.update(mv)
        n = 0
        while n < mv.nbytes:
            n += self._f.write(mv[n:])
        self.size += n
        return n

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def fsync_close(self) -> None:
        if not self.closed:
            os.fsync(self._f.fileno())
            self._f.close()
            self.closed = True

    def close(self) -> None:  # pa.PythonFile closes us; durability comes from fsync_close
        self.fsync_close()


class ShardFile:
    """One shard being written: an Arrow IPC file writer over a hashing sink in ``tmp/``."""

    def __init__(self, lay: Layout, name: str, schema: pa.Schema) -> None:
        self.lay, self.name, self.schema = lay, name, schema
        self.sink = HashingFile(lay.partial(name))
        self.writer = pa.ipc.new_file(pa.PythonFile(self.sink, mode="w"), schema)
        self.rows = 0

    def write(self, rows: pa.RecordBatch | pa.Table) -> None:
        self.writer.write(rows)
        self.rows += rows.num_rows

    def write_table(self, table: pa.Table, max_chunksize: int = 65536) -> None:
        self.writer.write_table(table, max_chunksize=max_chunksize)
        self.rows += table.num_rows

    def seal(self) -> dict[str, Any]:
        """Close, fsync, rename into ``shards/``: the one shard seal. Returns the shard's catalog
        record ``{rows, size, hash, digest}``; the caller fsyncs ``shards/`` before committing it."""
        self.writer.close()
        self.sink.fsync_close()
        crash_point("after_fsync")
        rec = {"rows": self.rows, "size": self.sink.size,
               **digest_record(self.sink.kind, self.sink.hash.hexdigest())}
        home = self.lay.home(self.name)
        if not home.is_dir():   # views/ in a store made before it existed
            home.mkdir(exist_ok=True)
            fsync_dir(self.lay.root)
        os.replace(self.lay.partial(self.name), home / self.name)
        return rec

    def discard(self) -> None:
        """Abandon the file: nothing of it stays behind."""
        try:
            self.writer.close()
        except Exception:  # a writer that failed mid-batch may refuse to close; the file goes anyway
            pass
        self.sink.fsync_close()
        self.lay.partial(self.name).unlink(missing_ok=True)


def write_shard(lay: Layout, name: str, table: pa.Table) -> dict[str, Any]:
    """Write ``table`` as the shard ``name`` and seal it; returns its catalog record."""
    f = ShardFile(lay, name, table.schema)
    try:
        f.write_table(table)
    except BaseException:
        f.discard()
        raise
    return f.seal()


def fixed_list(emb: np.ndarray) -> pa.FixedSizeListArray:
    """``emb`` (n, dim) as Arrow's fixed-size-list column (the ``embedding`` column)."""
    flat = pa.array(np.ascontiguousarray(emb).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])
