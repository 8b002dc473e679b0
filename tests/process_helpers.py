"""`python -m ufo_trio …` as a child process of a test: start it, read its first line, and make
sure it is gone when the test ends. Shared by the server CLI and client CLI tests."""

from __future__ import annotations

import subprocess
import sys
from contextlib import asynccontextmanager
from typing import IO, TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from pathlib import Path

#: Generous bound on start-up and exit (a cold interpreter on a busy CI machine).
WAIT = 30.0


async def read_line(stream: trio.abc.ReceiveStream) -> str:
    """The first line of `stream`, without its newline (what came before EOF if none)."""
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().partition("\n")[0]


@asynccontextmanager
async def cli_process(
    *args: str,
    env: Mapping[str, str],
    stderr: int | IO[Any] = subprocess.DEVNULL,
    cwd: Path | None = None,
) -> AsyncIterator[tuple[trio.Process, str]]:
    """Start `python -m ufo_trio ARGS` and read its first line within `WAIT` (CLAR-5: it is
    flushed at once, even to a pipe); on exit kill the process if it is still running."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "ufo_trio", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        cwd=cwd,
    )
    assert process.stdout is not None
    try:
        with trio.fail_after(WAIT):
            line = await read_line(process.stdout)
        yield process, line
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(WAIT, shield=True):
                await process.wait()
        await process.stdout.aclose()
