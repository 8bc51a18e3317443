"""Where things live inside a store directory, and the names of shard files.

```
STORE/
  STORE.json          format, backbone, dim, dtype, transform, tile geometry, views
  catalog/            LMDB environment (data.mdb, lock.mdb)
  shards/             committed base shards: <writer>-<seq>.arrow (one row per tile)
  views/              committed view shards: <writer>-<seq>.v.arrow (augmented views of the tiles of
                      the base shard of the same name); stores made before 2026-12 keep them in
                      shards/, which is still read (``embedstore upgrade`` moves them)
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

__all__ = ["Layout", "owner_of", "shard_name", "view_name", "is_view", "base_of"]

PARTIAL = ".partial"
VIEW_SUFFIX = ".v.arrow"


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.meta = self.root / "STORE.json"
        self.catalog = self.root / "catalog"
        self.shards = self.root / "shards"
        self.views = self.root / "views"
        self.tmp = self.root / "tmp"
        self.index = self.root / "index"
        self.lockfile = self.root / ".writers.lock"

    def shard(self, name: str) -> Path:
        """Where committed shard ``name`` lives: base shards in ``shards/``, view shards in
        ``views/``, or in ``shards/`` for a view shard of the old layout not yet upgraded."""
        if not is_view(name):
            return self.shards / name
        new = self.views / name
        if new.exists():
            return new
        old = self.shards / name
        # not in the old place either: `upgrade` moved it between the two looks, or it is new
        return old if old.exists() else new

    def home(self, name: str) -> Path:
        """The directory a shard named ``name`` is sealed into."""
        return self.views if is_view(name) else self.shards

    def homes(self) -> list[Path]:
        """The directories committed shards live in (to fsync after sealing into them)."""
        return [d for d in (self.shards, self.views) if d.is_dir()]

    def legacy_views(self) -> list[Path]:
        """View shards still in ``shards/`` (the layout before ``views/``)."""
        return sorted(self.shards.glob("*" + VIEW_SUFFIX)) if self.shards.is_dir() else []

    def committed_files(self) -> list[Path]:
        """Every ``.arrow`` file in ``shards/`` and ``views/``."""
        return [f for d in (self.shards, self.views) if d.is_dir() for f in sorted(d.glob("*.arrow"))]

    def partial(self, name: str) -> Path:
        return self.tmp / (name + PARTIAL)

    def make_dirs(self) -> None:
        for d in (self.root, self.shards, self.views, self.tmp):
            d.mkdir(parents=True, exist_ok=True)


def shard_name(token: str, seq: int, view: bool = False) -> str:
    return f"{token}-{seq:06d}{VIEW_SUFFIX if view else '.arrow'}"


def view_name(base: str) -> str:
    """The view shard that belongs to base shard ``base``."""
    return base[:-len(".arrow")] + VIEW_SUFFIX


def is_view(name: str) -> bool:
    return name.endswith(VIEW_SUFFIX)


def base_of(view: str) -> str:
    return view[:-len(VIEW_SUFFIX)] + ".arrow"


def owner_of(filename: str) -> str:
    return filename.split("-", 1)[0]
