"""The embedstore CLI run in-process (a subprocess per call would mostly import torch)."""
from __future__ import annotations

from click.testing import CliRunner

from embedstore.cli import main


def run(*args: object) -> tuple[int, str, str]:
    """``embedstore ARGS...`` -> (exit status, stdout, stderr); an exception escaping the CLI
    shows up as exit status 1 with no one-line message."""
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    return r.exit_code, r.stdout, r.stderr
