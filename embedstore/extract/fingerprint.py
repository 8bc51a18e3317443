"""Content fingerprints of tile files, and the check that a key still names the file embedded.

A tile file's fingerprint is its size and a hash of its first and last 64 KiB (the whole file
when smaller), as a slide's identity is. Each finished files unit records, with its catalog
record, the folder its keys are relative to (``root``) and the fingerprint of every file it
embedded (``files``). A run that meets a key already in the store from *another* file
location compares contents: the same content (a moved or copied folder) is "already present";
other content is an error naming both files, and that key is kept out of the labels task.
Within one location a key is trusted to be the file embedded (a file edited in place after it
was embedded is not detected, as before).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .sources import FileTile
from .wsi.identity import head_tail_digest

__all__ = ["file_fingerprint", "fingerprints", "conflict_reason", "moved_conflicts"]

_PART = 64 << 10


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """``"size:hash"``: the file size and blake2b-128 of its first and last 64 KiB."""
    h = hashlib.blake2b(digest_size=16)
    size = head_tail_digest(path, _PART, h)
    return f"{size}:{h.hexdigest()}"


def fingerprints(files: Sequence[FileTile]) -> dict[str, str]:
    """Key -> fingerprint of each readable file (an unreadable one is the decoder's error)."""
    out: dict[str, str] = {}
    for t in files:
        try:
            out[t.key] = file_fingerprint(t.path)
        except OSError:
            continue
    return out


def conflict_reason(key: str, new: str, old: str, *, unknown: bool = False) -> str:
    """One line: ``new`` is not the file ``old`` whose embedding the store holds under ``key``."""
    how = ("the embedded file is gone and its fingerprint was not recorded, so they cannot be told "
           "apart" if unknown else "size or content hash differ")
    return (f"{new} is another file than {old}, embedded under key {key!r} ({how}); extract it "
            "into another store, or delete that key first")


def moved_conflicts(files: Sequence[FileTile], root: str, recorded_root: str,
                    recorded: Mapping[str, str],
                    fingerprint: Callable[[str], str] = file_fingerprint) -> list[tuple[str, str]]:
    """``(key, reason)`` for the files of a finished unit, now read under ``root``, whose content
    differs from the ``recorded`` fingerprints of the unit embedded under ``recorded_root``.
    Nothing to check (``[]``) when the root is the same."""
    if os.path.realpath(root) == os.path.realpath(recorded_root):
        return []
    out: list[tuple[str, str]] = []
    for t in files:
        want = recorded.get(t.key)
        if want is None:
            continue            # not embedded by that unit (failed there): planned again elsewhere
        try:
            got = fingerprint(t.path)
        except OSError:
            continue            # unreadable now: not a conflict to report
        if got != want:
            out.append((t.key, conflict_reason(t.key, t.path, os.path.join(recorded_root, t.key))))
    return out
