"""The pluggable session brain (§4.6) and the built-in `script` agent (§4.7)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import cattrs

from ._codec import converter
from ._config import LLM_AGENTS
from ._errors import ConfigError, UfoTrioError
from ._messages import ClientType, Command, Result, ResultStatus

if TYPE_CHECKING:
    import logging
    from collections.abc import Mapping

__all__ = [
    "Agent",
    "AgentFactory",
    "ScriptAgent",
    "SessionContext",
    "TaskFailed",
    "UnsupportedPlatform",
    "load_agent_factory",
]


class TaskFailed(UfoTrioError):
    """Raise from `Agent.run` to end the session `failed` with this error and result (END-4)."""

    def __init__(self, error: str, result: Any = None) -> None:
        super().__init__(error)
        self.error = error
        self.result = result


class UnsupportedPlatform(UfoTrioError):
    """Raise from an agent factory to refuse a platform (TASK-7)."""


class SessionContext(Protocol):
    """What an agent sees of its session (AGENT-2)."""

    session_id: str
    task_name: str
    request: str
    platform: str
    requester_id: str
    #: The requester's role; a `StrEnum`, so it equals (and serialises as) its wire string.
    requester_type: ClientType
    executor_id: str
    #: The executor device's `system_info` from its REGISTER metadata, or None (read it only).
    system_info: Mapping[str, Any] | None
    log: logging.LoggerAdapter[logging.Logger]

    async def execute(
        self,
        commands: list[Command],
        *,
        agent_name: str | None = None,
        process_name: str | None = None,
        root_name: str | None = None,
    ) -> list[Result]:
        """Send one COMMAND to the executor and wait for its results (AGENT-3).

        Returns one Result per Command, in order; device-side failures and timeouts come back as
        `failure` Results. Raises only `trio.Cancelled`.
        """
        ...

    async def record_model_turn(self, turn: Mapping[str, Any]) -> None:
        """Keep one model turn (a JSON object, secrets already removed) in the task history,
        with the COMMAND it leads to (the next `execute`). Never waits for the disk."""
        ...

    async def hold_cpu(self) -> None:
        """Optional, for agents with CPU-heavy steps (the llm agent): wait (FIFO) for a slot of
        the server's session CPU gate, so a burst of sessions woken together does not hold up
        other clients' frames. Hold it only for CPU work: `execute` gives it back while the
        device works and takes it again for the results; call `release_cpu` before any other
        wait (a model call, a sleep). The session's end releases it in any case."""
        ...

    def release_cpu(self) -> None:
        """Give back the slot taken by `hold_cpu` (no-op if none is held)."""
        ...


@runtime_checkable
class Agent(Protocol):
    """A session's brain: `run` drives the session and returns its JSON-serialisable result."""

    async def run(self, ctx: SessionContext) -> Any: ...


AgentFactory = Callable[[str], Agent]
"""`factory(platform) -> Agent`, called once per accepted TASK (AGENT-1)."""


# ------------------------------------------------------------------------------ script agent

_PREFIX = "script agent: "


class _BadPlan(Exception):
    pass


def _parse_plan(request: str) -> tuple[list[list[Command]], bool, dict[str, str]]:
    try:
        plan = json.loads(request)
    except (ValueError, RecursionError):
        raise _BadPlan("request is not valid JSON") from None
    if type(plan) is not dict:
        raise _BadPlan("request must be a JSON object")
    steps = plan.get("steps")
    if type(steps) is not list or any(type(s) is not list or not s for s in steps):
        raise _BadPlan("'steps' must be a list of non-empty lists of commands")
    parsed: list[list[Command]] = []
    for i, step in enumerate(steps):
        commands = []
        for j, raw in enumerate(step):
            try:
                commands.append(converter.structure(raw, Command))
            except (cattrs.BaseValidationError, ValueError, TypeError, KeyError):
                raise _BadPlan(f"steps[{i}][{j}] is not a valid command") from None
            except Exception:
                raise _BadPlan(f"steps[{i}][{j}] is not a valid command") from None
        parsed.append(commands)
    on_failure = plan.get("on_failure", "stop")
    if on_failure not in ("stop", "continue") or type(on_failure) is not str:
        raise _BadPlan("'on_failure' must be 'stop' or 'continue'")
    names: dict[str, str] = {}
    for key in ("agent_name", "process_name", "root_name"):
        if key in plan:
            value = plan[key]
            if type(value) is not str:
                raise _BadPlan("'agent_name', 'process_name' and 'root_name' must be strings")
            names[key] = value
    return parsed, on_failure == "stop", names


class ScriptAgent:
    """SCRIPT-1…3: runs a JSON plan of steps, one COMMAND per step."""

    async def run(self, ctx: SessionContext) -> Any:
        try:
            steps, stop_on_failure, names = _parse_plan(ctx.request)
        except _BadPlan as exc:
            raise TaskFailed(_PREFIX + str(exc)) from None
        results: list[dict[str, Any]] = []
        for i, commands in enumerate(steps):
            step_results = await ctx.execute(commands, **names)
            results.append({"step": i, "results": step_results})
            if stop_on_failure:
                for result in step_results:
                    if result.status is ResultStatus.FAILURE:
                        raise TaskFailed(
                            f"step {i} failed: {result.error or 'unknown error'}", results
                        )
        return results


def script_agent_factory(platform: str) -> Agent:
    """The built-in `script` agent accepts every platform."""
    return ScriptAgent()


BUILTIN_AGENTS: dict[str, AgentFactory] = {"script": script_agent_factory}


def load_agent_factory(spec: str) -> AgentFactory:
    """`script` or `package.module:callable` → factory. Raises `ConfigError` with one line."""
    if spec in BUILTIN_AGENTS:
        return BUILTIN_AGENTS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"agent must be one of {', '.join([*BUILTIN_AGENTS, *LLM_AGENTS])} or 'package.module:callable', "
            f"got {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"cannot import agent module {module_name!r}: {exc}") from None
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ConfigError(f"agent module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError(f"agent {spec!r} is not callable")
    return factory  # type: ignore[no-any-return]
