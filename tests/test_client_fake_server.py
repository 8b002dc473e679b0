"""The client SDK against scripted fake servers: the exact frames it sends, and how it reacts
to refusals and drops that the real server would not produce on demand.

A fake server is trio-websocket's `serve_websocket` on 127.0.0.1:0 with a handler written
per test. All tests use the autojump clock and assert virtual times.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from blackbox_helpers import is_uuid4
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from ufo_trio.client import (
    AuthenticationFailed,
    Backoff,
    ConnectionLost,
    ProtocolViolation,
    RegistrationRefused,
    ToolRegistry,
    default_tools,
    open_constellation,
    open_device,
)
from ufo_trio.client._device import MAX_DUPLICATE_RETRIES

Handler = Callable[[WebSocketRequest], Awaitable[None]]
CONFIRM = {"type": "heartbeat", "status": "ok", "response_id": "confirm", "protocol": "aip/1"}


async def fake_server(nursery: trio.Nursery, handler: Handler) -> str:
    async def guarded(request: WebSocketRequest) -> None:
        # The client may hang up while a handler still reads: that ends the handler quietly.
        try:
            await handler(request)
        except ConnectionClosed:
            pass

    server = await nursery.start(serve_websocket, guarded, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/ws"


async def send(ws: WebSocketConnection, frame: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(frame))


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    message = await ws.get_message()
    assert isinstance(message, str)
    frame: dict[str, Any] = json.loads(message)
    return frame


# ------------------------------------------------------------------------------- device frames


async def test_device_frames_on_the_wire(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    seen: dict[str, Any] = {}
    done = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        seen["path"] = request.path
        ws = await request.accept()
        seen["register"] = await receive(ws)
        await send(ws, CONFIRM)
        t0 = trio.current_time()
        # Junk and frames a device does not act on are ignored (COMPAT-4).
        await ws.send_message("not json")
        await send(ws, {"type": "mystery", "status": "ok"})
        await send(ws, {"type": "heartbeat", "status": "ok", "response_id": "ack"})
        await send(ws, {"type": "task_end", "status": "completed", "session_id": "other"})
        await send(
            ws,
            {
                "type": "command",
                "status": "continue",
                "agent_name": "SomeAgentName",
                "session_id": "S",
                "task_name": "t",
                "response_id": "R1",
                "actions": [
                    {"tool_name": "echo", "tool_type": "action", "parameters": {"text": "a"},
                     "call_id": "C1"},
                    {"tool_name": "", "tool_type": "action", "call_id": "C2"},
                    {"tool_name": "echo", "tool_type": "bogus", "call_id": "C3"},
                    {"tool_name": "echo", "tool_type": "action", "parameters": {"text": "b"},
                     "call_id": "C4"},
                ],
            },
        )
        seen["results"] = await receive(ws)
        seen["results_at"] = trio.current_time() - t0
        seen["heartbeat"] = await receive(ws)
        seen["heartbeat_at"] = trio.current_time() - t0
        done.set()
        await trio.sleep_forever()

    url = await fake_server(nursery, handler)
    async with open_device(
        url + "?x=1", "dev-1", api_key="k 1", platform="linux", metadata={"tier": "gold"},
        heartbeat_interval=10, ping_interval=0,
    ) as device:
        await done.wait()
        assert device.commands_answered == 1

    assert seen["path"] == "/ws?x=1&token=k+1"
    register = seen["register"]
    assert register["type"] == "register"
    assert register["status"] == "ok"
    assert register["client_type"] == "device"
    assert register["client_id"] == "dev-1"
    assert register["metadata"]["platform"] == "linux"
    assert register["metadata"]["tier"] == "gold"
    info = register["metadata"]["system_info"]
    assert info["device_id"] == "dev-1"
    assert info["platform"] == "linux"
    assert {"hostname", "os", "machine", "tools"} <= set(info)

    results = seen["results"]
    assert seen["results_at"] == 0
    assert results["type"] == "command_results"
    assert results["status"] == "continue"
    assert results["client_type"] == "device"
    assert results["client_id"] == "dev-1"
    assert results["session_id"] == "S"
    assert results["prev_response_id"] == "R1"
    assert [
        (r["status"], r["call_id"], r["result"], r["error"]) for r in results["action_results"]
    ] == [
        ("success", "C1", "a", None),
        ("success", "C2", "No action taken.", None),
        ("failure", "C3", None, "invalid command: tool_type must be 'data_collection' or 'action'"),
        ("skipped", "C4", None, "Skipped due to previous failure (early_exit=True)."),
    ]
    for result in results["action_results"]:
        assert set(result) == {"status", "error", "result", "namespace", "call_id"}

    assert seen["heartbeat_at"] == 10
    beat = seen["heartbeat"]
    assert (beat["type"], beat["status"], beat["client_id"]) == ("heartbeat", "ok", "dev-1")


async def test_full_command_queue_is_answered_busy_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    gate = trio.Event()
    tools = ToolRegistry()

    @tools.tool("wait")
    async def wait() -> str:
        await gate.wait()
        return "done"

    answers: list[dict[str, Any]] = []
    finished = trio.Event()

    def command(rid: str) -> dict[str, Any]:
        return {
            "type": "command", "status": "continue", "session_id": "S", "response_id": rid,
            "actions": [{"tool_name": "wait", "tool_type": "action", "call_id": f"c-{rid}"}],
        }

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await receive(ws)
        await send(ws, CONFIRM)
        await send(ws, command("R1"))
        await send(ws, command("R2"))
        answers.append(await receive(ws))
        gate.set()
        answers.append(await receive(ws))
        finished.set()
        await trio.sleep_forever()

    url = await fake_server(nursery, handler)
    async with open_device(
        url, "dev-1", tools=tools, max_concurrent_commands=1, command_queue_size=0,
        heartbeat_interval=0, ping_interval=0,
    ):
        await finished.wait()
    busy, done = answers
    assert busy["prev_response_id"] == "R2"
    assert busy["action_results"][0]["status"] == "failure"
    assert busy["action_results"][0]["call_id"] == "c-R2"
    assert busy["action_results"][0]["error"].startswith("device busy")
    assert done["prev_response_id"] == "R1"
    assert done["action_results"][0]["result"] == "done"


async def test_device_answers_a_dispatched_task_with_a_task(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # HTTP-3: the server pushes a TASK assignment; like the real device, the SDK device sends
    # an ordinary TASK with the request, the same task_name and no session_id (COMPAT-10).
    got: list[dict[str, Any]] = []
    done = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await receive(ws)
        await send(ws, CONFIRM)
        await send(ws, {"type": "task", "status": "continue", "user_request": "do it",
                        "task_name": "t-1", "session_id": "A", "response_id": "B"})
        got.append(await receive(ws))
        done.set()
        await trio.sleep_forever()

    url = await fake_server(nursery, handler)
    async with open_device(url, "dev-1", heartbeat_interval=0, ping_interval=0):
        await done.wait()
    task = got[0]
    assert task["type"] == "task"
    assert task["status"] == "continue"
    assert task["client_type"] == "device"
    assert task["client_id"] == "dev-1"
    assert task["request"] == "do it"
    assert task["task_name"] == "t-1"
    assert task["session_id"] is None
    assert is_uuid4(task["request_id"])


# ------------------------------------------------------------------------------- reconnection


def accept_once_then(later: Callable[[WebSocketRequest], Awaitable[None]]) -> tuple[Handler, list[float]]:
    """A handler that registers the first connection and drops it at once, then treats every
    later handshake with *later*; it records the time of each handshake."""
    attempts: list[float] = []

    async def handler(request: WebSocketRequest) -> None:
        attempts.append(trio.current_time())
        if len(attempts) == 1:
            ws = await request.accept()
            await receive(ws)
            await send(ws, CONFIRM)
            await ws.aclose(1011, "going away")
            return
        await later(request)

    return handler, attempts


async def test_wrong_key_on_reconnect_is_fatal_without_a_retry_storm(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def reject(request: WebSocketRequest) -> None:
        await request.reject(403)

    handler, attempts = accept_once_then(reject)
    url = await fake_server(nursery, handler)
    backoff = Backoff(initial=2.0, jitter=0.5)
    first_delay = next(backoff.delays(random.Random(1)))
    t0 = trio.current_time()
    with pytest.raises(AuthenticationFailed, match="HTTP 403"):
        async with open_device(
            url, "dev-1", api_key="k", reconnect=backoff, rng=random.Random(1),
            heartbeat_interval=0, ping_interval=0,
        ):
            await trio.sleep_forever()
    assert attempts == [t0, t0 + first_delay]  # exactly one retry, after one backoff delay
    await trio.testing.wait_all_tasks_blocked()


async def test_duplicate_id_on_reconnect_is_retried_a_few_times_then_fatal(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def duplicate(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await receive(ws)
        await send(ws, {
            "type": "error", "status": "error", "code": "duplicate_client_id",
            "error": "client_id 'dev-1' is already registered; duplicate registrations are not allowed",
        })
        await ws.aclose(1008, "duplicate_client_id")

    handler, attempts = accept_once_then(duplicate)
    url = await fake_server(nursery, handler)
    backoff = Backoff(initial=1.0, factor=2.0, jitter=0.0)
    with pytest.raises(RegistrationRefused) as info:
        async with open_device(
            url, "dev-1", reconnect=backoff, heartbeat_interval=0, ping_interval=0
        ):
            await trio.sleep_forever()
    assert info.value.code == "duplicate_client_id"
    # The first connection, then 1 + MAX_DUPLICATE_RETRIES refused reconnections spaced by
    # the backoff schedule (1, 2, 4, ... s).
    assert len(attempts) == 2 + MAX_DUPLICATE_RETRIES
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps == [1.0, 2.0, 4.0, 8.0]


async def test_reconnection_gives_up_after_max_attempts(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def hang_up(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.aclose()  # no verdict

    handler, attempts = accept_once_then(hang_up)
    url = await fake_server(nursery, handler)
    with pytest.raises(ConnectionLost, match="gave up after 2 reconnection attempts"):
        async with open_device(
            url, "dev-1", reconnect=Backoff(initial=1.0, jitter=0.0, max_attempts=2),
            heartbeat_interval=0, ping_interval=0,
        ) as device:
            await trio.sleep_forever()
    assert len(attempts) == 3
    assert device.registrations == 1


async def test_device_keepalive_detects_a_silent_server(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # A server that confirms and then goes silent (a half-open connection) never answers the
    # device's ping: after ping_interval + ping_timeout the device drops the connection.
    # trio-websocket would answer pings by itself, so this server speaks wsproto directly.
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage

    async def silent(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        registered = False
        while not registered:
            ws.receive_data(await stream.receive_some(65536))
            for event in ws.events():
                if isinstance(event, Request):
                    await stream.send_all(ws.send(AcceptConnection()))
                elif isinstance(event, TextMessage):
                    await stream.send_all(ws.send(TextMessage(data=json.dumps(CONFIRM))))
                    registered = True
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    t0 = trio.current_time()
    async with open_device(
        f"ws://127.0.0.1:{port}/ws", "dev-1", heartbeat_interval=0, ping_interval=5,
        ping_timeout=3, reconnect=Backoff(initial=100.0, jitter=0.0),
    ) as device:
        await device.wait_disconnected()
        assert trio.current_time() == t0 + 8
        assert str(device.last_error) == f"no pong from ws://127.0.0.1:{port}/ws within 3 s"


# ------------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    "verdict",
    [{"type": "task_end", "status": "completed"}, {"type": "heartbeat", "status": "continue"}],
)
async def test_a_verdict_that_is_neither_ok_nor_error_is_a_protocol_violation(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, verdict: dict[str, Any]
) -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await receive(ws)
        await send(ws, verdict)
        await trio.sleep_forever()

    url = await fake_server(nursery, handler)
    with pytest.raises(ProtocolViolation, match="instead of heartbeat/ok or error"):
        async with open_device(url, "dev-1"):
            pass  # pragma: no cover


async def test_no_verdict_within_the_registration_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await receive(ws)
        await trio.sleep_forever()

    url = await fake_server(nursery, handler)
    t0 = trio.current_time()
    with pytest.raises(ProtocolViolation, match="no registration verdict within 7 s"):
        async with open_constellation(url, "c", registration_timeout=7):
            pass  # pragma: no cover
    assert trio.current_time() == t0 + 7


# ------------------------------------------------------------------------------- constellation


async def test_constellation_frames_and_correlation(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    frames: list[dict[str, Any]] = []
    heartbeat_seen = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        frames.append(await receive(ws))
        await send(ws, CONFIRM)
        while True:
            frame = await receive(ws)
            frames.append(frame)
            if frame["type"] == "task" and frame["task_name"] == "refused":
                # Rejected: the ERROR echoes request_id as response_id and carries no
                # session_id here; then the fail-fast TASK_END (TASK-9).
                await send(ws, {"type": "error", "status": "error", "code": "rate_limited",
                                "error": "Too many running sessions for this client",
                                "response_id": frame["request_id"]})
                await send(ws, {"type": "task_end", "status": "failed",
                                "session_id": frame["session_id"],
                                "error": "Too many running sessions for this client"})
            elif frame["type"] == "task":
                sid = frame["session_id"]
                await send(ws, {"type": "heartbeat", "status": "ok", "session_id": sid,
                                "task_name": "clean_name"})
                await send(ws, {"type": "command", "status": "continue", "session_id": sid})
                await send(ws, {"type": "task_end", "status": "completed", "session_id": "other"})
                await send(ws, {"type": "error", "status": "error", "session_id": sid,
                                "error": "late and ignored"})
                await send(ws, {"type": "task_end", "status": "completed", "session_id": sid,
                                "task_name": "clean_name", "result": {"answer": 42}})
            elif frame["type"] == "heartbeat":
                heartbeat_seen.set()
            elif frame["type"] == "device_info_request":
                await send(ws, {"type": "device_info_response", "status": "ok",
                                "response_id": "someone-else", "result": {"device_id": "x"}})
                await send(ws, {"type": "device_info_response", "status": "ok",
                                "response_id": frame["request_id"],
                                "result": {"device_id": "dev-1", "hostname": "h"}})

    url = await fake_server(nursery, handler)
    async with open_constellation(
        url, "orch", target_id="dev-1", api_key="k", heartbeat_interval=30
    ) as c:
        t0 = trio.current_time()
        outcome = await c.run_task("dev-1", "free text request", task_name="raw name")
        rejected = await c.run_task("dev-1", {"steps": []}, task_name="refused")
        info = await c.device_info("dev-1")
        await heartbeat_seen.wait()
        assert trio.current_time() == t0 + 30

    register, task, refused_task, info_request, heartbeat = frames
    assert register["client_type"] == "constellation"
    assert register["target_id"] == "dev-1"
    assert register["metadata"]["type"] == "constellation_client"
    assert task["type"] == "task"
    assert task["status"] == "continue"
    assert task["client_type"] == "constellation"
    assert task["target_id"] == "dev-1"
    assert task["request"] == "free text request"
    assert task["task_name"] == "raw name"
    assert is_uuid4(task["session_id"])
    assert is_uuid4(task["request_id"])
    assert refused_task["request"] == '{"steps":[]}'
    assert info_request["type"] == "device_info_request"
    assert info_request["target_id"] == "dev-1"
    assert heartbeat["type"] == "heartbeat"

    assert outcome.ok
    assert outcome.result == {"answer": 42}
    assert outcome.task_name == "clean_name"
    assert outcome.session_id == task["session_id"]
    assert rejected.status == "failed"
    assert rejected.code == "rate_limited"
    assert rejected.error == "Too many running sessions for this client"
    assert info == {"device_id": "dev-1", "hostname": "h"}


async def test_session_id_already_in_flight_is_refused_locally(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await receive(ws)
        await send(ws, CONFIRM)
        await trio.sleep_forever()

    url = await fake_server(nursery, handler)
    async with open_constellation(url, "orch") as c, trio.open_nursery() as tasks:
        tasks.start_soon(partial(c.run_task, "dev-1", "x", session_id="same"))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ValueError, match="already in flight"):
            await c.run_task("dev-1", "y", session_id="same")
        tasks.cancel_scope.cancel()


def test_default_tools_fixture_sanity() -> None:
    assert "echo" in default_tools()
