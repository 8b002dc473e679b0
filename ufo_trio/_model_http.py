"""`ModelTransport`: the model client's own httpx transport, HTTP/1.1 on h11 over trio streams.

`OpenAIChatModel` (`_llm.py`) sends every model call through httpx. With httpx's default
transport (httpcore, anyio and h11) one call cost ~405 µs of CPU against the bench's fake model,
twice a whole script-agent step; through this one ~205 µs (docs/performance.md, "h11
transport"). httpx documents custom transports
(`httpx.AsyncBaseTransport`) as its extension point, so this module keeps httpx as the HTTP
client (its `Request`, `Response`, content decoding and exception types) and replaces only the
connection handling: a small keep-alive pool of HTTP/1.1 connections spoken with h11 (which the
server already uses) over trio's socket and SSL streams, with no anyio, no httpcore and no
poll of every idle connection per request (only the one about to be reused is polled).

* One pool per origin (scheme, host, port); at most `max_connections` connections in all,
  requests beyond that wait (FIFO) for a free one. Bookkeeping is O(1) per request: the idle
  connections of an origin are a stack (the most recently used is reused first), expired ones
  (`keepalive_expiry`) are closed when met.
* An idle connection that has become readable before its reuse (the server closed it, or sent
  something nobody asked for, such as a `408 Request Timeout`) is closed, not reused. A reused
  connection whose request cannot be written is retried once on a fresh connection. Once a
  request is written it is never sent again here: the server may be working on it, and a POST
  is not idempotent. The agent's retry policy decides (logged and counted).
* Request head and body go out in one send; the response body is an
  `httpx.AsyncByteStream`, so httpx still decodes gzip/deflate. A connection goes back to the
  pool only when its response was read to the end and both sides may go on; anything else
  (cancellation, an error, a body the caller stopped reading) closes it at once. Closing is a
  synchronous socket close: a cancelled call's connection is gone before the `Cancelled` leaves
  the transport, and cleanup has nothing to await.
* Errors are httpx's: `ConnectError`, `ReadError`, `WriteError`, `RemoteProtocolError`,
  `UnsupportedProtocol`. Deadlines are the caller's trio cancel scopes (no timeouts here).

Waiting for the model is one await, `_wait_response_start` (the first bytes of the response);
everything after it is CPU work: parse the head (here), read the body and parse its JSON (the
caller, `OpenAIChatModel._complete`, after `handle_async_request` returned). A gate bounding how
many sessions do that work per scheduler batch can go right after `_wait_response_start`, or in
the caller between `handle_async_request` and reading the body (the head parse is then outside).

Owned by `OpenAIChatModel` (`async with model:`), itself owned by `Server.run`.
"""

from __future__ import annotations

import os
import select
from collections import deque
from typing import TYPE_CHECKING, Final

import h11
import httpx
import trio

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator

#: Bytes asked of the socket per receive.
CHUNK: Final = 65536
#: Seconds an idle connection is kept for reuse.
KEEPALIVE_EXPIRY: Final = 30.0
#: The largest response head accepted.
MAX_HEAD_BYTES: Final = 64 * 1024

_DEFAULT_PORTS: Final = {b"http": 80, b"https": 443}

Origin = tuple[bytes, bytes, int]


class _Connection:
    """One HTTP/1.1 connection: the stream, its h11 state, when it went idle, if it served.

    Plain TCP is written and read on the socket's descriptor directly (`os.write`/`os.read` on
    the non-blocking socket, `wait_readable` when there is nothing yet), the way the server
    writes WebSocket frames: trio's socket stream pays a scheduler round trip on every send
    and every ready read. TLS goes through `trio.SSLStream`.
    """

    __slots__ = ("h11", "idle_since", "origin", "reused", "socket", "stream", "tls")

    def __init__(
        self,
        origin: Origin,
        stream: trio.SocketStream,
        tls: trio.SSLStream[trio.SocketStream] | None,
    ) -> None:
        self.origin = origin
        self.stream = stream
        self.socket = stream.socket
        self.tls = tls
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle_since = 0.0
        self.reused = False

    async def send(self, data: bytes) -> None:
        """Send all of `data` (trio's stream errors, or OSError)."""
        if self.tls is not None:
            await self.tls.send_all(data)
            return
        try:
            sent = os.write(self.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):  # the kernel's buffer is full (a large body): wait as trio does
            await self.stream.send_all(memoryview(data)[sent:])

    async def receive(self, *, wait: bool = False) -> bytes:
        """The next bytes (b"" at EOF). `wait`: wait for readability first (a checkpoint even
        if bytes are there already; used for the response's first bytes)."""
        if self.tls is not None:
            return bytes(await self.tls.receive_some(CHUNK))
        if wait:
            await trio.lowlevel.wait_readable(self.socket)
        while True:
            try:
                return os.read(self.socket.fileno(), CHUNK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.socket)

    def readable(self) -> bool:
        """Whether the socket has bytes or EOF waiting (a zero-timeout poll; idle connections
        only, where nothing should arrive)."""
        try:
            ready, _, _ = select.select([self.socket.fileno()], [], [], 0)
        except (OSError, ValueError):  # closed under us: not reusable either
            return True
        return bool(ready)

    def close(self) -> None:
        """Close the socket now (no TLS close_notify: the peer sees FIN). Never blocks."""
        self.socket.close()


class ResponseTooLarge(Exception):
    """`ModelTransport.post`: the body is larger than the caller's `max_body`."""


def _host_header(origin: Origin) -> bytes:
    scheme, host, port = origin
    if b":" in host:  # an IPv6 literal
        host = b"[" + host + b"]"
    return host if port == _DEFAULT_PORTS[scheme] else b"%s:%d" % (host, port)


class _Stale(Exception):
    """A reused connection could not take the request (the write failed): nothing was sent,
    so the request may go out once more on a fresh connection."""


class ModelTransport(httpx.AsyncBaseTransport):
    """A pooled HTTP/1.1 transport for httpx on trio (see the module docstring).

    `ssl_context` is used for https origins (SNI and hostname checking are the context's);
    ALPN is set to http/1.1 on it. Without one, https requests fail with `ConnectError`
    (building a default context loads the CA bundle: blocking, the caller's job). `aclose` closes every idle connection; a transport that
    was closed refuses new requests.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 100,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        #: Idle connections per origin, most recently used last.
        self._idle: dict[Origin, deque[_Connection]] = {}
        #: Open connections (in use and idle).
        self.open_connections = 0
        #: One unit per request in flight: at most max_connections, the rest wait in order.
        self._slots = trio.Semaphore(max_connections)
        self._closed = False

    # ------------------------------------------------------------------ the pool

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        while idle:
            conn = idle.pop()
            if trio.current_time() - conn.idle_since >= self.keepalive_expiry:
                # The newest idle connection expired, so did all older ones.
                self._discard(conn)
                while idle:
                    self._discard(idle.pop())
                return None
            if not conn.readable():
                return conn
            # Bytes or EOF on an idle connection: the server closed it or sent something
            # unasked (a 408); either way it cannot carry this request.
            self._discard(conn)
        return None

    def _release(self, conn: _Connection) -> None:
        """A connection whose exchange completed: back to its origin's idle stack."""
        if self._closed:
            self._discard(conn)
            return
        conn.idle_since = now = trio.current_time()
        conn.reused = True
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = deque()
        idle.append(conn)
        # Drop expired connections from the old end (amortised O(1)).
        while idle and now - idle[0].idle_since >= self.keepalive_expiry:
            self._discard(idle.popleft())

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self.open_connections -= 1

    def _make_room(self) -> None:
        """Close one idle connection of another origin if the pool is full."""
        if self.open_connections < self.max_connections:
            return
        for idle in self._idle.values():
            if idle:
                self._discard(idle.popleft())
                return

    async def _connect(self, request: httpx.Request | None, origin: Origin) -> _Connection:
        scheme, host, port = origin
        self._make_room()
        self.open_connections += 1
        try:
            hostname = host.decode("ascii")
            try:
                tcp = await trio.open_tcp_stream(hostname, port)
            except OSError as exc:
                raise httpx.ConnectError(_reason(exc), request=request) from exc
            tls = None
            if scheme == b"https":
                assert self._ssl_context is not None  # checked by handle_async_request
                tls = trio.SSLStream(
                    tcp, self._ssl_context, server_hostname=hostname, https_compatible=True
                )
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, OSError) as exc:
                    tcp.socket.close()
                    raise httpx.ConnectError(_reason(exc), request=request) from exc
                except BaseException:
                    tcp.socket.close()
                    raise
        except BaseException:
            self.open_connections -= 1
            raise
        return _Connection(origin, tcp, tls)

    # ------------------------------------------------------------------ one request

    def origin(self, url: httpx.URL, request: httpx.Request | None = None) -> Origin:
        """The pool key of `url`; httpx's errors for a URL this transport cannot serve."""
        scheme = url.raw_scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{scheme.decode('ascii', 'replace')}://'.",
                request=request,
            )
        if not url.raw_host:
            raise httpx.UnsupportedProtocol("Request URL is missing a host.", request=request)
        if scheme == b"https" and self._ssl_context is None:
            raise httpx.ConnectError("https needs the transport's ssl_context", request=request)
        return (scheme, url.raw_host, url.port or _DEFAULT_PORTS[scheme])

    async def _start(
        self,
        origin: Origin,
        head: h11.Request,
        body: bytes,
        request: httpx.Request | None,
    ) -> tuple[_Connection, h11.Response]:
        """Take a slot and a connection, send the request, parse the response head. On
        return the caller owns the slot and the connection (`_finish` or `_drop` them)."""
        if self._closed:
            raise httpx.ConnectError("the model transport is closed", request=request)
        slots = self._slots
        try:  # no scheduler round trip when a slot is free (the wait below is the checkpoint)
            slots.acquire_nowait()
        except trio.WouldBlock:
            await slots.acquire()
        try:
            conn = self._take_idle(origin)
            if conn is None:
                conn = await self._connect(request, origin)
            try:
                response = await self._exchange(conn, head, body, request)
            except _Stale:
                self._discard(conn)
                conn = await self._connect(request, origin)
                try:  # a fresh connection is never `_Stale`: errors are the server's
                    response = await self._exchange(conn, head, body, request)
                except BaseException:
                    self._discard(conn)
                    raise
            except BaseException:
                self._discard(conn)
                raise
        except BaseException:
            self._slots.release()
            raise
        return conn, response

    def _finish(self, conn: _Connection) -> None:
        """The response was read to the end: the connection back to the pool if both sides
        may go on (else closed), and the slot freed."""
        parser = conn.h11
        if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
            parser.start_next_cycle()
            self._release(conn)
        else:  # Connection: close, or the server may not go on
            self._discard(conn)
        self._slots.release()

    def _drop(self, conn: _Connection) -> None:
        """Before the end of the response: close the connection, free the slot."""
        self._discard(conn)
        self._slots.release()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = self.origin(request.url, request)
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        try:
            head = h11.Request(
                method=request.method, target=request.url.raw_path, headers=request.headers.raw
            )
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None
        conn, response = await self._start(origin, head, body, request)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_ResponseBody(self, conn, request),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason},
        )

    async def post(
        self,
        origin: Origin,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        max_body: int,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One POST with the whole answer read: (status, headers, body as sent, i.e. not
        content-decoded). The model client's own path (`OpenAIChatModel`): no httpx
        `Request`/`Response` objects or body iterators per call, the same pool, connections and
        errors as `handle_async_request` (`origin` from `origin()`; `headers` without Host and
        Content-Length, lower-case names). A body over `max_body` bytes raises
        `ResponseTooLarge` and closes the connection."""
        try:
            head = h11.Request(
                method=b"POST",
                target=target,
                headers=[
                    (b"host", _host_header(origin)),
                    *headers,
                    (b"content-length", b"%d" % len(body)),
                ],
            )
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from None
        conn, response = await self._start(origin, head, body, None)
        parser = conn.h11
        data = bytearray()
        try:
            while True:
                try:
                    event = parser.next_event()
                except h11.RemoteProtocolError as exc:
                    raise httpx.RemoteProtocolError(str(exc)) from None
                if event is h11.NEED_DATA:
                    parser.receive_data(await _receive(conn, None))
                elif type(event) is h11.Data:
                    data += event.data
                    if len(data) > max_body:
                        raise ResponseTooLarge
                elif type(event) is h11.EndOfMessage:
                    break
                else:  # ConnectionClosed before the end of the body
                    raise httpx.RemoteProtocolError(
                        "Server disconnected before the end of the response."
                    )
        except BaseException:
            # Cancelled or failed mid-answer: the connection is closed at once, never reused.
            self._drop(conn)
            raise
        self._finish(conn)
        return response.status_code, list(response.headers), bytes(data)

    async def _exchange(
        self,
        conn: _Connection,
        head: h11.Request,
        body: bytes,
        request: httpx.Request | None,
    ) -> h11.Response:
        """Send the request, wait for the response to start, parse its head. Raises `_Stale`
        for a reused connection that was closed before any byte came back."""
        parser = conn.h11
        send = parser.send_with_data_passthrough
        try:
            chunks = send(head) or []
            if body:
                chunks += send(h11.Data(data=body)) or []
            chunks += send(h11.EndOfMessage()) or []
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None
        try:
            await conn.send(b"".join(chunks))  # one send: head and body
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if conn.reused:
                raise _Stale from None
            raise httpx.WriteError(_reason(exc), request=request) from None
        await self._wait_response_start(conn, request)
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from None
            if event is h11.NEED_DATA:
                parser.receive_data(await _receive(conn, request))
            elif type(event) is h11.Response:
                return event
            elif type(event) is h11.InformationalResponse:
                continue
            else:  # ConnectionClosed mid-head
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request
                )

    async def _wait_response_start(self, conn: _Connection, request: httpx.Request | None) -> None:
        """Wait until the first bytes of the response arrived (the model's thinking time).

        Everything after this returns is CPU work on the answer; a gate on that work goes
        right after this call."""
        # The request is written: whatever happens now, it is not sent again here (the
        # server may have read it and be working on it; see the module docstring).
        try:
            data = await conn.receive(wait=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(_reason(exc), request=request) from None
        if not data:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
        conn.h11.receive_data(data)

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their response does."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                self._discard(conn)
        await trio.lowlevel.checkpoint()


class _ResponseBody(httpx.AsyncByteStream):
    """The response body, read from the connection's h11 state as httpx asks for it. Its end
    hands the connection back to the pool; `aclose` before the end closes the connection."""

    __slots__ = ("_conn", "_done", "_request", "_transport")

    def __init__(
        self, transport: ModelTransport, conn: _Connection, request: httpx.Request
    ) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._request = request
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        parser = conn.h11
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                self._drop()
                raise httpx.RemoteProtocolError(str(exc), request=self._request) from None
            if event is h11.NEED_DATA:
                try:
                    data = await _receive(conn, self._request)
                except BaseException:
                    self._drop()
                    raise
                parser.receive_data(data)
            elif type(event) is h11.Data:
                return bytes(event.data)
            elif type(event) is h11.EndOfMessage:
                self._finish()
                raise StopAsyncIteration
            else:  # ConnectionClosed before the end of the body
                self._drop()
                raise httpx.RemoteProtocolError(
                    "Server disconnected before the end of the response.", request=self._request
                )

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport._finish(conn)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport._drop(conn)

    async def aclose(self) -> None:
        """Before the end of the body: close the connection (it is never reused)."""
        self._drop()


async def _receive(conn: _Connection, request: httpx.Request | None) -> bytes:
    try:
        return await conn.receive()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise httpx.ReadError(_reason(exc), request=request) from None


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
