"""The llm agent against the REAL SDK device (issue 10 items 6/7): under `auto` (the default
once --llm-base-url is set) a text task lists the SDK device's tools, the model gets them as
functions with the SDK's input_schema unchanged, calls one, the SDK device runs it, and the
requester gets TASK_END completed with the answer and the step (END-4). Also through the `task`
CLI and the example script."""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from test_llm_config_http import end_of

from ufo_trio.client import default_tools, open_device
from ufo_trio.testing import TEST_KEY, FakeChatModel, FakeReply, FakeRequest, connect, open_server

ROOT = Path(__file__).resolve().parent.parent
WAIT = 60.0
TEXT = "Echo the word hello back to me"


def rule(request: FakeRequest) -> FakeReply:
    tools = [m for m in request.messages if m.get("role") == "tool"]
    if not tools:
        return FakeReply.call("echo", {"text": "hello"})
    return FakeReply.answer("The device said: " + json.loads(tools[-1]["content"])["result"])


async def test_sdk_device_under_auto_runs_a_text_task() -> None:
    model = FakeChatModel(rule=rule)
    registry = default_tools()
    async with model, open_server(
        llm_base_url=model.base_url, llm_model="m"
    ) as server, AsyncExitStack() as stack:  # fmt: skip
        await stack.enter_async_context(
            open_device(server.url, "sdk-dev", api_key=TEST_KEY, tools=registry, platform="linux")
        )
        requester = await stack.enter_async_context(connect(server.url))
        verdict = await requester.register("galaxy@sdk-dev", "constellation", target_id="sdk-dev")
        assert verdict["type"] == "heartbeat"
        with trio.fail_after(WAIT):
            await requester.send(
                {
                    "type": "task", "status": "continue", "client_type": "constellation",
                    "client_id": "galaxy@sdk-dev", "target_id": "sdk-dev",
                    "session_id": "s-1", "task_name": "t1", "request": TEXT,
                }
            )  # fmt: skip
            end, _text = await end_of(requester)

    assert server.config.effective_agent == "auto"
    assert end["status"] == "completed", end
    assert end["result"]["answer"] == "The device said: hello"
    [step] = end["result"]["steps"]
    assert step["tool_calls"][0]["tool_name"] == "echo"
    assert step["tool_calls"][0]["parameters"] == {"text": "hello"}
    assert step["results"] == [{"status": "success", "error": None, "result": "hello"}]
    # What the model saw: every SDK tool the device advertises (action tools), each function's
    # parameters exactly the SDK's input_schema, the request verbatim.
    first = model.requests[0]
    assert first.messages[1] == {"role": "user", "content": TEXT}
    functions = {f["function"]["name"]: f["function"] for f in first.tools}
    sdk = {d["tool_name"]: d for d in registry.descriptors("action")}
    assert set(functions) == {*sdk, "task_failed"}
    for name, descriptor in sdk.items():
        assert functions[name]["parameters"] == descriptor["input_schema"], name
        assert functions[name]["description"] == descriptor["description"]
    assert len(model.requests) == 2


def df_rule(request: FakeRequest) -> FakeReply:
    tools = [m for m in request.messages if m.get("role") == "tool"]
    if not tools:
        return FakeReply.call("run_command", {"command": "df -h /tmp"})
    outcome: Any = json.loads(tools[-1]["content"])
    return FakeReply.answer(f"df exit code {outcome['result']['exit_code']}")


async def test_task_cli_prints_the_answer_and_the_step() -> None:
    """`python -m ufo_trio task --target dev 'free disk space in /tmp'` against a server with a
    (fake) model and an SDK device that may run `df`."""
    model = FakeChatModel(rule=df_rule)
    env = {**os.environ, "UFO_TRIO_API_KEY": TEST_KEY}
    env.pop("UFO_TRIO_AGENT", None)
    async with model, open_server(
        llm_base_url=model.base_url, llm_model="m"
    ) as server, open_device(
        server.url, "dev", api_key=TEST_KEY, tools=default_tools(allow_commands=["df"])
    ):  # fmt: skip
        with trio.fail_after(WAIT):
            done = await trio.run_process(
                [sys.executable, "-m", "ufo_trio", "task", "--url", server.url,
                 "--target", "dev", "--no-progress", "free disk space in /tmp"],
                capture_stdout=True, capture_stderr=True, check=False, env=env,
            )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    lines = out.splitlines()
    assert lines[0].startswith("completed: "), out
    assert re.match(
        r'^  step 0 run_command \{"command":"df -h /tmp"\} -> success \{"exit_code": 0, ', lines[1]
    ), out
    assert "  answer: df exit code 0" in lines
    assert model.requests[0].messages[1]["content"] == "free disk space in /tmp"


async def test_llm_task_example_prints_the_answer_and_the_step() -> None:
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / "llm_task.py")],
            capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
            env={k: v for k, v in os.environ.items() if k != "UFO_TRIO_AGENT"},
        )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    lines = out.splitlines()
    assert lines[0].startswith("[model] fake model at http://127.0.0.1:")
    assert lines[1].startswith("[server] ufo_trio ")
    assert "listening on ws://127.0.0.1:" in lines[1]
    assert lines[2] == "[device] example-device ready"
    assert lines[3].startswith("[task] completed: ")
    assert lines[4].startswith(
        '[task]   step 0 run_command {"command":"df -h /tmp"} -> success {"exit_code": 0, '
    )
    assert re.match(r"^\[task\]   answer: \S+ free of \S+ on \S+ \(df exit 0\)\.$", lines[5]), out
    assert lines[-1] == "[model] answered 2 model calls"

