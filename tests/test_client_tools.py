"""The client SDK's tool registry, parameter checks, batch rules (§1.4) and built-in tools.

No sockets: the registry turns Commands into Results on its own.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import trio
import trio.testing

from ufo_trio.client import Command, ToolContext, ToolError, ToolRegistry, default_tools
from ufo_trio.client._builtins import TERMINATE_GRACE
from ufo_trio.client._tools import check_parameters, matches
from ufo_trio.client._wire import SKIPPED_ERROR, InvalidCommand, ToolResult

SKIPPED = "Skipped due to previous failure (early_exit=True)."


def ctx_for(command: Command) -> ToolContext:
    return ToolContext(
        client_id="dev-1",
        tool_name=command.tool_name,
        call_id=command.call_id,
        session_id="s-1",
        system_info={"device_id": "dev-1", "hostname": "box"},
    )


def cmd(name: str, tool_type: Any = "action", call_id: str | None = None, **params: Any) -> Command:
    return Command(tool_name=name, parameters=params or None, tool_type=tool_type, call_id=call_id)


async def call(registry: ToolRegistry, command: Command) -> ToolResult:
    return await registry.call(command, ctx_for(command))


def test_skipped_text_is_the_devices() -> None:
    assert SKIPPED_ERROR == SKIPPED


# ------------------------------------------------------------------------------- registration


def test_decorator_registers_and_returns_function() -> None:
    tools = ToolRegistry()

    @tools.tool("add", tool_type="data_collection")
    def add(a: int, b: int = 1) -> int:
        """Add two integers.

        More text that is not part of the summary."""
        return a + b

    assert add(1, 2) == 3
    assert "add" in tools
    assert tools.names() == ["add"]
    tool = tools.get("add")
    assert tool is not None
    assert tool.tool_type == "data_collection"
    assert tool.is_async is False
    assert tool.describe() == {
        "name": "add",
        "tool_type": "data_collection",
        "description": "Add two integers.",
        "parameters": {
            "a": {"type": "integer", "required": True},
            "b": {"type": "integer", "required": False},
        },
    }


def test_name_defaults_to_function_name_and_duplicates_are_refused() -> None:
    tools = ToolRegistry()

    @tools.tool()
    async def ping() -> str:
        return "pong"

    assert tools.names() == ["ping"]
    with pytest.raises(ValueError, match="already registered"):
        tools.add(ping)
    tools.add(ping, replace=True)
    tools.add(ping, "ping2")
    assert len(tools) == 2


@pytest.mark.parametrize("tool_type", ["", "Action", "tool"])
def test_bad_tool_type_is_refused(tool_type: Any) -> None:
    with pytest.raises(ValueError, match="tool_type"):
        ToolRegistry().add(lambda: None, "x", tool_type=tool_type)


def test_positional_only_and_varargs_are_refused() -> None:
    def positional(a: int, /) -> int:
        return a

    def varargs(*args: int) -> int:
        return 0

    with pytest.raises(ValueError, match="cannot be passed by keyword"):
        ToolRegistry().add(positional)
    with pytest.raises(ValueError, match="cannot be passed by keyword"):
        ToolRegistry().add(varargs)


def test_include_merges_registries() -> None:
    a, b = ToolRegistry(), ToolRegistry(namespace="other")
    a.add(lambda: 1, "one")
    b.add(lambda: 2, "two")
    a.include(b)
    assert a.names() == ["one", "two"]
    two = a.get("two")
    assert two is not None
    assert two.namespace == "other"
    with pytest.raises(ValueError, match="already registered"):
        a.include(b)


# ------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    ("value", "annotation", "ok"),
    [
        (1, int, True),
        (True, int, False),
        (1.5, int, False),
        (1, float, True),
        (1.5, float, True),
        (False, float, False),
        (True, bool, True),
        (0, bool, False),
        ("x", str, True),
        (None, str, False),
        (None, str | None, True),
        ("x", str | list[str], True),
        (["a", "b"], str | list[str], True),
        (["a", 1], list[str], False),
        ([1, 2], list, True),
        ({"a": 1}, dict[str, int], True),
        ({"a": "x"}, dict[str, int], False),
        ({"a": "x"}, Mapping[str, Any], True),
        ("a", Literal["a", "b"], True),
        ("c", Literal["a", "b"], False),
        (1, Literal[True], False),
        ({"anything": [1]}, Any, True),
        (object(), Path, True),  # unknown annotations are not checked
    ],
)
def test_matches(value: Any, annotation: Any, ok: bool) -> None:
    assert matches(value, annotation) is ok


def test_check_parameters_reports_every_problem_in_order() -> None:
    tools = ToolRegistry()

    @tools.tool("t")
    def t(path: str, count: int = 1, flag: bool = False) -> None:
        return None

    tool = tools.get("t")
    assert tool is not None
    assert check_parameters(tool, {"path": "x"}) == []
    assert check_parameters(tool, {"count": "2", "extra": 1}) == [
        "missing required parameter 'path'",
        "parameter 'count' must be integer, got string",
        "unexpected parameter 'extra' (accepted: path, count, flag)",
    ]


def test_kwargs_accepts_unknown_parameters() -> None:
    tools = ToolRegistry()

    @tools.tool("t")
    def t(a: int, **rest: Any) -> None:
        return None

    tool = tools.get("t")
    assert tool is not None
    assert check_parameters(tool, {"a": 1, "b": "anything"}) == []


def test_unresolvable_annotation_is_not_checked() -> None:
    # A name only imported under TYPE_CHECKING cannot be evaluated: that parameter is
    # accepted as Any, the others are still checked.
    def tool(a: NotImportedAnywhere, b: int) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    tools = ToolRegistry()
    tools.add(tool)
    spec = tools.get("tool")
    assert spec is not None
    assert check_parameters(spec, {"a": object(), "b": 1}) == []
    assert check_parameters(spec, {"a": 1, "b": "x"}) == [
        "parameter 'b' must be integer, got string"
    ]


async def test_context_parameter_is_injected_not_accepted_from_the_wire() -> None:
    tools = ToolRegistry()
    seen: list[ToolContext] = []

    @tools.tool("who")
    async def who(ctx: ToolContext, greeting: str = "hi") -> str:
        seen.append(ctx)
        return f"{greeting} {ctx.session_id}"

    result = await call(tools, cmd("who", call_id="c-1"))
    assert result == ToolResult(status="success", result="hi s-1", namespace="ufo_trio", call_id="c-1")
    assert seen[0].call_id == "c-1"
    assert seen[0].client_id == "dev-1"
    refused = await call(tools, cmd("who", ctx="spoofed"))
    assert refused.status == "failure"
    assert "unexpected parameter 'ctx'" in (refused.error or "")


# ------------------------------------------------------------------------------- single calls


async def test_sync_tool_runs_in_a_worker_thread() -> None:
    import threading

    tools = ToolRegistry()

    @tools.tool("where")
    def where() -> bool:
        return threading.current_thread() is threading.main_thread()

    result = await call(tools, cmd("where"))
    assert result.status == "success"
    assert result.result is False


async def test_invalid_parameters_give_a_clear_failure_without_calling() -> None:
    tools = ToolRegistry()
    calls = []

    @tools.tool("add")
    async def add(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    result = await call(tools, cmd("add", a="1", call_id="c"))
    assert result.status == "failure"
    assert result.call_id == "c"
    assert result.error == (
        "invalid parameters for tool 'add': missing required parameter 'b'; "
        "parameter 'a' must be integer, got string"
    )
    assert calls == []


async def test_unknown_tool_and_wrong_tool_type() -> None:
    tools = ToolRegistry()
    tools.add(lambda: 1, "one", tool_type="data_collection")
    unknown = await call(tools, cmd("two"))
    assert unknown.status == "failure"
    assert unknown.error == "unknown tool 'two' (this device offers: one)"
    wrong = await call(tools, cmd("one", tool_type="action"))
    assert wrong.status == "failure"
    assert "is a data_collection tool" in (wrong.error or "")


async def test_exceptions_become_failures() -> None:
    tools = ToolRegistry()

    @tools.tool("boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    @tools.tool("silent")
    def silent() -> None:
        raise KeyError

    @tools.tool("refuse")
    async def refuse() -> None:
        raise ToolError("not today", result={"partial": 1})

    assert (await call(tools, cmd("boom"))).error == "RuntimeError: kaput"
    assert (await call(tools, cmd("silent"))).error == "KeyError"
    refused = await call(tools, cmd("refuse"))
    assert refused.status == "failure"
    assert refused.error == "not today"
    assert refused.result == {"partial": 1}


async def test_non_json_result_is_a_failure() -> None:
    tools = ToolRegistry()
    tools.add(lambda: {1, 2}, "setty")
    result = await call(tools, cmd("setty"))
    assert result.status == "failure"
    assert result.error == "tool 'setty' returned a non-JSON-serialisable set"


async def test_cancellation_is_not_swallowed(autojump_clock: trio.testing.MockClock) -> None:
    tools = ToolRegistry()

    @tools.tool("forever")
    async def forever() -> None:
        await trio.sleep_forever()

    with trio.move_on_after(1) as scope:
        await call(tools, cmd("forever"))
    assert scope.cancelled_caught


# ------------------------------------------------------------------------------- batch rules


async def test_batch_one_result_per_command_in_order_with_call_ids() -> None:
    tools = default_tools()
    commands = [
        cmd("echo", call_id="c1", text="a"),
        cmd("", call_id="c2"),
        cmd("echo", call_id="c3", text="b"),
    ]
    results = await tools.run_batch(commands, ctx_for)
    assert [r.to_wire() for r in results] == [
        {"status": "success", "error": None, "result": "a", "namespace": "ufo_trio", "call_id": "c1"},
        {"status": "success", "error": None, "result": "No action taken.", "namespace": None,
         "call_id": "c2"},
        {"status": "success", "error": None, "result": "b", "namespace": "ufo_trio", "call_id": "c3"},
    ]


async def test_batch_after_a_failure_the_rest_are_skipped() -> None:
    tools = default_tools()
    ran: list[str] = []

    @tools.tool("mark")
    async def mark(label: str) -> str:
        ran.append(label)
        return label

    @tools.tool("boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    commands = [
        cmd("mark", call_id="c1", label="first"),
        cmd("boom", call_id="c2"),
        cmd("mark", call_id="c3", label="never"),
        cmd("", call_id="c4"),
    ]
    results = await tools.run_batch(commands, ctx_for)
    assert [(r.status, r.call_id) for r in results] == [
        ("success", "c1"),
        ("failure", "c2"),
        ("skipped", "c3"),
        ("skipped", "c4"),
    ]
    assert results[1].error == "RuntimeError: kaput"
    assert results[2].error == SKIPPED
    assert results[3].error == SKIPPED
    assert ran == ["first"]


async def test_batch_invalid_command_is_a_failure_in_place() -> None:
    tools = default_tools()
    results = await tools.run_batch(
        [InvalidCommand(problem="tool_name must be a string", call_id="c1"), cmd("echo", text="x")],
        ctx_for,
    )
    assert results[0].status == "failure"
    assert results[0].error == "invalid command: tool_name must be a string"
    assert results[0].call_id == "c1"
    assert results[1].status == "skipped"


async def test_empty_batch() -> None:
    assert await default_tools().run_batch([], ctx_for) == []


# ------------------------------------------------------------------------------- built-ins


async def test_builtins_are_safe_by_default() -> None:
    tools = default_tools()
    assert tools.names() == ["echo", "list_dir", "read_text_file", "run_command", "system_info"]
    listed = await call(tools, cmd("list_dir", tool_type="data_collection"))
    assert listed.status == "failure"
    assert "list_dir is disabled" in (listed.error or "")
    read = await call(tools, cmd("read_text_file", tool_type="data_collection", path="x"))
    assert "read_text_file is disabled" in (read.error or "")
    ran = await call(tools, cmd("run_command", command="ls"))
    assert ran.status == "failure"
    assert "run_command is disabled" in (ran.error or "")


async def test_echo_and_system_info() -> None:
    tools = default_tools()
    assert (await call(tools, cmd("echo", text="hi"))).result == "hi"
    info = await call(tools, cmd("system_info", tool_type="data_collection"))
    assert info.result == {"device_id": "dev-1", "hostname": "box"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "root"
    (base / "sub").mkdir(parents=True)
    (base / "hello.txt").write_text("hello\n", encoding="utf-8")
    (base / "sub" / "deep.txt").write_text("deep", encoding="utf-8")
    (base / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "secret.txt").write_text("secret", encoding="utf-8")
    return base.resolve()


async def test_list_dir_and_read_text_file_under_root(root: Path) -> None:
    tools = default_tools(root=root)
    listed = await call(tools, cmd("list_dir", tool_type="data_collection"))
    assert listed.status == "success"
    assert listed.result == [
        {"name": "hello.txt", "type": "file", "size": 6},
        {"name": "latin1.txt", "type": "file", "size": 4},
        {"name": "sub", "type": "directory", "size": None},
    ]
    deep = await call(tools, cmd("read_text_file", tool_type="data_collection", path="sub/deep.txt"))
    assert deep.result == "deep"
    latin = await call(
        tools, cmd("read_text_file", tool_type="data_collection", path="latin1.txt")
    )
    assert latin.error == "'latin1.txt' is not valid utf-8 text"
    latin = await call(
        tools,
        cmd("read_text_file", tool_type="data_collection", path="latin1.txt", encoding="latin-1"),
    )
    assert latin.result == "café"


@pytest.mark.parametrize("path", ["../secret.txt", "/etc/passwd", "sub/../../secret.txt", "link"])
async def test_paths_outside_the_root_are_refused(root: Path, path: str) -> None:
    (root / "link").symlink_to(root.parent / "secret.txt")
    tools = default_tools(root=root)
    result = await call(tools, cmd("read_text_file", tool_type="data_collection", path=path))
    assert result.status == "failure"
    assert result.error == f"path {path!r} is outside the device's root directory"


async def test_read_text_file_limits(root: Path) -> None:
    tools = default_tools(root=root, max_read_bytes=3)
    big = await call(tools, cmd("read_text_file", tool_type="data_collection", path="hello.txt"))
    assert big.error == "file is 6 bytes; the limit is 3"
    missing = await call(tools, cmd("read_text_file", tool_type="data_collection", path="nope"))
    assert missing.error == "no such file or directory: 'nope'"
    folder = await call(tools, cmd("read_text_file", tool_type="data_collection", path="sub"))
    assert folder.error == "not a file: 'sub'"


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        default_tools(root=tmp_path / "missing")


async def test_run_command_allow_list(root: Path) -> None:
    python = sys.executable
    tools = default_tools(root=root, allow_commands=[python])
    denied = await call(tools, cmd("run_command", command="rm -rf /"))
    assert denied.error == f"command 'rm' is not allowed on this device (allowed: {python})"
    ok = await call(
        tools, cmd("run_command", command=[python, "-c", "import os; print(os.getcwd())"])
    )
    assert ok.status == "success"
    assert ok.result["exit_code"] == 0
    assert ok.result["stdout"].strip() == str(root)
    bad = await call(
        tools,
        cmd("run_command", command=[python, "-c", "import sys; sys.exit('nope')"]),
    )
    assert bad.status == "failure"
    assert bad.error == "command exited with status 1: nope"
    assert bad.result["exit_code"] == 1
    unparsable = await call(tools, cmd("run_command", command='"unterminated'))
    assert (unparsable.error or "").startswith("cannot parse command line")


async def test_run_command_timeout_kills_the_program(
    root: Path, autojump_clock: trio.testing.MockClock
) -> None:
    python = sys.executable
    start = trio.current_time()
    tools = default_tools(root=root, allow_commands=[python])
    result = await call(
        tools,
        cmd("run_command", command=[python, "-c", "import time; time.sleep(30)"], timeout=0.2),
    )
    assert result.status == "failure"
    assert result.error == f"command {python!r} timed out after 0.2 s"
    # The program is gone by the time the call returns: SIGTERM, and SIGKILL after the grace
    # period if it has not exited yet (a real process may not, under the autojump clock).
    assert trio.current_time() in (start + 0.2, start + 0.2 + TERMINATE_GRACE)
