"""The ``task`` command with natural-language requests (issue 10 item 7) and its progress
display (issue 12 item 4): a live status line on a terminal, plain lines otherwise.

The command's async main runs inside the test's Trio run against a scripted fake server, so
the autojump clock drives it and every time asserted is virtual."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from test_client_fake_server import CONFIRM, fake_server, receive, send

from ufo_trio.client import TaskOutcome, format_outcome
from ufo_trio.client._cli import _requests, _task_main, add_subcommands
from ufo_trio.client._errors import AuthenticationFailed
from ufo_trio.client._http import ApiUnavailable, get_task

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from trio_websocket import WebSocketRequest

LLM_RESULT = {
    "answer": "Freed 1.2 GB in /tmp.\nRemoved 3 files.",
    "steps": [
        {
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "run_command", "arguments": '{"command": "du -sh /tmp"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "read_text_file", "arguments": '{"path": "x"}'}},
            ],
            "results": [
                {"status": "failure", "error": "not a file: 'x'", "result": None,
                 "call_id": "call_2"},
                {"status": "success", "error": None, "result": {"exit_code": 0},
                 "call_id": "call_1"},
            ],
        },
        {
            "tool_calls": [
                {"id": "call_3", "type": "function",
                 "function": {"name": "echo", "arguments": "not json"}},
            ],
            "results": [{"status": "success", "error": None, "result": "ok", "call_id": "c"}],
        },
    ],
    "usage": {"prompt_tokens": 812, "completion_tokens": 95},
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ufo-trio")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- requests


def test_plan_or_text(tmp_path: Path) -> None:
    text_file = tmp_path / "task.txt"
    text_file.write_text("Task Description: tidy /tmp\nTips for Completion: be careful\n")
    args = parse(["task", "--target", "d", "free disk space in /tmp", '  [{"tool_name":"echo"}]',
                  f"@{text_file}", '"quoted"', "42"])
    requests = _requests(args)
    assert [plan is not None for _, plan in requests] == [False, True, False, False, False]
    assert requests[0][0] == "free disk space in /tmp"
    # A plan is sent in its canonical form (shorthands expanded).
    assert json.loads(requests[1][0]) == {
        "steps": [[{"tool_name": "echo", "parameters": None, "tool_type": "action"}]],
        "on_failure": "stop",
    }
    assert requests[2][0] == "Task Description: tidy /tmp\nTips for Completion: be careful\n"
    # JSON that is not an object or array is text, sent as given.
    assert [r for r, _ in requests[3:]] == ['"quoted"', "42"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Starts like JSON but is not: still the plan error, never sent as text.
        (['{"steps": [}'], "ufo_trio task: error: bad plan: plan is not valid JSON"),
        (['{"stepz": []}'], "ufo_trio task: error: bad plan: 'steps' must be a list of steps"),
        (["   "], "ufo_trio task: error: empty request: give a plan (JSON) or a task in words"),
    ],
)
def test_bad_requests_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(["task", "--target", "d", *argv])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1


def test_bad_plan_in_a_file_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[1]")
    args = parse(["task", "--target", "d", f"@{bad}"])
    assert args.func(args) == 2
    assert capsys.readouterr().err == (
        f"ufo_trio task: error: bad plan: {bad}: steps[0] must be a non-empty list of commands\n"
    )


# ----------------------------------------------------------------------------- outcomes


def test_llm_outcome_is_printed_step_by_step() -> None:
    outcome = TaskOutcome(status="completed", session_id="S", task_name="disk",
                          result=LLM_RESULT)
    assert outcome.answer == "Freed 1.2 GB in /tmp.\nRemoved 3 files."
    assert format_outcome(outcome) == "\n".join([
        "completed: disk (session S)",
        # Results are paired with their calls by call_id, whatever their order...
        '  step 0 run_command {"command":"du -sh /tmp"} -> success {"exit_code": 0}',
        "  step 0 read_text_file {\"path\":\"x\"} -> failure not a file: 'x'",
        # ...and by position when no call_id matches; bad arguments are shown as written.
        '  step 1 echo not json -> success "ok"',
        "  answer: Freed 1.2 GB in /tmp.",
        "          Removed 3 files.",
        "  tokens: 812 prompt, 95 completion",
    ])
    failed = TaskOutcome(status="failed", session_id="S", error="llm agent: step limit (20) "
                         "reached", result={"answer": "", "steps": [], "usage": {}})
    assert format_outcome(failed) == (
        "failed: task (session S)\n  error: llm agent: step limit (20) reached"
    )
    # The script agent's shape is not mistaken for the llm one.
    assert TaskOutcome(status="completed", session_id="S", result=[]).answer is None


def test_llm_outcome_as_the_server_records_it() -> None:
    """The llm agent's TASK_END result (docs/agents.md): calls as {id, tool_name, parameters},
    a refused call as {id, tool_name: null, function}; results paired by position."""
    result = {
        "answer": "done",
        "steps": [
            {
                "tool_calls": [
                    {"id": "c1", "tool_name": "run_command", "parameters": {"command": "df"}},
                    {"id": "c2", "tool_name": None, "function": "rm_everything"},
                ],
                "results": [
                    {"status": "success", "error": None, "result": {"exit_code": 0}},
                    {"status": "failure", "error": "llm agent: unknown function "
                     "'rm_everything': call one of the functions you were given", "result": None},
                ],
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2},
    }
    outcome = TaskOutcome(status="completed", session_id="S", task_name="t", result=result)
    assert format_outcome(outcome) == "\n".join([
        "completed: t (session S)",
        '  step 0 run_command {"command":"df"} -> success {"exit_code": 0}',
        "  step 0 rm_everything -> failure llm agent: unknown function 'rm_everything': call "
        "one of the functions you were given",
        "  answer: done",
        "  tokens: 10 prompt, 2 completion",
    ])


# ----------------------------------------------------------------------------- progress


class Recorder:
    """A fake stderr that records (virtual time, text) per write."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((trio.current_time(), text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


async def _scripted_server(
    nursery: trio.Nursery, seen: dict[str, Any], *, end_after: float
) -> str:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await receive(ws)
        await send(ws, CONFIRM)
        task = await receive(ws)
        seen["task"] = task
        seen["t0"] = trio.current_time()
        await send(ws, {"type": "heartbeat", "status": "ok", "session_id": task["session_id"],
                        "task_name": "disk", "response_id": task["request_id"]})
        await trio.sleep(end_after)
        await send(ws, {"type": "task_end", "status": "completed",
                        "session_id": task["session_id"], "task_name": "disk",
                        "result": LLM_RESULT, "error": None})
        await trio.sleep_forever()

    return await fake_server(nursery, handler)


async def test_live_status_line_on_a_terminal(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: dict[str, Any] = {}
    url = await _scripted_server(nursery, seen, end_after=3.5)
    polls: list[float] = []

    async def fetch(session_id: str) -> Mapping[str, Any] | None:
        assert session_id == seen["task"]["session_id"]
        polls.append(trio.current_time() - seen["t0"])
        if len(polls) == 1:
            return None  # not recorded yet: keep polling
        return {"commands": len(polls) - 1, "last_tool": "run_command"}

    stream = Recorder()
    args = parse(["task", "--url", url, "--target", "dev-1", "free disk space in /tmp"])
    args.progress_stream, args.progress_isatty, args.progress_fetch = stream, True, fetch
    start = trio.current_time()
    assert await _task_main(args) == 0
    ended = trio.current_time() - start

    assert seen["task"]["request"] == "free disk space in /tmp"
    # Polling starts at the ACK, once a second, and stops at the TASK_END (3.5 s).
    assert polls == [0, 1, 2, 3]
    assert ended == 3.5
    # What the terminal shows after each instant: the last write of that virtual time. (The
    # tick and a poll may wake at the same instant in either order; each redraws.)
    shown: dict[float, str] = {}
    per_instant: dict[float, int] = {}
    for t, text in stream.writes:
        shown[t - start] = text
        per_instant[t - start] = per_instant.get(t - start, 0) + 1
    # Redrawn in place: carriage return, text, erase to end of line; about once a second.
    assert shown == {
        0: "\r0s | task: running\x1b[K",  # the ACK came at once
        1: "\r1s | task: 1 step, last: run_command\x1b[K",
        2: "\r2s | task: 2 steps, last: run_command\x1b[K",
        3: "\r3s | task: 3 steps, last: run_command\x1b[K",
        3.5: "\r\x1b[K",  # cleared before the outcome is printed
    }
    assert stream.writes[0][1] == "\r0s | task: waiting for the server\x1b[K"
    assert max(per_instant.values()) == 2
    out = capsys.readouterr().out
    assert out.startswith("completed: disk (session ")
    assert "  answer: Freed 1.2 GB in /tmp." in out
    await trio.sleep(5)
    assert polls == [0, 1, 2, 3]  # nothing polls after the command returned


async def test_plain_lines_when_not_a_terminal_and_no_task_api(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: dict[str, Any] = {}
    url = await _scripted_server(nursery, seen, end_after=30)
    polls: list[float] = []

    async def fetch(session_id: str) -> Mapping[str, Any] | None:
        polls.append(trio.current_time() - seen["t0"])
        raise ApiUnavailable("no task API")

    stream = Recorder()
    args = parse(["task", "--url", url, "--target", "dev-1", "--json", "tidy up"])
    args.progress_stream, args.progress_fetch = stream, fetch  # isatty() says False
    start = trio.current_time()
    assert await _task_main(args) == 0
    sid = seen["task"]["session_id"]
    # One line when the server accepted the task, nothing per second over 30 s.
    assert [(t - start, text) for t, text in stream.writes] == [
        (0, f"task: accepted by the server as 'disk' (session {sid}); waiting for it to end\n"),
    ]
    assert polls == [0]  # a server without the task API is asked once
    assert json.loads(capsys.readouterr().out)["result"] == LLM_RESULT


async def test_terminal_line_falls_back_to_elapsed_time_and_no_progress_flag(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock,
) -> None:
    seen: dict[str, Any] = {}
    url = await _scripted_server(nursery, seen, end_after=61.5)

    async def fetch(session_id: str) -> Mapping[str, Any] | None:
        raise AuthenticationFailed("HTTP API refused")

    stream = Recorder()
    args = parse(["task", "--url", url, "--target", "dev-1", "--task-name", "n", "go"])
    args.progress_stream, args.progress_isatty, args.progress_fetch = stream, True, fetch
    await _task_main(args)
    texts = [text for _, text in stream.writes]
    assert texts[-2:] == ["\r1m01s | n: running\x1b[K", "\r\x1b[K"]
    # Start and ACK at 0 s, one redraw per second from 1 to 61 s, then the clearing.
    assert len(texts) == 2 + 61 + 1
    # --no-progress: nothing at all.
    quiet = Recorder()
    seen.clear()
    url = await _scripted_server(nursery, seen, end_after=2)
    args = parse(["task", "--url", url, "--target", "dev-1", "--no-progress", "go"])
    args.progress_stream, args.progress_isatty = quiet, True
    assert await _task_main(args) == 0
    assert quiet.writes == []


async def test_get_task_answers(nursery: trio.Nursery) -> None:
    from test_client_cli import fake_http

    def url(port: int) -> str:
        return f"ws://127.0.0.1:{port}/ws"

    seen: list[bytes] = []
    summary = {"session_id": "a/b", "commands": 2, "last_tool": "echo"}
    port = await fake_http(nursery, 200, summary, seen)
    assert await get_task(url(port), "a/b", api_key="k") == summary
    assert seen[0].startswith(b"GET /api/tasks/a%2Fb HTTP/1.1\r\n")
    assert b"X-API-Key: k\r\n" in seen[0]
    port = await fake_http(nursery, 404, {"detail": "Task not found"}, seen)
    assert await get_task(url(port), "s", api_key=None) is None
    port = await fake_http(nursery, 404, {"detail": "Not Found"}, seen)
    with pytest.raises(ApiUnavailable):
        await get_task(url(port), "s", api_key=None)
    port = await fake_http(nursery, 401, {"detail": "Missing API key"}, seen)
    with pytest.raises(AuthenticationFailed):
        await get_task(url(port), "s", api_key=None)


# ----------------------------------------------------------------------------- real server


async def test_text_request_reaches_the_server_verbatim(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    # A real server with only the script agent: the text arrives as the TASK request (the
    # agent says it is not JSON), progress is plain lines, and the missing task API is fine.
    from test_client_cli import KEY, run_cli, start_server

    from ufo_trio.client import open_device

    server = await start_server(nursery)
    async with open_device(server.url, "dev-1", api_key=KEY):
        code = await trio.to_thread.run_sync(
            run_cli,
            ["task", "--url", server.url, "--api-key", KEY, "--target", "dev-1",
             "--task-name", "words", "free disk space in /tmp"],
        )
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.startswith("failed: words (session ")
    assert "  error: script agent: request is not valid JSON" in captured.out
    [line] = captured.err.splitlines()
    assert line.startswith("words: accepted by the server as 'words' (session ")
    record = server.sessions.results.by_task_name("words")
    assert record is not None
    assert record.session_id in captured.out
