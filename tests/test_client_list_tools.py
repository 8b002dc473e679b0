"""SDK devices answer ``list_tools`` like the real UFO device (issue 10 item 6): one Result
whose ``result`` lists tool descriptors with a JSON Schema built from each tool's signature,
type hints and docstring. The frames a fake server sees are checked at the end."""

from __future__ import annotations

import enum
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pytest
import trio
import trio.testing
from test_client_fake_server import CONFIRM, fake_server, receive, send

from ufo_trio.client import Command, ToolContext, ToolRegistry, default_tools, open_device

if TYPE_CHECKING:
    from trio_websocket import WebSocketRequest

LIST_TOOLS = {
    "tool_name": "list_tools", "tool_type": "action", "parameters": {"tool_type": "action"}
}


def _context() -> ToolContext:
    return ToolContext(client_id="d", tool_name="list_tools", call_id="C1", session_id="S",
                       system_info={})


async def _list(registry: ToolRegistry, **parameters: Any) -> Any:
    result = await registry.call(
        Command(tool_name="list_tools", parameters=parameters, call_id="C1"), _context()
    )
    assert result.status == "success", result.error
    assert result.call_id == "C1"
    return result.result


# ----------------------------------------------------------------------------- built-ins


def test_descriptor_of_every_builtin_without_root_or_allow_list() -> None:
    by_name = {d["tool_name"]: d for d in default_tools().descriptors()}
    assert list(by_name) == ["echo", "system_info", "list_dir", "read_text_file", "run_command"]
    assert by_name["echo"] == {
        "tool_key": "action::echo",
        "tool_name": "echo",
        "namespace": "ufo_trio",
        "tool_type": "action",
        "description": "Return the text unchanged.",
        "input_schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "description": "The text to return."}},
            "required": ["text"],
            "additionalProperties": False,
        },
        "output_schema": {"type": "string"},
    }
    assert by_name["system_info"] == {
        "tool_key": "data_collection::system_info",
        "tool_name": "system_info",
        "namespace": "ufo_trio",
        "tool_type": "data_collection",
        "description": "Return the system info this device registered with.",
        # The ToolContext parameter is filled by the device, never by the caller.
        "input_schema": {
            "type": "object", "properties": {}, "required": [], "additionalProperties": False,
        },
        "output_schema": {"type": "object"},
    }
    assert by_name["list_dir"] == {
        "tool_key": "data_collection::list_dir",
        "tool_name": "list_dir",
        "namespace": "ufo_trio",
        "tool_type": "data_collection",
        "description": "List a directory under the device's root directory "
        "(disabled on this device: no root).",
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {
                    "type": "string",
                    "description": "Directory to list, relative to the device's root directory.",
                    "default": ".",
                }
            },
            "required": [],
            "additionalProperties": False,
        },
        "output_schema": {"type": "array", "items": {"type": "object"}},
    }
    assert by_name["read_text_file"] == {
        "tool_key": "data_collection::read_text_file",
        "tool_name": "read_text_file",
        "namespace": "ufo_trio",
        "tool_type": "data_collection",
        "description": "Read a text file (at most 1048576 bytes) under the device's root "
        "directory (disabled on this device: no root).",
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {
                    "type": "string",
                    "description": "File to read, relative to the device's root directory.",
                },
                "encoding": {
                    "type": "string",
                    "description": "Text encoding of the file.",
                    "default": "utf-8",
                },
            },
            "required": ["path"],
            "additionalProperties": False,
        },
        "output_schema": {"type": "string"},
    }
    assert by_name["run_command"] == {
        "tool_key": "action::run_command",
        "tool_name": "run_command",
        "namespace": "ufo_trio",
        "tool_type": "action",
        "description": "Run a program without a shell and return its exit_code, stdout and "
        "stderr; a non-zero exit status is a failure. Disabled on this device (no program "
        "is allowed).",
        "input_schema": {
            "type": "object",
            "properties": {
                "command": {
                    "anyOf": [
                        {"type": "string"},
                        {"type": "array", "items": {"type": "string"}},
                    ],
                    "description": "The command line (split like a POSIX shell, but no shell "
                    "runs it) or the argument list; the program must be on the device's "
                    "allow-list.",
                },
                "timeout": {
                    "type": "number",
                    "description": "Seconds before the program is stopped.",
                    "default": 60.0,
                },
            },
            "required": ["command"],
            "additionalProperties": False,
        },
        "output_schema": {"type": "object"},
    }


def test_builtin_descriptions_say_what_is_enabled(tmp_path: Any) -> None:
    tools = default_tools(root=tmp_path, allow_commands=["du", "df"])
    by_name = {d["tool_name"]: d for d in tools.descriptors()}
    assert by_name["run_command"]["description"].endswith("Allowed programs: df, du.")
    assert by_name["list_dir"]["description"] == (
        "List a directory under the device's root directory; paths are relative to that root."
    )


# ----------------------------------------------------------------------------- custom tools


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


def test_rich_signature_google_docstring() -> None:
    tools = ToolRegistry(namespace="Paint")

    @tools.tool("paint")
    async def paint(
        ctx: ToolContext,
        wall: str,
        colour: Colour,
        coats: int = 2,
        ratio: float | None = None,
        finish: Literal["matte", "gloss"] = "matte",
        tags: list[str] | None = None,
        extras: dict[str, float] | None = None,
        dry_run: bool = False,
        note: Annotated[str, "free text for the painter"] = "",
        anything: Any = None,
    ) -> dict[str, Any]:
        """Paint a wall.

        The paint is applied in layers; each coat dries first.

        Args:
            wall: Which wall to paint.
            colour (Colour): The colour.
            coats: Number of coats,
                at least one.
            ratio: Thinner ratio.
            finish: Surface finish.
            tags: Labels for the job.
            extras: Extra pigments by name.
            dry_run: Only plan.

        Returns:
            What was done.
        """
        return {}

    [descriptor] = tools.descriptors()
    assert descriptor["tool_key"] == "action::paint"
    assert descriptor["namespace"] == "Paint"
    assert descriptor["description"] == (
        "Paint a wall.\n\nThe paint is applied in layers; each coat dries first."
    )
    assert descriptor["output_schema"] == {"type": "object"}
    assert descriptor["input_schema"] == {
        "type": "object",
        "properties": {
            "wall": {"type": "string", "description": "Which wall to paint."},
            "colour": {"type": "string", "enum": ["red", "green"], "description": "The colour."},
            "coats": {
                "type": "integer", "description": "Number of coats, at least one.", "default": 2,
            },
            "ratio": {"type": ["number", "null"], "description": "Thinner ratio.",
                      "default": None},
            "finish": {"type": "string", "enum": ["matte", "gloss"],
                       "description": "Surface finish.", "default": "matte"},
            "tags": {
                "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                "description": "Labels for the job.",
                "default": None,
            },
            "extras": {
                "anyOf": [
                    {"type": "object", "additionalProperties": {"type": "number"}},
                    {"type": "null"},
                ],
                "description": "Extra pigments by name.",
                "default": None,
            },
            "dry_run": {"type": "boolean", "description": "Only plan.", "default": False},
            "note": {"type": "string", "description": "free text for the painter", "default": ""},
            "anything": {"default": None},
        },
        "required": ["wall", "colour"],
        "additionalProperties": False,
    }
    json.dumps(descriptor, allow_nan=False)  # all of it is JSON


def test_numpy_and_sphinx_docstrings_and_kwargs() -> None:
    tools = ToolRegistry()

    @tools.tool("numpy_style", tool_type="data_collection")
    def numpy_style(path: str, depth: int = 1, **extra: Any) -> list[int]:
        """Walk a tree.

        Parameters
        ----------
        path : str
            Where to start.
        depth : int
            How deep to go.

        Returns
        -------
        list of int
        """
        return []

    @tools.tool("sphinx_style", description="Explicit text wins.")
    def sphinx_style(name: str, count: int) -> None:
        """Ignored summary.

        :param name: The name.
        :param int count: How many,
            at most ten.
        :return: nothing
        """

    numpy, sphinx = tools.descriptors()
    assert numpy["description"] == "Walk a tree."
    assert numpy["output_schema"] == {"type": "array", "items": {"type": "integer"}}
    # **kwargs: extra parameters are accepted, so the schema does not forbid them.
    assert numpy["input_schema"] == {
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Where to start."},
            "depth": {"type": "integer", "description": "How deep to go.", "default": 1},
        },
        "required": ["path"],
    }
    assert sphinx["description"] == "Explicit text wins."
    assert sphinx["output_schema"] == {"type": "null"}
    assert sphinx["input_schema"]["properties"] == {
        "name": {"type": "string", "description": "The name."},
        "count": {"type": "integer", "description": "How many, at most ten."},
    }


async def test_enum_parameter_is_checked_and_passed_as_member() -> None:
    tools = ToolRegistry()
    seen: list[Any] = []

    @tools.tool("pick")
    async def pick(colour: Colour, second: Colour | None = None) -> str:
        seen.append((colour, second))
        return colour.value

    ok = await tools.call(Command(tool_name="pick", parameters={"colour": "red"}), _context())
    assert (ok.status, ok.result, seen) == ("success", "red", [(Colour.RED, None)])
    both = await tools.call(
        Command(tool_name="pick", parameters={"colour": "red", "second": "green"}), _context()
    )
    assert both.status == "success"
    assert seen[-1] == (Colour.RED, Colour.GREEN)
    bad = await tools.call(Command(tool_name="pick", parameters={"colour": "blue"}), _context())
    assert bad.status == "failure"
    assert bad.error == (
        "invalid parameters for tool 'pick': parameter 'colour' must be \"red\"|\"green\", "
        "got string"
    )


# ----------------------------------------------------------------------------- list_tools


async def test_list_tools_filters_by_type_and_namespace_and_omits_itself() -> None:
    tools = default_tools()
    other = ToolRegistry(namespace="Other")

    @other.tool("ping", tool_type="action")
    async def ping() -> str:
        """Answer pong."""
        return "pong"

    tools.include(other)
    names = [d["tool_name"] for d in await _list(tools)]
    assert names == ["echo", "system_info", "list_dir", "read_text_file", "run_command", "ping"]
    assert [d["tool_key"] for d in await _list(tools, tool_type="action")] == [
        "action::echo", "action::run_command", "action::ping",
    ]
    assert [d["tool_name"] for d in await _list(tools, tool_type="data_collection")] == [
        "system_info", "list_dir", "read_text_file",
    ]
    assert [d["tool_name"] for d in await _list(tools, namespace="Other")] == ["ping"]
    assert await _list(tools, namespace="nobody") == []
    # Like the real device's remove_meta=False: list_tools itself, once per tool type.
    meta = [d for d in await _list(tools, remove_meta=False) if d["tool_name"] == "list_tools"]
    assert [d["tool_key"] for d in meta] == ["action::list_tools", "data_collection::list_tools"]
    assert meta[0]["input_schema"]["properties"]["tool_type"]["anyOf"][0] == {
        "type": "string", "enum": ["action", "data_collection"],
    }


async def test_list_tools_answers_for_either_tool_type_and_checks_parameters() -> None:
    tools = default_tools()
    for tool_type in ("action", "data_collection"):
        result = await tools.call(
            Command(tool_name="list_tools", tool_type=tool_type, call_id="X"), _context()
        )
        assert result.status == "success"
        assert len(result.result) == 5
    bad = await tools.call(
        Command(tool_name="list_tools", parameters={"tool_type": "gui", "x": 1}, call_id="B"),
        _context(),
    )
    assert bad.status == "failure"
    assert bad.call_id == "B"
    assert bad.error == (
        "invalid parameters for tool 'list_tools': parameter 'tool_type' must be "
        "\"action\"|\"data_collection\"|null, got string; unexpected parameter 'x' "
        "(accepted: tool_type, namespace, remove_meta)"
    )


def test_list_tools_is_a_reserved_name() -> None:
    tools = ToolRegistry()
    with pytest.raises(ValueError, match="'list_tools' is reserved"):
        tools.add(lambda: None, "list_tools")
    assert "list_tools" not in tools


# ----------------------------------------------------------------------------- on the wire


async def test_list_tools_command_frames_on_the_wire(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    seen: dict[str, Any] = {}
    done = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        seen["register"] = await receive(ws)
        await send(ws, CONFIRM)
        t0 = trio.current_time()
        await send(ws, {
            "type": "command", "status": "continue", "agent_name": "LinuxAgent",
            "session_id": "S", "task_name": "t", "response_id": "R1",
            "actions": [{**LIST_TOOLS, "call_id": "C1"}],
        })
        seen["results"] = await receive(ws)
        seen["at"] = trio.current_time() - t0
        done.set()
        await trio.sleep_forever()

    tools = default_tools()

    @tools.tool("add", tool_type="data_collection")
    def add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: First.
            b: Second.
        """
        return a + b

    url = await fake_server(nursery, handler)
    async with open_device(url, "dev-1", tools=tools, heartbeat_interval=0, ping_interval=0):
        await done.wait()

    frame = seen["results"]
    assert seen["at"] == 0
    assert (frame["type"], frame["status"], frame["session_id"], frame["prev_response_id"]) == (
        "command_results", "continue", "S", "R1",
    )
    [result] = frame["action_results"]
    assert set(result) == {"status", "error", "result", "namespace", "call_id"}
    assert (result["status"], result["error"], result["call_id"], result["namespace"]) == (
        "success", None, "C1", "ufo_trio",
    )
    # Only action tools (the parameter filters), never list_tools itself.
    assert result["result"] == tools.descriptors("action")
    assert [d["tool_name"] for d in result["result"]] == ["echo", "run_command"]
    # The tools list in the REGISTER system info is unchanged by all this.
    registered = {t["name"] for t in seen["register"]["metadata"]["system_info"]["tools"]}
    assert registered == {"echo", "system_info", "list_dir", "read_text_file", "run_command",
                          "add"}


async def test_list_tools_through_the_real_server(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # The PROTOCOL.md walkthrough's first step: a script plan whose one Command is list_tools.
    from test_client_e2e import KEY, start_server

    from ufo_trio.client import Plan, open_constellation

    server = await start_server(nursery)
    tools = default_tools()
    async with (
        open_device(server.url, "dev-1", api_key=KEY, tools=tools),
        open_constellation(server.url, "orch", target_id="dev-1", api_key=KEY) as constellation,
    ):
        outcome = await constellation.run_task(
            "dev-1",
            Plan.of(Command(tool_name="list_tools", parameters={"tool_type": "data_collection"})),
        )
    assert outcome.ok, outcome.error
    [step] = outcome.steps or []
    [result] = step.results
    assert result.status == "success"
    assert result.result == tools.descriptors("data_collection")
    assert [d["tool_key"] for d in result.result] == [
        "data_collection::system_info", "data_collection::list_dir",
        "data_collection::read_text_file",
    ]
