"""Bodies of ``embedstore index`` and ``embedstore search``: plain arguments in, printable text
(or JSON) out. The CLI module opens the store and parses flags; nothing here touches argv.

    embedstore index STORE [--kind auto] [--memory-budget 8G] [--target-recall 0.95] [--gpu] [--update]
    embedstore search STORE --key KEY | --image FILE | --vector FILE.npy [-k 10]
        [--exclude-same-slide] [--label L [--task T]] [--json] [--gallery OUT.png]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from embedstore.errors import VectorIndexError
from embedstore.index._vectors import StoreLike
from embedstore.index.build import build_index, update_index
from embedstore.index.choose import format_bytes
from embedstore.index.search import SearchResult, search
from embedstore.index.stored import IndexInfo
from embedstore.plots import save_gallery

__all__ = ["index_command", "search_command", "format_info", "format_results"]


def format_info(info: IndexInfo, store_path: Path | str) -> str:
    met = "met" if info.recall_met else "NOT met"
    lines = [
        f"index {Path(store_path) / 'index'}",
        f"  factory        {info.factory} ({info.kind}, {info.metric})",
        f"  rows           {info.n_covered:,} (ids up to {info.max_id:,}; "
        f"{info.n_added:,} added since the build)",
        f"  search params  {info.params}",
        f"  recall@10      {info.recall_at_10:.3f} on {info.n_queries:,} held-out queries "
        f"(target {info.target_recall}: {met})",
        f"  speed          {info.qps:,.0f} queries/s (batched)",
        f"  build          {info.build_seconds:.1f}s + {info.tune_seconds:.1f}s tuning, "
        f"{format_bytes(info.memory_bytes)} on disk",
        f"  why            {info.reason}",
    ]
    return "\n".join(lines)


def index_command(store: StoreLike, kind: str = "auto", memory_budget: str = "8G",
                  target_recall: float = 0.95, gpu: bool = False, update: bool = False,
                  as_json: bool = False) -> str:
    """Build (or with ``update``, extend) the store's index; returns the summary to print."""
    info = update_index(store) if update else build_index(
        store, kind=kind, memory_budget=memory_budget, target_recall=target_recall, gpu=gpu)
    if as_json:
        return json.dumps(info.to_json(), indent=1)
    return format_info(info, store.path)


def _result_json(hit: SearchResult) -> dict:
    return {"query_id": hit.query_id, "method": hit.method,
            "keys": list(hit.keys), "ids": [int(i) for i in hit.ids],
            "scores": [round(float(s), 6) for s in hit.scores],   # as the Python API returns them
            "neighbours": [{"id": int(i), "key": key, "score": round(float(s), 6),
                            **{name: _plain(col[j]) for name, col in hit.meta.items()}}
                           for j, (i, key, s) in enumerate(zip(hit.ids, hit.keys, hit.scores))]}


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def format_results(hits: list[SearchResult], queries: list[str]) -> str:
    out = []
    for hit, name in zip(hits, queries):
        out.append(f"query {name}  ({hit.method})")
        out.append(f"  {'#':>3} {'score':>7}  {'key':<40} {'slide':<24} {'x':>7} {'y':>7}  label")
        for j, (key, score) in enumerate(zip(hit.keys, hit.scores)):
            meta = {name: _plain(col[j]) for name, col in hit.meta.items()}
            out.append(f"  {j + 1:>3} {score:>7.4f}  {key:<40} {str(meta.get('slide')):<24} "
                       f"{str(meta.get('x')):>7} {str(meta.get('y')):>7}  "
                       f"{'' if meta.get('label') is None else meta.get('label')}")
        if not hit.keys:
            out.append("  (no tile passes the filters)")
    return "\n".join(out)


def search_command(store: StoreLike, key: str | None = None, vector_file: Path | str | None = None,
                   image_file: Path | str | None = None, k: int = 10,
                   exclude_same_slide: bool = False, label: str | None = None,
                   task: str | None = None, as_json: bool = False,
                   gallery: Path | str | None = None,
                   embed_image: Callable[[Path], np.ndarray] | None = None,
                   load_tile: Callable[[str], object] | None = None) -> str:
    """Search by tile key, by image (``embed_image`` embeds it with the store's backbone) or by
    a .npy vector file ((dim,) or (nq, dim)); returns a table or JSON to print."""
    given = [x is not None for x in (key, vector_file, image_file)]
    if sum(given) != 1:
        raise VectorIndexError("give exactly one of --key, --image or --vector")
    if task is not None and label is None:
        raise VectorIndexError("--task only applies with --label; add --label L")
    common = dict(k=k, exclude_same_slide=exclude_same_slide, label=label, task=task)
    if key is not None:
        hits = search(store, keys=[key], **common)      # type: ignore[arg-type]
        names = [key]
    else:
        if vector_file is not None:
            vectors = np.load(Path(vector_file))
            names = [f"{vector_file}[{i}]" for i in range(1 if vectors.ndim == 1 else len(vectors))]
        else:
            if embed_image is None:
                raise VectorIndexError("searching by image needs the store's backbone; the CLI passes "
                                  "embed_image")
            vectors = np.asarray(embed_image(Path(str(image_file))))
            names = [str(image_file)]
        hits = search(store, vectors=vectors, **common)  # type: ignore[arg-type]
    if gallery is not None:
        save_gallery(hits, names, Path(gallery), load_tile)
    if as_json:
        return json.dumps([{"query": name, **_result_json(hit)} for hit, name in zip(hits, names)],
                          indent=1)
    return format_results(hits, names)
