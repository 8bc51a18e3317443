"""Bodies of ``embedstore index`` and ``embedstore search``: plain arguments in, results out.
The CLI opens the store, parses flags and prints what these return; nothing here touches argv
or formats output.

    embedstore index STORE [--kind auto] [--memory-budget 8G] [--target-recall 0.95] [--gpu] [--update]
        [--on-disk | --in-memory]
    embedstore search STORE --key KEY | --image FILE | --vector FILE.npy [-k 10]
        [--exclude-same-slide] [--label L [--task T]] [--json] [--gallery OUT.png]
        [--slide-heatmap SLIDE [--heatmap-out PNG]]
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, cast

import numpy as np

from embedstore.errors import VectorIndexError
from embedstore.index.build import build_index, update_index
from embedstore.index.search import SearchResult, search
from embedstore.index.similarity import Thumbnail, similarity_heatmap
from embedstore.index.stored import IndexInfo
from embedstore.plots import save_gallery
from embedstore.store.protocol import StoreLike

if TYPE_CHECKING:
    from embedstore.store import Store

__all__ = ["index_command", "search_command", "SearchRun"]


def index_command(store: StoreLike, kind: str = "auto", memory_budget: str = "8G",
                  target_recall: float = 0.95, gpu: bool = False,
                  update: bool = False, on_disk: bool | None = None) -> IndexInfo:
    """Build (or with ``update``, extend) the store's index; returns what ``index.json`` records.
    ``on_disk``: True / False forces / forbids memory-mapped on-disk lists; None lets the build
    choose them when no in-memory index fits the budget."""
    if update:
        return update_index(store)
    return build_index(store, kind=kind, memory_budget=memory_budget, target_recall=target_recall,
                       gpu=gpu, on_disk=on_disk)


@dataclass(frozen=True)
class SearchRun:
    """What one ``embedstore search`` found and wrote."""

    queries: list[str]              # a name per query: the key, FILE.npy[i] or the image path
    hits: list[SearchResult]        # aligned with queries, best first
    gallery: Path | None = None     # the neighbours' tiles, when asked for
    heatmap: Path | None = None     # the first query's similarity over a slide, when asked for


def _queries(store: StoreLike, key: str | None, vector_file: Path | str | None,
             image_file: Path | str | None,
             embed_image: Callable[[Path], np.ndarray] | None) -> tuple[list[str], np.ndarray | None]:
    """(query names, vectors (nq, dim) or (dim,); None when the query is the stored ``key``)."""
    given = [x is not None for x in (key, vector_file, image_file)]
    if sum(given) != 1:
        raise VectorIndexError("give exactly one of --key, --image or --vector")
    if key is not None:
        return [key], None
    if vector_file is not None:
        try:
            vectors = np.load(Path(vector_file))
        except (ValueError, OSError, EOFError) as exc:
            raise VectorIndexError(f"{vector_file} is not a readable .npy array "
                                   f"({' '.join(str(exc).split())[:160]}); save the query vectors "
                                   "with numpy.save") from None
        if not isinstance(vectors, np.ndarray):
            raise VectorIndexError(f"{vector_file} holds several arrays (.npz); save one (nq, dim) "
                                   "array with numpy.save")
        return [f"{vector_file}[{i}]" for i in range(1 if vectors.ndim == 1 else len(vectors))], vectors
    if embed_image is None:
        raise VectorIndexError("searching by image needs the store's backbone; the CLI passes "
                               "embed_image")
    return [str(image_file)], np.asarray(embed_image(Path(str(image_file))))


def search_command(store: StoreLike, key: str | None = None, vector_file: Path | str | None = None,
                   image_file: Path | str | None = None, k: int = 10,
                   exclude_same_slide: bool = False, label: str | None = None,
                   task: str | None = None, gallery: Path | str | None = None,
                   embed_image: Callable[[Path], np.ndarray] | None = None,
                   load_tile: Callable[[str], object] | None = None,
                   slide_heatmap: str | None = None, heatmap_out: Path | str = "similarity.png",
                   thumbnail: Thumbnail | None = None) -> SearchRun:
    """Search by tile key, by image (``embed_image`` embeds it with the store's backbone) or by
    a .npy vector file ((dim,) or (nq, dim)). ``gallery``: also draw the neighbours' tiles
    (``load_tile(key)`` reads one); ``slide_heatmap``: also draw the first query's similarity
    to every tile of that slide over its thumbnail (``thumbnail(slide)`` reads it)."""
    if task is not None and label is None:
        raise VectorIndexError("--task only applies with --label; add --label L")
    names, vectors = _queries(store, key, vector_file, image_file, embed_image)
    common = dict(k=k, exclude_same_slide=exclude_same_slide, label=label, task=task)
    if vectors is None:
        hits = search(store, keys=[str(key)], **common)  # type: ignore[arg-type]
    else:
        hits = search(store, vectors=vectors, **common)  # type: ignore[arg-type]
    drawn = save_gallery(hits, names, Path(gallery), load_tile) if gallery is not None else None
    heatmap = None
    if slide_heatmap is not None:
        if thumbnail is None:
            raise VectorIndexError("a slide heatmap needs the slide's thumbnail; the CLI passes "
                                   "thumbnail")
        first = store.gather(store.ids([str(key)])) if vectors is None else vectors
        query = np.asarray(first, np.float32).reshape(-1, store.dim)[0]
        # a slide's bag is the real store's (StoreLike has no slide())
        heatmap = similarity_heatmap(cast("Store", store), query, slide_heatmap, Path(heatmap_out),
                                     thumbnail)
    return SearchRun(names, hits, drawn, heatmap)
