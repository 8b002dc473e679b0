"""Plain HTTP requests on the WebSocket's port (EP-1, §6).

The endpoint has already parsed the request head with h11; this module answers it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._endpoint import RequestHead, send_simple_response

if TYPE_CHECKING:
    import trio

    from ._server import Server

log = logging.getLogger("ufo_trio")


class HttpApi:
    """Routes non-upgrade requests. `/ws` without an upgrade gets 426 (EP-1)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def handle(self, stream: trio.abc.Stream, head: RequestHead, remote: str) -> None:
        if head.path == "/ws":
            await send_simple_response(stream, 426, b'{"detail":"WebSocket upgrade required"}')
            return
        await send_simple_response(stream, 404, b'{"detail":"Not Found"}')
