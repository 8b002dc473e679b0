"""Test agents (AGENT-1) and raw-JSON helpers shared by the session tests.

The server loads agents by `module:callable` (AGENT-1), so this module must be importable by
name; tests pass `agent=AGENT` (the spec string of `factory` below).

`factory` returns the built-in script agent unless the TASK's `request` starts with one of the
markers below, so one server can run scripted sessions next to misbehaving agents:

* `return-ctx`          returns the SessionContext fields (AGENT-2);
* `value:<json>`        returns the decoded JSON value (END-4 row 1);
* `task-failed:<e>`     raises `TaskFailed(e, {"partial": True})` (END-4 row 2);
* `raise:<text>`        raises `RuntimeError(text)`; `raise:` raises `ValueError()` (END-4 row 3);
* `unserialisable`      returns a value JSON cannot encode (END-4 row 4);
* `gate`                blocks until cancelled, then stays blocked (shielded) until `GATE` is set:
                        a session whose cancellation takes as long as the test wants;
* `parallel`            two `execute` calls outstanding at once (AGENT-3).

`factory` raises `UnsupportedPlatform` for the platform `UNSUPPORTED` (TASK-7) and records every
call in `FACTORY_CALLS`, so tests can check that a rejected TASK never reached it ("no session").
"""

from __future__ import annotations

import json
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket

from ufo_trio import Agent, Command, ScriptAgent, TaskFailed, ToolType, UnsupportedPlatform
from ufo_trio.testing import connect, open_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ufo_trio import Server, SessionContext
    from ufo_trio.testing import RawClient

AGENT = f"{__name__}:factory"
UNSUPPORTED = "plan9"

#: Platforms the factory was called with, in order (reset by tests that look at it).
FACTORY_CALLS: list[str] = []


class _Gate:
    """A `trio.Event` created lazily inside the running trio loop of the current test."""

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    @property
    def event(self) -> trio.Event:
        if self._event is None:
            self._event = trio.Event()
        return self._event

    def reset(self) -> None:
        self._event = None

    def set(self) -> None:
        self.event.set()


GATE = _Gate()


class _Unserialisable:
    def __repr__(self) -> str:
        return "<unserialisable>"


class TestAgent:
    __test__ = False  # not a pytest test class

    async def run(self, ctx: SessionContext) -> Any:
        request = ctx.request
        if request == "return-ctx":
            return {
                "session_id": ctx.session_id,
                "task_name": ctx.task_name,
                "request": ctx.request,
                "platform": ctx.platform,
                "requester_id": ctx.requester_id,
                "requester_type": ctx.requester_type,
                "executor_id": ctx.executor_id,
            }
        if request.startswith("value:"):
            return json.loads(request.removeprefix("value:"))
        if request.startswith("task-failed:"):
            raise TaskFailed(request.removeprefix("task-failed:"), {"partial": True})
        if request.startswith("raise:"):
            text = request.removeprefix("raise:")
            raise RuntimeError(text) if text else ValueError()
        if request == "unserialisable":
            return {"ok": [1, 2, _Unserialisable()]}
        if request == "gate":
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await GATE.event.wait()
        if request == "parallel":
            results: dict[str, Any] = {}

            async def one(name: str) -> None:
                out = await ctx.execute(
                    [Command(tool_name=name, tool_type=ToolType.ACTION)]
                )
                results[name] = out[0].result

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "first")
                nursery.start_soon(one, "second")
            return results
        return await ScriptAgent().run(ctx)


def factory(platform: str) -> Agent:
    FACTORY_CALLS.append(platform)
    if platform == UNSUPPORTED:
        raise UnsupportedPlatform(platform)
    return TestAgent()


# ---------------------------------------------------------------------------- raw JSON helpers

DEVICE_GONE = "Task was cancelled because target device disconnected"
REQUESTER_GONE = "Task was cancelled because the requesting client disconnected"
SHUTTING_DOWN = "Server shutting down"


def cmd(tool_name: str, tool_type: str = "action", **parameters: Any) -> dict[str, Any]:
    command: dict[str, Any] = {"tool_name": tool_name, "tool_type": tool_type}
    if parameters:
        command["parameters"] = parameters
    return command


def plan(*steps: list[dict[str, Any]], **extra: Any) -> str:
    """The script agent's request text (SCRIPT-1)."""
    return json.dumps({"steps": list(steps), **extra})


ONE_STEP = plan([cmd("list_tools")])
NO_STEPS = plan()


def device_task(client_id: str, request: str = ONE_STEP, **fields: Any) -> dict[str, Any]:
    return {
        "type": "task",
        "status": "continue",
        "client_type": "device",
        "client_id": client_id,
        "request": request,
        **fields,
    }


def constellation_task(
    client_id: str, target_id: str | None, request: str = ONE_STEP, **fields: Any
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "task",
        "status": "continue",
        "client_type": "constellation",
        "client_id": client_id,
        "request": request,
        **fields,
    }
    if target_id is not None:
        frame["target_id"] = target_id
    return frame


def answer(
    command: dict[str, Any],
    client_id: str,
    statuses: list[str] | None = None,
    *,
    errors: list[str | None] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """COMMAND_RESULTS for a COMMAND the way the real device builds them (COMPAT-10, §1.4)."""
    actions = command["actions"]
    statuses = statuses or ["success"] * len(actions)
    errors = errors or [None] * len(actions)
    results = [
        {
            "status": status,
            "error": error,
            "result": f"ran {action['tool_name']}" if status == "success" else None,
            "namespace": "FakeExecutor",
            "call_id": action["call_id"],
        }
        for action, status, error in zip(actions, statuses, errors, strict=True)
    ]
    return {
        "type": "command_results",
        "status": command["status"],
        "client_type": "device",
        "client_id": client_id,
        "session_id": command["session_id"],
        "prev_response_id": command["response_id"],
        "action_results": results,
        "request_id": str(uuid.uuid4()),
        **fields,
    }


HEARTBEAT_PROBE = "barrier"


async def barrier(client: RawClient, client_type: str = "device") -> list[dict[str, Any]]:
    """Send a heartbeat and return every frame received before its ack (PROC-2 ordering).

    Anything the server queued for this connection before it handled the heartbeat arrives
    before the ack, so an empty list means "nothing was pending".
    """
    await client.send(
        {"type": "heartbeat", "status": "ok", "client_type": client_type,
         "request_id": HEARTBEAT_PROBE}
    )
    before: list[dict[str, Any]] = []
    while True:
        frame = await client.recv()
        if frame["type"] == "heartbeat" and frame["session_id"] is None and frame.get(
            "protocol"
        ) is None and frame["status"] == "ok":
            return before
        before.append(frame)


async def frames_until_closed(client: RawClient) -> tuple[list[dict[str, Any]], int]:
    """Every frame the server sends until it closes the connection, and the close code."""
    frames: list[dict[str, Any]] = []
    while True:
        try:
            frames.append(await client.recv())
            continue
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
        if reason is None:
            raise AssertionError("closed without a reason")
        return frames, reason.code


# ------------------------------------------------------------------------ real-socket peers


@asynccontextmanager
async def world(guard: float = 10.0, **overrides: Any) -> AsyncIterator[World]:
    """A real server on 127.0.0.1:0 plus a place to keep raw clients, all under `fail_after`."""
    with trio.fail_after(guard):
        async with open_server(**overrides) as server, AsyncExitStack() as stack:
            yield World(server, stack)


@asynccontextmanager
async def _client(url: str) -> AsyncIterator[RawClient]:
    """`ufo_trio.testing.connect`, plus closing the TCP stream at the end.

    trio-websocket's client leaves its socket open when the *server* closes first (its reader
    stops at EOF without closing the stream, and `aclose()` then returns early), which would
    trip `filterwarnings=error` with a ResourceWarning.
    """
    async with connect(url) as client:
        try:
            yield client
        finally:
            with trio.move_on_after(5.0, shield=True):
                await client.ws.aclose()
                await trio.aclose_forcefully(client.ws._stream)


class World:
    """A running server and the raw clients a test opened against it."""

    __test__ = False

    def __init__(self, server: Server, stack: AsyncExitStack) -> None:
        self.server = server
        self._stack = stack

    async def connect(self) -> RawClient:
        return await self._stack.enter_async_context(_client(self.server.url))

    async def join(
        self, client_id: str, client_type: str = "device", **fields: Any
    ) -> RawClient:
        """Connect and register; the verdict must be the confirmation (REG-7)."""
        client = await self.connect()
        verdict = await client.register(client_id, client_type, **fields)
        assert (verdict["type"], verdict["status"]) == ("heartbeat", "ok"), verdict
        return client

    async def device(self, client_id: str, platform: str | None = "linux") -> RawClient:
        metadata = {"platform": platform} if platform is not None else None
        return await self.join(client_id, metadata=metadata)

    async def gone(self, client_id: str) -> None:
        """Wait (event-driven, no polling) until `client_id`'s connection has been cleaned up."""
        entry = self.server.registry.get(client_id)
        if entry is not None:
            await entry.connection.finished.wait()
