"""Log lines stay short and carry ids, never payloads (COMPAT-16, AUTH-3): client-supplied ids
are unbounded, so a log line shows only a cut `repr` of them."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import trio
import trio.testing

from ufo_trio.testing import open_memory_server

if TYPE_CHECKING:
    import pytest


async def test_huge_ids_and_payloads_stay_out_of_the_log(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ufo_trio")
    huge_id = "d" * 100_000
    secret = "SECRET-" + "s" * 1000
    async with open_memory_server(ping_interval=0) as mem:
        device = await mem.connect()
        assert (await device.register(huge_id))["status"] == "ok"
        plan = {"steps": [[{"tool_name": "echo", "tool_type": "action",
                            "parameters": {"api_key": secret}}]]}  # fmt: skip
        await device.send(
            {"type": "task", "status": "continue", "client_id": huge_id,
             "session_id": "t" * 50_000, "task_name": "n" * 50_000, "request": json.dumps(plan)}
        )  # fmt: skip
        assert (await device.recv())["type"] == "heartbeat"
        command = await device.recv()
        await device.send(
            {"type": "command_results", "status": "continue", "client_id": huge_id,
             "session_id": command["session_id"], "prev_response_id": command["response_id"],
             "action_results": [{"status": "success", "result": secret}]}
        )  # fmt: skip
        assert (await device.recv())["status"] == "completed"
        await device.aclose()
        await trio.testing.wait_all_tasks_blocked()
    messages = [record.getMessage() for record in caplog.records]
    assert any("registered" in m for m in messages)
    assert any("ended: completed" in m for m in messages)
    assert all(len(m) < 600 for m in messages), max(messages, key=len)[:300]
    assert not any("SECRET" in m for m in messages)
