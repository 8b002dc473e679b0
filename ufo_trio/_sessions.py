"""Sessions (§4): TASK acceptance, COMMAND round trips, TASK_END routing and cancellation.

A session is a task in its **executor** connection's nursery (TASK-8), started with
`nursery.start` and owning a `CancelScope`. The executor going away cancels it through that scope
(DC-2); the requester keeps the `Session` handle and cancels it the same way (DC-3). Whatever ends
a session, its TASK_END is sent from a shielded, time-bounded scope (CAN-2), exactly once.
"""

from __future__ import annotations

import collections
import logging
import re
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from . import _rules
from ._agents import Agent, AgentFactory, TaskFailed, UnsupportedPlatform
from ._codec import encode_server_message, shown, unstructure
from ._errors import ConnectionGone
from ._gate import CpuGate
from ._limits import log_refusal
from ._messages import (
    ClientMessage,
    ClientType,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
    new_id,
)
from ._rules import INVALID_RESULTS, SHUTTING_DOWN, Match, Reject
from ._store_sql import TaskRecord, wall_now

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._connection import Connection
    from ._context import ServerContext

log = logging.getLogger("ufo_trio")

DEVICE_GONE: Final = "Task was cancelled because target device disconnected"
REQUESTER_GONE: Final = "Task was cancelled because the requesting client disconnected"
NOT_SERIALISABLE: Final = "Agent returned a non-JSON-serialisable result"

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")
_AGENT_NAMES: Final = {"windows": "HostAgent", "linux": "LinuxAgent", "mobile": "MobileAgent"}


def sanitize_task_name(raw: str | None) -> str:
    """NAME-1: map every character outside `[A-Za-z0-9._-]` to `_`, strip leading dots."""
    name = _UNSAFE.sub("_", raw).lstrip(".") if raw else ""
    return name or new_id()


def default_agent_name(platform: str) -> str:
    """AGENT-3: the COMMAND's `agent_name` when the agent does not choose one."""
    return _AGENT_NAMES.get(platform, "HostAgent")


def _failures(commands: list[Command], error: str) -> list[Result]:
    """CMD-7: one synthetic failure per Command, in order."""
    return [
        Result(status=ResultStatus.FAILURE, error=error, call_id=c.call_id) for c in commands
    ]


@attrs.define(eq=False)
class _Waiter:
    commands: list[Command]
    done: trio.Event = attrs.field(factory=trio.Event)
    results: list[Result] | None = None

    def resolve(self, results: list[Result]) -> None:
        self.results = results
        self.done.set()


@attrs.frozen(kw_only=True)
class SessionRecord:
    """A finished session as kept by the result store (RES-1)."""

    session_id: str
    task_name: str
    status: TaskStatus
    error: str | None
    result: Any
    finished_at: str


class ResultStore:
    """Bounded store of finished sessions, by session id and by task name (LIM-8, RES-1)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._by_id: collections.OrderedDict[str, SessionRecord] = collections.OrderedDict()
        self._by_name: dict[str, SessionRecord] = {}

    def add(self, record: SessionRecord) -> None:
        self._by_id.pop(record.session_id, None)
        self._by_id[record.session_id] = record
        self._by_name[record.task_name] = record  # NAME-2: latest wins
        while len(self._by_id) > self._size:
            _, old = self._by_id.popitem(last=False)
            if self._by_name.get(old.task_name) is old:
                del self._by_name[old.task_name]

    def by_session_id(self, session_id: str) -> SessionRecord | None:
        return self._by_id.get(session_id)

    def by_task_name(self, task_name: str) -> SessionRecord | None:
        return self._by_name.get(task_name)

    def __len__(self) -> int:
        return len(self._by_id)


@attrs.define(eq=False)
class Session:
    """One running task. Also the `SessionContext` its agent sees (AGENT-2)."""

    manager: SessionManager
    session_id: str
    task_name: str
    request: str
    platform: str
    requester: Connection
    requester_id: str
    requester_type: ClientType
    executor: Connection
    executor_id: str
    agent: Agent
    #: The executor's `system_info` from its REGISTER (read-only; None if it sent none).
    system_info: Mapping[str, Any] | None = None
    started_at: str = attrs.field(factory=wall_now)
    #: trio time at creation (task duration in the metrics).
    started: float = attrs.field(factory=trio.current_time)
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    cancel_reason: str | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    waiters: dict[str, _Waiter] = attrs.field(factory=dict)
    #: COMMAND frames sent so far (the step index of the task history).
    steps: int = 0
    #: True while this session holds a slot of the manager's CPU gate (`hold_cpu`).
    cpu_held: bool = False
    #: Set while one of the session's tasks waits for a slot (others wait for that one).
    _cpu_turn: trio.Event | None = None
    log: logging.LoggerAdapter[logging.Logger] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.log = logging.LoggerAdapter(log, {"session_id": self.session_id})

    @property
    def for_constellation(self) -> bool:
        return self.requester_type is ClientType.CONSTELLATION

    def cancel(self, reason: str) -> None:
        """Cancel through the session's scope; the first reason is the one reported."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.scope.cancel()

    async def hold_cpu(self) -> None:
        """Wait (FIFO) for a slot of the server's session CPU gate, unless this session holds
        one; see `_gate`. `execute` lends it back while the device works, `release_cpu` ends it,
        and the session's end releases it whatever happens."""
        # One slot per session: an agent with two `execute`s in flight shares it, so the
        # second task to ask waits for the first one's turn instead of queueing twice.
        while not self.cpu_held:
            turn = self._cpu_turn
            if turn is not None:
                await turn.wait()
                continue
            self._cpu_turn = turn = trio.Event()
            try:
                await self.manager.gate.acquire(self)
                self.cpu_held = True
            finally:
                self._cpu_turn = None
                turn.set()

    def release_cpu(self) -> None:
        """Give the CPU gate's slot back (no-op if not held): before any wait on the network."""
        if self.cpu_held:
            self.cpu_held = False
            self.manager.gate.release(self)

    async def execute(
        self,
        commands: list[Command],
        *,
        agent_name: str | None = None,
        process_name: str | None = None,
        root_name: str | None = None,
    ) -> list[Result]:
        """CMD-1…CMD-7: one COMMAND round trip with the executor.

        A caller holding the CPU gate (`hold_cpu`) gives it back as the COMMAND is written (not
        held while the device works) and gets it again (FIFO) before the results are handled."""
        # A write may complete without a checkpoint, so a cancelled session must stop here.
        await trio.lowlevel.checkpoint_if_cancelled()
        gated = self.cpu_held
        commands = [attrs.evolve(c, call_id=new_id()) for c in commands]
        response_id = new_id()
        waiter = _Waiter(commands)
        self.waiters[response_id] = waiter
        context = self.manager.context
        config, store, metrics = context.config, context.store, context.metrics
        step = self.steps
        self.steps += 1
        sent = trio.current_time()
        # The CPU gate's slot goes back before the write: the COMMAND is still encoded and
        # written in this same task step (releasing does not yield), but a device that reads
        # slowly (a write waiting up to SEND_TIMEOUT) never holds a slot.
        self.release_cpu()
        try:
            try:
                await self.executor.send(
                    ServerMessage(
                        type=ServerMessageType.COMMAND,
                        status=TaskStatus.CONTINUE,
                        agent_name=agent_name or default_agent_name(self.platform),
                        process_name=process_name,
                        root_name=root_name,
                        actions=commands,
                        session_id=self.session_id,
                        task_name=self.task_name,
                        response_id=response_id,
                    )
                )
                metrics.commands_out(len(commands))
                if log.isEnabledFor(logging.DEBUG):  # the name list costs more than the call
                    log.debug(
                        "session %s: COMMAND %s to %s",
                        shown(self.session_id),
                        [shown(c.tool_name, 40) for c in commands],
                        shown(self.executor_id),
                    )
            except ConnectionGone:
                pass  # the executor is closing; its teardown cancels this session
            if store is not None:
                await store.command_sent(self.session_id, step, commands, wall_now())
            with trio.move_on_after(config.command_timeout):
                await waiter.done.wait()
            if gated:
                await self.hold_cpu()
            if store is not None:  # the Results, or None for a timeout
                await store.results_received(self.session_id, step, waiter.results, wall_now())
            if waiter.results is None:  # CMD-6
                metrics.command_timed_out()
                log.info(
                    "session %s: no results for %s within %gs",
                    shown(self.session_id),
                    [shown(c.tool_name, 40) for c in commands],
                    config.command_timeout,
                )
                return _failures(
                    commands,
                    f"timeout: no command results received within {config.command_timeout:g} s",
                )
            metrics.command_answered(trio.current_time() - sent)
            return waiter.results
        finally:
            self.waiters.pop(response_id, None)

    async def run(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        """The session task, in the executor's nursery."""
        outcome: tuple[TaskStatus, str | None, Any] | None = None
        try:
            with self.scope:
                # TASK-8: the ACK is written by the session itself before `nursery.start`
                # returns, so it precedes both the first COMMAND and any later reply of the
                # requester's handler (PROC-2), without a hand-off between tasks. The task's
                # history row is committed first (issue 11: a crash after the ACK is known).
                store = self.manager.context.store
                if store is not None:
                    await store.task_accepted(self._record())
                try:
                    await self.requester.send(
                        ServerMessage(
                            type=ServerMessageType.HEARTBEAT,
                            status=TaskStatus.OK,
                            session_id=self.session_id,
                            task_name=self.task_name,
                        )
                    )
                except ConnectionGone:
                    pass  # the requester is closing: its teardown cancels this session
                if store is not None:
                    store.task_acked(self.session_id, wall_now())
                task_status.started(self.scope)
                if self.requester.is_open and self.executor.is_open:
                    outcome = await self._drive()
        except Exception as exc:  # what a cancel scope leaves of a mixed exception group
            outcome = (TaskStatus.FAILED, str(exc) or type(exc).__name__, None)
        finally:
            if outcome is None:
                outcome = (TaskStatus.FAILED, self.cancel_reason or self._implied_reason(), None)
            # CAN-2: shielded, so cancellation cannot cut the TASK_END short; bounded (inside
            # `finish` by SEND_TIMEOUT, and here as a whole) so it cannot hang either.
            context = self.manager.context
            patience = 2 * context.config.send_timeout
            # The CPU gate's slot (if the last segment held one) goes back first: the TASK_END
            # is written to a peer that may read slowly, and is never made to wait for a slot.
            self.release_cpu()
            with trio.CancelScope(shield=True), context.shutdown.bounded(patience):
                await self.manager.finish(self, *outcome)
            self.done.set()

    async def record_model_turn(self, turn: Mapping[str, Any]) -> None:
        """AGENT-2 extension: the turn goes to the task history with the next COMMAND's index."""
        store = self.manager.context.store
        if store is not None:
            await store.model_turn(self.session_id, self.steps, dict(turn))

    def _record(self) -> TaskRecord:
        return TaskRecord(
            session_id=self.session_id,
            task_name=self.task_name,
            request=self.request,
            requester_id=self.requester_id,
            requester_type=self.requester_type.value,
            executor_id=self.executor_id,
            platform=self.platform,
            agent=self.manager.context.config.effective_agent,
            created_at=self.started_at,
        )

    def _implied_reason(self) -> str:
        """Why a session was cancelled from outside its own scope (e.g. while starting)."""
        if not self.executor.is_open:
            return DEVICE_GONE
        if not self.requester.is_open:
            return REQUESTER_GONE
        return SHUTTING_DOWN

    async def _drive(self) -> tuple[TaskStatus, str | None, Any]:
        try:
            value = await self.agent.run(self)
        except TaskFailed as exc:
            return TaskStatus.FAILED, exc.error, exc.result
        except Exception as exc:
            self.log.info("session %s: agent raised %s", shown(self.session_id), type(exc).__name__)
            return TaskStatus.FAILED, str(exc) or type(exc).__name__, None
        return TaskStatus.COMPLETED, None, value


@attrs.define(eq=False)
class SessionManager:
    """The live-session store and the TASK / COMMAND_RESULTS handlers (§4).

    One per server; connections (for their teardown), the frame handler and the HTTP API are
    given it explicitly. It knows only the shared `ServerContext`.
    """

    context: ServerContext
    agent_factory: AgentFactory
    live: dict[str, Session] = attrs.field(factory=dict)
    results: ResultStore = attrs.field(init=False)
    #: Bounds the sessions running CPU segments at once (`Session.hold_cpu`; llm agent).
    gate: CpuGate = attrs.field(factory=CpuGate)

    def __attrs_post_init__(self) -> None:
        self.results = ResultStore(self.context.config.result_store_size)

    # -------------------------------------------------------------------------- TASK

    async def handle_task(self, conn: Connection, msg: ClientMessage) -> None:
        """A TASK frame: TASK-1…TASK-7 (`_rules.check_task`), then start the session (TASK-8)."""
        entry = conn.entry
        assert entry is not None
        context = self.context
        config = context.config
        live = self.live
        verdict = _rules.check_task(
            entry,
            msg,
            shutting_down=context.shutdown.started,
            lookup=context.registry.get,
            owner_of=self._owner_of,
            new_session_id=new_id,
            live_sessions=len(conn.requested),
            max_sessions=config.max_sessions_per_client,
        )
        if isinstance(verdict, Reject):
            if verdict is _rules.TOO_MANY_SESSIONS:  # TASK-6
                limit = config.max_sessions_per_client
                log_refusal(
                    context.metrics, conn.label, "max-sessions-per-client", f"{limit} live sessions"
                )
            await self._refuse_task(conn, entry.role, msg, verdict)
            return
        executor_entry = verdict.executor
        executor = executor_entry.connection
        session_id = verdict.session_id
        task_name = sanitize_task_name(msg.task_name)  # TASK-4, NAME-1
        try:  # TASK-7
            agent = self.agent_factory(executor_entry.platform)
        except UnsupportedPlatform:
            await self._refuse_task(
                conn, entry.role, msg, _rules.unsupported_platform(executor_entry.platform)
            )
            return
        if not executor.is_open:  # TASK-7
            await self._refuse_task(
                conn, entry.role, msg, _rules.not_connected(executor_entry.client_id)
            )
            return

        session = Session(
            manager=self,
            session_id=session_id,
            task_name=task_name,
            request=msg.request or "",
            platform=executor_entry.platform,
            requester=conn,
            requester_id=entry.client_id,
            requester_type=entry.role,
            executor=executor,
            executor_id=executor_entry.client_id,
            agent=agent,
            system_info=executor_entry.system_info,
        )
        # TASK-8: record first, so a teardown that starts while we wait can find the session.
        live[session_id] = session
        conn.requested[session_id] = session
        executor.executing[session_id] = session
        try:
            await executor.nursery.start(session.run)
        except BaseException:
            self._untrack(session)
            raise
        log.info(
            "session %s started: task %s, requester %s, executor %s",
            shown(session_id),
            shown(task_name),
            shown(entry.client_id),
            shown(executor_entry.client_id),
        )

    def _owner_of(self, session_id: str) -> str | None:
        session = self.live.get(session_id)
        return None if session is None else session.requester_id

    async def _refuse_task(
        self, conn: Connection, role: ClientType, msg: ClientMessage, verdict: Reject
    ) -> None:
        """ERROR to the requester, then TASK-9's TASK_END where the rule allows one."""
        requested_sid = msg.session_id or None
        await conn.send_error(
            verdict.error, verdict.code, request_id=msg.request_id, session_id=requested_sid
        )
        live = requested_sid is not None and requested_sid in self.live
        if _rules.task_end_after_reject(verdict, role, requested_sid, live=live):
            try:
                await conn.send(
                    ServerMessage(
                        type=ServerMessageType.TASK_END,
                        status=TaskStatus.FAILED,
                        session_id=requested_sid,
                        error=verdict.error,
                    )
                )
            except ConnectionGone:
                pass

    # -------------------------------------------------------------------------- results

    async def handle_results(self, conn: Connection, msg: ClientMessage) -> None:
        """A COMMAND_RESULTS frame: find its waiter, then `_rules.match_results` (CMD-2…CMD-5)."""
        session = self.live.get(msg.session_id) if msg.session_id else None
        waiter = None
        if session is not None and msg.prev_response_id:
            waiter = session.waiters.get(msg.prev_response_id)
        results = msg.action_results
        match = _rules.match_results(
            session_live=session is not None,
            from_executor=session is not None and session.executor is conn,
            waiter_pending=waiter is not None and not waiter.done.is_set(),
            expected=len(waiter.commands) if waiter is not None else 0,
            results=results,
        )
        if match is Match.DROP:
            return
        assert session is not None
        assert waiter is not None
        if match is Match.RESOLVE:
            assert results is not None
            waiter.resolve(results)
            return
        waiter.resolve(_failures(waiter.commands, INVALID_RESULTS))  # CMD-5
        refusal = _rules.invalid_results(len(waiter.commands))
        await conn.send_error(
            refusal.error,
            refusal.code,
            request_id=msg.request_id,
            session_id=session.session_id,
        )

    # -------------------------------------------------------------------------- endings

    def _untrack(self, session: Session) -> None:
        if self.live.get(session.session_id) is session:
            del self.live[session.session_id]
        if session.requester.requested.get(session.session_id) is session:
            del session.requester.requested[session.session_id]
        if session.executor.executing.get(session.session_id) is session:
            del session.executor.executing[session.session_id]

    async def finish(
        self, session: Session, status: TaskStatus, error: str | None, result: Any
    ) -> None:
        """Record the outcome and send the TASK_END to each recipient still connected (END-1…4).

        Called once per session from its shielded `finally`; bounded by SEND_TIMEOUT.
        """
        self._untrack(session)
        try:
            result = unstructure(result)
            frame = ServerMessage(
                type=ServerMessageType.TASK_END,
                status=status,
                session_id=session.session_id,
                task_name=session.task_name,
                error=error,
                result=result,
            )
            text = encode_server_message(frame)
        except (TypeError, ValueError, RecursionError):
            status, error, result = TaskStatus.FAILED, NOT_SERIALISABLE, None
            text = encode_server_message(
                ServerMessage(
                    type=ServerMessageType.TASK_END,
                    status=status,
                    session_id=session.session_id,
                    task_name=session.task_name,
                    error=error,
                )
            )
        finished_at = wall_now()
        self.results.add(
            SessionRecord(
                session_id=session.session_id,
                task_name=session.task_name,
                status=status,
                error=error,
                result=result,
                finished_at=finished_at,
            )
        )
        context = self.context
        duration = trio.current_time() - session.started
        context.metrics.task_ended(status.value, context.config.effective_agent, duration)
        store = context.store
        if store is not None:  # never dropped; bounded (the queue's full-wait) if it is full
            await store.task_ended(
                session.session_id,
                status.value,
                error,
                result,
                finished_at,
                task_name=session.task_name,
                created_at=session.started_at,
            )
        log.info(
            "session %s ended: %s%s",
            shown(session.session_id),
            status.value,
            f" ({error})" if error and len(error) <= 200 else "",
        )
        recipients = [session.requester]
        if session.for_constellation and session.executor is not session.requester:
            recipients.append(session.executor)
        with self.context.shutdown.bounded(self.context.config.send_timeout):
            for conn in recipients:  # END-3: the requester's copy is written first
                if conn.is_open:
                    try:
                        await conn.send_text(text, ServerMessageType.TASK_END)
                    except ConnectionGone:
                        pass

    async def connection_closing(self, conn: Connection) -> None:
        """DC-2/DC-3: cancel the sessions this connection executes or requested; wait for them."""
        affected = list(conn.executing.values())
        for session in affected:
            session.cancel(DEVICE_GONE)
        for session in list(conn.requested.values()):
            if session.executor is not conn:
                session.cancel(REQUESTER_GONE)
                affected.append(session)
        for session in affected:
            await session.done.wait()

    async def cancel_all(self, reason: str) -> None:
        """SHUT-1: cancel every live session and wait until each has sent its TASK_END."""
        sessions = list(self.live.values())
        for session in sessions:
            session.cancel(reason)
        for session in sessions:
            await session.done.wait()

    def live_task_names(self) -> set[str]:
        return {s.task_name for s in self.live.values()}
