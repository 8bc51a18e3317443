"""The store's live rows as a plain table any dataframe library reads (polars, pandas, duckdb,
``pyarrow.dataset``): Parquet (default) or Arrow IPC files under one directory.

Columns: ``key, id, slide, source, x, y, level, tile_size, mpp, label, tile_size_level0``, then
``label_<task>`` / ``split_<task>`` / ``group_<task>`` for each task imported with ``labels``
(null where a tile has none), and ``embedding`` as ``fixed_size_list<float32>[dim]`` (float32 by
default: duckdb reads no float16). Deleted rows are left out. Rows are streamed from
``store.scan`` in bounded batches into ``part-00000.<ext>``, ``part-00001.<ext>``, ...; views
(``with_views``) go to ``_views/`` (``key, id, view, embedding``), which ``pyarrow.dataset`` and a
``DIR/*.parquet`` glob skip. The whole directory is staged beside ``DIR`` and published at once
(``publish_dir``); ``_embedstore_export.json`` describes it. Every file's schema metadata carries
the store's fingerprint and tile geometry under the key ``embedstore``.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreExistsError
from ..store.atomic import atomic_write_text, fsync_dir, fsync_file, publish_dir, recover_dir
from ..store.geometry import level0_sides
from ..store.schema import metadata_array

__all__ = ["export_table", "MANIFEST", "FORMATS", "table_schema"]

MANIFEST = "_embedstore_export.json"
FORMATS = {"parquet": "parquet", "arrow": "arrow"}     # format -> file extension
META_COLS = ("key", "slide", "source", "x", "y", "level", "tile_size", "mpp", "label")
BATCH_BYTES = 64 << 20                                 # embedding bytes per batch read and written


def table_schema(dim: int, dtype: str, tasks: dict[str, dict[str, Any]], meta: dict[str, str]) -> Any:
    import pyarrow as pa
    value = pa.float16() if dtype == "float16" else pa.float32()
    fields = [pa.field("key", pa.string(), nullable=False), pa.field("id", pa.int64(), nullable=False),
              pa.field("slide", pa.string()), pa.field("source", pa.string()), pa.field("x", pa.int64()),
              pa.field("y", pa.int64()), pa.field("level", pa.int16()), pa.field("tile_size", pa.int32()),
              pa.field("mpp", pa.float32()), pa.field("label", pa.string()),
              pa.field("tile_size_level0", pa.float64())]
    for task, info in tasks.items():
        fields.append(pa.field(f"label_{task}", pa.string()))
        for part in ("split", "group"):
            if info.get(f"has_{part}"):
                fields.append(pa.field(f"{part}_{task}", pa.string()))
    fields.append(pa.field("embedding", pa.list_(value, dim), nullable=False))
    return pa.schema(fields, metadata=meta)


class _Joined:
    """A task's labels, splits and groups looked up by id (``task_table`` ids are increasing),
    each part held as one Arrow string array so that a batch's lookup is a vectorised take."""

    def __init__(self, table: dict[str, Any]) -> None:
        import pyarrow as pa
        self.ids = np.asarray(table["ids"], np.int64)
        self.cols = {p: pa.array([None if v is None else str(v) for v in table[p]], type=pa.string())
                     for p in ("label", "split", "group") if table.get(p) is not None}

    def take(self, ids: np.ndarray, part: str) -> Any:
        import pyarrow as pa
        if not len(self.ids):
            return pa.nulls(len(ids), type=pa.string())
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        miss = self.ids[pos] != ids
        return self.cols[part].take(pa.array(pos, mask=miss))   # a null index takes a null


def _embedding(emb: np.ndarray, value_dtype: np.dtype[Any]) -> Any:
    import pyarrow as pa
    e = np.ascontiguousarray(emb, dtype=value_dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1)), e.shape[1])


class _Parts:
    """Rolling part files in one directory: ``part-00000.<ext>`` ..., each at most ``rows`` rows."""

    def __init__(self, folder: Path, fmt: str, schema: Any, rows: int) -> None:
        self.folder, self.fmt, self.schema, self.limit = folder, fmt, schema, rows
        self.files: list[str] = []
        self._writer: Any = None
        self._sink: Any = None
        self._rows = 0

    def _open(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        name = f"part-{len(self.files):05d}.{FORMATS[self.fmt]}"
        self.files.append(name)
        path = self.folder / name
        if self.fmt == "parquet":
            self._writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")
        else:
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._rows = 0

    def write(self, batch: Any) -> None:
        start = 0
        while start < batch.num_rows:
            if self._writer is None or self._rows >= self.limit:
                self.close()
                self._open()
            n = min(batch.num_rows - start, self.limit - self._rows)
            part = batch.slice(start, n)
            self._writer.write_batch(part)
            self._rows += n
            start += n

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            if self._sink is not None:
                self._sink.close()
        self._writer = self._sink = None


def _batches(store: Any, schema: Any, value_dtype: np.dtype[Any], joined: dict[str, _Joined],
             batch_rows: int) -> Iterator[Any]:
    import pyarrow as pa
    tile_l0 = level0_sides(store)
    # Arrow columns straight from the shards where the store has them: no Python object per row
    arrow_meta = getattr(store, "metadata_arrow", None)
    for ids, emb in store.scan(batch_rows):
        m = arrow_meta(ids, META_COLS) if arrow_meta is not None else store.metadata(ids, META_COLS)
        cols: dict[str, Any] = {c: metadata_array(c, m[c]) for c in META_COLS}
        cols["id"] = pa.array(np.asarray(ids, np.int64))
        sides = tile_l0(m["slide"])
        l0 = np.full(len(ids), np.nan) if sides is None else \
            np.where(cols["x"].is_valid().to_numpy(zero_copy_only=False), sides, np.nan)
        cols["tile_size_level0"] = pa.array(l0, mask=np.isnan(l0), type=pa.float64())
        for task, j in joined.items():
            for part in j.cols:
                cols[f"{part}_{task}"] = j.take(ids, part)
        cols["embedding"] = _embedding(emb, value_dtype)
        yield pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)


def _view_batches(store: Any, schema: Any, value_dtype: np.dtype[Any], batch_rows: int) -> Iterator[Any]:
    import pyarrow as pa
    v = store.views()
    for s in range(0, len(v.ids), batch_rows):
        j = np.arange(s, min(s + batch_rows, len(v.ids)))
        ids = np.asarray(v.ids[j], np.int64)
        cols = [metadata_array("key", store.keys_of(ids)), pa.array(ids), pa.array(np.asarray(v.view[j], np.uint8)),
                _embedding(v.gather(j), value_dtype)]
        yield pa.RecordBatch.from_arrays(cols, schema=schema)


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise StoreExistsError(f"{out} is a file; export-table writes a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise StoreExistsError(f"{out} holds files that are not an embedstore export; "
                               "export to a new or empty folder")
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {str(out.parent)!r} does not exist; create it first")


def export_table(store: Any, out: str | os.PathLike[str], *, fmt: str = "parquet", float32: bool = True,
                 with_views: bool = False, rows_per_file: int = 1_000_000,
                 batch_rows: int | None = None) -> dict[str, Any]:
    """Write the live rows of ``store`` (an open Store) under the directory ``out`` (replacing an
    earlier export there as a whole). Returns the manifest (also ``out/_embedstore_export.json``)."""
    import pyarrow as pa
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    if rows_per_file < 1:
        raise ConfigError(f"rows_per_file must be >= 1, got {rows_per_file}")
    out = Path(out)
    recover_dir(out)                               # an export interrupted between its two renames
    _check_target(out)
    dtype = "float32" if float32 else "float16"
    value_dtype = np.dtype(dtype)
    rows = batch_rows or max(1024, min(65536, BATCH_BYTES // (4 * store.dim)))
    tasks = store.tasks()
    joined = {t: _Joined(store.task_table(t)) for t in tasks}
    info = {"fingerprint": store.fingerprint(), "tile": dict(store.meta.tile or {}),
            "stored_dtype": store.meta.dtype, "dim": store.dim}
    meta = {"embedstore": json.dumps(info, sort_keys=True, default=str)}
    schema = table_schema(store.dim, dtype, tasks, meta)
    staged = out.with_name(f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    staged.mkdir()
    try:
        parts = _Parts(staged, fmt, schema, rows_per_file)
        n = 0
        for batch in _batches(store, schema, value_dtype, joined, rows):
            parts.write(batch)
            n += batch.num_rows
        if not parts.files:                        # an empty store still gets a readable file
            parts._open()
        parts.close()
        views: dict[str, Any] = {}
        if with_views:
            vschema = pa.schema([pa.field("key", pa.string(), nullable=False),
                                 pa.field("id", pa.int64(), nullable=False),
                                 pa.field("view", pa.uint8(), nullable=False),
                                 schema.field("embedding")], metadata=meta)
            (staged / "_views").mkdir()
            vparts = _Parts(staged / "_views", fmt, vschema, rows_per_file)
            m = 0
            for batch in _view_batches(store, vschema, value_dtype, rows):
                vparts.write(batch)
                m += batch.num_rows
            if not vparts.files:
                vparts._open()
            vparts.close()
            for f in vparts.files:                 # publish_dir syncs the top level only
                fsync_file(staged / "_views" / f)
            fsync_dir(staged / "_views")
            views = {"rows": m, "files": [f"_views/{f}" for f in vparts.files]}
        manifest = {"store": str(store.path), "format": fmt, "dtype": dtype, "dim": store.dim,
                    "rows": n, "files": parts.files, "columns": schema.names, "tasks": sorted(tasks),
                    "views": views or None}
        atomic_write_text(staged / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        publish_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return {**manifest, "path": str(out)}
