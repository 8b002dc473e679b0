"""Faults a network produces: resets mid-task, half-open peers, peers that stop reading, churn.

Resets and churn use real sockets on 127.0.0.1 (an RST is a kernel event); the timing cases run
in memory under MockClock and assert exact virtual times.

The churn test runs `UFO_TRIO_CHURN_CYCLES` connect/register/disconnect cycles (default 500 so
the suite stays fast; the issue's full figure is `UFO_TRIO_CHURN_CYCLES=2000`) and then checks
that tasks, registry entries, sessions, TCP streams and this process's file descriptors are all
back to their baseline.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from wire_helpers import (
    WireClient,
    close_leftovers,
    fd_count,
    http_request,
    memory_client,
    memory_http,
    open_http,
    task_count,
    wait_quiescent,
)

from ufo_trio.testing import open_memory_server, open_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ufo_trio._server import Server

PLAN = json.dumps({"steps": [[{"tool_name": "probe", "tool_type": "action"}]]})
DEVICE_GONE = "Task was cancelled because target device disconnected"
REQUESTER_GONE = "Task was cancelled because the requesting client disconnected"
CHURN_CYCLES = int(os.environ.get("UFO_TRIO_CHURN_CYCLES", "500"))


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    close_leftovers()


async def api(server: Server, path: str) -> Any:
    response = await http_request(server.port, "GET", path)
    assert response.status == 200
    return response.json()


async def wait_until(server: Server, path: str, key: str, expected: Any) -> None:
    with trio.fail_after(5):
        while (await api(server, path))[key] != expected:
            await trio.sleep(0.005)


async def pair(server: Server, device_id: str, const_id: str) -> tuple[WireClient, WireClient]:
    device, verdict = await WireClient.registered(server.port, device_id)
    assert verdict["status"] == "ok"
    with trio.fail_after(5):
        while server.registry.get(device_id) is None:  # REG-7: added just after the verdict
            await trio.sleep(0.001)
    const, verdict = await WireClient.registered(
        server.port, const_id, "constellation", target_id=device_id
    )
    assert verdict["status"] == "ok"
    return device, const


def const_task(const_id: str, device_id: str, session_id: str) -> dict[str, Any]:
    return {"type": "task", "status": "continue", "client_type": "constellation",
            "client_id": const_id, "target_id": device_id, "session_id": session_id,
            "task_name": session_id, "request": PLAN}  # fmt: skip


# --------------------------------------------------------------------------------- TCP resets


async def test_device_reset_mid_task_fails_the_task_for_the_requester() -> None:
    async with open_server() as server:
        device, const = await pair(server, "dev-1", "c-1")
        await const.send(const_task("c-1", "dev-1", "c@1"))
        ack = await const.recv()
        assert isinstance(ack, dict)
        assert ack["type"] == "heartbeat"
        command = await device.recv()
        assert isinstance(command, dict)
        assert command["type"] == "command"
        device.reset()  # RST while the COMMAND is outstanding
        end = await const.recv()
        assert isinstance(end, dict)
        assert (end["type"], end["status"], end["session_id"]) == ("task_end", "failed", "c@1")
        assert (end["error"], end["result"]) == (DEVICE_GONE, None)
        await wait_until(server, "/api/clients", "online_clients", ["c-1"])
        assert await api(server, "/api/sessions") == {"sessions": []}
        assert await api(server, "/api/task_result/c@1") == {
            "status": "failed", "error": DEVICE_GONE, "result": None,
        }  # fmt: skip
        # The requester is untouched and can go on.
        await const.send({"type": "heartbeat", "status": "ok", "client_id": "c-1"})
        frame = await const.recv()
        assert isinstance(frame, dict)
        assert frame["type"] == "heartbeat"


async def test_requester_reset_mid_task_tells_the_device() -> None:
    async with open_server() as server:
        device, const = await pair(server, "dev-1", "c-1")
        await const.send(const_task("c-1", "dev-1", "c@1"))
        command = await device.recv()
        assert isinstance(command, dict)
        assert command["type"] == "command"
        const.reset()
        end = await device.recv()
        assert isinstance(end, dict)
        assert (end["type"], end["status"], end["error"]) == ("task_end", "failed", REQUESTER_GONE)
        await wait_until(server, "/api/clients", "online_clients", ["dev-1"])
        # Late results for the cancelled session are dropped silently (CMD-2).
        await device.send(
            {"type": "command_results", "status": "continue", "client_id": "dev-1",
             "session_id": "c@1", "prev_response_id": command["response_id"],
             "action_results": [{"status": "success"}]}
        )  # fmt: skip
        await device.send({"type": "heartbeat", "status": "ok"})
        frame = await device.recv()
        assert isinstance(frame, dict)
        assert (frame["type"], frame["session_id"]) == ("heartbeat", None)


@pytest.mark.parametrize(
    "stage", ["partial-head", "after-handshake", "after-register-sent", "torn-frame"]
)
async def test_reset_at_any_stage_leaves_nothing_behind(stage: str) -> None:
    async with open_server() as server:
        if stage == "partial-head":
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(b"GET /ws?token=test-key HTTP/1.1\r\nHost: loc")
            client = WireClient(stream)
        else:
            opened = await WireClient.open(server.port)
            assert isinstance(opened, WireClient)
            client = opened
            if stage == "after-register-sent":
                await client.send({"type": "register", "status": "ok", "client_id": "dev-1"})
            elif stage == "torn-frame":
                from wsproto.events import TextMessage

                data = client.ws.send(TextMessage(data=json.dumps({"type": "register"})))
                await client.stream.send_all(data[: len(data) // 2])
        await trio.sleep(0.01)
        client.reset()
        await wait_quiescent(server)
        # The id is free (nothing half-registered), and the server still serves newcomers.
        fresh, verdict = await WireClient.registered(server.port, "dev-1")
        assert verdict["status"] == "ok"
        await fresh.close()


# ----------------------------------------------------------------- half-open and stalled peers


async def test_half_open_device_is_detected_by_pings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """LIVE-1/2: a device that stops reading and answering is closed 1011 at ping + timeout,
    and the session it executed ends for its requester at that moment."""
    async with open_memory_server(ping_interval=20.0, ping_timeout=20.0) as mem:
        server = mem.server
        device = await memory_client(server)
        assert (await device.register("dev-1"))["status"] == "ok"
        registered_at = trio.current_time()
        const = await memory_client(server)
        assert (await const.register("c-1", "constellation", target_id="dev-1"))["status"] == "ok"
        await const.send(const_task("c-1", "dev-1", "c@1"))
        ack = await const.recv()
        assert isinstance(ack, dict)
        assert ack["type"] == "heartbeat"
        # From here on the device never reads again: no pongs, no frames. The constellation
        # keeps reading (and answering its own pings).
        end = await const.recv(within=100)
        assert isinstance(end, dict)
        assert (end["type"], end["error"]) == ("task_end", DEVICE_GONE)
        assert trio.current_time() - registered_at == 40.0
        assert server.registry.get("dev-1") is None
        http = memory_http(server)
        response = await http.request("GET", "/api/clients")
        assert response.json() == {"online_clients": ["c-1"]}


async def test_stalled_device_is_closed_4003_and_dispatch_gets_500(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """PROC-4: writes to a device that stopped reading wait on its send lock; once one has
    waited SEND_TIMEOUT the device is closed (4003) and every HTTP caller learns it (500): no
    caller is told 200 for a frame that never left the server."""
    caplog.set_level(logging.INFO, logger="ufo_trio")
    async with open_memory_server(send_timeout=30.0, ping_interval=0) as mem:
        server = mem.server
        device = await memory_client(server, lockstep=True)
        assert (await device.register("dev-1"))["status"] == "ok"
        await trio.testing.wait_all_tasks_blocked()  # REG-7: added just after the verdict
        entry = server.registry.get("dev-1")
        assert entry is not None
        # The device never reads again; with a lockstep stream nothing is buffered either.
        t0 = trio.current_time()
        statuses: list[tuple[float, int]] = []

        async def dispatch(n: int) -> None:
            http = memory_http(server)
            response = await http.request(
                "POST", "/api/dispatch", within=100,
                json_body={"request": "x", "client_id": "dev-1", "task_name": f"t-{n}"},
            )  # fmt: skip
            statuses.append((trio.current_time() - t0, response.status))

        async with trio.open_nursery() as nursery:
            for n in range(4):  # 1 being written, 3 waiting for the send lock
                nursery.start_soon(dispatch, n)
            await trio.sleep(1)
            # Everyone else is served meanwhile.
            health = await memory_http(server).request("GET", "/api/health")
            assert health.json() == {"status": "healthy", "online_clients": ["dev-1"]}
            assert trio.current_time() - t0 == 1.0
        assert sorted(statuses) == [(30.0, 500)] * 4
        assert entry.connection.close_code == 4003
        assert server.registry.get("dev-1") is None
    assert any("disconnected: send timeout" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- churn


async def _cycle(server: Server, n: int) -> None:
    """One connect/register/disconnect cycle; the kind of ending varies with n."""
    kind = n % 6
    port = server.port
    if kind == 5:  # plain HTTP, kept alive for two requests
        async with open_http(port) as http:
            assert (await http.request("GET", "/api/health")).status == 200
            assert (await http.request("GET", "/api/task_result/x")).status == 200
        return
    client = await WireClient.open(port)
    assert isinstance(client, WireClient)
    if kind == 4:  # handshake, then vanish before registering
        client.reset()
        return
    verdict = await client.register(f"churn-{n}")
    assert verdict["status"] == "ok", verdict
    if kind == 0:
        await client.close()
    elif kind == 1:
        client.reset()
    elif kind == 2:  # a live session, then the device drops
        await client.send(
            {"type": "task", "status": "continue", "client_id": f"churn-{n}",
             "session_id": f"churn-s-{n}", "request": PLAN}
        )  # fmt: skip
        frames = await client.recv_until(lambda f: f["type"] == "command")
        assert frames[0]["type"] == "heartbeat"
        client.reset()
    else:
        await client.send({"type": "heartbeat", "status": "ok"})
        ack = await client.recv()
        assert isinstance(ack, dict)
        assert ack["type"] == "heartbeat"
        await client.close()


async def test_churn_leaves_no_leaked_tasks_entries_or_fds() -> None:
    async with open_server() as server:
        for n in range(12):  # warm-up: lazy imports, caches, trio's own descriptors
            await _cycle(server, n)
        await wait_quiescent(server)
        close_leftovers()
        fds, tasks = fd_count(), task_count()
        limiter = trio.CapacityLimiter(8)

        async def one(n: int) -> None:
            async with limiter:
                await _cycle(server, n)

        async with trio.open_nursery() as nursery:
            for n in range(CHURN_CYCLES):
                nursery.start_soon(one, n)
        await wait_quiescent(server, within=30)
        close_leftovers()
        assert len(server.registry) == 0
        assert server.sessions.live == {}
        assert server.connections == set()
        assert server.open_streams == 0
        assert task_count() == tasks
        assert fd_count() == fds
        # Every session that was cut short is on record as failed.
        record = server.sessions.results.by_session_id("churn-s-2")
        assert record is not None
        assert (record.status, record.error) == ("failed", DEVICE_GONE)
        # And the server still works.
        fresh, verdict = await WireClient.registered(server.port, "after-churn")
        assert verdict["status"] == "ok"
        await fresh.close()
