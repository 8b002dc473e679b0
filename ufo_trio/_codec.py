"""JSON text ⇄ AIP messages, with one cattrs converter (PROTOCOL.md §1).

Decoding is strict where the spec is strict (WIRE-4: exact enums, strings are strings, nothing is
coerced) and lenient where the real clients need it (unknown keys are ignored). Every decode
failure is a `DecodeError` whose text is short, names the first bad field by its dotted path and
never contains input values (WIRE-6).
"""

from __future__ import annotations

import datetime
import enum
import json
import math
import re
from typing import TYPE_CHECKING, Any, Final, TypeVar

import cattrs

from ._errors import UfoTrioError
from ._messages import (
    ClientMessage,
    ClientMessageType,
    ClientType,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
    ToolType,
    new_id,
)

if TYPE_CHECKING:
    from collections.abc import Callable

_E = TypeVar("_E", bound=enum.Enum)

__all__ = [
    "DecodeError",
    "converter",
    "decode_client_message",
    "encode_server_message",
    "parse_json_object",
    "quoted",
    "shown",
    "structure_client_message",
    "truncate",
]

#: SCOPE-4: client-supplied text inserted into an error string is cut to this many characters.
MAX_ECHO = 200


def shown(value: str | None, limit: int = 80) -> str:
    """A client-supplied id for a log line: `repr`, cut to `limit` characters (ids are unbounded)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def truncate(text: str, limit: int = MAX_ECHO) -> str:
    """SCOPE-4: cut client-supplied text before it goes into an error string."""
    return text if len(text) <= limit else text[:limit]


def quoted(value: str) -> str:
    """A client-supplied id for an error string: `repr`, truncated first (SCOPE-4)."""
    return repr(truncate(value))


class DecodeError(UfoTrioError):
    """A client frame could not be decoded.

    `error` is the exact wire text (`Invalid message: …` or `Unknown message type: …`),
    `code` the ERROR code (`invalid_message` / `unknown_type`), `request_id` the frame's
    `request_id` when it could be read as a non-empty string (CLAR-1), else None.
    """

    def __init__(self, error: str, *, code: str = "invalid_message", request_id: str | None = None):
        super().__init__(error)
        self.error = error
        self.code = code
        self.request_id = request_id


class _WrongType(Exception):
    pass


class _InvalidValue(Exception):
    pass


converter: Final = cattrs.Converter(detailed_validation=True)


def _structure_str(value: object, _: type) -> str:
    if type(value) is not str:
        raise _WrongType
    return value


def _structure_dict(value: object, _: type) -> dict[str, Any]:
    if type(value) is not dict:
        raise _WrongType
    return value


def _by_value(enum_cls: type[_E]) -> dict[str, _E]:
    """Wire string → member: the one lookup table per enum, shared by both decode paths."""
    return {m.value: m for m in enum_cls}


_TYPES: Final = _by_value(ClientMessageType)
_STATUSES: Final = _by_value(TaskStatus)
_CLIENT_TYPES: Final = _by_value(ClientType)
_RESULT_STATUSES: Final = _by_value(ResultStatus)
_TOOL_TYPES: Final = _by_value(ToolType)


def _enum_hook(members: dict[str, Any]) -> Callable[[object, type], Any]:
    def structure(value: object, _: type) -> Any:
        if type(value) is not str:
            raise _WrongType
        try:
            return members[value]
        except KeyError:
            raise _InvalidValue from None

    return structure


def _strict_list(item_type: type[Any]) -> Callable[[object, type], list[Any]]:
    base = converter.get_structure_hook(list[item_type])  # type: ignore[valid-type]

    def structure(value: object, cl: type) -> list[Any]:
        if type(value) is not list:
            raise _WrongType
        return base(value, cl)  # type: ignore[no-any-return]

    return structure


def _object_only(cls: type[Any]) -> Callable[[object, type], Any]:
    base = converter.get_structure_hook(cls)

    def structure(value: object, cl: type) -> Any:
        if type(value) is not dict:
            raise _WrongType
        return base(value, cl)

    return structure


converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook_func(lambda t: t == dict[str, Any], _structure_dict)
for _enum, _members in (
    (ClientMessageType, _TYPES),
    (TaskStatus, _STATUSES),
    (ClientType, _CLIENT_TYPES),
    (ResultStatus, _RESULT_STATUSES),
    (ToolType, _TOOL_TYPES),
):
    converter.register_structure_hook(_enum, _enum_hook(_members))
converter.register_structure_hook(Command, _object_only(Command))
converter.register_structure_hook(Result, _object_only(Result))
converter.register_structure_hook_func(lambda t: t == list[Command], _strict_list(Command))
converter.register_structure_hook_func(lambda t: t == list[Result], _strict_list(Result))

#: cattrs' generated hook: validates every field and reports the first bad one with its path.
_structure_client_detailed: Final = converter.get_structure_hook(ClientMessage)

_STR_FIELDS: Final = (
    "session_id",
    "task_name",
    "client_id",
    "target_id",
    "request",
    "timestamp",
    "request_id",
    "prev_response_id",
    "error",
)


class _Irregular(Exception):
    """The fast path met something it does not decide; cattrs' hook takes over."""


def _fast_results(raw: object) -> list[Result]:
    if type(raw) is not list:
        raise _Irregular
    results = []
    for item in raw:
        if type(item) is not dict:
            raise _Irregular
        get = item.get
        error, namespace, call_id = get("error"), get("namespace"), get("call_id")
        for value in (error, namespace, call_id):
            if value is not None and type(value) is not str:
                raise _Irregular
        results.append(
            Result(
                status=_RESULT_STATUSES[item["status"]],
                error=error,
                result=get("result"),
                namespace=namespace,
                call_id=call_id,
            )
        )
    return results


def _structure_client_fast(obj: dict[str, Any], cl: type) -> ClientMessage:
    """The converter's ClientMessage hook: the same checks as the generated one, in plain code.

    Frames that are valid (nearly all of them) are built here at about half the cost; anything
    irregular is handed to cattrs' detailed hook, which builds it or names the first bad field.
    """
    get = obj.get
    try:
        kind = _TYPES[obj["type"]]
        status = _STATUSES[obj["status"]]
        client_type = _CLIENT_TYPES[get("client_type", "device")]
        for name in _STR_FIELDS:
            value = get(name)
            if value is not None and type(value) is not str:
                raise _Irregular
        metadata = get("metadata")
        if metadata is not None and type(metadata) is not dict:
            raise _Irregular
        raw_results = get("action_results")
        results = None if raw_results is None else _fast_results(raw_results)
    except (KeyError, TypeError, _Irregular):
        return _structure_client_detailed(obj, cl)  # type: ignore[no-any-return]
    return ClientMessage(
        type=kind,
        status=status,
        client_type=client_type,
        session_id=get("session_id"),
        task_name=get("task_name"),
        client_id=get("client_id"),
        target_id=get("target_id"),
        request=get("request"),
        action_results=results,
        timestamp=get("timestamp"),
        request_id=get("request_id"),
        prev_response_id=get("prev_response_id"),
        error=get("error"),
        metadata=metadata,
    )


converter.register_structure_hook(ClientMessage, _structure_client_fast)
_structure_client: Final = _structure_client_fast


def _problem(exc: BaseException, _type: type | None) -> str:
    if isinstance(exc, KeyError):
        return "field required"
    if isinstance(exc, _InvalidValue):
        return "invalid value"
    return "wrong type"


_INDEX: Final = re.compile(r"\[(\d+)\]")


def _first_problem(exc: BaseException) -> str:
    """Turn a cattrs validation error into `<path>: <problem>` for the first bad field."""
    messages = cattrs.transform_error(exc, path="$", format_exception=_problem)
    if not messages:  # pragma: no cover - cattrs always reports at least one
        return "message: invalid value"
    problem, _, path = messages[0].rpartition(" @ ")
    path = _INDEX.sub(r".\1", path).removeprefix("$").removeprefix(".") or "message"
    return truncate(f"{path}: {problem}", MAX_ECHO - len("Invalid message: "))


def _request_id_of(obj: dict[str, Any]) -> str | None:
    rid = obj.get("request_id")
    return rid if type(rid) is str and rid else None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999 overflows to inf
        raise ValueError("number out of range")
    return value


# NaN and Infinity are Python extensions, not JSON, and so is a number that overflows to inf:
# refusing them here means no client value can make an outbound frame invalid JSON. The encoder
# refuses them too (allow_nan=False), for values that did not come from a client.
_decode: Final = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite_float).decode


def parse_json_object(text: str) -> dict[str, Any]:
    """WIRE-6 steps 1–2: text → JSON object, or `DecodeError`."""
    try:
        obj = _decode(text)
    except (ValueError, RecursionError):
        raise DecodeError("Invalid message: not valid JSON") from None
    if type(obj) is not dict:
        raise DecodeError("Invalid message: expected a JSON object")
    return obj


def structure_client_message(obj: dict[str, Any]) -> ClientMessage:
    """WIRE-6 step 5: a JSON object → ClientMessage, or `DecodeError` naming the first bad field."""
    try:
        return _structure_client(obj, ClientMessage)
    except Exception as exc:
        raise DecodeError(
            "Invalid message: " + _first_problem(exc), request_id=_request_id_of(obj)
        ) from None


def decode_client_message(text: str) -> ClientMessage:
    """Decode one frame of a registered connection, checking in the order of WIRE-6."""
    obj = parse_json_object(text)
    kind = obj.get("type")
    if type(kind) is not str:
        problem = "field required" if "type" not in obj else "wrong type"
        raise DecodeError(f"Invalid message: type: {problem}", request_id=_request_id_of(obj))
    if kind not in _TYPES:
        raise DecodeError(
            f"Unknown message type: {truncate(kind)}",
            code="unknown_type",
            request_id=_request_id_of(obj),
        )
    return structure_client_message(obj)


def _dump_command(command: Command) -> dict[str, Any]:
    return {
        "tool_name": command.tool_name,
        "parameters": command.parameters,
        "tool_type": command.tool_type.value,
        "call_id": command.call_id,
    }


def _dump_result(result: Result) -> dict[str, Any]:
    return {
        "status": result.status.value,
        "error": result.error,
        "result": result.result,
        "namespace": result.namespace,
        "call_id": result.call_id,
    }


converter.register_unstructure_hook(Command, _dump_command)
converter.register_unstructure_hook(Result, _dump_result)

_dumps: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_UTC: Final = datetime.UTC


def _now() -> str:
    return datetime.datetime.now(_UTC).isoformat()


def unstructure(value: Any) -> Any:
    """Turn a value that may hold Commands/Results (e.g. an agent's result) into plain JSON data.

    Plain JSON values, lists, dicts, Results and Commands are handled here directly (this runs
    for every TASK_END); anything else goes to the converter.
    """
    kind = type(value)
    if value is None or kind is str or kind is int or kind is float or kind is bool:
        return value
    if kind is list or kind is tuple:
        return [unstructure(item) for item in value]
    if kind is dict:
        return {key: unstructure(item) for key, item in value.items()}
    if kind is Result:
        return _dump_result(value)
    if kind is Command:
        return _dump_command(value)
    return converter.unstructure(value)


def _dump_server_message(msg: ServerMessage) -> dict[str, Any]:
    actions = msg.actions
    frame: dict[str, Any] = {
        "type": msg.type.value,
        "status": msg.status.value,
        "user_request": msg.user_request,
        "agent_name": msg.agent_name,
        "process_name": msg.process_name,
        "root_name": msg.root_name,
        "actions": None if actions is None else [_dump_command(c) for c in actions],
        "messages": None,
        "error": msg.error,
        "session_id": msg.session_id,
        "task_name": msg.task_name,
        "timestamp": _now(),
        "response_id": msg.response_id,
        "result": unstructure(msg.result),
    }
    if msg.extra:
        frame.update(msg.extra)
    return frame


converter.register_unstructure_hook(ServerMessage, _dump_server_message)


# The heartbeat ack is the hottest frame: pre-encode everything but its timestamp and id.
_ACK_HEAD: Final = _dumps(
    _dump_server_message(ServerMessage(type=ServerMessageType.HEARTBEAT, status=TaskStatus.OK))
).partition(',"timestamp":')[0] + ',"timestamp":"'


def encode_heartbeat_ack() -> str:
    """The DISP-1 heartbeat ack; byte-for-byte what `encode_server_message` would produce."""
    return f'{_ACK_HEAD}{_now()}","response_id":"{new_id()}","result":null}}'


def encode_server_message(msg: ServerMessage) -> str:
    """ServerMessage → compact JSON text with all 14 keys in order, then extras (WIRE-3).

    Non-ASCII is escaped, so a lone surrogate a client sent can never break UTF-8 encoding.
    Raises `TypeError`/`ValueError` if `result` is not JSON-serialisable.
    """
    return _dumps(_dump_server_message(msg))
