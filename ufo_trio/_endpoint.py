"""The single TCP endpoint: read an HTTP request head, then route it (EP-1, AUTH-1/2, LIM-2/3).

* an upgrade to `/ws` that passes the Origin and key checks becomes a WebSocket connection;
* an upgrade to any other path gets 404, a failed check 403 (before any frame is exchanged);
* anything else is plain HTTP and goes to `_http` on the same parsed request.

The head is parsed with h11 once. For upgrades, the bytes already read are replayed into
trio-websocket through `_ReplayStream`, so the handshake itself stays trio-websocket's.
"""

from __future__ import annotations

import hmac
import logging
import urllib.parse
from typing import TYPE_CHECKING

import trio

from ._connection import Connection
from ._http import HttpConnection, RequestHead
from ._limits import log_refusal
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
    metrics = server.context.metrics
    counted = False
    try:
        if config.max_connections and server.open_streams >= config.max_connections:
            if server.tls is not None:  # a plain-text 503 would read as a TLS failure: just close
                log_refusal(metrics, remote, "max-connections", str(config.max_connections))
                return
            await HttpConnection(stream, remote, config, metrics).refuse_connection()
            return
        server.open_streams += 1
        counted = True
        deadline = trio.current_time() + config.registration_timeout  # LIM-2
        if server.tls is not None:  # the TLS handshake counts against LIM-2 too
            tls_stream = None
            with trio.move_on_at(deadline) as handshake:
                tls_stream = await accept_tls(stream, server.tls.context, remote, config, metrics)
            if handshake.cancelled_caught:
                log_refusal(
                    metrics,
                    remote,
                    "registration-timeout",
                    f"{config.registration_timeout:g}s for the TLS handshake",
                )
            if tls_stream is None:
                return
            stream = tls_stream
        http = HttpConnection(stream, remote, config, metrics)
        head = await http.read_head(deadline)  # LIM-2, LIM-3
        if head is None:
            return
        if isinstance(head, int):
            await http.refuse(head)
            return
        if not head.is_websocket_upgrade:
            await server.http.serve(http, head)
            return
        if head.path != "/ws":
            await http.refuse(404)
            return
        if not origin_ok(head, server.allowed_origins) or not credential_ok(
            head, server.api_key_bytes
        ):
            log.info("%s: WebSocket handshake refused (403) for %s", remote, head.loggable_target)
            await http.refuse(403)
            return
        problem = handshake_problem(head)
        if problem is not None:
            extra = ((b"sec-websocket-version", b"13"),) if problem == 426 else ()
            await http.refuse(problem, headers=extra)
            return
        raw = head.raw
        # The parsed head (h11 state, headers) need not live as long as the socket.
        del head, http
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
