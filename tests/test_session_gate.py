"""The session CPU gate (`_gate`, docs/architecture.md): at most N sessions run CPU segments at
once, in FIFO order; a slot is never held while a session waits for the model or the device, and
a session cancelled while it holds or waits for a slot gives it back and still ends with exactly
one TASK_END (CAN-2, DC-2, END-1).

Segments are simulated with sleeps on the virtual clock, so the times asserted are exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
import trio.testing
from llm_helpers import galaxy, linux_device, llm_server, register, scene, task_end

from ufo_trio import Command, ScriptAgent, ToolType
from ufo_trio._gate import SESSION_CPU_SLOTS, CpuGate
from ufo_trio.testing import FakeChatModel, FakeReply, FakeRequest, open_memory_server

if TYPE_CHECKING:
    from ufo_trio import SessionContext
    from ufo_trio.testing import RawClient

AGENT = f"{__name__}:factory"
DEVICE_GONE = "Task was cancelled because target device disconnected"

#: (virtual time, session id, "in" / "out") of every simulated CPU segment.
SEGMENTS: list[tuple[float, str, str]] = []


class GateAgent:
    """`cpu:<s>`: hold the gate for a CPU segment of s seconds (a sleep on the virtual clock),
    then return "done"; `hold`: take the gate and keep it until cancelled."""

    async def run(self, ctx: SessionContext) -> Any:
        if ctx.request.startswith("cpu:"):
            await ctx.hold_cpu()
            SEGMENTS.append((trio.current_time(), ctx.session_id, "in"))
            await trio.sleep(float(ctx.request.removeprefix("cpu:")))
            SEGMENTS.append((trio.current_time(), ctx.session_id, "out"))
            ctx.release_cpu()
            return "done"
        if ctx.request == "hold":
            await ctx.hold_cpu()
            await trio.sleep_forever()
        if ctx.request == "two-hold":  # two tasks of one session ask for the slot at once
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ctx.hold_cpu)
                nursery.start_soon(ctx.hold_cpu)
            held = ctx.cpu_held  # type: ignore[attr-defined]
            ctx.release_cpu()
            return {"held": held}
        if ctx.request == "parallel":  # two COMMANDs in flight while holding the slot
            await ctx.hold_cpu()
            async with trio.open_nursery() as nursery:
                for name in ("first", "second"):
                    nursery.start_soon(ctx.execute, [Command(tool_name=name, tool_type=ToolType.ACTION)])
            held = ctx.cpu_held  # type: ignore[attr-defined]  # Session's own flag
            ctx.release_cpu()
            return {"held after both": held}
        return await ScriptAgent().run(ctx)


def factory(platform: str) -> GateAgent:
    return GateAgent()


async def send_task(requester: RawClient, device_id: str, session_id: str, request: str) -> None:
    await requester.send(
        {
            "type": "task",
            "status": "continue",
            "client_type": "constellation",
            "client_id": f"galaxy@{device_id}",
            "target_id": device_id,
            "session_id": session_id,
            "task_name": session_id,
            "request": request,
        }
    )


async def no_more_frames(client: RawClient, seconds: float = 100) -> None:
    with trio.move_on_after(seconds):
        frame = await client.recv()
        raise AssertionError(f"unexpected frame {frame}")


async def test_gate_admits_n_segments_at_a_time_in_fifo_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    SEGMENTS.clear()
    n = SESSION_CPU_SLOTS
    count = 2 * n + 1
    async with open_memory_server(agent=AGENT) as mem:
        dev = await register(mem, "dev-1", metadata={"platform": "linux"})
        requester = await galaxy(mem)
        start = trio.current_time()
        for i in range(count):
            await send_task(requester, "dev-1", f"s-{i}", "cpu:1")
        ends: dict[str, float] = {}
        while len(ends) < count:
            with trio.fail_after(60):  # a slot never given back: fail, not hang
                frame = await requester.recv()
            if frame["type"] == "task_end":
                assert frame["status"] == "completed", frame
                assert frame["session_id"] not in ends
                ends[frame["session_id"]] = trio.current_time() - start
        # n segments per virtual second, in the order the TASKs came.
        assert ends == {f"s-{i}": 1.0 + i // n for i in range(count)}
        # (Sessions let in at the same instant run in either order: trio shuffles a batch.)
        entered = {sid: at - start for at, sid, kind in SEGMENTS if kind == "in"}
        assert entered == {f"s-{i}": float(i // n) for i in range(count)}
        inside = peak = 0
        for _, _, kind in sorted(SEGMENTS, key=lambda s: (s[0], s[2] == "in")):
            inside += 1 if kind == "in" else -1
            peak = max(peak, inside)
        assert peak == n
        assert mem.server.sessions.gate.held == 0
        await no_more_frames(requester)
        del dev


async def test_dropped_devices_give_back_their_slot_and_each_requester_hears_one_task_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One slot: session A holds it, B waits for it. B's device drops (B cancelled while
    waiting), then A's (A cancelled while holding): each requester hears exactly one TASK_END at
    the instant of its drop, and the slot is free again for C."""
    async with open_memory_server(agent=AGENT) as mem:
        gate = mem.server.sessions.gate = CpuGate(1)
        dev_a = await register(mem, "dev-a", metadata={"platform": "linux"})
        dev_b = await register(mem, "dev-b", metadata={"platform": "linux"})
        req_a = await galaxy(mem, "dev-a")
        req_b = await galaxy(mem, "dev-b")
        await send_task(req_a, "dev-a", "a", "hold")
        assert (await req_a.recv())["type"] == "heartbeat"  # the ACK
        await send_task(req_b, "dev-b", "b", "cpu:1")
        assert (await req_b.recv())["type"] == "heartbeat"
        await trio.sleep(5)
        assert (gate.held, gate.waiting) == (1, 1)

        dropped = trio.current_time()
        await trio.aclose_forcefully(dev_b.ws._stream)
        with trio.fail_after(60):
            end_b = await task_end(req_b)
        assert trio.current_time() == dropped
        assert (end_b["session_id"], end_b["status"], end_b["error"]) == ("b", "failed", DEVICE_GONE)
        assert (gate.held, gate.waiting) == (1, 0)

        await trio.sleep(5)
        dropped = trio.current_time()
        await trio.aclose_forcefully(dev_a.ws._stream)
        with trio.fail_after(60):
            end_a = await task_end(req_a)
        assert trio.current_time() == dropped
        assert (end_a["session_id"], end_a["error"]) == ("a", DEVICE_GONE)
        assert (gate.held, gate.waiting) == (0, 0)
        assert mem.server.sessions.live == {}

        dev_c = await register(mem, "dev-c", metadata={"platform": "linux"})
        req_c = await galaxy(mem, "dev-c")
        started = trio.current_time()
        await send_task(req_c, "dev-c", "c", "cpu:1")
        with trio.fail_after(60):
            end_c = await task_end(req_c)
        assert (end_c["status"], trio.current_time() - started) == ("completed", 1.0)
        for requester in (req_a, req_b, req_c):
            await no_more_frames(requester, 10)
        del dev_c


async def test_two_commands_in_flight_share_the_session_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An agent holding the slot with two `execute`s in flight: both give it back while the
    device works and the session gets one slot (not two) back for the results."""
    async with open_memory_server(agent=AGENT) as mem, trio.open_nursery() as nursery:
        gate = mem.server.sessions.gate
        dev = await register(mem, "dev-1", metadata={"platform": "linux"})
        results: list[dict[str, Any]] = []

        async def answer() -> None:
            while len(results) < 2:  # both COMMANDs out, then a second of device work
                frame = await dev.recv()
                if frame["type"] == "command":
                    results.append(frame)
            await trio.sleep(1)
            assert (gate.held, gate.waiting) == (0, 0)
            for frame in results:
                await dev.send(
                    {
                        "type": "command_results",
                        "status": "continue",
                        "client_type": "device",
                        "client_id": "dev-1",
                        "session_id": frame["session_id"],
                        "action_results": [
                            {"status": "success", "call_id": a["call_id"], "result": "ok"}
                            for a in frame["actions"]
                        ],
                        "prev_response_id": frame["response_id"],
                    }
                )
            await trio.sleep_forever()

        nursery.start_soon(answer)
        requester = await galaxy(mem)
        await send_task(requester, "dev-1", "p", "parallel")
        with trio.fail_after(60):
            end = await task_end(requester)
        assert (end["status"], end["result"]) == ("completed", {"held after both": True})
        assert len(results) == 2
        assert (gate.held, gate.waiting) == (0, 0)
        nursery.cancel_scope.cancel()


async def test_two_tasks_of_one_session_queue_once_for_the_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(agent=AGENT) as mem:
        gate = mem.server.sessions.gate = CpuGate(1)
        dev_a = await register(mem, "dev-a", metadata={"platform": "linux"})
        dev_b = await register(mem, "dev-b", metadata={"platform": "linux"})
        req_a = await galaxy(mem, "dev-a")
        req_b = await galaxy(mem, "dev-b")
        await send_task(req_a, "dev-a", "a", "hold")
        await send_task(req_b, "dev-b", "b", "two-hold")
        await trio.sleep(5)
        assert (gate.held, gate.waiting) == (1, 1)  # b queued once
        freed = trio.current_time()
        await trio.aclose_forcefully(dev_a.ws._stream)
        with trio.fail_after(60):
            end = await task_end(req_b)
        assert (end["status"], end["result"]) == ("completed", {"held": True})
        assert trio.current_time() == freed
        assert (gate.held, gate.waiting) == (0, 0)
        del dev_b, req_a


def call_then_answer(request: FakeRequest) -> FakeReply:
    if any(m.get("role") == "tool" for m in request.messages):
        return FakeReply.answer("done")
    return FakeReply.call("execute_command", {"command": "ls"})


async def test_llm_sessions_hold_no_slot_while_the_model_or_the_device_works(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Three llm tasks on a one-slot gate: while their model calls are in flight, and while
    the device holds their COMMANDs, no slot is held; all three complete, one TASK_END each."""
    model = FakeChatModel(rule=call_then_answer, delay=10)
    async with llm_server(model) as mem, trio.open_nursery() as nursery:
        gate = mem.server.sessions.gate = CpuGate(1)
        dev = await linux_device(mem)
        release = trio.Event()

        async def slow_device() -> None:
            # The device holds the COMMANDs of the tool step until `release`.
            while True:
                frame = await dev.recv()
                if frame["type"] != "command":
                    continue
                if frame["actions"][0]["tool_name"] != "list_tools":
                    await release.wait()
                await forward(frame)

        async def forward(frame: dict[str, Any]) -> None:
            results = [
                {
                    "status": "success",
                    "call_id": a["call_id"],
                    "result": [] if a["tool_name"] != "list_tools" else LINUX,
                }
                for a in frame["actions"]
            ]
            await dev.send(
                {
                    "type": "command_results",
                    "status": "continue",
                    "client_type": "device",
                    "client_id": "dev-1",
                    "session_id": frame["session_id"],
                    "action_results": results,
                    "prev_response_id": frame["response_id"],
                }
            )

        nursery.start_soon(slow_device)
        requester = await galaxy(mem)
        for i in range(3):
            await send_task(requester, "dev-1", f"s-{i}", "list the files")
        await trio.sleep(5)  # every model call in flight (they answer at 10 s)
        assert len(model.requests) == 3
        assert (gate.held, gate.waiting) == (0, 0)
        await trio.sleep(10)  # the tool COMMANDs are out; the device sits on them
        assert (gate.held, gate.waiting) == (0, 0)
        release.set()
        ends = {}
        while len(ends) < 3:
            with trio.fail_after(60):
                frame = await requester.recv()
            if frame["type"] == "task_end":
                assert frame["session_id"] not in ends
                ends[frame["session_id"]] = frame
        assert {sid: e["status"] for sid, e in ends.items()} == {
            f"s-{i}": "completed" for i in range(3)
        }
        assert (gate.held, gate.waiting) == (0, 0)
        await no_more_frames(requester, 10)
        nursery.cancel_scope.cancel()


LINUX = [
    {
        "tool_key": "action::execute_command",
        "tool_name": "execute_command",
        "namespace": "BashExecutor",
        "tool_type": "action",
        "description": "Run a shell command.",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
        "output_schema": {"type": "object", "properties": {}},
    }
]


async def test_one_llm_task_through_the_gate_is_not_slower(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lone session never waits: the task takes exactly its two model delays."""
    model = FakeChatModel(rule=call_then_answer, delay=3)
    async with scene(model) as (_mem, _dev, requester):
        started = trio.current_time()
        await send_task(requester, "dev-1", "s-1", "list the files")
        with trio.fail_after(60):
            end = await task_end(requester)
        assert end["status"] == "completed"
        assert trio.current_time() - started == 6.0

