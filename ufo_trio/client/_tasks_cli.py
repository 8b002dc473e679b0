"""CLI subcommand ``tasks``: the server's task history over its HTTP API (issue 11).

``tasks [--status S] [--target ID] [--requester ID] [--since TS] [--limit N]`` prints a table
(GET /api/tasks, newest first); ``tasks show SESSION_ID`` prints one task with its transcript
(GET /api/tasks/{session_id}). ``--json`` prints the server's JSON instead. Exit status: 0 shown,
1 the server failed or the task is unknown, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from typing import TYPE_CHECKING, Any

from ._cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    _add_connection_options,
    _api_key,
    _fail,
    _run,
    _ssl_context,
    _url,
)
from ._errors import AuthenticationFailed, ConnectFailed
from ._http import ApiUnavailable, get_json

if TYPE_CHECKING:
    import ssl

STATUSES = ("running", "completed", "failed")


def add_tasks_subcommand(subparsers: Any) -> None:
    tasks = subparsers.add_parser(
        "tasks",
        help="list the task history, or show one task's transcript (needs the HTTP API)",
        description="List recent tasks with GET /api/tasks (newest first), or "
        "`tasks show SESSION_ID` for one task and its steps.",
    )
    tasks.add_argument("action", nargs="*", metavar="show SESSION_ID", help="show one task")
    tasks.add_argument("--status", choices=STATUSES, help="only tasks with this status")
    tasks.add_argument("--target", help="only tasks executed by this device")
    tasks.add_argument("--requester", help="only tasks requested by this client")
    tasks.add_argument("--since", metavar="ISO_TIME", help="only tasks created at or after")
    tasks.add_argument("--limit", type=_limit, default=20, help="how many (1-500; default 20)")
    tasks.add_argument("--json", action="store_true", help="print the server's JSON")
    _add_connection_options(tasks)
    tasks.set_defaults(func=run_tasks_command)


def _limit(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 500:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 500, got {text!r}")
    return int(text)


def run_tasks_command(args: argparse.Namespace) -> int:
    """``tasks`` / ``tasks show ID``."""
    if args.action and (len(args.action) != 2 or args.action[0] != "show"):
        _fail("tasks", f"unexpected arguments {' '.join(args.action)!r} (use: tasks show ID)")
        return EXIT_USAGE
    def prepare() -> tuple[Any, ...]:
        return args, _url(args, http_ok=True), _ssl_context(args, "tasks")

    return _run("tasks", _tasks_main, prepare)


async def _get(
    args: argparse.Namespace, url: str, context: ssl.SSLContext | None, path: str
) -> tuple[int, Any]:
    response = await get_json(url, path, api_key=_api_key(args), ssl_context=context)
    body = response.body
    detail = body.get("detail") if isinstance(body, dict) else None
    if response.status in (401, 403):
        raise AuthenticationFailed(
            f"the HTTP API refused the request ({response.status}: {detail or 'no detail'})"
        )
    if response.status == 404 and detail != "Task not found":
        raise ApiUnavailable(f"this server keeps no task history (GET {path} answered 404)")
    if response.status not in (200, 400, 404) or not isinstance(body, dict):
        raise ConnectFailed(f"GET {path.split('?')[0]} answered HTTP {response.status}")
    return response.status, body


async def _tasks_main(
    args: argparse.Namespace, url: str, context: ssl.SSLContext | None
) -> int:
    if args.action:
        sid = args.action[1]
        status, body = await _get(args, url, context, "/api/tasks/" + urllib.parse.quote(sid, safe=""))
        if status == 404:
            _fail("tasks", f"no task with session id {sid!r}")
            return EXIT_FAILED
        print(json.dumps(body, ensure_ascii=False) if args.json else format_task(body))
        return EXIT_OK
    query = {"limit": str(args.limit)}
    for key in ("status", "target", "requester", "since"):
        if getattr(args, key):
            query[key] = getattr(args, key)
    status, body = await _get(args, url, context, "/api/tasks?" + urllib.parse.urlencode(query))
    if status != 200:
        _fail("tasks", body.get("detail", f"HTTP {status}"))
        return EXIT_USAGE
    tasks = body.get("tasks") if isinstance(body.get("tasks"), list) else []
    if args.json:
        print(json.dumps(body, ensure_ascii=False))
    elif not tasks:
        print("no tasks")
    else:
        print(format_table(tasks))
    return EXIT_OK


def _cut(value: Any, width: int) -> str:
    text = "" if value is None else str(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _time(stamp: Any) -> str:
    return str(stamp)[:19].replace("T", " ") if stamp else "-"


def format_table(tasks: list[Any]) -> str:
    """One line per task: created, status, session id, name, executor, commands, last tool/error."""
    header = ("CREATED", "STATUS", "SESSION", "TASK", "EXECUTOR", "CMDS", "LAST TOOL / ERROR")
    lines = [header]
    for t in tasks:
        if not isinstance(t, dict):
            continue
        tail = t.get("error") if t.get("status") == "failed" else t.get("last_tool")
        lines.append(
            (
                _time(t.get("created_at")),
                _cut(t.get("status"), 9),
                _cut(t.get("session_id"), 36),
                _cut(t.get("task_name"), 24),
                _cut(t.get("executor_id"), 20),
                str(t.get("commands", "")),
                _cut(tail or "", 60),
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in lines
    )


def _short_json(value: Any, width: int) -> str:
    return _cut(json.dumps(value, ensure_ascii=False, separators=(",", ":")), width)


def format_task(task: dict[str, Any]) -> str:
    """One task and its transcript, for a terminal."""
    error = f" ({_cut(task.get('error'), 200)})" if task.get("error") else ""
    lines = [
        f"session    {task.get('session_id')}",
        f"task       {_cut(task.get('task_name'), 120)}",
        f"status     {task.get('status')}{error}",
        f"requester  {task.get('requester_id')} ({task.get('requester_type')})",
        f"executor   {task.get('executor_id')} ({task.get('platform')}, agent "
        f"{task.get('agent')})",
        f"created    {_time(task.get('created_at'))}   acked {_time(task.get('acked_at'))}"
        f"   ended {_time(task.get('ended_at'))}",
        f"request    {_cut(task.get('request'), 200)}",
        f"result     {_short_json(task.get('result'), 200)}",
        f"commands   {task.get('commands')}",
    ]
    for step in task.get("steps") or []:
        if not isinstance(step, dict):
            continue
        lines.append(f"step {step.get('index')}  sent {_time(step.get('sent_at'))}")
        for turn in step.get("model_turns") or []:
            lines.append(f"  model    {_short_json(turn, 100)}")
        for command in step.get("commands") or []:
            if isinstance(command, dict):
                params = _short_json(command.get("parameters"), 80)
                lines.append(f"  command  {command.get('tool_name')} {params}")
        if step.get("timed_out"):
            lines.append("  results  timed out")
        for result in step.get("results") or []:
            if isinstance(result, dict):
                detail = result.get("error") or _short_json(result.get("result"), 80)
                lines.append(f"  result   {result.get('status')}: {_cut(detail, 100)}")
    return "\n".join(lines)
