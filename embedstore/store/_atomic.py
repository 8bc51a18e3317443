"""The rest of the commit protocol: a hashing shard sink, process identity, crash points.

Publishing files whole lives in :mod:`embedstore.store.atomic`."""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, fsync_dir

__all__ = ["fsync_dir", "atomic_write_bytes", "HashingFile", "process_identity",
           "process_alive", "crash_point"]


class HashingFile:
    """A write-only raw file that hashes (sha256) what passes through it, for ``pa.PythonFile``."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "xb", buffering=0)
        self.sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        mv = memoryview(data)
        self.sha.update(mv)
        n = 0
        while n < mv.nbytes:
            n += self._f.write(mv[n:])
        self.size += n
        return n

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def fsync_close(self) -> None:
        if not self.closed:
            os.fsync(self._f.fileno())
            self._f.close()
            self.closed = True

    def close(self) -> None:  # pa.PythonFile closes us; durability comes from fsync_close
        if not self.closed:
            os.fsync(self._f.fileno())
            self._f.close()
            self.closed = True


def _start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot) — tells a pid reused by another process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    rest = stat[stat.rindex(b")") + 2:].split()
    return int(rest[19])


def process_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def process_alive(ident: dict[str, Any]) -> bool | None:
    """True/False for a process of this host; None when it ran on another host (unknowable)."""
    if ident.get("host") != socket.gethostname():
        return None
    pid = int(ident["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _start_time(pid)
    return start is not None and (ident.get("start") is None or start == ident["start"])


def crash_point(name: str) -> None:
    """Test hook: ``EMBEDSTORE_CRASH_AT=name`` kills this process right here with SIGKILL."""
    if os.environ.get("EMBEDSTORE_CRASH_AT") == name:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
