"""AIP wire values (PROTOCOL.md §1): enums with the exact wire strings and frozen attrs classes.

Nothing here does I/O or JSON; `_codec` turns these into text and back.

The enums are `StrEnum`s whose values are the wire strings, so a member can stand wherever its
string goes (a JSON document, a log line, a database column) and the server keeps the enum end to
end: `Session.requester_type` is a `ClientType`, `SessionRecord.status` a `TaskStatus`. Code
compares members with `is`.
"""

from __future__ import annotations

import enum
import os
from typing import Any

import attrs


class ClientMessageType(enum.StrEnum):
    """`type` of a client → server frame."""

    TASK = "task"
    HEARTBEAT = "heartbeat"
    COMMAND_RESULTS = "command_results"
    ERROR = "error"
    REGISTER = "register"
    TASK_END = "task_end"
    DEVICE_INFO_REQUEST = "device_info_request"
    DEVICE_INFO_RESPONSE = "device_info_response"


class ServerMessageType(enum.StrEnum):
    """`type` of a server → client frame."""

    TASK = "task"
    HEARTBEAT = "heartbeat"
    TASK_END = "task_end"
    COMMAND = "command"
    ERROR = "error"
    DEVICE_INFO_REQUEST = "device_info_request"
    DEVICE_INFO_RESPONSE = "device_info_response"


class TaskStatus(enum.StrEnum):
    """`status` of any frame."""

    CONTINUE = "continue"
    COMPLETED = "completed"
    FAILED = "failed"
    OK = "ok"
    ERROR = "error"


class ClientType(enum.StrEnum):
    """The role a client claims at registration."""

    DEVICE = "device"
    CONSTELLATION = "constellation"


class ResultStatus(enum.StrEnum):
    """`Result.status`."""

    SUCCESS = "success"
    FAILURE = "failure"
    SKIPPED = "skipped"
    NONE = "none"


class ToolType(enum.StrEnum):
    """`Command.tool_type`."""

    DATA_COLLECTION = "data_collection"
    ACTION = "action"


_ID_BATCH = 256
_id_pool = bytearray()
_id_pos = 0


def new_id() -> str:
    """A fresh random UUID v4 in canonical lowercase form (`<uuid4>` in the spec).

    Same randomness as `uuid.uuid4()` (os.urandom), drawn 256 ids at a time: one frame out of
    256 pays the system call instead of every frame. Call it from one thread (the Trio loop).
    """
    global _id_pool, _id_pos
    if _id_pos >= len(_id_pool):
        pool = bytearray(os.urandom(16 * _ID_BATCH))
        for i in range(0, len(pool), 16):
            pool[i + 6] = (pool[i + 6] & 0x0F) | 0x40  # version 4
            pool[i + 8] = (pool[i + 8] & 0x3F) | 0x80  # RFC 4122 variant
        _id_pool, _id_pos = pool, 0
    h = _id_pool[_id_pos : _id_pos + 16].hex()
    _id_pos += 16
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@attrs.frozen(kw_only=True)
class Command:
    """One tool call inside a COMMAND frame (§1.4)."""

    tool_name: str
    tool_type: ToolType
    parameters: dict[str, Any] | None = None
    call_id: str | None = None


@attrs.frozen(kw_only=True)
class Result:
    """The outcome of one Command (§1.4). All five keys are always written (WIRE-5)."""

    status: ResultStatus
    error: str | None = None
    result: Any = None
    namespace: str | None = None
    call_id: str | None = None


@attrs.frozen(kw_only=True)
class ClientMessage:
    """A client → server frame (§1.3). Unknown keys are dropped on decode (WIRE-4)."""

    type: ClientMessageType
    status: TaskStatus
    client_type: ClientType = ClientType.DEVICE
    session_id: str | None = None
    task_name: str | None = None
    client_id: str | None = None
    target_id: str | None = None
    request: str | None = None
    action_results: list[Result] | None = None
    timestamp: str | None = None
    request_id: str | None = None
    prev_response_id: str | None = None
    error: str | None = None
    metadata: dict[str, Any] | None = None


@attrs.frozen(kw_only=True)
class ServerMessage:
    """A server → client frame (§1.3). Serialised with all 14 keys, in this order (WIRE-3).

    `response_id` defaults to a fresh uuid4 (WIRE-8); pass `None` explicitly for a null one.
    `extra` holds the only extra keys the spec allows: `code` on ERROR frames and `protocol` /
    `server` on the registration confirmation. `timestamp` is stamped when the frame is encoded.
    """

    type: ServerMessageType
    status: TaskStatus
    user_request: str | None = None
    agent_name: str | None = None
    process_name: str | None = None
    root_name: str | None = None
    actions: list[Command] | None = None
    error: str | None = None
    session_id: str | None = None
    task_name: str | None = None
    response_id: str | None = attrs.field(factory=new_id)
    result: Any = None
    extra: dict[str, Any] | None = None
