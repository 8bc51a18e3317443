"""Publishing a file whole: write to a temporary name beside it, fsync, rename, fsync the folder.

Every file embedstore publishes (STORE.json, shards, index files, heads, predictions, HDF5
exports, pictures) goes through one of these, so a crash leaves the old file or the new one,
never a torn one.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..errors import ConfigError
from ._process import crash_point

__all__ = ["fsync_dir", "fsync_file", "atomic_path", "atomic_open", "atomic_write_bytes",
           "atomic_write_text", "publish_dir", "recover_dir", "crash_point"]


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync a file or directory by name."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file


def _partial_name(path: Path) -> Path:
    # keeps the suffix last, so writers that pick a format from it (savefig, h5py) still work
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.partial{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path for a writer that wants a file name (faiss, h5py, savefig, ...);
    when the block ends normally the file is fsynced and renamed to ``path``; on an exception it
    is removed and ``path`` is untouched."""
    final = Path(path)
    tmp = _partial_name(final)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """``open`` for writing whose result appears at ``path`` only when the block ends normally."""
    if not any(c in mode for c in "wx"):
        raise ConfigError(f"atomic_open is for writing, got mode {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def publish_dir(staged: Path, final: Path) -> None:
    """Replace the directory ``final`` by ``staged`` (a fully written, fsynced sibling) as a whole.

    The old directory is first renamed aside, then ``staged`` takes its name: a crash between the
    two renames leaves ``final`` missing and ``.NAME.old`` complete, which ``recover_dir`` puts
    back. Readers therefore see the old directory or the new one, never a mix."""
    final = Path(final)
    for f in staged.iterdir():
        if f.is_file():
            fsync_file(f)
    fsync_dir(staged)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    crash_point("publish_swap")
    os.replace(staged, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a ``publish_dir`` interrupted between its two renames (``final`` gone, old aside)."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        os.replace(old, final)
        fsync_dir(final.parent)
