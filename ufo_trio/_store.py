"""Durable task history in SQLite (issue 11): tasks, their step transcripts, devices seen.

Shape (Datasette's, under a Trio owner): ONE writer thread owns the only write connection and
takes work from a bounded queue, many operations per transaction; HTTP reads run in Trio worker
threads with their own read-only connections, at most `read_threads` at a time. The event loop
never waits on the disk except through a cancellable await.

Interface the server calls (all on the Trio thread; times are WIRE-7 wall-clock strings)::

    store = TaskStore.from_config(config, online=lambda: [...OnlineClient...])
    await server_nursery.start(store.run)          # opens, locks, migrates, recovers; StoreError
    await store.task_accepted(TaskRecord(...))     # durable: returns once committed (before ACK)
    store.task_acked(session_id, at)               # the rest only enqueue (no wait for the disk)
    await store.command_sent(session_id, index, commands, at)
    await store.results_received(session_id, index, results_or_None_on_timeout, at)
    await store.model_turn(session_id, index, turn)   # optional; the caller redacts secrets
    await store.task_ended(session_id, status, error, result, at, task_name=name)  # never dropped
    await store.device_seen(DeviceRecord(...))
    await store.device_gone(client_id, reason, at)
    await store.flush()                            # wait until everything queued is committed
    await store.prune()                            # apply retention now
    store.close()                                  # after the sessions ended: flush and stop

    parse_task_query(params) -> TaskQuery          # BadQuery / BadCursor → HTTP 400
    await store.list_tasks(query)                  # GET /api/tasks
    await store.task_detail(session_id)            # GET /api/tasks/{session_id}; None → 404
    await store.devices()                          # GET /api/devices
    await store.task_result(name)                  # GET /api/task_result/{name} (RES-1, HTTP-4)
                                                   # reads raise StoreUnavailable → HTTP 503

Policies:

* **Ownership.** `<db>.lock` is held with `fcntl.flock` for the store's lifetime, taken before
  anything is read or written; the OS drops it when the process dies, even on SIGKILL. A second
  store on the same file fails with `StoreError` naming the file and never touches its rows.
* **The inbox.** A task row somebody waits for (before its ACK) commits on its own into
  `inbox`, a table without secondary indexes; the writer's next batch moves it into `tasks`
  first (same id). Reads merge both tables in one read transaction.
* **Crash recovery** at open: every `running` task, and every row left in the inbox, becomes
  `failed` with error `server stopped before the task ended`, `ended_at` = this start; devices
  marked connected get the disconnect reason `server stopped`.
* **Queue full** (`queue_size` operations): a writer waits up to `full_wait` seconds for room.
  After that a task row (accepted / acked / ended) is queued anyway — an outcome is never
  dropped; a transcript step, model turn or device sighting is dropped, counted and logged
  (at most once a minute).
* **Disk errors while running** (`sqlite3.OperationalError`/`DatabaseError`, e.g. disk full):
  the batch is rolled back and kept in memory, retried every `retry_interval` seconds, logged at
  most once a minute; durable waiters are released at once (the server keeps serving), and the
  query functions overlay the kept outcomes so `task_result` and the task list stay right. Above
  `retry_cap` kept operations, transcript steps are dropped first (counted), task rows never.
* **Shutdown**: `close()` (or cancellation of `run`) queues a stop after everything queued; `run`
  waits for the writer to commit it, shielded and bounded by `flush_timeout`.
* **Retention**: the writer prunes ended tasks older than `retention_days` and the oldest beyond
  `max_tasks`, 500 per transaction, between batches of writes; at start, every
  `prune_interval` seconds and every 1000 new tasks. Never VACUUM.
* **Reads** fail with `StoreUnavailable` (HTTP 503) when SQLite fails or the store is closed.
* **Sizes**: requests are cut to 64 KiB, results to `max_result_bytes` (JSON text), each with an
  explicit marker (`REQUEST_CUT_MARKER`, `{"truncated": true, ...}`).

The schema, the record types and the SQL of the reads live in `_store_sql` (pure functions).

`:memory:` works (the embedding/test default): no lock file, one connection shared by the writer
and the readers under a lock.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import socket
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._errors import UfoTrioError
from ._store_sql import (
    INSERT_INBOX,
    MIGRATIONS,
    MOVE_INBOX,
    RECOVER_INBOX,
    cut_request,
    device_entry,
    dump_commands,
    dump_results,
    encode_result,
    from_json,
    last_tool,
    select_by_name,
    select_detail,
    select_devices,
    select_tasks,
    summary,
    to_json,
    wall_now,
)
from ._store_sql import MAX_REQUEST_BYTES as MAX_REQUEST_BYTES
from ._store_sql import BadCursor as BadCursor
from ._store_sql import BadQuery as BadQuery
from ._store_sql import DeviceRecord as DeviceRecord
from ._store_sql import OnlineClient as OnlineClient
from ._store_sql import TaskQuery as TaskQuery
from ._store_sql import TaskRecord as TaskRecord
from ._store_sql import parse_task_query as parse_task_query

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from ._config import ServerConfig

log = logging.getLogger("ufo_trio.store")

CRASH_ERROR: Final = "server stopped before the task ended"
DEVICE_CRASH_REASON: Final = "server stopped"
#: Operations applied per transaction at most.
MAX_BATCH: Final = 512
#: Tasks deleted per pruning transaction.
PRUNE_BATCH: Final = 500
#: Disk problems are logged at most this often (seconds).
ERROR_LOG_INTERVAL: Final = 60.0

_TASK_OPS: Final = frozenset({"accepted", "acked", "ended"})


# --------------------------------------------------------------------------------- errors


class StoreError(UfoTrioError):
    """The database cannot be used (start-up): one line naming the file. The CLI exits 1."""


class StoreUnavailable(UfoTrioError):
    """A read failed (the database is not open, or SQLite failed); the HTTP answer is 503."""


@attrs.define(eq=False)
class _Ended:
    """An outcome queued (or kept in memory after a disk error) but not yet committed."""

    session_id: str
    task_name: str | None
    status: str
    error: str | None
    result: Any
    ended_at: str
    #: The task's `created_at`: a later task may reuse its session id (SESS-1) or its name, and
    #: the overlay must not lend this outcome to that task's row.
    created_at: str | None = None


class _Wake:
    """A wake-up for the writer thread: `set` from any thread, `wait` (which also clears it)
    from the writer only. A lock used as a binary semaphore: both sides are single C calls
    (a `threading.Event` is a Python-level `Condition`, whose lock the woken writer first has
    to take back from the thread that woke it)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()  # held = not set

    def set(self) -> None:
        if self._lock.locked():
            try:
                self._lock.release()
            except RuntimeError:  # set by another thread meanwhile
                pass

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for `set`; clear it. True if it was set."""
        return self._lock.acquire(timeout=timeout)


class _Pending:
    """A batch's folded updates (writer thread): per task id `[acked_at or None, COMMANDs
    sent, last_tool set?, last_tool, (status, error, result, ended_at) or None]`; per
    (task id, step) `[insert?, sent_at, commands, results, received_at, timed_out]`."""

    __slots__ = ("steps", "tasks")

    def __init__(self) -> None:
        self.tasks: dict[int, list[Any]] = {}
        self.steps: dict[tuple[int, int], list[Any]] = {}

    def task(self, task_id: int) -> list[Any]:
        update = self.tasks.get(task_id)
        if update is None:
            update = self.tasks[task_id] = [None, 0, False, None, None]
        return update


# --------------------------------------------------------------------------------- the store


class TaskStore:
    """The task-history subsystem; construct once, start `run` in the server nursery."""

    def __init__(
        self,
        path: str = ":memory:",
        *,
        retention_days: float = 30.0,
        max_tasks: int = 100_000,
        max_result_bytes: int = 1024 * 1024,
        online: Callable[[], Iterable[OnlineClient]] | None = None,
        queue_size: int = 4096,
        full_wait: float = 1.0,
        commit_wait: float = 10.0,
        flush_timeout: float = 5.0,
        retry_interval: float = 5.0,
        retry_cap: int = 10_000,
        prune_interval: float = 3600.0,
        read_threads: int = 4,
        connect: Callable[..., sqlite3.Connection] = sqlite3.connect,
        monotonic: Callable[[], float] = time.monotonic,
        secrets: Sequence[str] = (),
        linger: float = 0.02,
    ) -> None:
        """`connect` and `monotonic` exist for fault-injection tests: the writer thread cannot
        read Trio's clock, so its once-a-minute log throttle takes this callable instead."""
        self.path = path
        self.retention_days = retention_days
        self.max_tasks = max_tasks
        self.max_result_bytes = max_result_bytes
        self._online = online or (lambda: ())
        self._queue_size = queue_size
        self._full_wait = full_wait
        self._commit_wait = commit_wait
        self.flush_timeout = flush_timeout
        self._retry_interval = retry_interval
        self._retry_cap = retry_cap
        self._prune_interval = prune_interval
        self._connect = connect
        self._monotonic = monotonic
        self._memory = path == ":memory:"
        #: Seconds the writer waits after a first operation that nobody waits for, to batch
        #: more; `_hurry` (set by a durable put) ends the wait at once.
        self._linger = linger
        self._hurry = _Wake()
        # Secret values (llm key, tool secrets) and their JSON-escaped forms, masked in every
        # text the writer stores (a device may echo a secret filled into its parameters).
        self._secrets = sorted(
            {f for v in secrets if v for f in (v, json.dumps(v)[1:-1])}, key=len, reverse=True
        )
        # Physically unbounded: the bound is enforced by `_put`, which may exceed it for outcomes.
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._room = trio.Event()
        self._read_limiter = trio.CapacityLimiter(read_threads)
        self._read_pool: list[sqlite3.Connection] = []
        #: Set once the connections are closed: a read that finishes later closes its own.
        self._pool_closed = False
        self._pool_lock = threading.Lock()
        # Writer → Trio notifications (`_tell_trio`, `_dispatch`).
        self._tell_lock = threading.Lock()
        self._telling = False
        self._told: collections.deque[tuple[list[trio.Event], list[_Ended], bool]] = (
            collections.deque()
        )
        self._tell_receive: socket.socket  # a socket pair made by `run`
        self._tell_send: socket.socket
        # `:memory:` only: the writer and the readers share one connection.
        self._mem_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._cursor_key = b""
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = False
        self._closing = False
        self._stopped = trio.Event()
        #: Set by the writer thread as it exits (what `run` waits for at shutdown).
        self._writer_exited = threading.Event()
        self._flush_within: float | None = None
        # Who closes the connections and drops the lock: `run`, or a writer `run` gave up on.
        self._handoff = threading.Lock()
        self._writer_done = False
        self._abandoned = False
        self._stop_requested = trio.Event()
        #: Wakes the owner task (`run`): a stop, or a first durable waiter to time.
        self._wake_owner = trio.Event()
        #: Durable waits in order: (Trio deadline, event set when committed, what for the log).
        self._waiters: collections.deque[tuple[float, trio.Event, str]] = collections.deque()
        self._watching = False
        #: `run` sleeps until the deadline of a durable wait (a released one, perhaps).
        self._timing = False
        self._pending_ends: dict[str, _Ended] = {}
        self._pending_names: dict[str, _Ended] = {}
        self._committed: list[_Ended] = []
        self._reads_in_flight = 0
        # Writer-thread state (touched only by the writer thread after start).
        self._rowids: dict[str, int] = {}
        #: The id of the last task row (the writer numbers them: an inbox row keeps its id).
        self._last_id = 0
        #: Rows committed to the inbox and not yet moved into `tasks`.
        self._inbox_rows = 0
        self._retry: list[tuple[Any, ...]] = []
        self._dropped = 0
        self._last_error_log: float | None = None
        self._last_skip_log: float | None = None
        self.skipped = 0
        self._failing = False
        self._prune_more = False
        self._prune_waiters: list[trio.Event] = []
        self._inserted_since_prune = 0
        # Trio-side counters (for logs and tests).
        self.dropped_full = 0
        self._last_full_log: float | None = None
        self.recovered = 0

    @classmethod
    def from_config(
        cls,
        config: ServerConfig,
        *,
        online: Callable[[], Iterable[OnlineClient]] | None = None,
        secrets: Sequence[str] = (),
    ) -> TaskStore:
        """The store a server with `config` uses; shutdown flushes within `shutdown_grace`;
        `secrets` are masked (`***`) wherever they would be stored."""
        return cls(
            config.db,
            retention_days=config.db_retention_days,
            max_tasks=config.db_max_tasks,
            max_result_bytes=config.db_max_result_bytes,
            flush_timeout=config.shutdown_grace,
            online=online,
            secrets=secrets,
        )

    # ------------------------------------------------------------------------- lifecycle

    async def run(
        self, *, task_status: trio.TaskStatus[TaskStore] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The owner task: open (raising `StoreError`), run the writer thread, flush on exit."""
        if self._started:
            raise RuntimeError("TaskStore.run may be called once")
        self._started = True
        self._token = trio.lowlevel.current_trio_token()
        try:
            await trio.to_thread.run_sync(self._open)
        except trio.Cancelled:  # cancelled while opening: the open itself ran to its end
            self._close_connections()
            self._release_lock()
            raise
        try:  # before the writer starts: nothing to stop if this fails (e.g. out of fds)
            self._tell_receive, self._tell_send = socket.socketpair()
        except OSError:
            self._close_connections()
            self._release_lock()
            raise
        thread = threading.Thread(
            target=self._writer_main, name=f"ufo_trio store writer ({self.path})", daemon=True
        )
        thread.start()
        self._queue.put(("prune",))
        try:
            self._tell_receive.setblocking(False)
            self._tell_send.setblocking(False)
            async with trio.open_nursery() as nursery:
                self._telling = True
                nursery.start_soon(self._dispatch)
                try:
                    await self._own(task_status)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with self._tell_lock:
                self._telling = False
            self._tell_receive.close()
            self._tell_send.close()

    async def _own(self, task_status: trio.TaskStatus[TaskStore]) -> None:
        """The owner's life after the open (see `run`): timers, then the flush at the end."""
        try:
            task_status.started(self)
            self._watching = True
            next_prune = trio.current_time() + self._prune_interval
            while not self._stop_requested.is_set():
                now = trio.current_time()
                if now >= next_prune:
                    self._queue.put(("prune",))
                    next_prune = now + self._prune_interval
                wake_at = next_prune
                # The `commit_wait` bound of the durable waits (one timer here, not a cancel
                # scope per wait): the oldest waiter not yet released, if any.
                # (It times the oldest; later waits have later deadlines.)
                self._timing = self._expire_waiters(now)
                if self._timing:
                    wake_at = min(wake_at, self._waiters[0][0])
                self._wake_owner = trio.Event()
                with trio.move_on_at(wake_at):
                    await self._wake_owner.wait()
        finally:
            self._watching = False
            self._closing = True
            self._queue.put(("stop",))
            self._hurry.set()  # the writer may be lingering for a batch: stop now
            within = self.flush_timeout if self._flush_within is None else self._flush_within
            with trio.CancelScope(shield=True):
                # Waited for in a worker thread with a real-time bound rather than under a Trio
                # deadline: the writer is a real thread, and an autojumping MockClock would
                # otherwise jump to the deadline before the writer could commit.
                await trio.to_thread.run_sync(self._writer_exited.wait, max(within, 0.0))
            for _, event, _ in self._waiters:  # nobody waits past the end of the store
                event.set()
            self._waiters.clear()
            with self._handoff:
                if self._writer_done:
                    self._close_connections()
                    self._release_lock()
                else:  # still stuck on the disk: it closes and unlocks itself if it returns
                    self._abandoned = True
                    log.error(
                        "task store: the writer did not finish within %gs; "
                        "unwritten operations lost",
                        self.flush_timeout,
                    )

    def close(self, within: float | None = None) -> None:
        """Ask `run` to flush everything queued and return (call after the sessions ended);
        `within` seconds at most (default `flush_timeout`), e.g. what is left of the grace."""
        if within is not None:
            self._flush_within = within
        self._stop_requested.set()
        self._wake_owner.set()

    def _expire_waiters(self, now: float) -> bool:
        """Forget released durable waiters and release those past `commit_wait` (logged);
        True if some are left (the oldest first)."""
        waiters = self._waiters
        while waiters:
            deadline, event, subject = waiters[0]
            if not event.is_set():
                if deadline > now:
                    return True
                event.set()
                log.warning(
                    "task store: %s not committed within %gs; continuing",
                    subject,
                    self._commit_wait,
                )
            waiters.popleft()
        return False

    async def aclose(self) -> None:
        """`close()` and wait until the writer has stopped (bounded by `flush_timeout`)."""
        self.close()
        with trio.move_on_after(self.flush_timeout):
            await self._stopped.wait()

    # ------------------------------------------------------------------------- opening

    def _open(self) -> None:
        """Lock, connect, check the version, migrate, recover. Runs in a worker thread."""
        path = self.path
        if self._memory:
            self._writer = self._connect(":memory:", isolation_level=None, check_same_thread=False)
        else:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise StoreError(
                    f"cannot open database {path}: directory {directory} does not exist"
                )
            self._take_lock()
            try:
                self._writer = self._connect(path, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                self._release_lock()
                raise StoreError(f"cannot open database {path}: {exc}") from None
        try:
            self._prepare(self._writer)
        except BaseException:
            self._close_connections()
            self._release_lock()
            raise

    def _take_lock(self) -> None:
        import fcntl  # POSIX; imported here so that `:memory:` works everywhere

        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"cannot open database {self.path}: lock file {lock_path}: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"database {self.path} is in use by another ufo_trio server (lock {lock_path})"
            ) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _prepare(self, conn: sqlite3.Connection) -> None:
        path = self.path
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"database {path} is unreadable or corrupted: {exc}") from None
        if version > len(MIGRATIONS):
            raise StoreError(
                f"database {path} has schema version {version}, newer than this ufo_trio "
                f"understands ({len(MIGRATIONS)}); use a newer ufo_trio or another --db"
            )
        if version == 0 and tables:
            raise StoreError(f"database {path} is not a ufo_trio database (it has other tables)")
        try:
            if not self._memory:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"database {path}: cannot switch to WAL mode (got {mode})")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for step in range(version, len(MIGRATIONS)):
                    for statement in MIGRATIONS[step]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {step + 1}")  # an int we control
                row = conn.execute("SELECT value FROM meta WHERE key = 'cursor_key'").fetchone()
                if row is None:
                    key = secrets.token_hex(32)
                    conn.execute("INSERT INTO meta (key, value) VALUES ('cursor_key', ?)", (key,))
                else:
                    key = row[0]
                now = wall_now()
                self.recovered = conn.execute(
                    "UPDATE tasks SET status = 'failed', error = ?, ended_at = ? "
                    "WHERE status = 'running'",
                    (CRASH_ERROR, now),
                ).rowcount
                # Accepted (committed before their ACK) but not yet moved into `tasks`.
                self.recovered += conn.execute(RECOVER_INBOX, (CRASH_ERROR, now)).rowcount
                conn.execute("DELETE FROM inbox")
                self._last_id = conn.execute("SELECT coalesce(max(id), 0) FROM tasks").fetchone()[0]
                conn.execute(
                    "UPDATE devices SET connected = 0, last_disconnect_reason = ? "
                    "WHERE connected = 1",
                    (DEVICE_CRASH_REASON,),
                )
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except StoreError:
            raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot write database {path}: {exc}") from None
        self._cursor_key = bytes.fromhex(key)
        if self._memory:
            log.info("task store: in memory (history is lost when the server stops)")
        else:
            log.info("task store: database %s (schema version %d)", path, len(MIGRATIONS))
        if self.recovered:
            log.warning(
                "task store: %d task(s) were running when the server stopped; marked failed",
                self.recovered,
            )

    def _close_connections(self) -> None:
        with self._pool_lock:
            pool, self._read_pool = self._read_pool, []
            self._pool_closed = True
        # In memory a read abandoned by its caller may still be using the shared connection.
        with self._mem_lock if self._memory else contextlib.nullcontext():
            for conn in [*pool, *([self._writer] if self._writer else [])]:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._writer = None

    def _mask(self, text: str | None) -> str | None:
        if text is not None:
            for secret in self._secrets:
                if secret in text:
                    text = text.replace(secret, "***")
        return text

    @property
    def persistent(self) -> bool:
        """False for `:memory:`: nothing outlives the server."""
        return not self._memory

    # ------------------------------------------------------------------------- writing (Trio side)

    async def task_accepted(self, record: TaskRecord) -> None:
        """Record a new task; returns once it is committed (or kept in memory after a disk
        error, or after `commit_wait` seconds), so the row exists before the ACK goes out."""
        # In memory nothing is durable: no wait, so the ACK is not held up for nothing.
        await self._put(
            ("accepted", record),
            essential=True,
            durable=not self._memory,
            subject=f"accepted for {record.session_id[:80]}",
        )

    def task_acked(self, session_id: str, at: str) -> None:
        """The ACK went out (never waits; a task row op, so never dropped)."""
        self._queue.put(("acked", session_id, at))

    async def command_sent(
        self, session_id: str, index: int, commands: Sequence[Any], at: str
    ) -> None:
        """COMMAND number `index` (0-based) went out with these `Command`s (or dicts)."""
        await self._put(("command", session_id, index, commands, at), essential=False)

    async def results_received(
        self, session_id: str, index: int, results: Sequence[Any] | None, at: str
    ) -> None:
        """The Results of COMMAND `index`, or `None` when it timed out (CMD-6)."""
        await self._put(("results", session_id, index, results, at), essential=False)

    async def model_turn(self, session_id: str, index: int, turn: Any) -> None:
        """A model turn that led to COMMAND `index` (JSON value; secrets already redacted)."""
        await self._put(("turn", session_id, index, turn), essential=False)

    async def task_ended(
        self,
        session_id: str,
        status: str,
        error: str | None,
        result: Any,
        at: str,
        *,
        task_name: str | None = None,
        created_at: str | None = None,
    ) -> None:
        """The outcome (status `completed`/`failed`). Never dropped; readable at once.
        `created_at` (the task row's) keeps this outcome off a later task that reuses the
        session id or the name before the outcome is committed."""
        ended = _Ended(session_id, task_name, status, error, result, at, created_at)
        self._pending_ends[session_id] = ended
        if task_name is not None:
            self._pending_names[task_name] = ended
        await self._put(("ended", ended), essential=True)

    async def device_seen(self, device: DeviceRecord) -> None:
        """A client registered (first/last seen, role, platform, system_info). Never waits:
        with the queue full it is dropped (counted) so registration is never held up."""
        await self._put(("seen", device), essential=False, patient=False)

    async def device_gone(self, client_id: str, reason: str | None, at: str) -> None:
        await self._put(("gone", client_id, reason, at), essential=False, patient=False)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (or kept after a disk error)."""
        await self._put(("flush",), essential=True, durable=True, subject="flush")

    async def prune(self) -> None:
        """Apply retention now and wait until it is done (bounded by `commit_wait`)."""
        done = trio.Event()
        self._queue.put(("prune", done))
        self._hurry.set()
        with trio.move_on_after(self._commit_wait):
            await done.wait()

    async def _put(
        self,
        op: tuple[Any, ...],
        *,
        essential: bool,
        durable: bool = False,
        patient: bool = True,
        subject: str = "",
    ) -> None:
        if self._closing:
            if essential:
                log.error("task store: stopped; %s for %s not recorded", op[0], _op_subject(op))
            return
        if self._queue.qsize() >= self._queue_size:
            try:
                with trio.move_on_after(self._full_wait):
                    while patient and self._queue.qsize() >= self._queue_size:
                        if self._room.is_set():
                            self._room = trio.Event()
                        await self._room.wait()
            except trio.Cancelled:
                if essential:  # e.g. a shutdown deadline: a task row is queued all the same
                    self._queue.put(op)
                raise
            if self._queue.qsize() >= self._queue_size and not essential:
                self.dropped_full += 1
                now = trio.current_time()
                if self._last_full_log is None or now - self._last_full_log >= ERROR_LOG_INTERVAL:
                    self._last_full_log = now
                    log.warning(
                        "task store: queue full for %gs; dropped %d transcript/device record(s) "
                        "so far (task outcomes are kept)",
                        self._full_wait,
                        self.dropped_full,
                    )
                return
        if not durable:
            self._queue.put(op)
            return
        done = trio.Event()
        self._queue.put((*op, done))
        self._hurry.set()
        if self._watching:
            # `run` releases the wait after `commit_wait` (cheaper than a cancel scope here).
            waiters = self._waiters
            while waiters and waiters[0][1].is_set():  # forget the released ones
                waiters.popleft()
            waiters.append((trio.current_time() + self._commit_wait, done, subject))
            if not self._timing:
                self._wake_owner.set()  # to time this wait
            await done.wait()
            return
        with trio.move_on_after(self._commit_wait) as scope:
            await done.wait()
        if scope.cancelled_caught:
            log.warning(
                "task store: %s not committed within %gs; continuing",
                subject,
                self._commit_wait,
            )

    # ------------------------------------------------------------------------- callbacks from the writer

    def _notify(self, events: list[trio.Event], committed: list[_Ended], room: bool) -> None:
        """Runs on the Trio thread (`_dispatch` or `run_sync_soon`): wake waiters, forget
        committed outcomes."""
        for event in events:
            event.set()
        # A read that is in flight may hold a snapshot from before this commit: the overlay
        # has to outlive it, so forgetting waits until no read is in flight.
        if committed:
            self._committed.extend(committed)
            if not self._reads_in_flight:
                self._forget_committed()
        if room:
            self._room.set()

    def _forget_committed(self) -> None:
        committed, self._committed = self._committed, []
        for ended in committed:
            if self._pending_ends.get(ended.session_id) is ended:
                del self._pending_ends[ended.session_id]
            if ended.task_name is not None and self._pending_names.get(ended.task_name) is ended:
                del self._pending_names[ended.task_name]

    def _call_trio(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._token is not None
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)

    def _tell_trio(self, events: list[trio.Event], committed: list[_Ended], room: bool) -> None:
        """`_notify` on the Trio thread (writer thread): through `_dispatch` while it runs
        (a byte on a socket pair it waits on: one wake-up of the event loop, no callback
        queue), else through `run_sync_soon`."""
        with self._tell_lock:
            if self._telling:
                self._told.append((events, committed, room))
                try:
                    self._tell_send.send(b"\0")
                except BlockingIOError:  # full: a wake-up is pending anyway
                    pass
                return
        self._call_trio(self._notify, events, committed, room)

    async def _dispatch(self) -> None:
        """Runs `_notify` for what the writer tells (see `_tell_trio`) until cancelled; then
        the writer goes back to `run_sync_soon` and what is left is delivered here."""
        told = self._told
        receive = self._tell_receive
        try:
            while True:
                await trio.lowlevel.wait_readable(receive)
                try:
                    receive.recv(4096)
                except BlockingIOError:
                    pass
                while told:
                    self._notify(*told.popleft())
        finally:
            with self._tell_lock:
                self._telling = False
            while told:
                self._notify(*told.popleft())

    # ------------------------------------------------------------------------- the writer thread

    def _writer_main(self) -> None:
        try:
            stopping = False
            warm = False
            # Operations nobody waits for, held back while task rows commit on their own (to
            # the inbox) so that the wait before an ACK is one small INSERT's transaction;
            # written together once `held_until` passes (the linger), or with anything else
            # somebody waits for. Every `_write` first moves the inbox into `tasks`.
            # `held_sessions`: the sessions with a held operation (a task row of theirs must
            # stay in order behind it).
            held: list[tuple[Any, ...]] = []
            held_sessions: set[str | None] = set()
            held_until = 0.0
            while not stopping:
                hold: float | None = None
                if self._retry:
                    timeout: float | None = self._retry_interval
                elif self._prune_more:
                    timeout = 0.0
                else:
                    timeout = None
                    if held:
                        hold = max(held_until - time.monotonic(), 0.0)
                ops, stopping = self._drain(timeout, warm, hold)
                warm = bool(ops)
                had_held = bool(held)
                if self._retry:  # after a disk error: everything again, in order
                    ops = held + self._retry + ops
                    held = []
                    held_sessions.clear()
                    self._retry = []
                if not ops and not had_held:
                    if stopping and self._inbox_rows:
                        self._write([])  # a clean stop leaves no task in the inbox
                    elif self._prune_more:
                        self._prune_step()
                    continue
                if self._linger and not stopping:
                    urgent, rest = _split_urgent(ops, held_sessions)
                else:
                    urgent, rest = [], ops
                if not urgent and not had_held:
                    self._write(rest)
                    held_sessions.clear()
                    continue
                if urgent:
                    self._write_urgent(urgent)
                held += rest
                if not held:
                    continue
                now = time.monotonic()
                if self._retry:  # the disk failed: keep the rest with the task rows, in order
                    self._retry.extend(held)
                    held = []
                    held_sessions.clear()
                elif (
                    stopping
                    or self._prune_more  # a prune sees every outcome committed
                    or (had_held and now >= held_until)
                    or len(held) >= MAX_BATCH
                    or any(isinstance(op[-1], trio.Event) for op in rest)
                ):
                    self._write(held)
                    held = []
                    held_sessions.clear()
                elif not had_held:
                    held_until = now + self._linger
            if self._retry:
                log.error(
                    "task store: stopping with %d operation(s) that could not be written",
                    len(self._retry),
                )
        except BaseException:  # a bug: say so loudly, never kill the process from a thread
            self._closing = True  # later writes are refused at once instead of piling up
            log.exception("task store: writer thread crashed; history is no longer written")
        finally:
            with self._handoff:
                self._writer_done = True
                if self._abandoned:
                    self._close_connections()
                    self._release_lock()
            self._writer_exited.set()
            self._call_trio(self._stopped.set)

    def _drain(
        self, timeout: float | None, warm: bool = False, hold: float | None = None
    ) -> tuple[list[tuple[Any, ...]], bool]:
        was_full = self._queue.qsize() >= self._queue_size
        ops: list[tuple[Any, ...]] = []
        lingered = False
        if hold is not None:
            # Operations are held back (see `_writer_main`): wait for a task row or the end of
            # the hold, whichever comes first, then take what is queued.
            if self._queue.empty():
                self._hurry.wait(hold)
            lingered = True
            timeout = 0.0
        elif warm and timeout is None and self._linger and self._queue.empty():
            # Just committed: more is on its way (the rest of a task, the next task). Wait here
            # rather than in `get`, so that the operations nobody waits for do not wake this
            # thread one by one while the event loop is busy: one wake-up per batch, by the
            # linger timer or by a durable put (the next task row before its ACK).
            self._hurry.wait(self._linger)
            lingered = True
        try:
            if timeout == 0.0:
                first = self._queue.get_nowait()
            else:
                first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return ops, False
        if (
            not lingered
            and self._linger
            and first[0] != "stop"
            and not isinstance(first[-1], trio.Event)
            and self._queue.qsize() < MAX_BATCH  # plenty queued already: no need to wait
        ):
            # Group commit: gather what arrives in the next moment into the same transaction,
            # so the writer wakes (and takes the GIL) once per batch rather than once per op;
            # an operation somebody waits for (a task row before its ACK) cuts it short.
            self._hurry.wait(self._linger)
        stopping = False
        item: tuple[Any, ...] | None = first
        while item is not None:
            if item[0] == "stop":
                stopping = True
                break
            if item[0] == "prune":
                self._prune_more = True
                if len(item) > 1:
                    self._prune_waiters.append(item[1])
            else:
                ops.append(item)
            if len(ops) >= MAX_BATCH:
                break
            # (This thread is the only consumer: not empty means `get_nowait` succeeds.)
            item = None if self._queue.empty() else self._queue.get_nowait()
        if was_full:
            self._tell_trio([], [], True)
        return ops, stopping

    def _transaction(
        self, batch: list[tuple[Any, ...]], body: Callable[[sqlite3.Connection], None]
    ) -> bool:
        """Run `body` in one write transaction. On a database error the transaction is rolled
        back, `batch` goes to `_failed` (kept for a retry) and the result is False."""
        conn = self._writer
        assert conn is not None
        try:
            with self._mem_lock if self._memory else contextlib.nullcontext():
                conn.execute("BEGIN IMMEDIATE")
                try:
                    body(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.DatabaseError as exc:
            self._failed(batch, exc)
            return False
        if self._failing:
            self._failing = False
            self._last_error_log = None
            log.warning("task store: writing to %s again; kept operations written", self.path)
        return True

    def _write(self, batch: list[tuple[Any, ...]]) -> None:
        new_rowids: dict[str, int] = {}
        ended: list[_Ended] = []

        def body(conn: sqlite3.Connection) -> None:
            if self._inbox_rows:  # first, so that the batch's updates find the rows
                conn.execute(MOVE_INBOX)
                conn.execute("DELETE FROM inbox")
            pending = _Pending()
            for op in batch:
                try:
                    self._apply(conn, op, new_rowids, ended, pending)
                except Exception as exc:
                    if _is_disk_error(exc):
                        raise
                    self._skipped(op, exc)  # one bad record never blocks the others
            self._write_pending(conn, pending)

        if not self._transaction(batch, body):
            return
        self._inbox_rows = 0
        self._rowids.update(new_rowids)
        for e in ended:
            self._rowids.pop(e.session_id, None)
        self._tell_trio(_events(batch), ended, False)
        if self._inserted_since_prune >= 1000:
            self._inserted_since_prune = 0
            self._prune_more = True

    def _task_values(self, task_id: int, r: TaskRecord) -> tuple[Any, ...]:
        """The values of a new task row, in `INBOX_COLUMNS` order."""
        return (
            task_id,
            r.session_id,
            r.task_name,
            r.requester_id,
            r.requester_type,
            r.executor_id,
            r.platform,
            r.agent,
            self._mask(cut_request(r.request)),
            r.created_at,
        )

    def _write_urgent(self, accepted: list[tuple[Any, ...]]) -> None:
        """Commit task rows somebody waits for (before their ACK) into the inbox: a table
        without secondary indexes, so the transaction is one or two WAL pages. The next
        `_write` moves them into `tasks` (crash recovery at start does it after a crash)."""
        new_rowids: dict[str, int] = {}
        last_id = self._last_id

        def body(conn: sqlite3.Connection) -> None:
            nonlocal last_id
            for op in accepted:
                try:
                    conn.execute(INSERT_INBOX, self._task_values(last_id + 1, op[1]))
                except Exception as exc:
                    if _is_disk_error(exc):
                        raise
                    self._skipped(op, exc)
                else:
                    last_id += 1
                    new_rowids[op[1].session_id] = last_id

        if not self._transaction(accepted, body):
            return
        self._last_id = last_id
        self._inbox_rows += len(new_rowids)
        self._inserted_since_prune += len(new_rowids)
        self._rowids.update(new_rowids)
        self._tell_trio([op[-1] for op in accepted], [], False)

    def _write_pending(self, conn: sqlite3.Connection, pending: _Pending) -> None:
        """The folded updates of a batch: one statement per step, one per task."""
        for (task_id, index), (
            insert,
            sent_at,
            commands,
            results,
            received,
            timed_out,
        ) in pending.steps.items():
            try:
                if insert:
                    conn.execute(
                        "INSERT OR REPLACE INTO steps (task_id, idx, sent_at, commands, results, "
                        "received_at, timed_out) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (task_id, index, sent_at, commands, results, received, timed_out),
                    )
                else:
                    conn.execute(
                        "UPDATE steps SET results = ?, received_at = ?, timed_out = ? "
                        "WHERE task_id = ? AND idx = ?",
                        (results, received, timed_out, task_id, index),
                    )
            except Exception as exc:
                if _is_disk_error(exc):
                    raise
                self._skipped(("step", f"task {task_id} step {index}"), exc)
        for task_id, (acked_at, commands_sent, tool_set, tool, end) in pending.tasks.items():
            try:
                if end is None:
                    conn.execute(
                        "UPDATE tasks SET acked_at = coalesce(?, acked_at), "
                        "commands = commands + ?, last_tool = CASE WHEN ? THEN ? ELSE last_tool END WHERE id = ?",
                        (acked_at, commands_sent, tool_set, tool, task_id),
                    )
                else:
                    conn.execute(
                        "UPDATE tasks SET acked_at = coalesce(?, acked_at), "
                        "commands = commands + ?, last_tool = CASE WHEN ? THEN ? ELSE last_tool END, "
                        "status = ?, error = ?, result = ?, ended_at = ? WHERE id = ?",
                        (acked_at, commands_sent, tool_set, tool, *end, task_id),
                    )
            except Exception as exc:
                if _is_disk_error(exc):
                    raise
                self._skipped(("update", f"task {task_id}"), exc)

    def _skipped(self, op: tuple[Any, ...], exc: Exception) -> None:
        self.skipped += 1
        now = self._monotonic()
        if self._last_skip_log is None or now - self._last_skip_log >= ERROR_LOG_INTERVAL:
            self._last_skip_log = now
            log.error(
                "task store: %s for %s not stored (%s: %s); %d record(s) skipped so far",
                op[0],
                _op_subject(op),
                type(exc).__name__,
                str(exc)[:200],
                self.skipped,
            )

    def _failed(self, batch: list[tuple[Any, ...]], exc: sqlite3.Error) -> None:
        self._failing = True
        if len(batch) > self._retry_cap:
            kept = [op for op in batch if op[0] in _TASK_OPS]
            self._dropped += len(batch) - len(kept)
            batch = kept
        self._retry = batch
        now = self._monotonic()
        if self._last_error_log is None or now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error(
                "task store: cannot write %s (%s); %d operation(s) kept in memory, retrying "
                "every %gs%s",
                self.path,
                exc,
                len(batch),
                self._retry_interval,
                f"; {self._dropped} transcript record(s) dropped" if self._dropped else "",
            )
        # The server keeps serving: whoever waits for these writes is released now.
        events = _events(batch)
        if events:
            self._tell_trio(events, [], False)

    def _apply(
        self,
        conn: sqlite3.Connection,
        op: tuple[Any, ...],
        new_rowids: dict[str, int],
        ended: list[_Ended],
        pending: _Pending,
    ) -> None:
        """Insert rows at once; fold a task's updates (ack, steps, end) into `pending`, which
        `_write_pending` writes as one UPDATE per task and one row per step at the end of the
        batch (same final rows, fewer statements and B-tree visits)."""
        kind = op[0]

        def rowid(session_id: str) -> int | None:
            found = new_rowids.get(session_id) or self._rowids.get(session_id)
            if found is None:
                row = conn.execute(
                    "SELECT id FROM tasks WHERE session_id = ? ORDER BY id DESC LIMIT 1",
                    (session_id,),
                ).fetchone()
                found = row[0] if row else None
            return found

        if kind == "accepted":
            new_id = self._last_id + 1
            conn.execute(
                "INSERT INTO tasks (id, session_id, task_name, requester_id, requester_type, "
                "executor_id, platform, agent, request, created_at, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                self._task_values(new_id, op[1]),
            )
            self._last_id = new_id
            new_rowids[op[1].session_id] = new_id
            self._inserted_since_prune += 1
        elif kind == "acked":
            task_id = rowid(op[1])
            if task_id is not None:
                pending.task(task_id)[0] = op[2]
        elif kind == "command":
            _, session_id, index, commands, at = op
            task_id = rowid(session_id)
            if task_id is not None:
                text = self._mask(dump_commands(commands))
                update = pending.task(task_id)
                update[1] += 1
                update[2] = True
                update[3] = last_tool(commands)
                # A (re)sent COMMAND replaces the step, results included (as INSERT OR REPLACE).
                pending.steps[(task_id, index)] = [True, at, text, None, None, 0]
        elif kind == "results":
            _, session_id, index, results, at = op
            task_id = rowid(session_id)
            if task_id is not None:
                step = pending.steps.get((task_id, index))
                if step is None:
                    step = pending.steps[(task_id, index)] = [False, None, None, None, None, 0]
                step[3] = None if results is None else self._mask(dump_results(results))
                step[4] = None if results is None else at
                step[5] = int(results is None)
        elif kind == "turn":
            _, session_id, index, turn = op
            task_id = rowid(session_id)
            if task_id is not None:
                conn.execute(
                    "INSERT INTO model_turns (task_id, idx, seq, turn) VALUES (?, ?, "
                    "(SELECT count(*) FROM model_turns WHERE task_id = ? AND idx = ?), ?)",
                    (task_id, index, task_id, index, self._mask(to_json(turn))),
                )
        elif kind == "ended":
            e: _Ended = op[1]
            task_id = rowid(e.session_id)
            if task_id is not None:
                pending.task(task_id)[4] = (
                    e.status,
                    self._mask(e.error),
                    self._mask(encode_result(e.result, self.max_result_bytes)),
                    e.ended_at,
                )
            ended.append(e)
        elif kind == "seen":
            d: DeviceRecord = op[1]
            info = d.system_info if isinstance(d.system_info, dict) else None
            hostname = info.get("hostname") if info else None
            conn.execute(
                "INSERT INTO devices (client_id, role, platform, hostname, system_info, "
                "target_id, first_seen, last_seen, connected) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1) "
                "ON CONFLICT (client_id) DO UPDATE SET role = excluded.role, "
                "platform = excluded.platform, hostname = excluded.hostname, "
                "system_info = excluded.system_info, target_id = excluded.target_id, "
                "last_seen = excluded.last_seen, connected = 1",
                (
                    d.client_id,
                    d.role,
                    d.platform,
                    hostname if isinstance(hostname, str) else None,
                    None if info is None else to_json(info),
                    d.target_id,
                    d.at,
                    d.at,
                ),
            )
        elif kind == "gone":
            _, client_id, reason, at = op
            conn.execute(
                "UPDATE devices SET last_seen = ?, last_disconnect_reason = ?, connected = 0 "
                "WHERE client_id = ?",
                (at, reason, client_id),
            )

    def _prune_step(self) -> None:
        """Delete at most PRUNE_BATCH ended tasks that are too old or over `max_tasks`."""
        conn = self._writer
        assert conn is not None
        cutoff = ""  # 0 days: no age limit ("" sorts before every timestamp)
        if self.retention_days > 0:
            cutoff = (
                datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=self.retention_days)
            ).isoformat()
        try:
            with self._mem_lock if self._memory else contextlib.nullcontext():
                conn.execute("BEGIN IMMEDIATE")
                try:
                    ids = [
                        row[0]
                        for row in conn.execute(
                            "SELECT id FROM tasks WHERE created_at < ? AND status != 'running' "
                            "ORDER BY created_at, id LIMIT ?",
                            (cutoff, PRUNE_BATCH),
                        )
                    ]
                    if len(ids) < PRUNE_BATCH and self.max_tasks > 0:
                        total = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
                        excess = min(total - len(ids) - self.max_tasks, PRUNE_BATCH - len(ids))
                        if excess > 0:
                            ids += [
                                row[0]
                                for row in conn.execute(
                                    "SELECT id FROM tasks WHERE status != 'running' "
                                    "AND created_at >= ? ORDER BY created_at, id LIMIT ?",
                                    (cutoff, excess),
                                )
                            ]
                    for table, column in (("steps", "task_id"), ("model_turns", "task_id")):
                        conn.executemany(
                            f"DELETE FROM {table} WHERE {column} = ?",  # constant names
                            [(i,) for i in ids],
                        )
                    conn.executemany("DELETE FROM tasks WHERE id = ?", [(i,) for i in ids])
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
        except sqlite3.DatabaseError as exc:
            self._prune_more = False
            log.warning("task store: pruning %s failed: %s", self.path, exc)
        else:
            self._prune_more = len(ids) == PRUNE_BATCH
            if ids:
                log.info("task store: pruned %d old task(s)", len(ids))
        if not self._prune_more and self._prune_waiters:
            waiters, self._prune_waiters = self._prune_waiters, []
            self._tell_trio(waiters, [], False)

    # ------------------------------------------------------------------------- reading

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(connection, *args)` in a worker thread. Raises `StoreUnavailable` (→ 503)."""
        if self._writer is None:
            raise StoreUnavailable("Task history is not available")
        self._reads_in_flight += 1
        try:
            return await trio.to_thread.run_sync(
                self._in_read_connection,
                fn,
                args,
                limiter=self._read_limiter,
                abandon_on_cancel=True,
            )
        except sqlite3.Error as exc:
            log.warning("task store: reading %s failed: %s", self.path, exc)
            raise StoreUnavailable("Task history is not available") from None
        finally:
            self._reads_in_flight -= 1
            # Not yet: the caller still applies the overlay to what this read returned.
            if not self._reads_in_flight and self._committed:
                self._token_run_soon(self._forget_if_idle)

    def _token_run_soon(self, fn: Callable[[], None]) -> None:
        assert self._token is not None
        self._token.run_sync_soon(fn)

    def _forget_if_idle(self) -> None:
        if not self._reads_in_flight:
            self._forget_committed()

    def _in_read_connection(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self._memory:
            with self._mem_lock:
                if self._writer is None:
                    raise sqlite3.ProgrammingError("the task store is closed")
                return fn(self._writer, *args)
        with self._pool_lock:
            conn = self._read_pool.pop() if self._read_pool else None
        if conn is None:
            conn = self._connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only = 1")
        try:
            result = fn(conn, *args)
        except BaseException:
            conn.close()
            raise
        with self._pool_lock:
            if not self._pool_closed:
                self._read_pool.append(conn)
                return result
        conn.close()  # a read given up at shutdown that finished afterwards: nothing keeps it
        return result

    def _encode_cursor(self, created_at: str, task_id: int) -> str:
        payload = json.dumps([created_at, task_id], separators=(",", ":")).encode()
        tag = hmac.new(self._cursor_key, payload, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(tag + payload).decode().rstrip("=")

    def _decode_cursor(self, cursor: str) -> tuple[str, int]:
        try:
            if len(cursor) > 512:
                raise ValueError
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            tag, payload = raw[:16], raw[16:]
            expected = hmac.new(self._cursor_key, payload, hashlib.sha256).digest()[:16]
            if not hmac.compare_digest(tag, expected):
                raise ValueError
            created_at, task_id = json.loads(payload)
            if type(created_at) is not str or type(task_id) is not int:
                raise ValueError
        except (ValueError, TypeError, UnicodeDecodeError):
            raise BadCursor() from None
        return created_at, task_id

    async def list_tasks(self, query: TaskQuery) -> dict[str, Any]:
        """GET /api/tasks: `{"tasks": [TaskSummary...], "next_cursor": str | None}`."""
        after = self._decode_cursor(query.cursor) if query.cursor else None
        if query.status is not None and self._pending_ends and not self._failing:
            # The overlay cannot add rows a status filter left out: let the writer catch up.
            await self.flush()
        rows: list[tuple[Any, ...]] = await self._read(select_tasks, query, after)
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        tasks = [self._overlay(summary(row[1:])) for row in rows]
        next_cursor = None
        if more:
            last = rows[-1]
            next_cursor = self._encode_cursor(last[10], last[0])  # created_at, id
        return {"tasks": tasks, "next_cursor": next_cursor}

    async def task_detail(self, session_id: str) -> dict[str, Any] | None:
        """GET /api/tasks/{session_id}: summary + request, result, steps; None if unknown."""
        detail: dict[str, Any] | None = await self._read(select_detail, session_id)
        if detail is None:
            return None
        return self._overlay(detail)

    async def task_result(self, task_name: str) -> dict[str, Any]:
        """RES-1/HTTP-4 for an already sanitised name: pending / done / failed."""
        row: dict[str, Any] | None = await self._read(select_by_name, task_name)
        if row is None:
            ended = self._pending_names.get(task_name)
            if ended is None:
                return {"status": "pending"}
            row = {"status": ended.status, "error": ended.error, "result": ended.result}
        else:
            row = self._overlay(row)
        if row["status"] == "completed":
            return {"status": "done", "result": row["result"]}
        if row["status"] == "failed":
            return {"status": "failed", "error": row["error"], "result": row["result"]}
        return {"status": "pending"}

    def _overlay(self, row: dict[str, Any]) -> dict[str, Any]:
        """A row as it will be once the queued outcome of its session is committed."""
        if row["status"] == "running":
            ended = self._pending_ends.get(row["session_id"])
            if ended is not None and ended.created_at in (None, row.get("created_at")):
                row.update(status=ended.status, error=ended.error, ended_at=ended.ended_at)
                if "result" in row:
                    row["result"] = from_json(encode_result(ended.result, self.max_result_bytes))
        return row

    async def devices(self) -> dict[str, Any]:
        """GET /api/devices: every client ever seen, online first, then by last_seen desc."""
        online = {c.client_id: c for c in self._online()}  # on the Trio thread
        rows: list[dict[str, Any]] = await self._read(select_devices)
        now = wall_now()
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for row in rows:
            seen.add(row["client_id"])
            out.append(device_entry(row, online.get(row["client_id"]), now))
        for client in online.values():
            if client.client_id not in seen:  # registered, sighting not yet committed
                info = client.system_info
                hostname = info.get("hostname") if isinstance(info, dict) else None
                row = {
                    "client_id": client.client_id,
                    "role": client.role,
                    "platform": client.platform,
                    "hostname": hostname if isinstance(hostname, str) else None,
                    "target_id": client.target_id,
                    "first_seen": client.connected_at or now,
                    "last_seen": now,
                    "last_disconnect_reason": None,
                }
                out.append(device_entry(row, client, now))
        out.sort(key=lambda d: str(d["last_seen"] or ""), reverse=True)
        out.sort(key=lambda d: not d["online"])  # stable: online first, each by last_seen
        return {"devices": out}


# --------------------------------------------------------------------------------- read helpers


def _op_subject(op: tuple[Any, ...]) -> str:
    subject = op[1] if len(op) > 1 else ""
    return str(getattr(subject, "session_id", getattr(subject, "client_id", subject)))[:80]


def _is_disk_error(exc: BaseException) -> bool:
    """SQLite failed as a whole (I/O, full, locked, corrupt), not because of one record."""
    return isinstance(exc, sqlite3.OperationalError | sqlite3.InternalError) or (
        type(exc) is sqlite3.DatabaseError
    )


def _events(batch: Iterable[tuple[Any, ...]]) -> list[trio.Event]:
    return [op[-1] for op in batch if isinstance(op[-1], trio.Event)]


def _op_session(op: tuple[Any, ...]) -> str | None:
    kind = op[0]
    if kind in ("acked", "command", "results", "turn"):
        return str(op[1])
    if kind in ("accepted", "ended"):
        return str(op[1].session_id)
    return None


def _split_urgent(
    batch: list[tuple[Any, ...]], sessions: set[str | None]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The task rows somebody waits for (before their ACK) that can commit ahead of the rest
    of `batch`: those whose session has no earlier operation in it or in `sessions` (the
    operations held from before), to which the sessions of the rest are added. Order is kept
    otherwise."""
    urgent: list[tuple[Any, ...]] = []
    rest: list[tuple[Any, ...]] = []
    for op in batch:
        if op[0] == "accepted" and isinstance(op[-1], trio.Event):
            if op[1].session_id not in sessions:
                urgent.append(op)
                continue
        rest.append(op)
        sessions.add(_op_session(op))
    return urgent, rest
