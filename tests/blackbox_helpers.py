"""The wire shape of a server frame as an outsider checks it (WIRE-3/7/8), for every test file.

The one `is_uuid4` and the one list of the 14 server-frame keys of the test suite live here.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

#: Bound on every real-socket wait: a hang fails the test instead of the run.
WAIT = 10.0

#: WIRE-3: the 14 ServerMessage keys, in serialisation order.
KEYS = (
    "type", "status", "user_request", "agent_name", "process_name", "root_name", "actions",
    "messages", "error", "session_id", "task_name", "timestamp", "response_id", "result",
)  # fmt: skip
#: PROTOCOL.md §1: the client message types and the statuses (the fuzzers' vocabulary).
CLIENT_TYPES = (
    "task", "heartbeat", "command_results", "error", "register", "task_end",
    "device_info_request", "device_info_response",
)  # fmt: skip
STATUSES = ("continue", "completed", "failed", "ok", "error")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?\+00:00")


def is_uuid4(value: object) -> bool:
    """A version-4 UUID (RFC 4122 variant) in canonical form: lower case, hyphenated."""
    if not isinstance(value, str):
        return False
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    return parsed.version == 4 and str(parsed) == value


def check_frame(frame: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    """WIRE-3 / WIRE-7: the 14 keys in order, then exactly `extra`; a UTC isoformat timestamp."""
    assert tuple(frame) == (*KEYS, *extra)
    assert TIMESTAMP.fullmatch(frame["timestamp"]), frame["timestamp"]
    assert frame["messages"] is None
