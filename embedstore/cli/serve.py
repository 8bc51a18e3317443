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
@click.option("--head", "heads", multiple=True, type=click.Path(path_type=Path),
              help="A head directory (train-head --out) whose predictions the page overlays on the "
                   "slides of the stores it was trained on; repeat for more.")
@click.option("--predictions", "predictions", multiple=True, type=click.Path(path_type=Path),
              help="A predictions file (embedstore predict --out, Arrow) to overlay on the slides it "
                   "names; repeat for more.")
def serve(stores: tuple[Path, ...], host: str, port: int, heads: tuple[Path, ...],
          predictions: tuple[Path, ...]) -> None:
    """Serve STORE... as a web page (pick a store, browse and zoom into its slides, click a region
    or drop an image, see the nearest tiles; similarity and prediction heatmaps over the slide)
    and a JSON API documented at /docs. Stores and heads are named by their directory."""
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as exc:
        raise MissingDependencyError(f"embedstore serve needs {exc.name or 'fastapi'}: "
                                     "pip install 'embedstore[serve]'") from None
    app = create_app(list(stores), heads=list(heads), predictions=list(predictions))
    sock = _listen(host, port)                      # bound here: the URL says the real port
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"embedstore serve: http://{shown}:{port}/  (API: http://{shown}:{port}/docs; Ctrl-C stops)")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket made with protocol IPPROTO_TCP: asyncio sets TCP_NODELAY only on
    connections accepted from such a socket (``socket.create_server``'s has protocol 0), and
    without it every response waits ~40 ms on the client's delayed ACK."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(2048)
    return sock

