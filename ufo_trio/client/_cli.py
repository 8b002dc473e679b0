"""CLI subcommands ``device``, ``task`` and ``clients``.

The top-level CLI (``python -m ufo_trio``) adds them with `add_subcommands`; they also run on
their own as ``python -m ufo_trio.client``. Each subcommand's function runs its own
`trio.run` and returns the exit status: 0 success, 1 failure (a task that did not complete,
a refused connection...), 2 bad input (URL, plan, options), 130 interrupted (``task``).
User errors print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ._backoff import Backoff
from ._builtins import default_tools
from ._constellation import open_constellation
from ._device import open_device
from ._errors import ClientError, PlanError
from ._http import ApiUnavailable, get_task, list_clients
from ._link import check_url
from ._outcome import TaskOutcome, format_outcome
from ._plan import Plan, parse_plan
from ._progress import Fetch, Progress
from ._tls import client_context
from ._tools import ToolRegistry
from ._util import single_error

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable, Mapping, Sequence

DEFAULT_URL = "ws://127.0.0.1:5000/ws"
URL_ENV = "UFO_TRIO_URL"
API_KEY_ENV = "UFO_TRIO_API_KEY"
CA_ENV = "UFO_TRIO_CA"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _UsageError(Exception):
    """Bad input detected before any connection is made (exit status 2)."""


def add_subcommands(subparsers: Any) -> None:
    """Add ``device``, ``task`` and ``clients`` to an argparse subparsers object.

    Each parser gets ``func(args) -> int`` as its default.
    """
    device = subparsers.add_parser(
        "device",
        help="run a device client that executes tool calls",
        description="Register as a device and execute the server's COMMANDs with the "
        "built-in tools (plus --tools). Stops on Ctrl-C or SIGTERM.",
    )
    device.add_argument("--id", required=True, dest="client_id", help="the device's client_id")
    _add_connection_options(device)
    device.add_argument(
        "--root",
        metavar="DIR",
        help="enable list_dir and read_text_file, confined to DIR (default: disabled)",
    )
    device.add_argument(
        "--allow-command",
        metavar="PROGRAM",
        action="append",
        default=[],
        help="let run_command start PROGRAM (repeatable; default: run_command disabled)",
    )
    device.add_argument(
        "--tools",
        metavar="MODULE:NAME",
        action="append",
        default=[],
        help="also offer the tools of a ToolRegistry, e.g. mytools:tools or path/to/file.py:tools",
    )
    device.add_argument("--platform", help="platform to register with (default: this machine's)")
    device.add_argument(
        "--heartbeat-interval", type=float, default=30.0, metavar="SECONDS",
        help="seconds between heartbeats (default: 30; 0 = none)",
    )
    device.add_argument(
        "--no-reconnect", action="store_true", help="exit instead of reconnecting"
    )
    device.add_argument("--verbose", "-v", action="store_true", help="log debug details")
    device.set_defaults(func=run_device_command)

    task = subparsers.add_parser(
        "task",
        help="run one or more tasks (plans or requests in words) on a device",
        description="Submit each REQUEST as a task for device --target, wait for all of them "
        "and print each outcome. A REQUEST that starts with { or [ is a script agent plan, "
        "checked before it is sent; anything else is sent as text (for the server's llm "
        "agent). Exit status 0 only if every task completed.",
    )
    task.add_argument("--target", required=True, help="the device's client_id")
    task.add_argument(
        "plans",
        nargs="+",
        metavar="REQUEST",
        help="a plan (JSON text), a task in words, or @file holding either (see docs/cli.md)",
    )
    _add_connection_options(task)
    task.add_argument("--client-id", help="constellation id to register (default: random)")
    task.add_argument("--task-name", help="task name (suffixed -1, -2... for several requests)")
    task.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up waiting after SECONDS"
    )
    task.add_argument("--json", action="store_true", help="print each outcome as a JSON line")
    task.add_argument(
        "--raw",
        action="store_true",
        help="send REQUEST text exactly as given, never checked as a plan",
    )
    task.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress on stderr (default: a live status line on a terminal, "
        "one line per accepted task otherwise)",
    )
    # For tests: where progress goes, whether it is a terminal, how steps are fetched.
    task.set_defaults(
        func=run_task_command, progress_stream=None, progress_isatty=None, progress_fetch=None
    )

    clients = subparsers.add_parser(
        "clients",
        help="list the clients online (needs the server's HTTP API)",
        description="List online clients with GET /api/clients.",
    )
    _add_connection_options(clients)
    clients.add_argument("--json", action="store_true", help="print the raw JSON list")
    clients.set_defaults(func=run_clients_command)


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help=f"server WebSocket URL (default: ${URL_ENV} or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key", default=None, help=f"the server's API key (default: ${API_KEY_ENV})"
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        default=None,
        help=f"trust only the CA certificate(s) in FILE (PEM) for wss:// and https:// "
        f"(default: ${CA_ENV}, else the system trust store)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="do NOT verify the server's TLS certificate (testing only; warns on every start)",
    )


def _url(args: argparse.Namespace, *, http_ok: bool = False) -> str:
    url: str = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    if http_ok and url.split(":", 1)[0].lower() in ("http", "https"):
        url = "ws" + url[4:]  # the HTTP API lives on the same port as the WebSocket
    try:
        check_url(url)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    return url


def _ssl_context(args: argparse.Namespace, command: str) -> ssl.SSLContext | None:
    """The TLS context for --ca / $UFO_TRIO_CA / --insecure; None: the system default."""
    ca: str | None = args.ca or os.environ.get(CA_ENV) or None
    if args.insecure:
        print(
            f"ufo_trio {command}: warning: --insecure: the server's TLS certificate is NOT "
            "verified; anyone on the network path can read the API key",
            file=sys.stderr,
            flush=True,
        )
    if ca is None and not args.insecure:
        return None
    try:
        return client_context(ca, insecure=args.insecure)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _api_key(args: argparse.Namespace) -> str | None:
    key: str | None = args.api_key or os.environ.get(API_KEY_ENV) or None
    return key


def _fail(command: str, message: object) -> None:
    print(f"ufo_trio {command}: error: {message}", file=sys.stderr, flush=True)


def _interrupted(exc: BaseException) -> bool:
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(
            _interrupted(e) or isinstance(e, trio.Cancelled) for e in exc.exceptions
        )
    return False


def _run(
    command: str,
    main: Callable[..., Awaitable[int]],
    *args: Any,
    on_interrupt: int = EXIT_INTERRUPTED,
) -> int:
    """`trio.run` with the CLI's error policy: known errors become one line and a status."""
    try:
        return trio.run(main, *args)
    except _UsageError as exc:
        _fail(command, exc)
        return EXIT_USAGE
    except ClientError as exc:
        _fail(command, exc)
        return EXIT_FAILED
    except BaseException as exc:
        if _interrupted(exc):
            return on_interrupt
        if isinstance(exc, BaseExceptionGroup):
            single = single_error(exc)
            if isinstance(single, ClientError):
                _fail(command, single)
                return EXIT_FAILED
        raise


# --------------------------------------------------------------------------------- device


def load_tools(spec: str) -> ToolRegistry:
    """The `ToolRegistry` named by ``module:name`` or ``path/to/file.py:name``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise _UsageError(f"--tools expects MODULE:NAME, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader_spec = importlib.util.spec_from_file_location(
                f"_ufo_trio_tools_{path.stem}", path
            )
            if loader_spec is None or loader_spec.loader is None or not path.is_file():
                raise _UsageError(f"--tools: no such file {module_name!r}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except _UsageError:
        raise
    except Exception as exc:  # the user's module failed to import: say so in one line
        raise _UsageError(f"--tools {spec}: cannot import: {type(exc).__name__}: {exc}") from None
    registry = getattr(module, attr, None)
    if not isinstance(registry, ToolRegistry):
        raise _UsageError(f"--tools {spec}: {attr!r} is not a ufo_trio.client.ToolRegistry")
    return registry


def _device_tools(args: argparse.Namespace) -> ToolRegistry:
    try:
        tools = default_tools(root=args.root, allow_commands=args.allow_command)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    for spec in args.tools:
        try:
            tools.include(load_tools(spec), replace=True)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
    return tools


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not verbose:
        logging.getLogger("trio-websocket").setLevel(logging.WARNING)


async def _device_main(args: argparse.Namespace) -> int:
    url = _url(args)
    context = _ssl_context(args, "device")
    tools = _device_tools(args)
    _configure_logging(args.verbose)
    # SIGINT too: a device started in the background of a script has KeyboardInterrupt
    # disabled (the shell ignores SIGINT for it), yet should still stop on it.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_device(
            url,
            args.client_id,
            api_key=_api_key(args),
            tools=tools,
            platform=args.platform,
            heartbeat_interval=args.heartbeat_interval,
            reconnect=None if args.no_reconnect else Backoff(),
            ssl_context=context,
        ) as device:
            print(
                f"device {device.client_id!r} connected to {device.url} "
                f"(tools: {', '.join(tools.names())}); press Ctrl-C to stop",
                flush=True,
            )
            async for _ in signals:
                break
    return EXIT_OK


def run_device_command(args: argparse.Namespace) -> int:
    """``device``: run until Ctrl-C/SIGTERM (exit 0) or a fatal error (exit 1)."""
    return _run("device", _device_main, args, on_interrupt=EXIT_OK)


# --------------------------------------------------------------------------------- task


def _read_request_file(argument: str) -> str:
    path = Path(argument[1:])
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _UsageError(
            f"bad plan: cannot read plan file {str(path)!r}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise _UsageError(f"bad plan: plan file {str(path)!r} is not UTF-8 text") from None


def looks_like_plan(text: str) -> bool:
    """A request is a plan when it starts like a JSON object or array; anything else is text
    for an agent that reads natural language (such as the server's ``llm`` agent)."""
    return text.lstrip()[:1] in ("{", "[")


def _requests(args: argparse.Namespace) -> list[tuple[str, Plan | None]]:
    """(TASK request text, the plan when it is one) per REQUEST argument."""
    out: list[tuple[str, Plan | None]] = []
    for argument in args.plans:
        text = _read_request_file(argument) if argument.startswith("@") else argument
        if args.raw:
            out.append((text, None))
        elif looks_like_plan(text):
            # Checked here as before: a typo in a plan is a clear exit 2, never sent as text.
            try:
                plan = parse_plan(text)
            except PlanError as exc:
                where = f"{argument[1:]}: " if argument.startswith("@") else ""
                raise _UsageError(f"bad plan: {where}{exc}") from None
            out.append((plan.to_json(), plan))
        elif not text.strip():
            raise _UsageError("empty request: give a plan (JSON) or a task in words")
        else:
            out.append((text, None))
    return out


def _print_outcome(args: argparse.Namespace, outcome: TaskOutcome, plan: Plan | None) -> None:
    if args.json:
        print(json.dumps(outcome.to_json(), ensure_ascii=False), flush=True)
    else:
        print(format_outcome(outcome, plan), flush=True)


async def _task_main(args: argparse.Namespace) -> int:
    url = _url(args)
    context = _ssl_context(args, "task")
    requests = _requests(args)
    api_key = _api_key(args)
    client_id = args.client_id or f"cli-{uuid.uuid4().hex[:8]}"
    outcomes: list[TaskOutcome | None] = [None] * len(requests)
    stream = args.progress_stream or sys.stderr
    if args.progress_isatty is not None:
        live = bool(args.progress_isatty)
    else:  # a terminal that understands carriage return and erase-line
        live = stream.isatty() and os.environ.get("TERM") != "dumb"
    progress = None if args.no_progress else Progress(stream, live=live)

    async def fetch(session_id: str) -> Mapping[str, Any] | None:
        return await get_task(url, session_id, api_key=api_key, ssl_context=context)

    fetch_task: Fetch = args.progress_fetch or fetch

    names: list[str | None] = [
        f"{args.task_name}-{i + 1}" if args.task_name and len(requests) > 1 else args.task_name
        for i in range(len(requests))
    ]
    session_ids = [str(uuid.uuid4()) for _ in requests]
    lines = [
        progress.add(
            name or (f"task {i + 1}" if len(requests) > 1 else "task"), session_ids[i]
        )
        if progress is not None
        else None
        for i, name in enumerate(names)
    ]

    async with open_constellation(
        url, client_id, target_id=args.target, api_key=api_key, ssl_context=context
    ) as constellation:

        async def run_one(index: int, request: str, plan: Plan | None) -> None:
            name = names[index]
            session_id = session_ids[index]
            line = lines[index]
            try:
                async with trio.open_nursery() as polling:
                    if progress is not None and line is not None:
                        polling.start_soon(progress.poll, line, fetch_task)
                        on_ack = functools.partial(progress.acknowledged, line)
                    else:
                        on_ack = None
                    try:
                        outcome = await constellation.run_task(
                            args.target,
                            request,
                            task_name=name,
                            session_id=session_id,
                            timeout=args.timeout,
                            on_ack=on_ack,
                        )
                    finally:
                        polling.cancel_scope.cancel()  # the TASK_END ends the polling
            except ClientError as exc:
                if progress is not None and line is not None:
                    progress.finished(line)
                _fail("task", exc)
                return
            if progress is not None and line is not None:
                progress.finished(line)
            outcomes[index] = outcome
            _print_outcome(args, outcome, plan)

        try:
            async with trio.open_nursery() as display:
                if progress is not None and progress.live:
                    display.start_soon(progress.tick)
                async with trio.open_nursery() as nursery:
                    for index, (request, plan) in enumerate(requests):
                        nursery.start_soon(run_one, index, request, plan)
                display.cancel_scope.cancel()
        finally:
            if progress is not None:
                progress.clear()  # also on Ctrl-C: leave the shell prompt on a clean line
    ok = all(outcome is not None and outcome.ok for outcome in outcomes)
    return EXIT_OK if ok else EXIT_FAILED


def run_task_command(args: argparse.Namespace) -> int:
    """``task``: exit 0 only if every task completed."""
    return _run("task", _task_main, args)


# --------------------------------------------------------------------------------- clients


def _describe_client(entry: Any) -> str:
    if isinstance(entry, dict):
        ident = entry.get("client_id", "?")
        extras = [f"{k}={v}" for k, v in entry.items() if k != "client_id" and v is not None]
        return f"{ident}  {' '.join(extras)}".rstrip()
    return str(entry)


async def _clients_main(args: argparse.Namespace) -> int:
    url = _url(args, http_ok=True)
    context = _ssl_context(args, "clients")
    try:
        clients = await list_clients(url, api_key=_api_key(args), ssl_context=context)
    except ApiUnavailable as exc:
        _fail("clients", f"{exc}; this command needs a server with the HTTP API")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(clients, ensure_ascii=False))
    elif not clients:
        print("no clients online")
    else:
        for entry in clients:
            print(_describe_client(entry))
    return EXIT_OK


def run_clients_command(args: argparse.Namespace) -> int:
    """``clients``: print the online clients (GET /api/clients)."""
    return _run("clients", _clients_main, args)


# --------------------------------------------------------------------------------- standalone


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ufo_trio.client``: the three subcommands without the server."""
    parser = argparse.ArgumentParser(
        prog="python -m ufo_trio.client", description="ufo_trio client tools"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_subcommands(subparsers)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)

