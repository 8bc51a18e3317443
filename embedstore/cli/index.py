"""``embedstore index`` and ``embedstore search``: CLI over :mod:`embedstore.index.jobs`, and
how their results read as text or JSON."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from ..sizes import format_bytes
from ._app import COUNT, FRACTION, echo_json, json_option, main

if TYPE_CHECKING:
    from ..index import IndexInfo, SearchResult

__all__ = ["index", "search", "format_info", "format_candidates", "format_results", "results_json"]


def format_info(info: IndexInfo, store_path: Path | str) -> str:
    """The index record as the text ``embedstore index`` prints."""
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
    if info.on_disk:
        lines.insert(2, f"  storage        on disk: inverted lists {info.ivfdata} "
                        f"({format_bytes(info.ivfdata_bytes)}), memory-mapped at search")
    return "\n".join(lines + format_candidates(info))


def format_candidates(info: IndexInfo) -> list[str]:
    """The auto chooser's table: every candidate measured on the sample, the chosen one starred
    (its recall on the full-size index at the sample's parameters beside the sample's, and the
    QPS it reached there once tuned; a runner-up built to check the pick has them too); empty
    when none was measured."""
    if not info.candidates:
        return []
    lines = [f"  candidates     measured on a {info.sample_size:,}-row sample with the held-out "
             "queries (QPS predicted at full size)",
             f"    {'':1} {'index':<28} {'params':<14} {'recall':>7} {'full':>6} {'QPS':>10} "
             f"{'sample QPS':>11} {'full QPS':>10} {'memory':>10} {'build s':>8}"]
    for row in info.candidates:
        knobs = " ".join(f"{key}={val}" for key, val in row.get("params", {}).items()
                         if key != "k_factor" or val != 1)
        full = f"{row['full_recall']:.3f}" if "full_recall" in row else ""
        full_qps = f"{row['full_qps']:,.0f}" if "full_qps" in row else ""
        lines.append(f"    {'*' if row.get('chosen') else ' '} {row['label']:<28} {knobs:<14} "
                     f"{row['recall']:>7.3f} {full:>6} {row['qps']:>10,.0f} "
                     f"{row.get('sample_qps', 0.0):>11,.0f} {full_qps:>10} "
                     f"{format_bytes(row['memory_bytes']):>10} "
                     f"{row.get('build_seconds', 0.0):>8.1f}"
                     + (f"  ({row['error']})" if row.get("error") else ""))
    return lines


def format_results(hits: list[SearchResult], queries: list[str]) -> str:
    """A table per query: rank, score, key, slide, x, y, label."""
    from ..index.search import json_value
    out = []
    for hit, name in zip(hits, queries):
        out.append(f"query {name}  ({hit.method})")
        out.append(f"  {'#':>3} {'score':>7}  {'key':<40} {'slide':<24} {'x':>7} {'y':>7}  label")
        for j, (key, score) in enumerate(zip(hit.keys, hit.scores)):
            meta = {col: json_value(vals[j]) for col, vals in hit.meta.items()}
            out.append(f"  {j + 1:>3} {score:>7.4f}  {key:<40} {str(meta.get('slide')):<24} "
                       f"{str(meta.get('x')):>7} {str(meta.get('y')):>7}  "
                       f"{'' if meta.get('label') is None else meta.get('label')}")
        if not hit.keys:
            out.append("  (no tile passes the filters)")
    return "\n".join(out)


def results_json(hits: list[SearchResult], queries: list[str]) -> list[dict[str, Any]]:
    """One dict per query: its name, method, keys, ids, scores and each neighbour's metadata."""
    from ..index.search import neighbours_json
    return [{"query": name, "query_id": hit.query_id, "method": hit.method,
             "keys": list(hit.keys), "ids": [int(i) for i in hit.ids],
             "scores": [round(float(s), 6) for s in hit.scores],   # as the Python API returns them
             "neighbours": neighbours_json(hit)}
            for hit, name in zip(hits, queries)]


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["auto", "flat", "hnsw", "ivf-flat", "ivf-sq8", "ivf-pq"]),
              default="auto", show_default=True,
              help="auto: exact below 20k rows, else every kind that fits the budget is measured on a "
                   "sample and the fastest at the target recall is built (the table is printed).")
@click.option("--memory-budget", default="8G", show_default=True, help="RAM the index may use (e.g. 512M, 8G).")
@click.option("--target-recall", type=FRACTION, metavar="R", default=0.95, show_default=True,
              help="recall@10 vs exact search, measured on held-out queries; search parameters are tuned to it.")
@click.option("--gpu", is_flag=True, help="Build and search with faiss-gpu (the `gpu` extra).")
@click.option("--update", is_flag=True, help="Add rows committed since the build, without retraining.")
@click.option("--on-disk/--in-memory", "on_disk", default=None,
              help="--on-disk: an IVF whose inverted lists live in STORE/index and are memory-mapped "
                   "(for stores larger than RAM); --in-memory: never. Default: on disk only when no "
                   "in-memory index fits --memory-budget.")
@json_option
def index(store: Path, kind: str, memory_budget: str, target_recall: float, gpu: bool, update: bool,
          on_disk: bool | None, as_json: bool) -> None:
    """Build the store's FAISS index (cosine), measure its recall@10 and tune it; saved in STORE/index/."""
    from ..index.jobs import index_command
    from ..store import open_store
    info = index_command(open_store(store), kind=kind, memory_budget=memory_budget,
                         target_recall=target_recall, gpu=gpu, update=update, on_disk=on_disk)
    if as_json:
        echo_json(info.to_json())
    else:
        click.echo(format_info(info, store))


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--key", help="Query by a stored tile key (it finds itself first).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Query by an image file, embedded with the store's own backbone.")
@click.option("--vector", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Query by a .npy vector (dim,) or (nq, dim).")
@click.option("-k", type=COUNT, metavar="K", default=10, show_default=True, help="Neighbours per query.")
@click.option("--exclude-same-slide", is_flag=True, help="Leave out tiles of the query's own slide (leakage).")
@click.option("--label", help="Only tiles with this label ...")
@click.option("--task", help="... of this task (default: the labels recorded at extraction).")
@json_option
@click.option("--gallery", type=click.Path(path_type=Path), help="PNG of the neighbours' tiles with their scores.")
@click.option("--slide-heatmap", help="Also draw the query's similarity to every tile of this slide over its thumbnail.")
@click.option("--heatmap-out", type=click.Path(path_type=Path), default="similarity.png", show_default=True)
def search(store: Path, key: str | None, image: Path | None, vector: Path | None, k: int,
           exclude_same_slide: bool, label: str | None, task: str | None, as_json: bool,
           gallery: Path | None, slide_heatmap: str | None, heatmap_out: Path) -> None:
    """Find the tiles most similar to a tile, an image or a vector: a table of rank, similarity,
    key, slide, x, y, label (or --json: keys, ids, scores and metadata)."""
    from ..backbones.images import image_embedder
    from ..extract.readback import read_tiles, slide_thumbnail
    from ..index.jobs import search_command
    from ..store import open_store
    st = open_store(store)
    run = search_command(
        st, key=key, vector_file=vector, image_file=image, k=k, exclude_same_slide=exclude_same_slide,
        label=label, task=task, gallery=gallery, slide_heatmap=slide_heatmap, heatmap_out=heatmap_out,
        embed_image=image_embedder(st.meta.backbone, st.meta.weights_sha256,
                                   (st.meta.tile or {}).get("tile_size"), st.path),
        load_tile=lambda k_: read_tiles(st, st.ids([k_]))[0],
        thumbnail=lambda slide: slide_thumbnail(st, slide))
    if as_json:
        echo_json(results_json(run.hits, run.queries))
        return
    click.echo(format_results(run.hits, run.queries))
    if run.gallery:
        click.echo(f"gallery: {run.gallery}")
    if run.heatmap:
        click.echo(f"similarity heatmap over {slide_heatmap}: {run.heatmap}")
