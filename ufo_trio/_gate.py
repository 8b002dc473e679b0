"""The session CPU gate: at most N sessions run their CPU-heavy segments at a time (FIFO).

Why (docs/performance.md, "hbgate"): Trio runs every task made runnable by one I/O poll in one
batch. When hundreds of llm sessions are woken together (their model answers land within a few
milliseconds of each other), one batch holds all their post-answer work (parse the reply, record
the turn, build and send the COMMAND), and a heartbeat that arrives meanwhile waits for all of
it, a few times over (socket → trio-websocket reader → handler). With the gate, a session takes
a slot before such a segment and gives it back as the segment's output goes out; the
others wait in FIFO order, so a batch holds at most about N segments, and control traffic
(heartbeats, registrations, device frames), which never takes the gate, waits behind at most
those.

Rules for holders (`Session.hold_cpu` / `release_cpu` keep them):

* hold it only for CPU work: never across an await on the network (the model, the device; the
  COMMAND write is done just after giving it back, in the same task step) nor a sleep (retry
  back-off);
* give it back on every way out (cancellation included): the session's `finally` releases it.

The gate has no task of its own: the `SessionManager` creates it and lends it to its sessions.
"""

from __future__ import annotations

from typing import Final

import trio

#: Slots of the gate. Measured (bench llm-concurrent, docs/performance.md): heartbeat p99 during
#: the model rounds 13-19 ms with 1 or 2 slots, 20-29 with 4, 30-33 with 8, 56-61 with 16, 86
#: without the gate; the same wall time for 1-16. Two, not one, so a session whose segment waits
#: for the task-history queue does not stop every other one. A lone session never waits.
SESSION_CPU_SLOTS: Final = 2


class CpuGate:
    """A fair (FIFO) gate of `slots` slots; each holder is one session (the borrower)."""

    __slots__ = ("_limiter",)

    def __init__(self, slots: int = SESSION_CPU_SLOTS) -> None:
        # trio's CapacityLimiter is FIFO: a release hands the slot straight to the longest waiter.
        self._limiter = trio.CapacityLimiter(slots)

    async def acquire(self, holder: object) -> None:
        """Wait for a slot (FIFO) for `holder`; a checkpoint even when one is free."""
        await self._limiter.acquire_on_behalf_of(holder)

    def release(self, holder: object) -> None:
        self._limiter.release_on_behalf_of(holder)

    @property
    def slots(self) -> int:
        return int(self._limiter.total_tokens)

    @property
    def held(self) -> int:
        """Slots in use now."""
        return self._limiter.borrowed_tokens

    @property
    def waiting(self) -> int:
        """Holders waiting for a slot."""
        return self._limiter.statistics().tasks_waiting
