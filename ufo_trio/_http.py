"""Plain HTTP on the WebSocket's port: the JSON API of §6 and the 426 of EP-1.

The endpoint has parsed the first request head with h11 (under LIM-2) and hands over the
`h11.Connection` that did it. This module reads the body with that same connection, answers, and
keeps the connection alive for the next request (`start_next_cycle`), reading each next head
again under `--registration-timeout`. Everything runs in the endpoint's one task per TCP
connection; there is no task per request, and every await has a deadline.

Each request goes through these steps in order (§6):

1. Host check (AUTH-5) when the server is bound to loopback → 403 `Invalid Host header`;
2. route match → 404 `Not Found` / 405 `Method Not Allowed`;
3. API key (AUTH-4): `X-API-Key` or `Authorization: Bearer` → 401 `Missing API key` /
   `Invalid API key`, both with `WWW-Authenticate: Bearer`;
4. the handler.

Request bodies are read only by the handler that needs one (`POST /api/dispatch`), so nobody
without the key gets a body buffered; a body that is not needed is discarded, up to
`--max-body-size`, to keep the connection usable. Limits: LIM-3 (431) for every head, LIM-4
(413) for bodies, LIM-2 for slow heads and bodies (the connection is closed without an answer).
"""

from __future__ import annotations

import hmac
import http
import ipaddress
import json
import logging
import re
import urllib.parse
from typing import TYPE_CHECKING, Any, Final

import attrs
import h11
import trio

from ._codec import shown
from ._endpoint import RequestHead
from ._errors import ConnectionGone
from ._limits import linger, log_refusal
from ._messages import ServerMessage, ServerMessageType, TaskStatus, new_id
from ._sessions import sanitize_task_name

if TYPE_CHECKING:
    from ._server import Server

log = logging.getLogger("ufo_trio")

MISSING_KEY: Final = "Missing API key"
INVALID_KEY: Final = "Invalid API key"
INVALID_HOST: Final = "Invalid Host header"
NOT_FOUND: Final = "Not Found"
METHOD_NOT_ALLOWED: Final = "Method Not Allowed"
UPGRADE_REQUIRED: Final = "WebSocket upgrade required"
BODY_TOO_LARGE: Final = "Request body too large"
NOT_AN_OBJECT: Final = "Request body must be a JSON object"
EMPTY_TASK: Final = "Empty task content"
EMPTY_CLIENT: Final = "Empty client ID"
INVALID_TASK_NAME: Final = (
    "Invalid task_name: must be a non-empty string of characters [A-Za-z0-9._-] "
    "and must not start with '.'"
)
CLIENT_NOT_ONLINE: Final = "Client not online"
SEND_FAILED: Final = "Failed to send task to client"

#: AUTH-5: the Host names accepted when the server listens on loopback (any port).
_LOOPBACK_HOST: Final = re.compile(r"(?:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]*)?")
#: HTTP-3 step 3: a dispatch `task_name` is checked, not sanitised.
_TASK_NAME: Final = re.compile(r"[A-Za-z0-9._-]+")
_TASK_RESULT_PREFIX: Final = "/api/task_result/"
#: Exact routes: path → (method, handler name).
_ROUTES: Final = {
    "/api/clients": ("GET", "clients"),
    "/api/health": ("GET", "health"),
    "/api/dispatch": ("POST", "dispatch"),
    "/api/sessions": ("GET", "sessions"),
}
_RECEIVE_SIZE: Final = 65536


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


def api_key_problem(head: RequestHead, key: bytes) -> str | None:
    """AUTH-4 / AUTH-2: None if authenticated, else the 401 `detail`.

    Credentials are `X-API-Key` values and `Authorization: Bearer` tokens. None at all is
    "missing"; otherwise every one presented must equal the key (constant-time, on bytes), so
    two different keys in one request are "invalid", never a guess at which one was meant.
    """
    presented = [v.strip() for v in head.headers.get("x-api-key", ()) if v.strip()]
    for value in head.headers.get("authorization", ()):
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            presented.append(token.strip())
    if not presented:
        return MISSING_KEY
    ok = True
    for credential in presented:
        ok &= hmac.compare_digest(credential, key)
    return None if ok else INVALID_KEY


def match_route(path: str) -> tuple[str, str] | None:
    """(method, handler name) for a path, or None (404)."""
    route = _ROUTES.get(path)
    if route is not None:
        return route
    if path.startswith(_TASK_RESULT_PREFIX):
        segment = path[len(_TASK_RESULT_PREFIX) :]
        if segment and "/" not in segment:
            return ("GET", "task_result")
    return None


def _encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


@attrs.frozen
class Reply:
    """One response: status, JSON body, extra headers, and whether to close afterwards."""

    status: int
    body: Any
    headers: tuple[tuple[bytes, bytes], ...] = ()
    close: bool = False


def _error(status: int, detail: str, **kwargs: Any) -> Reply:
    return Reply(status, {"detail": detail}, **kwargs)


def _status_error(status: int) -> Reply:
    """A protocol-level refusal (400, 431, …) whose detail is the status phrase."""
    return _error(status, http.HTTPStatus(status).phrase, close=True)


class _PeerGone(Exception):
    """The peer closed, or was too slow, while we were reading its request."""


def _pending_method(conn: h11.Connection) -> str:
    """The method of a request h11 parsed but we refused (e.g. a head over LIM-3), or "".

    A refusal of a HEAD request must carry no body, or h11 refuses to frame it. h11 keeps the
    method only privately; without it we answer as for any other method.
    """
    method = getattr(conn, "_request_method", None)
    return method.decode("latin-1") if isinstance(method, bytes) else ""


class HttpApi:
    """Serves the plain-HTTP requests of one TCP connection after the endpoint read the first."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.check_host = is_loopback_host(server.config.host)
        #: Scopes of kept-alive connections waiting for their next request (`close_idle`).
        self._idle: set[trio.CancelScope] = set()

    def close_idle(self) -> None:
        """Shutdown: end every kept-alive connection that is waiting for its next request.

        Connections in the middle of a request finish it, answer with `Connection: close` and
        end; without this, an idle one would hold the shutdown for the whole grace period.
        """
        for scope in self._idle:
            scope.cancel()

    async def handle(self, stream: trio.abc.Stream, head: RequestHead, remote: str) -> None:
        """Answer `head` and every further request on the connection (keep-alive)."""
        conn = head.conn
        while True:
            try:
                reply = await self._answer(stream, head, remote)
            except _PeerGone:
                return
            self._log(remote, head, reply.status)
            # A client still waiting for "100 Continue" got a final answer instead; whether it
            # sends the body now is up to it, so this connection cannot be reused safely.
            unsent_body = conn.they_are_waiting_for_100_continue
            if not await self._send(stream, conn, reply, head.method):
                return
            stop = reply.close or unsent_body or self.server.shutting_down
            if stop or not await self._next_cycle(stream, conn):
                if self._unread_input(conn):
                    await linger(stream)
                return
            next_head = await self._next_head(stream, conn, remote)
            if next_head is None:
                return
            if isinstance(next_head, int):
                await self._send(stream, conn, _status_error(next_head), _pending_method(conn))
                await linger(stream)
                return
            head = next_head

    # ------------------------------------------------------------------ the steps of §6

    async def _answer(self, stream: trio.abc.Stream, head: RequestHead, remote: str) -> Reply:
        path = head.path
        if head.is_websocket_upgrade:
            # Only the first request of a connection can become a WebSocket (the endpoint
            # routes it); a later one on a kept-alive connection cannot be handed over.
            return _status_error(400)
        if path == "/ws":  # EP-1: a plain request to the WebSocket path
            return _error(426, UPGRADE_REQUIRED)
        if self.check_host and not host_allowed(head.headers.get("host", [])):  # AUTH-5
            return _error(403, INVALID_HOST)
        route = match_route(path)
        if route is None:
            return _error(404, NOT_FOUND)
        method, name = route
        if head.method != method:
            return _error(405, METHOD_NOT_ALLOWED, headers=((b"allow", method.encode()),))
        problem = api_key_problem(head, self.server.api_key_bytes)  # AUTH-4
        if problem is not None:
            return _error(401, problem, headers=((b"www-authenticate", b"Bearer"),))
        try:
            if name == "dispatch":
                body = await self._read_body(stream, head, remote)
                if isinstance(body, Reply):
                    return body
                return await self._dispatch(body, remote)
            if name == "task_result":
                return self._task_result(path[len(_TASK_RESULT_PREFIX) :])
            if name == "sessions":
                return self._sessions()
            online = self.server.registry.online_ids()
            if name == "health":
                return Reply(200, {"status": "healthy", "online_clients": online})
            return Reply(200, {"online_clients": online})
        except (_PeerGone, trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception:
            # The error boundary of one request: answer 500 and close, keep the server up.
            log.exception("%s: internal error in %s %s", remote, head.method, path)
            return _error(500, "Internal Server Error", close=True)

    # ------------------------------------------------------------------ handlers

    async def _dispatch(self, body: bytes, remote: str) -> Reply:
        """HTTP-3: validate in the spec's order, then queue the TASK assignment."""
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return _error(422, NOT_AN_OBJECT)
        if type(obj) is not dict:
            return _error(422, NOT_AN_OBJECT)
        request = obj.get("request")
        if type(request) is not str or not request:
            return _error(400, EMPTY_TASK)
        client_id = obj.get("client_id")
        if type(client_id) is not str or not client_id:
            return _error(400, EMPTY_CLIENT)
        if "task_name" in obj:
            task_name = obj["task_name"]
            if (
                type(task_name) is not str
                or _TASK_NAME.fullmatch(task_name) is None
                or task_name.startswith(".")
            ):
                return _error(400, INVALID_TASK_NAME)
        else:
            task_name = new_id()
        entry = self.server.registry.get(client_id)
        if entry is None:
            return _error(404, CLIENT_NOT_ONLINE)
        session_id = new_id()
        try:
            await entry.connection.send(
                ServerMessage(
                    type=ServerMessageType.TASK,
                    status=TaskStatus.CONTINUE,
                    user_request=request,
                    task_name=task_name,
                    session_id=session_id,
                    response_id=new_id(),
                )
            )
        except ConnectionGone:
            log.info(
                "%s: dispatch of task %s to %s failed", remote, shown(task_name), shown(client_id)
            )
            return _error(500, SEND_FAILED)
        # COMPAT-16: ids and sizes only, never the request text.
        log.info(
            "%s: dispatched task %s to %s (%d characters)",
            remote,
            shown(task_name),
            shown(client_id),
            len(request),
        )
        return Reply(
            200,
            {
                "status": "dispatched",
                "task_name": task_name,
                "client_id": client_id,
                "session_id": session_id,
            },
        )

    def _task_result(self, segment: str) -> Reply:
        """HTTP-4: never blocks; pending while a live session has the name or it is unknown."""
        name = sanitize_task_name(urllib.parse.unquote(segment))
        sessions = self.server.sessions
        if any(s.task_name == name for s in sessions.live.values()):
            return Reply(200, {"status": "pending"})
        record = sessions.results.by_task_name(name)
        if record is None:
            return Reply(200, {"status": "pending"})
        if record.status == TaskStatus.COMPLETED.value:
            return Reply(200, {"status": "done", "result": record.result})
        return Reply(200, {"status": "failed", "error": record.error, "result": record.result})

    def _sessions(self) -> Reply:
        """HTTP-5: live sessions in start order, exactly six keys each (CLAR-6)."""
        return Reply(
            200,
            {
                "sessions": [
                    {
                        "session_id": s.session_id,
                        "task_name": s.task_name,
                        "requester_id": s.requester_id,
                        "requester_type": s.requester_type,
                        "executor_id": s.executor_id,
                        "started_at": s.started_at,
                    }
                    for s in self.server.sessions.live.values()
                ]
            },
        )

    # ------------------------------------------------------------------ HTTP mechanics

    async def _read_body(
        self, stream: trio.abc.Stream, head: RequestHead, remote: str
    ) -> bytes | Reply:
        """The whole request body, or a 413/400 reply. Raises `_PeerGone` (LIM-2 on bodies)."""
        config = self.server.config
        limit = config.max_body_size
        conn = head.conn
        try:
            declared = int(head.header("content-length") or b"0")
        except ValueError:  # pragma: no cover - h11 has already rejected a bad Content-Length
            declared = 0
        if declared > limit:  # LIM-4, without reading a byte of it
            log_refusal(remote, "max-body-size", f"{limit} bytes; 413")
            return _error(413, BODY_TOO_LARGE, close=True)
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(config.registration_timeout) as deadline:
            if conn.they_are_waiting_for_100_continue:
                data = conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                if data:
                    await stream.send_all(data)
            while True:
                event = await self._next_event(stream, conn)
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > limit:  # LIM-4 for a body without a (truthful) length
                        log_refusal(remote, "max-body-size", f"{limit} bytes; 413")
                        return _error(413, BODY_TOO_LARGE, close=True)
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return b"".join(chunks)
                elif isinstance(event, int):
                    return _status_error(event)
                else:
                    raise _PeerGone
        assert deadline.cancelled_caught
        log_refusal(
            remote, "registration-timeout", f"{config.registration_timeout:g}s for the body"
        )
        raise _PeerGone

    async def _next_event(self, stream: trio.abc.Stream, conn: h11.Connection) -> Any:
        """The next h11 event, reading as needed; an int is the status for a broken request."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.trailing_data[1]:  # the peer closed mid-request: nobody to answer
                    raise _PeerGone from None
                return 431 if "too long" in str(exc).lower() else exc.error_status_hint
            if event is not h11.NEED_DATA:
                return event
            data = await stream.receive_some(_RECEIVE_SIZE)
            conn.receive_data(bytes(data))  # b"" is EOF

    async def _next_cycle(self, stream: trio.abc.Stream, conn: h11.Connection) -> bool:
        """After a response: consume what is left of the request and get ready for the next.

        False if the connection must close (the client asked for it, a body over the limit
        or too slow to arrive, or anything h11 will not reuse).
        """
        if conn.our_state is not h11.DONE:
            return False
        config = self.server.config
        discarded = 0
        with trio.move_on_after(config.registration_timeout):
            while conn.their_state is h11.SEND_BODY:
                try:
                    event = await self._next_event(stream, conn)
                except _PeerGone:
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
        return True

    async def _next_head(
        self, stream: trio.abc.Stream, conn: h11.Connection, remote: str
    ) -> RequestHead | int | None:
        """The next request on a kept-alive connection (LIM-2 and LIM-3 as for the first)."""
        if self.server.shutting_down:
            return None
        available = len(conn.trailing_data[0])  # pipelined bytes already buffered
        idle = trio.CancelScope()
        self._idle.add(idle)
        try:
            with idle:
                return await self._read_next_head(stream, conn, remote, available)
        finally:
            self._idle.discard(idle)
        return None  # cancelled by `close_idle`: the server is shutting down

    async def _read_next_head(
        self, stream: trio.abc.Stream, conn: h11.Connection, remote: str, available: int
    ) -> RequestHead | int | None:
        config = self.server.config
        limit = config.max_header_size
        with trio.move_on_after(config.registration_timeout):
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    if conn.trailing_data[1]:
                        return None  # the peer closed in the middle of a head
                    status = 431 if "too long" in str(exc).lower() else exc.error_status_hint
                    break
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(limit)
                    available += len(data)
                    conn.receive_data(bytes(data))  # b"" is EOF
                    continue
                if not isinstance(event, h11.Request):
                    return None  # the peer closed between requests
                # As in the endpoint: h11 checks the size only while the head is incomplete.
                if available - len(conn.trailing_data[0]) > limit:
                    status = 431
                    break
                return RequestHead(conn, event, b"")
            if status == 431:
                log_refusal(remote, "max-header-size", f"{limit} bytes; 431")
            return status
        if conn.trailing_data[0]:  # part of a head arrived, the rest did not: LIM-2
            log_refusal(
                remote,
                "registration-timeout",
                f"{config.registration_timeout:g}s for the request head",
            )
        return None

    async def _send(
        self, stream: trio.abc.Stream, conn: h11.Connection, reply: Reply, method: str
    ) -> bool:
        """Write one response within `send_timeout`; False if it could not be written."""
        body = _encode(reply.body)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            *reply.headers,
        ]
        if reply.close or self.server.shutting_down:
            headers.append((b"connection", b"close"))
        try:
            data = (
                conn.send(
                    h11.Response(
                        status_code=reply.status,
                        headers=headers,
                        reason=http.HTTPStatus(reply.status).phrase.encode(),
                    )
                )
                or b""
            )
            if method != "HEAD":  # a HEAD response has headers only
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # pragma: no cover - a state we never get into
            log.exception("h11 refused our response")
            return False
        with trio.move_on_after(self.server.config.send_timeout) as scope:
            await stream.send_all(data)
        return not scope.cancelled_caught

    @staticmethod
    def _unread_input(conn: h11.Connection) -> bool:
        return conn.their_state not in (h11.DONE, h11.CLOSED) or bool(conn.trailing_data[0])

    @staticmethod
    def _log(remote: str, head: RequestHead, status: int) -> None:
        level = logging.DEBUG if status < 400 else logging.INFO
        log.log(level, "%s: %s %s -> %d", remote, head.method, head.loggable_target, status)
