"""Task round-trip latency: constellation TASK → TASK_END with a one-step plan, over real sockets.

One device and one constellation (scoped to it) connect to a ufo_trio server and run tasks one
after another. Each round trip is: TASK → ACK → COMMAND to the device → COMMAND_RESULTS →
TASK_END to both. The device answers every COMMAND at once, so the figure is the server's own
per-task cost plus four loopback hops.

    python bench/task_latency.py                 # spawns `python -m ufo_trio` on a free port
    python bench/task_latency.py --tasks 5000
    python bench/task_latency.py --url ws://127.0.0.1:5000/ws --api-key KEY
    python bench/task_latency.py --in-process    # server in this process (shares one CPU)

Prints p50/p90/p99/max/mean in milliseconds (and one JSON line with --json). Nothing here is a
pass/fail check; timing belongs in reports, not in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
import urllib.parse
from typing import Any

import trio
import trio_websocket

PLAN = json.dumps({"steps": [[{"tool_name": "list_tools", "tool_type": "action"}]]})
DEVICE_ID = "lat-device"
CONSTELLATION_ID = "lat@lat-device"


def _percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


async def _register(ws: trio_websocket.WebSocketConnection, frame: dict[str, Any]) -> None:
    await ws.send_message(json.dumps(frame))
    verdict = json.loads(await ws.get_message())
    if verdict.get("status") != "ok":
        raise SystemExit(f"registration refused: {verdict.get('error')}")


async def _device_loop(ws: trio_websocket.WebSocketConnection) -> None:
    """Answer every COMMAND with one success per action, as the real device would."""
    while True:
        try:
            frame = json.loads(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            return
        if frame["type"] != "command":
            continue
        results = [
            {
                "status": "success",
                "error": None,
                "result": "ok",
                "namespace": "bench",
                "call_id": action["call_id"],
            }
            for action in frame["actions"]
        ]
        await ws.send_message(
            json.dumps(
                {
                    "type": "command_results",
                    "status": "continue",
                    "client_type": "device",
                    "client_id": DEVICE_ID,
                    "session_id": frame["session_id"],
                    "prev_response_id": frame["response_id"],
                    "action_results": results,
                }
            )
        )


async def measure(url: str, api_key: str, tasks: int, warmup: int) -> list[float]:
    """Run `warmup + tasks` sequential tasks; return the last `tasks` round trips in seconds."""
    full = f"{url}?token={urllib.parse.quote(api_key)}"
    samples: list[float] = []
    async with trio.open_nursery() as nursery:
        device = await trio_websocket.connect_websocket_url(nursery, full)
        await _register(
            device,
            {
                "type": "register",
                "status": "ok",
                "client_type": "device",
                "client_id": DEVICE_ID,
                "metadata": {"platform": "linux"},
            },
        )
        galaxy = await trio_websocket.connect_websocket_url(nursery, full)
        await _register(
            galaxy,
            {
                "type": "register",
                "status": "ok",
                "client_type": "constellation",
                "client_id": CONSTELLATION_ID,
                "target_id": DEVICE_ID,
            },
        )
        nursery.start_soon(_device_loop, device)
        for i in range(warmup + tasks):
            session_id = f"lat@{i}"
            started = time.perf_counter()
            await galaxy.send_message(
                json.dumps(
                    {
                        "type": "task",
                        "status": "continue",
                        "client_type": "constellation",
                        "client_id": CONSTELLATION_ID,
                        "target_id": DEVICE_ID,
                        "session_id": session_id,
                        "task_name": f"lat/{i}",
                        "request": PLAN,
                    }
                )
            )
            while True:
                frame = json.loads(await galaxy.get_message())
                if frame["type"] == "task_end" and frame["session_id"] == session_id:
                    break
                if frame["type"] == "error":
                    raise SystemExit(f"task refused: {frame['error']}")
            elapsed = time.perf_counter() - started
            if frame["status"] != "completed":
                raise SystemExit(f"task failed: {frame['error']}")
            if i >= warmup:
                samples.append(elapsed)
        await galaxy.aclose()
        await device.aclose()
        nursery.cancel_scope.cancel()
    return samples


def _spawn_server(api_key: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ufo_trio",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            f"--api-key={api_key}",
            "--log-level",
            "WARNING",
            "--db",
            ":memory:",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (ws://\S+/ws)", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, match.group(1)


async def _in_process(api_key: str, tasks: int, warmup: int) -> list[float]:
    from ufo_trio import ServerConfig, serve

    config = ServerConfig(host="127.0.0.1", port=0, api_key=api_key, log_level="WARNING")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, config)
        samples = await measure(server.url, api_key, tasks, warmup)
        nursery.cancel_scope.cancel()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--url", help="an already running server's ws://…/ws URL")
    parser.add_argument("--api-key", help="the key of the server given with --url")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the server inside this process instead of a subprocess",
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args(argv)

    proc: subprocess.Popen[str] | None = None
    if args.url:
        if not args.api_key:
            parser.error("--url needs --api-key")
        samples = trio.run(measure, args.url, args.api_key, args.tasks, args.warmup)
        where = args.url
    elif args.in_process:
        key = secrets.token_urlsafe(16)
        samples = trio.run(_in_process, key, args.tasks, args.warmup)
        where = "in-process server"
    else:
        key = secrets.token_urlsafe(16)
        proc, url = _spawn_server(key)
        try:
            samples = trio.run(measure, url, key, args.tasks, args.warmup)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        where = f"subprocess server at {url}"

    ms = sorted(s * 1000 for s in samples)
    figures = {
        "tasks": len(ms),
        "p50_ms": round(_percentile(ms, 0.50), 3),
        "p90_ms": round(_percentile(ms, 0.90), 3),
        "p99_ms": round(_percentile(ms, 0.99), 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }
    print(
        f"task round trip (TASK → TASK_END, one-step plan), {where}, "
        f"{args.warmup} warm-up tasks discarded"
    )
    print("  " + "  ".join(f"{k}={v}" for k, v in figures.items()))
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
