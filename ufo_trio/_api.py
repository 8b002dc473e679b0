"""The HTTP API of §6: the steps every request goes through, the route table and the handlers.

`Api.respond` answers one request that `_http` has read; it never touches the socket. A request
goes through these steps in order (§6):

1. a WebSocket upgrade on a kept-alive connection → 400; a plain request to `/ws` → 426 (EP-1);
2. Host check (AUTH-5) when the server is bound to loopback → 403 `Invalid Host header`;
3. route match → 404 `Not Found` / 405 `Method Not Allowed` (with `Allow`);
4. API key (AUTH-4), unless the route is marked `needs_key=False`: `X-API-Key` or
   `Authorization: Bearer` → 401 `Missing API key` / `Invalid API key`, with
   `WWW-Authenticate: Bearer`;
5. the handler, which returns a `Reply` or a `StreamReply`.

A handler is `async def handler(ctx: ApiContext, request: Request) -> Reply | StreamReply`; it
gets only the `ApiContext` (the shared `ServerContext` plus the sessions), never `Server`.
Request bodies are read only by handlers that call `await request.body()`, so nobody without the
key gets a body buffered. Adding an endpoint is one `Route` row in `ROUTES` plus its handler.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Protocol

import attrs
import trio

from ._codec import shown
from ._context import ServerContext
from ._dashboard import ROUTES as DASHBOARD_PATHS
from ._dashboard import Dashboard
from ._errors import ConnectionGone
from ._http import (
    HttpConnection,
    PeerGone,
    Refused,
    Reply,
    RequestHead,
    error_reply,
    host_allowed,
    is_loopback_host,
    json_reply,
    status_reply,
)
from ._messages import ServerMessage, ServerMessageType, TaskStatus, new_id
from ._metrics import MetricsExporter
from ._sessions import sanitize_task_name
from ._store import BadQuery, StoreUnavailable, parse_task_query

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence

    from ._config import ServerConfig
    from ._http import StreamReply
    from ._sessions import ResultStore, Session
    from ._store import TaskStore

    #: What a route calls: the API's narrow context and the request → the answer.
    Handler = Callable[["ApiContext", "Request"], Awaitable["Reply | StreamReply"]]

log = logging.getLogger("ufo_trio")

MISSING_KEY: Final = "Missing API key"
INVALID_KEY: Final = "Invalid API key"
INVALID_HOST: Final = "Invalid Host header"
NOT_FOUND: Final = "Not Found"
METHOD_NOT_ALLOWED: Final = "Method Not Allowed"
UPGRADE_REQUIRED: Final = "WebSocket upgrade required"
NOT_AN_OBJECT: Final = "Request body must be a JSON object"
EMPTY_TASK: Final = "Empty task content"
EMPTY_CLIENT: Final = "Empty client ID"
INVALID_TASK_NAME: Final = (
    "Invalid task_name: must be a non-empty string of characters [A-Za-z0-9._-] "
    "and must not start with '.'"
)
CLIENT_NOT_ONLINE: Final = "Client not online"
SEND_FAILED: Final = "Failed to send task to client"
TASK_NOT_FOUND: Final = "Task not found"

#: HTTP-3 step 3: a dispatch `task_name` is checked, not sanitised.
_TASK_NAME: Final = re.compile(r"[A-Za-z0-9._-]+")


# ------------------------------------------------------------------------ what handlers get


class SessionsView(Protocol):
    """The sessions as the API reads them: live ones in start order, and finished outcomes."""

    @property
    def live(self) -> Mapping[str, Session]: ...

    @property
    def results(self) -> ResultStore: ...


@attrs.frozen(kw_only=True, eq=False)
class ApiContext:
    """What the API and every handler get: the server's shared context plus the sessions.

    `shared` holds config, registry (the TASK assignment of HTTP-3 is sent through a registry
    entry's connection), credentials and shutdown state, and later the subsystems (task store,
    metrics, event stream); handlers never see `Server`.
    """

    shared: ServerContext
    sessions: SessionsView
    #: `GET /metrics` (None: metrics are off, the route is not in the table).
    exporter: MetricsExporter | None = None
    #: The dashboard's files (`GET /`, `/dashboard`, assets); None: those paths answer 404.
    dashboard: Dashboard | None = None


@attrs.frozen
class Request:
    """One request as a handler sees it: its head, the path parameters, and its body on demand."""

    head: RequestHead
    #: Values of the route's `{name}` segments, still percent-encoded.
    params: Mapping[str, str]
    remote: str
    _http: HttpConnection

    async def body(self) -> bytes:
        """The whole body; raises `Refused` (413, 400) or `PeerGone` (LIM-2), which `Api`
        turns into the answer (or none)."""
        return await self._http.read_body()


# ---------------------------------------------------------------------------------- routes


@attrs.frozen
class Route:
    """One row of the route table: method and path pattern → handler.

    A pattern is a path whose segments are literal or `{name}` (one non-empty segment, passed to
    the handler in `Request.params`). `needs_key=False` skips AUTH-4 (a public page or asset);
    the Host check of AUTH-5 still applies.
    """

    method: str
    pattern: str
    handler: Handler
    needs_key: bool = True
    _segments: tuple[str, ...] = attrs.field(init=False, repr=False, eq=False)

    @_segments.default
    def _split(self) -> tuple[str, ...]:
        return tuple(self.pattern.split("/"))

    def params(self, path: str) -> dict[str, str] | None:
        """The `{name}` values if `path` matches the pattern, else None."""
        parts = path.split("/")
        if len(parts) != len(self._segments):
            return None
        params: dict[str, str] = {}
        for want, have in zip(self._segments, parts, strict=True):
            if want.startswith("{") and want.endswith("}"):
                if not have:
                    return None
                params[want[1:-1]] = have
            elif want != have:
                return None
        return params


@attrs.frozen
class RouteMatch:
    """The route for a request (None: the path exists, the method does not → 405)."""

    route: Route | None
    params: Mapping[str, str]
    #: The methods the path accepts (the `Allow` header of a 405).
    allow: tuple[str, ...]


def match_route(method: str, path: str, routes: Iterable[Route]) -> RouteMatch | None:
    """Find the route for `method` and `path`; None if no route has the path (404)."""
    allow: list[str] = []
    for route in routes:
        params = route.params(path)
        if params is None:
            continue
        if route.method == method:
            return RouteMatch(route, params, (method,))
        if route.method not in allow:
            allow.append(route.method)
    if not allow:
        return None
    return RouteMatch(None, {}, tuple(allow))


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


class Api:
    """The HTTP API of one server: the steps of §6 over a route table (default `ROUTES`)."""

    def __init__(self, ctx: ApiContext, routes: Sequence[Route] | None = None) -> None:
        self.ctx = ctx
        self.routes: Sequence[Route] = routes_for(ctx.shared.config) if routes is None else routes
        self.check_host = is_loopback_host(ctx.shared.config.host)

    async def respond(self, http: HttpConnection, head: RequestHead) -> Reply | StreamReply:
        """The answer to one request. Raises `PeerGone` if the peer left while we read it."""
        if head.is_websocket_upgrade:
            # Only the first request of a connection can become a WebSocket (the endpoint
            # routes it); a later one on a kept-alive connection cannot be handed over.
            return status_reply(400)
        if head.path == "/ws":  # EP-1: a plain request to the WebSocket path
            return error_reply(426, UPGRADE_REQUIRED)
        if self.check_host and not host_allowed(head.headers.get("host", [])):  # AUTH-5
            return error_reply(403, INVALID_HOST)
        match = match_route(head.method, head.path, self.routes)
        if match is None:
            return error_reply(404, NOT_FOUND)
        route = match.route
        if route is None:
            allow = ", ".join(match.allow).encode()
            return error_reply(405, METHOD_NOT_ALLOWED, headers=((b"allow", allow),))
        if route.needs_key:
            problem = api_key_problem(head, self.ctx.shared.auth.api_key)  # AUTH-4
            if problem is not None:
                return error_reply(401, problem, headers=((b"www-authenticate", b"Bearer"),))
        try:
            return await route.handler(self.ctx, Request(head, match.params, http.remote, http))
        except Refused as refused:
            return refused.reply
        except (PeerGone, trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception:
            # The error boundary of one request: answer 500 and close, keep the server up.
            log.exception("%s: internal error in %s %s", http.remote, head.method, head.path)
            return error_reply(500, "Internal Server Error", close=True)


# -------------------------------------------------------------- handlers: clients and health


async def list_clients(ctx: ApiContext, request: Request) -> Reply:
    """HTTP-1: every registered id, both roles, in registration order."""
    return json_reply(200, {"online_clients": ctx.shared.registry.online_ids()})


async def health(ctx: ApiContext, request: Request) -> Reply:
    """HTTP-2: as HTTP-1 plus `status` (the key is required, as for every route)."""
    return json_reply(
        200, {"status": "healthy", "online_clients": ctx.shared.registry.online_ids()}
    )


# --------------------------------------------------------------------- handlers: dispatch


async def dispatch(ctx: ApiContext, request: Request) -> Reply:
    """HTTP-3: validate in the spec's order, then queue the TASK assignment."""
    body = await request.body()
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return error_reply(422, NOT_AN_OBJECT)
    if type(obj) is not dict:
        return error_reply(422, NOT_AN_OBJECT)
    user_request = obj.get("request")
    if type(user_request) is not str or not user_request:
        return error_reply(400, EMPTY_TASK)
    client_id = obj.get("client_id")
    if type(client_id) is not str or not client_id:
        return error_reply(400, EMPTY_CLIENT)
    if "task_name" in obj:
        task_name = obj["task_name"]
        if (
            type(task_name) is not str
            or _TASK_NAME.fullmatch(task_name) is None
            or task_name.startswith(".")
        ):
            return error_reply(400, INVALID_TASK_NAME)
    else:
        task_name = new_id()
    entry = ctx.shared.registry.get(client_id)
    if entry is None:
        return error_reply(404, CLIENT_NOT_ONLINE)
    session_id = new_id()
    remote = request.remote
    try:
        await entry.connection.send(
            ServerMessage(
                type=ServerMessageType.TASK,
                status=TaskStatus.CONTINUE,
                user_request=user_request,
                task_name=task_name,
                session_id=session_id,
                response_id=new_id(),
            )
        )
    except ConnectionGone:
        log.info("%s: dispatch of task %s to %s failed", remote, shown(task_name), shown(client_id))
        return error_reply(500, SEND_FAILED)
    # COMPAT-16: ids and sizes only, never the request text.
    log.info(
        "%s: dispatched task %s to %s (%d characters)",
        remote,
        shown(task_name),
        shown(client_id),
        len(user_request),
    )
    return json_reply(
        200,
        {
            "status": "dispatched",
            "task_name": task_name,
            "client_id": client_id,
            "session_id": session_id,
        },
    )


# ----------------------------------------------------------------- handlers: task results


async def task_result(ctx: ApiContext, request: Request) -> Reply:
    """HTTP-4: never blocks; pending while a live session has the name or it is unknown.

    Latest by name (RES-1): a live session, then this run's outcomes in memory, then a task
    history file (earlier runs, or an outcome the bounded memory store has let go), read in a
    thread. With `--db :memory:` the answer is what it always was (nothing outlives the run).
    """
    name = sanitize_task_name(urllib.parse.unquote(request.params["task_name"]))
    sessions = ctx.sessions
    if any(s.task_name == name for s in sessions.live.values()):
        return json_reply(200, {"status": "pending"})
    record = sessions.results.by_task_name(name)
    if record is None:
        store = ctx.shared.store
        if store is None or not store.persistent:
            return json_reply(200, {"status": "pending"})
        try:
            return json_reply(200, await store.task_result(name))
        except StoreUnavailable as exc:
            return error_reply(503, str(exc))
    if record.status == TaskStatus.COMPLETED.value:
        return json_reply(200, {"status": "done", "result": record.result})
    return json_reply(200, {"status": "failed", "error": record.error, "result": record.result})


# ------------------------------------------------------------------ handlers: task history


async def _history(ctx: ApiContext, read: Callable[[TaskStore], Awaitable[Reply]]) -> Reply:
    """Run one read of the task history: 400 for bad parameters, 503 if it is unavailable."""
    store = ctx.shared.store
    if store is None:
        return error_reply(503, "Task history is not available")
    try:
        return await read(store)
    except BadQuery as exc:
        return error_reply(400, str(exc))
    except StoreUnavailable as exc:
        return error_reply(503, str(exc))


async def list_tasks(ctx: ApiContext, request: Request) -> Reply:
    """GET /api/tasks: newest first, filtered, cursor-paginated (issue 11)."""

    async def read(store: TaskStore) -> Reply:
        params = dict(urllib.parse.parse_qsl(request.head.query, keep_blank_values=True))
        return json_reply(200, await store.list_tasks(parse_task_query(params)))

    return await _history(ctx, read)


async def task_detail(ctx: ApiContext, request: Request) -> Reply:
    """GET /api/tasks/{session_id}: the summary plus request, result and step transcript."""

    async def read(store: TaskStore) -> Reply:
        detail = await store.task_detail(urllib.parse.unquote(request.params["session_id"]))
        return error_reply(404, TASK_NOT_FOUND) if detail is None else json_reply(200, detail)

    return await _history(ctx, read)


async def list_devices(ctx: ApiContext, request: Request) -> Reply:
    """GET /api/devices: every client ever seen, the online ones merged with live data."""

    async def read(store: TaskStore) -> Reply:
        return json_reply(200, await store.devices())

    return await _history(ctx, read)


# ---------------------------------------------------------------------- handlers: sessions


async def list_sessions(ctx: ApiContext, request: Request) -> Reply:
    """HTTP-5: live sessions in start order, exactly six keys each (CLAR-6)."""
    return json_reply(
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
                for s in ctx.sessions.live.values()
            ]
        },
    )


# ------------------------------------------------------------- handlers: metrics, dashboard


async def metrics(ctx: ApiContext, request: Request) -> Reply:
    """`GET /metrics`: the Prometheus text format (issue 12), rendered on the Trio thread."""
    if ctx.exporter is None:
        return error_reply(404, NOT_FOUND)
    content_type, body = ctx.exporter.render()
    return Reply(200, ((b"content-type", content_type.encode()),), body)


async def dashboard_file(ctx: ApiContext, request: Request) -> Reply:
    """The dashboard page and its assets, from memory, with their own security headers; 304 for
    a matching `If-None-Match`. No key: the files hold no data (docs/security.md)."""
    file = None if ctx.dashboard is None else ctx.dashboard.lookup(request.head.path)
    if file is None:
        return error_reply(404, NOT_FOUND)
    headers = tuple((name.lower().encode(), value.encode()) for name, value in file.headers)
    etags = request.head.header("if-none-match")
    if etags is not None and file.matches(etags.decode("latin-1")):
        return Reply(304, headers)
    return Reply(200, headers, file.body)


#: The route table. A new endpoint is one row here plus its handler above.
ROUTES: Final[tuple[Route, ...]] = (
    Route("GET", "/api/clients", list_clients),
    Route("GET", "/api/health", health),
    Route("POST", "/api/dispatch", dispatch),
    Route("GET", "/api/task_result/{task_name}", task_result),
    Route("GET", "/api/sessions", list_sessions),
    Route("GET", "/api/tasks", list_tasks),
    Route("GET", "/api/tasks/{session_id}", task_detail),
    Route("GET", "/api/devices", list_devices),
    *(Route("GET", path, dashboard_file, needs_key=False) for path in DASHBOARD_PATHS),
)


def routes_for(config: ServerConfig) -> tuple[Route, ...]:
    """The table of a server with this configuration: `ROUTES`, plus `GET /metrics` unless
    metrics are off (keyed unless `--metrics-public`)."""
    if not config.metrics:
        return ROUTES
    return (*ROUTES, Route("GET", "/metrics", metrics, needs_key=not config.metrics_public))
