"""PROC-2 on the write path: frames never interleave, even when a large frame is written only
partly by the non-blocking fast path and the rest waits for the peer to read."""

from __future__ import annotations

import json

import trio

from ufo_trio.testing import connect, open_server

BIG = 8 * 1024 * 1024  # far more than a loopback socket buffer holds


async def test_large_command_and_ack_do_not_interleave_proc2() -> None:
    """A COMMAND of 8 MiB is queued to a device that is not reading yet; the device then sends a
    heartbeat whose ack must wait for the send lock. Reading afterwards, the device gets the
    whole COMMAND, intact, then the ack."""
    async with (
        open_server(ping_interval=0, message_rate=0) as server,
        connect(server.url) as device,
        connect(server.url) as constellation,
    ):
        with trio.fail_after(30):
            assert (await device.register("dev-1", metadata={"platform": "linux"}))["status"] == "ok"
            verdict = await constellation.register("c-1", "constellation", target_id="dev-1")
            assert verdict["status"] == "ok"
            plan = {
                "steps": [
                    [
                        {
                            "tool_name": "echo",
                            "tool_type": "action",
                            "parameters": {"blob": "x" * BIG},
                        }
                    ]
                ]
            }
            await constellation.send(
                {
                    "type": "task",
                    "status": "continue",
                    "client_type": "constellation",
                    "client_id": "c-1",
                    "target_id": "dev-1",
                    "session_id": "s-big",
                    "request": json.dumps(plan),
                }
            )
            ack = await constellation.recv()
            assert (ack["type"], ack["session_id"]) == ("heartbeat", "s-big")
            await device.send({"type": "heartbeat", "status": "ok", "client_id": "dev-1"})
            command = await device.recv()
            assert command["type"] == "command"
            assert len(command["actions"][0]["parameters"]["blob"]) == BIG
            heartbeat_ack = await device.recv()
            assert (heartbeat_ack["type"], heartbeat_ack["session_id"]) == ("heartbeat", None)
            await device.send(
                {
                    "type": "command_results",
                    "status": "continue",
                    "client_id": "dev-1",
                    "session_id": "s-big",
                    "prev_response_id": command["response_id"],
                    "action_results": [{"status": "success", "result": "ok"}],
                }
            )
            end = await constellation.recv()
            assert (end["type"], end["status"]) == ("task_end", "completed")
