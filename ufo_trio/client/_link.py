"""One registered WebSocket connection to the server: connect, register, send, receive, close.

This is the single place where the SDK touches trio-websocket, and so the single place where
its exceptions become the SDK's (`ConnectFailed`, `AuthenticationFailed`, `RegistrationRefused`,
`ConnectionLost`). Sends go through one lock (one writer per connection) and are bounded by a
timeout; after a failed or timed-out send the link counts as lost, because a send cut short
may have left half a frame on the wire.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ._errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    ProtocolViolation,
    RegistrationRefused,
    TLSError,
)
from ._tls import client_context, handshake
from ._util import raise_single_error
from ._wire import FrameError, ServerFrame, encode, parse_server_frame

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Mapping

logger = logging.getLogger("ufo_trio.client")


class WebSocket(Protocol):
    """The part of trio-websocket's connection the SDK uses (imported lazily: it is slow)."""

    async def send_message(self, message: str | bytes) -> None: ...
    async def get_message(self) -> str | bytes: ...
    async def ping(self, payload: bytes | None = None) -> None: ...
    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


#: How long the WebSocket closing handshake may take before the socket is simply closed.
CLOSE_TIMEOUT = 5.0
#: Writing one frame may take this long before the connection counts as lost.
SEND_TIMEOUT = 30.0
#: Both real clients accept frames up to 100 MiB (COMPAT-13); results can be screenshots.
MAX_MESSAGE_SIZE = 100 * 1024 * 1024
#: trio-websocket's own queue between its reader and us; small, our reader drains it at once.
MESSAGE_QUEUE_SIZE = 8
#: Bytes per socket read; trio-websocket's default of 4 KiB is slow for large frames.
RECEIVE_BUFFER_SIZE = 64 * 1024


def check_url(url: str) -> None:
    """Raise `ValueError` unless *url* is a usable ``ws://`` or ``wss://`` URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"server URL must start with ws:// or wss://, got {redact(url)!r}")
    try:
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise ValueError(f"server URL has an invalid port: {redact(url)!r}") from None
    if not parts.hostname:
        raise ValueError(f"server URL has no host: {redact(url)!r}")


def with_token(url: str, api_key: str | None) -> str:
    """*url* carrying *api_key* as the ``token`` query parameter (AUTH-1, COMPAT-1).

    The query parameter, rather than a Bearer header, works with the original UFO server too.
    With ``api_key=None`` the URL is left as it is.
    """
    if api_key is None:
        return url
    parts = urllib.parse.urlsplit(url)
    query = [
        (k, v)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if k != "token"
    ]
    query.append(("token", api_key))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def redact(url: str) -> str:
    """*url* with any ``token`` value replaced by ``***``, for messages and logs (AUTH-3)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.query:
        return url
    query = [
        (k, "***" if k == "token" else v)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urllib.parse.urlunsplit(
        parts._replace(query=urllib.parse.urlencode(query, safe="*"))
    )


@attrs.define(eq=False)
class Link:
    """A registered connection. Create with `open_link`; safe to use from several tasks."""

    ws: WebSocket
    url: str  # redacted, for messages
    send_timeout: float
    confirmation: ServerFrame | None = None
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _lost: ConnectionLost | None = None

    @property
    def lost(self) -> ConnectionLost | None:
        """Why the link is unusable, or ``None`` while it is fine."""
        return self._lost

    def _error(self) -> ConnectionLost:
        # A fresh exception per raise: one object raised from several tasks would collect
        # a confusing, ever-growing traceback.
        assert self._lost is not None
        return ConnectionLost(str(self._lost), code=self._lost.code, reason=self._lost.reason)

    def _closed(self, exc: BaseException) -> ConnectionLost:
        if self._lost is None:
            reason = getattr(exc, "reason", None)
            code = getattr(reason, "code", None)
            text = getattr(reason, "reason", None)
            detail = f" (close code {code}{': ' + text if text else ''})" if code else ""
            self._lost = ConnectionLost(
                f"connection to {self.url} was closed{detail}", code=code, reason=text
            )
        return self._error()

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Send one frame. Raises `ConnectionLost` if the connection is (or becomes) unusable."""
        from trio_websocket import ConnectionClosed

        if self._lost is not None:
            raise self._error()
        data = encode(frame)
        try:
            with trio.fail_after(self.send_timeout):
                async with self._send_lock:
                    if self._lost is not None:
                        raise self._error()
                    await self.ws.send_message(data)
        except ConnectionClosed as exc:
            raise self._closed(exc) from None
        except trio.TooSlowError:
            if self._lost is None:
                self._lost = ConnectionLost(
                    f"sending to {self.url} took longer than {self.send_timeout:g} s"
                )
            # A send cut short may leave half a frame behind: close the connection so that
            # the reader (and everyone waiting on it) learns at once.
            await self._close_now()
            raise self._error() from None

    async def receive(self) -> ServerFrame:
        """The next valid server frame; frames a client must drop (COMPAT-4) are logged and
        skipped. Raises `ConnectionLost` when the connection ends."""
        from trio_websocket import ConnectionClosed

        while True:
            if self._lost is not None:
                raise self._error()
            try:
                data = await self.ws.get_message()
            except ConnectionClosed as exc:
                raise self._closed(exc) from None
            try:
                return parse_server_frame(data)
            except FrameError as exc:
                logger.warning("dropped a server frame from %s: %s", self.url, exc)

    async def ping(self, wait: float) -> None:
        """Ping the server and wait for the pong; `ConnectionLost` if none within *wait* s."""
        from trio_websocket import ConnectionClosed

        if self._lost is not None:
            raise self._error()
        try:
            with trio.move_on_after(wait) as scope:
                await self.ws.ping()
        except ConnectionClosed as exc:
            raise self._closed(exc) from None
        if scope.cancelled_caught:
            if self._lost is None:
                self._lost = ConnectionLost(f"no pong from {self.url} within {wait:g} s")
            raise self._error()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close politely; shielded and bounded, so it is safe in ``finally`` blocks."""
        if self._lost is None:
            self._lost = ConnectionLost(f"connection to {self.url} was closed by this client")
        await self._close_now(code, reason)

    async def _close_now(self, code: int = 1000, reason: str | None = None) -> None:
        # trio-websocket closes the TCP stream itself if the closing handshake is cut short.
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await self.ws.aclose(code, reason)


def _endpoint(url: str) -> tuple[str, int, str, str, bool]:
    """(host, port, Host header, request target, tls) for a checked ws:// or wss:// URL."""
    parts = urllib.parse.urlsplit(url)
    tls = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port in (80, 443) else f"{shown_host}:{port}"
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return host, port, host_header, target, tls


async def _hold_websocket(
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
    host_header: str,
    target: str,
    *,
    task_status: trio.TaskStatus[tuple[WebSocket, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the WebSocket handshake, then keep trio-websocket's reader task alive until our
    caller cancels the returned scope.

    After the handshake the scope is shielded: when the link's owner is cancelled, the
    reader must keep running for the closing handshake in `Link.close` to get its answer
    (bounded by `CLOSE_TIMEOUT` there). Without it every cancelled close would wait out the
    full timeout.
    """
    from trio_websocket import wrap_client_stream

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,
                host_header,
                target,
                max_message_size=MAX_MESSAGE_SIZE,
                message_queue_size=MESSAGE_QUEUE_SIZE,
                receive_buffer_size=RECEIVE_BUFFER_SIZE,
            )
            scope.shield = True
            task_status.started((ws, scope))
            await trio.sleep_forever()


def _os_reason(exc: OSError) -> str:
    """A short reason for a failed connect; trio reports several attempts as one group."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        leaves = [e for e in cause.exceptions if isinstance(e, OSError)]
        if leaves:
            exc = leaves[0]
    reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
    if isinstance(exc, ConnectionRefusedError):
        reason += " (is the server running?)"
    return reason


def _rejection(exc: BaseException, shown: str) -> BaseException:
    """The `ConnectFailed` that *exc* means if it is a refused handshake, else *exc* itself."""
    from trio_websocket import ConnectionRejected

    if not isinstance(exc, ConnectionRejected):
        return exc
    status = exc.status_code
    if status == 403:
        return AuthenticationFailed(
            f"{shown} refused the connection (HTTP 403): the API key is wrong or missing "
            "(or the Origin is not allowed)"
        )
    if status == 400 and b"speaks TLS" in (getattr(exc, "body", None) or b""):
        return TLSError(f"{shown} speaks TLS on this port: use a wss:// URL")
    if status == 404:
        return ConnectFailed(
            f"{shown} has no WebSocket endpoint at this path (HTTP 404); "
            "the server's endpoint is /ws"
        )
    return ConnectFailed(f"{shown} refused the WebSocket handshake (HTTP {status})")


@asynccontextmanager
async def open_link(
    url: str,
    *,
    api_key: str | None,
    register: Mapping[str, Any],
    client_id: str,
    connect_timeout: float,
    registration_timeout: float,
    send_timeout: float = SEND_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Link]:
    """Connect to *url*, send *register* and wait for the verdict (§3.1).

    ``wss://`` URLs use *ssl_context* (default: `client_context()`, the system trust store).
    Raises `ValueError` for a malformed URL, `AuthenticationFailed` for HTTP 403 at the
    handshake, `TLSError` when TLS fails (untrusted, expired or wrong-host certificate, or
    the URL's scheme does not match the port), `ConnectFailed` when the server cannot be
    reached, `RegistrationRefused` when
    the verdict is an ERROR, `ConnectionLost` if the connection ends before the verdict and
    `ProtocolViolation` if the verdict is neither ``heartbeat``/``ok`` nor ``error``.
    An exception raised by the block itself comes out unchanged.
    """
    # We open the TCP stream ourselves (rather than trio-websocket's open_websocket_url) so
    # that it is closed on every path: trio-websocket leaves the socket of a rejected
    # handshake open.
    check_url(url)
    shown = redact(url)
    host, port, host_header, target, tls = _endpoint(with_token(url, api_key))
    stream: trio.abc.Stream
    try:
        with trio.fail_after(connect_timeout):
            if tls:
                tls_stream = await trio.open_ssl_over_tcp_stream(
                    host,
                    port,
                    ssl_context=ssl_context or client_context(),
                    https_compatible=True,
                )
                stream = tls_stream
                try:
                    await handshake(tls_stream, shown)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
                    raise
            else:
                stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise ConnectFailed(
            f"cannot connect to {shown}: no connection within {connect_timeout:g} s"
        ) from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {shown}: {_os_reason(exc)}") from None
    except trio.BrokenResourceError:
        raise ConnectFailed(f"cannot connect to {shown}: the connection was closed") from None

    opened = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(connect_timeout) as scope:
                ws, reader_scope = await nursery.start(_hold_websocket, stream, host_header, target)
            if scope.cancelled_caught:
                raise ConnectFailed(
                    f"cannot connect to {shown}: no WebSocket handshake within "
                    f"{connect_timeout:g} s"
                )
            link = Link(ws=ws, url=shown, send_timeout=send_timeout)
            try:
                await link.send(register)
                with trio.move_on_after(registration_timeout) as scope:
                    verdict = await link.receive()
                if scope.cancelled_caught:
                    raise ProtocolViolation(
                        f"{shown} sent no registration verdict within {registration_timeout:g} s"
                    )
                if verdict.type == "error":
                    raise RegistrationRefused(
                        client_id, verdict.error or "registration refused", verdict.code
                    )
                if verdict.type != "heartbeat" or verdict.status != "ok":
                    raise ProtocolViolation(
                        f"{shown} answered REGISTER with a {verdict.type}/{verdict.status} "
                        "frame instead of heartbeat/ok or error"
                    )
                link.confirmation = verdict
                opened = True
                yield link
            finally:
                await link.close()
                reader_scope.cancel()
    except BaseExceptionGroup as group:
        # Before the verdict, trio-websocket's refusal of the handshake means a failed connect.
        raise_single_error(group, None if opened else lambda error: _rejection(error, shown))
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
