"""Shard checksums: which kind a shard record holds, computing one, and checking one.

New shards get ``xxh3_128`` (the ``xxhash`` package: ~15 GB/s on one core, against ~1.3 GB/s
for sha256), recorded as ``{"hash": "xxh3_128", "digest": HEX}``. Without the package the
writer falls back to ``sha256`` and records that kind. Records written before the kind was
recorded hold ``{"sha256": HEX}`` only: they are sha256 and still verify.
``EMBEDSTORE_SHARD_HASH=sha256`` forces the kind for new shards (tests, or a reader elsewhere
that lacks xxhash).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError, MissingDependencyError

__all__ = ["FAST", "Hasher", "default_kind", "new_hasher", "digest_record", "record_digest",
           "file_digest", "unavailable"]

FAST = "xxh3_128"
KINDS = (FAST, "sha256")
ENV = "EMBEDSTORE_SHARD_HASH"
CHUNK = 16 << 20


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...

    def hexdigest(self) -> str: ...


def unavailable(kind: str) -> str | None:
    """Why checksums of ``kind`` cannot be computed here (None when they can)."""
    if kind == "sha256":
        return None
    if kind != FAST:
        return f"unknown shard checksum kind {kind!r} (this embedstore knows {', '.join(KINDS)}): upgrade embedstore"
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return f"{kind} checksums need the xxhash package: pip install xxhash"
    return None


def default_kind() -> str:
    """The kind new shards get: ``$EMBEDSTORE_SHARD_HASH``, else xxh3_128 when xxhash is
    installed, else sha256."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in KINDS:
            raise ConfigError(f"{ENV}={forced!r} is not a shard checksum kind; use one of {', '.join(KINDS)}")
        return forced
    return FAST if unavailable(FAST) is None else "sha256"


def new_hasher(kind: str) -> Hasher:
    if kind == "sha256":
        return hashlib.sha256()
    why = unavailable(kind)
    if why is not None:
        raise (MissingDependencyError if kind == FAST else ConfigError)(why)
    import xxhash
    return xxhash.xxh3_128()


def digest_record(kind: str, digest: str) -> dict[str, str]:
    """What a shard's catalog record holds of its checksum."""
    return {"hash": kind, "digest": digest}


def record_digest(rec: dict[str, Any]) -> tuple[str, str]:
    """(kind, hex digest) of a shard record, old (``sha256`` only) or new (``hash`` + ``digest``)."""
    if "digest" in rec:
        return str(rec.get("hash", "sha256")), str(rec["digest"])
    return "sha256", str(rec["sha256"])


def file_digest(path: Path, kind: str) -> str:
    """Checksum of a whole file, read in 16 MiB chunks."""
    h = new_hasher(kind)
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            h.update(mv[:n])
    return h.hexdigest()
