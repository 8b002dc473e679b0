"""The server side of trio-websocket, with two protocol details made to match §2.3.

* A peer that breaks the WebSocket protocol (invalid UTF-8 → 1007, e.g. an unmasked frame →
  1002) is told so with a close frame before the TCP connection goes; trio-websocket on its own
  just drops the socket.
* An oversized message (LIM-1) is closed with 1009 and the reason `message too big`.

Everything else is trio-websocket unchanged. This is the only module that touches its internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, TextMessage

if TYPE_CHECKING:
    import trio

    from ._config import ServerConfig

TOO_BIG_REASON = "message too big"


class _ServerWebSocket(WebSocketConnection):
    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            # wsproto found an error in the peer's bytes (it reports it as a close event while
            # the connection is still open): answer with the close frame the RFC asks for.
            try:
                await self._send(CloseConnection(code=event.code, reason=event.reason))
            except ConnectionClosed:
                pass
        await super()._handle_close_connection_event(event)

    async def _handle_message_event(self, event: BytesMessage | TextMessage) -> None:
        if self._message_size + len(event.data) > self._max_message_size:
            self._message_parts = []
            self._message_size = 0
            self._close_reason = CloseReason(1009, TOO_BIG_REASON)
            self._reader_running = False
            try:
                await self._send(CloseConnection(code=1009, reason=TOO_BIG_REASON))
            except ConnectionClosed:
                pass
            await self._recv_channel.aclose()
            return
        await super()._handle_message_event(event)


async def open_server_websocket(
    nursery: trio.Nursery, stream: trio.abc.Stream, config: ServerConfig
) -> WebSocketRequest:
    """Like `trio_websocket.wrap_server_stream`: start the reader in `nursery`, return the request."""
    connection = _ServerWebSocket(
        stream,
        WSConnection(ConnectionType.SERVER),
        message_queue_size=config.inbound_queue_size,
        max_message_size=config.max_message_size,
        receive_buffer_size=config.receive_buffer_size,
    )
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()
