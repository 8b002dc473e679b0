"""The constellation client: submit tasks to devices and wait for their TASK_END.

Task tree (inside `open_constellation`'s nursery)::

    open_constellation nursery
    ├── caller's block: run_task / device_info calls wait on their own pending entry
    ├── reader      matches each inbound frame to a pending entry and wakes it
    └── heartbeat   HEARTBEAT every ``heartbeat_interval``

Correlation: a task is keyed by its ``session_id`` (always sent; a fresh uuid4 unless the
caller chose one) and by the TASK's ``request_id``, which a rejecting ERROR echoes as
``response_id`` (WIRE-8). A device-info request is keyed by ``request_id``. When the
connection is lost the reader fails every pending entry with `ConnectionLost` and ends; the
caller's block is not cancelled, its next call raises.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._errors import ConnectionLost, DeviceNotFound, RequestRejected, RequestTimeout
from ._link import Link, check_url, open_link, redact
from ._outcome import TaskOutcome
from ._plan import Plan
from ._util import raise_single_error
from ._wire import (
    ServerFrame,
    device_info_request_frame,
    heartbeat_frame,
    new_id,
    register_frame,
    task_frame,
)

if TYPE_CHECKING:
    import ssl

logger = logging.getLogger("ufo_trio.client")

#: The server's LIM-7: live sessions per requesting connection.
MAX_TASKS_IN_FLIGHT = 64


@attrs.define(eq=False)
class _Pending:
    """One request waiting for its answer; the first answer wins, later ones are ignored."""

    key: str
    request_id: str
    done: trio.Event = attrs.field(factory=trio.Event)
    acked: bool = False
    task_name: str | None = None
    on_ack: Callable[[str | None], None] | None = None
    outcome: TaskOutcome | None = None
    value: Any = None
    error: BaseException | None = None

    def resolve(self, *, outcome: TaskOutcome | None = None, value: Any = None,
                error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.outcome, self.value, self.error = outcome, value, error
        self.done.set()


@attrs.define(eq=False)
class Constellation:
    """The handle `open_constellation` yields."""

    client_id: str
    url: str
    target_id: str | None
    _link: Link
    _tasks: dict[str, _Pending] = attrs.field(factory=dict)
    _requests: dict[str, _Pending] = attrs.field(factory=dict)  # by request_id
    _limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(MAX_TASKS_IN_FLIGHT)
    )
    _lost: ConnectionLost | None = None

    @property
    def connected(self) -> bool:
        """False once the connection has been lost or closed."""
        return self._lost is None and self._link.lost is None

    @property
    def tasks_in_flight(self) -> int:
        return len(self._tasks)

    def _check(self) -> None:
        if not self.connected:
            lost = self._lost or self._link.lost
            raise ConnectionLost(str(lost) if lost else "connection closed")

    async def run_task(
        self,
        target: str,
        request: str | Plan | Mapping[str, Any],
        *,
        task_name: str | None = None,
        session_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  (part of the documented API)
        on_ack: Callable[[str | None], None] | None = None,
    ) -> TaskOutcome:
        """Run a task on device *target* and return how it ended.

        *request* is the TASK text: a `Plan` or a mapping is sent as its JSON (the ``script``
        agent's format, §4.7), a string as it is: a natural-language request for an agent
        such as the server's ``llm`` agent, or JSON you built yourself. *on_ack* is called
        with the server's task name when the server acknowledges the TASK (it runs in the
        connection's reader: it must return quickly and not raise). A TASK the server refuses
        (for example ``unknown_target``) comes back as a ``failed`` outcome with ``code`` set.
        Many calls may run at once (at most 64, the server's per-client limit; more wait their
        turn).

        Raises `ConnectionLost` if the connection ends before the task does, `RequestTimeout`
        after *timeout* seconds (the task may still run on the server: AIP cannot cancel a
        task except by closing the connection), and `ValueError` if *session_id* is already in
        flight on this connection. Cancelling the call has the same caveat as the timeout.
        """
        if not target:
            raise ValueError("target must be a non-empty device id")
        if isinstance(request, Plan):
            text = request.to_json()
        elif isinstance(request, str):
            text = request
        else:
            text = json.dumps(request, separators=(",", ":"), ensure_ascii=False)
        sid = session_id or new_id()
        if sid in self._tasks:
            raise ValueError(f"session_id {sid!r} is already in flight on this connection")
        self._check()
        deadline = trio.current_time() + timeout if timeout is not None else math.inf
        with trio.move_on_at(deadline) as scope:
            async with self._limiter:
                self._check()
                if sid in self._tasks:
                    raise ValueError(f"session_id {sid!r} is already in flight on this connection")
                pending = _Pending(key=sid, request_id=new_id(), on_ack=on_ack)
                self._tasks[sid] = pending
                self._requests[pending.request_id] = pending
                try:
                    await self._link.send(
                        task_frame(
                            self.client_id,
                            "constellation",
                            request=text,
                            session_id=sid,
                            task_name=task_name,
                            target_id=target,
                            request_id=pending.request_id,
                        )
                    )
                    await pending.done.wait()
                finally:
                    del self._tasks[sid]
                    del self._requests[pending.request_id]
        if scope.cancelled_caught:
            raise RequestTimeout(
                f"task {sid} on {target!r} did not end within {timeout:g} s "
                "(it may still be running on the server)"
            )
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        return pending.outcome

    async def device_info(
        self,
        target: str,
        *,
        timeout: float | None = 10.0,  # noqa: ASYNC109  (part of the documented API)
    ) -> dict[str, Any]:
        """The system info device *target* registered with (answered by the server, §5).

        Raises `DeviceNotFound` if no such device (or it sent no system info),
        `RequestRejected` if this client may not ask (DI-1/DI-2), `RequestTimeout` and
        `ConnectionLost`.
        """
        self._check()
        pending = _Pending(key=target, request_id=f"device_info_{new_id()}")
        self._requests[pending.request_id] = pending
        deadline = trio.current_time() + timeout if timeout is not None else math.inf
        try:
            with trio.move_on_at(deadline) as scope:
                await self._link.send(
                    device_info_request_frame(
                        self.client_id, target_id=target, request_id=pending.request_id
                    )
                )
                await pending.done.wait()
        finally:
            del self._requests[pending.request_id]
        if scope.cancelled_caught:
            raise RequestTimeout(f"no device info for {target!r} within {timeout:g} s")
        if pending.error is not None:
            raise pending.error
        value = pending.value
        if isinstance(value, Mapping) and set(value) == {"error"}:
            raise DeviceNotFound(str(value["error"]))
        if not isinstance(value, dict):
            raise DeviceNotFound(f"device {target!r} has no system info")
        return value

    # ----------------------------------------------------------------------------- background

    async def _read(self) -> None:
        try:
            while True:
                self._dispatch(await self._link.receive())
        except ConnectionLost as exc:
            self._lost = exc
            for pending in [*self._tasks.values(), *self._requests.values()]:
                pending.resolve(
                    error=ConnectionLost(
                        f"{exc}; the outcome of pending requests is unknown",
                        code=exc.code,
                        reason=exc.reason,
                    )
                )

    def _dispatch(self, frame: ServerFrame) -> None:
        if frame.type == "task_end":
            pending = self._tasks.get(frame.session_id or "")
            if pending is None:
                logger.debug("task_end for unknown session %s", frame.session_id)
                return
            pending.resolve(
                outcome=TaskOutcome(
                    status=frame.status,
                    session_id=pending.key,
                    task_name=frame.task_name or pending.task_name,
                    result=frame.result,
                    error=frame.error,
                )
            )
        elif frame.type == "heartbeat":
            # A TASK ACK carries the session id (TASK-8); a heartbeat ack carries none.
            pending = self._tasks.get(frame.session_id or "")
            if pending is not None:
                first = not pending.acked
                pending.acked = True
                pending.task_name = frame.task_name
                if first and pending.on_ack is not None:
                    pending.on_ack(frame.task_name)
        elif frame.type == "device_info_response":
            pending = self._requests.get(frame.response_id or "")
            if pending is not None:
                pending.resolve(value=frame.result)
        elif frame.type == "error":
            self._dispatch_error(frame)
        else:
            # Constellations ignore COMMAND and TASK frames (COMPAT-8).
            logger.debug("ignored a %s frame", frame.type)

    def _dispatch_error(self, frame: ServerFrame) -> None:
        pending = self._requests.get(frame.response_id or "")
        if pending is None and frame.session_id:
            pending = self._tasks.get(frame.session_id)
        text = frame.error or "Unknown error"
        if pending is None or pending.acked:
            logger.warning("server error %s: %s", frame.code, text)
            return
        if pending.key in self._tasks and self._tasks[pending.key] is pending:
            # A refused TASK. The fail-fast TASK_END that may follow (TASK-9) finds the entry
            # already resolved and is ignored.
            pending.resolve(
                outcome=TaskOutcome(
                    status="failed",
                    session_id=pending.key,
                    error=text,
                    code=frame.code or "error",
                )
            )
        else:
            pending.resolve(error=RequestRejected(text, frame.code))

    async def _heartbeat(self, interval: float) -> None:
        try:
            while True:
                await trio.sleep(interval)
                await self._link.send(heartbeat_frame(self.client_id, "constellation"))
        except ConnectionLost:
            pass  # the reader reports it


@asynccontextmanager
async def open_constellation(
    url: str,
    client_id: str,
    *,
    target_id: str | None = None,
    api_key: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    heartbeat_interval: float = 30.0,
    connect_timeout: float = 10.0,
    registration_timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Constellation]:
    """Connect to *url* as constellation *client_id* for the duration of the block.

    With *target_id* the connection is scoped to that device: the server then refuses to
    register unless the device is connected (``unknown_target``), and refuses tasks for other
    devices. The connection is not re-established if lost: pending calls raise
    `ConnectionLost`, and so do later ones.

    A ``wss://`` URL is verified with *ssl_context* (default: the system trust store).

    Entering raises `ValueError`, `AuthenticationFailed`, `TLSError`, `ConnectFailed`,
    `RegistrationRefused` or `ConnectionLost`.
    """
    check_url(url)
    if not client_id:
        raise ValueError("client_id must be a non-empty string")
    register = register_frame(
        client_id,
        "constellation",
        target_id=target_id,
        metadata={"type": "constellation_client", **dict(metadata or {})},
    )
    try:
        async with open_link(
            url,
            api_key=api_key,
            register=register,
            client_id=client_id,
            connect_timeout=connect_timeout,
            registration_timeout=registration_timeout,
            ssl_context=ssl_context,
        ) as link:
            constellation = Constellation(
                client_id=client_id, url=redact(url), target_id=target_id, link=link
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(constellation._read)
                if heartbeat_interval > 0:
                    nursery.start_soon(constellation._heartbeat, heartbeat_interval)
                try:
                    yield constellation
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise_single_error(group)
