"""A requester that is closed while its session is being started (TASK-8): the device gets no
COMMAND, and the one TASK_END it gets names the real cause (CAN-1), not a shutdown."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio
import trio.testing

from ufo_trio._connection import Connection
from ufo_trio._errors import ConnectionGone
from ufo_trio._messages import ServerMessage, ServerMessageType
from ufo_trio.testing import open_memory_server

if TYPE_CHECKING:
    import pytest

PLAN = json.dumps({"steps": [[{"tool_name": "x", "tool_type": "action"}]]})


async def test_requester_closed_during_session_start_can1(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_send = Connection.send

    async def ack_times_out(self: Connection, msg: ServerMessage) -> None:
        # The ACK write to the constellation fails as a PROC-4 send timeout would.
        if msg.type is ServerMessageType.HEARTBEAT and msg.session_id and self.client_id == "g":
            self.close(4003, "send timeout", abort=True)
            raise ConnectionGone(self.label)
        await real_send(self, msg)

    monkeypatch.setattr(Connection, "send", ack_times_out)
    async with open_memory_server(ping_interval=0) as mem:
        device = await mem.connect()
        assert (await device.register("dev-1"))["status"] == "ok"
        constellation = await mem.connect()
        verdict = await constellation.register("g", "constellation", target_id="dev-1")
        assert verdict["status"] == "ok"
        task: dict[str, Any] = {
            "type": "task", "status": "continue", "client_type": "constellation",
            "client_id": "g", "target_id": "dev-1", "session_id": "s1", "request": PLAN,
        }  # fmt: skip
        await constellation.send(task)
        frame = await device.recv()
        assert (frame["type"], frame["status"], frame["session_id"]) == ("task_end", "failed", "s1")
        assert frame["error"] == "Task was cancelled because the requesting client disconnected"
        record = mem.server.sessions.results.by_session_id("s1")
        assert record is not None
        assert record.error == frame["error"]
        await trio.testing.wait_all_tasks_blocked()
        assert mem.server.sessions.live == {}
