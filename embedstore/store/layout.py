"""Where things live inside a store directory, and the names of shard files.

```
STORE/
  STORE.json          format, backbone, dim, dtype, transform, tile geometry, views
  catalog/            LMDB environment (data.mdb, lock.mdb)
  shards/             committed shards: <writer>-<seq>.arrow (base) and .v.arrow (views)
  tmp/                shards being written: <writer>-<seq>[.v].arrow.partial
  index/              vector index (see embedstore.index)
  errors/, masks/     per-unit artefacts written by extraction (overlays)
  .writers.lock       flock: shared by writers, exclusive for compaction
```
A file name starts with the token of the writer that made it, so leftovers can be traced to
their owner and removed only when that owner is dead.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["Layout", "owner_of"]

PARTIAL = ".partial"


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta = self.root / "STORE.json"
        self.catalog = self.root / "catalog"
        self.shards = self.root / "shards"
        self.tmp = self.root / "tmp"
        self.index = self.root / "index"
        self.lockfile = self.root / ".writers.lock"

    def shard(self, name: str) -> Path:
        return self.shards / name

    def partial(self, name: str) -> Path:
        return self.tmp / (name + PARTIAL)

    def make_dirs(self) -> None:
        for d in (self.root, self.shards, self.tmp):
            d.mkdir(parents=True, exist_ok=True)


def shard_name(token: str, seq: int, view: bool = False) -> str:
    return f"{token}-{seq:06d}{'.v' if view else ''}.arrow"


def owner_of(filename: str) -> str:
    return filename.split("-", 1)[0]
