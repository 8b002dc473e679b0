"""The task store's SQL and JSON shapes: schema, values, query parsing, the read queries.

Pure functions of a `sqlite3.Connection` or of plain values, no Trio and no threads: `_store`
runs them in its writer thread or in a worker thread. Every value reaches SQLite as a bound
parameter; the only text joined into SQL is constant fragments.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._errors import UfoTrioError

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable, Iterator, Mapping, Sequence

MAX_REQUEST_BYTES: Final = 64 * 1024
REQUEST_CUT_MARKER: Final = "\n[ufo_trio: request cut at 65536 bytes of {size}]"
STATUSES: Final = ("running", "completed", "failed")
DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 500


# --------------------------------------------------------------------------------- schema

#: MIGRATIONS[n] takes a database from `user_version` n to n + 1. Append, never edit.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL,
            task_name TEXT NOT NULL,
            requester_id TEXT NOT NULL,
            requester_type TEXT NOT NULL,
            executor_id TEXT NOT NULL,
            platform TEXT,
            agent TEXT,
            request TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
            error TEXT,
            result TEXT,
            created_at TEXT NOT NULL,
            acked_at TEXT,
            ended_at TEXT,
            commands INTEGER NOT NULL DEFAULT 0,
            last_tool TEXT
        )""",
        "CREATE INDEX tasks_by_time ON tasks (created_at, id)",
        "CREATE INDEX tasks_by_session ON tasks (session_id, id)",
        "CREATE INDEX tasks_by_name ON tasks (task_name, id)",
        "CREATE INDEX tasks_by_status ON tasks (status, created_at, id)",
        "CREATE INDEX tasks_by_executor ON tasks (executor_id, created_at, id)",
        "CREATE INDEX tasks_by_requester ON tasks (requester_id, created_at, id)",
        """CREATE TABLE steps (
            task_id INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            sent_at TEXT NOT NULL,
            commands TEXT NOT NULL,
            results TEXT,
            received_at TEXT,
            timed_out INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (task_id, idx)
        ) WITHOUT ROWID""",
        """CREATE TABLE model_turns (
            task_id INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            turn TEXT NOT NULL,
            PRIMARY KEY (task_id, idx, seq)
        ) WITHOUT ROWID""",
        """CREATE TABLE devices (
            client_id TEXT PRIMARY KEY,
            role TEXT NOT NULL,
            platform TEXT,
            hostname TEXT,
            system_info TEXT,
            target_id TEXT,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            last_disconnect_reason TEXT,
            connected INTEGER NOT NULL DEFAULT 0
        )""",
    ),
    # 2: the inbox. A task row somebody waits for (before its ACK) is committed here, in a table
    # without secondary indexes (one or two WAL pages per commit instead of about nine); the
    # writer moves it into `tasks` with its next batch, keeping its id. Reads look at both.
    (
        """CREATE TABLE inbox (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL,
            task_name TEXT NOT NULL,
            requester_id TEXT NOT NULL,
            requester_type TEXT NOT NULL,
            executor_id TEXT NOT NULL,
            platform TEXT,
            agent TEXT,
            request TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
    ),
)

#: The task columns an inbox row has; the others are those of a task that just started.
INBOX_COLUMNS: Final = (
    "id, session_id, task_name, requester_id, requester_type, executor_id, platform, agent, "
    "request, created_at"
)
#: Inbox rows as `tasks` rows (a subquery that the read queries use in place of `tasks`).
INBOX_AS_TASKS: Final = (
    f"(SELECT {INBOX_COLUMNS}, 'running' AS status, NULL AS error, NULL AS result, "
    "NULL AS acked_at, NULL AS ended_at, 0 AS commands, NULL AS last_tool FROM inbox)"
)
INSERT_INBOX: Final = f"INSERT INTO inbox ({INBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: Moves every inbox row into `tasks` (as running); followed by DELETE FROM inbox.
MOVE_INBOX: Final = (
    f"INSERT INTO tasks ({INBOX_COLUMNS}, status) SELECT {INBOX_COLUMNS}, 'running' FROM inbox"
)
#: At start (crash recovery): what is left in the inbox ran when the server stopped.
RECOVER_INBOX: Final = (
    f"INSERT INTO tasks ({INBOX_COLUMNS}, status, error, ended_at) "
    f"SELECT {INBOX_COLUMNS}, 'failed', ?, ? FROM inbox"
)
TASK_SOURCES: Final = ("tasks", INBOX_AS_TASKS)


# --------------------------------------------------------------------------------- errors


class BadQuery(UfoTrioError, ValueError):
    """A query parameter of /api/tasks is invalid; the message names it (HTTP 400)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


class BadCursor(BadQuery):
    """The pagination cursor was not issued by this database or was altered (HTTP 400)."""

    def __init__(self) -> None:
        super().__init__("cursor", "Invalid cursor")


# --------------------------------------------------------------------------------- values


def wall_now() -> str:
    """Wall-clock UTC in the WIRE-7 format."""
    return datetime.datetime.now(datetime.UTC).isoformat()


@attrs.frozen(kw_only=True)
class TaskRecord:
    """An accepted task, written before its ACK goes out (TASK-8)."""

    session_id: str
    task_name: str
    request: str
    requester_id: str
    requester_type: str
    executor_id: str
    platform: str | None
    agent: str | None
    created_at: str = attrs.field(factory=wall_now)


@attrs.frozen(kw_only=True)
class DeviceRecord:
    """A client seen at registration (devices and constellations)."""

    client_id: str
    role: str
    platform: str | None
    system_info: dict[str, Any] | None = None
    target_id: str | None = None
    at: str = attrs.field(factory=wall_now)


@attrs.frozen(kw_only=True)
class OnlineClient:
    """What the server knows about a client that is connected now (for GET /api/devices)."""

    client_id: str
    role: str
    platform: str | None
    connected_at: str | None
    last_heartbeat: str | None
    sessions_running: int
    target_id: str | None = None
    system_info: dict[str, Any] | None = None


@attrs.frozen(kw_only=True)
class TaskQuery:
    status: str | None = None
    target: str | None = None
    requester: str | None = None
    since: str | None = None
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None


# --------------------------------------------------------------------------------- helpers


def parse_task_query(params: Mapping[str, str]) -> TaskQuery:
    """Validate the query parameters of GET /api/tasks. Raises `BadQuery` (400)."""
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadQuery("status", f"Invalid status: must be one of {', '.join(STATUSES)}")
    since = params.get("since") or None
    if since is not None:
        try:
            moment = datetime.datetime.fromisoformat(since)
        except ValueError:
            raise BadQuery("since", "Invalid since: must be an ISO 8601 timestamp") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        since = moment.astimezone(datetime.UTC).isoformat()
    raw_limit = params.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit:
        if (
            not raw_limit.isascii()
            or not raw_limit.isdigit()
            or not 1 <= int(raw_limit) <= MAX_LIMIT
        ):
            raise BadQuery("limit", f"Invalid limit: must be an integer from 1 to {MAX_LIMIT}")
        limit = int(raw_limit)
    return TaskQuery(
        status=status,
        target=params.get("target") or None,
        requester=params.get("requester") or None,
        since=since,
        limit=limit,
        cursor=params.get("cursor") or None,
    )


def cut_request(request: str) -> str:
    data = request.encode("utf-8", "surrogatepass")
    if len(data) <= MAX_REQUEST_BYTES:
        return request
    head = data[:MAX_REQUEST_BYTES].decode("utf-8", "ignore")
    return head + REQUEST_CUT_MARKER.format(size=len(data))


def encode_result(result: Any, limit: int) -> str | None:
    """The result as JSON text of at most about `limit` bytes, or a truncation marker."""
    if result is None:
        return None
    try:
        text = json.dumps(result, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return json.dumps({"truncated": True, "reason": "not JSON-serialisable"})
    size = len(text.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return text
    preview = text.encode("utf-8", "surrogatepass")[: min(limit, 4096)].decode("utf-8", "ignore")
    return json.dumps(
        {"truncated": True, "bytes": size, "limit": limit, "preview": preview},
        ensure_ascii=False,
    )


def dump_commands(commands: Iterable[Any]) -> str:
    out = []
    for c in commands:
        if isinstance(c, dict):
            out.append({k: c.get(k) for k in ("tool_name", "tool_type", "parameters", "call_id")})
        else:
            tool_type = c.tool_type
            out.append(
                {
                    "tool_name": c.tool_name,
                    "tool_type": getattr(tool_type, "value", tool_type),
                    "parameters": c.parameters,
                    "call_id": c.call_id,
                }
            )
    return to_json(out)


def dump_results(results: Iterable[Any]) -> str:
    out = []
    for r in results:
        if isinstance(r, dict):
            out.append({k: r.get(k) for k in ("status", "error", "result", "call_id")})
        else:
            status = r.status
            out.append(
                {
                    "status": getattr(status, "value", status),
                    "error": r.error,
                    "result": r.result,
                    "call_id": r.call_id,
                }
            )
    return to_json(out)


def to_json(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return "null"


def from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def last_tool(commands: Sequence[Any]) -> str | None:
    if not commands:
        return None
    last = commands[-1]
    name = last.get("tool_name") if isinstance(last, dict) else last.tool_name
    return name if isinstance(name, str) else None


SUMMARY_COLUMNS: Final = (
    "session_id, task_name, requester_id, requester_type, executor_id, platform, agent, "
    "status, error, created_at, acked_at, ended_at, commands, last_tool"
)
SUMMARY_KEYS: Final = tuple(c.strip() for c in SUMMARY_COLUMNS.split(","))


def summary(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(SUMMARY_KEYS, row, strict=False))


def device_entry(row: dict[str, Any], client: OnlineClient | None, now: str) -> dict[str, Any]:
    online = client is not None
    return {
        "client_id": row["client_id"],
        "role": client.role if client else row["role"],
        "platform": client.platform if client else row["platform"],
        "hostname": row["hostname"],
        "online": online,
        "connected_at": client.connected_at if client else None,
        "last_heartbeat": client.last_heartbeat if client else None,
        "sessions_running": client.sessions_running if client else 0,
        "target_id": client.target_id if client else row["target_id"],
        "first_seen": row["first_seen"],
        "last_seen": now if online else row["last_seen"],
        "last_disconnect_reason": None if online else row["last_disconnect_reason"],
    }


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction, so that `tasks` and the inbox are read at the same moment (a
    task the writer moves between two statements is seen once)."""
    if conn.in_transaction:
        yield
        return
    conn.execute("SAVEPOINT snapshot")  # outside a transaction: BEGIN DEFERRED
    try:
        yield
    finally:
        conn.execute("RELEASE snapshot")


def select_tasks(
    conn: sqlite3.Connection, query: TaskQuery, after: tuple[str, int] | None
) -> list[tuple[Any, ...]]:
    # Only constant fragments are joined; every value is a bound parameter.
    where: list[str] = []
    params: list[Any] = []
    if query.status is not None:
        where.append("status = ?")
        params.append(query.status)
    if query.target is not None:
        where.append("executor_id = ?")
        params.append(query.target)
    if query.requester is not None:
        where.append("requester_id = ?")
        params.append(query.requester)
    if query.since is not None:
        where.append("created_at >= ?")
        params.append(query.since)
    if after is not None:
        where.append("(created_at, id) < (?, ?)")
        params.extend(after)
    tail = (" WHERE " + " AND ".join(where) if where else "") + (
        " ORDER BY created_at DESC, id DESC LIMIT ?"
    )
    params.append(query.limit + 1)
    rows: list[tuple[Any, ...]] = []
    with _snapshot(conn):
        for source in TASK_SOURCES:
            rows += conn.execute(f"SELECT id, {SUMMARY_COLUMNS} FROM {source}{tail}", params)
    unique = {row[0]: row for row in rows}  # one row per id (ids are never in both tables)
    ordered = sorted(unique.values(), key=lambda row: (row[10], row[0]), reverse=True)
    return ordered[: query.limit + 1]


def _latest(
    conn: sqlite3.Connection, columns: str, where: str, value: str
) -> tuple[Any, ...] | None:
    """The row with the highest id in `tasks` or the inbox matching `where` (one `?`)."""
    best: tuple[Any, ...] | None = None
    with _snapshot(conn):
        for source in TASK_SOURCES:
            row = conn.execute(
                f"SELECT id, {columns} FROM {source} WHERE {where} ORDER BY id DESC LIMIT 1",
                (value,),
            ).fetchone()
            if row is not None and (best is None or row[0] > best[0]):
                best = row
    return best


def select_detail(conn: sqlite3.Connection, session_id: str) -> dict[str, Any] | None:
    with _snapshot(conn):
        row = _latest(conn, f"request, result, {SUMMARY_COLUMNS}", "session_id = ?", session_id)
        if row is None:
            return None
        task_id, request, result = row[0], row[1], row[2]
        detail = summary(row[3:])
        detail["request"] = request
        detail["result"] = from_json(result)
        steps = [
            {
                "index": idx,
                "sent_at": sent_at,
                "commands": from_json(commands),
                "results": from_json(results),
                "received_at": received_at,
                "timed_out": bool(timed_out),
            }
            for idx, sent_at, commands, results, received_at, timed_out in conn.execute(
                "SELECT idx, sent_at, commands, results, received_at, timed_out FROM steps "
                "WHERE task_id = ? ORDER BY idx",
                (task_id,),
            )
        ]
        by_index = {step["index"]: step for step in steps}
        for idx, turn in conn.execute(
            "SELECT idx, turn FROM model_turns WHERE task_id = ? ORDER BY idx, seq", (task_id,)
        ):
            step = by_index.get(idx) or (steps[-1] if steps else None)
            if step is not None:
                step.setdefault("model_turns", []).append(from_json(turn))
    detail["steps"] = steps
    return detail


def select_by_name(conn: sqlite3.Connection, task_name: str) -> dict[str, Any] | None:
    row = _latest(
        conn, "session_id, status, error, result, created_at", "task_name = ?", task_name
    )
    if row is None:
        return None
    return {
        "session_id": row[1],
        "status": row[2],
        "error": row[3],
        "result": from_json(row[4]),
        "created_at": row[5],
    }


def select_devices(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    cursor = conn.execute(
        "SELECT client_id, role, platform, hostname, target_id, first_seen, last_seen, "
        "last_disconnect_reason FROM devices ORDER BY last_seen DESC"
    )
    keys = [d[0] for d in cursor.description]
    return [dict(zip(keys, row, strict=True)) for row in cursor]
