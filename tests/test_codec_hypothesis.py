"""Property tests for the codec (`ufo_trio._codec`), from PROTOCOL.md §1.

* Any ClientMessage-shaped JSON object decodes to the values it holds (WIRE-4) and survives a
  second trip.
* Arbitrary text and arbitrary JSON never raise anything but `DecodeError`, whose text follows
  WIRE-6 (prefix, length, no input values) and whose `request_id` follows CLAR-1.
* `encode_server_message` always writes compact JSON with the 14 keys in order, extras last
  (WIRE-3), a WIRE-7 timestamp and five-key Results (WIRE-5).
"""

from __future__ import annotations

import json
import re
from typing import Any

from blackbox_helpers import CLIENT_TYPES, KEYS, STATUSES, TIMESTAMP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ufo_trio._codec import DecodeError, decode_client_message, encode_server_message
from ufo_trio._messages import (
    ClientMessage,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
    ToolType,
)

RESULT_STATUSES = ["success", "failure", "skipped", "none"]
STRING_FIELDS = [
    "session_id", "task_name", "client_id", "target_id", "request", "timestamp", "request_id",
    "prev_response_id", "error",
]  # fmt: skip
KNOWN = {"type", "status", "client_type", "action_results", "metadata", *STRING_FIELDS}
INVALID = "Invalid message: "
UNKNOWN = "Unknown message type: "
MARKER = "\u27e6"  # never part of a server-written error text


def json_values(strings: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[Any]:
    leaves = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | (strings if strings is not None else st.text())
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


json_objects = st.dictionaries(st.text(max_size=10), json_values(), max_size=5)
optional_text = st.none() | st.text(max_size=30)

results = st.fixed_dictionaries(
    {"status": st.sampled_from(RESULT_STATUSES)},
    optional={
        "error": optional_text,
        "result": json_values(),
        "namespace": optional_text,
        "call_id": optional_text,
        "extra_key": json_values(),
    },
)

client_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(CLIENT_TYPES), "status": st.sampled_from(STATUSES)},
    optional={
        "client_type": st.sampled_from(["device", "constellation"]),
        "action_results": st.none() | st.lists(results, max_size=4),
        "metadata": st.none() | json_objects,
        **dict.fromkeys(STRING_FIELDS, optional_text),
        "unknown_field": json_values(),
        "x-extra": json_values(),
    },
)


def check_decoded(frame: dict[str, Any], msg: ClientMessage) -> None:
    """Every field holds what the frame said; omitted fields have their defaults (WIRE-4)."""
    assert msg.type.value == frame["type"]
    assert msg.status.value == frame["status"]
    assert msg.client_type.value == frame.get("client_type", "device")
    for name in STRING_FIELDS:
        assert getattr(msg, name) == frame.get(name)
    assert msg.metadata == frame.get("metadata")
    expected = frame.get("action_results")
    if expected is None:
        assert msg.action_results is None
    else:
        assert msg.action_results is not None
        assert len(msg.action_results) == len(expected)
        for got, want in zip(msg.action_results, expected, strict=True):
            assert got.status.value == want["status"]
            for name in ("error", "result", "namespace", "call_id"):
                assert getattr(got, name) == want.get(name)


def as_frame(msg: ClientMessage) -> dict[str, Any]:
    """A ClientMessage back to its wire form."""
    frame: dict[str, Any] = {
        "type": msg.type.value,
        "status": msg.status.value,
        "client_type": msg.client_type.value,
        "metadata": msg.metadata,
        **{name: getattr(msg, name) for name in STRING_FIELDS},
    }
    if msg.action_results is not None:
        frame["action_results"] = [
            {"status": r.status.value, "error": r.error, "result": r.result,
             "namespace": r.namespace, "call_id": r.call_id}
            for r in msg.action_results
        ]  # fmt: skip
    return frame


@settings(deadline=None)  # no per-example deadline: CI machines are noisy
@given(client_frames)
def test_client_message_round_trip_wire4(frame: dict[str, Any]) -> None:
    """WIRE-4: valid ClientMessage-shaped objects decode to their values (unknown keys ignored,
    omitted client_type = device, null = omitted) and decode identically after a second trip."""
    msg = decode_client_message(json.dumps(frame))
    check_decoded(frame, msg)
    assert decode_client_message(json.dumps(as_frame(msg))) == msg


def check_decode_error(exc: DecodeError, value: object) -> None:
    """WIRE-6 / SCOPE-4 / CLAR-1 for one DecodeError."""
    if exc.code == "invalid_message":
        assert exc.error.startswith(INVALID)
        assert len(exc.error) <= 200
    else:
        assert exc.code == "unknown_type"
        assert exc.error.startswith(UNKNOWN)
        assert len(exc.error) <= 200 + len(UNKNOWN)
    rid = value.get("request_id") if isinstance(value, dict) else None
    assert exc.request_id == (rid if isinstance(rid, str) and rid else None)


def not_json(name: str) -> Any:
    """NaN and Infinity are Python extensions, not JSON (RFC 8259)."""
    raise ValueError(name)


def decode_checked(text: str, value: object) -> DecodeError | None:
    try:
        decode_client_message(text)
    except DecodeError as exc:
        check_decode_error(exc, value)
        return exc
    return None


@settings(deadline=None)  # no per-example deadline: CI machines are noisy
@given(st.text())
@example("")
@example("{")
@example("[" * 100_000)  # deep nesting must not escape as RecursionError
@example('{"type":"heartbeat"')
@example('{"type":"heartbeat","status":"ok"}')
@example('{"type":"heartbeat","status":"ok","request_id":"r","x":NaN}')
def test_arbitrary_text_only_raises_decode_error_wire6(text: str) -> None:
    """Arbitrary text: either a message or a DecodeError with a WIRE-6 text; nothing else."""
    try:
        value: object = json.loads(text, parse_constant=not_json)
    except (ValueError, RecursionError):
        value = None
    exc = decode_checked(text, value)
    if exc is not None and not isinstance(value, dict):
        assert exc.error in (f"{INVALID}not valid JSON", f"{INVALID}expected a JSON object")


@settings(deadline=None)  # no per-example deadline: CI machines are noisy
@given(json_values())
def test_arbitrary_json_values_only_raise_decode_error_wire6(value: Any) -> None:
    """Arbitrary JSON values (objects included): only DecodeError, with a WIRE-6 text."""
    decode_checked(json.dumps(value), value)


marked_text = st.text(max_size=20).map(lambda s: MARKER + s)
junk_frames = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(CLIENT_TYPES) | json_values(marked_text),
        "status": st.sampled_from(STATUSES) | json_values(marked_text),
        "client_type": st.sampled_from(["device", "constellation"]) | json_values(marked_text),
        "action_results": st.lists(
            st.fixed_dictionaries(
                {}, optional={"status": st.sampled_from(RESULT_STATUSES) | json_values(marked_text),
                              "error": json_values(marked_text), "call_id": json_values(marked_text)}
            ) | json_values(marked_text),
            max_size=3,
        ) | json_values(marked_text),
        **dict.fromkeys(sorted(KNOWN - {"type", "status", "client_type", "action_results"}),
                        json_values(marked_text)),
    },
)  # fmt: skip


@settings(deadline=None)  # no per-example deadline: CI machines are noisy
@given(junk_frames)
def test_invalid_message_texts_never_echo_input_wire6(frame: dict[str, Any]) -> None:
    """WIRE-6: invalid_message texts never contain input values (every client-supplied string
    here carries a marker), and a schema error names a dotted path with numeric indices."""
    exc = decode_checked(json.dumps(frame), frame)
    if exc is None or exc.code != "invalid_message":
        return
    assert MARKER not in exc.error
    detail = exc.error.removeprefix(INVALID)
    if detail not in ("not valid JSON", "expected a JSON object"):
        path, _, problem = detail.rpartition(": ")
        assert re.fullmatch(r"[a-z_]+(\.(\d+|[a-z_]+))*", path), detail
        assert problem in ("field required", "wrong type", "invalid value"), detail


# --- encode_server_message -----------------------------------------------------------------------

commands = st.builds(
    Command,
    tool_name=st.text(max_size=20),
    tool_type=st.sampled_from(ToolType),
    parameters=st.none() | json_objects,
    call_id=optional_text,
)
result_objects = st.builds(
    Result,
    status=st.sampled_from(ResultStatus),
    error=optional_text,
    result=json_values(),
    namespace=optional_text,
    call_id=optional_text,
)
server_messages = st.builds(
    ServerMessage,
    type=st.sampled_from(ServerMessageType),
    status=st.sampled_from(TaskStatus),
    user_request=optional_text,
    agent_name=optional_text,
    process_name=optional_text,
    root_name=optional_text,
    actions=st.none() | st.lists(commands, max_size=3),
    error=optional_text,
    session_id=optional_text,
    task_name=optional_text,
    response_id=st.none() | st.uuids(version=4).map(str) | st.text(max_size=20),
    result=json_values() | st.lists(result_objects, max_size=3),
    extra=st.none()
    | st.fixed_dictionaries(
        {}, optional=dict.fromkeys(["code", "protocol", "server"], st.text(max_size=10))
    ),
)


@settings(deadline=None)  # no per-example deadline: CI machines are noisy
@given(server_messages)
@example(ServerMessage(type=ServerMessageType.ERROR, status=TaskStatus.ERROR, error="\ud800 lone"))
def test_encode_server_message_shape_wire3_wire5_wire7(msg: ServerMessage) -> None:
    """WIRE-3: compact JSON, the 14 keys in order, extras after them, lowercase enum strings.
    WIRE-5: every dumped Result has its five keys. WIRE-7: timestamp format. The text is
    always encodable as UTF-8 (a lone surrogate from a client cannot break the send)."""
    text = encode_server_message(msg)
    text.encode("utf-8")
    frame = json.loads(text)
    assert text == json.dumps(frame, separators=(",", ":"))
    assert list(frame) == [*KEYS, *(msg.extra or {})]
    assert frame["type"] == msg.type.value
    assert frame["status"] == msg.status.value
    assert frame["messages"] is None
    assert TIMESTAMP.fullmatch(frame["timestamp"])
    for name in ("user_request", "agent_name", "process_name", "root_name", "error",
                 "session_id", "task_name", "response_id"):  # fmt: skip
        assert frame[name] == getattr(msg, name)
    if msg.actions is None:
        assert frame["actions"] is None
    else:
        assert [set(a) for a in frame["actions"]] == [
            {"tool_name", "parameters", "tool_type", "call_id"}
        ] * len(msg.actions)
        assert [a["tool_type"] for a in frame["actions"]] == [
            c.tool_type.value for c in msg.actions
        ]
    if isinstance(msg.result, list) and msg.result and isinstance(msg.result[0], Result):
        for dumped, original in zip(frame["result"], msg.result, strict=True):
            assert list(dumped) == ["status", "error", "result", "namespace", "call_id"]
            assert dumped["status"] == original.status.value
    else:
        assert frame["result"] == msg.result
