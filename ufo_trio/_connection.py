"""One WebSocket connection: its supervisor nursery, send lock, liveness and teardown.

Task layout (all children of the connection's nursery, nothing anywhere else):

* trio-websocket's reader task: bytes → frames into a bounded queue (LIM-5);
* the handler (the task that runs `Connection.run`): runs the protocol driver it was given
  (`_handlers.AipHandler`), which takes frames strictly in order (PROC-1);
* the pinger (LIVE-1/2) and, if enabled, the heartbeat watchdog (LIVE-3);
* sessions whose executor is this connection (§4): cancelled when it goes away (DC-2).

Frames are written by whichever task sends them, one at a time under the connection's single
send lock (PROC-2: "one writer or one send lock"), shielded and bounded by SEND_TIMEOUT.
"""

from __future__ import annotations

import enum
import itertools
import logging
from typing import TYPE_CHECKING, Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed

from ._codec import encode_server_message, shown
from ._config import CLOSE_TIMEOUT
from ._errors import ConnectionGone
from ._messages import ServerMessage, ServerMessageType, TaskStatus, new_id
from ._store_sql import wall_now

if TYPE_CHECKING:
    from ._context import ServerContext
    from ._registry import ClientEntry
    from ._sessions import Session, SessionManager
    from ._websocket import ServerWebSocket

log = logging.getLogger("ufo_trio")

_ping_payloads = itertools.count(1)


class State(enum.Enum):
    AWAIT_REGISTER = "await_register"
    REGISTERED = "registered"
    CLOSING = "closing"
    CLOSED = "closed"


class Handler(Protocol):
    """The protocol driver `Connection.run` is given (trio-websocket's "handler is a parameter").

    It reads frames from `conn.ws`, calls `conn.registered(entry)` once registration succeeded
    and returns when the connection should end; `run` does the teardown.
    """

    async def __call__(self, conn: Connection, /) -> None: ...


@attrs.define(eq=False)
class Connection:
    """A WebSocket peer. Other tasks talk to it only through `send`, `probe` and `close`.

    It knows the shared `ServerContext` and the `SessionManager` (its teardown cancels its
    sessions), never the `Server`.
    """

    context: ServerContext
    sessions: SessionManager
    ws: ServerWebSocket
    stream: trio.abc.Stream
    nursery: trio.Nursery
    remote: str
    state: State = State.AWAIT_REGISTER
    entry: ClientEntry | None = None
    #: Sessions whose executor is this connection (they run in `nursery`).
    executing: dict[str, Session] = attrs.field(factory=dict)
    #: Sessions whose requester is this connection (they may run in another connection's nursery).
    requested: dict[str, Session] = attrs.field(factory=dict)
    #: Set once teardown has finished: the id is free again (DUP-3, DC-4).
    finished: trio.Event = attrs.field(factory=trio.Event)
    close_code: int | None = None
    close_reason: str = ""
    _main_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _activity_waiters: list[trio.Event] = attrs.field(factory=list)
    _heartbeat_scope: trio.CancelScope | None = None
    _abort: bool = False

    # ------------------------------------------------------------------ identity / logging

    @property
    def client_id(self) -> str:
        return self.entry.client_id if self.entry is not None else "-"

    @property
    def label(self) -> str:
        if self.entry is None:
            return f"{self.remote} (unregistered)"
        return f"{shown(self.entry.client_id)} ({self.entry.role.value}, {self.remote})"

    @property
    def is_open(self) -> bool:
        """REGISTERED and not asked to close: sessions and senders may still use it."""
        return self.state is State.REGISTERED and not self._main_scope.cancel_called

    # ------------------------------------------------------------------ sending
    #
    # One entry point per purpose, each with its state rule; all of them end in `_write`:
    #
    # * `send` / `send_text`  a protocol frame for a registered peer (only while `is_open`);
    # * `send_confirmation`   the registration confirmation (only in AWAIT_REGISTER, REG-7);
    # * `send_error`          an ERROR frame, in AWAIT_REGISTER or REGISTERED, best effort.

    async def send(self, msg: ServerMessage) -> None:
        """Write one frame to a registered peer (PROC-2/3/4).

        State rule: only while the connection `is_open` (REGISTERED, no close decided); otherwise
        raises `ConnectionGone` at once (PROC-3). A frame that cannot be written within
        SEND_TIMEOUT closes the peer (4003) and raises `ConnectionGone`.
        """
        await self.send_text(encode_server_message(msg), msg.type)

    async def send_text(self, text: str, kind: ServerMessageType) -> None:
        """`send` for a frame that is already encoded (the heartbeat ack, one TASK_END text for
        two recipients); `kind` is its type, for the metrics. Same state rule; every frame for a
        registered peer passes here."""
        if not self.is_open:
            raise ConnectionGone(self.label)
        await self._write(text, kind)

    async def _write(self, text: str, kind: ServerMessageType) -> None:
        # The connection's single send lock (PROC-2) is trio-websocket's stream lock, held for a
        # whole frame, so frames never interleave and each sender's frames go out in order. The
        # write cannot be cut in half by cancelling the sender; SEND_TIMEOUT (or the shutdown
        # deadline) bounds it instead (see ServerWebSocket.send_frame). No state check here: the
        # public entry points above make it.
        context = self.context
        deadline = min(trio.current_time() + context.config.send_timeout, context.shutdown.deadline)
        try:
            if await self.ws.send_frame(text, deadline):
                context.metrics.frame_sent(kind)
                return
        except ConnectionClosed:
            self.close(None, "connection lost")
            raise ConnectionGone(self.label) from None
        self.close(4003, "send timeout", abort=True)  # PROC-4: the frame may be half written
        raise ConnectionGone(self.label)

    async def send_confirmation(self, msg: ServerMessage) -> None:
        """Write the registration confirmation (REG-7), before the registry entry exists.

        State rule: only in AWAIT_REGISTER (`send` would refuse: the connection is not
        REGISTERED yet). Raises `ConnectionGone` if it is not, or if the write failed.
        """
        if self.state is not State.AWAIT_REGISTER:
            raise ConnectionGone(self.label)
        await self._write(encode_server_message(msg), msg.type)

    async def send_error(
        self,
        error: str,
        code: str,
        *,
        request_id: str | None = None,
        session_id: str | None = None,
    ) -> None:
        """Send an ERROR frame (WIRE-9).

        State rule: in AWAIT_REGISTER (registration refusals, REG-2) or REGISTERED, even when a
        close is already decided (the ERROR precedes its 1003/1008); a no-op once CLOSING. Never
        raises `ConnectionGone`: a peer that is going away simply misses it.
        """
        msg = ServerMessage(
            type=ServerMessageType.ERROR,
            status=TaskStatus.ERROR,
            error=error,
            session_id=session_id or None,
            response_id=request_id or new_id(),
            extra={"code": code},
        )
        if self.state is State.REGISTERED or self.state is State.AWAIT_REGISTER:
            try:
                await self._write(encode_server_message(msg), ServerMessageType.ERROR)
                self.context.metrics.error_sent(code)
            except ConnectionGone:
                pass

    # ------------------------------------------------------------------ closing

    def close(self, code: int | None, reason: str, *, abort: bool = False) -> None:
        """Ask the connection to end with `code` (None: the peer is already gone).

        Idempotent: the first reason wins. Returns at once; the handler runs the teardown.
        """
        if self.close_code is None and not self.close_reason:
            self.close_code = code
            self.close_reason = reason
        self._abort = self._abort or abort
        self._main_scope.cancel()
        if abort:
            # A dead or stuck peer: fail any write that is blocked on it now, rather than
            # letting it hold the send lock (and a takeover's verdict) for SEND_TIMEOUT.
            self.ws.abort_transport()

    # ------------------------------------------------------------------ liveness

    def note_activity(self) -> None:
        """Called for every inbound data frame: feeds the probes and the heartbeat watchdog."""
        if self._activity_waiters:
            for event in self._activity_waiters:
                event.set()
            self._activity_waiters.clear()
        if self._heartbeat_scope is not None:
            self._heartbeat_scope.deadline = (
                trio.current_time() + self.context.config.heartbeat_timeout
            )

    async def probe(self, patience: float) -> bool:
        """Ping the peer: True if a pong or any inbound frame arrives within `patience` (DUP-4).

        A connection that is not open (e.g. already closing) fails at once (DC-4). The ping is
        written like any frame (shielded, bounded); one that cannot even be written in time
        marks the connection for an abort.
        """
        if not self.is_open:
            return False
        deadline = trio.current_time() + patience
        alive = trio.Event()
        self._activity_waiters.append(alive)
        try:
            payload = next(_ping_payloads).to_bytes(8, "big")
            try:
                pong = await self.ws.send_ping(payload, deadline)
            except ConnectionClosed:
                return False
            if pong is None:
                self._abort = True  # half a ping may be on the wire
                return False

            async def wait_pong() -> None:
                await pong.wait()
                alive.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_pong)
                with trio.move_on_at(deadline):
                    await alive.wait()
                nursery.cancel_scope.cancel()
            return alive.is_set()
        finally:
            if alive in self._activity_waiters:
                self._activity_waiters.remove(alive)

    async def _pinger(self) -> None:
        config = self.context.config
        while True:
            await trio.sleep(config.ping_interval)
            if not await self.probe(config.ping_timeout):
                log.info("%s: no pong within %gs", self.label, config.ping_timeout)
                self.close(1011, "keepalive ping timeout")
                return

    async def _heartbeat_watchdog(self) -> None:
        timeout = self.context.config.heartbeat_timeout
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            self._heartbeat_scope = scope
            await trio.sleep_forever()
        self._heartbeat_scope = None
        log.info("%s: no data frame for %gs", self.label, timeout)
        self.close(4002, "heartbeat timeout")

    # ------------------------------------------------------------------ lifecycle

    async def run(self, handler: Handler) -> None:
        """Drive the connection from AWAIT_REGISTER to CLOSED with the protocol driver `handler`.

        Returns when all is cleaned up. `close` (from any task) cancels `handler`; the teardown
        runs whatever way it ended.
        """
        self.context.metrics.ws_opened()
        try:
            with self._main_scope:
                await handler(self)
        finally:
            await self._teardown()
            self.context.metrics.ws_closed()

    def registered(self, entry: ClientEntry) -> None:
        """AWAIT_REGISTER → REGISTERED (called by the handler once the entry is in the registry):
        from now on `send` works, and the pinger and the heartbeat watchdog start."""
        self.entry = entry
        self.state = State.REGISTERED
        config = self.context.config
        if config.ping_interval > 0:
            self.nursery.start_soon(self._pinger)
        if config.heartbeat_timeout > 0:
            self.nursery.start_soon(self._heartbeat_watchdog)

    async def _teardown(self) -> None:
        """DC-1…DC-5: runs exactly once, shielded, every await bounded."""
        context = self.context
        registered = self.entry is not None and self.state is State.REGISTERED
        self.state = State.CLOSING
        bounded = context.shutdown.bounded
        with trio.CancelScope(shield=True):
            if registered:
                with bounded(context.config.send_timeout * 2):
                    await self.sessions.connection_closing(self)
            # Frames are written before `send` returns, so whatever a handler or session sent
            # (ERROR before 1003, TASK_ENDs before 1001) is already out.
            if registered and self.entry is not None:
                ours = context.registry.remove(self.entry)  # DC-4: only our own epoch
                reason = self.close_reason or _describe_close(self.ws)
                log.info("%s disconnected: %s", self.label, reason)
                if ours and context.store is not None:  # queued; never waits (dropped if full)
                    await context.store.device_gone(self.entry.client_id, reason, wall_now())
            self.finished.set()  # cleanup proper is complete; the rest is transport
            if not self._abort and self.close_code is not None:
                # A peer that missed its pings will not answer the closing handshake either.
                patience = 1.0 if self.close_code in _DEAD_PEER_CODES else CLOSE_TIMEOUT
                with bounded(patience):
                    await self.ws.aclose(self.close_code, self.close_reason or None)
            with bounded(1.0):
                await trio.aclose_forcefully(self.stream)
            self.nursery.cancel_scope.cancel()
            self.state = State.CLOSED
            context.metrics.disconnect(_close_code(self))
            # Break the Connection ↔ ClientEntry cycle so the connection is freed by reference
            # counting at once instead of waiting for the cyclic garbage collector.
            self.entry = None


#: Closes after which nobody waits for the peer: it missed pings, heartbeats or was replaced.
_DEAD_PEER_CODES = frozenset({1011, 4001, 4002, 4003})


def _close_code(conn: Connection) -> int | None:
    """The code the connection ended with: the one we decided (even if the socket was aborted),
    else the peer's; None if there was no close frame."""
    if conn.close_code is not None:
        return conn.close_code
    closed = conn.ws.closed
    return None if closed is None else closed.code


def _describe_close(ws: ServerWebSocket) -> str:
    closed = ws.closed
    if closed is None:
        return "closed"
    return f"peer closed ({closed.code}{' ' + closed.reason if closed.reason else ''})"
