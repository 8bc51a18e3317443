"""``embedstore serve``: the web page and JSON API over one or more stores (uvicorn)."""
from __future__ import annotations

import socket
from pathlib import Path

import click

from ..errors import MissingDependencyError
from ._app import main

__all__ = ["serve"]


@main.command()
@click.argument("stores", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but 127.0.0.1 / localhost exposes the stores to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one).")
def serve(stores: tuple[Path, ...], host: str, port: int) -> None:
    """Serve STORE... as a web page (pick a store, click a slide region or drop an image, see the
    nearest tiles) and a JSON API documented at /docs. Stores are named by their directory."""
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        raise MissingDependencyError(f"embedstore serve needs {exc.name or 'fastapi'}: "
                                     "pip install 'embedstore[serve]'") from None
    app = create_app(list(stores))
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family)    # bound here: the URL says the real port
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"embedstore serve: http://{shown}:{port}/  (API: http://{shown}:{port}/docs; Ctrl-C stops)")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()
