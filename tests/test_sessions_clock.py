"""Sessions under trio's MockClock (autojump) on the in-memory server: every cancellation path of
§3.7/§3.8/§4.5 and the command timeout of §4.4, asserted at exact virtual instants.

Clients speak raw JSON (`RawClient`); nothing here waits on a real socket, so
`trio.current_time()` after a `recv()` is exactly when the server sent the frame.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from agents_for_tests import (
    AGENT,
    DEVICE_GONE,
    FACTORY_CALLS,
    GATE,
    NO_STEPS,
    ONE_STEP,
    REQUESTER_GONE,
    SHUTTING_DOWN,
    answer,
    barrier,
    cmd,
    constellation_task,
    device_task,
    frames_until_closed,
    plan,
)
from blackbox_helpers import is_uuid4

from ufo_trio._connection import Connection
from ufo_trio.testing import MemoryServer, RawClient, open_memory_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ufo_trio._messages import ServerMessageType


@pytest.fixture(autouse=True)
def _fresh_agent_state() -> None:
    FACTORY_CALLS.clear()
    GATE.reset()


@asynccontextmanager
async def memory_server(**overrides: Any) -> AsyncIterator[MemoryServer]:
    async with open_memory_server(**overrides) as mem:
        yield mem


async def register(
    mem: MemoryServer, client_id: str, client_type: str = "device", **fields: Any
) -> RawClient:
    client = await mem.connect()
    verdict = await client.register(client_id, client_type, **fields)
    assert verdict["type"] == "heartbeat"
    assert verdict["status"] == "ok"
    return client


async def linux_device(mem: MemoryServer, client_id: str = "dev-1") -> RawClient:
    return await register(mem, client_id, metadata={"platform": "linux"})


async def start_constellation_session(
    mem: MemoryServer,
    request: str = ONE_STEP,
    *,
    session_id: str = "demo@task-1",
    device_id: str = "dev-1",
    constellation_id: str = "demo@dev-1",
) -> tuple[RawClient, RawClient, dict[str, Any]]:
    """dev-1 and a constellation scoped to it; one session with its first COMMAND delivered."""
    dev = await linux_device(mem, device_id)
    galaxy = await register(mem, constellation_id, "constellation", target_id=device_id)
    await galaxy.send(
        constellation_task(
            constellation_id, device_id, request, session_id=session_id, task_name="galaxy/t/1"
        )
    )
    ack = await galaxy.recv()
    assert ack["type"] == "heartbeat"
    assert ack["session_id"] == session_id
    command = await dev.recv()
    assert command["type"] == "command"
    return dev, galaxy, command


async def silence(client: RawClient) -> None:
    """Stop a memory client's trio-websocket reader: it no longer answers pings (half-open peer).

    The reader is parked in `receive_some`; once the next bytes arrive it hands them to wsproto
    and exits its loop without processing the events, so no pong is ever written.
    """
    client.ws._reader_running = False


async def drop(client: RawClient, how: str) -> None:
    if how == "abort":  # TCP-like reset: the server sees EOF without a close frame
        await trio.aclose_forcefully(client.ws._stream)
    else:  # a clean WebSocket close by the peer
        await client.aclose()


async def assert_silent(client: RawClient, seconds: float = 1.0) -> None:
    """Under autojump, `seconds` of virtual silence: the server queued nothing for `client`."""
    with trio.move_on_after(seconds):
        frame = await client.recv()
        raise AssertionError(f"unexpected frame: {frame}")


def assert_cancelled_task_end(frame: dict[str, Any], session_id: str, error: str) -> None:
    assert frame["type"] == "task_end"
    assert frame["status"] == "failed"
    assert frame["session_id"] == session_id
    assert frame["task_name"] == "galaxy_t_1"
    assert frame["error"] == error
    assert frame["result"] is None  # END-4: cancelled → result null
    assert is_uuid4(frame["response_id"])


# ------------------------------------------------------------------------------ device drops


@pytest.mark.parametrize("how", ["abort", "close"])
async def test_device_drop_cancels_session_at_the_drop_instant(
    autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """DC-1, DC-2, CAN-1 row 1, CAN-2, END-4, TASK-8: the executor drops while a COMMAND is
    outstanding. The constellation's TASK_END `Task was cancelled because target device
    disconnected` arrives at the very virtual instant of the drop; the session task (which ran in
    the device connection's nursery) and the device connection's tasks are gone; nothing is live.
    """
    async with memory_server() as mem:
        dev, galaxy, _ = await start_constellation_session(mem)
        device_conn = mem.server.registry.get("dev-1").connection  # type: ignore[union-attr]
        session = mem.server.sessions.live["demo@task-1"]
        assert session.executor is device_conn
        baseline = mem.connection_tasks()
        assert baseline == 2

        await trio.sleep(7.25)  # the device works on the command for a while, then drops
        dropped_at = trio.current_time()
        await drop(dev, how)

        task_end = await galaxy.recv()
        assert trio.current_time() == dropped_at
        assert_cancelled_task_end(task_end, "demo@task-1", DEVICE_GONE)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == dropped_at
        assert session.done.is_set()
        assert mem.server.sessions.live == {}
        assert device_conn.executing == {}
        assert len(device_conn.nursery.child_tasks) == 0
        assert mem.connection_tasks() == baseline - 1
        assert mem.server.registry.get("dev-1") is None
        record = mem.server.sessions.results.by_session_id("demo@task-1")
        assert record is not None
        assert (record.status, record.error, record.result) == ("failed", DEVICE_GONE, None)
        # The constellation stays usable and learns nothing more about the dead session.
        assert await barrier(galaxy) == []


async def test_silent_device_detected_by_ping_watchdog(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """LIVE-1, LIVE-2, DC-1, DC-2, CAN-1: a device that stops answering pings mid-command is closed
    at exactly registration + ping_interval + ping_timeout, and the constellation's TASK_END
    arrives at that same instant. The constellation, which keeps answering pings, stays.
    """
    async with memory_server(ping_interval=10.0, ping_timeout=5.0) as mem:
        registered_at = trio.current_time()
        dev, galaxy, _ = await start_constellation_session(mem)
        assert trio.current_time() == registered_at
        await trio.sleep(3.0)
        await silence(dev)
        # The ping went out at 10 s and has gone unanswered since: still there just before 15 s.
        await trio.sleep(11.999)
        assert mem.server.registry.get("dev-1") is not None
        assert "demo@task-1" in mem.server.sessions.live

        task_end = await galaxy.recv()
        assert trio.current_time() == registered_at + 10.0 + 5.0
        assert_cancelled_task_end(task_end, "demo@task-1", DEVICE_GONE)
        assert mem.server.sessions.live == {}
        assert mem.server.registry.get("dev-1") is None
        # The server gives a peer that missed its pings 1 s for the closing handshake.
        await trio.sleep(1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert mem.connection_tasks() == 1
        # The constellation answered every ping and is still registered two rounds later.
        await trio.sleep(30.0)
        assert mem.server.registry.get("demo@dev-1") is not None
        assert await barrier(galaxy) == []


async def test_heartbeat_timeout_cancels_like_a_drop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """LIVE-3, DC-1, DC-2: with --heartbeat-timeout 300, a device that answers pings but sends
    no data frame is closed 4002 at exactly 300 s, and its constellation session ends then."""
    async with memory_server(heartbeat_timeout=300.0) as mem:
        registered_at = trio.current_time()
        dev, galaxy, _ = await start_constellation_session(mem)
        await trio.sleep(100.0)
        assert await barrier(galaxy, "constellation") == []  # a data frame: G stays to 400 s
        task_end = await galaxy.recv()
        assert trio.current_time() == registered_at + 300.0
        assert_cancelled_task_end(task_end, "demo@task-1", DEVICE_GONE)
        frames, code = await frames_until_closed(dev)
        assert (frames, code) == ([], 4002)
        assert mem.server.sessions.live == {}
        frames, code = await frames_until_closed(galaxy)
        assert (frames, code) == ([], 4002)
        assert trio.current_time() == registered_at + 400.0


# ------------------------------------------------------------------------- requester drops


@pytest.mark.parametrize("how", ["abort", "close"])
async def test_constellation_drop_notifies_target_device(
    autojump_clock: trio.testing.MockClock, how: str
) -> None:
    """DC-3, CAN-1 row 2, CAN-2: the requesting constellation drops after the first COMMAND;
    the target device gets TASK_END `Task was cancelled because the requesting client
    disconnected` at the same instant. Results sent afterwards are dropped silently (CMD-2)."""
    async with memory_server() as mem:
        dev, galaxy, command = await start_constellation_session(mem)
        galaxy_conn = mem.server.registry.get("demo@dev-1").connection  # type: ignore[union-attr]
        await trio.sleep(2.5)
        dropped_at = trio.current_time()
        await drop(galaxy, how)

        task_end = await dev.recv()
        assert trio.current_time() == dropped_at
        assert_cancelled_task_end(task_end, "demo@task-1", REQUESTER_GONE)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == dropped_at
        assert mem.server.sessions.live == {}
        assert galaxy_conn.requested == {}
        assert mem.connection_tasks() == 1
        dev_conn = mem.server.registry.get("dev-1").connection  # type: ignore[union-attr]
        assert dev_conn.executing == {}

        await dev.send(answer(command, "dev-1"))  # too late: no live session (CMD-2)
        assert await barrier(dev) == []
        record = mem.server.sessions.results.by_session_id("demo@task-1")
        assert record is not None
        assert (record.status, record.error) == ("failed", REQUESTER_GONE)


async def test_device_originated_session_dropped_with_its_device(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """DC-2, CAN-1 row 1 (device-originated: nothing), Example A's last line: dev-1 drops between
    COMMAND and COMMAND_RESULTS; its own session is cancelled and nobody receives anything."""
    async with memory_server() as mem:
        dev = await linux_device(mem)
        observer = await register(mem, "observer", "constellation", target_id="dev-1")
        other = await linux_device(mem, "dev-2")
        await dev.send(device_task("dev-1", task_name="list tools"))
        ack = await dev.recv()
        command = await dev.recv()
        assert command["session_id"] == ack["session_id"]
        await drop(dev, "abort")
        await trio.testing.wait_all_tasks_blocked()
        assert mem.server.sessions.live == {}
        await assert_silent(observer, 60.0)
        await assert_silent(other, 0.0)
        record = mem.server.sessions.results.by_session_id(ack["session_id"])
        assert record is not None
        assert (record.status, record.error, record.result) == ("failed", DEVICE_GONE, None)


# ------------------------------------------------------------------------------- takeover


async def test_takeover_cancels_old_device_sessions_like_a_drop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """DUP-3, CAN-1 row 1, DC-2, END-1: a takeover of dev-1 cancels its sessions exactly like a
    drop. The constellation gets `target device disconnected`, the old connection is closed 4001
    without a TASK_END, and the new holder of `dev-1` gets nothing of the old session. Cleanup has
    completed (session stored, nothing live) before the new connection is confirmed."""
    async with memory_server(duplicate_policy="takeover") as mem:
        old, galaxy, command = await start_constellation_session(mem)
        await trio.sleep(4.0)
        t0 = trio.current_time()
        new = await mem.connect()
        verdict = await new.register("dev-1", metadata={"platform": "linux"})
        assert verdict["type"] == "heartbeat"
        assert verdict["status"] == "ok"
        assert trio.current_time() == t0
        assert mem.server.sessions.live == {}
        assert mem.server.sessions.results.by_session_id("demo@task-1") is not None

        task_end = await galaxy.recv()
        assert trio.current_time() == t0
        assert_cancelled_task_end(task_end, "demo@task-1", DEVICE_GONE)
        frames, code = await frames_until_closed(old)
        assert (frames, code) == ([], 4001)
        # The new holder can answer the old COMMAND all it likes: no such session (CMD-2).
        await new.send(answer(command, "dev-1"))
        assert await barrier(new) == []
        await assert_silent(new, 10.0)


async def test_probe_of_a_silent_device_takes_over_after_the_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """DUP-4, DUP-3, CAN-1: under `probe`, a silent old dev-1 loses to a reconnect after exactly
    min(ping_timeout, 5 s); its constellation session ends at that same instant."""
    async with memory_server(duplicate_policy="probe", ping_interval=0.0, ping_timeout=20.0) as mem:
        old, galaxy, _ = await start_constellation_session(mem)
        await silence(old)
        t0 = trio.current_time()
        new = await mem.connect()
        verdict = await new.register("dev-1", metadata={"platform": "linux"})
        assert verdict["status"] == "ok"
        assert trio.current_time() == t0 + 5.0
        task_end = await galaxy.recv()
        assert trio.current_time() == t0 + 5.0
        assert_cancelled_task_end(task_end, "demo@task-1", DEVICE_GONE)
        assert mem.server.sessions.live == {}
        await assert_silent(new)


# ------------------------------------------------------------------------------- shutdown


async def test_shutdown_with_sessions_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    """SHUT-1, SHUT-2, CAN-1 row 3, TASK-1, TASK-9: `request_shutdown()` with three live sessions.

    One session's agent takes 2 s to wind down (it holds the shutdown open, so TASKs can arrive
    meanwhile). Every requester and target device gets TASK_END `Server shutting down` as its
    last frame, then close 1001. A constellation TASK with a session_id during shutdown gets ERROR
    `shutting_down` plus the TASK-9 TASK_END; without a session_id, or from a device, only the
    ERROR.
    """
    async with memory_server(agent=AGENT, shutdown_grace=5.0) as mem:
        dev1 = await linux_device(mem, "dev-1")
        dev2 = await linux_device(mem, "dev-2")
        g1 = await register(mem, "g1", "constellation", target_id="dev-1")
        g2 = await register(mem, "g2", "constellation")
        await g1.send(constellation_task("g1", "dev-1", session_id="s-g1", task_name="one"))
        assert (await g1.recv())["session_id"] == "s-g1"
        assert (await dev1.recv())["type"] == "command"
        await dev2.send(device_task("dev-2", session_id="s-dev2", task_name="own"))
        assert (await dev2.recv())["session_id"] == "s-dev2"
        assert (await dev2.recv())["type"] == "command"
        await g2.send(constellation_task("g2", "dev-2", "gate", session_id="s-slow"))
        assert (await g2.recv())["session_id"] == "s-slow"
        assert set(mem.server.sessions.live) == {"s-g1", "s-dev2", "s-slow"}

        t0 = trio.current_time()
        mem.server.request_shutdown()
        await trio.testing.wait_all_tasks_blocked()
        assert mem.server.shutting_down
        assert trio.current_time() == t0

        # TASK-1 while the slow session holds the shutdown open.
        await g1.send(
            constellation_task("g1", "dev-1", session_id="late", request_id="rq-late")
        )
        await g1.send(constellation_task("g1", "dev-1", request_id="rq-anon"))
        await dev1.send(device_task("dev-1", session_id="late-dev", request_id="rq-dev"))
        await trio.sleep(2.0)
        GATE.set()
        released_at = trio.current_time()

        results: dict[str, tuple[list[dict[str, Any]], int]] = {}
        for name, client in [("g1", g1), ("g2", g2), ("dev1", dev1), ("dev2", dev2)]:
            results[name] = await frames_until_closed(client)
        assert trio.current_time() == released_at

        def shutdown_end(frame: dict[str, Any], session_id: str) -> None:
            assert frame["type"] == "task_end"
            assert frame["status"] == "failed"
            assert frame["session_id"] == session_id
            assert frame["error"] == SHUTTING_DOWN
            assert frame["result"] is None

        g1_frames, g1_code = results["g1"]
        assert g1_code == 1001
        shutdown_end(g1_frames[0], "s-g1")
        error, fail_fast, anon_error = g1_frames[1:]
        assert (error["type"], error["code"], error["error"]) == (
            "error", "shutting_down", SHUTTING_DOWN
        )
        assert (error["session_id"], error["response_id"]) == ("late", "rq-late")
        shutdown_end(fail_fast, "late")  # TASK-9
        assert fail_fast["task_name"] is None
        assert (anon_error["code"], anon_error["session_id"]) == ("shutting_down", None)

        dev1_frames, dev1_code = results["dev1"]
        assert dev1_code == 1001
        shutdown_end(dev1_frames[0], "s-g1")
        assert dev1_frames[0]["response_id"] == g1_frames[0]["response_id"]  # END-3
        assert [(f["type"], f["code"]) for f in dev1_frames[1:]] == [("error", "shutting_down")]

        dev2_frames, dev2_code = results["dev2"]
        assert dev2_code == 1001
        assert sorted(f["session_id"] for f in dev2_frames) == ["s-dev2", "s-slow"]
        for frame in dev2_frames:
            shutdown_end(frame, frame["session_id"])

        g2_frames, g2_code = results["g2"]
        assert g2_code == 1001
        assert len(g2_frames) == 1
        shutdown_end(g2_frames[0], "s-slow")

        await mem.server.wait_stopped()
        assert mem.server.sessions.live == {}
        assert mem.connection_tasks() == 0
        assert FACTORY_CALLS == ["linux"] * 3  # no agent for a TASK refused under TASK-1


# ------------------------------------------------------------------------- command timeout


@pytest.mark.parametrize(("seconds", "shown"), [(30.0, "30"), (2.5, "2.5")])
async def test_command_timeout_is_exact_and_late_results_are_dropped(
    autojump_clock: trio.testing.MockClock, seconds: float, shown: str
) -> None:
    """CMD-6, CMD-7, CMD-4, SCRIPT-3: no results within --command-timeout → one synthetic failure
    per Command, in order, with that Command's call_id, at exactly the timeout. Results that
    arrive afterwards are dropped silently; the session goes on to its next step."""
    text = f"timeout: no command results received within {shown} s"
    request = plan([cmd("a"), cmd("b")], [cmd("c")], on_failure="continue")
    async with memory_server(command_timeout=seconds) as mem:
        dev, galaxy, first = await start_constellation_session(mem, request)
        sent_at = trio.current_time()
        second = await dev.recv()
        assert trio.current_time() == sent_at + seconds
        assert second["type"] == "command"
        assert [a["tool_name"] for a in second["actions"]] == ["c"]

        await dev.send(answer(first, "dev-1"))  # late (CMD-4): no reply, no effect
        assert await barrier(dev) == []
        await dev.send(answer(second, "dev-1"))
        task_end = await galaxy.recv()
        assert task_end["status"] == "completed"
        step0, step1 = task_end["result"]
        assert step0 == {
            "step": 0,
            "results": [
                {"status": "failure", "error": text, "result": None, "namespace": None,
                 "call_id": action["call_id"]}
                for action in first["actions"]
            ],
        }
        assert [r["status"] for r in step1["results"]] == ["success"]
        assert (await dev.recv())["response_id"] == task_end["response_id"]


async def test_command_timeout_fails_a_stop_plan(autojump_clock: trio.testing.MockClock) -> None:
    """CMD-6 + SCRIPT-3: under `on_failure: stop` the timeout ends the session `failed` at
    exactly --command-timeout with `step 0 failed: timeout: …`."""
    async with memory_server(command_timeout=45.0) as mem:
        dev, galaxy, _ = await start_constellation_session(mem)
        t0 = trio.current_time()
        task_end = await galaxy.recv()
        assert trio.current_time() == t0 + 45.0
        assert task_end["status"] == "failed"
        assert task_end["error"] == (
            "step 0 failed: timeout: no command results received within 45 s"
        )
        assert (await dev.recv())["response_id"] == task_end["response_id"]
        assert mem.server.sessions.live == {}


async def test_results_may_arrive_any_time_before_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """CMD-6: until the timeout, results may arrive at any time (here 1 ms before it)."""
    async with memory_server(command_timeout=600.0) as mem:
        dev, galaxy, command = await start_constellation_session(mem)
        await trio.sleep(599.999)
        await dev.send(answer(command, "dev-1"))
        task_end = await galaxy.recv()
        assert task_end["status"] == "completed"


# ------------------------------------------------------------------- ordering and agents


async def test_task_end_requester_copy_is_queued_first(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """END-3 (and TASK-8 for the ACK): both copies of a TASK_END carry the same response_id and
    the requester's copy is queued before the device's; the ACK is queued before the first
    COMMAND. Queue order is observed at `Connection.send_text`, the single queuing point."""
    queued: list[tuple[str, str]] = []
    original = Connection.send_text

    async def recording(self: Connection, text: str, kind: ServerMessageType) -> None:
        frame = json.loads(text)
        assert frame["type"] == kind.value
        queued.append((self.client_id, frame["type"] if frame["session_id"] else "-"))
        await original(self, text, kind)

    monkeypatch.setattr(Connection, "send_text", recording)
    async with memory_server() as mem:
        dev, galaxy, command = await start_constellation_session(mem)
        await dev.send(answer(command, "dev-1"))
        to_galaxy = await galaxy.recv()
        to_device = await dev.recv()
        assert to_galaxy["response_id"] == to_device["response_id"]
        assert to_galaxy == {**to_device, "timestamp": to_galaxy["timestamp"]}
    sessions = [q for q in queued if q[1] != "-"]
    assert sessions == [
        ("demo@dev-1", "heartbeat"),
        ("dev-1", "command"),
        ("demo@dev-1", "task_end"),
        ("dev-1", "task_end"),
    ]


async def test_parallel_execute_calls(autojump_clock: trio.testing.MockClock) -> None:
    """AGENT-3, CMD-1, CMD-2: two `execute` calls outstanding at once get distinct response_ids;
    results answered in reverse order reach the right waiter."""
    async with memory_server(agent=AGENT) as mem:
        dev = await linux_device(mem)
        await dev.send(device_task("dev-1", "parallel"))
        assert (await dev.recv())["type"] == "heartbeat"
        c1, c2 = await dev.recv(), await dev.recv()
        assert c1["response_id"] != c2["response_id"]
        for command in (c2, c1):
            await trio.sleep(1.0)
            await dev.send(answer(command, "dev-1"))
        task_end = await dev.recv()
        assert task_end["status"] == "completed"
        assert task_end["result"] == {"first": "ran first", "second": "ran second"}


async def test_executor_closing_refuses_new_sessions(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """TASK-7 (second case), DC-1, TASK-9: while dev-1's cleanup is still winding down one of its
    sessions, dev-1 is still registered but CLOSING; a constellation TASK for it gets
    `Target device 'dev-1' is not connected` plus the fail-fast TASK_END, and no session."""
    async with memory_server(agent=AGENT) as mem:
        dev = await linux_device(mem)
        galaxy = await register(mem, "g", "constellation")
        await dev.send(device_task("dev-1", "gate", session_id="slow"))
        assert (await dev.recv())["session_id"] == "slow"
        await drop(dev, "abort")
        await trio.testing.wait_all_tasks_blocked()
        assert mem.server.registry.get("dev-1") is not None  # cleanup still running

        await galaxy.send(
            constellation_task("g", "dev-1", NO_STEPS, session_id="s-2", request_id="rq")
        )
        error = await galaxy.recv()
        assert (error["type"], error["code"], error["error"], error["session_id"]) == (
            "error", "unknown_target", "Target device 'dev-1' is not connected", "s-2"
        )
        fail_fast = await galaxy.recv()
        assert (fail_fast["type"], fail_fast["status"], fail_fast["error"]) == (
            "task_end", "failed", error["error"]
        )
        assert set(mem.server.sessions.live) == {"slow"}
        GATE.set()
        await trio.testing.wait_all_tasks_blocked()
        assert mem.server.sessions.live == {}
        assert mem.server.registry.get("dev-1") is None
        assert await barrier(galaxy, "constellation") == []
