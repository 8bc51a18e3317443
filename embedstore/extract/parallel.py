"""One process per device, coordinated by torch.distributed.

``--devices cuda:0,cuda:1`` (or ``cpu,cpu`` to test without GPUs) spawns one process per device
on this machine; under ``torchrun`` the ranks come from the environment instead. Work items
are claimed dynamically from an atomic counter in the c10d key-value store, over one work list
(``pending.read_work``) that every rank computes identically (largest first, so the tail is balanced by tile
count, not slide count). Each rank writes its own shards; LMDB serialises the commits.
At the end the ranks' summaries are gathered on rank 0.

Network: on one machine (``--devices``) nothing listens beyond the loopback and no name is
resolved. The ranks' key-value store is a c10d ``FileStore`` in the run's temporary folder
(torch's ``TCPStore`` server listens on every interface, ``::``, and its clients look up the
peer's name: a DNS query even for 127.0.0.1), and gloo is given the loopback interface
(``GLOO_SOCKET_IFNAME``, unless already set), so it binds 127.0.0.1 and does not resolve the
host name to pick an interface. Across nodes (``torchrun``) the address is the one the user gives: torchrun's
``--master-addr``/``MASTER_ADDR`` (or ``--rdzv-endpoint``) for the store, and
``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` for the interface the ranks talk over; a
single-node torchrun run (``LOCAL_WORLD_SIZE == WORLD_SIZE``) gets the loopback for gloo too.
"""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..store import apply_staged_commits
from ..store.atomic import atomic_write_text
from ..store.layout import Layout
from .config import ExtractConfig, ExtractResult, usable_cores
from .pending import read_work
from .runner import run_process
from .sources import Discovery
from .transforms import ViewRecipe

__all__ = ["run_parallel", "plan_claims"]

CLAIM_KEY = "embedstore/next-unit"


def plan_claims(weights: list[int], world: int) -> list[list[int]]:
    """The assignment dynamic claiming converges to when every unit costs its weight:
    largest first, each to the least loaded rank (LPT). Pure; used to reason about balance."""
    load = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(weights)), key=lambda j: -weights[j]):
        r = min(range(world), key=lambda q: load[q])
        out[r].append(i)
        load[r] += weights[i]
    return out


def loopback_interface() -> str:
    """The name of the loopback interface (``lo`` on Linux, ``lo0`` on macOS)."""
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in names if n.startswith("lo")), "lo")


def _local_only() -> None:
    """Gloo talks over the loopback (no host-name lookup) unless the user chose an interface."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def _claimer(kv: Any, n: int) -> Callable[[], int | None]:
    """Claims from the counter in the c10d store ``kv``: the next index into the work list."""
    def claim() -> int | None:
        j = int(kv.add(CLAIM_KEY, 1)) - 1
        return j if j < n else None
    return claim


def _worker(rank: int, world: int, cfg: ExtractConfig, disc: Discovery,
            recipe: ViewRecipe | None, devices: list[str], out_dir: str) -> None:
    import torch.distributed as dist
    _local_only()
    kv = dist.FileStore(str(Path(out_dir, "c10d-store")), world)
    dist.init_process_group("gloo", store=kv, rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    try:
        res = _rank_body(cfg, disc, recipe, devices[rank % len(devices)], rank, world, kv,
                         staged_mode())
        atomic_write_text(Path(out_dir, f"rank{rank}.json"), _dump(res))
    finally:
        dist.destroy_process_group()


class _Committer:
    """Rank 0 of a staged run: applies the other ranks' staged commits every second."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="embedstore-committer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            if Layout(self.store).meta.exists():
                apply_staged_commits(self.store)

    def close(self) -> None:
        """Stop, then apply what is left (every rank has staged all it wrote)."""
        self._stop.set()
        self._thread.join()
        apply_staged_commits(self.store)


def _rank_body(cfg: ExtractConfig, disc: Discovery, recipe: ViewRecipe | None, device: str,
               rank: int, world: int, kv: Any, staged_mode: bool = False) -> ExtractResult:
    """One rank. With ``staged_mode`` (several nodes), only rank 0 writes the catalog: the
    other ranks stage their commits and rank 0 applies them while it works and at the end."""
    import torch.distributed as dist
    staged = staged_mode and rank != 0
    # every rank computes the same work list (before anything is written this run)
    work = read_work(disc, cfg.store, views=recipe is not None, lock=not staged)
    dist.barrier()
    committer = _Committer(Path(cfg.store)) if staged_mode and rank == 0 else None
    res = run_process(cfg, disc, recipe, device, rank=rank, world=world, work=work,
                      claim=_claimer(kv, len(work.items)), sync=dist.barrier, staged=staged)
    dist.barrier()  # every rank has staged all it wrote
    if committer is not None:
        committer.close()
    dist.barrier()
    return res


def staged_mode() -> bool:
    """Several nodes share the run (or EMBEDSTORE_COMMIT=staged asks for it, for testing)."""
    if os.environ.get("EMBEDSTORE_COMMIT") == "staged":
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("LOCAL_WORLD_SIZE", world)) != world


def _dump(res: ExtractResult) -> str:
    import json
    from dataclasses import asdict
    return json.dumps(asdict(res))


def _load(text: str) -> ExtractResult:
    import json
    d = json.loads(text)
    d["errors"] = [tuple(e) for e in d["errors"]]
    return ExtractResult(**d)


def _combine(dumps: list[str]) -> ExtractResult:
    """The run's result from its ranks' (every rank skipped the same units done before)."""
    total = ExtractResult()
    for d in dumps:
        part = _load(d)
        total.merge(part)
        total.units_skipped = max(total.units_skipped, part.units_skipped)
    return total


def run_parallel(sources: list[Any], cfg: ExtractConfig, disc: Discovery,
                 recipe: ViewRecipe | None, devices: list[str]) -> ExtractResult:
    import tempfile

    import torch.multiprocessing as mp
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return _under_torchrun(cfg, disc, recipe, devices)
    world = len(devices)
    threads = cfg.num_threads or max(1, usable_cores() // world)
    from dataclasses import replace
    cfg = replace(cfg, num_threads=threads)
    with tempfile.TemporaryDirectory(prefix="embedstore-ranks-") as out:
        mp.start_processes(_worker, args=(world, cfg, disc, recipe, devices, out),
                           nprocs=world, join=True, start_method="spawn")
        return _combine([Path(out, f"rank{r}.json").read_text() for r in range(world)])


def _under_torchrun(cfg: ExtractConfig, disc: Discovery, recipe: ViewRecipe | None,
                    devices: list[str]) -> ExtractResult:
    """Ranks from torchrun's environment; the default group's store carries the claims."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if torch.cuda.is_available() and devices[0].startswith("cuda") else "gloo"
    if int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world:   # one node: the loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    dist.init_process_group(backend)
    try:
        kv = c10d._get_default_store()
        device = f"cuda:{local}" if backend == "nccl" else devices[local % len(devices)]
        res = _rank_body(cfg, disc, recipe, device, rank, world, kv, staged_mode())
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, _dump(res))
    finally:
        dist.destroy_process_group()
    return _combine(parts)
