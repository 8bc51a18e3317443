"""embedstore: embed every tile once, keep the embeddings in one store, and let heads,
augmentation, backbone selection and similarity search read that store directly.

Importing embedstore is cheap: heavy parts (torch, faiss, openslide) load where they are used.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["open_store", "Store", "StoreMeta", "StoreWriter", "create_store", "import_labels",
           "verify_store", "delete", "compact", "import_h5", "export_h5", "errors"]

_LAZY = {
    "open_store": ("store.reader", "open_store"), "Store": ("store.reader", "Store"),
    "StoreMeta": ("store.meta", "StoreMeta"), "StoreWriter": ("store.writer", "StoreWriter"),
    "create_store": ("store.writer", "create_store"), "import_labels": ("store.labels", "import_labels"),
    "verify_store": ("store.verify", "verify_store"), "delete": ("store.maintenance", "delete"),
    "compact": ("store.maintenance", "compact"), "import_h5": ("store.h5io", "import_h5"),
    "export_h5": ("store.h5io", "export_h5"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name == "errors":
        from . import errors
        return errors
    raise AttributeError(f"module 'embedstore' has no attribute {name!r}")
