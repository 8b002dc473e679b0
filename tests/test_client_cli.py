"""The ``device``, ``task`` and ``clients`` subcommands.

`task` and `clients` run in a worker thread (each subcommand calls `trio.run` itself) against a
server in the test's own Trio run; `device` needs the main thread for its signal handling, so
it runs as a real process. All of these use the real clock: a thread or a process cannot
follow a mock clock.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from process_helpers import cli_process

from ufo_trio import ServerConfig, serve
from ufo_trio.client import default_tools, list_clients, open_device
from ufo_trio.client._cli import add_subcommands, load_tools, main
from ufo_trio.client._errors import AuthenticationFailed
from ufo_trio.client._http import ApiUnavailable

KEY = "cli-key"
ROOT = Path(__file__).resolve().parent.parent


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ufo-trio")
    add_subcommands(p.add_subparsers(dest="command", required=True))
    return p


def run_cli(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


async def start_server(nursery: trio.Nursery) -> Any:
    return await nursery.start(serve, ServerConfig(host="127.0.0.1", port=0, api_key=KEY))


# ------------------------------------------------------------------------------- parsing


def test_subcommands_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parser().parse_args(["device", "--id", "d1", "--allow-command", "ls",
                                "--allow-command", "git", "--root", "."])
    assert args.client_id == "d1"
    assert args.allow_command == ["ls", "git"]
    assert args.root == "."
    assert args.url is None
    assert callable(args.func)
    args = parser().parse_args(["task", "--target", "d1", "[]", "@plan.json"])
    assert args.plans == ["[]", "@plan.json"]
    assert callable(parser().parse_args(["clients"]).func)
    with pytest.raises(SystemExit):
        parser().parse_args(["device"])  # --id is required


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["task", "--target", "d", "[[{"], "ufo_trio task: error: bad plan: plan is not valid JSON"),
        (["task", "--target", "d", "{}"], "ufo_trio task: error: bad plan: 'steps' must be a list"),
        (["task", "--target", "d", "@/nonexistent/plan.json"],
         "ufo_trio task: error: bad plan: cannot read plan file '/nonexistent/plan.json'"),
        (["task", "--target", "d", "--url", "http://x/ws", "[]"],
         "ufo_trio task: error: server URL must start with ws:// or wss://"),
        (["device", "--id", "d", "--root", "/nonexistent-dir"],
         "ufo_trio device: error: tool root '/nonexistent-dir' is not a directory"),
        (["device", "--id", "d", "--tools", "nocolon"],
         "ufo_trio device: error: --tools expects MODULE:NAME"),
        (["device", "--id", "d", "--tools", "json:dumps"],
         "ufo_trio device: error: --tools json:dumps: 'dumps' is not a ufo_trio.client.ToolRegistry"),
        (["device", "--id", "d", "--tools", "no_such_module_x:tools"],
         "ufo_trio device: error: --tools no_such_module_x:tools: cannot import"),
        (["clients", "--url", "ws://:1/ws"], "ufo_trio clients: error: server URL has no host"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_load_tools_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "mytools.py").write_text(
        "from ufo_trio.client import ToolRegistry\n"
        "tools = ToolRegistry()\n"
        "@tools.tool('hello')\n"
        "def hello(name: str) -> str:\n"
        "    return 'hello ' + name\n",
        encoding="utf-8",
    )
    assert load_tools(f"{tmp_path / 'mytools.py'}:tools").names() == ["hello"]


def test_standalone_entry_point_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "device" in capsys.readouterr().out


# ------------------------------------------------------------------------------- task


async def test_task_prints_outcomes_and_exit_status(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server = await start_server(nursery)
    tools = default_tools()

    @tools.tool("boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(
        json.dumps({"steps": [[{"tool_name": "echo", "parameters": {"text": "from file"}}]]}),
        encoding="utf-8",
    )
    common = ["--url", server.url, "--api-key", KEY, "--target", "dev-1"]
    async with open_device(server.url, "dev-1", api_key=KEY, tools=tools):
        ok = await trio.to_thread.run_sync(
            run_cli,
            ["task", *common, "--task-name", "greet", '[{"tool_name":"echo","parameters":{"text":"hi"}}]',
             f"@{plan_file}"],
        )
        out = capsys.readouterr().out
        assert ok == 0
        assert "completed: greet-1 (session " in out
        assert "completed: greet-2 (session " in out
        assert '  step 0 echo: success "hi"' in out
        assert '  step 0 echo: success "from file"' in out

        failed = await trio.to_thread.run_sync(
            run_cli, ["task", *common, "--json", '[[{"tool_name":"boom"},{"tool_name":"echo"}]]']
        )
        outcome = json.loads(capsys.readouterr().out)
        assert failed == 1
        assert outcome["status"] == "failed"
        assert outcome["error"] == "step 0 failed: RuntimeError: kaput"
        assert [r["status"] for r in outcome["result"][0]["results"]] == ["failure", "skipped"]

        raw = await trio.to_thread.run_sync(run_cli, ["task", *common, "--raw", "not a plan"])
        captured = capsys.readouterr()
        assert raw == 1
        assert "error: script agent: request is not valid JSON" in captured.out


async def test_task_against_a_missing_device_or_with_a_wrong_key(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_server(nursery)
    code = await trio.to_thread.run_sync(
        run_cli, ["task", "--url", server.url, "--api-key", KEY, "--target", "ghost", "[]"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err == (
        "ufo_trio task: error: registration of 'cli-" + err.split("'cli-")[1].split("'")[0]
        + "' refused by the server: Target device 'ghost' is not connected (unknown_target)\n"
    )
    code = await trio.to_thread.run_sync(
        run_cli, ["task", "--url", server.url, "--api-key", "nope", "--target", "ghost", "[]"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"ufo_trio task: error: {server.url} refused the connection (HTTP 403)")


async def test_api_key_from_the_environment(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(nursery)
    monkeypatch.setenv("UFO_TRIO_API_KEY", KEY)
    monkeypatch.setenv("UFO_TRIO_URL", server.url)
    async with open_device(server.url, "dev-1", api_key=KEY):
        code = await trio.to_thread.run_sync(
            run_cli, ["task", "--target", "dev-1", '[{"tool_name":"echo","parameters":{"text":"x"}}]']
        )
    assert code == 0
    assert "completed" in capsys.readouterr().out


# ------------------------------------------------------------------------------- clients


async def fake_http(nursery: trio.Nursery, status: int, body: Any, seen: list[bytes]) -> int:
    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        seen.append(request)
        payload = json.dumps(body).encode()
        await stream.send_all(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, len(payload), payload)
        )
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_list_clients_against_a_fake_api(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []
    port = await fake_http(nursery, 200, {"online_clients": ["dev-1", "orch"]}, seen)
    assert await list_clients(f"ws://127.0.0.1:{port}/ws", api_key="k") == ["dev-1", "orch"]
    head = seen[0].decode()
    assert head.startswith("GET /api/clients HTTP/1.1\r\n")
    assert f"host: 127.0.0.1:{port}\r\n" in head.lower()
    assert "x-api-key: k\r\n" in head.lower()

    missing = await fake_http(nursery, 404, {"detail": "Not Found"}, seen)
    with pytest.raises(ApiUnavailable, match="does not offer the HTTP API"):
        await list_clients(f"ws://127.0.0.1:{missing}/ws", api_key="k")
    refused = await fake_http(nursery, 401, {"detail": "Invalid API key"}, seen)
    with pytest.raises(AuthenticationFailed, match="401: Invalid API key"):
        await list_clients(f"ws://127.0.0.1:{refused}/ws", api_key="bad")


async def test_clients_command_against_the_server(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_server(nursery)
    async with open_device(server.url, "dev-1", api_key=KEY):
        code = await trio.to_thread.run_sync(
            run_cli, ["clients", "--url", server.url, "--api-key", KEY]
        )
        assert code == 0
        assert capsys.readouterr().out.splitlines() == ["dev-1"]
        code = await trio.to_thread.run_sync(
            run_cli, ["clients", "--url", server.url, "--api-key", KEY, "--json"]
        )
        assert code == 0
        assert json.loads(capsys.readouterr().out) == ["dev-1"]
        code = await trio.to_thread.run_sync(
            run_cli, ["clients", "--url", server.url, "--api-key", "nope"]
        )
        assert code == 1
        assert capsys.readouterr().err == (
            "ufo_trio clients: error: the HTTP API refused the request (401: Invalid API key)\n"
        )


# ------------------------------------------------------------------------------- device


async def test_device_command_wrong_key_and_sigterm(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    base = [sys.executable, "-m", "ufo_trio", "device", "--url", server.url, "--id", "cli-dev"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with trio.fail_after(60):
        refused = await trio.run_process(
            [*base, "--api-key", "nope"], capture_stdout=True, capture_stderr=True, check=False,
            env=env, cwd=ROOT,
        )
        assert refused.returncode == 1
        assert refused.stderr.decode().splitlines() == [
            f"ufo_trio device: error: {server.url} refused the connection (HTTP 403): the API "
            "key is wrong or missing (or the Origin is not allowed)"
        ]

        async with cli_process(
            "device", "--url", server.url, "--id", "cli-dev",
            "--tools", "examples/minimal_device.py:tools",
            env={**env, "UFO_TRIO_API_KEY": KEY}, cwd=ROOT,
        ) as (process, banner):  # fmt: skip
            assert "device 'cli-dev' connected to" in banner
            assert "word_count" in banner
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
