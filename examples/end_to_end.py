"""The three-terminal walkthrough in one script: server, device and constellation.

It starts ``python -m ufo_trio`` on a free port, then ``examples/minimal_device.py`` against
it, then ``examples/two_step_plan.py``, prints the plan's outcome and stops everything::

    python examples/end_to_end.py

Exit status: the constellation's (0 if the task completed). CI runs this script.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
DEVICE_ID = "example-device"
#: Generous: it covers three Python start-ups on a slow CI machine.
OVERALL_TIMEOUT = 120


async def read_line(process: trio.Process, buffer: bytearray) -> str:
    """The next line the process writes on stdout; `RuntimeError` if it exits first."""
    assert process.stdout is not None
    while b"\n" not in buffer:
        chunk = await process.stdout.receive_some(4096)
        if not chunk:
            raise RuntimeError(f"{process.args!r} exited before printing a line")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode("utf-8", errors="replace")


async def stop(process: trio.Process) -> None:
    """Terminate politely, kill if that takes too long; safe during cancellation."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(5):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def main() -> int:
    env = {**os.environ, "UFO_TRIO_API_KEY": secrets.token_urlsafe(16)}
    python = sys.executable
    with trio.fail_after(OVERALL_TIMEOUT):
        # Terminal 1: the server, on a free port. Its first stdout line names the URL.
        # `--db :memory:` keeps this demo from leaving a task history file behind.
        server = await trio.lowlevel.open_process(
            [python, "-m", "ufo_trio", "--port", "0", "--log-level", "WARNING", "--db", ":memory:"],
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            banner = await read_line(server, bytearray())
            print(f"[server] {banner}", flush=True)
            match = re.search(r"listening on (ws://\S+)", banner)
            if match is None:
                raise RuntimeError(f"unexpected server banner: {banner!r}")
            url = match.group(1)

            # Terminal 2: the device with its custom tool; wait until it has registered.
            device = await trio.lowlevel.open_process(
                [python, str(HERE / "minimal_device.py"), "--url", url, "--id", DEVICE_ID],
                stdout=subprocess.PIPE,
                env=env,
            )
            try:
                print(f"[device] {await read_line(device, bytearray())}", flush=True)

                # Terminal 3: the constellation runs the two-step plan.
                done = await trio.run_process(
                    [python, str(HERE / "two_step_plan.py"), "--url", url,
                     "--target", DEVICE_ID],
                    capture_stdout=True,
                    check=False,
                    env=env,
                )
                for line in done.stdout.decode("utf-8", errors="replace").splitlines():
                    print(f"[constellation] {line}", flush=True)
                return done.returncode
            finally:
                await stop(device)
        finally:
            await stop(server)


if __name__ == "__main__":
    sys.exit(trio.run(main))
