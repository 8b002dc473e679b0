"""What connections, sessions and handlers share: `Shutdown` and the `ServerContext` bundle.

A leaf module: it imports only the pieces the bundle holds (`ServerConfig`, `Registry`), never the
server modules. `Server` (the listener side) builds one `ServerContext` at start-up and hands it
down; nothing below the listener sees `Server` itself (hypercorn passes a small `WorkerContext`,
trio-websocket's connection never sees its server).

How a subsystem plugs in (task store, metrics, event stream): it is its own module with one owner
task, constructed once in `Server` and added here as a field with a default of None, typed by a
narrow `Protocol` (or a few callables) that module defines, e.g.::

    store: TaskStore | None = None      # the SQLite writer's interface
    events: EventSink | None = None     # the event stream's publish side

Code that uses it checks for None (the subsystem is off) and never reaches for `Server`.
`metrics` is the exception: it is never None, a `NullMetrics` that counts nothing stands in
when metrics are off, so every counting call site is one unconditional line.
"""

from __future__ import annotations

import math

import attrs
import trio

from ._config import ServerConfig
from ._metrics import Metrics, NullMetrics
from ._registry import Registry
from ._store import TaskStore


@attrs.define(eq=False)
class Shutdown:
    """The graceful stop (SHUT-1/2) as the rest of the server sees it.

    `started` turns True once shutdown begins (TASK-1 refuses new tasks, HTTP answers with
    `Connection: close`); `deadline` is the trio time after which every bounded cleanup wait gives
    up (the end of `--shutdown-grace`), infinite until then.
    """

    started: bool = False
    deadline: float = math.inf

    def begin(self, grace: float) -> float:
        """Mark shutdown as started with `grace` seconds left; returns the deadline."""
        self.started = True
        self.deadline = trio.current_time() + grace
        return self.deadline

    def bounded(self, seconds: float) -> trio.CancelScope:
        """A scope that gives up after `seconds`, or at the shutdown deadline if sooner."""
        return trio.move_on_at(min(trio.current_time() + seconds, self.deadline))


@attrs.frozen(kw_only=True)
class Auth:
    """The credentials of AUTH-1/AUTH-4, in the form the checks compare against."""

    #: The API key as bytes (surrogateescape), compared in constant time.
    api_key: bytes
    #: `--allowed-origins`, stripped and lower-cased (AUTH-1(a)).
    allowed_origins: frozenset[str]

    @classmethod
    def build(cls, api_key: str, allowed_origins: tuple[str, ...]) -> Auth:
        return cls(
            api_key=api_key.encode("utf-8", "surrogateescape"),
            allowed_origins=frozenset(o.strip().lower() for o in allowed_origins),
        )


@attrs.frozen(kw_only=True, eq=False)
class ServerContext:
    """The state every connection, session and HTTP handler shares; built once per server.

    Frozen: the bundle never changes after start-up (its members may: the registry fills, the
    shutdown starts). Live sessions (`SessionManager`) are not in it: they are passed explicitly
    to the code that needs them (a connection's teardown, the frame handler, the HTTP API).

    Future subsystems (task store, event stream) become fields here with a default of None;
    see the module docstring.
    """

    config: ServerConfig
    registry: Registry
    auth: Auth
    shutdown: Shutdown = attrs.field(factory=Shutdown)
    #: The task history (issue 11); None: not recorded (a context built without a server).
    store: TaskStore | None = None
    #: Counters of `_metrics` (issue 12); `NullMetrics` when `--no-metrics` (or not given).
    metrics: Metrics = attrs.field(factory=NullMetrics)
