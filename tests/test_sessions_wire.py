"""Sessions end to end over real sockets, speaking raw JSON: the worked examples of §4.8/§4.9,
every TASK rejection of §4.1 (with TASK-9 exactly where it belongs), session ownership (§4.3,
SEC-8), result injection (SEC-9), routing by connection (SEC-16) and LIM-7.

"Nothing more arrives" is checked with `barrier`: a heartbeat whose ack follows everything the
server had queued for that connection (PROC-2), so no test waits on the wall clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from agents_for_tests import (
    AGENT,
    DEVICE_GONE,
    FACTORY_CALLS,
    GATE,
    NO_STEPS,
    SHUTTING_DOWN,
    UNSUPPORTED,
    World,
    answer,
    barrier,
    cmd,
    constellation_task,
    device_task,
    frames_until_closed,
    plan,
    world,
)
from blackbox_helpers import KEYS, is_uuid4


@pytest.fixture(autouse=True)
def _fresh_agent_state() -> None:
    FACTORY_CALLS.clear()
    GATE.reset()


def assert_error(
    frame: dict[str, Any],
    error: str,
    code: str,
    *,
    session_id: str | None = None,
    request_id: str | None = None,
) -> None:
    """WIRE-9: an ERROR frame with its code, the echoed session_id and response_id."""
    assert tuple(frame) == (*KEYS, "code")
    assert (frame["type"], frame["status"]) == ("error", "error")
    assert (frame["error"], frame["code"]) == (error, code)
    assert frame["session_id"] == session_id
    if request_id is not None:
        assert frame["response_id"] == request_id
    else:
        assert is_uuid4(frame["response_id"])


def assert_fail_fast(frame: dict[str, Any], session_id: str, error: str) -> None:
    """TASK-9: the fail-fast TASK_END that follows a rejected constellation TASK."""
    assert tuple(frame) == KEYS
    assert (frame["type"], frame["status"]) == ("task_end", "failed")
    assert (frame["session_id"], frame["error"]) == (session_id, error)
    assert frame["result"] is None
    assert frame["task_name"] is None
    assert is_uuid4(frame["response_id"])


# ------------------------------------------------------------------------ worked examples


async def test_example_a_device_self_task() -> None:
    """§4.8 Example A. TASK-3/4/8, NAME-1, CMD-1, AGENT-3, END-1/2/4, WIRE-3/5/8, RES-1: the ACK
    (fresh session id, sanitised task name) comes strictly before the COMMAND; the COMMAND has
    fresh call_ids and the platform's agent_name; the TASK_END carries the step results."""
    p = json.dumps(
        {"steps": [[{"tool_name": "list_tools", "tool_type": "action",
                     "parameters": {"tool_type": "action"}}]]}
    )
    async with world() as w:
        dev = await w.join(
            "dev-1",
            timestamp="2026-01-01T12:00:00+00:00",
            metadata={"platform": "linux", "registration_time": "…",
                      "system_info": {"device_id": "dev-1", "platform": "linux",
                                      "hostname": "vm1"}},
        )
        await dev.send(
            {"type": "task", "status": "continue", "client_type": "device", "client_id": "dev-1",
             "session_id": None, "task_name": "list tools", "request": p, "request_id": "q-1",
             "metadata": {"platform": "linux"}}
        )
        ack = await dev.recv()
        assert tuple(ack) == KEYS
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
        session_id = ack["session_id"]
        assert is_uuid4(session_id)
        assert ack["task_name"] == "list_tools"
        assert is_uuid4(ack["response_id"])
        assert ack["error"] is None
        assert ack["result"] is None

        command = await dev.recv()
        assert tuple(command) == KEYS
        assert (command["type"], command["status"]) == ("command", "continue")
        assert command["agent_name"] == "LinuxAgent"
        assert command["process_name"] is None
        assert command["root_name"] is None
        assert command["messages"] is None
        assert command["session_id"] == session_id
        assert command["task_name"] == "list_tools"
        (action,) = command["actions"]
        call_id = action.pop("call_id")
        assert is_uuid4(call_id)
        assert action == {"tool_name": "list_tools", "parameters": {"tool_type": "action"},
                          "tool_type": "action"}
        r1 = command["response_id"]
        assert is_uuid4(r1)
        assert r1 != ack["response_id"]

        result = {"status": "success", "error": None, "result": ["tool-a", "tool-b"],
                  "namespace": "BashExecutor", "call_id": call_id}
        await dev.send(
            {"type": "command_results", "status": "continue", "client_type": "device",
             "client_id": "dev-1", "session_id": session_id, "action_results": [result],
             "request_id": "q-2", "prev_response_id": r1}
        )
        task_end = await dev.recv()
        assert tuple(task_end) == KEYS
        assert (task_end["type"], task_end["status"]) == ("task_end", "completed")
        assert task_end["session_id"] == session_id
        assert task_end["task_name"] == "list_tools"
        assert task_end["error"] is None
        assert task_end["result"] == [{"step": 0, "results": [result]}]
        assert is_uuid4(task_end["response_id"])
        assert task_end["response_id"] not in (r1, ack["response_id"], "q-2")
        assert await barrier(dev) == []

        assert w.server.sessions.live == {}
        record = w.server.sessions.results.by_session_id(session_id)
        assert record is not None
        assert (record.task_name, record.status, record.error) == ("list_tools", "completed", None)
        assert record.result == task_end["result"]


async def test_call_ids_are_always_fresh() -> None:
    """CMD-1: every call_id in a COMMAND is replaced by a fresh uuid4, including ones the plan
    supplied, and no two Commands (in one COMMAND or across sessions) share one."""
    with_ids = plan([{**cmd("a"), "call_id": "mine"}, {**cmd("b"), "call_id": "mine"}])
    async with world() as w:
        dev = await w.device("dev-1")
        seen: list[str] = []
        for _ in range(2):
            await dev.send(device_task("dev-1", with_ids))
            assert (await dev.recv())["type"] == "heartbeat"
            command = await dev.recv()
            ids = [a["call_id"] for a in command["actions"]]
            assert all(is_uuid4(i) for i in ids)
            seen += ids
            await dev.send(answer(command, "dev-1"))
            task_end = await dev.recv()
            assert [r["call_id"] for r in task_end["result"][0]["results"]] == ids
        assert len(set(seen)) == 4


@pytest.mark.parametrize(
    ("platform", "agent_name"),
    [
        (None, "HostAgent"),  # REG-3: no platform → windows
        ("windows", "HostAgent"),
        ("linux", "LinuxAgent"),
        ("mobile", "MobileAgent"),
        ("macos", "HostAgent"),
    ],
)
async def test_agent_name_defaults_by_platform(platform: str | None, agent_name: str) -> None:
    """AGENT-3, TASK-3: the COMMAND's agent_name follows the executor's registered platform;
    process_name and root_name default to null; the ctx platform is the registered one."""
    async with world() as w:
        dev = await w.device("dev-1", platform)
        await dev.send(device_task("dev-1"))
        await dev.recv()
        command = await dev.recv()
        assert command["agent_name"] == agent_name
        assert (command["process_name"], command["root_name"]) == (None, None)


async def test_script_names_override_defaults() -> None:
    """SCRIPT-1, AGENT-3: the plan's agent_name, process_name and root_name go into every
    COMMAND of the session."""
    request = plan([cmd("a")], [cmd("b")], agent_name="AppAgent", process_name="notepad.exe",
                   root_name="Notepad")
    async with world() as w:
        dev = await w.device("dev-1", "windows")
        await dev.send(device_task("dev-1", request))
        await dev.recv()
        for _ in range(2):
            command = await dev.recv()
            assert (command["agent_name"], command["process_name"], command["root_name"]) == (
                "AppAgent", "notepad.exe", "Notepad"
            )
            await dev.send(answer(command, "dev-1"))
        assert (await dev.recv())["status"] == "completed"


async def test_example_b_constellation_fail_stop() -> None:
    """§4.9 Example B. TASK-2/8/10, COMPAT-6, DI-3, ID-2 exemption, CMD-1, SCRIPT-3, END-1/2/3:
    the step 1 failure ends the session `step 1 failed: exit code 2`; both the constellation and
    the device get the same TASK_END (same response_id); the device never sees a TASK frame."""
    p2 = plan(
        [cmd("list_tools")],
        [cmd("execute_command", command="ls /nope")],
        on_failure="stop",
    )
    async with world() as w:
        dev = await w.join(
            "dev-1",
            metadata={"platform": "linux", "system_info": {"device_id": "dev-1",
                                                           "platform": "linux",
                                                           "hostname": "vm1"}},
        )
        galaxy = await w.join(
            "demo@dev-1", "constellation", target_id="dev-1",
            metadata={"type": "constellation_client", "task_name": "demo",
                      "targeted_device_id": "dev-1",
                      "capabilities": ["task_distribution", "session_management",
                                       "device_coordination"], "version": "2.0"},
        )
        await galaxy.send(
            {"type": "device_info_request", "status": "ok", "client_type": "constellation",
             "client_id": "demo@dev-1", "target_id": "dev-1",
             "request_id": "device_info_dev-1_1767225600.123456"}
        )
        await galaxy.send(
            {"type": "heartbeat", "status": "ok", "client_type": "device",
             "client_id": "demo@dev-1", "metadata": {"device_id": "dev-1"}}
        )
        info = await galaxy.recv()
        assert info["type"] == "device_info_response"
        assert info["result"] == {"device_id": "dev-1", "platform": "linux", "hostname": "vm1"}
        assert info["response_id"] == "device_info_dev-1_1767225600.123456"
        assert (await galaxy.recv())["type"] == "heartbeat"

        await galaxy.send(
            {"type": "task", "status": "continue", "client_type": "constellation",
             "client_id": "demo@dev-1", "target_id": "dev-1", "session_id": "demo@task-1",
             "task_name": "galaxy/demo/task-1", "request": p2}
        )
        ack = await galaxy.recv()
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
        assert (ack["session_id"], ack["task_name"]) == ("demo@task-1", "galaxy_demo_task-1")

        c1 = await dev.recv()
        assert (c1["type"], c1["agent_name"]) == ("command", "LinuxAgent")
        assert (c1["session_id"], c1["task_name"]) == ("demo@task-1", "galaxy_demo_task-1")
        assert [a["tool_name"] for a in c1["actions"]] == ["list_tools"]
        await dev.send(answer(c1, "dev-1"))
        c2 = await dev.recv()
        assert c2["type"] == "command"
        assert c2["response_id"] != c1["response_id"]
        assert c2["actions"][0]["tool_name"] == "execute_command"
        assert c2["actions"][0]["parameters"] == {"command": "ls /nope"}
        await dev.send(answer(c2, "dev-1", ["failure"], errors=["exit code 2"]))

        to_galaxy = await galaxy.recv()
        to_device = await dev.recv()
        for frame in (to_galaxy, to_device):
            assert tuple(frame) == KEYS
            assert (frame["type"], frame["status"]) == ("task_end", "failed")
            assert (frame["session_id"], frame["task_name"]) == (
                "demo@task-1", "galaxy_demo_task-1"
            )
            assert frame["error"] == "step 1 failed: exit code 2"
            step0, step1 = frame["result"]
            assert step0["step"] == 0
            assert [r["status"] for r in step0["results"]] == ["success"]
            assert step1["step"] == 1
            assert step1["results"] == [
                {"status": "failure", "error": "exit code 2", "result": None,
                 "namespace": "FakeExecutor", "call_id": c2["actions"][0]["call_id"]}
            ]
        assert to_galaxy["response_id"] == to_device["response_id"]
        assert is_uuid4(to_galaxy["response_id"])
        assert await barrier(dev) == []
        assert await barrier(galaxy, "constellation") == []
        assert w.server.sessions.live == {}


# ------------------------------------------------------------------------- TASK rejections

# (sender, target_id, error, code); the sender is a constellation unless it starts with "dev"
CONSTELLATION_REJECTIONS = [
    pytest.param("g-free", None, "Constellation task requests require target_id",
                 "missing_target", id="TASK-2.1-missing"),
    pytest.param("g-free", "", "Constellation task requests require target_id",
                 "missing_target", id="TASK-2.1-empty"),
    pytest.param("g-scoped", "dev-2", "Not authorized to dispatch tasks to this device",
                 "not_authorized", id="TASK-2.2"),
    pytest.param("g-free", "ghost", "Target device 'ghost' is not connected",
                 "unknown_target", id="TASK-2.3"),
    pytest.param("g-free", "x" * 300, f"Target device '{'x' * 200}' is not connected",
                 "unknown_target", id="TASK-2.3-SCOPE-4"),
    pytest.param("g-free", "g-scoped", "Constellation tasks may only target device clients",
                 "invalid_target", id="TASK-2.4"),
    pytest.param("g-free", "odd", f"Service session not supported on {UNSUPPORTED}",
                 "unsupported_platform", id="TASK-7"),
]

DEVICE_REJECTIONS = [
    pytest.param("dev-1", "dev-2", "Device clients may not target other devices",
                 "not_authorized", id="TASK-3"),
    pytest.param("odd", None, f"Service session not supported on {UNSUPPORTED}",
                 "unsupported_platform", id="TASK-7-device"),
]


async def rejection_world(w: World) -> dict[str, Any]:
    return {
        "dev-1": await w.device("dev-1"),
        "dev-2": await w.device("dev-2"),
        "odd": await w.device("odd", UNSUPPORTED),
        "g-scoped": await w.join("g-scoped", "constellation", target_id="dev-1"),
        "g-free": await w.join("g-free", "constellation"),
    }


async def assert_no_trace(w: World, peers: dict[str, Any]) -> None:
    """SESS-4 / §8 "no session": nothing live, nothing stored, no COMMAND anywhere."""
    assert w.server.sessions.live == {}
    assert len(w.server.sessions.results) == 0
    for name, client in peers.items():
        kind = "constellation" if name.startswith("g-") else "device"
        assert await barrier(client, kind) == [], name


@pytest.mark.parametrize("session_id", ["demo@task-9", None])
@pytest.mark.parametrize(("sender", "target", "error", "code"), CONSTELLATION_REJECTIONS)
async def test_constellation_task_rejections(
    sender: str, target: str | None, error: str, code: str, session_id: str | None
) -> None:
    """TASK-2, TASK-7, TASK-9, SESS-4, WIRE-9, Appendix A, SEC-15: each rejection is an ERROR with
    the exact text and code, the echoed session_id and request_id; a constellation TASK with a
    session_id also gets the fail-fast TASK_END right after it, one without gets nothing more.
    Only TASK-7's platform check reaches the agent factory (AGENT-1)."""
    async with world(agent=AGENT) as w:
        peers = await rejection_world(w)
        client = peers[sender]
        fields: dict[str, Any] = {"request_id": "rq-1", "task_name": "t"}
        if session_id is not None:
            fields["session_id"] = session_id
        await client.send(constellation_task(sender, target, NO_STEPS, **fields))
        assert_error(await client.recv(), error, code, session_id=session_id,
                     request_id="rq-1")
        if session_id is not None:
            assert_fail_fast(await client.recv(), session_id, error)
        await assert_no_trace(w, peers)
        assert FACTORY_CALLS == ([UNSUPPORTED] if code == "unsupported_platform" else [])


@pytest.mark.parametrize(("sender", "target", "error", "code"), DEVICE_REJECTIONS)
async def test_device_task_rejections_never_fail_fast(
    sender: str, target: str | None, error: str, code: str
) -> None:
    """TASK-3, TASK-7, TASK-9 (constellations only), SEC-3: a device's rejected TASK gets only the
    ERROR, even with a session_id; no COMMAND reaches the other device."""
    async with world(agent=AGENT) as w:
        peers = await rejection_world(w)
        client = peers[sender]
        frame = device_task(sender, NO_STEPS, session_id="s-peer", request_id="rq-2")
        if target is not None:
            frame["target_id"] = target
        await client.send(frame)
        assert_error(await client.recv(), error, code, session_id="s-peer", request_id="rq-2")
        await assert_no_trace(w, peers)


@pytest.mark.parametrize("target", [None, "", "dev-1"])
async def test_device_may_target_itself(target: str | None) -> None:
    """TASK-3, SEC-3 control: without target_id, or with its own id, a device starts exactly one
    session, executed by itself on its platform, with one ACK."""
    async with world(agent=AGENT) as w:
        dev = await w.device("dev-1")
        other = await w.device("dev-2")
        frame = device_task("dev-1", "return-ctx", session_id="s-own", task_name="t")
        frame["status"] = "ok"  # WIRE-4: status is not checked against type (as in SEC-3)
        if target is not None:
            frame["target_id"] = target
        await dev.send(frame)
        ack = await dev.recv()
        assert (ack["type"], ack["session_id"]) == ("heartbeat", "s-own")
        task_end = await dev.recv()
        assert task_end["result"] == {
            "session_id": "s-own", "task_name": "t", "request": "return-ctx",
            "platform": "linux", "requester_id": "dev-1", "requester_type": "device",
            "executor_id": "dev-1",
        }
        assert await barrier(dev) == []
        assert await barrier(other) == []
        assert FACTORY_CALLS == ["linux"]


async def test_constellation_ctx_fields() -> None:
    """AGENT-2, TASK-2, TASK-4: the agent of a constellation session sees the requester, the
    executor (the target device), the target's platform and the request exactly as sent."""
    async with world(agent=AGENT) as w:
        await w.device("dev-1", "mobile")
        galaxy = await w.join("demo@dev-1", "constellation")
        await galaxy.send(
            constellation_task("demo@dev-1", "dev-1", "return-ctx", session_id="demo@t/1 x",
                               task_name="galaxy/demo/t 1")
        )
        ack = await galaxy.recv()
        assert ack["session_id"] == "demo@t/1 x"  # COMPAT-6: session ids are never altered
        task_end = await galaxy.recv()
        assert task_end["result"] == {
            "session_id": "demo@t/1 x", "task_name": "galaxy_demo_t_1", "request": "return-ctx",
            "platform": "mobile", "requester_id": "demo@dev-1",
            "requester_type": "constellation", "executor_id": "dev-1",
        }


async def test_task_during_shutdown() -> None:
    """TASK-1, TASK-9, SHUT-1/2 over real sockets: while a session holds the shutdown open, a
    constellation TASK with a session_id gets ERROR `Server shutting down` and the fail-fast
    TASK_END; without one, and from a device, only the ERROR. Then TASK_END and close 1001."""
    async with world(agent=AGENT) as w:
        dev = await w.device("dev-1")
        galaxy = await w.join("g", "constellation", target_id="dev-1")
        await galaxy.send(constellation_task("g", "dev-1", "gate", session_id="slow"))
        assert (await galaxy.recv())["session_id"] == "slow"
        w.server.request_shutdown()
        await trio.testing.wait_all_tasks_blocked()
        assert w.server.shutting_down

        await galaxy.send(constellation_task("g", "dev-1", session_id="late", request_id="r1"))
        assert_error(await galaxy.recv(), SHUTTING_DOWN, "shutting_down", session_id="late",
                     request_id="r1")
        assert_fail_fast(await galaxy.recv(), "late", SHUTTING_DOWN)
        await galaxy.send(constellation_task("g", "dev-1", request_id="r2"))
        assert_error(await galaxy.recv(), SHUTTING_DOWN, "shutting_down", request_id="r2")
        await dev.send(device_task("dev-1", session_id="dev-late", request_id="r3"))
        assert_error(await dev.recv(), SHUTTING_DOWN, "shutting_down", session_id="dev-late",
                     request_id="r3")
        assert FACTORY_CALLS == ["linux"]

        GATE.set()
        for client in (galaxy, dev):
            frames, code = await frames_until_closed(client)
            assert code == 1001
            assert [(f["type"], f["session_id"], f["error"]) for f in frames] == [
                ("task_end", "slow", SHUTTING_DOWN)
            ]
        await w.server.wait_stopped()


# ------------------------------------------------------------------------------ LIM-7


async def test_rate_limit_64_live_sessions_per_requesting_connection() -> None:
    """LIM-7, TASK-6, TASK-9, SEC-17: a constellation with 64 live sessions gets
    `Too many running sessions for this client` (plus the fail-fast TASK_END) for the 65th.
    The limit is per requesting connection: another constellation and the device itself can still
    start sessions on the same device; once one session ends, the first can start another."""
    async with world(guard=20.0) as w:
        dev = await w.device("dev-1")
        galaxy = await w.join("g", "constellation", target_id="dev-1")
        other = await w.join("g2", "constellation", target_id="dev-1")
        for i in range(64):
            await galaxy.send(constellation_task("g", "dev-1", session_id=f"s-{i}"))
        for i in range(64):
            assert (await galaxy.recv())["session_id"] == f"s-{i}"
        commands = [await dev.recv() for _ in range(64)]
        assert len(w.server.sessions.live) == 64

        await galaxy.send(constellation_task("g", "dev-1", session_id="s-64", request_id="rq"))
        error = "Too many running sessions for this client"
        assert_error(await galaxy.recv(), error, "rate_limited", session_id="s-64",
                     request_id="rq")
        assert_fail_fast(await galaxy.recv(), "s-64", error)
        await galaxy.send(constellation_task("g", "dev-1"))
        assert_error(await galaxy.recv(), error, "rate_limited")
        assert await barrier(galaxy, "constellation") == []
        assert "s-64" not in w.server.sessions.live

        await other.send(constellation_task("g2", "dev-1", session_id="o-1"))
        assert (await other.recv())["session_id"] == "o-1"
        assert (await dev.recv())["session_id"] == "o-1"  # its COMMAND
        await dev.send(device_task("dev-1", session_id="d-1"))
        ack = await dev.recv()
        assert (ack["type"], ack["session_id"]) == ("heartbeat", "d-1")
        assert len(w.server.sessions.live) == 66

        await dev.send(answer(commands[0], "dev-1"))
        task_end = await galaxy.recv()
        assert (task_end["session_id"], task_end["status"]) == ("s-0", "completed")
        await galaxy.send(constellation_task("g", "dev-1", session_id="s-64"))
        assert (await galaxy.recv())["session_id"] == "s-64"


async def test_device_rate_limit_never_fails_fast() -> None:
    """LIM-7/TASK-6 for a device requester (limit lowered to 2 through the config): the third
    live self-task gets ERROR `rate_limited` with its session_id but no TASK_END (TASK-9 is for
    constellations only)."""
    async with world(max_sessions_per_client=2) as w:
        dev = await w.device("dev-1")
        for sid in ("a", "b"):
            await dev.send(device_task("dev-1", session_id=sid))
            assert (await dev.recv())["session_id"] == sid
            assert (await dev.recv())["type"] == "command"
        await dev.send(device_task("dev-1", session_id="c", request_id="rq"))
        assert_error(await dev.recv(), "Too many running sessions for this client",
                     "rate_limited", session_id="c", request_id="rq")
        assert await barrier(dev) == []
        assert set(w.server.sessions.live) == {"a", "b"}


# --------------------------------------------------------------------- session ownership


async def test_foreign_and_same_owner_session_id_reuse_device() -> None:
    """SEC-8, SESS-1, SESS-2, SESS-3, TASK-9: a live `demo@task_001` owned by victim-device.
    The attacker's replay gets `session_owned`, the owner's `session_running`; neither gets an ACK
    or any TASK_END, and the victim's session runs on undisturbed. Once it ends, anyone may reuse
    the id."""
    async with world(agent=AGENT) as w:
        victim = await w.device("victim-device")
        attacker = await w.device("attacker-device")
        await victim.send(device_task("victim-device", session_id="demo@task_001",
                                      task_name="t"))
        assert (await victim.recv())["session_id"] == "demo@task_001"
        command = await victim.recv()
        session = w.server.sessions.live["demo@task_001"]

        await attacker.send(
            {"type": "task", "status": "continue", "client_type": "device",
             "client_id": "attacker-device", "request": "replay",
             "session_id": "demo@task_001", "task_name": "t", "request_id": "rq-a"}
        )
        assert_error(await attacker.recv(),
                     "session_id 'demo@task_001' is owned by another client", "session_owned",
                     session_id="demo@task_001", request_id="rq-a")
        assert await barrier(attacker) == []

        await victim.send(device_task("victim-device", session_id="demo@task_001",
                                      request_id="rq-v"))
        assert_error(await victim.recv(), "session_id 'demo@task_001' is already running",
                     "session_running", session_id="demo@task_001", request_id="rq-v")
        assert await barrier(victim) == []
        assert w.server.sessions.live["demo@task_001"] is session
        assert FACTORY_CALLS == ["linux"]

        await victim.send(answer(command, "victim-device"))
        task_end = await victim.recv()
        assert (task_end["session_id"], task_end["status"]) == ("demo@task_001", "completed")
        assert await barrier(attacker) == []

        await attacker.send(device_task("attacker-device", session_id="demo@task_001"))
        ack = await attacker.recv()
        assert (ack["type"], ack["session_id"]) == ("heartbeat", "demo@task_001")
        assert w.server.sessions.live["demo@task_001"].requester_id == "attacker-device"


async def test_session_id_reuse_by_constellations_never_fails_fast() -> None:
    """SESS-1, SESS-2, TASK-9 (never for SESS-1/2): constellations re-sending a live id, the owner
    and a stranger alike, get only the ERROR: a TASK_END carrying a live id would read as that
    session's end. The device sees no extra COMMAND; the factory ran once."""
    async with world(agent=AGENT) as w:
        dev = await w.device("dev-1")
        owner = await w.join("g1", "constellation", target_id="dev-1")
        stranger = await w.join("g2", "constellation")
        await owner.send(constellation_task("g1", "dev-1", session_id="demo@task-1"))
        assert (await owner.recv())["session_id"] == "demo@task-1"
        command = await dev.recv()

        await owner.send(constellation_task("g1", "dev-1", session_id="demo@task-1"))
        assert_error(await owner.recv(), "session_id 'demo@task-1' is already running",
                     "session_running", session_id="demo@task-1")
        await stranger.send(constellation_task("g2", "dev-1", session_id="demo@task-1"))
        assert_error(await stranger.recv(), "session_id 'demo@task-1' is owned by another client",
                     "session_owned", session_id="demo@task-1")
        # A device reusing a constellation's id is a stranger too.
        await dev.send(device_task("dev-1", session_id="demo@task-1"))
        assert_error(await dev.recv(), "session_id 'demo@task-1' is owned by another client",
                     "session_owned", session_id="demo@task-1")
        assert await barrier(owner, "constellation") == []
        assert await barrier(stranger, "constellation") == []
        assert await barrier(dev) == []
        assert FACTORY_CALLS == ["linux"]

        await dev.send(answer(command, "dev-1"))
        assert (await owner.recv())["status"] == "completed"
        assert (await dev.recv())["status"] == "completed"


async def test_long_session_ids_are_truncated_in_error_texts() -> None:
    """SCOPE-4, SESS-1, SESS-2, WIRE-9: a 300-character session id appears in the error text as
    the repr of its first 200 characters; the ERROR's session_id field echoes it in full."""
    sid = "s" * 300
    async with world() as w:
        owner = await w.device("owner")
        other = await w.device("other")
        await owner.send(device_task("owner", session_id=sid))
        assert (await owner.recv())["session_id"] == sid
        await other.send(device_task("other", session_id=sid))
        assert_error(await other.recv(), f"session_id '{'s' * 200}' is owned by another client",
                     "session_owned", session_id=sid)
        await owner.send(device_task("owner", session_id=sid))
        assert (await owner.recv())["type"] == "command"
        assert_error(await owner.recv(), f"session_id '{'s' * 200}' is already running",
                     "session_running", session_id=sid)


async def test_session_id_reuse_after_cancellation() -> None:
    """SESS-3: a session cancelled by its device's drop leaves the live store; its id is free
    for anyone, here a different constellation on a re-registered dev-1."""
    async with world() as w:
        dev = await w.device("dev-1")
        galaxy = await w.join("g1", "constellation")
        await galaxy.send(constellation_task("g1", "dev-1", session_id="sid"))
        await galaxy.recv()
        await dev.recv()
        await dev.aclose()
        task_end = await galaxy.recv()
        assert (task_end["session_id"], task_end["error"]) == ("sid", DEVICE_GONE)
        await w.gone("dev-1")

        dev = await w.device("dev-1")
        second = await w.join("g2", "constellation")
        await second.send(constellation_task("g2", "dev-1", session_id="sid"))
        assert (await second.recv())["session_id"] == "sid"
        assert (await dev.recv())["session_id"] == "sid"


# ------------------------------------------------------------------------ result injection


async def test_results_for_unknown_sessions_create_nothing() -> None:
    """SEC-9 (a), CMD-2: 50 COMMAND_RESULTS for sessions that do not exist are dropped silently
    and create nothing; the rightful owner can then create `demo@task_001`."""
    async with world() as w:
        attacker = await w.device("attacker-device")
        owner = await w.device("owner-device")
        for i in range(50):
            sid = "demo@task_001" if i == 0 else f"demo@task_{i:03}"
            await attacker.send(
                {"type": "command_results", "status": "continue", "client_type": "device",
                 "client_id": "attacker-device", "session_id": sid,
                 "prev_response_id": "resp-1", "action_results": []}
            )
        assert await barrier(attacker) == []
        assert w.server.sessions.live == {}
        assert len(w.server.sessions.results) == 0
        assert w.server.registry.online_ids() == ["attacker-device", "owner-device"]
        assert w.server.registry.get("attacker-device").connection.executing == {}  # type: ignore[union-attr]

        await owner.send(device_task("owner-device", session_id="demo@task_001"))
        assert (await owner.recv())["session_id"] == "demo@task_001"
        assert (await owner.recv())["type"] == "command"


async def test_results_from_the_wrong_sender_are_dropped() -> None:
    """SEC-9 (b), CMD-3: device-B (and the requesting constellation itself) send results with a
    valid session_id and prev_response_id for a session device-A executes: dropped silently, and
    the waiter stays pending until A answers; the TASK_END carries A's results."""
    async with world() as w:
        dev_a = await w.device("device-A")
        dev_b = await w.device("device-B")
        galaxy = await w.join("g", "constellation")
        await galaxy.send(constellation_task("g", "device-A", session_id="s1"))
        await galaxy.recv()
        command = await dev_a.recv()
        forged = answer(command, "device-B", ["failure"], errors=["forged"])
        await dev_b.send(forged)
        assert await barrier(dev_b) == []
        await galaxy.send({**forged, "client_type": "constellation", "client_id": "g"})
        assert await barrier(galaxy, "constellation") == []
        session = w.server.sessions.live["s1"]
        assert list(session.waiters) == [command["response_id"]]
        assert not session.waiters[command["response_id"]].done.is_set()

        await dev_a.send(answer(command, "device-A"))
        task_end = await galaxy.recv()
        assert task_end["status"] == "completed"
        assert task_end["result"][0]["results"][0]["result"] == "ran list_tools"


@pytest.mark.parametrize("count", [0, 2, "null", "absent"])
async def test_results_of_the_wrong_length(count: int | str) -> None:
    """SEC-9 (c), CMD-5, CMD-7, CMD-4: the executor answers a one-Command COMMAND with `count`
    Results (or a null / absent `action_results`: "MUST be a list"): ERROR `Invalid command
    results: expected a list of 1 results` (with session_id and the request_id), and the agent
    gets synthetic failures, so the stop plan fails. A correct answer sent afterwards is dropped
    silently."""
    async with world() as w:
        dev = await w.device("dev-1")
        galaxy = await w.join("g", "constellation")
        await galaxy.send(constellation_task("g", "dev-1", session_id="s1"))
        await galaxy.recv()
        command = await dev.recv()
        good = answer(command, "dev-1")
        bad = {**good, "request_id": "rq-bad"}
        if count == "null":
            bad["action_results"] = None
        elif count == "absent":
            del bad["action_results"]
        else:
            assert isinstance(count, int)
            bad["action_results"] = good["action_results"] * count
        await dev.send(bad)
        assert_error(await dev.recv(), "Invalid command results: expected a list of 1 results",
                     "invalid_results", session_id="s1", request_id="rq-bad")
        task_end = await dev.recv()
        assert (task_end["type"], task_end["status"]) == ("task_end", "failed")
        assert task_end["error"] == "step 0 failed: invalid command results from executor"
        assert task_end["result"] == [
            {"step": 0, "results": [
                {"status": "failure", "error": "invalid command results from executor",
                 "result": None, "namespace": None,
                 "call_id": command["actions"][0]["call_id"]}]}
        ]
        assert (await galaxy.recv())["response_id"] == task_end["response_id"]
        await dev.send(good)
        assert await barrier(dev) == []


async def test_unknown_and_repeated_prev_response_ids_are_dropped() -> None:
    """CMD-4, CMD-2: results naming an unknown prev_response_id of a live session are dropped and
    the waiter stays pending; after the real answer, repeating it is dropped too (no ERROR)."""
    async with world() as w:
        dev = await w.device("dev-1")
        await dev.send(device_task("dev-1", plan([cmd("a")], [cmd("b")]), session_id="s1"))
        await dev.recv()
        first = await dev.recv()
        await dev.send({**answer(first, "dev-1"), "prev_response_id": "resp-unknown"})
        await dev.send({**answer(first, "dev-1"), "prev_response_id": None})
        assert await barrier(dev) == []
        await dev.send(answer(first, "dev-1"))
        second = await dev.recv()
        assert second["type"] == "command"
        await dev.send(answer(first, "dev-1"))  # already resolved
        assert await barrier(dev) == []
        await dev.send(answer(second, "dev-1"))
        assert (await dev.recv())["status"] == "completed"


# ------------------------------------------------------------------ routing by connection


async def test_routing_by_connection_sec16() -> None:
    """SEC-16, END-1, DC-2, CAN-1: dev-1 has a session of its own and drops; A registers as dev-1
    and receives nothing from the old session, not even when it answers the old COMMAND. The
    result store shows the cancellation."""
    async with world() as w:
        dev = await w.device("dev-1")
        await dev.send(device_task("dev-1", session_id="own"))
        await dev.recv()
        command = await dev.recv()
        await dev.aclose()
        await w.gone("dev-1")
        assert w.server.sessions.live == {}

        a = await w.device("dev-1")
        await a.send(answer(command, "dev-1"))
        assert await barrier(a) == []
        record = w.server.sessions.results.by_session_id("own")
        assert record is not None
        assert (record.status, record.error, record.result) == ("failed", DEVICE_GONE, None)


async def test_device_originated_task_dropped_with_device_reaches_nobody() -> None:
    """CAN-1 row 1 (device-originated), §4.8 last line: dev-1 drops between COMMAND and
    COMMAND_RESULTS; its session is cancelled and no one (not an observing constellation scoped
    to dev-1, not another device) receives anything."""
    async with world() as w:
        dev = await w.device("dev-1")
        observer = await w.join("obs", "constellation", target_id="dev-1")
        other = await w.device("dev-2")
        await dev.send(device_task("dev-1", task_name="list tools"))
        await dev.recv()
        await dev.recv()
        await trio.aclose_forcefully(dev.ws._stream)  # abrupt: no closing handshake
        await w.gone("dev-1")
        assert w.server.sessions.live == {}
        assert await barrier(observer, "constellation") == []
        assert await barrier(other) == []


async def test_constellation_drop_over_real_sockets() -> None:
    """CAN-1 row 2, DC-3, TASK-10 (§4.9 last lines): the requesting constellation drops after the
    first COMMAND; dev-1 gets TASK_END `Task was cancelled because the requesting client
    disconnected` and has only ever seen COMMAND and TASK_END frames."""
    async with world() as w:
        dev = await w.device("dev-1")
        galaxy = await w.join("g", "constellation", target_id="dev-1")
        await galaxy.send(constellation_task("g", "dev-1", session_id="s", task_name="x/y"))
        await galaxy.recv()
        command = await dev.recv()
        await galaxy.aclose()
        task_end = await dev.recv()
        assert (task_end["type"], task_end["status"], task_end["session_id"]) == (
            "task_end", "failed", "s"
        )
        assert task_end["error"] == "Task was cancelled because the requesting client disconnected"
        assert (task_end["task_name"], task_end["result"]) == ("x_y", None)
        assert command["type"] == "command"
        assert await barrier(dev) == []
