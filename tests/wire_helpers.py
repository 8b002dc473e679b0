"""Raw wire helpers for the hardening tests (HTTP API, security, fuzzing, faults).

They talk to the server the way an outsider does: plain TCP on 127.0.0.1, HTTP/1.1 framed and
parsed by h11 (client side), WebSocket framed by wsproto. Nothing here imports the server's own
HTTP or WebSocket code, so a bug shared by server and helper cannot hide.

* `http_request` / `HttpClient`: one request per connection, or several on a kept-alive one;
* `raw_http`: send arbitrary bytes, read until the server closes, parse what came back;
* `WireClient`: the suite's hand-driven WebSocket client: it can send fragments, binary frames
  and raw bytes, stop reading (so it never answers a ping), and reset its TCP connection;
  `wire_client` opens one for an `async with` block;
* `fd_count`, `task_count`: leak checks.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import urllib.parse
from collections import deque
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio
import trio.testing
from blackbox_helpers import KEYS, STATUSES, WAIT
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WsprotoError

from ufo_trio.testing import TEST_KEY

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from wsproto.extensions import Extension

    from ufo_trio._server import Server

# ----------------------------------------------------------------------------------------- HTTP


@attrs.frozen
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def detail(self) -> Any:
        return self.json().get("detail")


def _request_bytes(
    conn: h11.Connection,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None,
) -> bytes:
    if body is not None and not any(name.lower() == b"content-length" for name, _ in headers):
        headers = [*headers, (b"content-length", str(len(body)).encode())]
    data = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    return data


def api_headers(
    port: int, *, key: str | bytes | None = TEST_KEY, host: bytes | None = None
) -> list[tuple[bytes, bytes]]:
    """Host (a loopback name by default) plus `X-API-Key` unless `key` is None."""
    headers = [(b"host", host if host is not None else f"127.0.0.1:{port}".encode())]
    if key is not None:
        headers.append((b"x-api-key", key if isinstance(key, bytes) else key.encode()))
    return headers


class HttpClient:
    """Requests on one kept-alive connection, framed and parsed by h11."""

    def __init__(self, stream: trio.abc.Stream, port: int) -> None:
        self.stream = stream
        self.port = port
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self,
        method: str,
        path: str,
        *,
        key: str | bytes | None = TEST_KEY,
        host: bytes | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        json_body: Any = None,
        within: float = WAIT,
    ) -> HttpResponse:
        if json_body is not None:
            body = json.dumps(json_body).encode()
        all_headers = [*api_headers(self.port, key=key, host=host), *(headers or [])]
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        with trio.fail_after(within):
            await self.stream.send_all(_request_bytes(self.conn, method, path, all_headers, body))
            return await self._response()

    async def _response(self) -> HttpResponse:
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in response.headers}
                return HttpResponse(response.status_code, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("server closed without a response")

    @property
    def reusable(self) -> bool:
        """True if h11 would send another request on this connection."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    async def server_closed(self) -> bool:
        """True once the server has closed its side (EOF), within WAIT."""
        with trio.fail_after(WAIT):
            try:
                while await self.stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        return True


@asynccontextmanager
async def open_http(port: int) -> AsyncIterator[HttpClient]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        yield HttpClient(stream, port)
    finally:
        await trio.aclose_forcefully(stream)


async def http_request(port: int, method: str, path: str, **kwargs: Any) -> HttpResponse:
    """One request on a fresh connection (see `HttpClient.request` for the keywords)."""
    async with open_http(port) as client:
        return await client.request(method, path, **kwargs)


def parse_responses(data: bytes, methods: list[str] | None = None) -> list[HttpResponse]:
    """Every complete HTTP response in `data` (h11 client side), in order.

    `methods` are the request methods answered, for HEAD framing; the default is GET. Trailing
    bytes that are not a complete response are ignored.
    """
    responses: list[HttpResponse] = []
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    conn.receive_data(b"")
    index = 0
    while True:
        head = bool(methods) and index < len(methods or []) and (methods or [])[index] == "HEAD"
        method = "HEAD" if head else "GET"
        conn.send(h11.Request(method=method, target="/", headers=[(b"host", b"x")]))
        conn.send(h11.EndOfMessage())
        response: h11.Response | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return responses
        except h11.RemoteProtocolError:
            return responses
        assert response is not None
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in response.headers}
        responses.append(HttpResponse(response.status_code, headers, bytes(body)))
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return responses
        conn.start_next_cycle()
        index += 1


async def raw_http(
    port: int, data: bytes, *, half_close: bool = True, methods: list[str] | None = None
) -> tuple[list[HttpResponse], bytes]:
    """Send `data`, optionally half-close, read until the server closes: (responses, raw)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    try:
        with trio.fail_after(WAIT):
            try:
                await stream.send_all(data)
                if half_close:
                    await stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the server may answer and close before taking everything we send
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass
    finally:
        await trio.aclose_forcefully(stream)
    return parse_responses(bytes(received), methods), bytes(received)


# ------------------------------------------------------------------------------------ WebSocket


@attrs.frozen
class Closed:
    """The server closed the WebSocket (`code` None: the TCP connection ended without a close)."""

    code: int | None
    reason: str = ""


@attrs.frozen
class Rejected:
    """The handshake was answered with an HTTP status instead of 101."""

    status: int
    body: bytes


#: Sockets of every WireClient made; `close_leftovers` closes them after each test, so a test
#: that leaves clients open (or fails half-way) does not leak sockets into later tests.
_open_sockets: list[Any] = []


def close_leftovers() -> None:
    """Close the socket of every WireClient created so far (synchronous; call after a test)."""
    while _open_sockets:
        fd = _open_sockets.pop().detach()  # no trio context needed, unlike close()
        if fd >= 0:
            os.close(fd)


class WireClient:
    """A raw WebSocket client over one TCP connection; nothing runs in the background.

    `recv` reads until a complete message or the close, answering pings on the way, so a client
    that does not call it is a peer that has stopped reading.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.socket = getattr(stream, "socket", None)  # None for in-memory streams
        if self.socket is not None:
            _open_sockets.append(self.socket)
        self.events: deque[Any] = deque()
        self._text: list[str] = []
        self._bytes: list[bytes] = []
        self.closed: Closed | None = None
        #: The server's acceptance of the handshake (what was negotiated).
        self.accepted: AcceptConnection | None = None

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        token: str | None = TEST_KEY,
        target: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        extensions: list[Extension] | None = None,
        subprotocols: list[str] | None = None,
    ) -> WireClient | Rejected:
        """Connect and handshake; returns the client, or `Rejected` with the HTTP status."""
        if target is None:
            target = "/ws" if token is None else f"/ws?token={urllib.parse.quote(token)}"
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        return await cls.handshake(
            stream,
            f"127.0.0.1:{port}",
            target,
            headers,
            extensions=extensions,
            subprotocols=subprotocols,
        )

    @classmethod
    async def handshake(
        cls,
        stream: trio.abc.Stream,
        host: str = "localhost",
        target: str = f"/ws?token={TEST_KEY}",
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        extensions: list[Extension] | None = None,
        subprotocols: list[str] | None = None,
    ) -> WireClient | Rejected:
        """The opening handshake over an already connected stream (TCP or in-memory).

        `extensions` and `subprotocols` are offered to the server; `accepted` shows the answer.
        """
        client = cls(stream)
        try:
            with trio.fail_after(WAIT):
                request = Request(
                    host=host,
                    target=target,
                    extra_headers=headers or [],
                    extensions=extensions or [],
                    subprotocols=subprotocols or [],
                )
                await stream.send_all(client.ws.send(request))
                event = await client._event()
                if isinstance(event, AcceptConnection):
                    client.accepted = event
                    return client
                assert isinstance(event, RejectConnection), event
                status = event.status_code
                body = bytearray()
                if event.has_body:
                    while True:
                        data = await client._event()
                        assert isinstance(data, RejectData)
                        body += data.data
                        if data.body_finished:
                            break
                await trio.aclose_forcefully(stream)
                return Rejected(status, bytes(body))
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    @classmethod
    async def registered(
        cls, port: int, client_id: str, client_type: str = "device", **fields: Any
    ) -> tuple[WireClient, dict[str, Any]]:
        client = await cls.open(port)
        assert isinstance(client, WireClient), client
        return client, await client.register(client_id, client_type, **fields)

    async def register(
        self, client_id: str, client_type: str = "device", **fields: Any
    ) -> dict[str, Any]:
        """Send REGISTER and return the verdict frame."""
        client = self
        await client.send(
            {
                "type": "register",
                "status": "ok",
                "client_type": client_type,
                "client_id": client_id,
                **fields,
            }
        )
        verdict = await client.recv()
        assert isinstance(verdict, dict), verdict
        return verdict

    async def _event(self) -> Any:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
            if not data and not self.events:
                raise EOFError
        return self.events.popleft()

    async def send_raw(self, event: Any) -> None:
        with trio.fail_after(WAIT):
            await self.stream.send_all(self.ws.send(event))

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, bytes):
            await self.send_raw(BytesMessage(data=frame))
        else:
            text = frame if isinstance(frame, str) else json.dumps(frame)
            await self.send_raw(TextMessage(data=text))

    async def send_fragments(self, text: str, pieces: int) -> None:
        """One text message split into `pieces` frames (continuation frames)."""
        step = max(1, len(text) // pieces)
        chunks = [text[i : i + step] for i in range(0, len(text), step)] or [""]
        try:
            for index, chunk in enumerate(chunks):
                last = index == len(chunks) - 1
                await self.send_raw(TextMessage(data=chunk, message_finished=last))
        except trio.BrokenResourceError:
            pass  # the server may close (1009) before the last fragment; `recv` tells

    async def recv(self, within: float = WAIT) -> dict[str, Any] | Closed:
        """The next message as JSON, or `Closed` once the server has closed."""
        if self.closed is not None:
            return self.closed
        with trio.fail_after(within):
            while True:
                try:
                    event = await self._event()
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                    self.closed = Closed(None)
                    return self.closed
                if isinstance(event, Ping):
                    try:
                        await self.stream.send_all(self.ws.send(event.response()))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, WsprotoError):
                        pass  # the peer is closing: no pong needed
                elif isinstance(event, CloseConnection):
                    self.closed = Closed(event.code, event.reason or "")
                    try:
                        await self.stream.send_all(self.ws.send(event.response()))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, WsprotoError):
                        pass
                    return self.closed
                elif isinstance(event, TextMessage):
                    self._text.append(event.data)
                    if event.message_finished:
                        text, self._text = "".join(self._text), []
                        value = json.loads(text)
                        assert isinstance(value, dict), text
                        return value
                elif isinstance(event, BytesMessage):
                    raise AssertionError("the server sent a binary frame")

    async def recv_until(self, predicate: Any, within: float = WAIT) -> list[dict[str, Any]]:
        """Frames up to and including the first one `predicate` accepts (fails on a close)."""
        frames: list[dict[str, Any]] = []
        with trio.fail_after(within):
            while True:
                frame = await self.recv()
                assert not isinstance(frame, Closed), (frame, frames)
                frames.append(frame)
                if predicate(frame):
                    return frames

    async def wait_closed(self, within: float = WAIT) -> Closed:
        """Drain frames until the server closes; the close it sent."""
        with trio.fail_after(within):
            while True:
                frame = await self.recv()
                if isinstance(frame, Closed):
                    return frame

    async def close(self, code: int = 1000) -> None:
        """Polite close: send a close frame and wait (bounded) for the server's."""
        try:
            if self.closed is None:
                await self.send_raw(CloseConnection(code=code))
                with trio.move_on_after(WAIT):
                    await self.wait_closed()
        except (trio.BrokenResourceError, trio.ClosedResourceError, Exception):
            pass
        finally:
            await trio.aclose_forcefully(self.stream)

    def reset(self) -> None:
        """Abort the TCP connection with RST (SO_LINGER 0), as a crashed or unplugged peer."""
        sock = self.socket
        assert sock is not None, "only a TCP client can be reset"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


@asynccontextmanager
async def wire_client(port: int, **kwargs: Any) -> AsyncIterator[WireClient]:
    """A `WireClient` whose handshake must succeed (keywords as for `WireClient.open`).

    On exit the TCP connection is simply closed, with no close frame: an abrupt disconnect.
    """
    client = await WireClient.open(port, **kwargs)
    assert isinstance(client, WireClient), client
    try:
        yield client
    finally:
        await trio.aclose_forcefully(client.stream)


async def memory_client(
    server: Server, *, lockstep: bool = False, target: str = f"/ws?token={TEST_KEY}"
) -> WireClient:
    """A WireClient on an in-memory connection to a `MemoryServer`'s server.

    With `lockstep`, the server's writes block until this client reads (no buffering at all),
    so a client that stops calling `recv` stalls the server's writer at once.
    """
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client_stream, server_stream = pair()
    server.spawn_connection(server_stream)
    client = await WireClient.handshake(client_stream, "localhost", target)
    assert isinstance(client, WireClient), client
    return client


def memory_http(server: Server) -> HttpClient:
    """An HttpClient on an in-memory connection (Host: 127.0.0.1:0)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server.spawn_connection(server_stream)
    return HttpClient(client_stream, 0)


async def sentinel(client: WireClient, n: int, client_type: str = "device") -> list[dict[str, Any]]:
    """Send a frame whose answer carries `response_id == f"sentinel-{n}"` and read up to it.

    A `device_info_request` is answered with either a response (constellation) or an ERROR
    (device), both echoing the `request_id` (WIRE-8); replies come in request order (PROC-2),
    so every answer to earlier frames is in the returned list.
    """
    await client.send(
        {
            "type": "device_info_request",
            "status": "ok",
            "client_type": client_type,
            "request_id": f"sentinel-{n}",
        }
    )
    return await client.recv_until(lambda f: f.get("response_id") == f"sentinel-{n}")


# ------------------------------------------------------------------------------------ leak checks


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def task_count() -> int:
    """Every task of the current trio run, counted from the root task down."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def wait_quiescent(server: Server, within: float = WAIT) -> None:
    """Wait until the server holds no connection, registry entry, session or TCP stream."""
    with trio.fail_after(within):
        while (
            server.connections
            or len(server.registry)
            or server.sessions.live
            or server.open_streams
        ):
            await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()


SERVER_TYPES = {
    "task", "heartbeat", "task_end", "command", "error", "device_info_request",
    "device_info_response",
}  # fmt: skip


def assert_server_frame(frame: dict[str, Any]) -> None:
    """WIRE-3: all 14 keys in order, then extras; valid `type` and `status` (COMPAT-4)."""
    assert tuple(frame)[: len(KEYS)] == KEYS, frame
    assert frame["type"] in SERVER_TYPES, frame
    assert frame["status"] in STATUSES, frame
    assert isinstance(frame["timestamp"], str), frame
