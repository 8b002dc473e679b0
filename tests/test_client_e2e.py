"""End to end: the client SDK against the real server, over real sockets on 127.0.0.1:0.

Everything runs in one Trio run with the autojump clock, so timeouts and backoff take no real
time and are asserted at exact virtual times. Tools here are async: a sync tool's worker
thread would let the autojump clock race ahead while it runs. The one exception is
`test_device_process_goes_away_mid_task`, which needs a real process to kill.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from typing import Any

import pytest
import trio
import trio.testing
from process_helpers import cli_process

from ufo_trio import ServerConfig, serve
from ufo_trio.client import (
    AuthenticationFailed,
    Backoff,
    Command,
    ConnectFailed,
    ConnectionLost,
    DeviceNotFound,
    Plan,
    RegistrationRefused,
    RequestRejected,
    RequestTimeout,
    ToolContext,
    ToolRegistry,
    default_tools,
    open_constellation,
    open_device,
)

KEY = "test-key"
SKIPPED = "Skipped due to previous failure (early_exit=True)."


async def start_server(nursery: trio.Nursery, **overrides: Any) -> Any:
    config = ServerConfig(host="127.0.0.1", port=0, api_key=KEY, **overrides)
    return await nursery.start(serve, config)


def echo(text: str) -> Command:
    return Command(tool_name="echo", parameters={"text": text})


def device_tools() -> tuple[ToolRegistry, list[ToolContext], trio.Event]:
    """Built-ins plus `record` (remembers its context), `boom` (raises) and `block`
    (waits until the returned event is set)."""
    tools = default_tools()
    seen: list[ToolContext] = []
    gate = trio.Event()

    @tools.tool("record", tool_type="data_collection")
    async def record(ctx: ToolContext, label: str) -> dict[str, Any]:
        seen.append(ctx)
        return {"label": label, "session": ctx.session_id}

    @tools.tool("boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    @tools.tool("block")
    async def block() -> str:
        await gate.wait()
        return "released"

    return tools, seen, gate


# ------------------------------------------------------------------------------- happy paths


async def test_device_and_constellation_run_a_multi_step_plan(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    tools, seen, _ = device_tools()
    plan = Plan.of(
        echo("hello"),
        Command(tool_name="record", tool_type="data_collection", parameters={"label": "one"}),
        [
            Command(tool_name="system_info", tool_type="data_collection"),
            Command(tool_name=""),
            Command(tool_name="record", tool_type="data_collection", parameters={"label": "two"}),
        ],
    )
    async with (
        open_device(server.url, "dev-1", api_key=KEY, tools=tools, platform="linux") as device,
        open_constellation(server.url, "orchestrator", target_id="dev-1", api_key=KEY) as c,
    ):
        t0 = trio.current_time()
        info = await c.device_info("dev-1")
        assert info == device.system_info
        assert info["device_id"] == "dev-1"
        assert info["platform"] == "linux"
        assert {t["name"] for t in info["tools"]} >= {"echo", "record", "boom"}

        outcome = await c.run_task("dev-1", plan, task_name="demo/multi step")
        assert trio.current_time() == t0  # no timeout or backoff was involved
    assert outcome.ok
    assert outcome.status == "completed"
    assert outcome.error is None
    assert outcome.task_name == "demo_multi_step"  # sanitised by the server (NAME-1)
    steps = outcome.steps
    assert steps is not None
    assert [s.step for s in steps] == [0, 1, 2]
    assert [[r.status for r in s.results] for s in steps] == [
        ["success"], ["success"], ["success", "success", "success"]
    ]
    assert steps[0].results[0].result == "hello"
    assert steps[1].results[0].result == {"label": "one", "session": outcome.session_id}
    assert steps[2].results[0].result == device.system_info
    assert steps[2].results[1].result == "No action taken."
    # The device echoed the call_id of each Command the server sent it (§1.4).
    assert [ctx.call_id for ctx in seen] == [
        steps[1].results[0].call_id,
        steps[2].results[2].call_id,
    ]
    assert all(ctx.call_id for ctx in seen)
    assert {ctx.session_id for ctx in seen} == {outcome.session_id}
    assert device.commands_answered == 3
    assert device.registrations == 1


async def test_tool_raising_gives_failure_and_the_rest_skipped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    tools, _, _ = device_tools()
    plan = Plan.of([Command(tool_name="boom"), echo("never")], echo("never either"))
    async with (
        open_device(server.url, "dev-1", api_key=KEY, tools=tools),
        open_constellation(server.url, "orchestrator", api_key=KEY) as c,
    ):
        outcome = await c.run_task("dev-1", plan)
    assert outcome.status == "failed"
    assert outcome.error == "step 0 failed: RuntimeError: kaput"
    assert not outcome.rejected
    steps = outcome.steps
    assert steps is not None
    assert len(steps) == 1  # on_failure=stop: step 1 never ran
    failure, skipped = steps[0].results
    assert failure.status == "failure"
    assert failure.error == "RuntimeError: kaput"
    assert failure.namespace == "ufo_trio"
    assert skipped.status == "skipped"
    assert skipped.error == SKIPPED
    assert failure.call_id
    assert skipped.call_id
    assert failure.call_id != skipped.call_id


async def test_invalid_parameters_are_a_failure_result(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    plan = Plan.of(Command(tool_name="echo", parameters={"text": 3, "loud": True}))
    async with (
        open_device(server.url, "dev-1", api_key=KEY),
        open_constellation(server.url, "orchestrator", api_key=KEY) as c,
    ):
        outcome = await c.run_task("dev-1", plan)
    assert outcome.status == "failed"
    assert outcome.error == (
        "step 0 failed: invalid parameters for tool 'echo': parameter 'text' must be string, "
        "got integer; unexpected parameter 'loud' (accepted: text)"
    )


async def test_several_tasks_in_flight_at_once(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    tools, _, gate = device_tools()
    plan = Plan.of(Command(tool_name="block"), echo("after"))
    outcomes: list[Any] = []
    async with (
        open_device(server.url, "dev-1", api_key=KEY, tools=tools, max_concurrent_commands=5),
        open_constellation(server.url, "orchestrator", api_key=KEY) as c,
    ):

        async def one(i: int) -> None:
            outcomes.append(await c.run_task("dev-1", plan, task_name=f"t{i}"))

        async with trio.open_nursery() as tasks:
            for i in range(5):
                tasks.start_soon(one, i)
            await trio.testing.wait_all_tasks_blocked()
            assert c.tasks_in_flight == 5
            assert outcomes == []
            gate.set()
    assert len(outcomes) == 5
    assert all(o.ok for o in outcomes)
    assert len({o.session_id for o in outcomes}) == 5
    assert sorted(o.task_name for o in outcomes) == [f"t{i}" for i in range(5)]


async def http(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One raw HTTP/1.1 request to the server's API (the SDK has no POST helper)."""
    payload = json.dumps(body).encode() if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    )
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(head.encode() + payload)
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    _, _, content = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(content)


async def test_http_dispatch_reaches_the_sdk_device(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # POST /api/dispatch pushes a TASK assignment; the SDK device answers with its own TASK
    # (COMPAT-10), so the plan runs with the device as requester and executor.
    server = await start_server(nursery)
    plan = Plan.of(echo("dispatched"))
    async with open_device(server.url, "dev-1", api_key=KEY) as device:
        status, reply = await http(
            server.port, "POST", "/api/dispatch",
            {"client_id": "dev-1", "request": plan.to_json(), "task_name": "via-http"},
        )
        assert (status, reply["status"]) == (200, "dispatched")
        while True:
            status, result = await http(server.port, "GET", "/api/task_result/via-http")
            if result["status"] != "pending":
                break
            await trio.sleep(0.01)
        assert device.commands_answered == 1
    assert result["status"] == "done"
    assert result["result"][0]["results"][0]["result"] == "dispatched"


# ------------------------------------------------------------------------------- refusals


async def test_rejected_task_is_a_failed_outcome_with_its_code(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    async with (
        open_device(server.url, "dev-1", api_key=KEY),
        open_constellation(server.url, "orchestrator", api_key=KEY) as c,
    ):
        t0 = trio.current_time()
        rejected = await c.run_task("ghost", Plan.of(echo("x")), session_id="mine-1")
        assert trio.current_time() == t0
        # The fail-fast TASK_END that follows the ERROR (TASK-9) must not disturb later tasks.
        ok = await c.run_task("dev-1", Plan.of(echo("x")), session_id="mine-2")
    assert rejected.status == "failed"
    assert rejected.rejected
    assert rejected.code == "unknown_target"
    assert rejected.error == "Target device 'ghost' is not connected"
    assert rejected.session_id == "mine-1"
    assert ok.ok
    assert ok.session_id == "mine-2"


async def test_scoped_constellation_needs_its_device(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    with pytest.raises(RegistrationRefused) as info:
        async with open_constellation(server.url, "orch", target_id="ghost", api_key=KEY):
            pass  # pragma: no cover
    assert info.value.code == "unknown_target"
    assert str(info.value) == (
        "registration of 'orch' refused by the server: "
        "Target device 'ghost' is not connected (unknown_target)"
    )


async def test_device_info_errors(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    async with (
        open_device(server.url, "dev-1", api_key=KEY),
        open_device(server.url, "dev-2", api_key=KEY),
        open_constellation(server.url, "scoped", target_id="dev-1", api_key=KEY) as scoped,
        open_constellation(server.url, "free", api_key=KEY) as free,
    ):
        with pytest.raises(RequestRejected) as info:
            await scoped.device_info("dev-2")
        assert info.value.code == "not_authorized"
        assert info.value.error == "Not authorized to request device info for this device"
        with pytest.raises(DeviceNotFound, match="Device ghost not found"):
            await free.device_info("ghost")
        assert (await free.device_info("dev-2"))["device_id"] == "dev-2"
        # A scoped constellation may not send tasks elsewhere either (TASK-2).
        refused = await scoped.run_task("dev-2", Plan.of(echo("x")))
        assert refused.code == "not_authorized"


async def test_duplicate_device_id_is_refused_clearly(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    async with open_device(server.url, "dev-1", api_key=KEY) as first:
        t0 = trio.current_time()
        with pytest.raises(RegistrationRefused) as info:
            async with open_device(server.url, "dev-1", api_key=KEY):
                pass  # pragma: no cover
        assert info.value.code == "duplicate_client_id"
        assert "client_id 'dev-1' is already registered" in str(info.value)
        assert trio.current_time() - t0 < 5  # the probe got its pong; no retries
        assert first.connected
        assert first.registrations == 1


async def test_wrong_api_key_is_a_clear_error_without_retries(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    t0 = trio.current_time()
    with pytest.raises(AuthenticationFailed) as info:
        async with open_device(server.url, "dev-1", api_key="bad-key-123"):
            pass  # pragma: no cover
    assert "HTTP 403" in str(info.value)
    assert "bad-key-123" not in str(info.value)  # the key is never echoed
    with pytest.raises(AuthenticationFailed):
        async with open_constellation(server.url, "orch", api_key=None):
            pass  # pragma: no cover
    assert trio.current_time() == t0  # no backoff sleep: it was not retried


async def test_unreachable_server_and_wrong_path(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    with pytest.raises(ConnectFailed, match="HTTP 404"):
        async with open_device(f"ws://127.0.0.1:{server.port}/nope", "d", api_key=KEY):
            pass  # pragma: no cover
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens on `port` now
    with pytest.raises(
        ConnectFailed,
        match=rf"cannot connect to ws://127.0.0.1:{port}/ws: Connection refused \(is the server running\?\)",
    ):
        async with open_device(f"ws://127.0.0.1:{port}/ws", "d", api_key=KEY):
            pass  # pragma: no cover


# ------------------------------------------------------------------------------- lost connections


async def test_device_reconnects_after_the_server_drops_it(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The server closes connections that send no data frame for 5 s (LIVE-3, close 4002); a
    # device without heartbeats is therefore dropped at t0+5 and must come back by itself.
    server = await start_server(nursery, heartbeat_timeout=5.0, ping_interval=0)
    backoff = Backoff(initial=1.0, jitter=0.5)
    first_delay = next(backoff.delays(random.Random(7)))
    t0 = trio.current_time()
    async with open_device(
        server.url,
        "dev-1",
        api_key=KEY,
        heartbeat_interval=0,
        ping_interval=0,
        reconnect=backoff,
        rng=random.Random(7),
    ) as device:
        assert device.registrations == 1
        await device.wait_disconnected()
        assert trio.current_time() == t0 + 5.0
        assert isinstance(device.last_error, ConnectionLost)
        assert device.last_error.code == 4002
        await device.wait_registered(2)
        assert trio.current_time() == t0 + 5.0 + first_delay
        # Registered again under the same id, and usable.
        async with open_constellation(server.url, "orch", target_id="dev-1", api_key=KEY) as c:
            outcome = await c.run_task("dev-1", Plan.of(echo("back")))
        assert outcome.ok
        assert device.connected


async def test_constellation_connection_lost_fails_pending_tasks(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery, heartbeat_timeout=5.0, ping_interval=0)
    tools, _, _ = device_tools()
    async with (
        open_device(server.url, "dev-1", api_key=KEY, tools=tools, heartbeat_interval=1.0),
        open_constellation(server.url, "orch", api_key=KEY, heartbeat_interval=0) as c,
    ):
        t0 = trio.current_time()
        errors: list[ConnectionLost] = []

        async def pending() -> None:
            with pytest.raises(ConnectionLost) as info:
                await c.run_task("dev-1", Plan.of(Command(tool_name="block")))
            errors.append(info.value)

        async with trio.open_nursery() as tasks:
            tasks.start_soon(pending)
            tasks.start_soon(pending)
        assert trio.current_time() == t0 + 5.0
        assert len(errors) == 2
        assert all(e.code == 4002 for e in errors)
        assert "outcome of pending requests is unknown" in str(errors[0])
        assert not c.connected
        with pytest.raises(ConnectionLost):
            await c.run_task("dev-1", Plan.of(echo("x")))
        with pytest.raises(ConnectionLost):
            await c.device_info("dev-1")


async def test_run_task_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    tools, _, gate = device_tools()
    async with (
        open_device(server.url, "dev-1", api_key=KEY, tools=tools),
        open_constellation(server.url, "orch", api_key=KEY) as c,
    ):
        t0 = trio.current_time()
        with pytest.raises(RequestTimeout, match="did not end within 3 s"):
            await c.run_task("dev-1", Plan.of(Command(tool_name="block")), timeout=3)
        assert trio.current_time() == t0 + 3
        assert c.tasks_in_flight == 0
        gate.set()
        assert (await c.run_task("dev-1", Plan.of(echo("x")), timeout=3)).ok


async def test_server_shutdown_ends_pending_tasks(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start_server(nursery)
    tools, _, _ = device_tools()
    registered = trio.Event()
    device_errors: list[ConnectionLost] = []

    async def device() -> None:
        # Without reconnection, the lost connection is the device's fatal error.
        try:
            async with open_device(server.url, "dev-1", api_key=KEY, tools=tools, reconnect=None):
                registered.set()
                await trio.sleep_forever()
        except ConnectionLost as exc:
            device_errors.append(exc)

    results: list[Any] = []
    async with trio.open_nursery() as tasks:
        tasks.start_soon(device)
        await registered.wait()
        async with open_constellation(server.url, "orch", api_key=KEY) as c:

            async def run() -> None:
                results.append(await c.run_task("dev-1", Plan.of(Command(tool_name="block"))))

            async with trio.open_nursery() as runs:
                runs.start_soon(run)
                await trio.testing.wait_all_tasks_blocked()
                server.request_shutdown()
    assert results[0].status == "failed"
    assert results[0].error == "Server shutting down"
    assert device_errors[0].code == 1001


async def test_device_process_goes_away_mid_task(nursery: trio.Nursery) -> None:
    """A real device process (the CLI) is killed while its tool runs: the constellation gets
    the server's cancellation TASK_END. Real time: a process cannot run on a mock clock."""
    server = await start_server(nursery)
    # The device's tool is a child program that connects back to us and then blocks, so we
    # know exactly when the command is running, and it exits once we close the socket.
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    probe.listen(1)
    probe_port = probe.getsockname()[1]
    python = sys.executable
    blocker = (
        f"import socket; s = socket.create_connection(('127.0.0.1', {probe_port})); s.recv(1)"
    )
    env = {**os.environ, "UFO_TRIO_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    with trio.fail_after(60):
        try:
            async with cli_process(
                "device", "--id", "proc-dev", "--url", server.url,
                "--allow-command", python, "--heartbeat-interval", "0", env=env,
            ) as (device, banner):  # fmt: skip
                assert "device 'proc-dev' connected" in banner

                async with open_constellation(server.url, "orch", api_key=KEY) as c:
                    outcome: list[Any] = []

                    async def run() -> None:
                        plan = Plan.of(
                            Command(tool_name="run_command", parameters={"command": [python, "-c", blocker]})
                        )
                        outcome.append(await c.run_task("proc-dev", plan))

                    async with trio.open_nursery() as tasks:
                        tasks.start_soon(run)
                        conn, _ = await probe.accept()  # the tool is running now
                        device.send_signal(signal.SIGKILL)
                    await device.wait()
                    conn.close()
                assert outcome[0].status == "failed"
                assert outcome[0].error == "Task was cancelled because target device disconnected"
                assert outcome[0].result is None
        finally:
            probe.close()
