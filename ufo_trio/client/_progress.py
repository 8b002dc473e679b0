"""Progress of running tasks for the ``task`` command: a live status line on a terminal,
plain lines elsewhere.

Task tree (inside the ``task`` command's nursery)::

    task command nursery
    ├── ticker       redraws the status line about once a second (terminal only)
    └── run_one × N  constellation.run_task for one request
        └── poller   after the TASK is acknowledged, GET /api/tasks/{session_id} every second
                     for the steps so far; cancelled when the TASK_END arrives

Polling is best effort: a server without the task API (404), a refused key or a network error
stops that task's polling and the line shows only the elapsed time.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TextIO

import attrs
import trio

from ._errors import ClientError

#: Fetch one task's summary by session id; ``None`` while the server does not know it yet.
Fetch = Callable[[str], Awaitable[Mapping[str, Any] | None]]

#: Seconds between status line redraws and between polls.
INTERVAL = 1.0


def _terminal_width() -> int:
    return shutil.get_terminal_size().columns


@attrs.define(eq=False)
class TaskLine:
    """What the status line knows about one task."""

    label: str
    session_id: str
    acked: trio.Event = attrs.field(factory=trio.Event)
    done: bool = False
    #: COMMAND frames the server has sent so far (from the task API), if known.
    commands: int | None = None
    last_tool: str | None = None


class Progress:
    """Reports tasks on *stream* (normally stderr). *live*: redraw one status line in place
    (a terminal); otherwise write one plain line when a task is acknowledged, nothing else."""

    def __init__(
        self, stream: TextIO, *, live: bool, width: Callable[[], int] = _terminal_width
    ) -> None:
        self._stream = stream
        self._live = live
        self._width = width
        self._started = trio.current_time()
        self._lines: list[TaskLine] = []
        self._drawn = False

    @property
    def live(self) -> bool:
        return self._live

    def add(self, label: str, session_id: str) -> TaskLine:
        line = TaskLine(label=label, session_id=session_id)
        self._lines.append(line)
        return line

    def acknowledged(self, line: TaskLine, task_name: str | None) -> None:
        """The server accepted the TASK (its ACK arrived)."""
        line.acked.set()
        if self._live:
            self.draw()
        else:
            name = f" as {task_name!r}" if task_name else ""
            self._write(
                f"{line.label}: accepted by the server{name} (session {line.session_id}); "
                "waiting for it to end\n"
            )

    def finished(self, line: TaskLine) -> None:
        """The task ended: take it off the status line (and clear the line for the outcome)."""
        line.done = True
        self.clear()

    def clear(self) -> None:
        """Erase the status line so that other output starts on a clean line."""
        if self._live and self._drawn:
            self._write("\r\x1b[K")
            self._drawn = False

    def render(self) -> str:
        """The status line's text (without terminal control characters)."""
        elapsed = int(trio.current_time() - self._started)
        minutes, seconds = divmod(elapsed, 60)
        parts = [f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"]
        for line in self._lines:
            if line.done:
                continue
            if not line.acked.is_set():
                state = "waiting for the server"
            elif line.commands is None:
                state = "running"
            else:
                state = f"{line.commands} step{'' if line.commands == 1 else 's'}"
                if line.last_tool:
                    state += f", last: {line.last_tool}"
            parts.append(f"{line.label}: {state}")
        return " | ".join(parts)

    def draw(self) -> None:
        if not self._live:
            return
        # Never wider than the terminal: a wrapped line cannot be redrawn with a carriage return.
        text = self.render()[: max(self._width() - 1, 10)]
        self._write(f"\r{text}\x1b[K")
        self._drawn = True

    async def tick(self) -> None:
        """Redraw on every whole second since the start, until cancelled."""
        beat = 0
        while True:
            self.draw()
            beat += 1
            await trio.sleep_until(self._started + beat * INTERVAL)

    async def poll(self, line: TaskLine, fetch: Fetch) -> None:
        """Keep *line*'s step count current until cancelled (at the task's end)."""
        await line.acked.wait()
        while True:
            try:
                summary = await fetch(line.session_id)
            except ClientError:
                return  # no task API here: the line shows the elapsed time only
            if summary is not None:
                commands = summary.get("commands")
                if isinstance(commands, int) and not isinstance(commands, bool):
                    line.commands = commands
                last_tool = summary.get("last_tool")
                line.last_tool = last_tool if isinstance(last_tool, str) else None
                self.draw()
            await trio.sleep(INTERVAL)

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()
