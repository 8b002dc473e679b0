"""Plans for the server's built-in ``script`` agent (§4.7), checked before they are sent.

A plan is ``{"steps": [[Command, ...], ...], "on_failure": "stop"|"continue"}``; each step is
one COMMAND frame. `parse_plan` accepts two shorthands that it expands: a bare list of steps,
and a single command object in place of a one-command step; a command without ``tool_type``
gets ``"action"``. Whatever the input, `Plan.to_json` produces the canonical form the server
validates (SCRIPT-2), so the server never sees a shorthand.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from ._errors import PlanError
from ._wire import TOOL_TYPES, Command, ToolResult

OnFailure = Literal["stop", "continue"]


@attrs.frozen(kw_only=True)
class Plan:
    """A ``script`` agent plan. Build with `Plan.of`, `parse_plan` or `load_plan`."""

    steps: tuple[tuple[Command, ...], ...]
    on_failure: OnFailure = "stop"
    agent_name: str | None = None
    process_name: str | None = None
    root_name: str | None = None

    @classmethod
    def of(
        cls,
        *steps: Command | Iterable[Command],
        on_failure: OnFailure = "stop",
        agent_name: str | None = None,
    ) -> Plan:
        """``Plan.of(step, step, ...)``; a step is a `Command` or an iterable of them."""
        built: list[tuple[Command, ...]] = []
        for step in steps:
            commands = (step,) if isinstance(step, Command) else tuple(step)
            if not commands:
                raise PlanError(f"step {len(built)} has no commands")
            built.append(commands)
        if on_failure not in ("stop", "continue"):
            raise PlanError("on_failure must be 'stop' or 'continue'")
        return cls(steps=tuple(built), on_failure=on_failure, agent_name=agent_name)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "steps": [[command.to_wire() for command in step] for step in self.steps],
            "on_failure": self.on_failure,
        }
        for key in ("agent_name", "process_name", "root_name"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def to_json(self) -> str:
        """The TASK ``request`` text for this plan."""
        return json.dumps(self.to_wire(), separators=(",", ":"), ensure_ascii=False)

    def tool_names(self) -> list[list[str]]:
        """Tool names per step, for labelling results (Results do not carry them)."""
        return [[command.tool_name for command in step] for step in self.steps]


def _command(raw: Any, where: str) -> Command:
    if not isinstance(raw, Mapping):
        raise PlanError(f"{where} must be a command object with a tool_name")
    tool_name = raw.get("tool_name")
    if not isinstance(tool_name, str):
        raise PlanError(f"{where}: tool_name must be a string")
    parameters = raw.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise PlanError(f"{where}: parameters must be an object")
    tool_type = raw.get("tool_type", "action")
    if tool_type not in TOOL_TYPES:
        raise PlanError(f"{where}: tool_type must be 'data_collection' or 'action'")
    call_id = raw.get("call_id")
    if call_id is not None and not isinstance(call_id, str):
        raise PlanError(f"{where}: call_id must be a string")
    return Command(
        tool_name=tool_name, parameters=parameters, tool_type=tool_type, call_id=call_id
    )


def plan_from_json(value: Any) -> Plan:
    """Validate a decoded JSON plan (object, or bare list of steps). Raises `PlanError`."""
    if isinstance(value, list):
        value = {"steps": value}
    if not isinstance(value, Mapping):
        raise PlanError("a plan must be a JSON object with 'steps' (or a list of steps)")
    raw_steps = value.get("steps")
    if not isinstance(raw_steps, list):
        raise PlanError("'steps' must be a list of steps")
    steps: list[tuple[Command, ...]] = []
    for i, raw_step in enumerate(raw_steps):
        if isinstance(raw_step, Mapping):
            raw_step = [raw_step]
        if not isinstance(raw_step, list) or not raw_step:
            raise PlanError(f"steps[{i}] must be a non-empty list of commands")
        steps.append(tuple(_command(c, f"steps[{i}][{j}]") for j, c in enumerate(raw_step)))
    on_failure = value.get("on_failure", "stop")
    if on_failure not in ("stop", "continue"):
        raise PlanError("'on_failure' must be 'stop' or 'continue'")
    names: dict[str, str | None] = {}
    for key in ("agent_name", "process_name", "root_name"):
        name = value.get(key)
        if name is not None and not isinstance(name, str):
            raise PlanError(f"'{key}' must be a string")
        names[key] = name
    return Plan(steps=tuple(steps), on_failure=on_failure, **names)


def parse_plan(text: str) -> Plan:
    """Parse plan JSON text. Raises `PlanError` with the first problem."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise PlanError(f"plan is not valid JSON: {exc}") from None
    return plan_from_json(value)


def load_plan(argument: str) -> Plan:
    """A plan from a CLI argument: JSON text, or ``@path`` to read a JSON file."""
    if argument.startswith("@"):
        path = Path(argument[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"cannot read plan file {str(path)!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise PlanError(f"plan file {str(path)!r} is not UTF-8 text") from None
        try:
            return parse_plan(text)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None
    return parse_plan(argument)


@attrs.frozen(kw_only=True)
class StepResult:
    """One step of a ``script`` agent result: ``{"step": i, "results": [Result, ...]}``."""

    step: int
    results: tuple[ToolResult, ...]


def parse_steps(result: Any) -> list[StepResult] | None:
    """Read a ``script`` agent's result list; ``None`` if *result* does not have that shape."""
    if not isinstance(result, Sequence) or isinstance(result, str | bytes):
        return None
    steps: list[StepResult] = []
    for entry in result:
        if (
            not isinstance(entry, Mapping)
            or not isinstance(entry.get("step"), int)
            or not isinstance(entry.get("results"), list)
        ):
            return None
        steps.append(
            StepResult(
                step=entry["step"],
                results=tuple(ToolResult.from_wire(r) for r in entry["results"]),
            )
        )
    return steps
