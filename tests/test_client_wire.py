"""Pure parts of the client SDK: frames, plans, outcomes, backoff, URLs and the public surface."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ufo_trio.client as client
from ufo_trio.client import (
    Backoff,
    Command,
    Plan,
    PlanError,
    TaskOutcome,
    ToolResult,
    format_outcome,
    load_plan,
    parse_plan,
)
from ufo_trio.client._link import check_url, redact, with_token
from ufo_trio.client._wire import (
    FrameError,
    InvalidCommand,
    ServerFrame,
    command_results_frame,
    device_info_request_frame,
    heartbeat_frame,
    parse_command,
    parse_server_frame,
    register_frame,
    task_frame,
)

CLIENT_DIR = Path(client.__file__).parent


# ------------------------------------------------------------------------------- surface


def test_public_surface_is_pinned() -> None:
    assert sorted(client.__all__) == [
        "ApiUnavailable",
        "AuthenticationFailed",
        "Backoff",
        "ClientError",
        "Command",
        "ConnectFailed",
        "ConnectionLost",
        "Constellation",
        "Device",
        "DeviceNotFound",
        "Plan",
        "PlanError",
        "ProtocolViolation",
        "RegistrationRefused",
        "RequestRejected",
        "RequestTimeout",
        "StepResult",
        "TLSError",
        "TaskOutcome",
        "Tool",
        "ToolContext",
        "ToolError",
        "ToolRegistry",
        "ToolResult",
        "client_context",
        "collect_system_info",
        "default_tools",
        "format_outcome",
        "list_clients",
        "load_plan",
        "open_constellation",
        "open_device",
        "parse_plan",
        "run_device",
    ]
    for name in client.__all__:
        assert getattr(client, name).__module__.startswith("ufo_trio.client")


def test_errors_form_one_hierarchy() -> None:
    # ToolError is raised *by tools* to report a failure Result, never by the SDK.
    for name in sorted(set(client.__all__) - {"ToolError"}):
        obj = getattr(client, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, client.ClientError), name


def test_sdk_never_imports_the_server() -> None:
    # The SDK is an outside check of the wire protocol: no ufo_trio._* (server) imports and no
    # relative imports that climb out of the subpackage.
    for path in sorted(CLIENT_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from outside ufo_trio.client"
                module = node.module or ""
                if node.level == 0:
                    assert not module.startswith("ufo_trio"), f"{path.name}: from {module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("ufo_trio"), f"{path.name}: {alias.name}"


# ------------------------------------------------------------------------------- server frames


def test_parse_server_frame_keeps_what_clients_use() -> None:
    text = json.dumps(
        {
            "type": "error",
            "status": "error",
            "user_request": None,
            "error": "nope",
            "session_id": "s",
            "response_id": "r",
            "result": None,
            "code": "unknown_target",
            "timestamp": "2026-01-01T12:00:00+00:00",
            "future_key": [1, 2],
        }
    )
    frame = parse_server_frame(text)
    assert frame.type == "error"
    assert frame.code == "unknown_target"
    assert frame.session_id == "s"
    assert frame.response_id == "r"
    assert frame.raw["future_key"] == [1, 2]


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"heartbeat","status":"ok"}',
        "not json",
        "[1, 2]",
        '{"status":"ok"}',
        '{"type":"HEARTBEAT","status":"ok"}',
        '{"type":"register","status":"ok"}',
        '{"type":"heartbeat"}',
        '{"type":"heartbeat","status":"success"}',
    ],
)
def test_frames_clients_must_drop(data: str | bytes) -> None:
    with pytest.raises(FrameError):
        parse_server_frame(data)


def test_non_string_fields_are_read_as_absent() -> None:
    frame = parse_server_frame('{"type":"task_end","status":"failed","session_id":5,"error":[]}')
    assert frame.session_id is None
    assert frame.error is None


@given(st.text(max_size=200) | st.binary(max_size=50))
def test_junk_never_raises_anything_but_frame_error(data: str | bytes) -> None:
    try:
        parse_server_frame(data)
    except FrameError:
        pass


# ------------------------------------------------------------------------------- commands


def test_parse_command() -> None:
    assert parse_command(
        {"tool_name": "t", "parameters": {"a": 1}, "tool_type": "action", "call_id": "c", "x": 1}
    ) == Command(tool_name="t", parameters={"a": 1}, tool_type="action", call_id="c")
    assert parse_command({"tool_name": "t", "tool_type": "data_collection"}) == Command(
        tool_name="t", tool_type="data_collection"
    )


@pytest.mark.parametrize(
    ("raw", "problem", "call_id"),
    [
        ("x", "a command must be a JSON object", None),
        ({"tool_type": "action", "call_id": "c"}, "tool_name must be a string", "c"),
        ({"tool_name": "t", "tool_type": "act"}, "tool_type must be 'data_collection' or 'action'", None),
        ({"tool_name": "t", "tool_type": "action", "parameters": [1]}, "parameters must be a JSON object", None),
        ({"tool_name": "t", "tool_type": "action", "call_id": 3}, "call_id must be a string", None),
    ],
)
def test_parse_command_invalid(raw: Any, problem: str, call_id: str | None) -> None:
    assert parse_command(raw) == InvalidCommand(problem=problem, call_id=call_id)


# ------------------------------------------------------------------------------- client frames


def test_register_frame() -> None:
    frame = register_frame("dev-1", "device", metadata={"platform": "linux"})
    assert frame["type"] == "register"
    assert frame["status"] == "ok"
    assert frame["client_type"] == "device"
    assert frame["client_id"] == "dev-1"
    assert frame["metadata"] == {"platform": "linux"}
    assert "target_id" not in frame
    scoped = register_frame("c", "constellation", target_id="dev-1")
    assert scoped["target_id"] == "dev-1"


def test_command_results_answer_the_command() -> None:
    command = ServerFrame(type="command", status="continue", session_id="S", response_id="R1")
    frame = command_results_frame(
        "dev-1", command, [ToolResult(status="success", result=[1], call_id="C1")]
    )
    assert frame["type"] == "command_results"
    assert frame["status"] == "continue"
    assert frame["client_type"] == "device"
    assert frame["client_id"] == "dev-1"
    assert frame["session_id"] == "S"
    assert frame["prev_response_id"] == "R1"
    assert frame["action_results"] == [
        {"status": "success", "error": None, "result": [1], "namespace": None, "call_id": "C1"}
    ]


def test_task_heartbeat_and_device_info_frames() -> None:
    task = task_frame(
        "c", "constellation", request="{}", session_id="s", task_name="t", target_id="d",
        request_id="q",
    )
    assert {k: task[k] for k in ("type", "status", "request", "session_id", "task_name",
                                 "target_id", "request_id")} == {
        "type": "task", "status": "continue", "request": "{}", "session_id": "s",
        "task_name": "t", "target_id": "d", "request_id": "q",
    }
    beat = heartbeat_frame("c", "constellation")
    assert (beat["type"], beat["status"], beat["client_type"]) == ("heartbeat", "ok", "constellation")
    info = device_info_request_frame("c", target_id="d", request_id="q")
    assert (info["type"], info["target_id"], info["request_id"]) == ("device_info_request", "d", "q")


# ------------------------------------------------------------------------------- plans


def test_plan_of_and_to_json_is_the_script_agent_format() -> None:
    plan = Plan.of(
        Command(tool_name="echo", parameters={"text": "hi"}),
        [Command(tool_name="list_dir", tool_type="data_collection"), Command(tool_name="")],
        on_failure="continue",
    )
    assert json.loads(plan.to_json()) == {
        "steps": [
            [{"tool_name": "echo", "parameters": {"text": "hi"}, "tool_type": "action"}],
            [
                {"tool_name": "list_dir", "parameters": None, "tool_type": "data_collection"},
                {"tool_name": "", "parameters": None, "tool_type": "action"},
            ],
        ],
        "on_failure": "continue",
    }
    assert plan.tool_names() == [["echo"], ["list_dir", ""]]
    with pytest.raises(PlanError, match="step 0 has no commands"):
        Plan.of([])


def test_parse_plan_expands_shorthands() -> None:
    full = parse_plan(
        '{"steps": [[{"tool_name": "echo", "tool_type": "action", "parameters": {"text": "a"}}]],'
        ' "on_failure": "stop", "agent_name": "LinuxAgent", "extra": 1}'
    )
    short = parse_plan('[{"tool_name": "echo", "parameters": {"text": "a"}}]')
    assert full.steps == short.steps
    assert full.agent_name == "LinuxAgent"
    assert json.loads(short.to_json())["steps"][0][0]["tool_type"] == "action"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "plan is not valid JSON"),
        ('"x"', "a plan must be a JSON object"),
        ("{}", "'steps' must be a list"),
        ('{"steps": [[]]}', r"steps\[0\] must be a non-empty list"),
        ('{"steps": [3]}', r"steps\[0\] must be a non-empty list"),
        ('[[{"tool_name": "a"}, 1]]', r"steps\[0\]\[1\] must be a command object"),
        ('[[{"tool_name": 1}]]', r"steps\[0\]\[0\]: tool_name must be a string"),
        ('[[{"tool_name": "a", "tool_type": "x"}]]', "tool_type must be"),
        ('[[{"tool_name": "a", "parameters": 1}]]', "parameters must be an object"),
        ('{"steps": [], "on_failure": "retry"}', "'on_failure' must be 'stop' or 'continue'"),
        ('{"steps": [], "agent_name": 1}', "'agent_name' must be a string"),
    ],
)
def test_parse_plan_errors(text: str, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        parse_plan(text)


def test_load_plan_from_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('[[{"tool_name": "echo", "parameters": {"text": "x"}}]]', encoding="utf-8")
    assert load_plan(f"@{path}").tool_names() == [["echo"]]
    with pytest.raises(PlanError, match="cannot read plan file"):
        load_plan(f"@{tmp_path / 'missing.json'}")
    path.write_text("{", encoding="utf-8")
    with pytest.raises(PlanError, match=f"{path}: plan is not valid JSON"):
        load_plan(f"@{path}")


# ------------------------------------------------------------------------------- outcomes


def test_outcome_steps_and_format() -> None:
    plan = Plan.of(Command(tool_name="echo", parameters={"text": "hi"}),
                   [Command(tool_name="boom"), Command(tool_name="echo")])
    outcome = TaskOutcome(
        status="failed",
        session_id="S",
        task_name="demo",
        error="step 1 failed: RuntimeError: kaput",
        result=[
            {"step": 0, "results": [{"status": "success", "result": "hi", "call_id": "a"}]},
            {
                "step": 1,
                "results": [
                    {"status": "failure", "error": "RuntimeError: kaput"},
                    {"status": "skipped", "error": "Skipped due to previous failure (early_exit=True)."},
                ],
            },
        ],
    )
    assert not outcome.ok
    assert not outcome.rejected
    steps = outcome.steps
    assert steps is not None
    assert [s.step for s in steps] == [0, 1]
    assert steps[1].results[1].status == "skipped"
    assert format_outcome(outcome, plan) == "\n".join(
        [
            "failed: demo (session S)",
            "  error: step 1 failed: RuntimeError: kaput",
            '  step 0 echo: success "hi"',
            "  step 1 boom: failure RuntimeError: kaput",
            "  step 1 echo: skipped Skipped due to previous failure (early_exit=True).",
        ]
    )


def test_format_rejected_and_non_script_outcomes() -> None:
    rejected = TaskOutcome(
        status="failed", session_id="S", error="Target device 'x' is not connected",
        code="unknown_target",
    )
    assert rejected.rejected
    assert format_outcome(rejected) == (
        "failed: task (session S)\n  error: Target device 'x' is not connected [unknown_target]"
    )
    other = TaskOutcome(status="completed", session_id="S", task_name="t", result={"a": 1})
    assert other.ok
    assert other.steps is None
    assert format_outcome(other) == 'completed: t (session S)\n  result: {"a": 1}'


# ------------------------------------------------------------------------------- backoff


def test_backoff_schedule_is_exponential_capped_and_jittered() -> None:
    backoff = Backoff(initial=1.0, factor=2.0, max_delay=10.0, jitter=0.5, max_attempts=6)
    rng = random.Random(42)
    expected_rng = random.Random(42)
    delays = list(backoff.delays(rng))
    bases = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert delays == [b * (1.0 - 0.5 * expected_rng.random()) for b in bases]
    assert all(b * 0.5 <= d <= b for b, d in zip(bases, delays, strict=True))


def test_backoff_without_jitter_and_without_limit() -> None:
    delays = Backoff(initial=0.5, factor=3.0, max_delay=100.0, jitter=0.0).delays()
    assert [next(delays) for _ in range(5)] == [0.5, 1.5, 4.5, 13.5, 40.5]
    assert [next(delays) for _ in range(100)][-1] == 100.0  # unbounded, capped, no overflow


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": 0}, {"factor": 0.5}, {"jitter": 1.5}, {"max_delay": -1}, {"max_attempts": 0}],
)
def test_backoff_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


# ------------------------------------------------------------------------------- URLs


def test_token_goes_in_the_query_and_is_redacted() -> None:
    url = with_token("ws://h:1/ws", "k&y=1")
    assert url == "ws://h:1/ws?token=k%26y%3D1"
    assert with_token("ws://h:1/ws?token=old&x=1", "new") == "ws://h:1/ws?x=1&token=new"
    assert with_token("ws://h:1/ws?token=keep", None) == "ws://h:1/ws?token=keep"
    assert redact(url) == "ws://h:1/ws?token=***"
    assert redact("ws://h:1/ws") == "ws://h:1/ws"


@pytest.mark.parametrize(
    "url", ["http://h:1/ws", "h:1/ws", "ws:///ws", "ws://h:notaport/ws", "ws://h:99999/ws"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="server URL"):
        check_url(url)
