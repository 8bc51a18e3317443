"""The slide endpoints of ``embedstore serve``: thumbnail, info, the tile under a point, DeepZoom
(the ``.dzi`` descriptor and its tiles, as OpenSeadragon asks for them), and the similarity and
prediction heatmaps (RGBA PNG overlays the size of the thumbnail).

OpenSeadragon opens ``.../slide/<slide>/dzi`` and fetches its tiles from the sibling folder
``.../slide/<slide>/dzi_files/<level>/<col>_<row>.jpeg``. Every slide is looked up in the store
(404 otherwise), so no request path reaches the filesystem.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import Body, FastAPI, Query
from fastapi.responses import Response

from .stores import ServedStore

__all__ = ["add_slide_routes", "png_response"]

PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}}
JPEG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/jpeg": {}}}}


def png_response(data: bytes) -> Response:
    return Response(content=data, media_type="image/png", headers={"Cache-Control": "max-age=300"})


# long: one short route per endpoint, each a closure over ``get`` (FastAPI's own idiom)
def add_slide_routes(app: FastAPI, get: Callable[[str], ServedStore]) -> None:
    """Add the slide routes to ``app``; ``get(name)`` is the served store (404 when unknown)."""

    @app.get("/api/{store}/heads", summary="The heads served with a store: names and classes")
    def list_heads(store: str) -> list[dict[str, Any]]:
        return get(store).heads.listing()

    @app.get("/api/{store}/slide/{slide:path}/thumbnail", summary="A slide's thumbnail (PNG)",
             response_class=Response, responses=PNG)
    def thumbnail(store: str, slide: str) -> Response:
        return png_response(get(store).thumbnail_png(slide))

    @app.get("/api/{store}/slide/{slide:path}/info",
             summary="A slide's level-0 size, tile count and thumbnail scale (level-0 px per thumbnail px)")
    def slide_info(store: str, slide: str) -> dict[str, Any]:
        return get(store).slide_info(slide)

    @app.get("/api/{store}/slide/{slide:path}/tile_at", summary="The tile under a level-0 point")
    def tile_at(store: str, slide: str, x: Annotated[float, Query(ge=0)],
                y: Annotated[float, Query(ge=0)]) -> dict[str, Any]:
        return get(store).tile_at(slide, x, y)

    @app.get("/api/{store}/slide/{slide:path}/dzi", summary="The slide's DeepZoom descriptor (DZI XML)",
             response_class=Response, responses={200: {"content": {"application/xml": {}}}})
    def dzi(store: str, slide: str) -> Response:
        return Response(content=get(store).dzi_xml(slide), media_type="application/xml",
                        headers={"Cache-Control": "max-age=300"})

    @app.get("/api/{store}/slide/{slide:path}/dzi_files/{level:int}/{col:int}_{row:int}.jpeg",
             summary="A DeepZoom tile (JPEG, at most 256 px a side)", response_class=Response,
             responses=JPEG)
    def dz_tile(store: str, slide: str, level: int, col: int, row: int) -> Response:
        return Response(content=get(store).dz_tile_jpeg(slide, level, col, row), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/{store}/slide/{slide:path}/heatmap",
             summary="Similarity of a stored tile to every tile of a slide: an RGBA PNG overlay "
                     "the size of the thumbnail", response_class=Response, responses=PNG)
    def heatmap(store: str, slide: str, key: Annotated[str, Query(description="the query tile")]) -> Response:
        st = get(store)
        return png_response(st.heatmap_png(st.require_slide(slide), st.query_vector(key)))

    @app.post("/api/{store}/slide/{slide:path}/heatmap", summary="As GET, for a query vector (JSON list)",
              response_class=Response, responses=PNG)
    def heatmap_vector(store: str, slide: str, vector: Annotated[list[float], Body()]) -> Response:
        from ..index._vectors import as_queries      # the index's own check of query vectors
        st = get(store)
        st.require_slide(slide)
        return png_response(st.heatmap_png(slide, as_queries(np.asarray(vector), st.store.dim)[0]))

    @app.get("/api/{store}/slide/{slide:path}/prediction",
             summary="A served head's probability of one class on every tile of a slide: an RGBA "
                     "PNG overlay the size of the thumbnail (GET /api/{store}/heads lists heads)",
             response_class=Response, responses=PNG)
    def prediction(store: str, slide: str, head: Annotated[str, Query(description="a served head")],
                   cls: Annotated[str | None, Query(description="its class (default: positive or last)")] = None
                   ) -> Response:
        return png_response(get(store).prediction_png(slide, head, cls))
