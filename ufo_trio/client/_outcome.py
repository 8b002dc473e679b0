"""How a task ended, and a readable rendering of it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from ._plan import Plan, StepResult, parse_steps
from ._wire import ToolResult


@attrs.frozen(kw_only=True)
class TaskOutcome:
    """The end of one task: its TASK_END, or the ERROR that rejected the TASK.

    ``status`` is ``"completed"`` or ``"failed"``; ``result`` and ``error`` are the TASK_END's.
    ``code`` is set only when the server rejected the TASK before it started (the ERROR's
    code, e.g. ``unknown_target``); ``task_name`` is the server's sanitised name when known.
    """

    status: str
    session_id: str
    task_name: str | None = None
    result: Any = None
    error: str | None = None
    code: str | None = None

    @property
    def ok(self) -> bool:
        """True when the task completed."""
        return self.status == "completed"

    @property
    def rejected(self) -> bool:
        """True when the server refused the TASK, so nothing ran."""
        return self.code is not None

    @property
    def steps(self) -> list[StepResult] | None:
        """The ``script`` agent's per-step Results, or ``None`` for other result shapes."""
        return parse_steps(self.result)

    @property
    def answer(self) -> str | None:
        """The ``llm`` agent's final answer, or ``None`` for other result shapes."""
        parsed = parse_agent_result(self.result)
        return parsed.answer if parsed is not None else None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class AgentCall:
    """One tool call of an ``llm`` agent step and the Result the device gave it."""

    name: str
    arguments: str
    result: ToolResult | None


@attrs.frozen(kw_only=True)
class AgentResult:
    """An ``llm`` agent result: ``{"answer", "steps": [{"tool_calls", "results"}], "usage"}``."""

    answer: str
    steps: tuple[tuple[AgentCall, ...], ...]
    usage: Mapping[str, Any]


def parse_agent_result(result: Any) -> AgentResult | None:
    """Read an ``llm`` agent's result; ``None`` if *result* does not have that shape.

    Tool calls are as the server records them (``{"id", "tool_name", "parameters"}``; a call
    the agent refused has ``tool_name: null`` and the model's ``function`` name) or in OpenAI
    form (``{"id", "type", "function": {"name", "arguments"}}``); each is paired with the Result whose ``call_id`` is the call's ``id``, else with the Result
    at the same position.
    """
    if not isinstance(result, Mapping) or not isinstance(result.get("answer"), str):
        return None
    raw_steps = result.get("steps", [])
    if not isinstance(raw_steps, list):
        return None
    steps: list[tuple[AgentCall, ...]] = []
    for raw in raw_steps:
        if not isinstance(raw, Mapping):
            return None
        calls = raw.get("tool_calls") or []
        results = [
            ToolResult.from_wire(r) for r in raw.get("results") or [] if isinstance(r, Mapping)
        ]
        if not isinstance(calls, list):
            return None
        by_id = {r.call_id: r for r in results if r.call_id}
        step: list[AgentCall] = []
        for i, call in enumerate(calls):
            call = call if isinstance(call, Mapping) else {}
            function = call.get("function")
            function = function if isinstance(function, Mapping) else {}
            call_id = call.get("id")
            matched = by_id.get(call_id) if isinstance(call_id, str) else None
            if matched is None and i < len(results):
                matched = results[i]
            if "tool_name" in call:  # the server's record: {"id", "tool_name", "parameters"}
                # (or {"id", "tool_name": null, "function"} for a call that never ran)
                name = call.get("tool_name") or call.get("function") or "?"
                arguments: Any = call.get("parameters")
                if arguments is None and call.get("tool_name") is None:
                    arguments = ""
            else:  # OpenAI form
                name = function.get("name") or "?"
                arguments = function.get("arguments")
            step.append(
                AgentCall(
                    name=str(name),
                    arguments=arguments if isinstance(arguments, str) else _summary(arguments),
                    result=matched,
                )
            )
        steps.append(tuple(step))
    usage = result.get("usage")
    return AgentResult(
        answer=result["answer"],
        steps=tuple(steps),
        usage=usage if isinstance(usage, Mapping) else {},
    )


def _summary(value: Any, limit: int = 100) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_outcome(outcome: TaskOutcome, plan: Plan | None = None) -> str:
    """Several lines for a terminal: status line, then one line per Result when the result
    is a ``script`` agent step list (labelled with tool names when *plan* is given), or the
    answer, each step's tool calls with their outcomes and the token usage when it is an
    ``llm`` agent result."""
    name = outcome.task_name or "task"
    lines = [f"{outcome.status}: {name} (session {outcome.session_id})"]
    if outcome.error:
        code = f" [{outcome.code}]" if outcome.code else ""
        lines.append(f"  error: {outcome.error}{code}")
    agent = parse_agent_result(outcome.result)
    if agent is not None:
        return "\n".join([*lines, *_agent_lines(agent)])
    steps = outcome.steps
    if steps is None:
        if outcome.result is not None:
            lines.append(f"  result: {_summary(outcome.result, 300)}")
        return "\n".join(lines)
    names = plan.tool_names() if plan is not None else []
    for step in steps:
        for j, result in enumerate(step.results):
            tool = (
                names[step.step][j]
                if step.step < len(names) and j < len(names[step.step])
                else f"#{j}"
            )
            detail = result.error if result.status != "success" else _summary(result.result)
            lines.append(f"  step {step.step} {tool or '(none)'}: {result.status} {detail}")
    return "\n".join(lines)


def _agent_lines(agent: AgentResult) -> list[str]:
    lines: list[str] = []
    for index, step in enumerate(agent.steps):
        for call in step:
            arguments = _compact(call.arguments)
            head = f"  step {index} {call.name}" + (f" {arguments}" if arguments else "")
            result = call.result
            if result is None:
                lines.append(f"{head} -> (no result)")
            elif result.status == "success":
                lines.append(f"{head} -> success {_summary(result.result)}")
            else:
                lines.append(f"{head} -> {result.status} {result.error or ''}".rstrip())
    if agent.answer:
        first, *rest = agent.answer.splitlines() or [""]
        lines.append(f"  answer: {first}")
        lines.extend(f"          {line}" if line else "" for line in rest)
    prompt = agent.usage.get("prompt_tokens")
    completion = agent.usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        lines.append(f"  tokens: {prompt} prompt, {completion} completion")
    return lines


def _compact(arguments: str, limit: int = 100) -> str:
    """Model-written JSON arguments on one line, cut to *limit* characters."""
    try:
        text = json.dumps(json.loads(arguments), ensure_ascii=False, separators=(",", ":"))
    except ValueError:
        text = " ".join(arguments.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
