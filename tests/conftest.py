"""Shared fixtures. Keep each addition small and self-contained: several test files use this."""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
from hypothesis import settings
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from contextlib import AbstractAsyncContextManager

# --- Hypothesis: repeatable by default --------------------------------------------------------
#
# CI must not fail on an example nobody has seen before, so every run draws the same examples
# and keeps no database. `HYPOTHESIS_PROFILE=explore` searches with fresh randomness instead.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


# --- wsproto_peer: a WebSocket client built on wsproto over a plain trio TCP stream -------------
#
# Unlike trio-websocket, it reads only when asked to. So it can stay silent (never answer a ping)
# and send one text message as many small fragments.


class WsprotoPeer:
    """A raw WebSocket client driven by hand. Every wait is bounded by the caller."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self._text: list[str] = []

    async def _flush(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_text(self, text: str, *, finished: bool = True) -> None:
        await self._flush(TextMessage(data=text, message_finished=finished))

    async def send_json(self, frame: dict[str, Any]) -> None:
        await self.send_text(json.dumps(frame))

    async def next_event(self) -> Event | None:
        """The next wsproto event; pings are answered. None once the server closed TCP."""
        while True:
            for event in self.ws.events():
                if isinstance(event, Ping):
                    await self._flush(event.response())
                    continue
                return event
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.ws.receive_data(data)

    async def recv_json(self) -> dict[str, Any]:
        while True:
            event = await self.next_event()
            assert isinstance(event, TextMessage), event
            self._text.append(event.data)
            if event.message_finished:
                text, self._text = "".join(self._text), []
                value = json.loads(text)
                assert isinstance(value, dict)
                return value

    async def close_code(self) -> int | None:
        """Read until the server's close frame (skipping data) and return its code; None if the
        server closed TCP without a close frame."""
        while True:
            event = await self.next_event()
            if event is None:
                return None
            if isinstance(event, CloseConnection):
                return event.code


@asynccontextmanager
async def open_wsproto_peer(
    port: int, target: str = "/ws?token=test-key"
) -> AsyncIterator[WsprotoPeer]:
    """Handshake to 127.0.0.1:`port`; on exit the TCP stream is simply closed (no close frame)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        peer = WsprotoPeer(stream, WSConnection(ConnectionType.CLIENT))
        await peer._flush(Request(host=f"127.0.0.1:{port}", target=target))
        accepted = await peer.next_event()
        assert isinstance(accepted, AcceptConnection), accepted
        yield peer
    finally:
        await stream.aclose()


@pytest.fixture
def wsproto_peer() -> Callable[..., AbstractAsyncContextManager[WsprotoPeer]]:
    """`async with wsproto_peer(server.port) as peer:` opens a hand-driven WebSocket client."""
    return open_wsproto_peer


# --- chromium: one headless Debian Chromium per run, driven by Selenium (tests/browser.py) -------


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    from browser import chromium_session

    yield from chromium_session()
