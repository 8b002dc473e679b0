"""The command line, run as a real subprocess: `python -m ufo_trio` (EP-2, EP-3, CLAR-4, CLAR-5).

Every wait is bounded; the only fixed port is one this test has bound itself (busy port case).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
from process_helpers import WAIT, cli_process

from ufo_trio.testing import connect

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from ufo_trio.testing import RawClient

LINE = re.compile(
    r"ufo_trio (?P<version>\S+) listening on (?P<url>ws://127\.0\.0\.1:(?P<port>\d+)/ws)(?P<rest>.*)"
)


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any UFO_TRIO_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UFO_TRIO_")}
    env.update(extra)
    return env


class Running:
    def __init__(self, process: trio.Process, line: str, stderr: Path) -> None:
        self.process = process
        self.line = line
        self.stderr = stderr
        match = LINE.fullmatch(line)
        assert match is not None, (line, stderr.read_text())
        self.match = match
        self.url = match["url"]

    async def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        with trio.fail_after(WAIT):
            return await self.process.wait()


@asynccontextmanager
async def ufo_trio_process(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[Running]:
    """Start `python -m ufo_trio ARGS`, read its start-up line; kill it on exit if still up."""
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        env = env if env is not None else clean_env()
        async with cli_process(*args, env=env, stderr=err) as (process, line):
            yield Running(process, line, stderr)


async def register_and_heartbeat(client: RawClient) -> None:
    confirmation = await client.register("cli-dev", metadata={"platform": "linux"})
    assert (confirmation["type"], confirmation["status"]) == ("heartbeat", "ok")
    assert confirmation["protocol"] == "aip/1"
    await client.send({"type": "heartbeat", "status": "ok", "client_id": "cli-dev"})
    ack = await client.recv()
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok")


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


async def run_to_exit(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT):
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            [sys.executable, "-m", "ufo_trio", *args],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env if env is not None else clean_env(),
        )
    return result


def one_line(text: bytes) -> str:
    """EP-3: an error exit prints exactly one line and no traceback."""
    decoded = text.decode()
    assert decoded.endswith("\n"), decoded
    assert decoded.count("\n") == 1, decoded
    no_traceback(decoded)
    return decoded.strip()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_serve_registers_and_exits_0_on_signal_ep3_shut2(tmp_path: Path, signum: int) -> None:
    """EP-3: the start-up line names the version and the bound port; a raw-JSON client registers
    and is acked; SIGINT / SIGTERM close it with 1001 (SHUT-2) and the process exits 0 without
    a traceback."""
    async with ufo_trio_process(tmp_path, "--port", "0", "--api-key", "K") as server:
        assert server.match["version"] == importlib.metadata.version("ufo_trio")
        assert int(server.match["port"]) != 0
        assert server.match["rest"] == ""
        with trio.fail_after(WAIT):
            async with connect(server.url, token="K") as client:
                await register_and_heartbeat(client)
                server.process.send_signal(signum)
                assert (await client.closed()).code == 1001
            assert await server.process.wait() == 0
    no_traceback(server.stderr.read_text())


async def test_generated_api_key_is_printed_and_works_ep3(tmp_path: Path) -> None:
    """EP-2 / EP-3: with no key anywhere one is generated and printed at the end of the start-up
    line as ` (generated API key: <key>)`; that key authenticates."""
    async with ufo_trio_process(tmp_path, "--port", "0") as server:
        rest = re.fullmatch(
            r" \(generated API key: (?P<key>[A-Za-z0-9_-]{32,})\)", server.match["rest"]
        )
        assert rest is not None, server.line
        with trio.fail_after(WAIT):
            async with connect(server.url, token=rest["key"]) as client:
                await register_and_heartbeat(client)
        assert await server.stop(signal.SIGTERM) == 0


async def test_environment_variables_ep2(tmp_path: Path) -> None:
    """EP-2: `python -m ufo_trio serve` is the same as without `serve`, and every flag can come
    from UFO_TRIO_<NAME>: UFO_TRIO_PORT=0 picks a free port and UFO_TRIO_API_KEY is the key
    (so none is generated)."""
    env = clean_env(UFO_TRIO_PORT="0", UFO_TRIO_API_KEY="env-key")
    async with ufo_trio_process(tmp_path, "serve", env=env) as server:
        assert int(server.match["port"]) != 0
        assert server.match["rest"] == ""
        with trio.fail_after(WAIT):
            async with connect(server.url, token="env-key") as client:
                await register_and_heartbeat(client)
        assert await server.stop(signal.SIGINT) == 0


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--bogus"], {}),
        (["--port", "not-a-port"], {}),
        ([], {"UFO_TRIO_PORT": "not-a-port"}),
        (["--port", "0"], {"UFO_TRIO_PING_TIMEOUT": "soon"}),
    ],
    ids=["unknown-flag", "bad-port", "bad-env-port", "bad-env-seconds"],
)
async def test_bad_arguments_exit_2_ep3_clar4(args: list[str], env: dict[str, Any]) -> None:
    """EP-3 / CLAR-4: a bad flag or a bad UFO_TRIO_* value exits 2 with a one-line message on
    stderr, no traceback, and no start-up line."""
    result = await run_to_exit(*args, env=clean_env(**env))
    assert result.returncode == 2
    one_line(result.stderr)
    assert b"listening" not in result.stdout


async def test_busy_port_exits_1_ep3() -> None:
    """EP-3: if binding fails the process exits 1 with a one-line message and no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await run_to_exit("--host", "127.0.0.1", "--port", str(port), "--api-key", "K")
    assert result.returncode == 1
    assert str(port) in one_line(result.stderr)
    assert b"listening" not in result.stdout
