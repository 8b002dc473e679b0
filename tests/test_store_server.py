"""The task history wired into a real server (issue 11 phase 2): what clients and operators see
over the wire, over HTTP and from the CLI, across restarts and crashes.

Servers with a database file run on real sockets with the real clock (the store's writer is a
real thread); the slow-database test uses the in-memory server and `autojump_clock`, with a
writer that is stuck on purpose, so every virtual time it asserts is exact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import trio
import trio.testing
from llm_helpers import SYSTEM_INFO, descriptor, run_device
from process_helpers import WAIT, cli_process
from wire_helpers import HttpResponse, WireClient, http_request, memory_client

from ufo_trio import ServerConfig, serve
from ufo_trio._store import CRASH_ERROR, TaskStore
from ufo_trio.testing import (
    TEST_KEY,
    FakeChatModel,
    FakeReply,
    connect,
    open_memory_server,
    open_server,
)

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from ufo_trio._server import Server

SUMMARY_KEYS = {
    "session_id", "task_name", "requester_id", "requester_type", "executor_id", "platform",
    "agent", "status", "error", "created_at", "acked_at", "ended_at", "commands", "last_tool",
}  # fmt: skip
SHELL = {"tool_name": "shell", "tool_type": "action", "parameters": {"cmd": "ls"}}
CLICK = {"tool_name": "click", "tool_type": "action", "parameters": {"x": 1}}
TWO_STEPS = json.dumps({"steps": [[SHELL], [CLICK]]})
ONE_STEP = json.dumps({"steps": [[SHELL]]})


async def get(port: int, path: str, **kwargs: Any) -> HttpResponse:
    return await http_request(port, "GET", path, **kwargs)


async def get_json(port: int, path: str) -> Any:
    response = await get(port, path)
    assert response.status == 200, (path, response)
    return response.json()


async def send_task(dev: WireClient, name: str, request: str) -> dict[str, Any]:
    """A device asks for a task on itself; returns the ACK."""
    await dev.send(
        {"type": "task", "status": "continue", "client_id": dev_id(dev), "task_name": name,
         "request": request}
    )  # fmt: skip
    frames = await dev.recv_until(lambda f: f["type"] == "heartbeat" and f.get("session_id"))
    return frames[-1]


def dev_id(dev: WireClient) -> str:
    return dev.client_id  # type: ignore[attr-defined, no-any-return]


async def registered(port: int, client_id: str, **fields: Any) -> WireClient:
    dev, verdict = await WireClient.registered(port, client_id, **fields)
    assert verdict["status"] == "ok", verdict
    dev.client_id = client_id  # type: ignore[attr-defined]
    return dev


async def answer(dev: WireClient, outputs: list[Any]) -> dict[str, Any]:
    """Answer each COMMAND with the next output; return the TASK_END."""
    outputs = list(outputs)
    while True:
        frame = await dev.recv()
        assert isinstance(frame, dict), frame
        if frame["type"] == "task_end":
            return frame
        if frame["type"] != "command":
            continue
        results = [
            {"status": "success", "result": outputs.pop(0), "call_id": a["call_id"]}
            for a in frame["actions"]
        ]
        await dev.send(
            {"type": "command_results", "status": "continue", "client_id": dev_id(dev),
             "session_id": frame["session_id"], "prev_response_id": frame["response_id"],
             "action_results": results}
        )  # fmt: skip


def _complete(steps: list[dict[str, Any]], n: int) -> bool:
    """`n` steps, each with its Results (or its timeout) written."""
    return len(steps) == n and all(s["results"] is not None or s["timed_out"] for s in steps)


async def eventually(port: int, path: str, check: Any) -> Any:
    """GET `path` until `check(body)` holds (the writer commits asynchronously)."""
    with trio.fail_after(WAIT):
        while True:
            body = await get_json(port, path)
            if check(body):
                return body
            await trio.sleep(0.02)


# ------------------------------------------------------------------ transcript and devices


async def test_two_step_script_task_transcript_and_devices(tmp_path: Path) -> None:
    """A real 2-step script task: /api/tasks/{id} shows the row, both COMMANDs with the
    Results that came back, the request and the result; /api/devices shows the device online
    with live data, then offline with its disconnect reason."""
    db = tmp_path / "h.db"
    async with open_server(db=str(db)) as server:
        port = server.port
        dev = await registered(
            port, "dev-1", metadata={"platform": "linux", "system_info": {"hostname": "box-1"}}
        )
        await dev.send({"type": "heartbeat", "status": "ok", "client_id": "dev-1"})
        assert (await dev.recv())["type"] == "heartbeat"  # type: ignore[index]
        ack = await send_task(dev, "two-steps", TWO_STEPS)
        sid = ack["session_id"]
        end = await answer(dev, ["a.txt", "clicked"])
        assert end["status"] == "completed"

        # The outcome is visible at once; the transcript once the writer has committed it.
        detail = await eventually(port, f"/api/tasks/{sid}", lambda b: b["ended_at"])
        assert detail["status"] == "completed"
        detail = await eventually(port, f"/api/tasks/{sid}", lambda b: _complete(b["steps"], 2))
        assert set(detail) == SUMMARY_KEYS | {"request", "result", "steps"}
        assert detail["status"] == "completed"
        assert detail["task_name"] == "two-steps"
        assert (detail["requester_id"], detail["executor_id"]) == ("dev-1", "dev-1")
        assert (detail["requester_type"], detail["platform"], detail["agent"]) == (
            "device", "linux", "script",
        )  # fmt: skip
        assert detail["request"] == TWO_STEPS
        assert detail["result"] == end["result"]
        assert detail["commands"] == 2
        assert detail["last_tool"] == "click"
        assert detail["error"] is None
        assert detail["created_at"] <= detail["acked_at"] <= detail["ended_at"]
        steps = detail["steps"]
        assert [s["index"] for s in steps] == [0, 1]
        assert [[c["tool_name"] for c in s["commands"]] for s in steps] == [["shell"], ["click"]]
        assert steps[0]["commands"][0]["parameters"] == {"cmd": "ls"}
        assert [[r["result"] for r in s["results"]] for s in steps] == [["a.txt"], ["clicked"]]
        assert [s["timed_out"] for s in steps] == [False, False]
        for s in steps:
            assert s["results"][0]["call_id"] == s["commands"][0]["call_id"]
            assert s["sent_at"] <= s["received_at"]

        listed = await get_json(port, "/api/tasks")
        assert [t["session_id"] for t in listed["tasks"]] == [sid]
        assert set(listed["tasks"][0]) == SUMMARY_KEYS

        devices = await eventually(port, "/api/devices", lambda b: b["devices"])
        (device,) = devices["devices"]
        assert device["client_id"] == "dev-1"
        assert device["online"] is True
        assert (device["role"], device["platform"], device["hostname"]) == ("device", "linux", "box-1")
        assert device["connected_at"] is not None
        assert device["last_heartbeat"] is not None
        assert device["connected_at"] <= device["last_heartbeat"]
        assert device["sessions_running"] == 0

        await dev.close()
        gone = await eventually(
            port, "/api/devices", lambda b: b["devices"][0]["last_disconnect_reason"]
        )
        (device,) = gone["devices"]
        assert device["online"] is False
        assert device["connected_at"] is None
        assert device["last_heartbeat"] is None
        assert device["last_disconnect_reason"].startswith("peer closed (1000")


async def test_sessions_running_and_a_timed_out_step(tmp_path: Path) -> None:
    """While a task runs, /api/devices counts it and /api/tasks shows it running; a COMMAND
    without Results is recorded as timed out (CMD-6)."""
    async with open_server(db=str(tmp_path / "h.db"), command_timeout=0.5) as server:
        port = server.port
        dev = await registered(port, "dev-1")
        ack = await send_task(dev, "slow", ONE_STEP)
        sid = ack["session_id"]
        command = await dev.recv()
        assert isinstance(command, dict)
        assert command["type"] == "command"
        devices = await get_json(port, "/api/devices")
        assert devices["devices"][0]["sessions_running"] == 1
        running = await get_json(port, "/api/tasks?status=running")
        assert [t["session_id"] for t in running["tasks"]] == [sid]
        end = await dev.recv_until(lambda f: f["type"] == "task_end")
        assert end[-1]["status"] == "failed"
        detail = await eventually(port, f"/api/tasks/{sid}", lambda b: _complete(b["steps"], 1))
        assert detail["status"] == "failed"
        assert detail["error"] == end[-1]["error"]
        (step,) = detail["steps"]
        assert step["timed_out"] is True
        assert step["results"] is None


# ------------------------------------------------------------------ restarts


async def test_history_and_task_result_survive_a_restart(tmp_path: Path) -> None:
    """RES-1 across a restart: /api/task_result, /api/tasks and /api/devices read the file."""
    db = str(tmp_path / "h.db")
    async with open_server(db=db) as server:
        dev = await registered(server.port, "dev-1")
        ack = await send_task(dev, "keep-me", ONE_STEP)
        end = await answer(dev, ["out"])
        assert end["status"] == "completed"
        failed = await send_task(dev, "broken", "not json")
        fail_end = await dev.recv_until(lambda f: f["type"] == "task_end")
    async with open_server(db=db) as server:
        port = server.port
        assert await get_json(port, "/api/task_result/keep-me") == {
            "status": "done", "result": end["result"],
        }  # fmt: skip
        assert await get_json(port, "/api/task_result/broken") == {
            "status": "failed", "error": fail_end[-1]["error"], "result": None,
        }  # fmt: skip
        assert await get_json(port, "/api/task_result/never-seen") == {"status": "pending"}
        listed = await get_json(port, "/api/tasks")
        assert [t["session_id"] for t in listed["tasks"]] == [
            failed["session_id"], ack["session_id"],
        ]  # fmt: skip
        devices = await get_json(port, "/api/devices")
        assert [(d["client_id"], d["online"]) for d in devices["devices"]] == [("dev-1", False)]
        # A new run with the same name: latest wins (RES-1), pending while it runs.
        dev = await registered(port, "dev-1")
        await send_task(dev, "keep-me", ONE_STEP)
        assert await get_json(port, "/api/task_result/keep-me") == {"status": "pending"}
        await answer(dev, ["second"])
        body = await get_json(port, "/api/task_result/keep-me")
        assert body["status"] == "done"
        assert body["result"][0]["results"][0]["result"] == "second"


def _url(line: str) -> tuple[str, int]:
    match = re.search(r"listening on (ws://127\.0\.0\.1:(\d+)/ws)", line)
    assert match is not None, line
    return match.group(1), int(match.group(2))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UFO_TRIO_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


async def test_sigkill_mid_task_then_restart_marks_it_failed(tmp_path: Path) -> None:
    """Issue 11 item 3: a server killed with SIGKILL while a task runs; the next server on the
    same file reports the task failed with `server stopped before the task ended`."""
    db = tmp_path / "h.db"
    args = ("--port", "0", "--api-key", TEST_KEY, "--db", str(db), "--host", "127.0.0.1")
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        async with cli_process(*args, env=_env(), stderr=err) as (process, line):
            _, port = _url(line)
            dev = await registered(port, "dev-1")
            ack = await send_task(dev, "victim", ONE_STEP)
            command = await dev.recv()
            assert isinstance(command, dict)
            assert command["type"] == "command"
            # The row was committed before the ACK; the step is written soon after.
            await eventually(port, f"/api/tasks/{ack['session_id']}", lambda b: b["steps"])
            process.send_signal(signal.SIGKILL)
            with trio.fail_after(WAIT):
                assert await process.wait() == -signal.SIGKILL
            dev.reset()
    assert f"task store: database {db}" in stderr.read_text()
    with stderr.open("wb") as err:
        async with cli_process(*args, env=_env(), stderr=err) as (process, line):
            _, port = _url(line)
            detail = await get_json(port, f"/api/tasks/{ack['session_id']}")
            assert detail["status"] == "failed"
            assert detail["error"] == CRASH_ERROR
            assert detail["ended_at"] is not None
            assert [s["results"] for s in detail["steps"]] == [None]
            assert await get_json(port, "/api/task_result/victim") == {
                "status": "failed", "error": CRASH_ERROR, "result": None,
            }  # fmt: skip
            devices = await get_json(port, "/api/devices")
            assert devices["devices"][0]["last_disconnect_reason"] == "server stopped"
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(WAIT):
                assert await process.wait() == 0


async def test_second_server_on_the_same_file_exits_1_and_leaves_the_first_alone(
    tmp_path: Path,
) -> None:
    """Two servers on one file: the second exits 1 with one line naming the file; the first's
    running task stays running and then completes."""
    db = tmp_path / "h.db"
    async with open_server(db=str(db)) as server:
        dev = await registered(server.port, "dev-1")
        ack = await send_task(dev, "mine", ONE_STEP)
        with trio.fail_after(WAIT):
            second = await trio.run_process(
                [sys.executable, "-m", "ufo_trio", "--port", "0", "--db", str(db)],
                capture_stdout=True, capture_stderr=True, check=False, env=_env(),
            )  # fmt: skip
        assert second.returncode == 1
        assert second.stdout == b""
        assert second.stderr.decode().splitlines() == [
            f"ufo-trio: error: database {db} is in use by another ufo_trio server (lock {db}.lock)"
        ]
        detail = await get_json(server.port, f"/api/tasks/{ack['session_id']}")
        assert detail["status"] == "running"
        end = await answer(dev, ["ok"])
        assert end["status"] == "completed"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM tasks").fetchall() == [("completed",)]


async def test_shutdown_flushes_what_is_queued(tmp_path: Path) -> None:
    """A graceful stop right after tasks ended: every outcome is in the file afterwards."""
    db = tmp_path / "h.db"
    async with trio.open_nursery() as nursery:
        config = ServerConfig(host="127.0.0.1", port=0, api_key=TEST_KEY, db=str(db))
        server: Server = await nursery.start(serve, config)
        dev = await registered(server.port, "dev-1")
        for i in range(20):
            await send_task(dev, f"t-{i}", ONE_STEP)
            await answer(dev, [i])
        # The last one is still running when the stop begins: it ends as cancelled (SHUT-1).
        await send_task(dev, "last", ONE_STEP)
        server.request_shutdown()
        await server.wait_stopped()
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT task_name, status FROM tasks").fetchall())
    assert len(rows) == 21
    assert {rows[f"t-{i}"] for i in range(20)} == {"completed"}
    assert rows["last"] == "failed"


# ------------------------------------------------------------------ /api/tasks over HTTP


async def test_list_filters_pagination_and_bad_input(tmp_path: Path) -> None:
    """Filters, newest first, cursor pagination stable under inserts, 400 for a bad parameter
    or a tampered cursor, injection-shaped filters are plain values, 404 and 401."""
    async with open_server(db=str(tmp_path / "h.db")) as server:
        port = server.port
        dev = await registered(port, "dev-1")
        other = await registered(port, "dev-2")
        sids = []
        for i in range(5):
            ack = await send_task(dev, f"a-{i}", ONE_STEP)
            await answer(dev, [i])
            sids.append(ack["session_id"])
        ack = await send_task(other, "b-0", "not json")
        await other.recv_until(lambda f: f["type"] == "task_end")
        b0 = ack["session_id"]

        everything = await get_json(port, "/api/tasks")
        assert [t["session_id"] for t in everything["tasks"]] == [b0, *reversed(sids)]
        assert everything["next_cursor"] is None
        by_target = await get_json(port, "/api/tasks?target=dev-2")
        assert [t["session_id"] for t in by_target["tasks"]] == [b0]
        failed = await get_json(port, "/api/tasks?status=failed&requester=dev-2")
        assert [t["session_id"] for t in failed["tasks"]] == [b0]
        since = everything["tasks"][0]["created_at"]
        recent = await get_json(port, f"/api/tasks?since={urllib.parse.quote(since)}")
        assert [t["session_id"] for t in recent["tasks"]] == [b0]

        # Pages of 2; a task inserted between pages does not shift them.
        page1 = await get_json(port, "/api/tasks?target=dev-1&limit=2")
        assert [t["session_id"] for t in page1["tasks"]] == [sids[4], sids[3]]
        await send_task(dev, "a-new", ONE_STEP)
        await answer(dev, ["new"])
        cursor = urllib.parse.quote(page1["next_cursor"])
        page2 = await get_json(port, f"/api/tasks?target=dev-1&limit=2&cursor={cursor}")
        assert [t["session_id"] for t in page2["tasks"]] == [sids[2], sids[1]]
        cursor = urllib.parse.quote(page2["next_cursor"])
        page3 = await get_json(port, f"/api/tasks?target=dev-1&limit=2&cursor={cursor}")
        assert [t["session_id"] for t in page3["tasks"]] == [sids[0]]
        assert page3["next_cursor"] is None

        tampered = page1["next_cursor"][:-2] + ("AA" if page1["next_cursor"][-2:] != "AA" else "BB")
        for path, detail in [
            (f"/api/tasks?cursor={urllib.parse.quote(tampered)}", "Invalid cursor"),
            ("/api/tasks?cursor=bm90LWEtY3Vyc29y", "Invalid cursor"),
            ("/api/tasks?limit=0", None),
            ("/api/tasks?limit=501", None),
            ("/api/tasks?limit=ten", None),
            ("/api/tasks?status=done", None),
            ("/api/tasks?status=completed%27%3B%20DROP%20TABLE%20tasks%3B--", None),
            ("/api/tasks?since=yesterday", None),
        ]:
            response = await get(port, path)
            assert response.status == 400, (path, response)
            if detail is not None:
                assert response.detail == detail
            else:
                name = path.split("?")[1].split("=")[0]
                assert name in response.detail.lower(), (path, response.detail)

        for hostile in ["dev-1' OR '1'='1", "dev-1\"; DROP TABLE tasks; --", "%", "_"]:
            quoted = urllib.parse.quote(hostile)
            for name in ("target", "requester"):
                body = await get_json(port, f"/api/tasks?{name}={quoted}")
                assert body == {"tasks": [], "next_cursor": None}, hostile
        assert len((await get_json(port, "/api/tasks"))["tasks"]) == 7  # the table is intact

        missing = await get(port, "/api/tasks/no-such-session")
        assert (missing.status, missing.detail) == (404, "Task not found")
        for path in ("/api/tasks", f"/api/tasks/{b0}", "/api/devices"):
            unauthorised = await get(port, path, key=None)
            assert (unauthorised.status, unauthorised.detail) == (401, "Missing API key")
            assert (await http_request(port, "POST", path)).status == 405


async def test_history_routes_answer_503_when_the_store_is_unavailable(tmp_path: Path) -> None:
    """A read that SQLite refuses is a 503 with one line, and the server keeps serving."""
    async with open_server(db=str(tmp_path / "h.db")) as server:
        store = server.context.store
        assert store is not None

        def broken(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            raise sqlite3.OperationalError("disk I/O error")

        store._read_pool.clear()
        store._connect = broken  # new read connections fail
        for path in ("/api/tasks", "/api/tasks/x", "/api/devices", "/api/task_result/x"):
            response = await get(server.port, path)
            assert (response.status, response.detail) == (503, "Task history is not available")
        assert (await get(server.port, "/api/health")).status == 200


# ------------------------------------------------------------------ a slow database


class _Disk:
    """A database whose writes are slow (200 ms each) and, while `gate` is closed, stuck."""

    def __init__(self) -> None:
        self.armed = False
        self.gate = threading.Event()
        self.entered = threading.Event()


def _slow_connect(disk: _Disk) -> Any:
    class Slow(sqlite3.Connection):
        def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
            if disk.armed and sql.startswith(("INSERT", "UPDATE")):
                disk.entered.set()
                disk.gate.wait(WAIT)
                time.sleep(0.2)
            return super().execute(sql, parameters)

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return sqlite3.connect(*args, factory=Slow, **kwargs)

    return connect


async def test_slow_database_leaves_heartbeats_and_registration_alone_queue_full_policy(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 11 item 4. The writer is stuck on the disk (then 200 ms per write) and its queue
    (4 operations here) fills up. Heartbeats and registrations are answered at the very virtual
    instant they arrive. A session waits at most 1 s for room per record: a transcript step
    that finds no room is dropped and counted (one warning), the outcome is queued anyway,
    and once the disk is back the outcome is in the database."""
    disk = _Disk()
    stores: list[TaskStore] = []

    def from_config(
        cls: type[TaskStore], config: ServerConfig, *, online: Any = None, secrets: Any = ()
    ) -> TaskStore:
        store = TaskStore(
            ":memory:", online=online, queue_size=4, full_wait=1.0, prune_interval=1e9,
            connect=_slow_connect(disk),
        )  # fmt: skip
        stores.append(store)
        return store

    monkeypatch.setattr(TaskStore, "from_config", classmethod(from_config))
    caplog.set_level(logging.WARNING, logger="ufo_trio.store")
    async with open_memory_server(ping_interval=0, heartbeat_timeout=0) as mem:
        (store,) = stores
        disk.armed = True
        dev = await memory_client(mem.server)
        assert (await dev.register("dev-1"))["status"] == "ok"
        dev.client_id = "dev-1"  # type: ignore[attr-defined]
        await trio.to_thread.run_sync(disk.entered.wait, WAIT)  # stuck on dev-1's sighting
        t0 = trio.current_time()
        # Fill the queue (4) with sightings: they never wait, so this is instant.
        n = 0
        while store._queue.qsize() < 4:
            n += 1
            extra = await memory_client(mem.server)
            assert (await extra.register(f"filler-{n}"))["status"] == "ok"
        assert trio.current_time() == t0
        assert store.dropped_full == 0

        ack = await send_task(dev, "outcome-kept", TWO_STEPS)
        # The task row waited 1 s for room, then was queued anyway: the ACK follows it.
        assert trio.current_time() == t0 + 1.0
        first = await dev.recv()
        assert isinstance(first, dict)
        assert first["type"] == "command"
        results = [{"status": "success", "result": "r0", "call_id": first["actions"][0]["call_id"]}]
        await dev.send(
            {"type": "command_results", "status": "continue", "client_id": "dev-1",
             "session_id": ack["session_id"], "prev_response_id": first["response_id"],
             "action_results": results}
        )  # fmt: skip
        # While the session waits for room to record COMMAND 0, at t0 + 1.5:
        await trio.sleep(0.5)
        await dev.send({"type": "heartbeat", "status": "ok", "client_id": "dev-1"})
        beat = await dev.recv()
        assert isinstance(beat, dict)
        assert beat["type"] == "heartbeat"
        assert trio.current_time() == t0 + 1.5
        newcomer = await memory_client(mem.server)
        assert (await newcomer.register("dev-2"))["status"] == "ok"
        await newcomer.send({"type": "heartbeat", "status": "ok", "client_id": "dev-2"})
        assert (await newcomer.recv())["type"] == "heartbeat"  # type: ignore[index]
        assert trio.current_time() == t0 + 1.5  # registration never waits for room

        second = await dev.recv()
        assert isinstance(second, dict)
        assert second["type"] == "command"
        assert trio.current_time() == t0 + 3.0  # COMMAND 0's two records: 1 s each, dropped
        results = [{"status": "success", "result": "r1", "call_id": second["actions"][0]["call_id"]}]
        await dev.send(
            {"type": "command_results", "status": "continue", "client_id": "dev-1",
             "session_id": ack["session_id"], "prev_response_id": second["response_id"],
             "action_results": results}
        )  # fmt: skip
        end = await dev.recv()
        assert isinstance(end, dict)
        assert end["type"] == "task_end"
        assert end["status"] == "completed"
        # COMMAND 1's two records dropped (1 s each), the outcome queued after 1 s.
        assert trio.current_time() == t0 + 6.0
        assert store.dropped_full == 5  # four transcript records and dev-2's sighting
        warnings = [r.getMessage() for r in caplog.records if "queue full" in r.getMessage()]
        assert len(warnings) == 1  # at most one a minute

        disk.gate.set()  # the disk is back

        def committed() -> tuple[Any, ...]:
            while True:
                with store._mem_lock:
                    assert store._writer is not None
                    row = store._writer.execute(
                        "SELECT status, acked_at IS NOT NULL, commands, "
                        "(SELECT count(*) FROM steps) FROM tasks WHERE task_name = 'outcome-kept'"
                    ).fetchone()
                if row and row[0] != "running":
                    return tuple(row)
                time.sleep(0.02)

        # (HTTP reads run in threads too, which an autojumping clock cannot wait for.)
        assert await trio.to_thread.run_sync(committed) == ("completed", 1, 0, 0)


# ------------------------------------------------------------------ CLI and secrets


async def test_tasks_cli_end_to_end_against_a_real_server(tmp_path: Path) -> None:
    """`python -m ufo_trio tasks` and `tasks show` against a real server with a database."""
    async with open_server(db=str(tmp_path / "h.db")) as server:
        dev = await registered(server.port, "dev-1")
        ack = await send_task(dev, "cli-task", TWO_STEPS)
        await answer(dev, ["a.txt", "clicked"])
        base = [
            sys.executable, "-m", "ufo_trio", "tasks", "--url", server.url, "--api-key", TEST_KEY,
        ]  # fmt: skip
        with trio.fail_after(WAIT):
            table = await trio.run_process(
                [*base, "--status", "completed"], capture_stdout=True, capture_stderr=True,
                check=False, env=_env(),
            )  # fmt: skip
            shown = await trio.run_process(
                [*base, "show", ack["session_id"]], capture_stdout=True, capture_stderr=True,
                check=False, env=_env(),
            )  # fmt: skip
            missing = await trio.run_process(
                [*base, "show", "nope"], capture_stdout=True, capture_stderr=True,
                check=False, env=_env(),
            )  # fmt: skip
        assert table.returncode == 0, table.stderr
        out = table.stdout.decode()
        assert "cli-task" in out
        assert "completed" in out
        assert "dev-1" in out
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout.decode()
        for expected in (ack["session_id"], "shell", "click", "a.txt", "clicked"):
            assert expected in text, (expected, text)
        assert missing.returncode == 1
        assert missing.stderr.decode().count("\n") == 1
        assert "no task with session id 'nope'" in missing.stderr.decode()


async def test_database_file_holds_no_api_key(tmp_path: Path) -> None:
    """The planted secret (the API key, given to the server and used by every client) is
    nowhere in the database file or its WAL after a run."""
    secret = "planted-SECRET-4f9b1c2d8e"
    db = tmp_path / "h.db"
    async with open_server(db=str(db), api_key=secret) as server:
        async with connect(server.url, token=secret) as raw:
            await raw.register("dev-1", metadata={"platform": "linux"})
            await raw.send(
                {"type": "task", "status": "continue", "client_id": "dev-1",
                 "task_name": "t", "request": "not json"}
            )  # fmt: skip
            while (await raw.recv())["type"] != "task_end":
                pass
        response = await http_request(server.port, "GET", "/api/tasks", key=secret)
        assert response.status == 200
        assert len(response.json()["tasks"]) == 1
    assert _files_holding(tmp_path, secret.encode()) == []


def _files_holding(directory: Path, secret: bytes) -> list[Path]:
    return [path for path in directory.iterdir() if secret in path.read_bytes()]


async def test_cli_start_line_names_the_database(tmp_path: Path) -> None:
    """One log line at start names the file; the EP-3 stdout line is unchanged."""
    db = tmp_path / "h.db"
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        async with cli_process(
            "--port", "0", "--api-key", TEST_KEY, "--db", str(db), env=_env(), stderr=err
        ) as (process, line):
            assert re.fullmatch(r"ufo_trio \S+ listening on ws://127\.0\.0\.1:\d+/ws", line)
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(WAIT):
                assert await process.wait() == 0
    lines = [s for s in stderr.read_text().splitlines() if "task store" in s]
    assert len(lines) == 1
    assert f"database {db}" in lines[0]


def test_cli_default_db_is_in_the_working_directory(tmp_path: Path) -> None:
    """Without --db the CLI keeps its history in ./ufo_trio.db."""
    with subprocess.Popen(
        [sys.executable, "-m", "ufo_trio", "--port", "0", "--api-key", TEST_KEY],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_env(), text=True,
    ) as process:  # fmt: skip
        try:
            assert process.stdout is not None
            assert "listening on" in process.stdout.readline()
            assert (tmp_path / "ufo_trio.db").exists()
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(WAIT) == 0


# ------------------------------------------------------------------ the llm agent's turns


async def test_llm_model_turns_are_in_the_transcript_with_secrets_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An llm task's model turns appear in /api/tasks/{id} next to the COMMAND each led to;
    neither the model server's key nor a tool secret (echoed by the device and the model) is
    in the transcript or anywhere in the database files."""
    llm_key, tool_key = "sk-planted-llm-key-5555", "planted-tool-secret-7777"
    monkeypatch.setenv("PLANTED_TOOL_KEY", tool_key)
    bash = descriptor(
        "execute_command",
        {"command": {"type": "string"}, "api_key": {"type": "string"}},
        ["command", "api_key"],
    )

    def echo(action: dict[str, Any]) -> dict[str, Any]:
        key = action["parameters"].get("api_key")
        return {"status": "success", "error": None, "result": f"ran with key={key}"}

    model = FakeChatModel(
        [FakeReply.call("execute_command", {"command": "ls"}), f"done; the key was {tool_key}"]
    )
    db = tmp_path / "h.db"
    async with model, open_server(
        db=str(db), llm_base_url=model.base_url, llm_model="m", llm_api_key=llm_key,
        tool_secrets=("api_key=PLANTED_TOOL_KEY",),
    ) as server, connect(server.url) as dev, connect(server.url) as galaxy:  # fmt: skip
        await dev.register("dev-1", metadata={"platform": "linux", "system_info": SYSTEM_INFO})
        await galaxy.register("galaxy@dev-1", "constellation", target_id="dev-1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_device(dev, tools=[bash], handler=echo))
            await galaxy.send(
                {"type": "task", "status": "continue", "client_type": "constellation",
                 "client_id": "galaxy@dev-1", "target_id": "dev-1", "session_id": "s-llm",
                 "task_name": "llm-task", "request": "list files"}
            )  # fmt: skip
            with trio.fail_after(WAIT):
                while (end := await galaxy.recv())["type"] != "task_end":
                    pass
            assert end["status"] == "completed", end
            detail = await eventually(
                server.port, "/api/tasks/s-llm", lambda b: _complete(b["steps"], 2)
                and len(b["steps"][1].get("model_turns", ())) == 2,
            )
            nursery.cancel_scope.cancel()
    assert detail["agent"] == "auto"
    listing, step = detail["steps"]
    assert [c["tool_name"] for c in listing["commands"]] == ["list_tools"]
    assert "model_turns" not in listing
    assert [c["tool_name"] for c in step["commands"]] == ["execute_command"]
    call_turn, answer_turn = step["model_turns"]  # the final answer follows the last COMMAND
    assert [c["name"] for c in call_turn["tool_calls"]] == ["execute_command"]
    assert json.loads(call_turn["tool_calls"][0]["arguments"]) == {"command": "ls"}
    assert answer_turn["tool_calls"] == []
    assert answer_turn["content"] == "done; the key was ***"
    # The device got the tool secret filled in and echoed it; the history masks it everywhere.
    assert step["commands"][0]["parameters"] == {"command": "ls", "api_key": "***"}
    assert step["results"][0]["result"] == "ran with key=***"
    text = json.dumps(detail)
    for secret in (llm_key, tool_key):
        assert secret not in text
        assert _files_holding(tmp_path, secret.encode()) == []
