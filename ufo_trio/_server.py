"""`serve`: the listener, the connection nursery and graceful shutdown (EP-1, SHUT-1/2)."""

from __future__ import annotations

import logging
import math
import secrets
from functools import partial
from typing import TYPE_CHECKING

import attrs
import trio

from ._endpoint import handle_stream
from ._http import HttpApi
from ._llm import OpenAIChatModel, build_agent
from ._registry import Registry
from ._sessions import SHUTTING_DOWN, SessionManager

if TYPE_CHECKING:
    import httpx

    from ._agents import AgentFactory
    from ._config import ServerConfig
    from ._connection import Connection

log = logging.getLogger("ufo_trio")


@attrs.define(eq=False)
class Server:
    """A running server, as handed back by `nursery.start(serve, config)`.

    Public attributes: `config`, `host`, `port`, `url`, `api_key`, `api_key_generated`,
    `registry` (who is online) and `sessions` (live sessions and the result store).
    Call `request_shutdown()` for the graceful stop of SHUT-1/2.
    """

    config: ServerConfig
    api_key: str
    api_key_generated: bool
    agent_factory: AgentFactory
    host: str = ""
    port: int = 0
    registry: Registry = attrs.field(factory=Registry)
    sessions: SessionManager = attrs.field(init=False)
    http: HttpApi = attrs.field(init=False)
    api_key_bytes: bytes = attrs.field(init=False)
    allowed_origins: frozenset[str] = attrs.field(init=False)
    connections: set[Connection] = attrs.field(factory=set)
    #: Accepted TCP connections being served, HTTP or WebSocket (`--max-connections`).
    open_streams: int = 0
    shutting_down: bool = False
    #: After this trio time every bounded cleanup wait gives up (the shutdown grace deadline).
    hard_deadline: float = math.inf
    _shutdown: trio.Event = attrs.field(factory=trio.Event)
    _stopped: trio.Event = attrs.field(factory=trio.Event)
    _nursery: trio.Nursery | None = None
    #: The model client of the llm agent (its HTTP connection pool), owned by `run`.
    model: OpenAIChatModel | None = None

    def __attrs_post_init__(self) -> None:
        self.sessions = SessionManager(self, self.agent_factory)
        self.http = HttpApi(self)
        self.api_key_bytes = self.api_key.encode("utf-8", "surrogateescape")
        self.allowed_origins = frozenset(o.strip().lower() for o in self.config.allowed_origins)

    @property
    def url(self) -> str:
        """`ws://HOST:PORT/ws` with the port actually bound (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/ws"

    def bounded(self, seconds: float) -> trio.CancelScope:
        """A scope that gives up after `seconds`, or at the shutdown deadline if sooner."""
        return trio.move_on_at(min(trio.current_time() + seconds, self.hard_deadline))

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
        """Accept on `listeners` (may be empty) until shutdown completes or we are cancelled."""
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
        try:
            async with trio.open_nursery() as nursery:
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
                await self._shutdown.wait()
                await self._graceful_stop(accept_scope, nursery)
        finally:
            self._nursery = None
            for listener in listeners:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await listener.aclose()
            self._stopped.set()
            log.info("stopped")

    async def _graceful_stop(self, accept_scope: trio.CancelScope, nursery: trio.Nursery) -> None:
        accept_scope.cancel()  # SHUT-1: stop accepting
        self.shutting_down = True
        self.http.close_idle()  # kept-alive HTTP connections waiting for a request
        grace = self.config.shutdown_grace
        self.hard_deadline = trio.current_time() + grace
        nursery.cancel_scope.deadline = self.hard_deadline
        log.info(
            "shutting down: %d connection(s), %d live session(s), grace %gs",
            len(self.connections),
            len(self.sessions.live),
            grace,
        )
        with self.bounded(grace):
            await self.sessions.cancel_all(SHUTTING_DOWN)
        for conn in list(self.connections):  # SHUT-2
            conn.close(1001, "server shutting down")


def build_server(
    config: ServerConfig,
    *,
    port: int = 0,
    model_transport: httpx.AsyncBaseTransport | None = None,
) -> Server:
    """A `Server` that is not yet running. Raises `ConfigError` for a bad `--agent` (or LLM
    setting). `model_transport` replaces the llm agent's HTTP transport (in-process fake models).
    """
    api_key = config.api_key if config.api_key is not None else secrets.token_urlsafe(32)
    agent_factory, model = build_agent(config, model_transport=model_transport)
    return Server(
        config=config,
        api_key=api_key,
        api_key_generated=config.api_key is None,
        agent_factory=agent_factory,
        host=config.host,
        port=port,
        model=model,
    )


async def serve(
    config: ServerConfig, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the server until it is cancelled or `Server.request_shutdown()` completes.

    `task_status.started(server)` is called once the listener is bound, so tests write
    `server = await nursery.start(serve, config)`. Raises `ConfigError` for a bad `--agent`
    and `OSError` if the address cannot be bound.
    """
    build_agent(config)  # fail before binding
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    if config.port == 0:
        # Each address family would get its own free port; keep one so the URL is unambiguous.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    server = build_server(config, port=listeners[0].socket.getsockname()[1])
    await server.run(listeners, task_status=task_status)
