"""The ``embedstore`` command line: a thin layer over the Python API.

One module per command group; each command parses its flags, calls one library function and
prints. Nothing in the library imports this package.

Exit status: 0 success, 1 completed with errors (some inputs recorded as errors), 2 failure
(bad input, a broken store or an unexpected error: one line on stderr says what).
"""
from __future__ import annotations

from . import extract, heads, index, interop, select, serve, store  # noqa: F401  (each registers its commands)
from ._app import main

__all__ = ["main"]
