"""WIRE-1 and AUTH-1(b) edge cases: numbers that overflow to infinity are not JSON, and an empty
API key can never authenticate anyone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trio

from ufo_trio import ConfigError, ServerConfig
from ufo_trio._codec import DecodeError, decode_client_message, encode_server_message
from ufo_trio._messages import ServerMessage, ServerMessageType, TaskStatus
from ufo_trio.testing import connect, open_server


def test_overflowing_number_is_not_json_wire1() -> None:
    frame = '{"type":"heartbeat","status":"ok","metadata":{"mem":1e999}}'
    with pytest.raises(DecodeError) as info:
        decode_client_message(frame)
    assert info.value.error == "Invalid message: not valid JSON"


def test_encoder_never_writes_infinity_wire3() -> None:
    msg = ServerMessage(
        type=ServerMessageType.TASK_END, status=TaskStatus.COMPLETED, result=float("inf")
    )
    with pytest.raises(ValueError, match="JSON"):
        encode_server_message(msg)


async def test_registration_with_overflowing_number_is_refused_reg2() -> None:
    """A REGISTER whose system_info holds 1e999 is not JSON: ERROR + 1008, nothing stored that
    could later go out as `Infinity` in a device_info_response."""
    async with open_server() as server, connect(server.url) as client:
        with trio.fail_after(10):
            await client.send(
                '{"type":"register","status":"ok","client_id":"d",'
                '"metadata":{"system_info":{"mem":1e999}}}'
            )
            verdict = await client.recv()
            assert (verdict["type"], verdict["error"]) == (
                "error",
                "Invalid message: not valid JSON",
            )
            assert (await client.closed()).code == 1008
        assert server.registry.online_ids() == []


@pytest.mark.parametrize("key", ["", "   "])
def test_empty_api_key_is_refused_auth1(key: str) -> None:
    with pytest.raises(ConfigError, match="api-key must not be empty"):
        ServerConfig(api_key=key)


def test_cli_empty_api_key_exits_2_with_one_line_ep3() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ufo_trio", "--port", "0", "--api-key=", "--db", ":memory:"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "api-key must not be empty" in lines[0]
    assert json.dumps(proc.stdout) == '""'
