"""Stable names for slides and their tiles, and a cheap fingerprint of a slide file.

A slide's id is its path relative to the source root (POSIX, extension kept); a tile's key is
``slide_id/x_y`` with x, y its level-0 top-left corner.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from embedstore.errors import SourceError

__all__ = ["slide_identity", "slide_id", "tile_key", "parse_tile_key", "head_tail_digest"]

_MIB = 1 << 20


def slide_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """File size and sha256 over the first and last 1 MiB (the whole file when <= 2 MiB).

    Cheap on multi-GB slides and catches re-scans, truncation and replaced files; a change
    confined to the middle of a large file goes unnoticed.
    """
    h = hashlib.sha256()
    size = head_tail_digest(path, _MIB, h)
    return {"size": size, "sha256_head_tail": h.hexdigest()}


def head_tail_digest(path: str | os.PathLike[str], part: int, h: Any) -> int:
    """Feed ``h`` (a hashlib object) the first and last ``part`` bytes of the file (all of it
    when it is at most ``2 * part`` long); returns the file size. Slides and tile files share it."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        if size <= 2 * part:
            h.update(f.read())
        else:
            h.update(f.read(part))
            f.seek(size - part)
            h.update(f.read(part))
    return size


def slide_id(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """The slide path relative to the source root, POSIX, extension kept (``a/x.svs``)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if rel == "." or rel.startswith(".." + os.sep) or rel == ".." or os.path.isabs(rel):
        raise SourceError(f"slide {path} is not inside the source root {root}; "
                          "pass the folder that contains it as the root")
    return Path(rel).as_posix()


def tile_key(slide_id: str, x: int, y: int) -> str:
    """The store key of a slide tile: ``f"{slide_id}/{x}_{y}"`` (level-0 top-left corner)."""
    return f"{slide_id}/{int(x)}_{int(y)}"


def parse_tile_key(key: str) -> tuple[str, int, int]:
    """Inverse of `tile_key`: ``(slide_id, x, y)``."""
    sid, _, xy = key.rpartition("/")
    xs, sep, ys = xy.partition("_")
    if not sid or not sep:
        raise SourceError(f"not a slide tile key: {key!r}; expected 'slide_id/x_y'")
    return sid, int(xs), int(ys)

