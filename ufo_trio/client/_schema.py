"""JSON Schemas for tools, built from Python signatures, type hints and docstrings.

Pure functions, run once per tool when it is registered (never per call). The result is what a
device reports in its ``list_tools`` descriptors (``input_schema``/``output_schema``), the shape
an LLM agent turns into function definitions. See docs/sdk.md, "Tool descriptors".
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections import abc
from typing import Any

#: Docstring section headers that hold parameter descriptions (Google and NumPy styles).
_PARAM_SECTIONS = frozenset({"args", "arguments", "parameters", "params", "keyword args",
                             "keyword arguments", "other parameters"})
#: Headers that end the free-text description.
_ALL_SECTIONS = _PARAM_SECTIONS | frozenset({
    "returns", "return", "yields", "raises", "exceptions", "examples", "example", "notes",
    "note", "see also", "warnings", "warning", "references", "attributes", "todo",
})
_GOOGLE_HEADER = re.compile(r"^\s*([A-Za-z][A-Za-z ]*):\s*$")
_NUMPY_RULE = re.compile(r"^\s*-{3,}\s*$")
_SPHINX_PARAM = re.compile(r"^\s*:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")
_SPHINX_FIELD = re.compile(r"^\s*:(\w+)")
_GOOGLE_ITEM = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_ITEM = re.compile(r"^(\*{0,2}\w+)\s*(?::.*)?$")

_SIMPLE: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                           type(None): "null"}


def type_schema(annotation: Any) -> dict[str, Any]:
    """The JSON Schema of values of *annotation*; ``{}`` (anything) for types it cannot map."""
    if annotation is Any or annotation is object or annotation is inspect.Parameter.empty:
        return {}
    if annotation is None:
        annotation = type(None)
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        schema = type_schema(args[0])
        notes = [a for a in args[1:] if isinstance(a, str)]
        if notes and "description" not in schema:
            schema["description"] = " ".join(notes)
        return schema
    if origin is typing.Union or origin is types.UnionType:
        return _union([type_schema(arg) for arg in args])
    if origin is typing.Literal:
        return _enum(list(args))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum([member.value for member in annotation])
    if annotation in (list, tuple, set, frozenset) or origin in (
        list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence, abc.Set,
        abc.Iterable, abc.Collection,
    ):
        schema = {"type": "array"}
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            schema["prefixItems"] = [type_schema(arg) for arg in args]
            schema["minItems"] = schema["maxItems"] = len(args)
        elif args and (item := type_schema(args[0])):
            schema["items"] = item
        return schema
    if annotation is dict or origin in (dict, abc.Mapping, abc.MutableMapping):
        schema = {"type": "object"}
        if len(args) == 2 and (value := type_schema(args[1])):
            schema["additionalProperties"] = value
        return schema
    return {}


def _union(members: list[dict[str, Any]]) -> dict[str, Any]:
    if any(member == {} for member in members):
        return {}
    if all(set(member) == {"type"} and isinstance(member["type"], str) for member in members):
        names: list[str] = []
        for member in members:
            if member["type"] not in names:
                names.append(member["type"])
        return {"type": names[0] if len(names) == 1 else names}
    return {"anyOf": members}


def _enum(values: list[Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {"enum": values}
    kinds = {_json_type(value) for value in values}
    if len(kinds) == 1 and None not in kinds:
        schema = {"type": kinds.pop(), **schema}
    return schema


def _json_type(value: Any) -> str | None:
    for python_type, name in ((bool, "boolean"), (int, "integer"), (float, "number"),
                              (str, "string"), (type(None), "null")):
        if isinstance(value, python_type):
            return name
    return None


def split_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a cleaned docstring.

    The description is the text before the first section (``Args:``, ``Returns:``, a NumPy
    underlined header, or a Sphinx ``:param:`` field). Parameter descriptions come from a
    Google ``Args:``/``Arguments:``/``Parameters:`` section, a NumPy ``Parameters`` section,
    or Sphinx ``:param name: text`` fields; continuation lines are joined with spaces.
    """
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    description: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    item_indent: int | None = None
    current: str | None = None
    numpy = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        next_line = lines[i + 1] if i + 1 < len(lines) else ""
        header: str | None = None
        if (match := _GOOGLE_HEADER.match(line)) and match.group(1).lower() in _ALL_SECTIONS:
            header, numpy = match.group(1).lower(), False
        elif stripped.lower() in _ALL_SECTIONS and _NUMPY_RULE.match(next_line):
            header, numpy = stripped.lower(), True
            i += 1  # the underline
        if header is not None:
            section, current, item_indent = header, None, None
        elif match := _SPHINX_PARAM.match(line):
            section, current = "sphinx", match.group(1)
            params[current] = match.group(2).strip()
        elif _SPHINX_FIELD.match(line):
            section, current = "sphinx-other", None
        elif section is None:
            description.append(line)
        elif section in _PARAM_SECTIONS and stripped:
            if item_indent is None:
                item_indent = indent
            item = (_NUMPY_ITEM if numpy else _GOOGLE_ITEM).match(stripped)
            if indent <= item_indent and item is not None:
                current = item.group(1).lstrip("*")
                params[current] = "" if numpy else item.group(2).strip()
            elif current is not None:
                params[current] = f"{params[current]} {stripped}".strip()
        elif section == "sphinx" and stripped and current is not None and indent > 0:
            params[current] = f"{params[current]} {stripped}".strip()
        i += 1
    text = "\n".join(description).strip()
    return re.sub(r"\n{3,}", "\n\n", text), {k: v for k, v in params.items() if v}


def input_schema(
    parameters: typing.Mapping[str, tuple[Any, bool]],
    defaults: typing.Mapping[str, Any],
    docs: typing.Mapping[str, str],
    *,
    accepts_extra: bool,
) -> dict[str, Any]:
    """The ``input_schema`` object for a tool whose Command parameters are *parameters*
    (name -> (annotation, required)); *defaults* holds the defaults of optional ones."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, (annotation, is_required) in parameters.items():
        schema = type_schema(annotation)
        if name in docs:
            schema["description"] = docs[name]
        if is_required:
            required.append(name)
        elif name in defaults and _is_json(defaults[name]):
            schema["default"] = _plain(defaults[name])
        properties[name] = schema
    out: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if not accepts_extra:
        out["additionalProperties"] = False
    return out


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _is_json(value: Any) -> bool:
    try:
        json.dumps(_plain(value), allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
