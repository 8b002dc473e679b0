"""The converter's fast ClientMessage hook must decide exactly like cattrs' generated hook
(WIRE-4/WIRE-6): the same message for every valid frame, a failure for every invalid one."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ufo_trio._codec import _structure_client_detailed, _structure_client_fast
from ufo_trio._messages import ClientMessage

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)
)
junk = st.one_of(scalars, st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=2), scalars, max_size=2))
texts = st.one_of(st.none(), st.text(max_size=5))
valid_result = st.fixed_dictionaries(
    {"status": st.sampled_from(["success", "failure", "skipped", "none"])},
    optional={"error": texts, "result": scalars, "namespace": texts, "call_id": texts},
)
valid_frame = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["task", "heartbeat", "command_results", "register", "error"]),
        "status": st.sampled_from(["ok", "continue", "completed", "failed", "error"]),
    },
    optional={
        "client_type": st.sampled_from(["device", "constellation"]),
        **{
            name: texts
            for name in ("client_id", "session_id", "task_name", "target_id", "request",
                         "request_id", "prev_response_id", "error", "timestamp")
        },
        "metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=3), scalars, max_size=2)),
        "action_results": st.one_of(st.none(), st.lists(valid_result, max_size=3)),
        "extra": junk,
    },
)  # fmt: skip
FIELDS = ["type", "status", "client_type", "client_id", "session_id", "task_name", "target_id",
          "request", "request_id", "prev_response_id", "error", "timestamp", "metadata",
          "action_results"]  # fmt: skip
# Mostly valid frames with up to two fields spoiled: a junk value, or a Result spoiled inside.
spoilers = st.dictionaries(
    st.sampled_from(FIELDS),
    st.one_of(junk, st.lists(st.one_of(valid_result, junk), min_size=1, max_size=2)),
    min_size=1,
    max_size=2,
)
frames = st.builds(lambda base, spoil: {**base, **spoil}, valid_frame, spoilers)


def _outcome(hook: Any, obj: dict[str, Any]) -> ClientMessage | str:
    try:
        return hook(obj, ClientMessage)  # type: ignore[no-any-return]
    except Exception:
        return "refused"


@settings(max_examples=500)
@given(st.one_of(valid_frame, frames))
def test_fast_hook_decides_like_cattrs_wire4(obj: dict[str, Any]) -> None:
    assert _outcome(_structure_client_fast, obj) == _outcome(_structure_client_detailed, obj)
