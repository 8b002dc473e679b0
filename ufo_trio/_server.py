"""`serve`: the listener, the connection nursery and graceful shutdown (EP-1, SHUT-1/2)."""

from __future__ import annotations

import contextlib
import datetime
import logging
import secrets
import time
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING

import attrs
import trio

from ._api import Api, ApiContext
from ._context import Auth, ServerContext
from ._dashboard import Dashboard
from ._endpoint import handle_stream
from ._handlers import AipHandler
from ._http import HttpService
from ._llm import OpenAIChatModel, build_agent
from ._metrics import Metrics, MetricsExporter, NullMetrics
from ._registry import Registry
from ._rules import SHUTTING_DOWN
from ._sessions import SessionManager
from ._store import StoreError, TaskStore
from ._store_sql import OnlineClient
from ._tls import ServerTLS, load_tls

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx

    from ._agents import AgentFactory
    from ._config import ServerConfig
    from ._connection import Connection
    from ._messages import ClientType

log = logging.getLogger("ufo_trio")


@attrs.define(eq=False)
class Server:
    """A running server, as handed back by `nursery.start(serve, config)`.

    Public attributes: `config`, `host`, `port`, `url`, `api_key`, `api_key_generated`,
    `registry` (who is online) and `sessions` (live sessions and the result store).
    Call `request_shutdown()` for the graceful stop of SHUT-1/2.

    Only the listener side (this module, the top of `_endpoint`) knows the `Server`. What
    connections, sessions and handlers share is the `context` bundle built here once
    (`_context.ServerContext`); new subsystems are constructed here and plugged into it.
    """

    config: ServerConfig
    api_key: str
    api_key_generated: bool
    agent_factory: AgentFactory
    host: str = ""
    port: int = 0
    registry: Registry = attrs.field(factory=Registry)
    #: The shared state handed to connections, sessions and handlers.
    context: ServerContext = attrs.field(init=False)
    sessions: SessionManager = attrs.field(init=False)
    #: The protocol driver every WebSocket connection runs (`Connection.run(handler)`).
    handler: AipHandler = attrs.field(init=False)
    #: The plain-HTTP side: keep-alive connections and streams, answered by the API of `_api`.
    http: HttpService = attrs.field(init=False)
    connections: set[Connection] = attrs.field(factory=set)
    #: Accepted TCP connections being served, HTTP or WebSocket (`--max-connections`).
    open_streams: int = 0
    _shutdown: trio.Event = attrs.field(factory=trio.Event)
    _stopped: trio.Event = attrs.field(factory=trio.Event)
    _nursery: trio.Nursery | None = None
    #: Built-in TLS (`--tls-cert`/`--tls-key`), or None for plain ws:// and http://.
    tls: ServerTLS | None = None
    _served: bool = False
    #: The model client of the llm agent (its HTTP connection pool), owned by `run`.
    model: OpenAIChatModel | None = None
    #: The counters (issue 12); None: built from the config (`metrics_for`).
    metrics: Metrics | None = None

    def __attrs_post_init__(self) -> None:
        config = self.config
        self.context = ServerContext(
            config=config,
            registry=self.registry,
            auth=Auth.build(self.api_key, config.allowed_origins),
            store=TaskStore.from_config(
                config,
                online=partial(online_clients, self.registry),
                secrets=self.model.settings.secrets() if self.model is not None else (),
            ),
            metrics=metrics_for(config) if self.metrics is None else self.metrics,
        )
        self.sessions = SessionManager(self.context, self.agent_factory)
        self.handler = AipHandler(self.context, self.sessions)
        exporter = None
        if config.metrics:
            exporter = MetricsExporter(
                self.context.metrics,
                registered=partial(_count_by_role, self.registry),
                live_sessions=lambda: len(self.sessions.live),
            )
        api = Api(
            ApiContext(
                shared=self.context,
                sessions=self.sessions,
                exporter=exporter,
                dashboard=Dashboard(),
            )
        )
        self.http = HttpService(api.respond, self.context.shutdown)

    # The shutdown state and the credentials live in `context`; these read them for the listener
    # side (`_endpoint`), the CLI and tests.

    @property
    def shutting_down(self) -> bool:
        """True once the graceful stop has begun."""
        return self.context.shutdown.started

    @property
    def api_key_bytes(self) -> bytes:
        return self.context.auth.api_key

    @property
    def allowed_origins(self) -> frozenset[str]:
        return self.context.auth.allowed_origins

    @property
    def url(self) -> str:
        """`ws://HOST:PORT/ws` (`wss://` with TLS) with the port actually bound (IPv6 hosts in
        brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.tls else 'ws'}://{host}:{self.port}/ws"

    def request_shutdown(self) -> None:
        """Start the graceful stop (SHUT-1/2); `serve` returns once it is complete."""
        self._shutdown.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def spawn_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one already-accepted stream (used by the listener and by in-memory tests)."""
        assert self._nursery is not None, "the server is not running"
        self._nursery.start_soon(handle_stream, self, stream)

    async def run(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on `listeners` (may be empty) until shutdown completes or we are cancelled.

        The server nursery holds the subsystems' owner tasks (the task store, opened before
        anything is accepted: `StoreError`) and the listener nursery (accept task, connection
        handlers); the store is flushed and closed once the listener nursery is done, within
        what is left of the grace.
        """
        if self.model is None:
            await self._run(listeners, task_status)
            return
        # The model client's connection pool outlives every session (they all end inside the
        # server nursery) and is closed after them.
        async with self.model:
            await self._run(listeners, task_status)

    async def _run(
        self, listeners: list[trio.SocketListener], task_status: trio.TaskStatus[Server]
    ) -> None:
        store = self.context.store
        try:
            with _unwrapped(StoreError):
                await self._run_nursery(store, listeners, task_status)
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await listener.aclose()
            self._stopped.set()
            if self._served:
                log.info("stopped")

    async def _run_nursery(
        self,
        store: TaskStore | None,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[Server],
    ) -> None:
        async with trio.open_nursery() as server_nursery:
            if store is not None:
                await server_nursery.start(store.run)
            try:
                await self._serve(listeners, task_status)
            finally:
                if store is not None:  # what is left of the grace, but a second at least
                    left = self.context.shutdown.deadline - trio.current_time()
                    store.close(min(max(left, 1.0), self.config.shutdown_grace))

    async def _serve(
        self, listeners: list[trio.SocketListener], task_status: trio.TaskStatus[Server]
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:  # the listener nursery
                self._nursery = nursery
                accept_scope = trio.CancelScope()

                async def accept() -> None:
                    with accept_scope:
                        await trio.serve_listeners(
                            partial(handle_stream, self), listeners, handler_nursery=nursery
                        )

                if listeners:
                    nursery.start_soon(accept)
                    log.info("listening on %s", self.url)
                task_status.started(self)
                self._served = True
                await self._shutdown.wait()
                await self._graceful_stop(accept_scope, nursery)
        finally:
            self._nursery = None

    async def _graceful_stop(self, accept_scope: trio.CancelScope, nursery: trio.Nursery) -> None:
        accept_scope.cancel()  # SHUT-1: stop accepting
        shutdown = self.context.shutdown
        grace = self.config.shutdown_grace
        nursery.cancel_scope.deadline = shutdown.begin(grace)
        self.http.close_idle()  # kept-alive HTTP connections waiting for a request
        log.info(
            "shutting down: %d connection(s), %d live session(s), grace %gs",
            len(self.connections),
            len(self.sessions.live),
            grace,
        )
        with shutdown.bounded(grace):
            await self.sessions.cancel_all(SHUTTING_DOWN)
        for conn in list(self.connections):  # SHUT-2
            conn.close(1001, "server shutting down")


@contextlib.contextmanager
def _unwrapped(kind: type[Exception]) -> Iterator[None]:
    """Raise a lone `kind` out of a nursery's exception group as itself (`StoreError` at
    start-up is one line for the CLI, like `OSError` from binding)."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], kind):
            raise group.exceptions[0] from None
        raise


def online_clients(registry: Registry) -> list[OnlineClient]:
    """Who is connected now, for GET /api/devices. Trio times become wall clock here, on read,
    by one offset taken now (nothing per heartbeat but a float)."""
    now = trio.current_time()
    wall = time.time()

    def at(moment: float | None) -> str | None:
        if moment is None:
            return None
        return datetime.datetime.fromtimestamp(wall - (now - moment), datetime.UTC).isoformat()

    return [
        OnlineClient(
            client_id=e.client_id,
            role=e.role.value,
            platform=e.platform,
            connected_at=e.registered_at or None,
            last_heartbeat=at(e.last_heartbeat),
            sessions_running=len(e.connection.executing),
            target_id=e.target_id,
            system_info=e.system_info,
        )
        for e in registry
    ]


def metrics_for(config: ServerConfig) -> Metrics:
    """The server's counters: `Metrics` labelled with its agent, or `NullMetrics` if off."""
    return Metrics(agents=(config.effective_agent,)) if config.metrics else NullMetrics()


def _count_by_role(registry: Registry) -> Counter[ClientType]:
    """Registered clients per role, for the `connections` gauge (read at scrape time)."""
    return Counter(entry.role for entry in registry)


def build_server(
    config: ServerConfig,
    *,
    port: int = 0,
    tls: ServerTLS | None = None,
    model_transport: httpx.AsyncBaseTransport | None = None,
    agent: tuple[AgentFactory, OpenAIChatModel | None] | None = None,
    metrics: Metrics | None = None,
) -> Server:
    """A `Server` that is not yet running. Raises `ConfigError` for a bad `--agent` (or LLM
    setting). *tls* comes from `load_tls` when `config.tls_cert` is set (`serve` does that);
    `model_transport` replaces the llm agent's HTTP transport (in-process fake models);
    *agent* is `build_agent(config, metrics=metrics)` when the caller already built it (then
    pass the same *metrics*: the llm agent counts its model calls in them).
    """
    api_key = config.api_key if config.api_key is not None else secrets.token_urlsafe(32)
    if metrics is None:
        metrics = metrics_for(config)
    if agent is None:
        agent = build_agent(config, model_transport=model_transport, metrics=metrics)
    agent_factory, model = agent
    return Server(
        config=config,
        api_key=api_key,
        api_key_generated=config.api_key is None,
        agent_factory=agent_factory,
        host=config.host,
        port=port,
        tls=tls,
        model=model,
        metrics=metrics,
    )


async def serve(
    config: ServerConfig, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the server until it is cancelled or `Server.request_shutdown()` completes.

    `task_status.started(server)` is called once the listener is bound, so tests write
    `server = await nursery.start(serve, config)`. Raises `ConfigError` for a bad `--agent`
    and `OSError` if the address cannot be bound.
    """
    metrics = metrics_for(config)
    agent = build_agent(config, metrics=metrics)  # fail before binding
    tls = None
    if config.tls_cert is not None and config.tls_key is not None:
        tls = await load_tls(config.tls_cert, config.tls_key)  # ConfigError before binding
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    if config.port == 0:
        # Each address family would get its own free port; keep one so the URL is unambiguous.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    server = build_server(
        config, port=listeners[0].socket.getsockname()[1], tls=tls, agent=agent, metrics=metrics
    )
    await server.run(listeners, task_status=task_status)
