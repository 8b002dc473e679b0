"""The protocol driver of one WebSocket connection: registration (§3.1–3.2), identity pinning
(§3.3), routing each frame to its handler (§3.4) and device info (§5).

`AipHandler` is what `Connection.run` is given. The rules themselves are the plain functions of
`_rules`; this module reads frames, looks up the state a rule needs, calls it and acts on the
verdict. TASK and COMMAND_RESULTS frames go to `_sessions.SessionManager`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import attrs
import trio
from trio_websocket import ConnectionClosed

from . import _rules
from ._codec import (
    DecodeError,
    decode_client_message,
    encode_heartbeat_ack,
    parse_json_object,
    shown,
    structure_client_message,
    truncate,
)
from ._config import PROBE_TIMEOUT_CAP
from ._context import ServerContext
from ._errors import ConnectionGone
from ._limits import log_refusal, message_bucket, refuse_rate_limited
from ._messages import (
    ClientMessage,
    ClientMessageType,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from ._registry import ClientEntry
from ._rules import Duplicate, Reject
from ._sessions import SessionManager
from ._store_sql import DeviceRecord, wall_now
from ._version import __version__

if TYPE_CHECKING:
    from ._connection import Connection

log = logging.getLogger("ufo_trio")

PROTOCOL_VERSION: Final = "aip/1"
NOT_REGISTERED: Final = (
    "Connection is not registered; the first message must be a register message"
)
BINARY_NOT_SUPPORTED: Final = "Binary frames are not supported"
#: How long a takeover waits for the old connection's cleanup before aborting its socket.
TAKEOVER_PATIENCE: Final = 5.0


# ---------------------------------------------------------------------------------- registration


async def _reject(
    conn: Connection,
    verdict: Reject,
    *,
    request_id: str | None = None,
    session_id: str | None = None,
) -> None:
    """A registration verdict that is a failure: ERROR, then close 1008 with the code (REG-2).

    `session_id` only for a REGISTER that passed schema validation (WIRE-9).
    """
    code = verdict.code
    conn.context.metrics.registration(code)
    log.info("%s: registration refused: %s", conn.label, code)
    await conn.send_error(verdict.error, code, request_id=request_id, session_id=session_id)
    conn.close(1008, code)


async def _binary(conn: Connection) -> None:
    conn.context.metrics.frame_received("binary")
    await conn.send_error(BINARY_NOT_SUPPORTED, "binary_not_supported")
    conn.close(1003, "binary frames are not supported")


def _close_text(exc: ConnectionClosed, conn: Connection) -> str:
    reason = exc.reason
    if reason is None:
        return "connection lost"
    if reason.code == 1009:  # LIM-1
        size = conn.context.config.max_message_size
        log_refusal(conn.context.metrics, conn.label, "max-message-size", f"{size} bytes; close 1009")
        return "message too big"
    return f"peer closed ({reason.code}{' ' + reason.reason if reason.reason else ''})"


async def _error(conn: Connection, msg: ClientMessage, verdict: Reject) -> None:
    """A refusal of one REGISTERED frame: ERROR to the sender only (DISP-1), connection stays."""
    await conn.send_error(
        verdict.error, verdict.code, request_id=msg.request_id, session_id=msg.session_id
    )


@attrs.frozen(eq=False)
class AipHandler:
    """The AIP driver `Connection.run` runs: register, then handle frames until the end.

    One per server (it holds no per-connection state): the shared context plus the sessions.
    """

    context: ServerContext
    sessions: SessionManager

    async def __call__(self, conn: Connection) -> None:
        entry = await self.register(conn)
        if entry is None:
            return
        conn.registered(entry)
        self.context.metrics.registration("ok")
        log.info(
            "%s registered (platform %s%s)",
            conn.label,
            shown(entry.platform, 40),
            f", target {shown(entry.target_id)}" if entry.target_id else "",
        )
        store = self.context.store
        if store is not None:  # queued; never waits (dropped and counted if the queue is full)
            await store.device_seen(
                DeviceRecord(
                    client_id=entry.client_id,
                    role=entry.role.value,
                    platform=entry.platform,
                    system_info=entry.system_info,
                    target_id=entry.target_id,
                    at=entry.registered_at,
                )
            )
        await self.handle_frames(conn)

    # ------------------------------------------------------------------------------ registration

    async def register(self, conn: Connection) -> ClientEntry | None:
        """AWAIT_REGISTER: read the first frame and send the verdict as the first frame (COMPAT-2).

        Returns the registry entry (already added) on success, None after a refusal.
        """
        config = self.context.config
        with trio.move_on_after(config.registration_timeout) as deadline:
            try:
                raw = await conn.ws.get_message()
            except ConnectionClosed as exc:
                conn.close(None, _close_text(exc, conn))
                return None
        if deadline.cancelled_caught:
            await _reject(conn, Reject("Registration timed out", "registration_timeout"))
            return None
        metrics = self.context.metrics
        if type(raw) is bytes:
            metrics.registration("binary_not_supported")
            await _binary(conn)
            return None
        assert isinstance(raw, str)
        try:
            obj = parse_json_object(raw)
        except DecodeError as exc:
            metrics.frame_received("invalid")
            await _reject(conn, Reject(exc.error, exc.code))
            return None
        rid = obj.get("request_id")
        request_id = rid if type(rid) is str and rid else None
        if obj.get("type") != "register":
            metrics.frame_received("invalid")  # anything before a REGISTER is out of place
            await _reject(conn, Reject(NOT_REGISTERED, "not_registered"), request_id=request_id)
            return None
        try:
            msg = structure_client_message(obj)
        except DecodeError as exc:
            metrics.frame_received("invalid")
            await _reject(conn, Reject(exc.error, exc.code), request_id=request_id)
            return None
        metrics.frame_received(ClientMessageType.REGISTER)

        registry = self.context.registry
        client_id = msg.client_id or ""
        refusal = _rules.check_registration(msg, registry.get)  # REG-2 step 4, REG-4
        decision = Duplicate.NONE
        if refusal is None:
            decision = _rules.duplicate_decision(  # REG-5, REG-6, DUP-1
                config.duplicate_policy,
                reserved=registry.is_reserved(client_id),
                registered=registry.get(client_id) is not None,
            )
            if decision is Duplicate.REJECT:  # DUP-2, REG-6
                refusal = _rules.duplicate(client_id)
        if refusal is not None:
            await _reject(conn, refusal, request_id=request_id, session_id=msg.session_id)
            return None

        registry.reserve(client_id)
        try:
            existing = registry.get(client_id)
            if existing is not None:
                old = existing.connection
                if decision is Duplicate.PROBE:  # DUP-4
                    answered = await old.probe(min(config.ping_timeout, PROBE_TIMEOUT_CAP))
                    if _rules.after_probe(answered) is Duplicate.REJECT:
                        await _reject(
                            conn,
                            _rules.duplicate(client_id),
                            request_id=request_id,
                            session_id=msg.session_id,
                        )
                        return None
                # DUP-3: the old connection's cleanup runs to completion before we confirm. If a
                # write stuck on a dead peer holds it up, abort that peer's socket so the verdict
                # still reaches the newcomer well inside Galaxy's 30 s (DUP-4, COMPAT-3).
                log.info("%s takes over %s", conn.remote, old.label)
                old.close(4001, "session taken over")
                with trio.move_on_after(TAKEOVER_PATIENCE):
                    await old.finished.wait()
                if not old.finished.is_set():
                    old.close(4001, "session taken over", abort=True)
                    await old.finished.wait()
                assert registry.get(client_id) is not existing
            role = msg.client_type
            metadata = msg.metadata
            entry = ClientEntry(  # REG-3, REG-8
                client_id=client_id,
                role=role,
                platform=_rules.registered_platform(metadata),
                metadata=metadata,
                system_info=_rules.registered_system_info(role, metadata),
                target_id=_rules.registered_target(msg),
                connection=conn,
                connected_at=trio.current_time(),
                registered_at=wall_now(),
            )
            confirmation = ServerMessage(
                type=ServerMessageType.HEARTBEAT,
                status=TaskStatus.OK,
                extra={"protocol": PROTOCOL_VERSION, "server": f"ufo_trio/{__version__}"},
            )
            try:
                await conn.send_confirmation(confirmation)
            except ConnectionGone:
                conn.close(None, "connection lost before the confirmation")
                return None
            registry.add(entry)  # REG-7: only once the confirmation went out
        finally:
            registry.release(client_id)
        return entry

    # ------------------------------------------------------------------------------ frames

    async def handle_frames(self, conn: Connection) -> None:
        """REGISTERED: take frames in arrival order until the connection ends (PROC-1)."""
        ws = conn.ws
        bucket = message_bucket(self.context.config)
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed as exc:
                conn.close(None, _close_text(exc, conn))
                return
            conn.note_activity()
            if bucket is not None and not bucket.take(trio.current_time()):
                await refuse_rate_limited(conn)
                return
            if type(raw) is bytes:
                await _binary(conn)
                return
            assert isinstance(raw, str)
            try:
                await self.handle_frame(conn, raw)
            except ConnectionGone:
                if not conn.is_open:
                    return  # this very connection is closing (e.g. PROC-4); teardown takes over
                log.debug("%s: a frame could not be delivered to another connection", conn.label)
            except Exception:
                # DISP-3: the connection stays open and no exception text leaves the server.
                log.exception("%s: internal error while handling a frame", conn.label)
                await conn.send_error("Internal server error", "internal_error")

    async def handle_frame(self, conn: Connection, raw: str) -> None:
        """Decode one frame (WIRE-6), check the pinned identity (§3.3), hand it to its handler."""
        metrics = self.context.metrics
        start = metrics.now()
        try:
            msg = decode_client_message(raw)
        except DecodeError as exc:
            metrics.frame_received("invalid")
            await conn.send_error(exc.error, exc.code, request_id=exc.request_id)
            return
        metrics.frame_received(msg.type)
        entry = conn.entry
        assert entry is not None
        refusal = _rules.check_identity(entry.client_id, entry.role, msg)  # ID-1, ID-2
        if refusal is not None:
            await _error(conn, msg, refusal)
            return
        kind = msg.type
        if kind is ClientMessageType.HEARTBEAT:
            entry.last_heartbeat = trio.current_time()
            await conn.send_text(encode_heartbeat_ack(), ServerMessageType.HEARTBEAT)
            metrics.heartbeat_handled(metrics.now() - start)
        elif kind is ClientMessageType.TASK:
            await self.sessions.handle_task(conn, msg)
        elif kind is ClientMessageType.COMMAND_RESULTS:
            await self.sessions.handle_results(conn, msg)
        elif kind is ClientMessageType.DEVICE_INFO_REQUEST:
            await self._device_info(conn, entry, msg)
        elif kind is ClientMessageType.DEVICE_INFO_RESPONSE:
            log.info("%s sent a device_info_response (ignored)", conn.label)
        elif kind is ClientMessageType.ERROR:
            log.warning("%s reported an error (%d characters)", conn.label, len(msg.error or ""))
            error = truncate(msg.error) if msg.error else "Unknown error"
            await _error(conn, msg, Reject(error, "client_error"))
        else:  # register, task_end
            await _error(conn, msg, Reject(f"Unknown message type: {kind.value}", "unknown_type"))

    async def _device_info(self, conn: Connection, entry: ClientEntry, msg: ClientMessage) -> None:
        verdict = _rules.device_info(entry, msg.target_id, self.context.registry.get)  # DI-1…DI-3
        if isinstance(verdict, Reject):
            await _error(conn, msg, verdict)
            return
        await conn.send(  # DI-4: to the requester only
            ServerMessage(
                type=ServerMessageType.DEVICE_INFO_RESPONSE,
                status=TaskStatus.OK,
                result=verdict.result,
                response_id=msg.request_id,
            )
        )
