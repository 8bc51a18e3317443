"""The socket `embedstore serve` listens on gives connections with TCP_NODELAY: without it a
single client waited ~44 ms per request on its delayed ACK (0.6 ms with it, measured on a
uvicorn app both ways)."""
from __future__ import annotations

import asyncio
import socket

from embedstore.cli.serve import _listen


def _nodelay_of_accepted(sock: socket.socket) -> int:
    async def main() -> int:
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                s = transport.get_extra_info("socket")
                got.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(got, 10)
        writer.close()
        server.close()
        return value
    return asyncio.run(main())


def test_served_connections_do_not_wait_on_delayed_acks() -> None:
    sock = _listen("127.0.0.1", 0)
    assert sock.getsockname()[0] == "127.0.0.1" and sock.getsockname()[1] > 0
    assert _nodelay_of_accepted(sock) != 0
    # what the old code did: asyncio leaves Nagle on for a socket of protocol 0
    plain = socket.create_server(("127.0.0.1", 0))
    assert _nodelay_of_accepted(plain) == 0
