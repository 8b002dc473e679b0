"""What the server does with each frame: registration (§3.1–3.2), pinning (§3.3), dispatch (§3.4)
and device info (§5). Session frames are handed to `_sessions`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio
from trio_websocket import ConnectionClosed

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
from ._errors import ConnectionGone
from ._limits import log_refusal, message_bucket, refuse_rate_limited
from ._messages import (
    ClientMessage,
    ClientMessageType,
    ClientType,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from ._registry import ClientEntry
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


def quoted(value: str) -> str:
    """`repr` of a client-supplied id, truncated first (SCOPE-4)."""
    return repr(truncate(value))


# ---------------------------------------------------------------------------------- registration


async def _reject(
    conn: Connection,
    error: str,
    code: str,
    *,
    request_id: str | None = None,
    session_id: str | None = None,
) -> None:
    """A registration verdict that is a failure: ERROR, then close 1008 with the code (REG-2).

    `session_id` only for a REGISTER that passed schema validation (WIRE-9).
    """
    log.info("%s: registration refused: %s", conn.label, code)
    await conn.send_error(error, code, request_id=request_id, session_id=session_id)
    conn.close(1008, code)


async def _binary(conn: Connection) -> None:
    await conn.send_error(BINARY_NOT_SUPPORTED, "binary_not_supported")
    conn.close(1003, "binary frames are not supported")


def _close_text(exc: ConnectionClosed, conn: Connection | None = None) -> str:
    reason = exc.reason
    if reason is None:
        return "connection lost"
    if reason.code == 1009:
        if conn is not None:  # LIM-1
            size = conn.server.config.max_message_size
            log_refusal(conn.label, "max-message-size", f"{size} bytes; close 1009")
        return "message too big"
    return f"peer closed ({reason.code}{' ' + reason.reason if reason.reason else ''})"


async def register(conn: Connection) -> ClientEntry | None:
    """AWAIT_REGISTER: read the first frame and send the verdict as the first frame (COMPAT-2).

    Returns the registry entry (already added) on success, None after a refusal.
    """
    server = conn.server
    config = server.config
    with trio.move_on_after(config.registration_timeout) as deadline:
        try:
            raw = await conn.ws.get_message()
        except ConnectionClosed as exc:
            conn.close(None, _close_text(exc, conn))
            return None
    if deadline.cancelled_caught:
        await _reject(conn, "Registration timed out", "registration_timeout")
        return None
    if type(raw) is bytes:
        await _binary(conn)
        return None
    assert isinstance(raw, str)
    try:
        obj = parse_json_object(raw)
    except DecodeError as exc:
        await _reject(conn, exc.error, exc.code)
        return None
    rid = obj.get("request_id")
    request_id = rid if type(rid) is str and rid else None
    if obj.get("type") != "register":
        await _reject(conn, NOT_REGISTERED, "not_registered", request_id=request_id)
        return None
    try:
        msg = structure_client_message(obj)
    except DecodeError as exc:
        await _reject(conn, exc.error, exc.code, request_id=request_id)
        return None
    client_id = msg.client_id
    if not client_id:
        await _reject(
            conn,
            "Registration requires a non-empty client_id",
            "invalid_registration",
            request_id=request_id,
            session_id=msg.session_id,
        )
        return None

    role = msg.client_type
    target_id = (msg.target_id or None) if role is ClientType.CONSTELLATION else None
    registry = server.registry
    if target_id is not None:  # REG-4
        target = registry.get(target_id)
        if target is None or not target.is_device:
            await _reject(
                conn,
                f"Target device {quoted(target_id)} is not connected",
                "unknown_target",
                request_id=request_id,
                session_id=msg.session_id,
            )
            return None

    duplicate = (
        f"client_id {quoted(client_id)} is already registered; "
        "duplicate registrations are not allowed"
    )
    if registry.is_reserved(client_id):  # REG-6
        await _reject(
            conn, duplicate, "duplicate_client_id", request_id=request_id, session_id=msg.session_id
        )
        return None
    existing = registry.get(client_id)
    if existing is not None and config.duplicate_policy == "reject":  # DUP-2
        await _reject(
            conn, duplicate, "duplicate_client_id", request_id=request_id, session_id=msg.session_id
        )
        return None

    registry.reserve(client_id)
    try:
        if existing is not None:
            old = existing.connection
            if config.duplicate_policy == "probe":  # DUP-4
                if await old.probe(min(config.ping_timeout, PROBE_TIMEOUT_CAP)):
                    await _reject(
                        conn,
                        duplicate,
                        "duplicate_client_id",
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
        metadata = msg.metadata
        platform = metadata.get("platform") if metadata else None
        system_info = metadata.get("system_info") if metadata else None
        entry = ClientEntry(
            client_id=client_id,
            role=role,
            platform=platform if type(platform) is str and platform else "windows",
            metadata=metadata,
            system_info=system_info
            if role is ClientType.DEVICE and type(system_info) is dict
            else None,
            target_id=target_id,
            connection=conn,
            connected_at=trio.current_time(),
        )
        confirmation = ServerMessage(
            type=ServerMessageType.HEARTBEAT,
            status=TaskStatus.OK,
            extra={"protocol": PROTOCOL_VERSION, "server": f"ufo_trio/{__version__}"},
        )
        try:
            await conn.send_direct(confirmation)
        except ConnectionGone:
            conn.close(None, "connection lost before the confirmation")
            return None
        registry.add(entry)  # REG-7: only once the confirmation went out
    finally:
        registry.release(client_id)
    conn.entry = entry
    log.info(
        "%s registered (platform %s%s)",
        conn.label,
        shown(entry.platform, 40),
        f", target {shown(entry.target_id)}" if entry.target_id else "",
    )
    return entry


# ------------------------------------------------------------------------------------ dispatch


async def handle_frames(conn: Connection) -> None:
    """REGISTERED: take frames in arrival order until the connection ends (PROC-1)."""
    ws = conn.ws
    bucket = message_bucket(conn.server.config)
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
            await dispatch(conn, raw)
        except ConnectionGone:
            if not conn.is_open:
                return  # this very connection is closing (e.g. PROC-4); teardown takes over
            log.debug("%s: a frame could not be delivered to another connection", conn.label)
        except Exception:
            # DISP-3: the connection stays open and no exception text leaves the server.
            log.exception("%s: internal error while handling a frame", conn.label)
            await conn.send_error("Internal server error", "internal_error")


async def dispatch(conn: Connection, raw: str) -> None:
    try:
        msg = decode_client_message(raw)
    except DecodeError as exc:
        await conn.send_error(exc.error, exc.code, request_id=exc.request_id)
        return
    entry = conn.entry
    assert entry is not None
    kind = msg.type
    if msg.client_id and msg.client_id != entry.client_id:  # ID-1
        await _error(conn, msg, "client_id does not match the registered connection", "identity_mismatch")
        return
    if kind is not ClientMessageType.HEARTBEAT and msg.client_type is not entry.role:  # ID-2
        await _error(conn, msg, "client_type does not match the registered connection", "identity_mismatch")
        return
    if kind is ClientMessageType.HEARTBEAT:
        await conn.send_text(encode_heartbeat_ack())
    elif kind is ClientMessageType.TASK:
        await conn.server.sessions.handle_task(conn, msg)
    elif kind is ClientMessageType.COMMAND_RESULTS:
        await conn.server.sessions.handle_results(conn, msg)
    elif kind is ClientMessageType.DEVICE_INFO_REQUEST:
        await _device_info(conn, msg)
    elif kind is ClientMessageType.DEVICE_INFO_RESPONSE:
        log.info("%s sent a device_info_response (ignored)", conn.label)
    elif kind is ClientMessageType.ERROR:
        log.warning("%s reported an error (%d characters)", conn.label, len(msg.error or ""))
        await _error(conn, msg, truncate(msg.error) if msg.error else "Unknown error", "client_error")
    else:  # register, task_end
        await _error(conn, msg, f"Unknown message type: {kind.value}", "unknown_type")


async def _error(conn: Connection, msg: ClientMessage, error: str, code: str) -> None:
    await conn.send_error(error, code, request_id=msg.request_id, session_id=msg.session_id)


async def _device_info(conn: Connection, msg: ClientMessage) -> None:
    entry = conn.entry
    assert entry is not None
    if entry.role is not ClientType.CONSTELLATION:  # DI-1
        await _error(
            conn,
            msg,
            "DEVICE_INFO_REQUEST is permitted only for constellation clients",
            "not_authorized",
        )
        return
    target_id = msg.target_id
    if entry.target_id is not None and target_id != entry.target_id:  # DI-2
        await _error(
            conn, msg, "Not authorized to request device info for this device", "not_authorized"
        )
        return
    target = conn.server.registry.get(target_id) if target_id else None
    result: Any
    if target is not None and target.is_device and target.system_info is not None:
        result = target.system_info
    else:
        shown = truncate(target_id) if target_id is not None else "None"
        result = {"error": f"Device {shown} not found or no system info available"}
    await conn.send(
        ServerMessage(
            type=ServerMessageType.DEVICE_INFO_RESPONSE,
            status=TaskStatus.OK,
            result=result,
            response_id=msg.request_id,
        )
    )
