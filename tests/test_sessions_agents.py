"""What a session computes, over real sockets in raw JSON: task-name sanitisation (NAME-1), the
built-in script agent (§4.7), custom agents and the END-4 outcome table (§4.5/§4.6), and the
bounded result store (RES-1, LIM-8).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from agents_for_tests import (
    AGENT,
    DEVICE_GONE,
    FACTORY_CALLS,
    GATE,
    NO_STEPS,
    ONE_STEP,
    World,
    answer,
    barrier,
    cmd,
    constellation_task,
    device_task,
    plan,
    world,
)
from blackbox_helpers import KEYS, is_uuid4

NOT_SERIALISABLE = "Agent returned a non-JSON-serialisable result"


@pytest.fixture(autouse=True)
def _fresh_agent_state() -> None:
    FACTORY_CALLS.clear()
    GATE.reset()


async def run_self_task(
    dev: Any, client_id: str, request: str, **fields: Any
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Send a device TASK; answer every COMMAND with success. Returns (ACK, COMMANDs, TASK_END)."""
    await dev.send(device_task(client_id, request, **fields))
    ack = await dev.recv()
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
    commands = []
    while True:
        frame = await dev.recv()
        if frame["type"] == "task_end":
            return ack, commands, frame
        assert frame["type"] == "command"
        commands.append(frame)
        await dev.send(answer(frame, client_id))


# ----------------------------------------------------------------------------------- NAME-1

UUID = object()  # marker: the sanitised name is a fresh uuid4

NAME_TABLE = [
    ("t-42", "t-42"),
    ("galaxy/demo/task-1", "galaxy_demo_task-1"),
    ("../escape", "_escape"),
    ("a/b\\c", "a_b_c"),
    ("C:\\escape", "C__escape"),
    ("..%2fescape", "_2fescape"),
    ("/abs/escape", "_abs_escape"),
    ("./x", "_x"),
    (".hidden", "hidden"),
    ("..", UUID),
    ("...", UUID),
    ("naïve", "na_ve"),
    ("list tools", "list_tools"),
    ("demo@task-1", "demo_task-1"),
    ("", UUID),
    (None, UUID),
    # Beyond the table, by the same three steps: one `_` per code point, no length cap.
    ("a\U0001f600b", "a_b"),
    ("..a.b", "a.b"),
    ("x" * 500, "x" * 500),
]


async def test_task_name_sanitisation_table() -> None:
    """NAME-1 (every row of the table), SEC-10, COMPAT-6, RES-1: the sanitised name is the one in
    the ACK, every COMMAND, the TASK_END and the result store's name index; names that sanitise
    to nothing (and missing or empty ones) become distinct fresh uuid4s."""
    async with world(guard=20.0) as w:
        dev = await w.device("dev-1")
        generated: list[str] = []
        for raw, expected in [*NAME_TABLE, ("<absent>", UUID)]:
            fields = {} if raw == "<absent>" else {"task_name": raw}
            ack, commands, task_end = await run_self_task(dev, "dev-1", ONE_STEP, **fields)
            name = ack["task_name"]
            if expected is UUID:
                assert is_uuid4(name), (raw, name)
                generated.append(name)
            else:
                assert name == expected, raw
            assert [c["task_name"] for c in commands] == [name]
            assert task_end["task_name"] == name
            record = w.server.sessions.results.by_task_name(name)
            assert record is not None
            assert record.session_id == ack["session_id"]
        assert len(set(generated)) == len(generated) == 5


async def test_name_collisions_latest_wins() -> None:
    """NAME-2, RES-1: `a/b` and `a_b` both become `a_b`; the name index keeps the latest."""
    async with world() as w:
        dev = await w.device("dev-1")
        first = await run_self_task(dev, "dev-1", NO_STEPS, task_name="a/b", session_id="s1")
        second = await run_self_task(dev, "dev-1", plan([cmd("x")]), task_name="a_b",
                                     session_id="s2")
        assert first[0]["task_name"] == second[0]["task_name"] == "a_b"
        record = w.server.sessions.results.by_task_name("a_b")
        assert record is not None
        assert record.session_id == "s2"
        assert w.server.sessions.results.by_session_id("s1") is not None


# ------------------------------------------------------------------------------ script agent

BAD_PLANS = [
    (None, "request is not valid JSON"),  # TASK-4: absent request = ""
    ("", "request is not valid JSON"),
    ("not json", "request is not valid JSON"),
    ('{"steps": [', "request is not valid JSON"),
    ("[1, 2]", "request must be a JSON object"),
    ("null", "request must be a JSON object"),
    ('"steps"', "request must be a JSON object"),
    ("{}", "'steps' must be a list of non-empty lists of commands"),
    ('{"steps": null}', "'steps' must be a list of non-empty lists of commands"),
    ('{"steps": "x"}', "'steps' must be a list of non-empty lists of commands"),
    ('{"steps": {"0": []}}', "'steps' must be a list of non-empty lists of commands"),
    ('{"steps": [{"tool_name": "a", "tool_type": "action"}]}',
     "'steps' must be a list of non-empty lists of commands"),
    ('{"steps": [[]]}', "'steps' must be a list of non-empty lists of commands"),
    (plan([cmd("a")], []), "'steps' must be a list of non-empty lists of commands"),
    (plan([{"tool_type": "action"}]), "steps[0][0] is not a valid command"),
    (plan([cmd("a")], [cmd("b"), {"tool_name": "c"}]), "steps[1][1] is not a valid command"),
    (plan(["list_tools"]), "steps[0][0] is not a valid command"),  # type: ignore[list-item]
    (plan([cmd("a", "destroy")]), "steps[0][0] is not a valid command"),
    (plan([cmd("a", "ACTION")]), "steps[0][0] is not a valid command"),
    (plan([{"tool_name": 5, "tool_type": "action"}]), "steps[0][0] is not a valid command"),
    (plan([{**cmd("a"), "parameters": "x"}]), "steps[0][0] is not a valid command"),
    (plan([{**cmd("a"), "call_id": 7}]), "steps[0][0] is not a valid command"),
    (plan([cmd("a")], on_failure="abort"), "'on_failure' must be 'stop' or 'continue'"),
    (plan([cmd("a")], on_failure="STOP"), "'on_failure' must be 'stop' or 'continue'"),
    (plan([cmd("a")], on_failure=1), "'on_failure' must be 'stop' or 'continue'"),
    (plan([cmd("a")], agent_name=5),
     "'agent_name', 'process_name' and 'root_name' must be strings"),
    (plan([cmd("a")], process_name=["x"]),
     "'agent_name', 'process_name' and 'root_name' must be strings"),
    (plan([cmd("a")], root_name={"r": 1}),
     "'agent_name', 'process_name' and 'root_name' must be strings"),
]


@pytest.mark.parametrize(("request_text", "error"), BAD_PLANS)
async def test_invalid_plans(request_text: str | None, error: str) -> None:
    """SCRIPT-2, SCRIPT-1, END-4: an invalid plan ends the session `failed`, `result: null`, with
    the exact `script agent: …` error, and no COMMAND is ever sent (the whole plan is checked
    first). The requester and the target both get it for a constellation session."""
    async with world() as w:
        dev = await w.device("dev-1")
        galaxy = await w.join("g", "constellation", target_id="dev-1")
        frame = constellation_task("g", "dev-1", session_id="s1", task_name="bad")
        if request_text is None:
            del frame["request"]
        else:
            frame["request"] = request_text
        await galaxy.send(frame)
        assert (await galaxy.recv())["type"] == "heartbeat"
        for client in (galaxy, dev):
            task_end = await client.recv()
            assert (task_end["type"], task_end["status"]) == ("task_end", "failed")
            assert task_end["error"] == f"script agent: {error}"
            assert task_end["result"] is None
        assert await barrier(dev) == []


def step_statuses(task_end: dict[str, Any]) -> list[list[str]]:
    return [[r["status"] for r in step["results"]] for step in task_end["result"]]


async def scripted(
    w: World, request: str, replies: list[tuple[list[str], list[str | None] | None]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a device self-task answering its COMMANDs with `replies` (statuses, errors) in turn."""
    dev = await w.device("dev-1")
    await dev.send(device_task("dev-1", request))
    assert (await dev.recv())["type"] == "heartbeat"
    commands = []
    for statuses, errors in replies:
        command = await dev.recv()
        assert command["type"] == "command", command
        commands.append(command)
        await dev.send(answer(command, "dev-1", statuses, errors=errors))
    task_end = await dev.recv()
    assert task_end["type"] == "task_end"
    assert await barrier(dev) == []
    return task_end, commands


async def test_zero_steps_complete_with_an_empty_list() -> None:
    """SCRIPT-3.3: zero steps → `completed`, result `[]`, no COMMAND; extra keys are ignored."""
    async with world() as w:
        task_end, _ = await scripted(w, plan(comment="nothing to do", version=2), [])
        assert (task_end["status"], task_end["error"], task_end["result"]) == (
            "completed", None, []
        )


async def test_stop_on_first_failure() -> None:
    """SCRIPT-3.2 (`on_failure` defaults to `stop`): the first failing step ends the session with
    `step <i> failed: <first failure's error>` and the results so far; later steps never run. The
    device's early-exit pattern (failure, then skipped) is reported by the failure."""
    request = plan([cmd("a")], [cmd("b"), cmd("c"), cmd("d")], [cmd("never")])
    async with world() as w:
        task_end, commands = await scripted(
            w, request,
            [(["success"], None),
             (["failure", "skipped", "failure"],
              ["first", "Skipped due to previous failure (early_exit=True).", "second"])],
        )
        assert len(commands) == 2
        assert task_end["status"] == "failed"
        assert task_end["error"] == "step 1 failed: first"
        assert step_statuses(task_end) == [["success"], ["failure", "skipped", "failure"]]
        assert [s["step"] for s in task_end["result"]] == [0, 1]


@pytest.mark.parametrize("error", [None, ""])
async def test_failure_without_error_text(error: str | None) -> None:
    """SCRIPT-3.2: a failure whose error is null or empty reads `unknown error`."""
    async with world() as w:
        task_end, _ = await scripted(w, ONE_STEP, [(["failure"], [error])])
        assert task_end["error"] == "step 0 failed: unknown error"


async def test_continue_runs_every_step() -> None:
    """SCRIPT-3 with `on_failure: continue`: failures are recorded and the plan goes on; the
    session completes with every step's results."""
    request = plan([cmd("a")], [cmd("b")], [cmd("c")], on_failure="continue")
    async with world() as w:
        task_end, commands = await scripted(
            w, request, [(["failure"], ["boom"]), (["success"], None), (["failure"], [None])]
        )
        assert len(commands) == 3
        assert (task_end["status"], task_end["error"]) == ("completed", None)
        assert step_statuses(task_end) == [["failure"], ["success"], ["failure"]]
        assert task_end["result"][0]["results"][0]["error"] == "boom"


async def test_skipped_and_none_are_not_failures() -> None:
    """SCRIPT-3.2: `skipped` and `none` Results do not stop a `stop` plan."""
    request = plan([cmd("a"), cmd("b"), cmd("c")], [cmd("d")], on_failure="stop")
    async with world() as w:
        task_end, _ = await scripted(
            w, request, [(["success", "skipped", "none"], None), (["none"], None)]
        )
        assert task_end["status"] == "completed"
        assert step_statuses(task_end) == [["success", "skipped", "none"], ["none"]]


async def test_results_reach_the_agent_as_received() -> None:
    """CMD-5 (valid list: Results as received, call_id and status unchecked), WIRE-5: whatever
    the device reports comes back in the TASK_END with all five Result keys."""
    async with world() as w:
        dev = await w.device("dev-1")
        await dev.send(device_task("dev-1", plan([cmd("a"), cmd("b")])))
        await dev.recv()
        command = await dev.recv()
        reply = answer(command, "dev-1")
        reply["action_results"] = [
            {"status": "success", "result": {"nested": [1, 2.5, None, "x"]}, "call_id": "other"},
            {"status": "none"},
        ]
        await dev.send(reply)
        task_end = await dev.recv()
        assert task_end["result"] == [{"step": 0, "results": [
            {"status": "success", "error": None, "result": {"nested": [1, 2.5, None, "x"]},
             "namespace": None, "call_id": "other"},
            {"status": "none", "error": None, "result": None, "namespace": None,
             "call_id": None},
        ]}]


# ---------------------------------------------------------------------- custom agents, END-4

END4_ROWS = [
    pytest.param('value:{"a": [1, 2.5, {"b": null}], "c": "\\u00e9"}', "completed", None,
                 {"a": [1, 2.5, {"b": None}], "c": "é"}, id="returned"),
    pytest.param("value:null", "completed", None, None, id="returned-null"),
    pytest.param("value:[]", "completed", None, [], id="returned-empty"),
    pytest.param("task-failed:it broke", "failed", "it broke", {"partial": True},
                 id="TaskFailed"),
    pytest.param("raise:boom", "failed", "boom", None, id="exception"),
    pytest.param("raise:", "failed", "ValueError", None, id="exception-empty-str"),
    pytest.param("unserialisable", "failed", NOT_SERIALISABLE, None, id="not-serialisable"),
    pytest.param("value:[NaN]", "failed", NOT_SERIALISABLE, None, id="not-serialisable-nan"),
    pytest.param('value:{"x": Infinity}', "failed", NOT_SERIALISABLE, None,
                 id="not-serialisable-infinity"),
    pytest.param('value:"NaN and Infinity are fine in strings"', "completed", None,
                 "NaN and Infinity are fine in strings", id="nan-in-a-string"),
]


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(("request_text", "status", "error", "result"), END4_ROWS)
async def test_end4_outcomes_of_a_custom_agent(
    request_text: str, status: str, error: str | None, result: Any
) -> None:
    """AGENT-1 (`module:callable`), AGENT-2, END-2, END-3, END-4, RES-1, WIRE-1: each outcome of
    `Agent.run` maps to the TASK_END of the table, identical for the requester and the target
    device (same response_id), strict JSON on the wire, and stored as such."""
    async with world(agent=AGENT) as w:
        dev = await w.device("dev-1")
        galaxy = await w.join("g", "constellation", target_id="dev-1")
        await galaxy.send(constellation_task("g", "dev-1", request_text, session_id="s1",
                                             task_name="custom"))
        assert (await galaxy.recv())["type"] == "heartbeat"
        copies = [_strict_json(await c.ws.get_message()) for c in (galaxy, dev)]
        for frame in copies:
            assert tuple(frame) == KEYS
            assert (frame["type"], frame["session_id"], frame["task_name"]) == (
                "task_end", "s1", "custom"
            )
            assert (frame["status"], frame["error"], frame["result"]) == (status, error, result)
        assert copies[0]["response_id"] == copies[1]["response_id"]
        record = w.server.sessions.results.by_session_id("s1")
        assert record is not None
        assert (record.status, record.error, record.result) == (status, error, result)
        assert FACTORY_CALLS == ["linux"]


async def test_unsupported_platform_from_a_custom_factory() -> None:
    """AGENT-1, TASK-7, TASK-9: a factory raising UnsupportedPlatform refuses the TASK with
    `Service session not supported on <platform>`; the same factory serves other platforms."""
    async with world(agent=AGENT) as w:
        await w.device("odd", "plan9")
        await w.device("fine", "linux")
        galaxy = await w.join("g", "constellation")
        await galaxy.send(constellation_task("g", "odd", NO_STEPS, session_id="s1"))
        error = await galaxy.recv()
        assert (error["type"], error["code"], error["error"]) == (
            "error", "unsupported_platform", "Service session not supported on plan9"
        )
        fail_fast = await galaxy.recv()
        assert (fail_fast["type"], fail_fast["session_id"], fail_fast["error"]) == (
            "task_end", "s1", error["error"]
        )
        await galaxy.send(constellation_task("g", "fine", NO_STEPS, session_id="s1"))
        assert (await galaxy.recv())["type"] == "heartbeat"
        assert (await galaxy.recv())["status"] == "completed"
        assert FACTORY_CALLS == ["plan9", "linux"]


# ------------------------------------------------------------------------------ result store


def _is_wire_timestamp(value: str) -> bool:
    parsed = datetime.datetime.fromisoformat(value)
    return parsed.utcoffset() == datetime.timedelta(0) and value.endswith("+00:00")


async def test_result_store_records_every_ending_and_is_bounded() -> None:
    """RES-1, LIM-8, SESS-3, END-4: completed, failed and cancelled sessions are all stored with
    {session_id, task_name, status, error, result, finished_at}, by session id and by sanitised
    name; with result_store_size=3 the oldest entries are evicted from both indexes."""
    async with world(agent=AGENT, result_store_size=3) as w:
        dev = await w.device("dev-1")
        await run_self_task(dev, "dev-1", "value:1", session_id="s1", task_name="one")
        await run_self_task(dev, "dev-1", "task-failed:nope", session_id="s2", task_name="t/2")
        await run_self_task(dev, "dev-1", ONE_STEP, session_id="s3", task_name="three")
        store = w.server.sessions.results
        assert len(store) == 3
        r2 = store.by_session_id("s2")
        assert r2 is not None
        assert (r2.session_id, r2.task_name, r2.status, r2.error, r2.result) == (
            "s2", "t_2", "failed", "nope", {"partial": True}
        )
        assert _is_wire_timestamp(r2.finished_at)
        assert store.by_task_name("t_2") is r2
        r3 = store.by_session_id("s3")
        assert r3 is not None
        assert (r3.status, r3.error) == ("completed", None)
        assert r3.result[0]["results"][0]["status"] == "success"

        # A fourth ending (a cancellation by the device's drop) evicts the oldest.
        galaxy = await w.join("g", "constellation")
        await galaxy.send(constellation_task("g", "dev-1", ONE_STEP, session_id="s4",
                                             task_name="four"))
        await galaxy.recv()
        await dev.recv()
        await dev.aclose()
        assert (await galaxy.recv())["error"] == DEVICE_GONE
        await w.gone("dev-1")
        assert len(store) == 3
        assert store.by_session_id("s1") is None
        assert store.by_task_name("one") is None
        r4 = store.by_session_id("s4")
        assert r4 is not None
        assert (r4.task_name, r4.status, r4.error, r4.result) == (
            "four", "failed", DEVICE_GONE, None
        )

        dev = await w.device("dev-1")
        for i in range(5, 8):
            await run_self_task(dev, "dev-1", NO_STEPS, session_id=f"s{i}", task_name=f"n{i}")
        assert len(store) == 3
        assert [store.by_session_id(f"s{i}") is not None for i in range(1, 8)] == [
            False, False, False, False, True, True, True
        ]
        assert store.by_task_name("four") is None
        assert store.by_task_name("n7") is store.by_session_id("s7")


async def test_result_store_keeps_a_reused_name_when_the_older_entry_is_evicted() -> None:
    """LIM-8 with NAME-2: evicting an old session must not drop the name index entry that a newer
    session with the same sanitised name now owns."""
    async with world(result_store_size=2) as w:
        dev = await w.device("dev-1")
        await run_self_task(dev, "dev-1", NO_STEPS, session_id="old", task_name="same")
        await run_self_task(dev, "dev-1", NO_STEPS, session_id="new", task_name="same")
        await run_self_task(dev, "dev-1", NO_STEPS, session_id="other", task_name="x")
        store = w.server.sessions.results
        assert store.by_session_id("old") is None
        record = store.by_task_name("same")
        assert record is not None
        assert record.session_id == "new"


async def test_live_sessions_are_not_in_the_store() -> None:
    """RES-1: the store holds finished sessions only; a live one is absent until it ends."""
    async with world() as w:
        dev = await w.device("dev-1")
        await dev.send(device_task("dev-1", session_id="live", task_name="live"))
        await dev.recv()
        command = await dev.recv()
        assert w.server.sessions.results.by_session_id("live") is None
        assert w.server.sessions.results.by_task_name("live") is None
        await dev.send(answer(command, "dev-1"))
        await dev.recv()  # the record is stored before the TASK_END is queued
        record = w.server.sessions.results.by_session_id("live")
        assert record is not None
        assert record.status == "completed"
