"""One process per device, coordinated by torch.distributed.

``--devices cuda:0,cuda:1`` (or ``cpu,cpu`` to test without GPUs) spawns one process per device
on this machine; under ``torchrun`` the ranks come from the environment instead. Units are
claimed dynamically from an atomic counter in the c10d key-value store, over one list of pending
units that every rank computes identically (largest first, so the tail is balanced by tile
count, not slide count). Each rank writes its own shards; LMDB serialises the commits.
At the end the ranks' summaries are gathered on rank 0.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from .runner import ExtractConfig, ExtractResult, run_process, usable_cores
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _claimer(store: Any, todo: list[int]) -> Any:
    def claim() -> int | None:
        j = int(store.add(CLAIM_KEY, 1)) - 1
        return todo[j] if j < len(todo) else None
    return claim


def _worker(rank: int, world: int, port: int, cfg: ExtractConfig, disc: Discovery,
            recipe: ViewRecipe | None, devices: list[str], out_dir: str) -> None:
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                          timeout=timedelta(minutes=30))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        res = _rank_body(cfg, disc, recipe, devices[rank % len(devices)], rank, world, store,
                         staged_mode())
        Path(out_dir, f"rank{rank}.json").write_text(_dump(res))
    finally:
        dist.destroy_process_group()


def _rank_body(cfg: ExtractConfig, disc: Discovery, recipe: ViewRecipe | None, device: str,
               rank: int, world: int, kv: Any, staged_mode: bool = False) -> ExtractResult:
    """One rank. With ``staged_mode`` (several nodes), only rank 0 writes the catalog: the
    other ranks stage their commits and rank 0 applies them while it works and at the end."""
    import threading

    import torch.distributed as dist

    from ..store.catalog import open_catalog
    from ..store.commit import apply_staged
    from ..store.layout import Layout
    from .runner import _pending_units
    staged = staged_mode and rank != 0
    # every rank computes the same pending list (before anything is written this run)
    todo = _pending_units(disc, Path(cfg.store), ExtractResult(), lambda u, r: None,
                          views=recipe is not None, lock=not staged)
    dist.barrier()
    stop = threading.Event()
    committer = None
    if staged_mode and rank == 0:
        lay = Layout(Path(cfg.store))

        def commit_loop() -> None:
            while not stop.wait(1.0):
                if lay.meta.exists():
                    apply_staged(lay, open_catalog(lay.root))
        committer = threading.Thread(target=commit_loop, name="embedstore-committer", daemon=True)
        committer.start()
    res = run_process(cfg, disc, recipe, device, rank=rank, world=world,
                      claim=_claimer(kv, todo), sync=dist.barrier, staged=staged)
    dist.barrier()  # every rank has staged all it wrote
    if committer is not None:
        stop.set()
        committer.join()
        apply_staged(lay, open_catalog(lay.root))
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


def run_parallel(sources: list[Any], cfg: ExtractConfig, disc: Discovery,
                 recipe: ViewRecipe | None, devices: list[str]) -> ExtractResult:
    import tempfile

    import torch.multiprocessing as mp
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return _under_torchrun(cfg, disc, recipe, devices)
    world = len(devices)
    port = _free_port()
    threads = cfg.num_threads or max(1, usable_cores() // world)
    from dataclasses import replace
    cfg = replace(cfg, num_threads=threads)
    with tempfile.TemporaryDirectory(prefix="embedstore-ranks-") as out:
        mp.start_processes(_worker, args=(world, port, cfg, disc, recipe, devices, out),
                           nprocs=world, join=True, start_method="spawn")
        total = ExtractResult()
        for r in range(world):
            part = _load(Path(out, f"rank{r}.json").read_text())
            total.merge(part)
            total.units_skipped = max(total.units_skipped, part.units_skipped)
    return total


def _under_torchrun(cfg: ExtractConfig, disc: Discovery, recipe: ViewRecipe | None,
                    devices: list[str]) -> ExtractResult:
    """Ranks from torchrun's environment; the default group's store carries the claims."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if torch.cuda.is_available() and devices[0].startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    try:
        kv = c10d._get_default_store()
        device = f"cuda:{local}" if backend == "nccl" else devices[local % len(devices)]
        res = _rank_body(cfg, disc, recipe, device, rank, world, kv, staged_mode())
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, _dump(res))
    finally:
        dist.destroy_process_group()
    total = ExtractResult()
    for p in parts:
        part = _load(p)
        total.merge(part)
        total.units_skipped = max(total.units_skipped, part.units_skipped)
    return total
