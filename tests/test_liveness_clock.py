"""Timing rules under trio's MockClock (autojump): exact virtual times, no real waiting."""

from __future__ import annotations

import trio
import trio.testing

from ufo_trio.testing import open_memory_server


async def test_registration_deadline_reg1(autojump_clock: trio.testing.MockClock) -> None:
    """REG-1: silent socket → ERROR registration_timeout, close 1008, at exactly the deadline."""
    async with open_memory_server(registration_timeout=30.0) as mem:
        start = trio.current_time()
        client = await mem.connect()
        frame = await client.recv()
        assert trio.current_time() - start == 30.0
        assert frame["type"] == "error"
        assert frame["code"] == "registration_timeout"
        assert frame["error"] == "Registration timed out"
        reason = await client.closed()
        assert reason.code == 1008


async def test_ping_timeout_detects_silent_peer_live2(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """LIVE-1/2: a registered peer that stops answering pings is closed 1011 at interval+timeout."""
    async with open_memory_server(ping_interval=20.0, ping_timeout=20.0) as mem:
        client = await mem.connect()
        assert (await client.register("dev-1"))["status"] == "ok"
        registered_at = trio.current_time()
        # Stop the client's reader so pings go unanswered: a half-open peer.
        client.ws._reader_running = False
        with trio.fail_after(100):
            while mem.server.registry.get("dev-1") is not None:
                await trio.sleep(0.001)
        assert 40.0 <= trio.current_time() - registered_at < 40.01


async def test_heartbeat_timeout_live3(autojump_clock: trio.testing.MockClock) -> None:
    """LIVE-3: with --heartbeat-timeout, a peer that sends no data frame for that long is closed
    4002; every data frame pushes the deadline (control frames do not count)."""
    async with open_memory_server(ping_interval=0, heartbeat_timeout=300.0) as mem:
        client = await mem.connect()
        assert (await client.register("dev-1"))["status"] == "ok"
        t0 = trio.current_time()
        await trio.sleep(200)
        await client.send({"type": "heartbeat", "status": "ok", "client_id": "dev-1"})
        assert (await client.recv())["type"] == "heartbeat"
        reason = await client.closed()
        assert reason.code == 4002
        assert trio.current_time() - t0 == 500.0
        assert mem.server.registry.get("dev-1") is None


async def test_duplicate_probe_alive_peer_keeps_id_dup4(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """DUP-4: the old connection answers the probe ping → the newcomer gets DUP-2 at once."""
    async with open_memory_server(duplicate_policy="probe", ping_interval=0) as mem:
        old = await mem.connect()
        assert (await old.register("dev-1"))["status"] == "ok"
        new = await mem.connect()
        t0 = trio.current_time()
        verdict = await new.register("dev-1", "constellation")
        assert trio.current_time() == t0  # a pong comes back with no virtual delay
        assert verdict["type"] == "error"
        assert verdict["code"] == "duplicate_client_id"
        assert verdict["error"] == (
            "client_id 'dev-1' is already registered; duplicate registrations are not allowed"
        )
        assert (await new.closed()).code == 1008
        entry = mem.server.registry.get("dev-1")
        assert entry is not None
        assert entry.role.value == "device"
        await old.send({"type": "heartbeat", "status": "ok", "client_id": "dev-1"})
        assert (await old.recv())["status"] == "ok"


async def test_duplicate_probe_silent_peer_is_taken_over_dup4(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """DUP-4 / DUP-3: a silent old connection → after min(ping_timeout, 5 s) the newcomer is
    confirmed, the old one closed 4001, and its cleanup ran first."""
    async with open_memory_server(duplicate_policy="probe", ping_interval=0, ping_timeout=20) as mem:
        old = await mem.connect()
        assert (await old.register("dev-1"))["status"] == "ok"
        old_conn = mem.server.registry.get("dev-1")
        assert old_conn is not None
        old.ws._reader_running = False  # half-open: the old peer no longer reads or answers
        new = await mem.connect()
        t0 = trio.current_time()
        verdict = await new.register("dev-1")
        assert trio.current_time() - t0 == 5.0
        assert verdict["type"] == "heartbeat"
        assert verdict["status"] == "ok"
        assert old_conn.connection.finished.is_set()
        assert old_conn.connection.close_code == 4001
        entry = mem.server.registry.get("dev-1")
        assert entry is not None
        assert entry.connection is not old_conn.connection


async def test_connection_tasks_back_to_baseline(autojump_clock: trio.testing.MockClock) -> None:
    """DC-1: after register/disconnect cycles no connection task or registry entry is left."""
    async with open_memory_server(ping_interval=20) as mem:
        baseline = mem.connection_tasks()
        for i in range(20):
            client = await mem.connect()
            assert (await client.register(f"dev-{i}"))["status"] == "ok"
            await client.aclose()
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1)
        assert mem.connection_tasks() == baseline
        assert len(mem.server.registry) == 0
