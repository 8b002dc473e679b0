"""The "limit" server: bare trio-websocket, decode each frame, answer register/heartbeat.

It has no registry, no validation, no sessions, no liveness and no auth: whatever ufo_trio spends
beyond this is the price of its protocol logic, and this server's cost per round trip is the
floor of the stack (Trio + trio-websocket + wsproto + the JSON library).

Its replies are shaped like real ufo_trio frames (all 14 ServerMessage keys, a fresh wall-clock
`timestamp` and a fresh uuid4 `response_id`, WIRE-3/7/8), so the limit includes the per-reply
work any conforming server must do; the JSON library is selectable so the comparison with
ufo_trio is like for like.

    python -m bench.refserver --port 0 [--json stdlib|orjson]

prints `bench.refserver <version> listening on ws://<host>:<port>/ws` and serves until
SIGINT/SIGTERM, then exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from ._proc import raise_nofile_limit

VERSION = "0.1.0"

Encoder = Callable[[dict[str, Any]], str]
Decoder = Callable[[str | bytes], Any]


def codec(name: str) -> tuple[Encoder, Decoder]:
    """(dumps to compact str, loads) for the named JSON library."""
    if name == "orjson":
        import orjson

        def dumps_orjson(obj: dict[str, Any]) -> str:
            # trio-websocket sends `str` as a text frame and `bytes` as binary, so decode.
            return orjson.dumps(obj).decode()

        return dumps_orjson, orjson.loads
    if name == "stdlib":
        # The same settings as ufo_trio's codec (compact, ASCII-escaped), so only the protocol
        # logic differs between the two servers.
        encoder = json.JSONEncoder(separators=(",", ":"))
        return encoder.encode, json.loads
    raise ValueError(f"unknown JSON library {name!r}")


def reply(*, first: bool) -> dict[str, Any]:
    """A heartbeat/ok frame with every ServerMessage key, as a conforming server sends it."""
    frame: dict[str, Any] = {
        "type": "heartbeat",
        "status": "ok",
        "user_request": None,
        "agent_name": None,
        "process_name": None,
        "root_name": None,
        "actions": None,
        "messages": None,
        "error": None,
        "session_id": None,
        "task_name": None,
        "timestamp": datetime.now(UTC).isoformat(),
        "response_id": str(uuid.uuid4()),
        "result": None,
    }
    if first:
        frame["protocol"] = "aip/1"
        frame["server"] = f"bench.refserver/{VERSION}"
    return frame


def make_handler(dumps: Encoder, loads: Decoder) -> Callable[[WebSocketRequest], Any]:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        registered = False
        try:
            while True:
                text = await ws.get_message()
                try:
                    msg = loads(text)
                except ValueError:
                    continue
                kind = msg.get("type") if isinstance(msg, dict) else None
                if kind == "heartbeat" or kind == "register":
                    await ws.send_message(dumps(reply(first=not registered)))
                    registered = True
        except ConnectionClosed:
            pass

    return handler


async def serve(host: str, port: int, json_lib: str) -> None:
    dumps, loads = codec(json_lib)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(
                    serve_websocket,
                    make_handler(dumps, loads),
                    host,
                    port,
                    None,
                    # Same inbound limit as ufo_trio's default, so neither side rejects
                    # anything the other accepts.
                    max_message_size=100 * 1024 * 1024,
                )
            )
            print(
                f"bench.refserver {VERSION} listening on ws://{host}:{server.port}/ws "
                f"(json={json_lib})",
                flush=True,
            )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refserver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--json", choices=("stdlib", "orjson"), default="stdlib")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    try:
        trio.run(serve, args.host, args.port, args.json)
    except OSError as exc:
        print(f"bench.refserver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
