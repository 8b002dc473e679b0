"""The device client: register, answer COMMANDs with tools, stay connected.

Task tree (all inside `open_device`'s nursery, nothing outlives the ``async with``)::

    open_device nursery
    ├── caller's block
    └── _run: connect → register → serve → (lost) → backoff → connect ...
        └── per-connection nursery (one per registration; cancelled when the link is lost)
            ├── reader      every inbound frame; COMMANDs go to a bounded queue
            ├── worker × N  run a COMMAND's actions, send COMMAND_RESULTS
            ├── heartbeat   HEARTBEAT every ``heartbeat_interval``
            └── keepalive   WebSocket ping every ``ping_interval``; no pong → lost

The reader never waits for tools, so it keeps reading (and trio-websocket keeps answering the
server's pings) while tools run. When the command queue is full, a new COMMAND is answered at
once with ``failure`` Results saying the device is busy, rather than stalling the reader.
"""

from __future__ import annotations

import logging
import random
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._backoff import Backoff
from ._builtins import collect_system_info, default_tools, local_platform
from ._errors import (
    AuthenticationFailed,
    ClientError,
    ConnectFailed,
    ConnectionLost,
    ProtocolViolation,
    RegistrationRefused,
    TLSError,
)
from ._link import Link, check_url, open_link, redact
from ._tools import ToolContext, ToolRegistry
from ._util import raise_single_error
from ._wire import (
    Command,
    ServerFrame,
    ToolResult,
    command_results_frame,
    heartbeat_frame,
    new_id,
    parse_command,
    register_frame,
    task_frame,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Mapping

logger = logging.getLogger("ufo_trio.client")

#: After a lost connection, a ``duplicate_client_id`` refusal usually means the server is still
#: cleaning up our old connection (DC-4), so it is retried this many times before it is fatal.
MAX_DUPLICATE_RETRIES = 3


@attrs.define(eq=False)
class Device:
    """The handle `open_device` yields. Read-only for callers apart from the wait methods."""

    client_id: str
    url: str
    platform: str
    tools: ToolRegistry
    system_info: Mapping[str, Any]
    #: Successful registrations so far (1 after connecting, +1 per reconnection).
    registrations: int = 0
    #: True while a registered connection is up.
    connected: bool = False
    #: Why the previous connection ended (or the last reconnection attempt failed).
    last_error: ClientError | None = None
    #: COMMAND frames answered so far, over all connections.
    commands_answered: int = 0
    _changed: trio.Event = attrs.field(factory=trio.Event, repr=False)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_registered(self, count: int = 1) -> None:
        """Wait until the device has registered *count* times in total."""
        while self.registrations < count:
            await self._changed.wait()

    async def wait_disconnected(self) -> None:
        """Wait until the current connection (if any) is gone."""
        while self.connected:
            await self._changed.wait()


@attrs.define(eq=False)
class _Runner:
    device: Device
    url: str
    api_key: str | None
    register: dict[str, Any]
    heartbeat_interval: float
    ping_interval: float
    ping_timeout: float
    reconnect: Backoff | None
    max_concurrent_commands: int
    command_queue_size: int
    follow_dispatch: bool
    connect_timeout: float
    registration_timeout: float
    rng: random.Random
    ssl_context: ssl.SSLContext | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        device = self.device
        started = False
        duplicates = 0
        delays = None
        while True:
            try:
                async with open_link(
                    self.url,
                    api_key=self.api_key,
                    register=self.register,
                    client_id=device.client_id,
                    connect_timeout=self.connect_timeout,
                    registration_timeout=self.registration_timeout,
                    ssl_context=self.ssl_context,
                ) as link:
                    device.registrations += 1
                    device.connected = True
                    device._notify()
                    logger.info(
                        "device %r registered with %s (tools: %s)",
                        device.client_id,
                        device.url,
                        ", ".join(device.tools.names()) or "none",
                    )
                    if not started:
                        started = True
                        task_status.started()
                    delays = None
                    duplicates = 0
                    try:
                        await self._serve(link)
                    finally:
                        device.connected = False
                        device.last_error = link.lost
                        device._notify()
                    error: ClientError = link.lost or ConnectionLost("connection ended")
            except (AuthenticationFailed, TLSError):
                raise  # a wrong key or an untrusted certificate stays so: never retry it
            except RegistrationRefused as exc:
                if (
                    not started
                    or exc.code != "duplicate_client_id"
                    or duplicates >= MAX_DUPLICATE_RETRIES
                ):
                    raise
                duplicates += 1
                error = exc
            except (ConnectFailed, ConnectionLost, ProtocolViolation) as exc:
                if not started:
                    raise
                error = exc
            device.last_error = error
            if self.reconnect is None:
                raise error
            if delays is None:
                delays = self.reconnect.delays(self.rng)
            delay = next(delays, None)
            if delay is None:
                raise ConnectionLost(
                    f"device {device.client_id!r} gave up after "
                    f"{self.reconnect.max_attempts} reconnection attempts; last error: {error}"
                )
            logger.warning(
                "device %r: %s; reconnecting in %.1f s", device.client_id, error, delay
            )
            await trio.sleep(delay)

    async def _serve(self, link: Link) -> None:
        """Serve one registered connection until it is lost."""
        send, receive = trio.open_memory_channel[ServerFrame](self.command_queue_size)
        async with trio.open_nursery() as nursery:

            async def until_lost(fn: Any, *args: Any) -> None:
                # Any of these tasks ending means the connection is unusable: end them all.
                try:
                    await fn(*args)
                except ConnectionLost:
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_lost, self._read, link, send)
            async with receive:
                for _ in range(self.max_concurrent_commands):
                    nursery.start_soon(until_lost, self._work, link, receive.clone())
            if self.heartbeat_interval > 0:
                nursery.start_soon(until_lost, self._heartbeat, link)
            if self.ping_interval > 0:
                nursery.start_soon(until_lost, self._keepalive, link)

    async def _read(self, link: Link, commands: trio.MemorySendChannel[ServerFrame]) -> None:
        device = self.device
        async with commands:
            while True:
                frame = await link.receive()
                if frame.type == "command":
                    try:
                        commands.send_nowait(frame)
                    except trio.WouldBlock:
                        await self._answer_busy(link, frame)
                elif frame.type == "task":
                    await self._follow_dispatch(link, frame)
                elif frame.type == "task_end":
                    logger.info(
                        "device %r: session %s ended %s%s",
                        device.client_id,
                        frame.session_id,
                        frame.status,
                        f" ({frame.error})" if frame.error else "",
                    )
                elif frame.type == "error":
                    logger.warning(
                        "device %r: server error %s: %s",
                        device.client_id,
                        frame.code,
                        frame.error,
                    )
                else:
                    logger.debug("device %r: %s/%s", device.client_id, frame.type, frame.status)

    async def _answer_busy(self, link: Link, frame: ServerFrame) -> None:
        logger.warning(
            "device %r: command queue full; refusing a COMMAND of session %s",
            self.device.client_id,
            frame.session_id,
        )
        results = [
            ToolResult(
                status="failure",
                error=f"device busy: {self.command_queue_size} commands already queued",
                call_id=parse_command(raw).call_id,
            )
            for raw in frame.actions or []
        ]
        await link.send(command_results_frame(self.device.client_id, frame, results))

    async def _follow_dispatch(self, link: Link, frame: ServerFrame) -> None:
        # A TASK assignment from the HTTP API (HTTP-3): like the real device, answer with an
        # ordinary TASK carrying the request; the server then runs it with us as executor.
        if not self.follow_dispatch:
            logger.info("device %r: ignoring a dispatched task", self.device.client_id)
            return
        logger.info("device %r: starting dispatched task %s", self.device.client_id, frame.task_name)
        await link.send(
            task_frame(
                self.device.client_id,
                "device",
                request=frame.user_request or "",
                session_id=None,
                task_name=frame.task_name,
                target_id=None,
                request_id=new_id(),
            )
        )

    async def _work(self, link: Link, commands: trio.MemoryReceiveChannel[ServerFrame]) -> None:
        device = self.device
        async with commands:
            async for frame in commands:
                actions = [parse_command(raw) for raw in frame.actions or []]

                def context_for(command: Command, frame: ServerFrame = frame) -> ToolContext:
                    return ToolContext(
                        client_id=device.client_id,
                        tool_name=command.tool_name,
                        call_id=command.call_id,
                        session_id=frame.session_id,
                        system_info=device.system_info,
                    )

                results = await device.tools.run_batch(actions, context_for)
                await link.send(command_results_frame(device.client_id, frame, results))
                device.commands_answered += 1
                # Ids, tool names and statuses only: parameters and results may hold secrets
                # (COMPAT-16).
                logger.info(
                    "device %r: session %s: %s",
                    device.client_id,
                    frame.session_id,
                    ", ".join(
                        f"{getattr(a, 'tool_name', '?') or '(none)'} {r.status}"
                        for a, r in zip(actions, results, strict=True)
                    )
                    or "empty command",
                )

    async def _heartbeat(self, link: Link) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval)
            await link.send(heartbeat_frame(self.device.client_id, "device"))

    async def _keepalive(self, link: Link) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            await link.ping(self.ping_timeout)


@asynccontextmanager
async def open_device(
    url: str,
    client_id: str,
    *,
    api_key: str | None = None,
    tools: ToolRegistry | None = None,
    platform: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    heartbeat_interval: float = 30.0,
    ping_interval: float = 20.0,
    ping_timeout: float = 20.0,
    reconnect: Backoff | None = Backoff(),  # noqa: B008  (frozen, so sharing it is safe)
    max_concurrent_commands: int = 4,
    command_queue_size: int = 32,
    follow_dispatch: bool = True,
    connect_timeout: float = 10.0,
    registration_timeout: float = 30.0,
    rng: random.Random | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Device]:
    """Run a device client for the duration of the ``async with`` block.

    Entering connects to *url* (``ws://host:port/ws``), registers *client_id* as a device with
    system info collected from this machine, and returns once the server has confirmed. Inside
    the block the device answers COMMANDs with *tools* (default: `default_tools()`), sends a
    heartbeat every *heartbeat_interval* seconds and pings the server every *ping_interval*
    seconds (0 disables either). After a lost connection it reconnects following *reconnect*
    (``None``: do not reconnect); *rng* seeds the jitter.

    A ``wss://`` URL is verified with *ssl_context* (default: the system trust store; see
    `client_context` for a private CA).

    Entering raises `ValueError` (bad URL or empty id), `AuthenticationFailed` (HTTP 403:
    wrong key), `TLSError` (certificate refused), `ConnectFailed`, `RegistrationRefused` (for example ``duplicate_client_id``)
    or `ConnectionLost`; nothing is retried before the first registration. Later, a fatal
    error (a refused key or registration on reconnect, or reconnection given up) cancels the
    block and is raised from the ``async with``.
    """
    check_url(url)
    if not client_id:
        raise ValueError("client_id must be a non-empty string")
    if max_concurrent_commands < 1 or command_queue_size < 0:
        raise ValueError("max_concurrent_commands must be >= 1 and command_queue_size >= 0")
    registry = tools if tools is not None else default_tools()
    platform = platform or local_platform()
    extra = dict(metadata or {})
    system_info = {
        **collect_system_info(client_id, platform, registry),
        **dict(extra.pop("system_info", None) or {}),
    }
    device = Device(
        client_id=client_id,
        url=redact(url),
        platform=platform,
        tools=registry,
        system_info=system_info,
    )
    runner = _Runner(
        device=device,
        url=url,
        api_key=api_key,
        register=register_frame(
            client_id,
            "device",
            metadata={**extra, "platform": platform, "system_info": system_info},
        ),
        heartbeat_interval=heartbeat_interval,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        reconnect=reconnect,
        max_concurrent_commands=max_concurrent_commands,
        command_queue_size=command_queue_size,
        follow_dispatch=follow_dispatch,
        connect_timeout=connect_timeout,
        registration_timeout=registration_timeout,
        rng=rng if rng is not None else random.Random(),
        ssl_context=ssl_context,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(runner.run)
            try:
                yield device
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single_error(group)


async def run_device(url: str, client_id: str, **options: Any) -> None:
    """Run a device until cancelled (or until a fatal error, which is raised).

    Takes the same arguments as `open_device`.
    """
    async with open_device(url, client_id, **options):
        await trio.sleep_forever()
