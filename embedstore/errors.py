"""One hierarchy of errors. Each class also subclasses the builtin that fits, so callers
can catch ``FileNotFoundError`` or ``ValueError`` without importing embedstore.

Messages are one line: what was wrong, the value seen, how to fix it.
"""
from __future__ import annotations

import pickle

__all__ = [
    "EmbedstoreError", "StoreNotFoundError", "NotAStoreError", "StoreExistsError",
    "CorruptShardError", "DimensionMismatchError", "BackboneMismatchError",
    "DuplicateKeyError", "UnknownKeyError", "LabelsError", "StoreLockedError",
    "UnknownBackboneError", "WeightsNotFoundError", "SourceError", "SlideError",
    "VectorIndexError", "StaleIndexError", "BudgetError", "HeadError", "SelectionError",
    "CatalogDamagedError", "WriterError", "ConfigError", "ShapeError", "BackboneError",
    "MissingDependencyError", "ReadOnlyError", "NotFittedError", "RowRangeError",
    "ArgumentTypeError", "UnsafeWeightsError",
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


class VectorIndexError(EmbedstoreError, ValueError):
    """A vector index problem (empty store, wrong kind, ...)."""


class StaleIndexError(VectorIndexError):
    """The index covers fewer rows than the store holds."""


class BudgetError(VectorIndexError):
    """No index fits in the given memory budget."""


class HeadError(EmbedstoreError, ValueError):
    """A classification head problem (labels, classes, foreign head directory, NaNs)."""


class SelectionError(EmbedstoreError, ValueError):
    """Bad input to backbone selection."""


class CatalogDamagedError(EmbedstoreError, OSError):
    """The LMDB catalog cannot be read, or disagrees with the shards it should describe."""


class WriterError(EmbedstoreError, RuntimeError):
    """An error in the background writer, re-raised in the caller with what it concerned."""


class ConfigError(EmbedstoreError, ValueError):
    """An option or argument whose value is out of range or contradicts another."""


class ShapeError(EmbedstoreError, ValueError):
    """An array (embeddings, labels, tiles) of the wrong shape or dtype for the call."""


class BackboneError(EmbedstoreError, ValueError):
    """A backbone that cannot be registered, built or run as asked (spec, graph, provider)."""


class MissingDependencyError(EmbedstoreError, ImportError):
    """An optional package a feature needs is not installed (the message names it)."""


class ReadOnlyError(EmbedstoreError, PermissionError):
    """A write through something opened read-only."""


class NotFittedError(EmbedstoreError, RuntimeError):
    """A model used before it was fitted."""


class ArgumentTypeError(EmbedstoreError, TypeError):
    """An argument of the wrong type for the call (a tensor where an array goes, ...)."""


class UnsafeWeightsError(EmbedstoreError, pickle.UnpicklingError):
    """A checkpoint that cannot be read without an unrestricted pickle (refused)."""


class RowRangeError(EmbedstoreError, IndexError):
    """A row position outside the matrix."""
