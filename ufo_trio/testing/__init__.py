"""Helpers for testing against ufo_trio: a server on port 0, an in-memory server for MockClock
tests, and a raw-JSON WebSocket client that speaks the wire protocol the way outsiders do.
"""

from __future__ import annotations

import json
import urllib.parse
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio
import trio.testing
import trio_websocket

from .._config import ServerConfig
from .._server import Server, build_server, serve
from .._tls import load_tls
from ._fake_model import FakeChatModel, FakeReply, FakeRequest

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator

    import httpx

__all__ = [
    "TEST_KEY",
    "FakeChatModel",
    "FakeReply",
    "FakeRequest",
    "MemoryServer",
    "RawClient",
    "connect",
    "open_memory_server",
    "open_server",
]

TEST_KEY = "test-key"


def _config(config: ServerConfig | None, overrides: dict[str, Any]) -> ServerConfig:
    base = config or ServerConfig(host="127.0.0.1", port=0, api_key=TEST_KEY)
    return attrs.evolve(base, **overrides) if overrides else base


@asynccontextmanager
async def open_server(config: ServerConfig | None = None, **overrides: Any) -> AsyncIterator[Server]:
    """A real server on 127.0.0.1, port 0 unless told otherwise; cancelled on exit."""
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, _config(config, overrides))
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


@attrs.define(eq=False)
class RawClient:
    """A WebSocket peer that sends and receives raw JSON objects."""

    ws: trio_websocket.WebSocketConnection

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send_message(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        message = await self.ws.get_message()
        value = json.loads(message)
        assert isinstance(value, dict)
        return value

    async def register(
        self, client_id: str, client_type: str = "device", **fields: Any
    ) -> dict[str, Any]:
        """Send REGISTER and return the verdict frame."""
        await self.send(
            {"type": "register", "status": "ok", "client_type": client_type,
             "client_id": client_id, **fields}
        )
        return await self.recv()

    async def closed(self) -> trio_websocket.CloseReason:
        """Drain frames until the server closes; return the close reason."""
        while True:
            try:
                await self.ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                if exc.reason is None:  # pragma: no cover - trio-websocket always sets one
                    raise AssertionError("closed without a reason") from exc
                return exc.reason

    async def aclose(self) -> None:
        await self.ws.aclose()


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None = TEST_KEY,
    headers: list[tuple[bytes, bytes]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[RawClient]:
    """Open a raw client to a real server URL (`token` appended as the query parameter);
    `ssl_context` verifies a `wss://` server."""
    if token is not None:
        url = f"{url}?token={urllib.parse.quote(token)}"
    # Like the real clients, accept frames up to 100 MiB (COMPAT-13).
    async with trio_websocket.open_websocket_url(
        url, extra_headers=headers, max_message_size=100 * 1024 * 1024, ssl_context=ssl_context
    ) as ws:
        try:
            yield RawClient(ws)
        finally:
            # When the server closed first, trio-websocket's client may leave its socket open.
            await trio.aclose_forcefully(ws._stream)


@attrs.define(eq=False)
class MemoryServer:
    """A server with no listener whose connections run over in-memory streams.

    Nothing waits on a real socket, so `autojump_clock` drives every timeout exactly.
    """

    server: Server
    _nursery: trio.Nursery

    async def connect(
        self, resource: str = f"/ws?token={TEST_KEY}", *, ssl_context: ssl.SSLContext | None = None
    ) -> RawClient:
        """Open a WebSocket client on a fresh in-memory connection to the server (through TLS
        with `ssl_context`, for a server with `tls_cert`; the host name is `localhost`)."""
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.server.spawn_connection(server_stream)
        stream: trio.abc.Stream = client_stream
        if ssl_context is not None:
            stream = trio.SSLStream(client_stream, ssl_context, server_hostname="localhost")
        ws = await trio_websocket.wrap_client_stream(
            self._nursery,
            stream,  # type: ignore[arg-type]  # any Stream works; the stub is narrow
            "localhost",
            resource,
        )
        return RawClient(ws)

    def connection_tasks(self) -> int:
        """How many connection-handler tasks the server is running right now (leak checks)."""
        nursery = self.server._nursery
        return 0 if nursery is None else len(nursery.child_tasks)


@asynccontextmanager
async def open_memory_server(
    config: ServerConfig | None = None,
    *,
    model_transport: httpx.AsyncBaseTransport | None = None,
    **overrides: Any,
) -> AsyncIterator[MemoryServer]:
    """Run a server whose clients connect through `MemoryServer.connect`.

    `model_transport` (e.g. `FakeChatModel.transport()`) carries the llm agent's model calls in
    process, so MockClock drives them too.
    """
    config = _config(config, overrides)
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = await load_tls(config.tls_cert, config.tls_key)
    server = build_server(config, tls=tls, model_transport=model_transport)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run, [])
        try:
            yield MemoryServer(server, nursery)
        finally:
            nursery.cancel_scope.cancel()
