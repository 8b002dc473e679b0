"""The task store (issue 11) on its own, against real SQLite files in tmp_path.

The store's writer is a real thread, so these tests do not use autojump_clock (it would jump
virtual time while the loop waits for the thread); the one timing test uses a MockClock that
only moves when the test says so.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from ufo_trio import ConfigError, ServerConfig
from ufo_trio._messages import Command, Result, ResultStatus, ToolType
from ufo_trio._store import (
    CRASH_ERROR,
    MAX_REQUEST_BYTES,
    BadCursor,
    BadQuery,
    DeviceRecord,
    OnlineClient,
    StoreError,
    StoreUnavailable,
    TaskQuery,
    TaskRecord,
    TaskStore,
    parse_task_query,
)

if TYPE_CHECKING:
    import socket
    from collections.abc import AsyncIterator
    from pathlib import Path

SUMMARY_KEYS = {
    "session_id", "task_name", "requester_id", "requester_type", "executor_id", "platform",
    "agent", "status", "error", "created_at", "acked_at", "ended_at", "commands", "last_tool",
}  # fmt: skip


@asynccontextmanager
async def opened(path: Path | str, **kwargs: Any) -> AsyncIterator[TaskStore]:
    store = TaskStore(str(path), **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            yield store
            store.close()
    except BaseExceptionGroup as group:  # a refused start: the one StoreError, as the CLI sees it
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], StoreError):
            raise group.exceptions[0] from None
        raise


def record(sid: str, name: str | None = None, **kw: Any) -> TaskRecord:
    values: dict[str, Any] = {
        "session_id": sid,
        "task_name": name or f"name-{sid}",
        "request": "do it",
        "requester_id": "const-1",
        "requester_type": "constellation",
        "executor_id": "dev-1",
        "platform": "windows",
        "agent": "script",
    }
    values.update(kw)
    return TaskRecord(**values)


def ago(days: float) -> str:
    return (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)).isoformat()


def rows(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, params).fetchall()


#: Every task row on disk: `tasks`, and the inbox where a task row waited for before its ACK
#: is committed first (the writer moves it into `tasks` with its next batch).
ALL_TASKS = (
    "(SELECT session_id, status FROM tasks "
    "UNION ALL SELECT session_id, 'running' AS status FROM inbox)"
)


# ------------------------------------------------------------------ round trip and contract


async def test_a_task_and_its_transcript_read_back_in_the_contract_shape(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(db) as store:
        await store.task_accepted(record("s1", "report"))
        store.task_acked("s1", "2026-01-01T00:00:01+00:00")
        cmds = [
            Command(tool_name="shell", tool_type=ToolType.ACTION, parameters={"c": 1}, call_id="c1")
        ]
        await store.command_sent("s1", 0, cmds, "2026-01-01T00:00:02+00:00")
        await store.results_received(
            "s1", 0, [Result(status=ResultStatus.SUCCESS, result="ok", call_id="c1")],
            "2026-01-01T00:00:03+00:00",
        )  # fmt: skip
        await store.model_turn("s1", 1, {"role": "assistant", "content": "next"})
        await store.command_sent("s1", 1, [{"tool_name": "click", "tool_type": "action"}], "t4")
        await store.results_received("s1", 1, None, "t5")  # CMD-6 timeout
        await store.task_ended("s1", "completed", None, {"answer": 42}, "t6", task_name="report")
        await store.flush()
        detail = await store.task_detail("s1")
        listing = await store.list_tasks(TaskQuery())
        assert await store.task_result("report") == {"status": "done", "result": {"answer": 42}}
    assert detail is not None
    assert set(detail) == SUMMARY_KEYS | {"request", "result", "steps"}
    assert detail["status"] == "completed"
    assert detail["commands"] == 2
    assert detail["last_tool"] == "click"
    assert detail["acked_at"] == "2026-01-01T00:00:01+00:00"
    assert detail["result"] == {"answer": 42}
    assert detail["steps"] == [
        {
            "index": 0,
            "sent_at": "2026-01-01T00:00:02+00:00",
            "commands": [
                {
                    "tool_name": "shell",
                    "tool_type": "action",
                    "parameters": {"c": 1},
                    "call_id": "c1",
                }
            ],
            "results": [{"status": "success", "error": None, "result": "ok", "call_id": "c1"}],
            "received_at": "2026-01-01T00:00:03+00:00",
            "timed_out": False,
        },
        {
            "index": 1,
            "sent_at": "t4",
            "commands": [
                {"tool_name": "click", "tool_type": "action", "parameters": None, "call_id": None}
            ],
            "results": None,
            "received_at": None,
            "timed_out": True,
            "model_turns": [{"role": "assistant", "content": "next"}],
        },
    ]
    assert listing["next_cursor"] is None
    [summary] = listing["tasks"]
    assert set(summary) == SUMMARY_KEYS
    assert summary["session_id"] == "s1"
    # It is on disk: another process (here: a plain connection) sees it after the store closed.
    assert rows(db, "SELECT status, commands FROM tasks") == [("completed", 2)]


async def test_a_resent_command_in_one_batch_replaces_its_step_and_later_results_update_it(
    tmp_path: Path,
) -> None:
    # The writer folds a batch's updates per task and per step; the rows are those of applying
    # the operations one by one: a re-sent COMMAND drops the results of the first sending.
    db = tmp_path / "h.db"
    async with opened(db, linger=60.0) as store:
        await store.task_accepted(record("s1", "n1"))
        await store.command_sent("s1", 0, [{"tool_name": "first"}], "t1")
        await store.results_received("s1", 0, [{"status": "success", "result": 1}], "t2")
        await store.command_sent("s1", 0, [{"tool_name": "again"}], "t3")
        await store.flush()
        assert rows(db, "SELECT sent_at, results, timed_out FROM steps") == [("t3", None, 0)]
        await store.results_received("s1", 0, [{"status": "success", "result": 2}], "t4")
        store.task_acked("s1", "t0")
        await store.flush()
        detail = await store.task_detail("s1")
    assert detail is not None
    assert (detail["commands"], detail["last_tool"], detail["acked_at"]) == (2, "again", "t0")
    [step] = detail["steps"]
    assert (step["sent_at"], step["received_at"], step["timed_out"]) == ("t3", "t4", False)
    assert step["commands"][0]["tool_name"] == "again"
    assert step["results"][0]["result"] == 2


async def test_a_task_row_commits_without_waiting_for_held_updates_which_survive_a_stop(
    tmp_path: Path,
) -> None:
    # TASK-8: a new task row is on disk when task_accepted returns, committed on its own while
    # the earlier task's outcome is still being gathered; a stop commits what was held back.
    db = tmp_path / "h.db"
    async with opened(db, linger=60.0, flush_timeout=5.0) as store:
        await store.task_accepted(record("s1", "n1"))
        await store.task_ended("s1", "completed", None, {"ok": 1}, "t1", task_name="n1")
        await store.task_accepted(record("s2", "n2"))
        assert rows(db, f"SELECT session_id FROM {ALL_TASKS} WHERE session_id = 's2'") == [("s2",)]
        # Readable at once all the same (the outcome is kept in memory until committed).
        assert await store.task_result("n1") == {"status": "done", "result": {"ok": 1}}
        await store.task_ended("s2", "failed", "boom", None, "t2", task_name="n2")
    assert rows(db, "SELECT session_id, status FROM tasks ORDER BY id") == [
        ("s1", "completed"),
        ("s2", "failed"),
    ]


async def test_a_just_accepted_task_is_listed_found_and_paged_before_the_writer_moves_it(
    tmp_path: Path,
) -> None:
    # TASK-8: the row committed before the ACK sits in the inbox until the writer's next
    # batch (here held back for a minute); the routes see it at once all the same.
    db = tmp_path / "h.db"
    async with opened(db, linger=60.0) as store:
        await store.task_accepted(record("old", "n-old"))
        await store.flush()  # `old` is in `tasks` now
        await store.task_accepted(record("new", "n-new", executor_id="dev-2"))
        await store.task_accepted(record("newer", "n-newer"))
        assert rows(db, "SELECT session_id FROM inbox ORDER BY id") == [("new",), ("newer",)]
        listing = await store.list_tasks(TaskQuery())
        assert [t["session_id"] for t in listing["tasks"]] == ["newer", "new", "old"]
        assert set(listing["tasks"][0]) == SUMMARY_KEYS
        assert listing["tasks"][0]["status"] == "running"
        assert listing["tasks"][0]["commands"] == 0
        running = await store.list_tasks(TaskQuery(status="running", target="dev-2"))
        assert [t["session_id"] for t in running["tasks"]] == ["new"]
        assert (await store.list_tasks(TaskQuery(status="completed")))["tasks"] == []
        # A page boundary inside the inbox, then into `tasks`: each task once, in order.
        first = await store.list_tasks(TaskQuery(limit=1))
        assert [t["session_id"] for t in first["tasks"]] == ["newer"]
        second = await store.list_tasks(TaskQuery(limit=1, cursor=first["next_cursor"]))
        assert [t["session_id"] for t in second["tasks"]] == ["new"]
        third = await store.list_tasks(TaskQuery(limit=5, cursor=second["next_cursor"]))
        assert [t["session_id"] for t in third["tasks"]] == ["old"]
        assert third["next_cursor"] is None
        detail = await store.task_detail("new")
        assert detail is not None
        assert (detail["status"], detail["request"], detail["steps"]) == ("running", "do it", [])
        assert await store.task_result("n-new") == {"status": "pending"}
        # Its outcome, queued but not yet written, reads through the in-memory overlay.
        await store.task_ended("new", "completed", None, {"ok": True}, "t", task_name="n-new")
        assert await store.task_result("n-new") == {"status": "done", "result": {"ok": True}}
    assert rows(db, "SELECT count(*) FROM inbox") == [(0,)]  # a clean stop moves it
    assert rows(db, "SELECT session_id, status FROM tasks ORDER BY id") == [
        ("old", "running"), ("new", "completed"), ("newer", "running"),
    ]  # fmt: skip


async def test_an_accepted_task_left_in_the_inbox_by_a_crash_is_recovered_as_failed(
    tmp_path: Path,
) -> None:
    # The process died after the task row was committed (the ACK may have gone out) and
    # before the writer moved it into `tasks`: the next start marks it failed, keeping its id.
    db = tmp_path / "h.db"
    async with opened(db) as store:
        await store.task_accepted(record("done", "n-done"))
        await store.task_ended("done", "completed", None, None, "t", task_name="n-done")
    created = datetime.datetime.now(datetime.UTC).isoformat()
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO inbox (id, session_id, task_name, requester_id, requester_type, "
            "executor_id, platform, agent, request, created_at) "
            "VALUES (7, 'lost', 'n-lost', 'c', 'constellation', 'd', 'linux', 'script', 'r', ?)",
            (created,),
        )
    before = datetime.datetime.now(datetime.UTC).isoformat()
    async with opened(db) as store:
        assert store.recovered == 1
        assert await store.task_result("n-lost") == {
            "status": "failed", "error": CRASH_ERROR, "result": None,
        }  # fmt: skip
        detail = await store.task_detail("lost")
        await store.task_accepted(record("next"))
        await store.flush()
    assert detail is not None
    assert detail["ended_at"] >= before
    assert detail["created_at"] == created
    assert rows(db, "SELECT count(*) FROM inbox") == [(0,)]
    assert rows(db, "SELECT id, session_id, status FROM tasks ORDER BY id") == [
        (1, "done", "completed"), (7, "lost", "failed"), (8, "next", "running"),
    ]  # fmt: skip


async def test_a_version_1_database_is_migrated_and_its_running_tasks_recovered(
    tmp_path: Path,
) -> None:
    from ufo_trio._store_sql import MIGRATIONS

    db = tmp_path / "h.db"
    with sqlite3.connect(db) as conn:
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO tasks (session_id, task_name, requester_id, requester_type, "
            "executor_id, request, status, created_at) "
            "VALUES ('v1', 'n-v1', 'c', 'constellation', 'd', 'r', 'running', 't')"
        )
    async with opened(db) as store:
        assert store.recovered == 1
        await store.task_accepted(record("v2", "n-v2"))
        assert await store.task_result("n-v1") == {
            "status": "failed", "error": CRASH_ERROR, "result": None,
        }  # fmt: skip
    assert rows(db, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert rows(db, "SELECT id, session_id FROM tasks ORDER BY id") == [(1, "v1"), (2, "v2")]


async def test_a_durable_wait_is_released_after_commit_wait_when_the_disk_hangs(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The wait before an ACK is bounded: the server goes on after `commit_wait` seconds
    # (logged), and the row is still written once the disk is back.
    db = tmp_path / "h.db"
    connect = faulty()
    gate = threading.Event()
    try:
        async with opened(db, connect=connect, commit_wait=10.0) as store:
            connect.cls.gate = gate

            async def advance() -> None:
                await trio.to_thread.run_sync(connect.cls.entered.wait)
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(9.0)
                await trio.testing.wait_all_tasks_blocked()
                assert not released
                mock_clock.jump(1.0)
                await trio.testing.wait_all_tasks_blocked()
                if not released:  # not released by the bound: unstick the disk, fail below
                    gate.set()

            released = False
            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                nursery.start_soon(advance)
                await store.task_accepted(record("stuck"))
                released = True
            assert trio.current_time() == start + 10.0
            assert any(
                "accepted for stuck not committed within 10s" in r.getMessage()
                for r in caplog.records
            )
            connect.cls.gate = None
            gate.set()
            await store.flush()
    finally:
        gate.set()
    assert rows(db, "SELECT session_id, status FROM tasks") == [("stuck", "running")]


async def test_history_survives_a_restart_and_unknown_names_are_pending(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(db) as store:
        await store.task_accepted(record("s1", "n"))
        await store.task_ended("s1", "failed", "boom", None, "t", task_name="n")
    async with opened(db) as store:
        assert await store.task_result("n") == {"status": "failed", "error": "boom", "result": None}
        assert await store.task_result("other") == {"status": "pending"}
        assert await store.task_detail("nope") is None
        assert store.recovered == 0


async def test_closing_and_pruning_do_not_wait_out_the_group_commit_linger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A writer gathering a batch (here for a minute) is told at once about a stop or a waited-for
    # prune: the queued rows are committed at shutdown instead of being given up after
    # flush_timeout ("did not finish"), and /prune returns with the pruning done.
    db = tmp_path / "h.db"
    async with opened(db, linger=60.0, flush_timeout=5.0, commit_wait=5.0, max_tasks=1) as store:
        await store.task_accepted(record("s1", "n1"))  # durable: committed at once
        await store.task_ended("s1", "completed", None, {"ok": 1}, "t", task_name="n1")
        store.task_acked("s1", "t0")  # queued while the writer lingers after its commit
        await store.task_accepted(record("s2", "n2"))
        await store.task_ended("s2", "completed", None, {"ok": 2}, "t", task_name="n2")
        await store.prune()  # max_tasks=1: s1 goes, once s2's outcome is committed
        assert await store.task_result("n1") == {"status": "pending"}
    assert not [r for r in caplog.records if "did not finish" in r.getMessage()]
    async with opened(db) as store:
        assert await store.task_result("n2") == {"status": "done", "result": {"ok": 2}}
        assert store.recovered == 0


async def test_task_result_latest_by_name_and_running_is_pending(tmp_path: Path) -> None:
    async with opened(tmp_path / "h.db") as store:
        await store.task_accepted(record("a", "same"))
        await store.task_ended("a", "completed", None, 1, "t", task_name="same")
        assert await store.task_result("same") == {"status": "done", "result": 1}
        await store.task_accepted(record("b", "same"))  # NAME-2: latest wins
        assert await store.task_result("same") == {"status": "pending"}


async def test_memory_database_works_and_leaves_no_files(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    async with opened(":memory:") as store:
        await store.task_accepted(record("m"))
        await store.task_ended("m", "completed", None, "r", "t")
        await store.flush()  # in memory, accepting a task does not wait for the writer
        assert (await store.task_detail("m") or {})["result"] == "r"
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ crash recovery and ownership


async def test_running_tasks_of_an_earlier_run_become_failed(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(db) as store:
        await store.task_accepted(record("r1", "left"))
        await store.task_accepted(record("r2"))
        await store.task_ended("r2", "completed", None, None, "t")
    before = datetime.datetime.now(datetime.UTC).isoformat()
    async with opened(db) as store:
        assert store.recovered == 1
        detail = await store.task_detail("r1")
        assert await store.task_result("left") == {
            "status": "failed", "error": CRASH_ERROR, "result": None,
        }  # fmt: skip
    assert detail is not None
    assert detail["status"] == "failed"
    assert detail["error"] == "server stopped before the task ended"
    assert detail["ended_at"] >= before


CHILD = textwrap.dedent(
    """
    import sys, trio
    from ufo_trio._store import TaskStore, TaskRecord

    async def main():
        store = TaskStore(sys.argv[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await store.task_accepted(TaskRecord(
                session_id="killed", task_name="victim", request="r", requester_id="c",
                requester_type="constellation", executor_id="d", platform="linux", agent="script"))
            print("accepted", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_sigkill_mid_task_then_restart_marks_it_failed_and_second_owner_is_refused(
    tmp_path: Path,
) -> None:
    db = tmp_path / "h.db"
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        out = b""
        with trio.fail_after(60):
            while not out.endswith(b"\n"):
                out += await child.stdout.receive_some(100)
        assert out == b"accepted\n"
        # The first server still runs: a second one is refused, naming the file...
        with pytest.raises(StoreError, match=f"database {db} is in use by another ufo_trio server"):
            async with opened(db):
                pass
        # ...and did not mark the first one's task failed.
        assert rows(db, f"SELECT status FROM {ALL_TASKS} WHERE session_id = 'killed'") == [
            ("running",)
        ]
        child.send_signal(signal.SIGKILL)
        assert await child.wait() == -signal.SIGKILL
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        if child.stdout is not None:
            await child.stdout.aclose()
    async with opened(db) as store:  # the OS dropped the lock with the process
        assert store.recovered == 1
        assert await store.task_result("victim") == {
            "status": "failed", "error": CRASH_ERROR, "result": None,
        }  # fmt: skip


async def test_two_stores_in_one_process_same_file(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(db) as first:
        await first.task_accepted(record("mine"))
        with pytest.raises(StoreError) as info:
            async with opened(db):
                pass
        assert str(info.value) == (
            f"database {db} is in use by another ufo_trio server (lock {db}.lock)"
        )
        assert (await first.task_detail("mine") or {})["status"] == "running"


# ------------------------------------------------------------------ refused at start


async def test_missing_directory_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"^cannot open database .*: directory .* does not exist$"):
        async with opened(tmp_path / "no" / "h.db"):
            pass


async def test_corrupted_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    db.write_bytes(b"this is not an sqlite file at all" * 100)
    with pytest.raises(StoreError, match="unreadable or corrupted"):
        async with opened(db):
            pass
    assert db.read_bytes().startswith(b"this is not")  # left alone


async def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    async with opened(db):
        pass
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99, newer than this ufo_trio"):
        async with opened(db):
            pass


async def test_foreign_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(StoreError, match="is not a ufo_trio database"):
        async with opened(db):
            pass


class FaultyConnection(sqlite3.Connection):
    """A real connection whose writes fail or stall on demand (disk full, slow disk)."""

    fail: bool = False
    fail_reads: bool = False
    fail_message = "database or disk is full"
    delay: float = 0.0
    gate: threading.Event | None = None
    entered = threading.Event()
    writes = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith("BEGIN"):
            cls = type(self)
            if cls.gate is not None:
                cls.entered.set()
                cls.gate.wait()
            if cls.delay:
                threading.Event().wait(cls.delay)  # the disk is slow (writer thread only)
            if cls.fail:
                raise sqlite3.OperationalError(cls.fail_message)
            cls.writes += 1
        if sql.startswith("SELECT") and type(self).fail_reads:
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)


def faulty(**attrs: Any) -> Any:
    cls = type("Faulty", (FaultyConnection,), {"entered": threading.Event(), **attrs})

    def connect(path: str, **kwargs: Any) -> sqlite3.Connection:
        return sqlite3.connect(path, factory=cls, **kwargs)

    connect.cls = cls  # type: ignore[attr-defined]
    return connect


async def test_unwritable_database_at_start_is_one_line(tmp_path: Path) -> None:
    connect = faulty(fail=True, fail_message="attempt to write a readonly database")
    with pytest.raises(StoreError) as info:
        async with opened(tmp_path / "h.db", connect=connect):
            pass
    assert str(info.value) == (
        f"cannot write database {tmp_path / 'h.db'}: attempt to write a readonly database"
    )
    # The lock was released: a healthy start works at once.
    async with opened(tmp_path / "h.db"):
        pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write read-only files")
async def test_read_only_file_at_start(tmp_path: Path) -> None:  # pragma: no cover - non-root
    db = tmp_path / "h.db"
    async with opened(db):
        pass
    db.chmod(0o444)
    with pytest.raises(StoreError, match="cannot"):
        async with opened(db):
            pass


# ------------------------------------------------------------------ faults while running


async def test_disk_full_while_running_keeps_outcomes_and_writes_them_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "h.db"
    connect = faulty()
    now = [1000.0]
    async with opened(db, connect=connect, monotonic=lambda: now[0]) as store:
        await store.task_accepted(record("before"))
        connect.cls.fail = True
        # The durable write returns although it cannot be committed: the server keeps serving.
        with trio.fail_after(5):
            await store.task_accepted(record("during", "dn"))
            await store.task_ended("during", "completed", None, {"v": 1}, "t", task_name="dn")
            await store.task_accepted(record("during2"))  # fails again (same minute)
        errors = [r for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(errors) == 1  # logged once per minute, not per failure
        assert "database or disk is full" in errors[0].getMessage()
        # Answers come from memory meanwhile.
        assert await store.task_result("dn") == {"status": "done", "result": {"v": 1}}
        connect.cls.fail = False
        await store.task_accepted(record("after"))  # the retry writes everything kept
        assert await store.task_result("dn") == {"status": "done", "result": {"v": 1}}
    assert rows(db, "SELECT session_id, status FROM tasks ORDER BY id") == [
        ("before", "running"),
        ("during", "completed"),
        ("during2", "running"),
        ("after", "running"),
    ]
    assert any("writing to" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)


async def test_full_queue_waits_then_keeps_outcomes_and_drops_steps_with_a_log(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "h.db"
    connect = faulty()
    async with opened(db, connect=connect, queue_size=2, full_wait=3.0) as store:
        await store.task_accepted(record("q"))
        connect.cls.gate = threading.Event()  # the disk stalls from the next transaction on
        await store.device_seen(DeviceRecord(client_id="d0", role="device", platform="linux"))
        await trio.to_thread.run_sync(connect.cls.entered.wait)  # the writer is stuck on it
        await store.device_seen(DeviceRecord(client_id="d1", role="device", platform="linux"))
        await store.device_seen(DeviceRecord(client_id="d2", role="device", platform="linux"))
        start = trio.current_time()

        async def advance() -> None:
            for _ in range(2):
                await trio.testing.wait_all_tasks_blocked()
                mock_clock.jump(3.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(advance)
            await store.command_sent("q", 0, [{"tool_name": "x"}], "t")  # queue full: dropped
            assert trio.current_time() == start + 3.0
            await store.task_ended("q", "completed", None, "kept", "t")  # queued anyway
            assert trio.current_time() == start + 6.0
        assert store.dropped_full == 1
        assert any("queue full" in r.getMessage() for r in caplog.records)
        connect.cls.gate.set()
        connect.cls.gate = None
        await store.task_accepted(record("barrier"))
        detail = await store.task_detail("q")
    assert detail is not None
    assert detail["status"] == "completed"
    assert detail["result"] == "kept"
    assert detail["steps"] == []  # the dropped step, and it was logged
    assert [r[0] for r in rows(db, "SELECT client_id FROM devices ORDER BY client_id")] == [
        "d0", "d1", "d2",
    ]  # fmt: skip


async def test_a_slow_disk_never_blocks_the_event_loop(tmp_path: Path) -> None:
    connect = faulty(delay=0.2)  # 200 ms per transaction
    async with opened(tmp_path / "h.db", connect=connect) as store:
        ticks = 0
        done = trio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            before = connect.cls.writes
            # Fire-and-forget writes return without waiting for the disk at all...
            for i in range(50):
                await store.command_sent("none", i, [], "t")
            assert connect.cls.writes == before
            # ...and while a durable write waits for its commit, the loop keeps running.
            await store.task_accepted(record("slow"))
            done.set()
        assert ticks > 100


async def test_cancelling_the_owner_flushes_what_was_queued(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    store = TaskStore(str(db))
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.task_accepted(record("s"))
        for i in range(100):
            await store.command_sent("s", i, [{"tool_name": f"t{i}"}], "t")
        await store.task_ended("s", "completed", None, "r", "t")
        nursery.cancel_scope.cancel()  # like the server nursery at the end of shutdown
    assert rows(db, "SELECT status, commands, last_tool FROM tasks") == [("completed", 100, "t99")]
    assert rows(db, "SELECT count(*) FROM steps") == [(100,)]
    async with opened(db):  # the lock was released
        pass


async def test_shutdown_flush_is_bounded_when_the_disk_hangs(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    connect = faulty()
    store = TaskStore(str(tmp_path / "h.db"), connect=connect, flush_timeout=5.0)
    gate = threading.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            connect.cls.gate = gate
            await store.device_seen(DeviceRecord(client_id="d", role="device", platform="x"))
            await trio.to_thread.run_sync(connect.cls.entered.wait)
            start = trio.current_time()
            store.close()
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(5.0)
        assert trio.current_time() == start + 5.0
        assert any("did not finish within 5s" in r.getMessage() for r in caplog.records)
        # The stuck writer still owns the file: nobody else may take it yet.
        with pytest.raises(StoreError, match="in use"):
            async with opened(tmp_path / "h.db"):
                pass
    finally:
        gate.set()  # let the stuck thread go: it then closes its connection and the lock
    await trio.to_thread.run_sync(partial(_wait_unlocked, tmp_path / "h.db.lock"))
    async with opened(tmp_path / "h.db"):
        pass


def _wait_unlocked(lock_path: Path) -> None:
    import fcntl

    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks (in a worker thread) until the writer let go


async def test_a_failing_read_is_store_unavailable(tmp_path: Path) -> None:
    connect = faulty()
    async with opened(tmp_path / "h.db", connect=connect) as store:
        await store.task_accepted(record("s", "n"))
        connect.cls.fail_reads = True
        for call in (
            partial(store.task_result, "n"),
            partial(store.task_detail, "s"),
            store.devices,
        ):
            with pytest.raises(StoreUnavailable, match=r"^Task history is not available$"):
                await call()
        connect.cls.fail_reads = False
        assert await store.task_result("n") == {"status": "pending"}  # and it recovers
    with pytest.raises(StoreUnavailable):
        await store.list_tasks(TaskQuery())  # closed


async def test_one_bad_record_is_skipped_and_logged_never_stopping_the_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(tmp_path / "h.db") as store:
        await store.task_accepted(record("bad", request=None))  # type: ignore[arg-type]
        await store.command_sent("nobody", 0, [object()], "t")  # no such task: nothing to do
        await store.task_accepted(record("good"))
        await store.command_sent("good", 0, [object()], "t")  # not a Command
        await store.task_ended("good", "completed", None, "ok", "t")
        await store.flush()
        assert await store.task_detail("bad") is None
        detail = await store.task_detail("good")
        assert store.skipped == 2
    assert detail is not None
    assert (detail["status"], detail["result"], detail["steps"]) == ("completed", "ok", [])
    skips = [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()]
    assert len(skips) == 1  # once a minute
    assert skips[0].startswith("task store: accepted for bad not stored (AttributeError")


# ------------------------------------------------------------------ queries


async def test_pagination_is_stable_under_inserts_and_cursors_are_tamper_evident(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path / "h.db") as store:
        for i in range(120):
            await store.task_accepted(
                record(f"s{i:03}", created_at=f"2026-01-01T00:{i // 60:02}:{i % 60:02}+00:00")
            )
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            page = await store.list_tasks(TaskQuery(limit=50, cursor=cursor))
            seen += [t["session_id"] for t in page["tasks"]]
            pages += 1
            # New tasks arrive between pages: they are newer, so they never shift a page.
            await store.task_accepted(record(f"new{pages}", created_at="2026-02-01T00:00:00+00:00"))
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3
        assert seen == [f"s{i:03}" for i in reversed(range(120))]
        first = await store.list_tasks(TaskQuery(limit=2))
        good = first["next_cursor"]
        assert isinstance(good, str)
        for bad in (
            good[:-1] + ("A" if good[-1] != "A" else "B"),
            "x",
            "",
            "%%%",
            good + "AAAA",
            "A" * 600,
        ):
            with pytest.raises(BadCursor, match=r"^Invalid cursor$"):
                await store.list_tasks(
                    parse_task_query({"cursor": bad}) if bad else TaskQuery(cursor="!")
                )
        # A cursor from another database (another key) is refused too.
    async with opened(":memory:") as other:
        with pytest.raises(BadCursor):
            await other.list_tasks(TaskQuery(cursor=good))


async def test_filters_and_injection_shaped_values(tmp_path: Path) -> None:
    async with opened(tmp_path / "h.db") as store:
        await store.task_accepted(
            record("a", executor_id="dev-a", requester_id="c1", created_at=ago(2))
        )
        await store.task_accepted(
            record("b", executor_id="dev-b", requester_id="c2", created_at=ago(1))
        )
        await store.task_ended("b", "failed", "x", None, "t")
        await store.task_accepted(record("barrier", created_at=ago(3)))

        async def ids(**params: str) -> list[str]:
            page = await store.list_tasks(parse_task_query(params))
            return [t["session_id"] for t in page["tasks"]]

        assert await ids() == ["b", "a", "barrier"]
        assert await ids(status="failed") == ["b"]
        assert await ids(status="running") == ["a", "barrier"]
        assert await ids(target="dev-a") == ["a"]
        assert await ids(requester="c2") == ["b"]
        assert await ids(since=ago(1.5)) == ["b"]
        since_naive = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1.5)).replace(
            tzinfo=None
        )
        assert await ids(since=since_naive.isoformat()) == ["b"]  # naive means UTC
        for evil in ("x' OR '1'='1", "dev-a'; DROP TABLE tasks; --", '" OR 1=1 --', "%", "_"):
            assert await ids(target=evil) == []
            assert await ids(requester=evil) == []
        assert await ids() == ["b", "a", "barrier"]  # nothing dropped


@pytest.mark.parametrize(
    ("params", "parameter", "message"),
    [
        ({"status": "done"}, "status", "Invalid status: must be one of running, completed, failed"),
        (
            {"status": "running' OR 1=1"},
            "status",
            "Invalid status: must be one of running, completed, failed",
        ),
        ({"limit": "0"}, "limit", "Invalid limit: must be an integer from 1 to 500"),
        ({"limit": "501"}, "limit", "Invalid limit: must be an integer from 1 to 500"),
        ({"limit": "1e2"}, "limit", "Invalid limit: must be an integer from 1 to 500"),
        ({"limit": "٣"}, "limit", "Invalid limit: must be an integer from 1 to 500"),
        ({"since": "yesterday"}, "since", "Invalid since: must be an ISO 8601 timestamp"),
    ],
)
def test_bad_query_parameters_name_the_parameter(
    params: dict[str, str], parameter: str, message: str
) -> None:
    with pytest.raises(BadQuery) as info:
        parse_task_query(params)
    assert info.value.parameter == parameter
    assert str(info.value) == message


def test_query_defaults_and_limit_cap() -> None:
    assert parse_task_query({}) == TaskQuery(limit=50)
    assert parse_task_query({"limit": "500", "status": "completed"}) == TaskQuery(
        limit=500, status="completed"
    )


async def test_huge_names_requests_and_results(tmp_path: Path) -> None:
    mib = 1024 * 1024
    name = "n" * mib
    request = "é" * mib  # 2 MiB of UTF-8
    async with opened(tmp_path / "h.db", max_result_bytes=1000) as store:
        await store.task_accepted(record("big", name, request=request))
        await store.task_ended("big", "completed", None, {"blob": "x" * 5000}, "t", task_name=name)
        await store.task_accepted(record("small", "s"))
        await store.task_ended("small", "completed", None, [1, 2], "t", task_name="s")
        await store.task_accepted(record("odd", "o"))
        await store.task_ended("odd", "completed", None, float("nan"), "t", task_name="o")
        await store.task_accepted(record("barrier"))
        detail = await store.task_detail("big")
        by_name = await store.task_result(name)
        small = await store.task_result("s")
        odd = await store.task_result("o")
    assert detail is not None
    assert detail["task_name"] == name
    cut = detail["request"]
    assert cut.startswith("é" * (MAX_REQUEST_BYTES // 2))
    assert cut.endswith(f"[ufo_trio: request cut at 65536 bytes of {2 * mib}]")
    assert len(cut.encode()) < MAX_REQUEST_BYTES + 100
    marker = detail["result"]
    assert marker["truncated"] is True
    assert marker["bytes"] == len(json.dumps({"blob": "x" * 5000}, separators=(",", ":")))
    assert marker["limit"] == 1000
    assert by_name == {"status": "done", "result": marker}
    assert small == {"status": "done", "result": [1, 2]}
    assert odd["result"] == {"truncated": True, "reason": "not JSON-serialisable"}


# ------------------------------------------------------------------ retention


async def test_retention_prunes_old_and_excess_ended_tasks_never_running_ones(
    tmp_path: Path,
) -> None:
    db = tmp_path / "h.db"
    async with opened(db, retention_days=30, max_tasks=5) as store:
        for i in range(3):
            await store.task_accepted(record(f"old{i}", created_at=ago(40 + i)))
            await store.command_sent(f"old{i}", 0, [{"tool_name": "t"}], "t")
            await store.task_ended(f"old{i}", "completed", None, None, "t")
        await store.task_accepted(record("old-running", created_at=ago(50)))
        for i in range(6):
            await store.task_accepted(record(f"new{i}", created_at=ago(1 - i / 10)))
            await store.task_ended(f"new{i}", "completed", None, None, "t")
        await store.task_accepted(record("barrier", created_at=ago(0)))
        await store.prune()
        page = await store.list_tasks(TaskQuery())
    # 3 too old; then 8 left for a cap of 5: the 3 oldest ended ones go; running ones stay.
    assert [t["session_id"] for t in page["tasks"]] == [
        "barrier", "new5", "new4", "new3", "old-running",
    ]  # fmt: skip
    assert rows(db, "SELECT count(*) FROM steps") == [(0,)]


# ------------------------------------------------------------------ devices


async def test_devices_merge_live_data_online_first(tmp_path: Path) -> None:
    live = [
        OnlineClient(client_id="d2", role="device", platform="linux", connected_at="c2",
                     last_heartbeat="h2", sessions_running=1),
        OnlineClient(client_id="const", role="constellation", platform=None, connected_at="c3",
                     last_heartbeat=None, sessions_running=0, target_id="d2"),
    ]  # fmt: skip
    online: list[OnlineClient] = []
    async with opened(tmp_path / "h.db", online=lambda: online) as store:
        await store.device_seen(DeviceRecord(client_id="d1", role="device", platform="windows",
                                             system_info={"hostname": "box1"}, at="2026-01-01T00:00:00+00:00"))  # fmt: skip
        await store.device_seen(
            DeviceRecord(
                client_id="d2", role="device", platform="linux", at="2026-01-02T00:00:00+00:00"
            )
        )
        await store.device_gone("d1", "peer closed (1000)", "2026-01-03T00:00:00+00:00")
        await store.device_gone("d0", "never seen", "t")  # harmless
        # Everything queued is committed. (A task row before its ACK commits on its own,
        # ahead of the sightings, so `task_accepted` is no barrier for them.)
        await store.flush()
        online[:] = live
        listing = await store.devices()
    devices = listing["devices"]
    assert [d["client_id"] for d in devices[:2]] == ["d2", "const"] or [
        d["client_id"] for d in devices[:2]
    ] == ["const", "d2"]
    d2 = next(d for d in devices if d["client_id"] == "d2")
    const = next(d for d in devices if d["client_id"] == "const")
    assert devices[2] == {
        "client_id": "d1", "role": "device", "platform": "windows", "hostname": "box1",
        "online": False, "connected_at": None, "last_heartbeat": None, "sessions_running": 0,
        "target_id": None, "first_seen": "2026-01-01T00:00:00+00:00",
        "last_seen": "2026-01-03T00:00:00+00:00", "last_disconnect_reason": "peer closed (1000)",
    }  # fmt: skip
    assert d2["online"] is True
    assert d2["sessions_running"] == 1
    assert d2["last_heartbeat"] == "h2"
    assert d2["first_seen"] == "2026-01-02T00:00:00+00:00"
    assert const["target_id"] == "d2"
    assert const["online"] is True
    assert len(devices) == 3


async def test_store_from_server_config(tmp_path: Path) -> None:
    config = ServerConfig(
        db=str(tmp_path / "c.db"), db_retention_days=0, db_max_tasks=0, db_max_result_bytes=10,
        shutdown_grace=2.5,
    )  # fmt: skip
    store = TaskStore.from_config(config)
    assert (store.path, store.retention_days, store.max_tasks) == (config.db, 0, 0)
    assert (store.max_result_bytes, store.flush_timeout) == (10, 2.5)
    assert ServerConfig().db == ":memory:"
    with pytest.raises(ConfigError, match="db-max-tasks must be >= 0"):
        ServerConfig(db_max_tasks=-1)
    with pytest.raises(ConfigError, match="db must be a file path or :memory:"):
        ServerConfig(db=" ")


async def test_no_limits_keeps_everything(tmp_path: Path) -> None:
    async with opened(tmp_path / "h.db", retention_days=0, max_tasks=0) as store:
        await store.task_accepted(record("ancient", created_at=ago(4000)))
        await store.task_ended("ancient", "completed", None, None, "t")
        await store.prune()
        assert (await store.task_detail("ancient") or {})["status"] == "completed"


def test_logger_name() -> None:
    assert logging.getLogger("ufo_trio.store").parent is logging.getLogger("ufo_trio")


class _SlowReads(sqlite3.Connection):
    """A read connection whose next read, once armed, takes 0.5 s (a busy disk, a big page)."""

    armed = threading.Event()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith(("SAVEPOINT", "SELECT")) and self.armed.is_set():
            self.armed.clear()
            threading.Event().wait(0.5)  # a real thread's wait: the reader is a worker thread
        return super().execute(sql, *args)


async def test_a_session_id_reused_by_the_next_task_never_shows_the_old_outcome(
    tmp_path: Path,
) -> None:
    """SESS-1 lets a requester reuse an ended session's id for its next task. While a read is
    in flight the store keeps the old task's outcome in memory (the overlay); the new task,
    still running, must not be reported with it: /api/task_result of the new name is
    pending and /api/tasks/{id} shows the new task running."""
    connect = partial(sqlite3.connect, factory=_SlowReads)
    first = record("S", "task-a")
    async with opened(tmp_path / "reuse.db", connect=connect) as store:
        await store.task_accepted(first)
        store.task_acked("S", first.created_at)
        await store.flush()
        async with trio.open_nursery() as nursery:
            _SlowReads.armed.set()
            nursery.start_soon(store.task_detail, "S")  # a read in flight across the commit
            await trio.sleep(0.05)
            await store.task_ended(
                "S", "completed", None, {"old": 1}, first.created_at,
                task_name="task-a", created_at=first.created_at,
            )  # fmt: skip
            second = record("S", "task-b", created_at=ago(-1 / 86400))  # a second later
            await store.task_accepted(second)  # committed with the first task's outcome
            assert await store.task_result("task-b") == {"status": "pending"}
            detail = await store.task_detail("S")
            assert detail is not None
            assert (detail["task_name"], detail["status"], detail["result"]) == (
                "task-b", "running", None,
            )  # fmt: skip
            listing = await store.list_tasks(TaskQuery())
            assert [(t["task_name"], t["status"]) for t in listing["tasks"]] == [
                ("task-b", "running"),
                ("task-a", "completed"),
            ]
            assert await store.task_result("task-a") == {"status": "done", "result": {"old": 1}}


async def test_a_read_that_finishes_after_the_store_closed_closes_its_connection(
    tmp_path: Path,
) -> None:
    """A read given up at shutdown may finish after the store closed its connections: it must
    close its own instead of putting it back into a pool nobody closes (one fd per such read)."""
    used: list[sqlite3.Connection] = []

    def read(conn: sqlite3.Connection) -> int:
        used.append(conn)
        return int(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])

    async with opened(tmp_path / "late.db") as store:
        await store.task_accepted(record("s-1"))
    # The store has stopped; a late read still runs to its end.
    assert await trio.to_thread.run_sync(store._in_read_connection, read, ()) == 1
    with pytest.raises(sqlite3.ProgrammingError):
        used[0].execute("SELECT 1")  # closed
    assert store._read_pool == []


async def test_a_store_that_cannot_start_leaves_no_writer_and_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of file descriptors at start (the writer's wake-up socket pair): the start fails,
    no writer thread is left running and the file's lock is released, so the next start on
    the same file works."""
    import ufo_trio._store as store_module

    def no_fds() -> tuple[socket.socket, socket.socket]:
        raise OSError(24, "Too many open files")

    path = tmp_path / "fds.db"
    with monkeypatch.context() as patch:
        patch.setattr(store_module.socket, "socketpair", no_fds)
        with pytest.RaisesGroup(OSError, flatten_subgroups=True):
            async with opened(path):
                pass  # pragma: no cover
    assert not [t for t in threading.enumerate() if t.name.startswith("ufo_trio store writer")]
    async with opened(path) as store:  # the lock was released
        await store.task_accepted(record("s-2"))
