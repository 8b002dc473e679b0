"""HTTP/1.1 on the server's one port: reading requests and writing responses (EP-1, LIM-2/3/4).

`HttpConnection` is one accepted TCP connection seen as HTTP. One `h11.Connection` parses every
request head and body on it — the first head, which the endpoint reads to tell a WebSocket
upgrade from plain HTTP, and each next head of a kept-alive connection — and frames every
response: one reader (`read_head`, `read_body`) and one writer (`send`). What to answer is not
decided here: `HttpService.serve` asks a responder (the API of `_api.py`) for a `Reply` or a
`StreamReply` and writes it.

Everything runs in the endpoint's one task per TCP connection; there is no task per request, and
every await has a deadline: LIM-2 (`--registration-timeout`) for each head and each body, LIM-3
(431) for heads, LIM-4 (413) for bodies, `send_timeout` for each write.
"""

from __future__ import annotations

import contextlib
import http
import ipaddress
import json
import logging
import math
import re
import urllib.parse
from typing import TYPE_CHECKING, Any, Final

import attrs
import h11
import trio

from ._limits import LINGER_SECONDS, TOO_MANY_CONNECTIONS, linger, log_refusal

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from ._config import ServerConfig
    from ._context import Shutdown
    from ._metrics import Metrics

log = logging.getLogger("ufo_trio")

#: AUTH-5: the Host names accepted when the server listens on loopback (any port).
_LOOPBACK_HOST: Final = re.compile(r"(?:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]*)?")
_RECEIVE_SIZE: Final = 65536
#: Headers every response carries unless the reply sets its own value.
_DEFAULT_HEADERS: Final = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))
#: How long the end of a stream (its last chunk) may take to write once it is being closed.
_STREAM_END_TIMEOUT: Final = 1.0


def is_loopback_host(host: str) -> bool:
    """AUTH-5 applies when `--host` is 127.0.0.0/8, ::1 or `localhost`."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(values: list[bytes]) -> bool:
    """AUTH-5: exactly one Host header naming localhost, 127.0.0.1 or [::1], any port."""
    if len(values) != 1:
        return False
    return _LOOPBACK_HOST.fullmatch(values[0].decode("latin-1").strip().lower()) is not None


# ---------------------------------------------------------------------------------- values


class RequestHead:
    """A parsed HTTP request head plus the h11 connection it came from."""

    def __init__(self, conn: h11.Connection, request: h11.Request, raw: bytes) -> None:
        self.conn = conn
        self.request = request
        #: What was read from the socket while reading this head (for the first head of a
        #: connection: every byte so far, replayed into trio-websocket for an upgrade).
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
        masked = "&".join(f"{name}={'***' if name == 'token' else value}" for name, value in pairs)
        return f"{self.path}?{masked}"


@attrs.frozen
class Reply:
    """One complete response: status, headers (Content-Type included) and body bytes.

    Every response also gets Content-Length, `Cache-Control: no-store` and
    `X-Content-Type-Options: nosniff` (unless `headers` sets them) and, with `close` or while
    the server shuts down, `Connection: close`. Build JSON replies with `json_reply`.
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    close: bool = False


@attrs.frozen
class StreamReply:
    """A response whose body is written as it is produced, chunked (Server-Sent Events).

    The producer owns the send side of `chunks`, a bounded channel: it ends the response by
    closing it. The connection ends the response when the server shuts down, when a write takes
    longer than `send_timeout` or fails (the peer is gone), and then closes `chunks`, so the
    producer's next send raises `BrokenResourceError`. While nothing is produced for
    `heartbeat_interval` seconds, `heartbeat` (if any) is written, so a vanished peer is noticed
    and proxies keep the response open. A stream always ends its connection.
    """

    chunks: trio.MemoryReceiveChannel[bytes]
    status: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()
    heartbeat: bytes = b""
    heartbeat_interval: float = 15.0


def json_reply(
    status: int, value: Any, *, headers: tuple[tuple[bytes, bytes], ...] = (), close: bool = False
) -> Reply:
    """A JSON reply (compact, never NaN or Infinity)."""
    body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    return Reply(status, ((b"content-type", b"application/json"), *headers), body, close)


def error_reply(
    status: int, detail: str, *, headers: tuple[tuple[bytes, bytes], ...] = (), close: bool = False
) -> Reply:
    """The error shape of §6: `{"detail": <detail>}`."""
    return json_reply(status, {"detail": detail}, headers=headers, close=close)


def status_reply(status: int, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    """A refusal (400, 431, …) whose detail is the status phrase; the connection then closes."""
    return error_reply(status, _phrase(status), headers=headers, close=True)


def sse_reply(chunks: trio.MemoryReceiveChannel[bytes]) -> StreamReply:
    """A Server-Sent-Events stream of chunks made with `sse_event`."""
    return StreamReply(
        chunks,
        headers=((b"content-type", b"text/event-stream"),),
        heartbeat=b":\n\n",  # an SSE comment: ignored by the client
    )


def sse_event(data: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One Server-Sent Event; `data` may span lines (each becomes a `data:` line)."""
    lines = [f"event: {event}"] if event else []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


class Refused(Exception):
    """Raised while reading a request to answer `reply` instead of running the handler."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


class PeerGone(Exception):
    """The peer closed, or was too slow (LIM-2), while we were reading its request."""


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# ------------------------------------------------------------------------ one connection


class HttpConnection:
    """One accepted TCP connection spoken to as HTTP/1.1: the one reader and the one writer.

    Not safe for concurrent use: it is driven by the connection's handler task only.
    """

    def __init__(
        self, stream: trio.abc.Stream, remote: str, config: ServerConfig, metrics: Metrics
    ) -> None:
        self.stream = stream
        self.remote = remote
        self.config = config
        self.metrics = metrics
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_size)
        #: The method of the request being answered ("" before one was parsed): a response to
        #: HEAD carries no body.
        self._method = ""
        #: The declared body length of the request being answered (LIM-4 before reading).
        self._content_length: bytes | None = None
        self._first = True

    # ------------------------------------------------------------------ reading

    async def read_head(self, deadline: float | None = None) -> RequestHead | int | None:
        """The next request head; or the status to refuse with (LIM-3, malformed); or None.

        None: the peer closed, or sent no complete head by `deadline` (LIM-2; default: now +
        `--registration-timeout`; logged as a refusal for a first head and for a partly sent
        one, not for an idle kept-alive connection).
        """
        first, self._first = self._first, False
        config = self.config
        conn = self._h11
        buffered = len(conn.trailing_data[0])  # pipelined bytes already received
        raw = bytearray()
        if deadline is None:
            deadline = trio.current_time() + config.registration_timeout
        with trio.move_on_at(deadline):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    if conn.trailing_data[1]:
                        return None  # the peer closed in the middle of a head
                    status = 431 if "too long" in str(exc).lower() else exc.error_status_hint
                    break
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(config.max_header_size)
                    raw += data
                    conn.receive_data(bytes(data))  # b"" is EOF
                    continue
                if not isinstance(event, h11.Request):
                    return None  # the peer closed between requests
                # h11 checks the size only while the head is incomplete; a head that arrives
                # whole in a few large reads can be bigger than the limit (LIM-3).
                if buffered + len(raw) - len(conn.trailing_data[0]) > config.max_header_size:
                    status = 431
                    break
                head = RequestHead(conn, event, bytes(raw))
                self._method = head.method
                self._content_length = head.header("content-length")
                return head
            if status == 431:
                limit = config.max_header_size
                log_refusal(self.metrics, self.remote, "max-header-size", f"{limit} bytes; 431")
            self._method = self._pending_method()
            return status
        if first or conn.trailing_data[0]:  # LIM-2: a head was started, or is the first
            log_refusal(
                self.metrics,
                self.remote,
                "registration-timeout",
                f"{config.registration_timeout:g}s for the request head",
            )
        return None

    async def read_body(self) -> bytes:
        """The whole body of the current request.

        Raises `Refused` (413 over `--max-body-size`, LIM-4; 400 for a broken body) or
        `PeerGone` (the peer closed, or did not send the body within `--registration-timeout`).
        """
        config = self.config
        limit = config.max_body_size
        conn = self._h11
        try:
            declared = int(self._content_length or b"0")
        except ValueError:  # pragma: no cover - h11 has already rejected a bad Content-Length
            declared = 0
        if declared > limit:  # LIM-4, without reading a byte of it
            log_refusal(self.metrics, self.remote, "max-body-size", f"{limit} bytes; 413")
            raise Refused(error_reply(413, "Request body too large", close=True))
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(config.registration_timeout):
            if conn.they_are_waiting_for_100_continue:
                await self._write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            while True:
                event = await self._next_body_event()
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > limit:  # LIM-4 for a body without a (truthful) length
                        detail = f"{limit} bytes; 413"
                        log_refusal(self.metrics, self.remote, "max-body-size", detail)
                        raise Refused(error_reply(413, "Request body too large", close=True))
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return b"".join(chunks)
                elif isinstance(event, int):
                    raise Refused(status_reply(event))
                else:
                    raise PeerGone
        log_refusal(
            self.metrics,
            self.remote,
            "registration-timeout",
            f"{config.registration_timeout:g}s for the body",
        )
        raise PeerGone

    async def _next_body_event(self) -> Any:
        """The next h11 event, reading as needed; an int is the status for a broken body."""
        conn = self._h11
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.trailing_data[1]:  # the peer closed mid-request: nobody to answer
                    raise PeerGone from None
                return exc.error_status_hint
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            conn.receive_data(bytes(data))  # b"" is EOF

    async def next_cycle(self) -> bool:
        """After a response: discard what is left of the request and get ready for the next.

        False if the connection must close (the client asked for it, a body over the limit or
        too slow to arrive, or anything h11 will not reuse).
        """
        conn = self._h11
        if conn.our_state is not h11.DONE:
            return False
        config = self.config
        discarded = 0
        with trio.move_on_after(config.registration_timeout):
            while conn.their_state is h11.SEND_BODY:
                try:
                    event = await self._next_body_event()
                except PeerGone:
                    return False
                if isinstance(event, h11.Data):
                    discarded += len(event.data)
                    if discarded > config.max_body_size:
                        return False
                elif not isinstance(event, h11.EndOfMessage):
                    return False
        if conn.their_state is not h11.DONE:
            return False
        conn.start_next_cycle()
        self._method = ""
        self._content_length = None
        return True

    # ------------------------------------------------------------------ writing

    async def send(self, reply: Reply, *, closing: bool = False) -> bool:
        """Write one complete response within `send_timeout`; False if it could not be.

        `closing` (the server shuts down) adds `Connection: close` like `reply.close`.
        """
        conn = self._h11
        headers = self._headers(reply.headers, reply.close or closing)
        if reply.status != 304:  # a 304's headers describe the cached body, not this empty one
            headers.append((b"content-length", str(len(reply.body)).encode()))
        try:
            data = conn.send(self._response(reply.status, headers)) or b""
            if self._method != "HEAD":  # a HEAD response has headers only
                data += conn.send(h11.Data(data=reply.body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # pragma: no cover - a state we never get into
            log.exception("%s: h11 refused our response", self.remote)
            return False
        return await self._write(data)

    async def send_stream(self, reply: StreamReply, ended: trio.CancelScope) -> bool:
        """Write a streamed response, chunk by chunk, until it ends (see `StreamReply`).

        `ended` is the scope in which the chunks are awaited and written; cancelling it
        (shutdown) ends the response cleanly with its last chunk, unless a chunk was cut short.
        True if the response ended cleanly.
        """
        conn = self._h11
        interval = reply.heartbeat_interval if reply.heartbeat else math.inf
        writing = False
        with reply.chunks:  # closed when we stop: the producer's next send fails
            if not await self._write(
                conn.send(self._response(reply.status, self._headers(reply.headers, True)))
            ):
                return False
            if self._method != "HEAD":
                with ended:
                    while True:
                        chunk = reply.heartbeat
                        with trio.move_on_after(interval):
                            try:
                                chunk = await reply.chunks.receive()
                            except trio.EndOfChannel:
                                break
                        if chunk:
                            writing = True
                            if not await self._write(conn.send(h11.Data(data=chunk))):
                                return False
                            writing = False
                if writing:  # cancelled in the middle of a chunk: the framing is broken
                    return False
            with trio.CancelScope(shield=True), trio.move_on_after(_STREAM_END_TIMEOUT) as scope:
                await self.stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            return not scope.cancelled_caught

    async def refuse(self, status: int, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer `status` with its phrase as detail, then close (lingering if input is unread)."""
        if await self.send(status_reply(status, headers=headers)) and self.unread_input():
            await linger(self.stream)

    async def refuse_connection(self, reply: Reply | None = None) -> None:
        """Answer *reply* before reading anything, then close; by default the 503 of a TCP
        connection over `--max-connections` (logged here).

        Bounded: at most `LINGER_SECONDS` plus one small write.
        """
        if reply is None:
            limit = str(self.config.max_connections)
            log_refusal(self.metrics, self.remote, "max-connections", limit)
            reply = error_reply(
                503, TOO_MANY_CONNECTIONS, headers=((b"retry-after", b"1"),), close=True
            )
        with trio.move_on_after(LINGER_SECONDS):
            await self.send(reply)
            await linger(self.stream)

    def unread_input(self) -> bool:
        """Whether the peer may still be sending (closing now could reset our answer)."""
        conn = self._h11
        try:  # first discard what is already buffered of the request (e.g. a GET's empty body)
            while conn.their_state is h11.SEND_BODY and conn.next_event() is not h11.NEED_DATA:
                pass
        except h11.RemoteProtocolError:
            return True
        done = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)  # their request was read to its end
        return conn.their_state not in done or bool(conn.trailing_data[0])

    def _headers(
        self, extra: tuple[tuple[bytes, bytes], ...], close: bool
    ) -> list[tuple[bytes, bytes]]:
        headers = list(extra)
        names = {name.lower() for name, _ in extra}
        headers += [item for item in _DEFAULT_HEADERS if item[0] not in names]
        if close:
            headers.append((b"connection", b"close"))
        return headers

    @staticmethod
    def _response(status: int, headers: list[tuple[bytes, bytes]]) -> h11.Response:
        return h11.Response(status_code=status, headers=headers, reason=_phrase(status).encode())

    async def _write(self, data: bytes | None) -> bool:
        """The one place that writes response bytes: within `send_timeout`, False if not."""
        if not data:
            return True
        with trio.move_on_after(self.config.send_timeout) as scope:
            await self.stream.send_all(data)
        return not scope.cancelled_caught

    def _pending_method(self) -> str:
        """The method of a request h11 parsed but we refused (e.g. a bad body header), or "".

        A refusal of a HEAD request must carry no body, or h11 refuses to frame it. h11 keeps the
        method only privately; without it we answer as for any other method.
        """
        method = getattr(self._h11, "_request_method", None)
        return method.decode("latin-1") if isinstance(method, bytes) else ""


# --------------------------------------------------------------------------- one server


class HttpService:
    """The plain-HTTP side of one server (one object per server, shared by its connections).

    The endpoint hands each HTTP connection over with the first head already read; `serve`
    answers it and every next request on the connection (keep-alive) with `respond` (the API).
    At shutdown, `close_idle` ends at once what would otherwise hold the shutdown for the whole
    grace period: kept-alive connections waiting for their next request and open streams.
    """

    def __init__(
        self,
        respond: Callable[[HttpConnection, RequestHead], Awaitable[Reply | StreamReply]],
        shutdown: Shutdown,
    ) -> None:
        self._respond = respond
        self._shutdown = shutdown
        #: Scopes of waits that shutdown cancels (`close_idle`).
        self._interruptible: set[trio.CancelScope] = set()

    def close_idle(self) -> None:
        """Shutdown: end every kept-alive connection waiting for a request and every stream.

        Connections in the middle of a request finish it, answer with `Connection: close` and
        end.
        """
        for scope in self._interruptible:
            scope.cancel()

    @contextlib.contextmanager
    def _interruptible_scope(self) -> Iterator[trio.CancelScope]:
        """A cancel scope (for the caller to enter) that `close_idle` cancels."""
        scope = trio.CancelScope()
        if self._shutdown.started:
            scope.cancel()
        self._interruptible.add(scope)
        try:
            yield scope
        finally:
            self._interruptible.discard(scope)

    async def serve(self, http: HttpConnection, head: RequestHead) -> None:
        """Answer `head` and every further request on the connection (keep-alive)."""
        http.metrics.http_opened()
        try:
            await self._serve(http, head)
        finally:
            http.metrics.http_closed()

    async def _serve(self, http: HttpConnection, head: RequestHead) -> None:
        while True:
            try:
                reply = await self._respond(http, head)
            except PeerGone:
                return
            # A client still waiting for "100 Continue" got a final answer instead; whether it
            # sends the body now is up to it, so this connection cannot be reused safely.
            unsent_body = head.conn.they_are_waiting_for_100_continue
            if isinstance(reply, StreamReply):
                _log(http.remote, head, reply.status)
                with self._interruptible_scope() as scope:
                    ended = await http.send_stream(reply, scope)
                if ended and http.unread_input():
                    await linger(http.stream)
                return
            _log(http.remote, head, reply.status)
            if not await http.send(reply, closing=self._shutdown.started):
                return
            stop = reply.close or unsent_body or self._shutdown.started
            if stop or not await http.next_cycle():
                if http.unread_input():
                    await linger(http.stream)
                return
            next_head: RequestHead | int | None = None
            with self._interruptible_scope() as scope, scope:
                next_head = await http.read_head()
            if next_head is None:
                return  # closed, too slow, or cancelled by `close_idle`
            if isinstance(next_head, int):
                await http.refuse(next_head)
                return
            head = next_head


def _log(remote: str, head: RequestHead, status: int) -> None:
    level = logging.DEBUG if status < 400 else logging.INFO
    log.log(level, "%s: %s %s -> %d", remote, head.method, head.loggable_target, status)
