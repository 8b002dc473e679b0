"""`python -m ufo_trio` / `ufo-trio`: the command line (EP-2, EP-3).

`serve` is the default subcommand. Every serve flag can also come from `UFO_TRIO_<NAME>`;
a flag on the command line wins over the environment. User errors print one line, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from . import _gcpolicy
from ._config import (
    DB_MAX_RESULT_BYTES,
    DB_MAX_TASKS,
    DB_RETENTION_DAYS,
    DUPLICATE_POLICIES,
    LOG_LEVELS,
    MAX_BODY_SIZE,
    MAX_CONNECTIONS,
    MAX_HEADER_SIZE,
    MAX_SESSIONS_PER_CLIENT,
    MESSAGE_BURST,
    MESSAGE_RATE,
    SEND_TIMEOUT,
    ServerConfig,
)
from ._errors import ConfigError
from ._server import Server, serve
from ._store import StoreError
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

PROG = "ufo-trio"
#: The model server's key comes only from the environment (never a flag: argv is visible).
LLM_API_KEY_ENV = "UFO_TRIO_LLM_API_KEY"
SUBCOMMANDS = ("serve", "device", "task", "clients", "tasks")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _finite(what: str) -> Callable[[str], float]:
    """An argparse type: a finite number >= 0 (`what` names it in the error)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
        return value

    return parse


_seconds = _finite("a number of seconds")
_days = _finite("a number of days")
_rate = _finite("a number per second")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _count_or_zero(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _size(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, got {text!r}")
    return value


def _count(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _upper(text: str) -> str:
    return text.upper()


def _switch(text: str) -> bool:
    """An on/off flag's environment value (on the command line the flag alone means on)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/true/yes or 0/false/no, got {text!r}")


# (flag, type, default, help). Defaults mirror ServerConfig; env vars are UFO_TRIO_<NAME>.
_SERVE_FLAGS: list[tuple[str, Callable[[str], Any], Any, str]] = [
    ("--host", str, "127.0.0.1", "address to listen on"),
    ("--port", _int, 5000, "TCP port; 0 picks a free one"),
    ("--api-key", str, None, "shared key; generated and printed when not given"),
    ("--allowed-origins", str, "", "comma-separated Origin values accepted on handshakes"),
    ("--registration-timeout", _seconds, 30.0, "seconds to receive a valid REGISTER"),
    ("--ping-interval", _seconds, 20.0, "seconds between server pings; 0 = off"),
    ("--ping-timeout", _seconds, 20.0, "seconds to wait for a pong or any frame"),
    ("--heartbeat-timeout", _seconds, 0.0, "close after this long without a data frame; 0 = off"),
    ("--command-timeout", _seconds, 600.0, "seconds a COMMAND may wait for its results"),
    ("--max-message-size", _size, 100 * 1024 * 1024, "largest inbound message in bytes"),
    ("--duplicate-policy", str, "probe", "probe | reject | takeover"),
    ("--shutdown-grace", _seconds, 5.0, "seconds connections get to close on shutdown"),
    ("--log-level", _upper, "INFO", "DEBUG | INFO | WARNING | ERROR"),
    ("--agent", str, None, "script | llm | auto | package.module:factory; None = auto with --llm-base-url, else script"),
    # The llm agent (docs/agents.md); the key only from env UFO_TRIO_LLM_API_KEY.
    ("--llm-base-url", str, None, "OpenAI-compatible API root, e.g. https://api.openai.com/v1"),
    ("--llm-model", str, None, "model name; required with --llm-base-url"),
    ("--llm-max-steps", _count, 20, "model turns with tool calls per task"),
    ("--llm-timeout", _seconds, 120.0, "seconds one model call may take"),
    ("--llm-temperature", _finite("a temperature"), 0.0, "sampling temperature, 0-2"),
    ("--llm-max-output-bytes", _size, 16 * 1024, "tool output shown to the model, in bytes"),
    ("--llm-max-connections", _count, 100, "concurrent HTTP connections to the model server"),
    ("--tool-secret", str, (), "PARAM=ENV_VAR (repeatable): hide PARAM, fill it from ENV_VAR"),
    # Hardening limits (docs/operations.md).
    ("--max-connections", _int, MAX_CONNECTIONS, "concurrent TCP connections; more get 503; 0 = no cap"),
    ("--message-rate", _rate, MESSAGE_RATE, "data frames per second per connection; 0 = off"),
    ("--message-burst", _size, MESSAGE_BURST, "frames a connection may send at once above the rate"),
    ("--max-sessions-per-client", _size, MAX_SESSIONS_PER_CLIENT, "live sessions per requester"),
    ("--send-timeout", _seconds, SEND_TIMEOUT, "seconds to write or queue one outbound frame"),
    ("--max-header-size", _size, MAX_HEADER_SIZE, "largest HTTP request head in bytes; more get 431"),
    ("--max-body-size", _size, MAX_BODY_SIZE, "largest HTTP request body in bytes; more get 413"),
    # Task history (issue 11, docs/operations.md "The task database").
    ("--db", str, "ufo_trio.db", "SQLite file of the task history; :memory: keeps none"),
    ("--db-retention-days", _days, DB_RETENTION_DAYS, "delete ended tasks older than this; 0 = keep"),
    ("--db-max-tasks", _count_or_zero, DB_MAX_TASKS, "keep at most this many tasks; 0 = no cap"),
    ("--db-max-result-bytes", _size, DB_MAX_RESULT_BYTES, "largest task result stored (JSON bytes)"),
    # Built-in TLS (docs/operations.md "TLS"): both or neither; SIGHUP reloads the pair.
    ("--tls-cert", str, None, "PEM certificate chain: serve wss:// and https:// on the port"),
    ("--tls-key", str, None, "PEM private key of --tls-cert"),
    # Monitoring (docs/operations.md "Monitoring"): switches, no value on the command line.
    ("--no-metrics", _switch, False, "count nothing; GET /metrics answers 404"),
    ("--metrics-public", _switch, False, "GET /metrics without the API key"),
]


def env_name(flag: str) -> str:
    return "UFO_TRIO_" + flag.lstrip("-").replace("-", "_").upper()


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for flag, kind, default, text in _SERVE_FLAGS:
        choices: Sequence[str] | None = None
        if flag == "--duplicate-policy":
            choices = DUPLICATE_POLICIES
        elif flag == "--log-level":
            choices = LOG_LEVELS
        if kind is _switch:
            parser.add_argument(
                flag,
                action="store_const",
                const=True,
                default=None,
                help=f"{text} (env {env_name(flag)}=1)",
            )
            continue
        if flag == "--tool-secret":  # repeatable; env: comma-separated
            parser.add_argument(
                flag,
                action="append",
                default=None,
                help=f"{text} (env {env_name(flag)}, comma-separated)",
                metavar="PARAM=ENV_VAR",
            )
            continue
        parser.add_argument(
            flag,
            type=kind,
            default=None,
            choices=choices,
            help=f"{text} (env {env_name(flag)}; default {default!r})",
            metavar=flag.lstrip("-").replace("-", "_").upper(),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="AIP server for Microsoft UFO devices and constellations")
    parser.add_argument("--version", action="version", version=f"ufo_trio {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    serve_parser = sub.add_parser("serve", help="run the server (the default)")
    _add_serve_flags(serve_parser)
    serve_parser.set_defaults(func=run_serve)
    from .client._cli import add_subcommands  # deferred: keeps `serve` start-up lean

    add_subcommands(sub)
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServerConfig:
    """Merge flags over `UFO_TRIO_*` over defaults; a bad value exits 2 with one line."""
    values: dict[str, Any] = {}
    for flag, kind, default, _ in _SERVE_FLAGS:
        dest = flag.lstrip("-").replace("-", "_")
        value = getattr(args, dest)
        if value is None:
            raw = os.environ.get(env_name(flag))
            if raw is not None and flag == "--tool-secret":
                value = tuple(p.strip() for p in raw.split(",") if p.strip())
            elif raw is not None:
                try:
                    value = kind(raw)
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    parser.error(f"{env_name(flag)}: {exc}")
            else:
                value = default
        values[dest] = value
    values["metrics"] = not values.pop("no_metrics")
    values["tool_secrets"] = tuple(values.pop("tool_secret"))
    values["llm_api_key"] = os.environ.get(LLM_API_KEY_ENV) or None
    values["allowed_origins"] = tuple(
        o.strip() for o in str(values["allowed_origins"]).split(",") if o.strip()
    )
    try:
        return ServerConfig(**values)
    except ConfigError as exc:
        parser.error(str(exc))


def _startup_line(server: Server) -> str:
    line = f"ufo_trio {__version__} listening on {server.url}"
    if server.api_key_generated:
        line += f" (generated API key: {server.api_key})"
    return line


async def _serve_until_signalled(config: ServerConfig) -> int:
    # SIGHUP reloads the TLS certificate; without TLS it keeps its default meaning (stop).
    wanted = [signal.SIGINT, signal.SIGTERM]
    if config.tls_cert is not None:
        wanted.append(signal.SIGHUP)
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:
            try:
                server: Server = await nursery.start(serve, config)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                print(
                    f"{PROG}: error: cannot listen on {config.host}:{config.port}: {reason}",
                    file=sys.stderr,
                )
                return 1
            except ConfigError as exc:
                print(f"{PROG}: error: {exc}", file=sys.stderr)
                return 2
            except StoreError as exc:  # the task database cannot be used (issue 11)
                print(f"{PROG}: error: {exc}", file=sys.stderr)
                return 1
            print(_startup_line(server), flush=True)
            # Everything imported so far lives as long as the process: keep it out of every
            # future garbage collection pass, and from now on freeze the survivors of each full
            # collection, thawing when the frozen set doubles (_gcpolicy, docs/performance.md).
            _gcpolicy.install()

            async def watch_signals() -> None:
                log = logging.getLogger("ufo_trio")
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.info("received %s: reloading the TLS certificate", name)
                        if server.tls is not None:
                            await server.tls.reload()  # logs the outcome; never raises
                        continue
                    if server.shutting_down:  # a second signal: stop now
                        nursery.cancel_scope.cancel()
                        return
                    log.info("received %s", name)
                    server.request_shutdown()

            nursery.start_soon(watch_signals)
            await server.wait_stopped()
            nursery.cancel_scope.cancel()
    return 0


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    config = config_from_args(args, parser or build_parser())
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Defensive: model calls go straight to httpx's transport, past AsyncClient.send, which
    # would log each request with its URL at INFO; should one ever go through it, stay quiet.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return trio.run(_serve_until_signalled, config)
    except KeyboardInterrupt:  # a signal that arrived outside trio.run
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return run_serve(args, parser)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)
