"""The ``embedstore`` click group and how every command reports failure.

Exit status: 0 success, 1 completed with errors (some inputs recorded as errors), 2 failure
(bad input or a broken store: one line on stderr says what and how to fix it).
"""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..sizes import format_bytes

EXIT_PARTIAL, EXIT_FAIL = 1, 2


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(EXIT_FAIL)


def handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn embedstore's errors (and missing files) into one line and exit status 2."""
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        from ..errors import EmbedstoreError
        try:
            return fn(*a, **kw)
        except EmbedstoreError as e:
            _fail(str(e))
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            _fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))
    return wrapper


_human = format_bytes


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="embedstore")
def main() -> None:
    """embedstore: embed every histology tile once, keep the embeddings in one store, and
    train heads, search and select backbones over it.

    \b
    A store is a directory bound to one embedding space (one backbone, one preprocessing,
    one tile geometry): Arrow shards memory-mapped for reading, an LMDB catalog of keys,
    shards, labels and errors, and STORE.json describing it.

    \b
    Typical use:
      embedstore extract tiles/ --store st --backbone resnet18 --random-init
      embedstore info st
      embedstore labels st labels.csv --task tumour
      embedstore verify st
    """
