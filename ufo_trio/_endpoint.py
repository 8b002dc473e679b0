"""The single TCP endpoint: read an HTTP request head, then route it (EP-1, AUTH-1/2, LIM-2/3).

* an upgrade to `/ws` that passes the Origin and key checks becomes a WebSocket connection;
* an upgrade to any other path gets 404, a failed check 403 (before any frame is exchanged);
* anything else is plain HTTP and goes to `_http` on the same parsed request.

The head is parsed with h11 once. For upgrades, the bytes already read are replayed into
trio-websocket through `_ReplayStream`, so the handshake itself stays trio-websocket's.
"""

from __future__ import annotations

import hmac
import http
import json
import logging
import urllib.parse
from typing import TYPE_CHECKING

import h11
import trio

from ._config import MAX_HEADER_SIZE
from ._connection import Connection
from ._limits import log_refusal, refuse_connection
from ._tls import accept_tls
from ._websocket import ServerWebSocket, open_server_websocket

if TYPE_CHECKING:
    from ._server import Server

log = logging.getLogger("ufo_trio")


class _ReplayStream(trio.abc.Stream):
    """A stream that first yields bytes already read from `inner`, then reads from it."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()


class RequestHead:
    """A parsed HTTP request head plus the h11 connection it came from."""

    def __init__(self, conn: h11.Connection, request: h11.Request, raw: bytes) -> None:
        self.conn = conn
        self.request = request
        self.raw = raw
        target = request.target.decode("latin-1")
        split = urllib.parse.urlsplit(target)
        self.target = target
        self.path = split.path
        self.query = split.query
        self.method = request.method.decode("latin-1")
        self.headers: dict[str, list[bytes]] = {}
        for name, value in request.headers:
            self.headers.setdefault(name.decode("latin-1").lower(), []).append(value)

    def header(self, name: str) -> bytes | None:
        values = self.headers.get(name)
        return values[-1] if values else None

    @property
    def is_websocket_upgrade(self) -> bool:
        upgrade = self.header("upgrade")
        return upgrade is not None and upgrade.strip().lower() == b"websocket"

    @property
    def loggable_target(self) -> str:
        """The request target with any `token` value masked (AUTH-3)."""
        if not self.query:
            return self.path
        pairs = urllib.parse.parse_qsl(self.query, keep_blank_values=True)
        masked = "&".join(
            f"{name}={'***' if name == 'token' else value}" for name, value in pairs
        )
        return f"{self.path}?{masked}"


async def read_head(
    stream: trio.abc.Stream, max_header_size: int = MAX_HEADER_SIZE
) -> RequestHead | int | None:
    """Read one request head. Returns it, or an HTTP status to refuse with, or None on EOF."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_size)
    raw = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return 431 if "too long" in str(exc).lower() else exc.error_status_hint
        if isinstance(event, h11.Request):
            # h11 checks the size only while the head is incomplete; a head that arrives whole
            # in a few large reads can be bigger than the limit (LIM-3).
            if len(raw) - len(conn.trailing_data[0]) > max_header_size:
                return 431
            return RequestHead(conn, event, bytes(raw))
        if event is h11.NEED_DATA:
            data = await stream.receive_some(max_header_size)
            if not data:
                return None
            raw += data
            conn.receive_data(bytes(data))
            continue
        return None  # pragma: no cover - a server connection yields only the above


def credential_ok(head: RequestHead, api_key: bytes) -> bool:
    """AUTH-1(b)/AUTH-2: a single `token` query parameter or `Authorization: Bearer` matches."""
    if not api_key:  # never "authenticated" by an empty credential (ServerConfig refuses it too)
        return False
    ok = False
    tokens = urllib.parse.parse_qs(head.query, keep_blank_values=True).get("token", [])
    if len(tokens) == 1:
        ok = hmac.compare_digest(tokens[0].encode("utf-8", "surrogateescape"), api_key)
    auth = head.header("authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), api_key):
            ok = True
    return ok


def origin_ok(head: RequestHead, allowed: frozenset[str]) -> bool:
    """AUTH-1(a): no Origin header, or one listed in --allowed-origins (case-insensitive)."""
    origins = head.headers.get("origin")
    if not origins:
        return True
    return all(value.decode("latin-1").strip().lower() in allowed for value in origins)


def format_response(
    status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    """One complete HTTP/1.1 response that ends the connection."""
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {status} {phrase}".encode("ascii")]
    lines += [
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode("ascii"),
        b"connection: close",
    ]
    lines += [name + b": " + value for name, value in headers or ()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def send_simple_response(
    stream: trio.abc.Stream,
    status: int,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Write one complete response; the caller closes the stream afterwards."""
    await stream.send_all(format_response(status, body, headers))


def handshake_problem(head: RequestHead) -> int | None:
    """The status for an upgrade request wsproto would refuse, so we can answer it ourselves."""
    if head.method != "GET" or head.header("sec-websocket-key") is None:
        return 400
    connection = head.header("connection") or b""
    if b"upgrade" not in connection.lower():
        return 400
    if (head.header("sec-websocket-version") or b"").strip() != b"13":
        return 426
    return None


async def handle_stream(server: Server, stream: trio.abc.Stream) -> None:
    """Everything that happens on one accepted TCP connection."""
    remote = _peer(stream)
    config = server.config
    counted = False
    try:
        if config.max_connections and server.open_streams >= config.max_connections:
            if server.tls is not None:  # a plain-text 503 would read as a TLS failure: just close
                log_refusal(remote, "max-connections", str(config.max_connections))
                return
            await refuse_connection(stream, remote, config.max_connections)
            return
        server.open_streams += 1
        counted = True
        head: RequestHead | int | None = None
        with trio.move_on_after(config.registration_timeout) as deadline:  # LIM-2
            if server.tls is not None:  # the TLS handshake counts against LIM-2 too
                tls_stream = await accept_tls(stream, server.tls.context, remote)
                if tls_stream is None:
                    return
                stream = tls_stream
            head = await read_head(stream, config.max_header_size)
        if deadline.cancelled_caught:
            log_refusal(remote, "registration-timeout", f"{config.registration_timeout:g}s for the request head")
            return
        if head is None:
            return
        if isinstance(head, int):
            if head == 431:
                log_refusal(remote, "max-header-size", f"{config.max_header_size} bytes; 431")
            await send_simple_response(stream, head, _detail(head))
            return
        if not head.is_websocket_upgrade:
            await server.http.handle(stream, head, remote)
            return
        if head.path != "/ws":
            await send_simple_response(stream, 404, b'{"detail":"Not Found"}')
            return
        if not origin_ok(head, server.allowed_origins) or not credential_ok(
            head, server.api_key_bytes
        ):
            log.info("%s: WebSocket handshake refused (403) for %s", remote, head.loggable_target)
            await send_simple_response(stream, 403, b'{"detail":"Forbidden"}')
            return
        problem = handshake_problem(head)
        if problem is not None:
            extra = [(b"sec-websocket-version", b"13")] if problem == 426 else None
            await send_simple_response(stream, problem, _detail(problem), extra)
            return
        raw = head.raw
        head = None  # the parsed head (h11 state, headers) need not live as long as the socket
        await _serve_websocket(server, stream, raw, remote)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        # The error boundary of one connection: a bug here must never take the server down.
        log.exception("%s: unexpected error; connection dropped", remote)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await trio.aclose_forcefully(stream)
        if counted:
            server.open_streams -= 1


def _detail(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return json.dumps({"detail": phrase}).encode()


async def _serve_websocket(
    server: Server, stream: trio.abc.Stream, raw: bytes, remote: str
) -> None:
    config = server.config
    async with trio.open_nursery() as nursery:
        ws: ServerWebSocket | None = None
        with trio.move_on_after(config.registration_timeout):
            request = await open_server_websocket(
                nursery, _ReplayStream(stream, raw), config, socket_stream=stream
            )
            accepted = await request.accept()
            assert isinstance(accepted, ServerWebSocket)
            ws = accepted
        if ws is None:  # wsproto refused the handshake (e.g. no key)
            nursery.cancel_scope.cancel()
            return
        conn = Connection(
            context=server.context,
            sessions=server.sessions,
            ws=ws,
            stream=stream,
            nursery=nursery,
            remote=remote,
        )
        log.info("%s connected", remote)
        server.connections.add(conn)
        try:
            await conn.run(server.handler)
        finally:
            server.connections.discard(conn)
            nursery.cancel_scope.cancel()


def _peer(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "memory"
    try:
        host, port, *_ = sock.getpeername()
    except (OSError, ValueError):
        return "?"
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
