"""The llm agent checks a model's arguments against every schema form an SDK device emits
(issue 10 item 2: "a schema-invalid call goes back to the model as a tool error"), and sends the
conversation and the functions as exactly the JSON a plain encoder would."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Any, Literal

import pytest

from ufo_trio._llm import EncodedList, Toolbox, ToolCall
from ufo_trio._messages import Command
from ufo_trio.client import ToolRegistry, default_tools


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


registry = ToolRegistry()


@registry.tool()
def rich(
    name: str,
    count: int | None = None,
    ratio: float = 0.5,
    flag: bool = False,
    mode: Literal["fast", "slow"] = "fast",
    colour: Colour = Colour.RED,
    pair: tuple[int, str] | None = None,
    tags: list[str] | None = None,
    weights: dict[str, int] | None = None,
    target: str | list[str] = ".",
    note: Annotated[str, "free text"] = "",
    mixed: Literal[1, "one"] = 1,
) -> str:
    """Exercise every schema form the SDK emits."""
    return name


def _toolbox(tools: ToolRegistry) -> Toolbox:
    return Toolbox(tools.descriptors(), ())


def _prepare(arguments: dict[str, Any], tool: str = "rich") -> Command | str:
    return _toolbox(registry).prepare(
        ToolCall(id="c1", name=tool, arguments=json.dumps(arguments))
    )


def test_the_model_sees_the_sdk_schema_unchanged() -> None:
    box = _toolbox(registry)
    [descriptor] = registry.descriptors()
    [function] = [f for f in box.functions if f["function"]["name"] == "rich"]
    assert function["function"]["parameters"] == descriptor["input_schema"]
    schema = descriptor["input_schema"]
    # The forms this file is about really are in the SDK's output.
    assert schema["properties"]["count"]["type"] == ["integer", "null"]
    assert schema["properties"]["pair"]["anyOf"][0]["prefixItems"] == [
        {"type": "integer"}, {"type": "string"},
    ]
    assert schema["properties"]["weights"]["anyOf"][0]["additionalProperties"] == {
        "type": "integer"
    }
    assert schema["properties"]["target"]["anyOf"][1] == {"type": "array", "items": {"type": "string"}}
    assert schema["properties"]["mixed"] == {"enum": [1, "one"], "default": 1}
    assert schema["additionalProperties"] is False


GOOD: list[dict[str, Any]] = [
    {"name": "a"},
    {"name": "a", "count": None},
    {"name": "a", "count": 3},
    {"name": "a", "count": 3.0},
    {"name": "a", "ratio": 1},
    {"name": "a", "flag": True, "mode": "slow", "colour": "green"},
    {"name": "a", "pair": [1, "x"]},
    {"name": "a", "pair": None},
    {"name": "a", "tags": ["x", "y"], "weights": {"k": 1}},
    {"name": "a", "target": "dir"},
    {"name": "a", "target": ["a", "b"]},
    {"name": "a", "note": "n", "mixed": "one"},
]


@pytest.mark.parametrize("arguments", GOOD)
def test_valid_arguments_become_the_command(arguments: dict[str, Any]) -> None:
    command = _prepare(arguments)
    assert isinstance(command, Command), command
    assert command.tool_name == "rich"
    assert command.parameters == arguments


BAD: list[tuple[dict[str, Any], str]] = [
    ({}, "missing required property 'name'"),
    ({"name": 1}, "arguments.name must be string"),
    ({"name": "a", "count": "3"}, "arguments.count must be integer or null"),
    ({"name": "a", "count": 2.5}, "arguments.count must be integer or null"),
    ({"name": "a", "count": True}, "arguments.count must be integer or null"),
    ({"name": "a", "flag": 1}, "arguments.flag must be boolean"),
    ({"name": "a", "mode": "medium"}, 'arguments.mode must be one of ["fast", "slow"]'),
    ({"name": "a", "colour": "RED"}, 'arguments.colour must be one of ["red", "green"]'),
    ({"name": "a", "mixed": True}, 'arguments.mixed must be one of [1, "one"]'),
    ({"name": "a", "pair": [1]}, "arguments.pair matches none of the allowed forms "
                                 "(arguments.pair must have at least 2 item(s))"),
    ({"name": "a", "pair": [1, "x", 2]}, "arguments.pair matches none of the allowed forms "
                                         "(arguments.pair must have at most 2 item(s))"),
    ({"name": "a", "pair": ["x", 1]}, "arguments.pair matches none of the allowed forms "
                                      "(arguments.pair[0] must be integer)"),
    ({"name": "a", "tags": ["x", 2]}, "arguments.tags matches none of the allowed forms "
                                      "(arguments.tags[1] must be string)"),
    ({"name": "a", "weights": {"k": "v"}}, "arguments.weights matches none of the allowed "
                                           "forms (arguments.weights.k must be integer)"),
    ({"name": "a", "target": 5}, "arguments.target matches none of the allowed forms "
                                 "(arguments.target must be string)"),
    ({"name": "a", "target": [5]}, "arguments.target matches none of the allowed forms "
                                   "(arguments.target must be string)"),
    ({"name": "a", "extra": 1}, "unexpected property 'extra'"),
]


@pytest.mark.parametrize(("arguments", "problem"), BAD)
def test_invalid_arguments_become_a_tool_error(arguments: dict[str, Any], problem: str) -> None:
    assert _prepare(arguments) == f"the arguments do not match the function's schema: {problem}"


@pytest.mark.parametrize(
    ("tool", "arguments", "ok"),
    [
        ("echo", {"text": "hi"}, True),
        ("echo", {"text": "hi", "loud": True}, False),
        ("list_dir", {}, True),
        ("list_dir", {"path": None}, False),
        ("read_text_file", {"path": "a", "encoding": "latin-1"}, True),
        ("run_command", {"command": "df -h /tmp"}, True),
        ("run_command", {"command": ["df", "-h"], "timeout": 5}, True),
        ("run_command", {"command": ["df", 1]}, False),
        ("run_command", {"command": "df", "timeout": "5"}, False),
        ("system_info", {}, True),
        ("system_info", {"x": 1}, False),
    ],
)
def test_every_builtin_sdk_tool_schema_is_checked(
    tool: str, arguments: dict[str, Any], ok: bool
) -> None:
    result = _toolbox(default_tools()).prepare(
        ToolCall(id="c", name=tool, arguments=json.dumps(arguments))
    )
    assert isinstance(result, Command) is ok, result


def test_other_schema_keywords() -> None:
    """const, allOf, items: false after prefixItems; unknown keywords are not checked."""
    descriptor = {
        "tool_name": "t",
        "tool_type": "action",
        "input_schema": {
            "type": "object",
            "properties": {
                "k": {"const": "x"},
                "n": {"allOf": [{"type": "integer"}, {"enum": [1, 2]}]},
                "p": {"type": "array", "prefixItems": [{"type": "string"}], "items": False},
                "f": {"type": "string", "format": "uri", "pattern": "^a"},
            },
        },
    }
    box = Toolbox([descriptor], ())

    def check(arguments: dict[str, Any]) -> Command | str:
        return box.prepare(ToolCall(id="c", name="t", arguments=json.dumps(arguments)))

    assert isinstance(check({"k": "x", "n": 2, "p": ["a"], "f": "zzz"}), Command)
    assert check({"k": "y"}) == 'the arguments do not match the function\'s schema: arguments.k must be "x"'
    assert check({"n": 3}).endswith("arguments.n must be one of [1, 2]")  # type: ignore[union-attr]
    assert check({"n": "1"}).endswith("arguments.n must be integer")  # type: ignore[union-attr]
    assert check({"p": ["a", "b"]}).endswith("arguments.p must have at most 1 item(s)")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "items",
    [
        [],
        [{"role": "system", "content": "é ✓ \"q\" \\ \n"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": None,
                                            "tool_calls": [{"id": "1", "type": "function"}]}],
    ],
)
def test_encoded_list_is_the_json_of_the_list(items: list[dict[str, Any]]) -> None:
    encoded = EncodedList(items)
    assert json.loads(encoded.encoded()) == items
    assert encoded.encoded() == json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    encoded.append({"role": "tool", "content": "x"})
    assert json.loads(encoded.encoded()) == [*items, {"role": "tool", "content": "x"}]
    encoded.insert(0, {"role": "late"})  # changed without append: encoded afresh
    assert json.loads(encoded.encoded())[0] == {"role": "late"}
