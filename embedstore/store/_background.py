"""The writer's background thread: operations queued by the caller, run in order by one thread,
an error there re-raised at the caller's next call."""
from __future__ import annotations

import queue
import threading
from typing import Any

from ..errors import WriterError

__all__ = ["Background"]


class Background:
    """Mixin: ``_submit(op)`` queues ``op`` for ``_do`` (run inline when there is no thread)."""
    _q: queue.Queue[Any] | None
    _thread: threading.Thread | None
    _exc: BaseException | None
    _closed: bool

    def _do(self, op: tuple[str, Any, Any]) -> None:
        raise NotImplementedError

    def _submit(self, op: tuple[str, Any, Any]) -> None:
        if self._q is None:
            self._do(op)
            return
        while True:
            self._raise_pending()
            try:
                self._q.put(op, timeout=0.5)
                return
            except queue.Full:
                if self._thread is not None and not self._thread.is_alive():
                    self._raise_pending()
                    raise WriterError("background writer stopped unexpectedly")

    def _wait(self) -> None:
        if self._q is not None:
            done = threading.Event()
            self._submit(("sync", None, done))
            while not done.wait(0.5):
                if self._thread is not None and not self._thread.is_alive():
                    break
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._exc is not None:
            e, self._exc = self._exc, None
            self._closed = True
            raise WriterError(str(e)) from e

    def _run(self) -> None:
        assert self._q is not None
        while True:
            op = self._q.get()
            if op[0] == "stop":
                return
            if self._exc is not None:
                if op[0] == "sync":
                    op[2].set()
                continue
            try:
                self._do(op)
            except BaseException as e:  # re-raised in the caller
                self._exc = e

