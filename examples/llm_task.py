"""A natural-language task end to end: fake model, server, SDK device, `task` CLI.

It starts `FakeChatModel` (a scripted OpenAI-compatible Chat Completions server) on loopback,
``python -m ufo_trio`` pointed at it (so the default agent is ``auto``), an SDK device with the
built-in tools (``run_command`` may start ``df`` only), and then::

    python -m ufo_trio task --target example-device 'free disk space in /tmp'

The fake model's rule plays the LLM: with no tool result yet it calls the device's
``run_command`` tool with ``df -h /tmp``; once the result is in, it answers with what it saw. Swap the fake for a real model with
``--llm-base-url``/``--llm-model`` (and ``UFO_TRIO_LLM_API_KEY``); see docs/agents.md.

    python examples/llm_task.py

Exit status: the task CLI's (0 if the task completed). CI runs this script.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from ufo_trio.client import default_tools, open_device
from ufo_trio.testing import FakeChatModel, FakeReply, FakeRequest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from end_to_end import read_line, stop  # noqa: E402

DEVICE_ID = "example-device"
REQUEST = "free disk space in /tmp"
OVERALL_TIMEOUT = 120


def play_the_model(request: FakeRequest) -> FakeReply:
    """The fake LLM: run `df` first, then answer from the tool's result."""
    tool_messages = [m for m in request.messages if m.get("role") == "tool"]
    if not tool_messages:
        return FakeReply.call("run_command", {"command": "df -h /tmp"})
    outcome: Any = json.loads(tool_messages[-1]["content"])
    result = outcome.get("result") or {}
    lines = str(result.get("stdout", "")).splitlines() if isinstance(result, dict) else []
    if outcome.get("status") != "success" or len(lines) < 2:
        return FakeReply.call("task_failed", {"reason": f"df did not work: {outcome.get('error')}"})
    fields = lines[1].split()
    return FakeReply.answer(f"{fields[3]} free of {fields[1]} on {fields[-1]} (df exit 0).")


async def main() -> int:
    api_key = secrets.token_urlsafe(16)
    env = {**os.environ, "UFO_TRIO_API_KEY": api_key}
    env.pop("UFO_TRIO_AGENT", None)
    python = sys.executable
    with trio.fail_after(OVERALL_TIMEOUT):
        async with FakeChatModel(rule=play_the_model) as model:
            print(f"[model] fake model at {model.base_url}", flush=True)
            server = await trio.lowlevel.open_process(
                [python, "-m", "ufo_trio", "--port", "0", "--log-level", "WARNING",
                 "--llm-base-url", model.base_url, "--llm-model", "fake-model"],
                stdout=subprocess.PIPE,
                env=env,
            )  # fmt: skip
            try:
                banner = await read_line(server, bytearray())
                print(f"[server] {banner}", flush=True)
                match = re.search(r"listening on (ws://\S+)", banner)
                if match is None:
                    raise RuntimeError(f"unexpected server banner: {banner!r}")
                url = match.group(1)
                tools = default_tools(allow_commands=["df"])
                async with open_device(url, DEVICE_ID, api_key=api_key, tools=tools) as device:
                    print(f"[device] {device.client_id} ready", flush=True)
                    done = await trio.run_process(
                        [python, "-m", "ufo_trio", "task", "--url", url, "--target", DEVICE_ID,
                         "--no-progress", REQUEST],
                        capture_stdout=True,
                        check=False,
                        env=env,
                    )  # fmt: skip
                for line in done.stdout.decode("utf-8", errors="replace").splitlines():
                    print(f"[task] {line}", flush=True)
                print(f"[model] answered {len(model.requests)} model calls", flush=True)
                return done.returncode
            finally:
                await stop(server)


if __name__ == "__main__":
    sys.exit(trio.run(main))
