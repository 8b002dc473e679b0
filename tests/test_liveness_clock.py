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
