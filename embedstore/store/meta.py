"""``STORE.json``: the human-readable record that binds a store to one embedding space.

Order of precedence wherever a value can come from several places:
CLI flag > store metadata (this file) > registry default.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import (BackboneMismatchError, CatalogDamagedError, ConfigError, DimensionMismatchError, NotAStoreError,
                      StoreNotFoundError)
from .atomic import atomic_write_bytes, recover_dir

__all__ = ["FORMAT_VERSION", "StoreMeta", "read_meta", "read_store_meta", "write_meta", "check_compatible"]

FORMAT_VERSION = 1
META_NAME = "STORE.json"
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class StoreMeta:
    dim: int                                    # embedding dimension
    dtype: str = "float16"                      # on-disk embedding dtype: float16 | float32
    backbone: dict[str, Any] = field(default_factory=dict)   # backbone spec (registry dict)
    weights_sha256: str = ""                    # checksum of the backbone weights ("" unknown)
    transform: dict[str, Any] = field(default_factory=dict)  # preprocessing (size, mean, std, ...)
    tile: dict[str, Any] = field(default_factory=dict)       # tile geometry (tile_size, mpp)
    views: dict[str, Any] | None = None         # view recipe + seed when a view bank exists
    format_version: int = FORMAT_VERSION        # on-disk format of shards and catalog
    created: str = ""                           # ISO time of creation (informational)

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise DimensionMismatchError(f"embedding dim must be a positive int, got {self.dim!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def space(self) -> dict[str, Any]:
        """What defines the embedding space: equal spaces may share heads and indexes."""
        return {"backbone": self.backbone, "weights_sha256": self.weights_sha256,
                "transform": self.transform, "dim": self.dim}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StoreMeta":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_views(self, views: dict[str, Any] | None) -> "StoreMeta":
        return replace(self, views=views)


def read_meta(path: Path) -> StoreMeta:
    f = Path(path) / META_NAME
    try:
        d = json.loads(f.read_text())
    except FileNotFoundError:
        raise NotAStoreError(f"{path} is not an embedstore store (no {META_NAME}); "
                             "create one with a writer or `embedstore extract`") from None
    except json.JSONDecodeError as e:
        raise NotAStoreError(f"{f} is not valid JSON ({e})") from None
    if d.get("format_version", 0) > FORMAT_VERSION:
        raise NotAStoreError(f"{f} has format version {d['format_version']}; this embedstore "
                             f"reads up to {FORMAT_VERSION}: upgrade embedstore")
    if not isinstance(d, dict):
        raise NotAStoreError(f"{f} does not hold a JSON object")
    try:
        return StoreMeta.from_dict(d)
    except (ConfigError, DimensionMismatchError, TypeError) as e:  # a field edited to nonsense
        raise NotAStoreError(f"{f}: {e}; restore it (every shard records the store's dim and dtype)") from None


def read_store_meta(path: Path) -> StoreMeta:
    """``read_meta`` of a store about to be opened, after checking the directory is one: a
    missing path is StoreNotFoundError; a file, a foreign directory or one without ``catalog/``
    is NotAStoreError."""
    path = Path(path)
    if not path.exists():
        raise StoreNotFoundError(f"store {path} does not exist")
    if not path.is_dir():
        raise NotAStoreError(f"{path} is a file, not a store directory")
    meta = read_meta(path)
    recover_dir(path / "catalog")   # a catalog swap (rebuild-catalog) interrupted between its renames
    if not (path / "catalog").is_dir():
        raise CatalogDamagedError(
            f"the catalog of {path} is damaged ({path / 'catalog'} is missing); the shards are intact: "
            f"rebuild it from them with `embedstore rebuild-catalog {path}`")
    return meta


def write_meta(path: Path, meta: StoreMeta) -> None:
    """Atomically (write, fsync, rename) replace STORE.json."""
    atomic_write_bytes(Path(path) / META_NAME, (meta.to_json() + "\n").encode())


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return f"{k}: store has {a.get(k)!r}, given {b.get(k)!r}"
    return f"store has {a!r}, given {b!r}"


def check_compatible(store: StoreMeta, given: StoreMeta, path: Path) -> None:
    """Refuse to mix embedding spaces: one line naming the first difference."""
    for name in ("backbone", "weights_sha256", "transform", "tile", "dtype"):
        a, b = getattr(store, name), getattr(given, name)
        if a != b:
            raise BackboneMismatchError(
                f"{path} was made with another {name} ({_diff(a, b)}); "
                "write to a new store (one store = one embedding space)")
    if store.dim != given.dim:
        raise DimensionMismatchError(
            f"{path}: store embeddings are {store.dim}-d, given {given.dim}-d; use another store")

