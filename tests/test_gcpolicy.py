"""The server's garbage-collector policy (`_gcpolicy`, docs/performance.md "gcburst").

Survivors of each full collection are frozen, so the next full pass does not rescan the fleet;
the frozen set is thawed once it has doubled (and passed a floor), so cyclic garbage that died
while frozen is still collected. These tests run the hook in this process and restore the
collector (unfreeze, hook removed) afterwards.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import weakref
from typing import TYPE_CHECKING

import pytest
import trio
from process_helpers import WAIT, read_line
from wire_helpers import WireClient

from ufo_trio import _gcpolicy
from ufo_trio.testing import open_server

if TYPE_CHECKING:
    from collections.abc import Iterator


pytestmark = pytest.mark.skipif(
    not _gcpolicy.APPLIES, reason="CPython 3.14+: incremental collector, no hook"
)


@pytest.fixture
def policy() -> Iterator[_gcpolicy.FreezeSurvivors]:
    gc.collect()
    hook = _gcpolicy.install()
    assert hook is not None
    try:
        yield hook
    finally:
        _gcpolicy.uninstall(hook)
        gc.collect()


class Node:
    """A cycle member (a plain object: the collector tracks it)."""

    def __init__(self) -> None:
        self.other: Node | None = None


def make_cycle() -> Node:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


def test_survivors_of_a_full_collection_are_frozen(policy: _gcpolicy.FreezeSurvivors) -> None:
    """After a full pass, what survived is out of every later pass (not in gc.get_objects());
    without the policy it would still be in the old generation."""
    kept = [Node() for _ in range(200)]
    before = gc.get_freeze_count()
    gc.collect()
    assert gc.get_freeze_count() >= before + 200
    tracked = {id(o) for o in gc.get_objects()}
    assert not any(id(node) in tracked for node in kept)
    # Frozen objects freed by reference counting go at once: the frozen set shrinks.
    frozen = gc.get_freeze_count()
    del kept
    assert gc.get_freeze_count() <= frozen - 200


def test_cycles_that_die_while_frozen_are_collected_after_a_thaw(
    policy: _gcpolicy.FreezeSurvivors,
) -> None:
    """No leak: cycles frozen while alive and dropped later are collected once the frozen set
    has grown past the thaw floor; the garbage held never exceeds about the floor. Without the
    thaw every one of them would stay for good."""
    per_round = 2_000  # cycles per round, 4,000 objects
    alive: list[weakref.ref[Node]] = []
    most_alive = 0
    for _ in range(3 * _gcpolicy.THAW_MIN_OBJECTS // (2 * per_round)):  # ~3 floors' worth
        batch = [make_cycle() for _ in range(per_round)]
        gc.collect()  # survivors are frozen
        alive += [weakref.ref(n) for n in batch]
        del batch  # now cyclic garbage, frozen
        gc.collect()
        alive = [r for r in alive if r() is not None]
        most_alive = max(most_alive, len(alive))
    assert policy.thaws >= 1
    # Each cycle is two objects: garbage never held more than the floor (+ one round).
    assert most_alive * 2 <= _gcpolicy.THAW_MIN_OBJECTS + 2 * per_round
    assert len(alive) * 2 <= _gcpolicy.THAW_MIN_OBJECTS + 2 * per_round


async def test_connect_disconnect_cycles_do_not_grow_the_heap(
    policy: _gcpolicy.FreezeSurvivors, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Devices that register over TCP, get frozen by a full pass while connected, and leave,
    round after round, leave nothing behind: the objects the collector knows of (tracked +
    frozen) stay level once the server is warm. A connection's objects are freed by reference
    counting even while frozen, but wsproto's parser is a cycle (a generator that holds its
    FrameProtocol): ~8 objects per closed connection on each side stay frozen until a thaw. With
    the thaw floor lowered, churn goes on until the frozen set has doubled, and the thaw's full
    pass must bring the heap back. (Not over `MemoryServer`: in-memory stream pairs are cycles too.)"""
    monkeypatch.setattr(_gcpolicy, "THAW_MIN_OBJECTS", 3_000)
    async with open_server() as server:

        async def one_round(n: int) -> None:
            clients = []
            for i in range(50):
                client, verdict = await WireClient.registered(server.port, f"dev-{n}-{i}")
                assert verdict["type"] == "heartbeat", verdict
                clients.append(client)
            gc.collect()  # a full pass while they are connected: their objects are frozen
            for client in clients:
                await trio.aclose_forcefully(client.stream)
            del clients
            with trio.fail_after(WAIT):
                while server.connections or len(server.registry):
                    await trio.sleep(0.01)

        def heap() -> int:
            gc.collect()
            gc.collect()  # a thaw's full pass, if the first one asked for it
            return len(gc.get_objects()) + gc.get_freeze_count()

        for n in range(3):  # warm up (caches, pools, id pools; the first thaw)
            await one_round(n)
        warm = heap()
        thaws = policy.thaws
        grown = 0
        n = 3
        while policy.thaws == thaws:  # churn until the frozen set has doubled
            assert n < 200, f"no thaw after {n * 50} devices; {grown} objects held"
            before_thaw = grown
            await one_round(n)
            grown = heap() - warm
            n += 1
        devices = 50 * (n - 3)
        # Before the thaw, the closed connections' cycles were held (frozen) ...
        assert n > 4
        assert before_thaw > 8 * (devices - 50), (devices, before_thaw)
        # ... and the thaw's full pass collected them: what is left is under 2 objects per
        # device, as without the policy (closed client sockets of this test's own loop).
        assert heap() - warm < 2 * devices, (devices, heap() - warm)


def test_python_m_ufo_trio_installs_the_policy() -> None:
    """`python -m ufo_trio` freezes its start-up objects and installs the hook (seen from inside
    the process at exit, after a SIGTERM)."""
    prelude = (
        "import atexit, gc, json, runpy, sys\n"
        "atexit.register(lambda: print(json.dumps({'hooks': [type(c).__name__ for c in "
        "gc.callbacks], 'frozen': gc.get_freeze_count()}), flush=True))\n"
        "sys.argv = ['ufo_trio', '--port', '0', '--api-key', 'K', '--db', ':memory:']\n"
        "runpy.run_module('ufo_trio', run_name='__main__', alter_sys=True)\n"
    )

    async def main() -> list[str]:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", prelude],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert process.stdout is not None
        try:
            with trio.fail_after(WAIT):
                startup = await read_line(process.stdout)
                process.send_signal(signal.SIGTERM)
                rest = b""
                while chunk := await process.stdout.receive_some(4096):
                    rest += chunk
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
            await process.stdout.aclose()
        return [startup, rest.decode()]

    startup, rest = trio.run(main)
    assert "ufo_trio" in startup, startup
    report = json.loads(rest.strip().splitlines()[-1])
    assert "FreezeSurvivors" in report["hooks"], report
    assert report["frozen"] > 1_000, report
