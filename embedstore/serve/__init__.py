"""``embedstore serve``: a JSON API and a web page over one or more stores.

    app = create_app(["/data/lung", "/data/slides"])     # FastAPI; run it with uvicorn
    uvicorn.run(app, host="127.0.0.1", port=8765)

Stores are addressed by a short name (their directory name, de-duplicated), never by a path
from the request; tile and slide endpoints serve only keys and slides the store holds.
Needs the ``serve`` extra (fastapi, uvicorn, python-multipart); importing this package is cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .stores import ServedStore, served_stores

__all__ = ["create_app", "ServedStore", "served_stores"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app
        return create_app
    if name in ("ServedStore", "served_stores"):
        from . import stores
        return getattr(stores, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
