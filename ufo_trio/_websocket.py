"""The server side of trio-websocket, with two protocol details made to match §2.3.

* A peer that breaks the WebSocket protocol (invalid UTF-8 → 1007, e.g. an unmasked frame →
  1002) is told so with a close frame before the TCP connection goes; trio-websocket on its own
  just drops the socket.
* An oversized message (LIM-1) is closed with 1009 and the reason `message too big`.
* `send_frame` writes a text frame with a synchronous fast path (see there).

Everything else is trio-websocket unchanged. This is the only module that touches its internals.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

if TYPE_CHECKING:
    from ._config import ServerConfig

TOO_BIG_REASON = "message too big"


class ServerWebSocket(WebSocketConnection):
    """trio-websocket's connection plus the three server-side adjustments above."""

    #: The socket under the stream, for the fast path; None for e.g. in-memory test streams.
    _socket: trio.socket.SocketType | None = None
    #: The TCP socket under a TLS stream: no fast path there, but `abort_transport` closes it.
    _tls_socket: trio.socket.SocketType | None = None

    def _check_open(self) -> None:
        if self._close_reason or self._wsproto.state is not ConnectionState.OPEN:
            raise ConnectionClosed(self._close_reason or CloseReason(1006, "closing"))

    async def send_frame(self, text: str, deadline: float) -> bool:
        """Write one text frame; False if it could not be written before `deadline`.

        The frame is written under the connection's stream lock, which is its single send lock
        (PROC-2). When nobody else holds the lock and the kernel takes the whole frame at once,
        the write is one non-blocking system call with no await at all. Otherwise the rest is
        written in a shielded scope bounded by `deadline`: cancelling the sender can never cut
        a frame in half. After a False return the byte stream may hold half a frame; the caller
        must abort the connection. Raises `ConnectionClosed` if the connection is closed.
        """
        self._check_open()
        return await self._write_bytes(self._wsproto.send(TextMessage(data=text)), deadline)

    async def send_ping(self, payload: bytes, deadline: float) -> trio.Event | None:
        """Write a ping like `send_frame` writes a text frame; the event is set by its pong.

        None if the ping could not be written before `deadline` (then abort, as for
        `send_frame`). Raises `ConnectionClosed` if the connection is closed.
        """
        self._check_open()
        pong = trio.Event()
        self._pings[payload] = pong
        if await self._write_bytes(self._wsproto.send(Ping(payload=payload)), deadline):
            return pong
        return None

    def abort_transport(self) -> None:
        """Close the socket now (synchronously), failing any write that is stuck on it."""
        sock = self._socket or self._tls_socket
        if sock is not None:
            sock.close()

    async def _write_bytes(self, data: bytes, deadline: float) -> bool:
        lock = self._stream_lock
        if lock.locked():
            with trio.CancelScope(shield=True, deadline=deadline):
                async with lock:
                    await self._write_all(data)
                    return True
            return False
        lock.acquire_nowait()
        try:
            sent = 0
            # fileno() is -1 once the socket is closed, so a stale descriptor is never written.
            fd = -1 if self._socket is None else self._socket.fileno()
            if fd >= 0:
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    sent = 0  # let the stream report the failure the usual way, below
            if sent == len(data):
                return True
            with trio.CancelScope(shield=True, deadline=deadline):
                await self._write_all(memoryview(data)[sent:])
                return True
            return False
        finally:
            lock.release()

    async def _write_all(self, data: bytes | memoryview) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._abort_web_socket()
            assert self._close_reason is not None
            raise ConnectionClosed(self._close_reason) from None

    async def _handle_close_connection_event(self, event: CloseConnection) -> None:
        if self._wsproto.state is ConnectionState.OPEN:
            # wsproto found an error in the peer's bytes (it reports it as a close event while
            # the connection is still open): answer with the close frame the RFC asks for.
            self._close_reason = CloseReason(event.code, event.reason or None)
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
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    config: ServerConfig,
    socket_stream: trio.abc.Stream | None = None,
) -> WebSocketRequest:
    """Like `trio_websocket.wrap_server_stream`: start the reader in `nursery`, return the request.

    `socket_stream` is the transport under `stream`; a `trio.SocketStream` enables the fast write.
    """
    connection = ServerWebSocket(
        stream,
        WSConnection(ConnectionType.SERVER),
        message_queue_size=config.inbound_queue_size,
        max_message_size=config.max_message_size,
        receive_buffer_size=config.receive_buffer_size,
    )
    if isinstance(socket_stream, trio.SocketStream):
        connection._socket = socket_stream.socket
    elif isinstance(socket_stream, trio.SSLStream) and isinstance(
        socket_stream.transport_stream, trio.SocketStream
    ):
        connection._tls_socket = socket_stream.transport_stream.socket
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()
