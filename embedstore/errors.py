"""One hierarchy of errors. Each class also subclasses the builtin that fits, so callers
can catch ``FileNotFoundError`` or ``ValueError`` without importing embedstore.

Messages are one line: what was wrong, the value seen, how to fix it.
"""
from __future__ import annotations

__all__ = [
    "EmbedstoreError", "StoreNotFoundError", "NotAStoreError", "StoreExistsError",
    "CorruptShardError", "DimensionMismatchError", "BackboneMismatchError",
    "DuplicateKeyError", "UnknownKeyError", "LabelsError", "StoreLockedError",
    "UnknownBackboneError", "WeightsNotFoundError", "SourceError", "SlideError",
    "IndexError_", "StaleIndexError", "BudgetError", "HeadError", "SelectionError",
    "VerifyError",
]


class EmbedstoreError(Exception):
    """Base class of every error embedstore raises on purpose."""


class StoreNotFoundError(EmbedstoreError, FileNotFoundError):
    """The store directory does not exist."""


class NotAStoreError(EmbedstoreError, ValueError):
    """The directory exists but holds no STORE.json (a foreign directory)."""


class StoreExistsError(EmbedstoreError, FileExistsError):
    """Creating a store where one (or other files) already exist."""


class CorruptShardError(EmbedstoreError, OSError):
    """A shard file is missing, truncated or does not match its checksum."""


class DimensionMismatchError(EmbedstoreError, ValueError):
    """Embeddings of the wrong dimension for the store or index."""


class BackboneMismatchError(EmbedstoreError, ValueError):
    """Writing to (or predicting on) a store made with another backbone or transform."""


class DuplicateKeyError(EmbedstoreError, ValueError):
    """A tile key appears twice."""


class UnknownKeyError(EmbedstoreError, KeyError):
    """A tile key the store does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one plain line
        return str(self.args[0]) if self.args else ""


class LabelsError(EmbedstoreError, ValueError):
    """A labels CSV with missing columns, unknown keys or unusable labels."""


class StoreLockedError(EmbedstoreError, RuntimeError):
    """An operation needing exclusive access while another process writes the store."""


class UnknownBackboneError(EmbedstoreError, KeyError):
    """A backbone name the registry does not know (the message lists close matches)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class WeightsNotFoundError(EmbedstoreError, FileNotFoundError):
    """Backbone weights are neither in the local cache nor given as a file."""


class SourceError(EmbedstoreError, ValueError):
    """A tile source (folder, CSV, slide) that cannot be used."""


class SlideError(EmbedstoreError, ValueError):
    """A whole-slide image that cannot be tiled (unreadable, no mpp, ...)."""


class IndexError_(EmbedstoreError, ValueError):
    """A vector index problem (empty store, wrong kind, ...)."""


class StaleIndexError(IndexError_):
    """The index covers fewer rows than the store holds."""


class BudgetError(IndexError_):
    """No index fits in the given memory budget."""


class HeadError(EmbedstoreError, ValueError):
    """A classification head problem (labels, classes, foreign head directory, NaNs)."""


class SelectionError(EmbedstoreError, ValueError):
    """Bad input to backbone selection."""


class VerifyError(EmbedstoreError, RuntimeError):
    """`verify` found a mismatch between the catalog and the shards."""
