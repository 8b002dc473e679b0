"""`python -m bench.store_bench`: the task store on its own (issue 11), figures only.

1. Writes: N tasks, each accepted (durable, as before an ACK), 2 COMMANDs with results, ended;
   one task at a time, like a closed loop; a file database vs `:memory:`.
2. Reads: `/api/tasks?limit=100` as the route will run it (`parse_task_query` + `list_tasks`)
   over a history of --rows tasks: first page, a page deep in the list (cursor), and a status
   filter; p50/p99 in ms. The issue's target: p99 under 20 ms at 10,000 rows.

3. The same reads through real HTTP: a `python -m ufo_trio --db FILE` process on the history
   of step 2, `GET /api/tasks?limit=100` (and the other cases) over one kept-alive connection
   (httpx), p50/p99 in ms, client-measured (request written → body read).
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import trio

from ufo_trio._store import TaskRecord, TaskStore, parse_task_query


def _record(i: int, created_at: str | None = None) -> TaskRecord:
    return TaskRecord(
        session_id=f"s-{i:08}",
        task_name=f"task-{i}",
        request='{"steps": [[{"tool_name": "echo", "parameters": {"text": "hi"}}]]}',
        requester_id=f"orch-{i % 10}",
        requester_type="constellation",
        executor_id=f"dev-{i % 50}",
        platform="linux",
        agent="script",
        created_at=created_at or datetime.datetime.now(datetime.UTC).isoformat(),
    )


async def _one_task(store: TaskStore, i: int, created_at: str | None = None) -> None:
    sid = f"s-{i:08}"
    await store.task_accepted(_record(i, created_at))
    store.task_acked(sid, "t")
    for step in range(2):
        cmd = [{"tool_name": "echo", "tool_type": "action", "parameters": {"text": "hi"}}]
        await store.command_sent(sid, step, cmd, "t")
        await store.results_received(sid, step, [{"status": "success", "result": "hi"}], "t")
    await store.task_ended(sid, "completed" if i % 7 else "failed", None, {"ok": i}, "t")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def writes(path: str, n: int) -> dict[str, float]:
    store = TaskStore(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        t0 = time.perf_counter()
        c0 = time.process_time()
        for i in range(n):
            await _one_task(store, i)
        await store.flush()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        store.close()
    return {"tasks_per_s": n / wall, "cpu_us_per_task": cpu / n * 1e6}


async def reads(
    path: str, rows: int, queries: int
) -> tuple[dict[str, dict[str, float]], str]:
    store = TaskStore(path, max_tasks=rows * 2)
    out: dict[str, dict[str, float]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        # Recent enough that retention keeps them all.
        base = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=rows)
        for i in range(rows):
            stamp = (base + datetime.timedelta(seconds=i)).isoformat()
            await _one_task(store, i, stamp)
        await store.flush()
        first = await store.list_tasks(parse_task_query({"limit": "100"}))
        deep: Any = first
        for _ in range(rows // 200):  # half-way down the list
            deep = await store.list_tasks(
                parse_task_query({"limit": "100", "cursor": deep["next_cursor"]})
            )
        cases = {
            "first page": {"limit": "100"},
            "mid-list cursor": {"limit": "100", "cursor": deep["next_cursor"]},
            "status=failed": {"limit": "100", "status": "failed"},
            "target=dev-7": {"limit": "100", "target": "dev-7"},
        }
        for label, params in cases.items():
            times: list[float] = []
            for _ in range(queries):
                t0 = time.perf_counter()
                page = await store.list_tasks(parse_task_query(params))
                times.append((time.perf_counter() - t0) * 1000)
                assert page["tasks"], label
            out[label] = {"p50_ms": statistics.median(times), "p99_ms": _pct(times, 0.99)}
        store.close()
    return out, deep["next_cursor"]


def http_reads(path: str, queries: int, deep_cursor: str) -> dict[str, dict[str, float]]:
    """Step 3: a real server process on the history file, queried over HTTP."""
    import httpx

    key = "bench-key"
    command = [
        sys.executable, "-m", "ufo_trio", "--port", "0", "--host", "127.0.0.1",
        f"--api-key={key}", "--log-level", "WARNING", "--db", path,
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        match = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", server.stdout.readline())
        if match is None:
            raise SystemExit("the server did not start")
        base = f"http://127.0.0.1:{match.group(1)}/api/tasks"
        cases = {
            "first page": {"limit": "100"},
            "mid-list cursor": {"limit": "100", "cursor": deep_cursor},
            "status=failed": {"limit": "100", "status": "failed"},
            "target=dev-7": {"limit": "100", "target": "dev-7"},
        }
        out: dict[str, dict[str, float]] = {}
        with httpx.Client(headers={"X-API-Key": key}) as client:
            for label, params in cases.items():
                url = f"{base}?{urllib.parse.urlencode(params)}"
                client.get(url).raise_for_status()  # warm: read connection, caches
                times: list[float] = []
                for _ in range(queries):
                    t0 = time.perf_counter()
                    response = client.get(url)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert response.status_code == 200, label
                    assert response.json()["tasks"], label
                out[label] = {"p50_ms": statistics.median(times), "p99_ms": _pct(times, 0.99)}
        return out
    finally:
        server.terminate()
        server.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_bench", description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks for the write figure")
    parser.add_argument("--rows", type=int, default=10_000, help="history size for the reads")
    parser.add_argument("--queries", type=int, default=300, help="queries per read case")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ufo-store-bench-") as tmp:
        for label, path in ((":memory:", ":memory:"), ("file", str(Path(tmp) / "w.db"))):
            w = trio.run(writes, path, args.tasks)
            print(
                f"writes {label:9} {args.tasks} tasks: {w['tasks_per_s']:8.0f} tasks/s, "
                f"{w['cpu_us_per_task']:6.0f} µs CPU per task (both threads)"
            )
        r, cursor = trio.run(reads, str(Path(tmp) / "r.db"), args.rows, args.queries)
        for label, fig in r.items():
            print(
                f"/api/tasks?limit=100 over {args.rows} rows, {label:16}: "
                f"p50 {fig['p50_ms']:.2f} ms, p99 {fig['p99_ms']:.2f} ms  (no HTTP)"
            )
        h = http_reads(str(Path(tmp) / "r.db"), args.queries, cursor)
        for label, fig in h.items():
            print(
                f"/api/tasks?limit=100 over {args.rows} rows, {label:16}: "
                f"p50 {fig['p50_ms']:.2f} ms, p99 {fig['p99_ms']:.2f} ms  (real HTTP)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
