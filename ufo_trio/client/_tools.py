"""The device's tool registry: named functions that COMMANDs call.

Pure with respect to the network: the registry turns Commands into Results, and the device
connection only moves frames. The batch rules are the real device's (§1.4): one Result per
Command in order, ``call_id`` echoed, an empty ``tool_name`` is a no-op success, and after the
first ``failure`` the rest are ``skipped``.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import logging
import types
import typing
from collections import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import trio

from ._schema import input_schema, split_docstring, type_schema
from ._wire import (
    NO_ACTION_RESULT,
    SKIPPED_ERROR,
    TOOL_TYPES,
    Command,
    InvalidCommand,
    ToolResult,
    ToolType,
    is_json_value,
)

logger = logging.getLogger("ufo_trio.client")

F = TypeVar("F", bound=Callable[..., Any])

#: Namespace reported in Results when the registry does not set one (§1.4 ``namespace``).
DEFAULT_NAMESPACE = "ufo_trio"
#: Error texts from tools are cut to this length so one bad tool cannot bloat a frame.
MAX_ERROR_LENGTH = 2000
#: The meta tool every device answers (as the real UFO device does): its tool descriptors.
LIST_TOOLS = "list_tools"


class ToolError(Exception):
    """Raise from a tool to report a ``failure`` Result with exactly this message.

    ``result`` (JSON) travels in the Result alongside the error, for example a command's output.
    Any other exception also becomes a failure, reported as ``"<ExceptionType>: <message>"``.
    """

    def __init__(self, message: str, *, result: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result


@attrs.frozen(kw_only=True)
class ToolContext:
    """What a tool may learn about the call. A tool receives it by declaring a parameter
    annotated ``ToolContext``; that parameter is never filled from the Command's parameters."""

    client_id: str
    tool_name: str
    call_id: str | None
    session_id: str | None
    system_info: Mapping[str, Any]


@attrs.frozen(kw_only=True)
class Tool:
    """One registered tool. Build through `ToolRegistry.tool` or `ToolRegistry.add`."""

    name: str
    tool_type: ToolType
    function: Callable[..., Any]
    description: str
    namespace: str
    is_async: bool
    #: Parameters a Command may pass: name -> (annotation, required).
    parameters: Mapping[str, tuple[Any, bool]]
    accepts_extra: bool
    context_parameter: str | None
    #: The full description (docstring text before its sections, or the one given).
    long_description: str = ""
    #: JSON Schema of the Command's ``parameters`` (see docs/sdk.md, "Tool descriptors").
    input_schema: Mapping[str, Any] = attrs.field(factory=dict)
    #: JSON Schema of the Result's ``result`` (from the return annotation; ``{}``: anything).
    output_schema: Mapping[str, Any] = attrs.field(factory=dict)
    #: Parameters annotated with an Enum class: their wire values become members.
    enum_parameters: Mapping[str, type[enum.Enum]] = attrs.field(factory=dict)

    @property
    def tool_key(self) -> str:
        """``"<tool_type>::<name>"``, the real device's key for a tool."""
        return f"{self.tool_type}::{self.name}"

    def descriptor(self) -> dict[str, Any]:
        """This tool as one entry of a ``list_tools`` answer (the real UFO device's shape)."""
        return {
            "tool_key": self.tool_key,
            "tool_name": self.name,
            "namespace": self.namespace,
            "tool_type": self.tool_type,
            "description": self.long_description,
            "input_schema": _copy(self.input_schema),
            "output_schema": _copy(self.output_schema),
        }

    def describe(self) -> dict[str, Any]:
        """A JSON summary: name, type, description and parameter names (for system info)."""
        return {
            "name": self.name,
            "tool_type": self.tool_type,
            "description": self.description,
            "parameters": {
                name: {"type": _type_name(ann), "required": required}
                for name, (ann, required) in self.parameters.items()
            },
        }


class ToolRegistry:
    """Tools a device offers, by name. Not thread-safe; fill it before the device starts.

    ::

        tools = ToolRegistry()

        @tools.tool("add", tool_type="data_collection")
        def add(a: int, b: int) -> int:
            return a + b

    Async functions are awaited; plain functions run in a worker thread (`trio.to_thread`),
    so they may block, but they cannot be interrupted: a lost connection waits for a running
    sync tool to return. Parameters are checked against the signature before the call.
    """

    def __init__(self, *, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = namespace
        self._tools: dict[str, Tool] = {}
        self._meta: dict[tuple[str, str], Tool] = {}

    def tool(
        self,
        name: str | None = None,
        *,
        tool_type: ToolType = "action",
        description: str | None = None,
    ) -> Callable[[F], F]:
        """Decorator form of `add`; returns the function unchanged."""

        def decorate(function: F) -> F:
            self.add(function, name, tool_type=tool_type, description=description)
            return function

        return decorate

    def add(
        self,
        function: Callable[..., Any],
        name: str | None = None,
        *,
        tool_type: ToolType = "action",
        description: str | None = None,
        replace: bool = False,
    ) -> Tool:
        """Register *function* as tool *name* (default: the function's ``__name__``).

        Raises `ValueError` for an empty or taken name, an unknown ``tool_type``, or a
        signature that keyword parameters cannot fill (positional-only or ``*args``).
        """
        tool_name = name if name is not None else getattr(function, "__name__", "")
        if not tool_name:
            raise ValueError("a tool needs a non-empty name")
        if tool_name == LIST_TOOLS:
            raise ValueError(f"{LIST_TOOLS!r} is reserved: every device answers it itself")
        if tool_type not in TOOL_TYPES:
            raise ValueError(f"tool_type must be 'data_collection' or 'action', got {tool_type!r}")
        if tool_name in self._tools and not replace:
            raise ValueError(f"a tool named {tool_name!r} is already registered")
        tool = _build(function, tool_name, tool_type, description, self.namespace)
        self._tools[tool_name] = tool
        return tool

    def include(self, other: ToolRegistry, *, replace: bool = False) -> None:
        """Copy every tool of *other* into this registry (keeping their namespace)."""
        for tool in other:
            if tool.name in self._tools and not replace:
                raise ValueError(f"a tool named {tool.name!r} is already registered")
            self._tools[tool.name] = tool

    def remove(self, name: str) -> None:
        """Unregister *name*; `KeyError` if absent."""
        del self._tools[name]

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def descriptors(
        self,
        tool_type: ToolType | None = None,
        namespace: str | None = None,
        *,
        include_meta: bool = False,
    ) -> list[dict[str, Any]]:
        """What ``list_tools`` answers: one descriptor per tool, in registration order,
        optionally only of one *tool_type* / *namespace*. *include_meta* adds ``list_tools``
        itself (once per tool type), like the real device's ``remove_meta=False``."""
        out = [
            tool.descriptor()
            for tool in self._tools.values()
            if (tool_type is None or tool.tool_type == tool_type)
            and (namespace is None or tool.namespace == namespace)
        ]
        if include_meta and (namespace is None or namespace == self.namespace):
            kinds: tuple[ToolType, ...] = (
                ("action", "data_collection") if tool_type is None else (tool_type,)
            )
            out.extend(self._meta_tool(kind).descriptor() for kind in kinds)
        return out

    def _meta_tool(self, tool_type: ToolType) -> Tool:
        key = (tool_type, self.namespace)
        tool = self._meta.get(key)
        if tool is None:
            tool = self._meta[key] = _build(
                _list_tools_signature, LIST_TOOLS, tool_type, None, self.namespace
            )
        return tool

    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def __repr__(self) -> str:
        return f"ToolRegistry({', '.join(self.names())})"

    # ----------------------------------------------------------------------------- execution

    async def call(self, command: Command, context: ToolContext) -> ToolResult:
        """Run one Command and return its Result. Never raises except `trio.Cancelled`."""
        call_id = command.call_id
        if command.tool_name == LIST_TOOLS:
            return self._list_tools(command)
        tool = self._tools.get(command.tool_name)
        if tool is None:
            known = ", ".join(self.names()) or "none"
            return _failure(
                f"unknown tool {command.tool_name!r} (this device offers: {known})", call_id
            )
        if command.tool_type != tool.tool_type:
            return _failure(
                f"tool {tool.name!r} is a {tool.tool_type} tool; the command asked for "
                f"tool_type {command.tool_type!r}",
                call_id,
                tool.namespace,
            )
        problems = check_parameters(tool, command.parameters or {})
        if problems:
            return _failure(
                f"invalid parameters for tool {tool.name!r}: {'; '.join(problems)}",
                call_id,
                tool.namespace,
            )
        kwargs = dict(command.parameters or {})
        for name, enum_class in tool.enum_parameters.items():
            if kwargs.get(name) is not None:  # a checked value: the tool gets the member
                kwargs[name] = enum_class(kwargs[name])
        if tool.context_parameter is not None:
            kwargs[tool.context_parameter] = context
        try:
            if tool.is_async:
                value = await tool.function(**kwargs)
            else:
                value = await trio.to_thread.run_sync(functools.partial(tool.function, **kwargs))
        except ToolError as exc:
            result = exc.result if is_json_value(exc.result) else None
            return _failure(exc.message, call_id, tool.namespace, result=result)
        except Exception as exc:  # a tool's bug becomes that call's failure, not the device's
            logger.debug("tool %r raised", tool.name, exc_info=True)
            return _failure(_describe_exception(exc), call_id, tool.namespace)
        if not is_json_value(value):
            return _failure(
                f"tool {tool.name!r} returned a non-JSON-serialisable "
                f"{type(value).__name__}",
                call_id,
                tool.namespace,
            )
        return ToolResult(status="success", result=value, namespace=tool.namespace, call_id=call_id)

    def _list_tools(self, command: Command) -> ToolResult:
        # Any tool_type is accepted: the real device registers list_tools under both.
        meta = self._meta_tool(command.tool_type)
        given = command.parameters or {}
        problems = check_parameters(meta, given)
        if problems:
            return _failure(
                f"invalid parameters for tool {LIST_TOOLS!r}: {'; '.join(problems)}",
                command.call_id,
                self.namespace,
            )
        result = self.descriptors(
            given.get("tool_type"),
            given.get("namespace"),
            include_meta=given.get("remove_meta", True) is False,
        )
        return ToolResult(
            status="success", result=result, namespace=self.namespace, call_id=command.call_id
        )

    async def run_batch(
        self,
        commands: Sequence[Command | InvalidCommand],
        context_for: Callable[[Command], ToolContext],
    ) -> list[ToolResult]:
        """Run a COMMAND's actions one after another with the device rules of §1.4."""
        results: list[ToolResult] = []
        failed = False
        for command in commands:
            if failed:
                results.append(
                    ToolResult(status="skipped", error=SKIPPED_ERROR, call_id=command.call_id)
                )
            elif isinstance(command, InvalidCommand):
                results.append(_failure(f"invalid command: {command.problem}", command.call_id))
                failed = True
            elif command.tool_name == "":
                results.append(
                    ToolResult(status="success", result=NO_ACTION_RESULT, call_id=command.call_id)
                )
            else:
                result = await self.call(command, context_for(command))
                results.append(result)
                failed = result.status == "failure"
        return results


def _list_tools_signature(
    tool_type: typing.Literal["action", "data_collection"] | None = None,
    namespace: str | None = None,
    remove_meta: bool = True,
) -> list[dict[str, Any]]:
    """List the tools this device offers, with a JSON Schema of each tool's parameters.

    Args:
        tool_type: Only tools of this type ("action" or "data_collection"); all when null.
        namespace: Only tools of this namespace; all when null.
        remove_meta: Leave out list_tools itself (default true).
    """
    raise NotImplementedError  # pragma: no cover - only its signature and docstring are used


def _build(
    function: Callable[..., Any],
    tool_name: str,
    tool_type: ToolType,
    description: str | None,
    namespace: str,
) -> Tool:
    spec = _inspect(function, tool_name)
    text, parameter_docs = split_docstring(inspect.getdoc(function) or "")
    long_description = text if description is None else description.strip()
    return Tool(
        name=tool_name,
        tool_type=tool_type,
        function=function,
        description=long_description.splitlines()[0] if long_description else "",
        namespace=namespace,
        is_async=_is_async(function),
        parameters=spec.parameters,
        accepts_extra=spec.accepts_extra,
        context_parameter=spec.context_parameter,
        long_description=long_description,
        input_schema=input_schema(
            spec.parameters, spec.defaults, parameter_docs, accepts_extra=spec.accepts_extra
        ),
        output_schema=type_schema(spec.returns),
        enum_parameters={
            name: enum_class
            for name, (annotation, _required) in spec.parameters.items()
            if (enum_class := _enum_class(annotation)) is not None
        },
    )


def _enum_class(annotation: Any) -> type[enum.Enum] | None:
    """The Enum class of an ``E`` or ``E | None`` annotation, else ``None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            return None
        annotation = members[0]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation
    return None


def _copy(schema: Mapping[str, Any]) -> dict[str, Any]:
    # Descriptors leave the registry as JSON: a deep copy keeps callers from editing ours.
    copied: dict[str, Any] = json.loads(json.dumps(schema))
    return copied


def _failure(
    error: str, call_id: str | None, namespace: str | None = None, *, result: Any = None
) -> ToolResult:
    if len(error) > MAX_ERROR_LENGTH:
        error = error[: MAX_ERROR_LENGTH - 1] + "…"
    return ToolResult(
        status="failure", error=error, result=result, namespace=namespace, call_id=call_id
    )


def _describe_exception(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_async(function: Callable[..., Any]) -> bool:
    target = function
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # noqa: B004  (callable objects with async __call__)
    return call is not None and inspect.iscoroutinefunction(call)


# --------------------------------------------------------------------------------- signatures


@attrs.frozen
class _Spec:
    parameters: dict[str, tuple[Any, bool]]
    accepts_extra: bool
    context_parameter: str | None
    defaults: dict[str, Any]
    returns: Any


def _inspect(function: Callable[..., Any], tool_name: str) -> _Spec:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot read the signature of tool {tool_name!r}: {exc}") from None
    parameters: dict[str, tuple[Any, bool]] = {}
    defaults: dict[str, Any] = {}
    accepts_extra = False
    context_parameter: str | None = None
    for param in signature.parameters.values():
        annotation = _resolve(param.annotation, function)
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_extra = True
        elif param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            raise ValueError(
                f"tool {tool_name!r}: parameter {param.name!r} cannot be passed by keyword; "
                "tool parameters come from a JSON object"
            )
        elif annotation is ToolContext:
            context_parameter = param.name
        else:
            parameters[param.name] = (annotation, param.default is inspect.Parameter.empty)
            if param.default is not inspect.Parameter.empty:
                defaults[param.name] = param.default
    returns = _resolve(signature.return_annotation, function)
    return _Spec(parameters, accepts_extra, context_parameter, defaults, returns)


def _resolve(annotation: Any, function: Callable[..., Any]) -> Any:
    """Evaluate one parameter's annotation. Each is resolved on its own, so an annotation that
    cannot be resolved (say, a name imported only under TYPE_CHECKING) costs only its own
    type check, never the whole signature; it is then treated as ``Any``."""
    if annotation is inspect.Parameter.empty:
        return Any
    if not isinstance(annotation, str):
        return annotation
    target = inspect.unwrap(function)
    while isinstance(target, functools.partial):
        target = target.func
    namespace = dict(getattr(target, "__globals__", {}))
    try:
        return eval(annotation, namespace)  # the function's own annotation, as typing does
    except Exception:
        return ToolContext if annotation == "ToolContext" else Any


def check_parameters(tool: Tool, given: Mapping[str, Any]) -> list[str]:
    """Problems with *given* as arguments for *tool*, in a stable order; empty when fine."""
    problems: list[str] = []
    for name, (_ann, required) in tool.parameters.items():
        if required and name not in given:
            problems.append(f"missing required parameter {name!r}")
    for name, value in given.items():
        spec = tool.parameters.get(name)
        if spec is None:
            if name == tool.context_parameter or not tool.accepts_extra:
                accepted = ", ".join(tool.parameters) or "no parameters"
                problems.append(f"unexpected parameter {name!r} (accepted: {accepted})")
            continue
        annotation = spec[0]
        if not matches(value, annotation):
            problems.append(
                f"parameter {name!r} must be {_type_name(annotation)}, got {_json_type(value)}"
            )
    return problems


def matches(value: Any, annotation: Any) -> bool:
    """Does the JSON *value* fit *annotation*? Types the checker does not know always fit."""
    if annotation is Any or annotation is object or annotation is inspect.Parameter.empty:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin is typing.Annotated:
        return matches(value, args[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return any(value == member.value for member in annotation)
    if annotation is list or origin is list or origin is abc.Sequence:
        if not isinstance(value, list):
            return False
        return not args or all(matches(item, args[0]) for item in value)
    if annotation is dict or origin is dict or origin is abc.Mapping:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(matches(item, args[1]) for item in value.values())
    return True


def _type_name(annotation: Any) -> str:
    """A short JSON-flavoured name: ``string``, ``array[integer]``, ``string|null``..."""
    if annotation is Any or annotation is object or annotation is inspect.Parameter.empty:
        return "any"
    if annotation is None or annotation is type(None):
        return "null"
    simple = {bool: "boolean", int: "integer", float: "number", str: "string",
              list: "array", dict: "object"}
    if annotation in simple:
        return simple[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return "|".join(_type_name(arg) for arg in args)
    if origin is typing.Literal:
        return "|".join(json.dumps(arg) for arg in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "|".join(json.dumps(member.value) for member in annotation)
    if origin is list or origin is abc.Sequence:
        return f"array[{_type_name(args[0])}]" if args else "array"
    if origin is dict or origin is abc.Mapping:
        return "object"
    return getattr(annotation, "__name__", str(annotation))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
