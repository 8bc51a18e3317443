"""What DataLoader workers do: decode and crop tiles (and make their views).

The sampler (main process) yields batches of *tile specs* — plain tuples that say everything a
worker needs — so one persistent DataLoader serves every unit of the run, whatever was planned
after its workers started. Workers open slides lazily (after the fork) and keep a few open.
A tile that cannot be read comes back flagged with the reason; the run goes on. A tile file
is resized to the store's tile side when each of its sides is within ``MAX_FILE_SCALE`` of
it, and refused (from its header, before decoding) when farther off. With no worker
processes (``workers=0``) a batch is decoded by a few threads of the main process instead
(JPEG decoding and resizing release the GIL), so decoding does not leave cores idle, and
``DecodeAhead`` decodes the next batch in one helper thread while the model runs this one.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from ..errors import ShapeError, SourceError
from .transforms import ViewRecipe, make_views

if TYPE_CHECKING:
    from .wsi import SlideReader

__all__ = ["TileSpec", "TileDataset", "DecodeAhead", "collate", "check_file_size", "MAX_FILE_SCALE"]

MAX_FILE_SCALE = 4.0   # a tile file may be at most this much larger or smaller than the store's tiles


def check_file_size(width: int, height: int, side: int) -> None:
    """Refuse (SourceError, one line) a ``width`` x ``height`` file more than ``MAX_FILE_SCALE``
    times larger or smaller than the store's ``side``-px tiles on either side."""
    if all(side / MAX_FILE_SCALE <= v <= side * MAX_FILE_SCALE for v in (width, height)):
        return
    raise SourceError(f"image is {width}x{height} px, more than {MAX_FILE_SCALE:g}x off the store's "
                      f"{side} px tiles; cut it into tiles (or extract it as a slide), or use a store "
                      f"made with --tile-size near its size")


class TileSpec(NamedTuple):
    unit: int            # index of the unit in the run's unit list
    key: str             # tile key
    path: str            # image file or slide file
    x: int = -1          # level-0 x (slides)
    y: int = -1
    level: int = 0       # pyramid level to read from
    read_w: int = 0      # size read at that level (then resized to tile_size)
    read_h: int = 0
    tile_size: int = 0   # output side in pixels (0: the file's own size)


class TileDataset(torch.utils.data.Dataset):
    """Map-style dataset whose "indices" are :class:`TileSpec` tuples."""

    def __init__(self, views: ViewRecipe | None = None, file_size: int | None = None,
                 max_open_slides: int = 4, decode_threads: int = 1) -> None:
        self.views = views
        self.file_size = file_size
        self.max_open = max_open_slides
        self.decode_threads = decode_threads   # threads per batch in the main process
        self._slides: OrderedDict[str, SlideReader] = OrderedDict()
        self._retired: list[SlideReader] = []   # evicted readers, closed once no batch uses them
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:   # to worker processes: no threads, no handles
        return {"views": self.views, "file_size": self.file_size, "max_open": self.max_open,
                "decode_threads": 1}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["views"], state["file_size"], state["max_open"],  # type: ignore[misc]
                      state["decode_threads"])

    def __len__(self) -> int:  # not used: the sampler drives
        return 0

    def _reader(self, path: str) -> SlideReader:
        with self._lock:
            r = self._slides.get(path)
            if r is None:
                from .wsi import SlideReader
                r = SlideReader(path)
                self._slides[path] = r
                while len(self._slides) > self.max_open:   # another thread may still read it
                    self._retired.append(self._slides.popitem(last=False)[1])
            else:
                self._slides.move_to_end(path)
            return r

    def close(self) -> None:
        """Close the slides and threads of this process (workers' copies go when they exit)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        while self._slides:
            self._slides.popitem(last=False)[1].close()
        self._close_retired()

    def _close_retired(self) -> None:
        while self._retired:
            self._retired.pop().close()

    def __getitems__(self, specs: list[TileSpec]
                     ) -> list[tuple[np.ndarray | None, TileSpec, str | None, float]]:
        """A batch (torch's DataLoader calls this when defined): in a worker process one tile
        after another, in the main process across ``decode_threads`` threads, each decoding
        one contiguous run of the batch. Neighbouring tiles share a slide's compressed chunks
        (a 224 px tile at a 256 px JPEG tiling spans up to four), and a thread decodes each
        chunk of its run once, then finds it in the reader's cache; handed out tile by tile,
        both threads decoded the same chunks at once. 2 threads, batches of 64, one 40k x 30k
        JPEG slide: tile by tile 2,985-3,432 tiles/s (one thread: 3,210-3,712), runs 4,870-5,543."""
        if self.decode_threads <= 1 or len(specs) < 2 or torch.utils.data.get_worker_info() is not None:
            out = self._read_run(specs)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="embedstore-decode")
            step = -(-len(specs) // min(self.decode_threads, len(specs)))
            runs = [specs[i:i + step] for i in range(0, len(specs), step)]
            out = [item for run in self._pool.map(self._read_run, runs) for item in run]
        self._close_retired()
        return out

    def _read_run(self, specs: list[TileSpec]) -> list[tuple[np.ndarray | None, TileSpec, str | None, float]]:
        return [self[s] for s in specs]

    def _read(self, s: TileSpec) -> np.ndarray:
        from PIL import Image
        if s.x >= 0:
            tile = self._reader(s.path).read_region(s.x, s.y, s.level, s.read_w, s.read_h)
            if tile.shape[:2] != (s.tile_size, s.tile_size):
                tile = np.asarray(Image.fromarray(tile).resize((s.tile_size, s.tile_size),
                                                               Image.Resampling.LANCZOS))
            return tile
        with Image.open(s.path) as src:
            size = self.file_size or s.tile_size
            if size:
                check_file_size(src.size[0], src.size[1], size)     # from the header: never decode a huge file
            im = src.convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im)

    def __getitem__(self, s: TileSpec) -> tuple[np.ndarray | None, TileSpec, str | None, float]:
        t0 = time.perf_counter()
        try:
            tile = self._read(s)
            if self.views is not None and self.views.k:
                tile = np.concatenate([tile[None], make_views(tile, self.views, s.key)])
            err = None
        except Exception as e:  # an unreadable input is recorded, never fatal
            tile, err = None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
        return tile, s, err, time.perf_counter() - t0


def collate(items: list[tuple[np.ndarray | None, TileSpec, str | None, float]]) -> dict[str, Any]:
    ok = [(tile, spec) for tile, spec, _, _ in items if tile is not None]
    shapes = {tile.shape for tile, _ in ok}
    if len(shapes) > 1:  # files of several sizes: the dataset resizes to one, so this is a bug
        raise ShapeError(f"tiles of different shapes in one batch: {sorted(shapes)}")
    tiles = torch.from_numpy(np.stack([tile for tile, _ in ok])) if ok else torch.empty(0, dtype=torch.uint8)
    return {"tiles": tiles, "specs": [spec for _, spec in ok],
            "failed": [(it[1], it[2]) for it in items if it[0] is None],
            "read_s": sum(it[3] for it in items)}


def lower_thread_priority(nice: int = 19) -> None:
    """Run the calling thread at the lowest CPU priority (Linux: nice 19 and the ``SCHED_IDLE``
    policy on its thread id), so it takes the cores when the model leaves them idle instead of
    slowing its forward pass; threads it starts afterwards inherit it. Best effort: a no-op
    where not supported. ``SCHED_IDLE`` (weight 3 against nice 19's 15, and never preempting a
    normal thread on wake-up) took decoding ahead from 0.82x to 0.87x the model alone (2 cores,
    bench_bigslide, 2026-12-04); a thread cannot raise itself back without privileges, so only
    threads made for this are lowered."""
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError):
        pass
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


class DecodeAhead:
    """The batches of ``sampler`` (lists of tile specs), decoded up to ``depth`` batches ahead
    in one helper thread: the loader of a run without worker processes.

    The sampler is advanced in the iterating thread only (it claims and finishes work items,
    records errors: pipeline and writer state); the helper only does what the DataLoader's
    fetcher does, ``dataset.__getitems__`` + ``collate`` (+ pinning), pure work on its specs.
    One thread decodes the queued batches in order, so the dataset's slide readers serve one
    batch at a time. Leaving the iteration (exhausted, an exception, Ctrl-C, ``close``) drops
    the queued batches, waits for the one in flight and stops the thread, so the dataset can
    be closed after it."""

    def __init__(self, dataset: TileDataset, sampler: Iterable[list[TileSpec]],
                 pin_memory: bool = False, low_priority: bool = False, depth: int = 1) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.pin_memory = pin_memory
        self.low_priority = low_priority
        self.depth = depth
        self._pool: ThreadPoolExecutor | None = None
        self._busy: deque[Future[dict[str, Any]]] = deque()   # decoded or queued, in order

    def _fetch(self, specs: list[TileSpec]) -> dict[str, Any]:
        batch = collate(self.dataset.__getitems__(specs))
        if self.pin_memory and len(batch["tiles"]):
            batch["tiles"] = batch["tiles"].pin_memory()
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        specs = iter(self.sampler)
        self._pool = pool = ThreadPoolExecutor(
            1, thread_name_prefix="embedstore-ahead",
            initializer=lower_thread_priority if self.low_priority else None)
        busy = self._busy
        try:
            for nxt in specs:                  # here, while the helper decodes the batches before
                busy.append(pool.submit(self._fetch, nxt))
                if len(busy) > self.depth:
                    yield busy.popleft().result()
            while busy:
                yield busy.popleft().result()
        finally:
            self.close()
            close = getattr(specs, "close", None)
            if close is not None:              # the sampler's own look-ahead stops too
                close()

    def close(self) -> None:
        """Wait for the batch in flight (its result and those queued are dropped) and stop the
        helper thread."""
        for f in self._busy:
            f.cancel()
        self._busy.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
