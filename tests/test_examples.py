"""The examples run: CI executes the end-to-end script exactly as a newcomer would."""

from __future__ import annotations

import py_compile
import sys
from pathlib import Path

import pytest
import trio

from ufo_trio.client import Command, ToolContext
from ufo_trio.client._cli import load_tools

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.mark.parametrize("name", ["minimal_device.py", "two_step_plan.py", "end_to_end.py", "llm_task.py"])
def test_example_compiles(name: str) -> None:
    py_compile.compile(str(EXAMPLES / name), doraise=True)


async def test_end_to_end_example_prints_a_completed_outcome() -> None:
    with trio.fail_after(120):
        done = await trio.run_process(
            [sys.executable, str(EXAMPLES / "end_to_end.py")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
        )
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()
    lines = out.splitlines()
    assert lines[0].startswith("[server] ufo_trio ")
    assert "listening on ws://127.0.0.1:" in lines[0]
    assert lines[1].startswith("[device] device example-device ready at ws://127.0.0.1:")
    assert "[constellation] completed: example-two-steps (session " in out
    assert (
        '[constellation]   step 0 word_count: success {"words": 12, "lines": 2, '
        '"most_frequent": ["the", "dog"]}' in out
    )
    assert "[constellation]   step 1 system_info: success " in out


async def test_example_tools_load_from_the_cli() -> None:
    tools = load_tools(f"{EXAMPLES / 'minimal_device.py'}:tools")
    assert "word_count" in tools
    assert "echo" in tools
    command = Command(
        tool_name="word_count", tool_type="data_collection", parameters={"text": "a b a", "top": 1}
    )
    context = ToolContext(
        client_id="d", tool_name="word_count", call_id="c", session_id="s", system_info={}
    )
    result = await tools.call(command, context)
    assert result.result == {"words": 3, "lines": 1, "most_frequent": ["a"]}
