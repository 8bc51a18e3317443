"""The ``embedstore`` click group, how every command reports failure, and ``--json`` output.

Exit status: 0 success, 1 completed with errors (some inputs recorded as errors), 2 failure.
A failure is one line on stderr: an :class:`~embedstore.errors.EmbedstoreError` (or a missing
file) says what was wrong and how to fix it; any other exception names the command and the
exception and points to ``embedstore --debug``, which also prints the traceback. A usage
error (a value out of its range, a missing argument) is one line too, naming the option and
the value; ``--help`` is click's own.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import numpy as np

from ..errors import EmbedstoreError

__all__ = ["EXIT_PARTIAL", "EXIT_FAIL", "main", "fail", "json_option", "echo_json", "progress_echo",
           "usage_line", "OneLineUsageError", "COUNT", "NON_NEGATIVE", "FRACTION", "POSITIVE"]

EXIT_PARTIAL, EXIT_FAIL = 1, 2
MAX_MESSAGE = 500                # characters of an unexpected exception's message shown

F = TypeVar("F", bound=Callable[..., Any])

# the ranges numbers on the command line take (click checks them before a command runs)
COUNT = click.IntRange(min=1)                              # batch sizes, shard rows, seeds, k ...
NON_NEGATIVE = click.IntRange(min=0)                       # workers (0: in the main process)
FRACTION = click.FloatRange(0.0, 1.0)                      # tissue fraction, recall target
POSITIVE = click.FloatRange(min=0.0, min_open=True)        # µm/px, learning rate


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(msg: str) -> NoReturn:
    """Print ``error: msg`` (one line) on stderr and exit with status 2."""
    click.echo(f"error: {_one_line(msg)}", err=True)
    sys.exit(EXIT_FAIL)


def _message(exc: Exception, command: str) -> str:
    """The one line a failure of ``command`` prints (without the ``error: `` prefix)."""
    if isinstance(exc, EmbedstoreError):
        return str(exc)
    if isinstance(exc, OSError) and getattr(exc, "filename", None):   # missing file, no access...
        return f"{exc.strerror or exc}: {exc.filename}"
    text = _one_line(str(exc))
    text = text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."
    return (f"{command} failed unexpectedly: {type(exc).__name__}" + (f": {text}" if text else "")
            + f"; rerun as `embedstore --debug {command} ...` for the traceback")


def usage_line(exc: click.UsageError) -> str:
    """The one line a usage error prints (without ``error: ``): a bad value names the option
    and the value (``--views: -1 is not in the range x>=1``); anything else (a missing
    argument, an unknown option or command) says what and where ``--help`` is."""
    if isinstance(exc, click.BadParameter) and not isinstance(exc, click.MissingParameter):
        hint = exc.param_hint
        if hint is None and exc.param is not None:
            hint = (list(exc.param.opts) if isinstance(exc.param, click.Option)
                    else exc.param.human_readable_name)
        if hint is not None:
            name = hint if isinstance(hint, str) else " / ".join(hint)
            return _one_line(f"{name}: {exc.message.rstrip('.')}")
    names: list[str] = []
    ctx = exc.ctx
    while ctx is not None and ctx.parent is not None:   # the root's name is the program's
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    where = " ".join(["embedstore", *names])
    return _one_line(f"{exc.format_message().rstrip('.')}; see `{where} --help`")


class OneLineUsageError(click.UsageError):
    """A usage error shown as ``error: <one line>`` on stderr (exit 2), without click's
    usage block; ``--help`` output is untouched."""

    def __init__(self, exc: click.UsageError) -> None:
        super().__init__(usage_line(exc), exc.ctx)

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class _Group(click.Group):
    """A click group that turns every exception of a command into one line and exit status 2,
    usage errors (bad option values, missing arguments) included."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:                                   # the group's own options (embedstore --bogus)
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise                              # bare `embedstore` prints the help, as before
        except click.UsageError as exc:
            raise OneLineUsageError(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.NoArgsIsHelpError, OneLineUsageError):
            raise
        except click.UsageError as exc:        # a command's flags, or BadParameter from its body
            raise OneLineUsageError(exc) from None
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as exc:                      # noqa: BLE001  (the one place that may)
            if ctx.params.get("debug"):
                traceback.print_exc(file=sys.stderr)
            fail(_message(exc, ctx.invoked_subcommand or "embedstore"))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="embedstore")
@click.option("--debug", is_flag=True, help="On failure, also print the full traceback.")
def main(debug: bool) -> None:
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

    \b
    Exit status: 0 success, 1 completed with errors (inputs recorded as errors in the store),
    2 failure (one line on stderr; `embedstore --debug COMMAND ...` adds the traceback).
    Every command that prints a result takes --json: one JSON document on stdout.
    """


def json_option(fn: F) -> F:
    """The ``--json`` flag (parameter ``as_json``) every command that prints a result takes."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as one JSON document on stdout.")(fn)


def _plain(value: Any) -> Any:
    """What json.dumps cannot write itself: numpy values, paths, dataclasses, sets."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def echo_json(obj: Any) -> None:
    """Print ``obj`` as one JSON document on stdout."""
    click.echo(json.dumps(obj, indent=2, default=_plain))


def progress_echo(as_json: bool) -> Callable[[str], None]:
    """Where a command's progress lines go: stdout, or stderr when stdout carries the JSON."""
    return (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
