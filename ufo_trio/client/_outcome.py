"""How a task ended, and a readable rendering of it."""

from __future__ import annotations

import json
from typing import Any

import attrs

from ._plan import Plan, StepResult, parse_steps


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

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _summary(value: Any, limit: int = 100) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_outcome(outcome: TaskOutcome, plan: Plan | None = None) -> str:
    """Several lines for a terminal: status line, then one line per Result when the result
    is a ``script`` agent step list (labelled with tool names when *plan* is given)."""
    name = outcome.task_name or "task"
    lines = [f"{outcome.status}: {name} (session {outcome.session_id})"]
    if outcome.error:
        code = f" [{outcome.code}]" if outcome.code else ""
        lines.append(f"  error: {outcome.error}{code}")
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
