"""``embedstore index`` and ``embedstore search``: CLI over :mod:`embedstore.index`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from ._app import handled, main


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["auto", "flat", "hnsw", "ivf-flat", "ivf-pq"]), default="auto",
              show_default=True, help="auto: exact below ~100k rows, else what meets the recall in the budget.")
@click.option("--memory-budget", default="8G", show_default=True, help="RAM the index may use (e.g. 512M, 8G).")
@click.option("--target-recall", type=float, default=0.95, show_default=True,
              help="recall@10 vs exact search, measured on held-out queries; search parameters are tuned to it.")
@click.option("--gpu", is_flag=True, help="Build and search with faiss-gpu (the `gpu` extra).")
@click.option("--update", is_flag=True, help="Add rows committed since the build, without retraining.")
@click.option("--json", "as_json", is_flag=True, help="Print the index record as JSON.")
@handled
def index(store: Path, kind: str, memory_budget: str, target_recall: float, gpu: bool, update: bool,
          as_json: bool) -> None:
    """Build the store's FAISS index (cosine), measure its recall@10 and tune it; saved in STORE/index/."""
    from ..index.jobs import index_command
    from ..store import open_store
    click.echo(index_command(open_store(store), kind=kind, memory_budget=memory_budget,
                             target_recall=target_recall, gpu=gpu, update=update, as_json=as_json))


def _embedder(st: Any) -> Any:
    """Embed an image file with the store's own backbone (from STORE.json)."""
    def embed(path: Path) -> np.ndarray:
        from PIL import Image

        from ..backbones import BackboneSpec, create_backbone
        from ..errors import BackboneMismatchError
        spec = BackboneSpec.from_dict(st.meta.backbone)
        rand = st.meta.weights_sha256.startswith("random-init")
        bb = create_backbone(spec, random_init=rand)
        if bb.weights_sha256 != st.meta.weights_sha256:
            raise BackboneMismatchError(f"the weights found for {spec.name!r} differ from the ones that "
                                        f"made {st.path} (sha256 {st.meta.weights_sha256[:12]}...)")
        img = np.asarray(Image.open(path).convert("RGB"))
        size = (st.meta.tile or {}).get("tile_size")
        if size and img.shape[:2] != (size, size):
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
        return bb.embed(img[None]).numpy()[0]
    return embed


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--key", help="Query by a stored tile key (it finds itself first).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Query by an image file, embedded with the store's own backbone.")
@click.option("--vector", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Query by a .npy vector (dim,) or (nq, dim).")
@click.option("-k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option("--exclude-same-slide", is_flag=True, help="Leave out tiles of the query's own slide (leakage).")
@click.option("--label", help="Only tiles with this label ...")
@click.option("--task", help="... of this task (default: the labels recorded at extraction).")
@click.option("--json", "as_json", is_flag=True, help="Print keys, ids, scores and metadata as JSON.")
@click.option("--gallery", type=click.Path(path_type=Path), help="PNG of the neighbours' tiles with their scores.")
@click.option("--slide-heatmap", help="Also draw the query's similarity to every tile of this slide over its thumbnail.")
@click.option("--heatmap-out", type=click.Path(path_type=Path), default="similarity.png", show_default=True)
@handled
def search(store: Path, key: str | None, image: Path | None, vector: Path | None, k: int,
           exclude_same_slide: bool, label: str | None, task: str | None, as_json: bool,
           gallery: Path | None, slide_heatmap: str | None, heatmap_out: Path) -> None:
    """Find the tiles most similar to a tile, an image or a vector: a table of rank, similarity,
    key, slide, x, y, label (or --json)."""
    from ..index.jobs import search_command
    from ..store import open_store
    from ..extract.readback import read_tiles
    st = open_store(store)

    def load_tile(k_: str) -> Any:
        return read_tiles(st, st.ids([k_]))[0]
    click.echo(search_command(st, key=key, vector_file=vector, image_file=image, k=k,
                              exclude_same_slide=exclude_same_slide, label=label, task=task,
                              as_json=as_json, gallery=gallery, embed_image=_embedder(st),
                              load_tile=load_tile))
    if gallery and not as_json:
        click.echo(f"gallery: {gallery}")
    if slide_heatmap:
        q = (st.get([key]) if key else np.load(vector) if vector else _embedder(st)(image)[None])
        out = similarity_heatmap(st, np.asarray(q, np.float32).reshape(-1, st.dim)[0], slide_heatmap, heatmap_out)
        if not as_json:
            click.echo(f"similarity heatmap over {slide_heatmap}: {out}")


def similarity_heatmap(st: Any, query: np.ndarray, slide: str, out: Path) -> Path:
    """Cosine similarity of ``query`` (dim,) to every tile of ``slide``, drawn over its thumbnail
    ("where on this slide is tissue like this?"), rescaled to [0, 1] over the slide."""
    from ..plots import render_heatmap
    from ..extract.readback import slide_thumbnail
    bag = st.slide(slide)
    e = bag.emb.astype(np.float32)
    sims = e @ query / (np.linalg.norm(e, axis=1) * np.linalg.norm(query) + 1e-12)
    lo, hi = float(sims.min()), float(sims.max())
    values = (sims - lo) / (hi - lo) if hi > lo else np.ones_like(sims)
    thumb, ds = slide_thumbnail(st, slide)
    return render_heatmap(thumb, ds, bag.coords, values, out,
                          title=f"{slide}: similarity to the query (cosine {lo:.2f} .. {hi:.2f})",
                          label="similarity (min..max of the slide)")
