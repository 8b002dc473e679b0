"""AIP frames as the client sees them: sans-IO, no sockets, no server code.

The SDK is an independent check of the wire protocol, so it keeps its own small model of the
frames instead of importing the server's. Parsing follows what PROTOCOL.md asks of clients
(COMPAT-4): a server frame needs a known ``type`` and ``status``; unknown keys are ignored;
anything else is a `FrameError` and the caller drops the frame.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

import attrs

SERVER_TYPES = frozenset(
    {
        "task",
        "heartbeat",
        "task_end",
        "command",
        "error",
        "device_info_request",
        "device_info_response",
    }
)
TASK_STATUSES = frozenset({"continue", "completed", "failed", "ok", "error"})
RESULT_STATUSES = frozenset({"success", "failure", "skipped", "none"})
TOOL_TYPES = frozenset({"data_collection", "action"})

ToolType: TypeAlias = Literal["data_collection", "action"]
ResultStatus: TypeAlias = Literal["success", "failure", "skipped", "none"]
ClientType: TypeAlias = Literal["device", "constellation"]

#: The text a real device puts on every Result after the first failure (§1.4).
SKIPPED_ERROR = "Skipped due to previous failure (early_exit=True)."
#: The result a real device returns for a Command with an empty ``tool_name`` (§1.4).
NO_ACTION_RESULT = "No action taken."


class FrameError(ValueError):
    """A server frame that a client must drop (COMPAT-4)."""


def new_id() -> str:
    """A fresh canonical uuid4, the protocol's id format."""
    return str(uuid.uuid4())


def timestamp() -> str:
    """Wall-clock UTC in the format the protocol uses (WIRE-7); only ever informative."""
    return datetime.now(UTC).isoformat()


def encode(frame: Mapping[str, Any]) -> str:
    """Compact JSON text for one frame (WIRE-1). Raises `TypeError` for non-JSON values."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def is_json_value(value: Any) -> bool:
    """True if *value* survives `encode` (used to vet tool results before sending them)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


# --------------------------------------------------------------------------------- values


@attrs.frozen(kw_only=True)
class Command:
    """One tool call (§1.4): ``tool_name``, ``parameters``, ``tool_type`` and ``call_id``.

    Used both ways: devices receive them in COMMAND frames, and plans are lists of them.
    """

    tool_name: str
    parameters: Mapping[str, Any] | None = None
    tool_type: ToolType = "action"
    call_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object for this command; ``call_id`` only when set."""
        out: dict[str, Any] = {
            "tool_name": self.tool_name,
            "parameters": dict(self.parameters) if self.parameters is not None else None,
            "tool_type": self.tool_type,
        }
        if self.call_id is not None:
            out["call_id"] = self.call_id
        return out


@attrs.frozen(kw_only=True)
class InvalidCommand:
    """An entry of a COMMAND's ``actions`` that is not a valid Command.

    The device still owes it a Result (one per Command, CMD-5), so it is kept in place.
    """

    problem: str
    call_id: str | None = None


@attrs.frozen(kw_only=True)
class ToolResult:
    """One Result (§1.4). `to_wire` always writes all five keys (WIRE-5)."""

    status: ResultStatus
    result: Any = None
    error: str | None = None
    namespace: str | None = None
    call_id: str | None = None

    @property
    def ok(self) -> bool:
        """True for ``success``."""
        return self.status == "success"

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error": self.error,
            "result": self.result,
            "namespace": self.namespace,
            "call_id": self.call_id,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> ToolResult:
        """Read a Result leniently (for display); a malformed entry becomes a ``none`` Result."""
        if not isinstance(raw, Mapping) or raw.get("status") not in RESULT_STATUSES:
            return cls(status="none", result=raw)
        return cls(
            status=raw["status"],
            result=raw.get("result"),
            error=_str_or_none(raw.get("error")),
            namespace=_str_or_none(raw.get("namespace")),
            call_id=_str_or_none(raw.get("call_id")),
        )


def parse_command(raw: Any) -> Command | InvalidCommand:
    """Validate one entry of a COMMAND's ``actions`` against §1.4."""
    if not isinstance(raw, Mapping):
        return InvalidCommand(problem="a command must be a JSON object")
    call_id = raw.get("call_id")
    if call_id is not None and not isinstance(call_id, str):
        return InvalidCommand(problem="call_id must be a string")
    tool_name = raw.get("tool_name")
    if not isinstance(tool_name, str):
        return InvalidCommand(problem="tool_name must be a string", call_id=call_id)
    parameters = raw.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        return InvalidCommand(problem="parameters must be a JSON object", call_id=call_id)
    tool_type = raw.get("tool_type")
    if tool_type not in TOOL_TYPES:
        return InvalidCommand(
            problem="tool_type must be 'data_collection' or 'action'", call_id=call_id
        )
    return Command(
        tool_name=tool_name,
        parameters=parameters,
        tool_type=tool_type,
        call_id=call_id,
    )


# --------------------------------------------------------------------------------- server frames


@attrs.frozen(kw_only=True)
class ServerFrame:
    """A server frame, reduced to the keys clients use. ``raw`` keeps the whole object."""

    type: str
    status: str
    session_id: str | None = None
    task_name: str | None = None
    response_id: str | None = None
    error: str | None = None
    code: str | None = None
    result: Any = None
    actions: Sequence[Any] | None = None
    agent_name: str | None = None
    process_name: str | None = None
    root_name: str | None = None
    user_request: str | None = None
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse_server_frame(data: str | bytes) -> ServerFrame:
    """Parse one server frame. Raises `FrameError` for anything a client must drop."""
    if isinstance(data, bytes):
        raise FrameError("binary frames are not part of the protocol")
    try:
        raw = json.loads(data)
    except ValueError:
        raise FrameError("not valid JSON") from None
    if not isinstance(raw, dict):
        raise FrameError("not a JSON object")
    ftype = raw.get("type")
    status = raw.get("status")
    if not isinstance(ftype, str) or ftype not in SERVER_TYPES:
        raise FrameError("unknown or missing type")
    if not isinstance(status, str) or status not in TASK_STATUSES:
        raise FrameError("unknown or missing status")
    actions = raw.get("actions")
    return ServerFrame(
        type=ftype,
        status=status,
        session_id=_str_or_none(raw.get("session_id")),
        task_name=_str_or_none(raw.get("task_name")),
        response_id=_str_or_none(raw.get("response_id")),
        error=_str_or_none(raw.get("error")),
        code=_str_or_none(raw.get("code")),
        result=raw.get("result"),
        actions=actions if isinstance(actions, list) else None,
        agent_name=_str_or_none(raw.get("agent_name")),
        process_name=_str_or_none(raw.get("process_name")),
        root_name=_str_or_none(raw.get("root_name")),
        user_request=_str_or_none(raw.get("user_request")),
        raw=raw,
    )


# --------------------------------------------------------------------------------- client frames


def _base(
    ftype: str, status: str, client_id: str, client_type: ClientType
) -> dict[str, Any]:
    return {
        "type": ftype,
        "status": status,
        "client_type": client_type,
        "client_id": client_id,
        "timestamp": timestamp(),
    }


def register_frame(
    client_id: str,
    client_type: ClientType,
    *,
    target_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """REGISTER (§3.1). ``target_id`` scopes a constellation (REG-4)."""
    frame = _base("register", "ok", client_id, client_type)
    if target_id is not None:
        frame["target_id"] = target_id
    if metadata is not None:
        frame["metadata"] = dict(metadata)
    return frame


def heartbeat_frame(client_id: str, client_type: ClientType) -> dict[str, Any]:
    """HEARTBEAT; the server acks it with ``heartbeat``/``ok`` (DISP-1)."""
    frame = _base("heartbeat", "ok", client_id, client_type)
    frame["request_id"] = new_id()
    return frame


def task_frame(
    client_id: str,
    client_type: ClientType,
    *,
    request: str,
    session_id: str | None,
    task_name: str | None,
    target_id: str | None,
    request_id: str,
) -> dict[str, Any]:
    """TASK (§4.1). ``request_id`` comes back as the ERROR's ``response_id`` if rejected."""
    frame = _base("task", "continue", client_id, client_type)
    frame.update(
        {
            "request": request,
            "session_id": session_id,
            "task_name": task_name,
            "request_id": request_id,
        }
    )
    if target_id is not None:
        frame["target_id"] = target_id
    return frame


def command_results_frame(
    client_id: str, command: ServerFrame, results: Sequence[ToolResult]
) -> dict[str, Any]:
    """COMMAND_RESULTS answering *command*: ``prev_response_id`` and ``session_id`` copied
    from it (COMPAT-10), one Result per Command."""
    frame = _base("command_results", "continue", client_id, "device")
    frame.update(
        {
            "session_id": command.session_id,
            "prev_response_id": command.response_id,
            "request_id": new_id(),
            "action_results": [r.to_wire() for r in results],
        }
    )
    return frame


def device_info_request_frame(
    client_id: str, *, target_id: str, request_id: str
) -> dict[str, Any]:
    """DEVICE_INFO_REQUEST (§5); the answer's ``response_id`` equals ``request_id``."""
    frame = _base("device_info_request", "ok", client_id, "constellation")
    frame["target_id"] = target_id
    frame["request_id"] = request_id
    return frame
