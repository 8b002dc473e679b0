"""Shared by the black-box test files: the wire shape of a server frame (WIRE-3/7/8)."""

from __future__ import annotations

import re
import uuid
from typing import Any

#: Bound on every real-socket wait: a hang fails the test instead of the run.
WAIT = 10.0

KEYS = (
    "type", "status", "user_request", "agent_name", "process_name", "root_name", "actions",
    "messages", "error", "session_id", "task_name", "timestamp", "response_id", "result",
)  # fmt: skip
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?\+00:00")


def is_uuid4(value: object) -> bool:
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
