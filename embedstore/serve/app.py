"""The FastAPI application of ``embedstore serve``: the JSON API (documented at ``/docs``) and
the page (``/``, plain JS from ``static/``, nothing fetched from elsewhere).

Every error is one line of JSON, ``{"error": "..."}``: an unknown store, tile or slide is 404,
a bad request 400 (422 for a malformed parameter, 413 for an upload over the cap), anything
unexpected 500 without a traceback.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Body, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EmbedstoreError, StoreNotFoundError
from .slide_routes import add_slide_routes, png_response
from .stores import ServedStore, served_stores

__all__ = ["create_app", "MAX_UPLOAD", "STATIC"]

MAX_UPLOAD = 20 << 20                  # bytes of an uploaded query image
MAX_K = 200
STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("embedstore.serve")

K = Annotated[int, Query(ge=1, le=MAX_K, description="neighbours to return")]
SameSlide = Annotated[bool, Query(description="leave out tiles of the query's own slide")]
Label = Annotated[str | None, Query(description="only tiles with this label ...")]
Task = Annotated[str | None, Query(description="... of this task (default: extraction labels)")]
Slides = Annotated[list[str] | None, Query(description="only tiles of these slides")]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:500]


def _error(status: int, message: object) -> JSONResponse:
    return JSONResponse({"error": _one_line(message)}, status_code=status)


def _status(exc: EmbedstoreError) -> int:
    return 404 if isinstance(exc, (KeyError, FileNotFoundError)) else 400


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(EmbedstoreError)
    async def embedstore_error(request: Request, exc: EmbedstoreError) -> JSONResponse:
        return _error(_status(exc), exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server's log")


# long: one short route per endpoint, each a closure over ``served`` (FastAPI's own idiom)
def create_app(stores: Sequence[str | os.PathLike[str]] | dict[str, ServedStore],
               max_upload: int = MAX_UPLOAD, heads: Sequence[str | os.PathLike[str]] = (),
               predictions: Sequence[str | os.PathLike[str]] = ()) -> FastAPI:
    """The app serving ``stores`` (paths, opened here with the head directories ``heads`` and the
    ``predictions`` files of ``embedstore predict``, or already-served stores by name)."""
    served = stores if isinstance(stores, dict) else served_stores(stores, heads, predictions)
    app = FastAPI(title="embedstore", version="1", summary="Similarity search over embedding stores",
                  description="Stores are addressed by short name (GET /api/stores); tiles and "
                              "slides only by what a store holds. Errors are {\"error\": ...}.")
    _install_errors(app)

    @app.middleware("http")
    async def cap_uploads(request: Request, call_next: Any) -> Any:
        size = request.headers.get("content-length", "")
        if request.method == "POST" and size.isdigit() and int(size) > max_upload + 65536:
            return _error(413, f"the request is over {max_upload:,} bytes; send one tile-sized image")
        return await call_next(request)

    def get(name: str) -> ServedStore:
        if name not in served:
            raise StoreNotFoundError(f"no store named {name!r} is served; GET /api/stores lists them")
        return served[name]

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/stores", summary="The served stores")
    def list_stores() -> list[dict[str, Any]]:
        return [s.summary() for s in served.values()]

    @app.get("/api/{store}/slides", summary="A store's slides")
    def list_slides(store: str) -> list[dict[str, Any]]:
        return [{"slide": name} for name in get(store).slides()]

    @app.get("/api/{store}/keys", summary="A page of a store's tile keys, in id order")
    def list_keys(store: str, offset: Annotated[int, Query(ge=0)] = 0,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        return get(store).keys(offset, limit)

    @app.get("/api/{store}/search", summary="Nearest tiles to a stored tile")
    def search_key(store: str, key: Annotated[str, Query(description="a tile key of the store")],
                   k: K = 10, exclude_same_slide: SameSlide = False, label: Label = None,
                   task: Task = None, slides: Slides = None) -> dict[str, Any]:
        return get(store).search(key=key, k=k, exclude_same_slide=exclude_same_slide,
                                 label=label, task=task, slides=slides)

    @app.post("/api/{store}/search/vector", summary="Nearest tiles to a vector (a JSON list of dim numbers)")
    def search_vector(store: str, vector: Annotated[list[float], Body()], k: K = 10,
                      label: Label = None, task: Task = None, slides: Slides = None) -> dict[str, Any]:
        return get(store).search(vector=np.asarray(vector, np.float32), k=k, label=label,
                                 task=task, slides=slides)

    @app.post("/api/{store}/search/image",
              summary=f"Nearest tiles to an uploaded image (multipart field 'file', at most {max_upload >> 20} MB)")
    async def search_image(store: str, file: Annotated[UploadFile, File()],
                           k: K = 10, label: Label = None, task: Task = None,
                           slides: Slides = None) -> Any:
        st = get(store)
        data = await file.read(max_upload + 1)
        if len(data) > max_upload:             # (a declared size over the cap is refused earlier)
            return _error(413, f"the upload is over {max_upload:,} bytes; send one tile-sized image")
        vector = await run_in_threadpool(st.embed_image, data)     # off the event loop
        out = await run_in_threadpool(lambda: st.search(vector=vector, k=k, label=label, task=task,
                                                        slides=slides))
        out["vector"] = [round(float(v), 6) for v in vector]   # for a heatmap of the same query
        return out

    @app.get("/api/{store}/tile/{key:path}", summary="A tile's pixels (PNG), read back from its source",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def tile(store: str, key: str, size: Annotated[int, Query(ge=16, le=1024)] = 224) -> Response:
        return png_response(get(store).tile_png(key, size))

    add_slide_routes(app, get)

    @app.api_route("/api/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    def unknown(rest: str) -> JSONResponse:
        return _error(404, f"no API endpoint /api/{rest}; see /docs")

    return app
