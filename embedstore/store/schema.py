"""Arrow schemas of base shards and view shards (uncompressed IPC files: they memory-map)."""
from __future__ import annotations

import pyarrow as pa

__all__ = ["META_COLUMNS", "base_schema", "view_schema", "embedding_type"]

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


def embedding_type(dim: int, dtype: str) -> pa.DataType:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.list_(value, dim)


def base_schema(dim: int, dtype: str, with_id: bool = False) -> pa.Schema:
    fields = [pa.field(n, t) for n, t in META_COLUMNS.items()]
    fields[0] = pa.field("key", pa.string(), nullable=False)
    fields.append(pa.field("embedding", embedding_type(dim, dtype), nullable=False))
    if with_id:  # shards rewritten by compaction keep their ids explicitly
        fields.append(pa.field("id", pa.int64(), nullable=False))
    return pa.schema(fields)


def view_schema(dim: int, dtype: str, with_id: bool = False) -> pa.Schema:
    fields = [
        pa.field("key", pa.string(), nullable=False),       # the base tile's key
        pa.field("base_row", pa.int32(), nullable=False),   # row in the base shard written with it
        pa.field("view", pa.uint8(), nullable=False),       # view number 1..K
        pa.field("embedding", embedding_type(dim, dtype), nullable=False),
    ]
    if with_id:  # views added to tiles already committed name their base id directly
        fields.append(pa.field("id", pa.int64(), nullable=False))
    return pa.schema(fields)
