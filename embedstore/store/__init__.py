"""The embedding store: Arrow shards + LMDB catalog, memory-mapped, crash-safe."""
from .labels import import_labels
from .maintenance import compact, delete, upgrade
from .meta import StoreMeta
from .progress import apply_staged_commits, lookup_ids, units_with_views
from .protocol import Bag, StoredViews, StoreLike
from .reader import Store, open_store
from .rebuild import rebuild_catalog
from .verify import VerifyReport, verify_store
from .writer import StoreWriter, create_store

__all__ = ["StoreMeta", "Store", "Bag", "StoredViews", "StoreLike", "open_store", "StoreWriter", "create_store",
           "import_labels", "delete", "compact", "upgrade", "verify_store", "VerifyReport",
           "lookup_ids", "units_with_views", "apply_staged_commits", "rebuild_catalog"]
