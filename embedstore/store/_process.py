"""Process identity (who owns a temporary file, and is it still alive) and crash points.

Publishing files whole lives in :mod:`embedstore.store.atomic`; the shard sink and seal in
:mod:`embedstore.store._shardfile`."""
from __future__ import annotations

import os
import socket
from typing import Any

__all__ = ["process_identity", "process_alive", "crash_point"]


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
