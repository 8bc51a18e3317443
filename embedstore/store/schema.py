"""Arrow schemas of base shards and view shards (uncompressed IPC files: they memory-map)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from .meta import StoreMeta

__all__ = ["META_COLUMNS", "SHARD_META_KEY", "base_schema", "view_schema", "embedding_type",
           "shard_metadata", "read_shard_metadata", "metadata_array"]

SHARD_META_KEY = b"embedstore"   # schema metadata of every shard: the space and geometry it holds

# Tile metadata of a base row: name -> Arrow type. x, y are level-0 pixels.
META_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),          # stable tile key (relative path, or slide_id/x_y)
    "slide": pa.string(),        # slide or source group the tile belongs to (null if none)
    "source": pa.string(),       # root the key is relative to (folder, CSV dir, slide root)
    "x": pa.int64(),             # level-0 x of the tile's top-left corner (null for files)
    "y": pa.int64(),             # level-0 y
    "level": pa.int16(),         # pyramid level read from
    "tile_size": pa.int32(),     # tile edge in pixels at the target resolution
    "mpp": pa.float32(),         # µm/px of the tile as embedded
    "label": pa.string(),        # label known at extraction (class folder, CSV) or null
}



def metadata_array(name: str, values: Any) -> pa.Array:
    """Metadata column ``name`` as a store hands it out, from ``metadata`` (numpy: -1, NaN or
    None for null) or ``metadata_arrow`` (Arrow, nulls kept), as an Arrow array of its type in
    ``META_COLUMNS`` with every null a null: integers < 0 and non-finite floats included, so
    that both give the same column. Strings from numpy cost a Python object per row; Arrow
    input is converted in Arrow's kernels."""
    import numpy as np
    import pyarrow.compute as pc
    typ = META_COLUMNS[name]
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        a = values.cast(typ) if values.type != typ else values
        if pa.types.is_integer(typ):
            return pc.if_else(pc.less(a, 0), pa.scalar(None, typ), a)
        if pa.types.is_floating(typ):
            return pc.if_else(pc.is_finite(a), a, pa.scalar(None, typ))
        return a
    v = np.asarray(values)
    if pa.types.is_integer(typ):
        n = v.astype(np.int64)
        return pa.array(n, mask=n < 0).cast(typ)
    if pa.types.is_floating(typ):
        f = v.astype(np.float32)
        return pa.array(f, mask=~np.isfinite(f)).cast(typ)
    return pa.array([None if x is None else str(x) for x in v.tolist()], type=typ)

def embedding_type(dim: int, dtype: str) -> pa.DataType:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.list_(value, dim)


def shard_metadata(meta: "StoreMeta") -> dict[bytes, bytes] | None:
    """What a shard records of its store in its own schema (Arrow schema metadata): format
    version, dim, dtype, tile geometry and the backbone fingerprint, so that STORE.json can be
    checked against the shards it describes."""
    rec = {"format_version": meta.format_version, "dim": meta.dim, "dtype": meta.dtype, "tile": meta.tile,
           "backbone": meta.backbone, "weights_sha256": meta.weights_sha256, "transform": meta.transform}
    return {SHARD_META_KEY: json.dumps(rec, sort_keys=True).encode()}


def read_shard_metadata(schema: pa.Schema) -> dict[str, Any] | None:
    """The record of :func:`shard_metadata` in a shard's schema (None for shards written before it)."""
    raw = (schema.metadata or {}).get(SHARD_META_KEY)
    if raw is None:
        return None
    try:
        out = json.loads(raw)
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def base_schema(dim: int, dtype: str, with_id: bool = False,
                metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    fields = [pa.field(n, t) for n, t in META_COLUMNS.items()]
    fields[0] = pa.field("key", pa.string(), nullable=False)
    fields.append(pa.field("embedding", embedding_type(dim, dtype), nullable=False))
    if with_id:  # shards rewritten by compaction keep their ids explicitly
        fields.append(pa.field("id", pa.int64(), nullable=False))
    return pa.schema(fields, metadata=metadata)


def view_schema(dim: int, dtype: str, with_id: bool = False,
                metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    fields = [
        pa.field("key", pa.string(), nullable=False),       # the base tile's key
        pa.field("base_row", pa.int32(), nullable=False),   # row in the base shard written with it
        pa.field("view", pa.uint8(), nullable=False),       # view number 1..K
        pa.field("embedding", embedding_type(dim, dtype), nullable=False),
    ]
    if with_id:  # views added to tiles already committed name their base id directly
        fields.append(pa.field("id", pa.int64(), nullable=False))
    return pa.schema(fields, metadata=metadata)


def check_shard_schema(meta: "StoreMeta", schema: pa.Schema, shard: str, meta_path: Any) -> None:
    """Refuse a STORE.json that disagrees with a shard's own schema: the embedding field's width
    and type always, and the recorded space and geometry where the shard has them (shards
    written before they were recorded have none). One line naming STORE.json and the field."""
    from ..errors import NotAStoreError

    def refuse(name: str, says: Any, holds: Any) -> None:
        raise NotAStoreError(
            f"{meta_path}: {name} is {says!r} but shard {shard} holds {name} {holds!r}; STORE.json was "
            f"edited or the shard belongs to another store (restore STORE.json's {name} to {holds!r})")
    i = schema.get_field_index("embedding")
    t = schema.field(i).type if i >= 0 else None
    if t is None or not pa.types.is_fixed_size_list(t):
        raise NotAStoreError(f"{meta_path}: shard {shard} has no fixed-size embedding field (type {t}); "
                             "it is not a shard of this store")
    holds_dtype = {pa.float16(): "float16", pa.float32(): "float32"}.get(t.value_type, str(t.value_type))
    if t.list_size != meta.dim:
        refuse("dim", meta.dim, t.list_size)
    if holds_dtype != meta.dtype:
        refuse("dtype", meta.dtype, holds_dtype)
    rec = read_shard_metadata(schema)
    if rec is None:
        return
    for name in ("tile", "backbone", "weights_sha256", "transform"):
        if name in rec and rec[name] != getattr(meta, name):
            refuse(name, getattr(meta, name), rec[name])
    from .meta import FORMAT_VERSION
    if int(rec.get("format_version", 1)) > FORMAT_VERSION:
        raise NotAStoreError(f"shard {shard} has format version {rec['format_version']}; this embedstore "
                             f"reads up to {FORMAT_VERSION}: upgrade embedstore")
