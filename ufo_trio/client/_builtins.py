"""Built-in tools, safe by default, and the system info a device registers with.

* ``echo`` and ``system_info`` are always on and touch nothing.
* ``list_dir`` and ``read_text_file`` work only under a root directory chosen by whoever starts
  the device; without one they fail with a message that says how to enable them. Paths are
  resolved (symlinks included) and must stay inside the root.
* ``run_command`` runs a program without a shell, only if its name is on an allow-list, in the
  root directory (or the current one), with a timeout; the default allow-list is empty.
"""

from __future__ import annotations

import os
import platform as _platform
import shlex
import socket
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ._tools import ToolContext, ToolError, ToolRegistry

if TYPE_CHECKING:
    from collections.abc import Iterable

#: ``read_text_file`` refuses files larger than this by default.
DEFAULT_MAX_READ_BYTES = 1024 * 1024
#: ``run_command`` keeps at most this much of stdout and of stderr.
MAX_OUTPUT_BYTES = 64 * 1024
#: ``run_command``'s default and largest timeout, in seconds.
DEFAULT_COMMAND_TIMEOUT = 60.0
MAX_COMMAND_TIMEOUT = 3600.0
#: How long a timed-out program gets between SIGTERM and SIGKILL.
TERMINATE_GRACE = 2.0
#: ``list_dir`` returns at most this many entries.
MAX_DIR_ENTRIES = 10_000


def local_platform() -> str:
    """The protocol's platform name for this machine: ``linux``, ``windows``, ``macos``..."""
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform in ("win32", "cygwin"):
        return "windows"
    if sys.platform == "darwin":
        return "macos"
    return sys.platform


def collect_system_info(
    client_id: str, platform: str, tools: ToolRegistry | None = None
) -> dict[str, Any]:
    """The ``metadata.system_info`` object a device registers with (REG-3).

    Only cheap, local facts; constellations read it back with ``device_info_request`` (§5).
    """
    info: dict[str, Any] = {
        "device_id": client_id,
        "platform": platform,
        "hostname": socket.gethostname(),
        "os": _platform.system(),
        "os_release": _platform.release(),
        "machine": _platform.machine(),
        "python_version": _platform.python_version(),
        "cpu_count": os.cpu_count(),
        "client": f"ufo_trio.client/{_sdk_version()}",
    }
    if tools is not None:
        info["tools"] = [tool.describe() for tool in tools]
    return info


def _sdk_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ufo_trio")
    except metadata.PackageNotFoundError:
        return "unknown"


def default_tools(
    *,
    root: str | os.PathLike[str] | None = None,
    allow_commands: Iterable[str] = (),
    max_read_bytes: int = DEFAULT_MAX_READ_BYTES,
) -> ToolRegistry:
    """A new registry holding the built-in tools.

    *root* enables ``list_dir``/``read_text_file`` under that directory (it must exist).
    *allow_commands* lists program names ``run_command`` may start (compared with the first
    word of the command line, exactly). Add your own tools to the returned registry.
    Raises `ValueError` if *root* is not a directory.
    """
    registry = ToolRegistry()
    root_path: Path | None = None
    if root is not None:
        root_path = Path(root).resolve()
        if not root_path.is_dir():
            raise ValueError(f"tool root {str(root)!r} is not a directory")
    allowed = frozenset(allow_commands)

    @registry.tool("echo", tool_type="action")
    async def echo(text: str) -> str:
        """Return the text unchanged.

        Args:
            text: The text to return.
        """
        return text

    @registry.tool("system_info", tool_type="data_collection")
    async def system_info(ctx: ToolContext) -> dict[str, Any]:
        """Return the system info this device registered with."""
        return dict(ctx.system_info)

    @registry.tool(
        "list_dir", tool_type="data_collection", description=_rooted("List a directory", root_path)
    )
    def list_dir(path: str = ".") -> list[dict[str, Any]]:
        """List a directory under the device's root.

        Args:
            path: Directory to list, relative to the device's root directory.
        """
        target = _confined(root_path, path, "list_dir")
        if not target.is_dir():
            raise ToolError(f"not a directory: {path!r}")
        entries = []
        for entry in sorted(os.scandir(target), key=lambda e: e.name)[:MAX_DIR_ENTRIES]:
            entries.append(_describe_entry(entry))
        return entries

    @registry.tool(
        "read_text_file",
        tool_type="data_collection",
        description=_rooted(
            f"Read a text file (at most {max_read_bytes} bytes)", root_path
        ),
    )
    def read_text_file(path: str, encoding: str = "utf-8") -> str:
        """Read a text file under the device's root.

        Args:
            path: File to read, relative to the device's root directory.
            encoding: Text encoding of the file.
        """
        target = _confined(root_path, path, "read_text_file")
        if not target.is_file():
            raise ToolError(f"not a file: {path!r}")
        size = target.stat().st_size
        if size > max_read_bytes:
            raise ToolError(f"file is {size} bytes; the limit is {max_read_bytes}")
        try:
            return target.read_text(encoding=encoding)
        except LookupError:
            raise ToolError(f"unknown encoding {encoding!r}") from None
        except UnicodeDecodeError:
            raise ToolError(f"{path!r} is not valid {encoding} text") from None

    @registry.tool("run_command", tool_type="action", description=_command_help(allowed))
    async def run_command(
        command: str | list[str],
        timeout: float = DEFAULT_COMMAND_TIMEOUT,  # noqa: ASYNC109  (a tool parameter)
    ) -> dict[str, Any]:
        """Run an allow-listed program (no shell); non-zero exit status is a failure.

        Args:
            command: The command line (split like a POSIX shell, but no shell runs it) or
                the argument list; the program must be on the device's allow-list.
            timeout: Seconds before the program is stopped.
        """
        if not allowed:
            raise ToolError(
                "run_command is disabled on this device; start it with an allow-list "
                "(--allow-command PROGRAM, or default_tools(allow_commands=[...]))"
            )
        argv = _split(command)
        if argv[0] not in allowed:
            raise ToolError(
                f"command {argv[0]!r} is not allowed on this device "
                f"(allowed: {', '.join(sorted(allowed))})"
            )
        if not 0 < timeout <= MAX_COMMAND_TIMEOUT:
            raise ToolError(f"timeout must be > 0 and <= {MAX_COMMAND_TIMEOUT:g} s")
        return await _run_program(argv, cwd=root_path, limit=timeout)

    return registry


def _rooted(what: str, root: Path | None) -> str:
    if root is None:
        return f"{what} under the device's root directory (disabled on this device: no root)."
    return f"{what} under the device's root directory; paths are relative to that root."


def _command_help(allowed: frozenset[str]) -> str:
    text = (
        "Run a program without a shell and return its exit_code, stdout and stderr; "
        "a non-zero exit status is a failure."
    )
    if not allowed:
        return f"{text} Disabled on this device (no program is allowed)."
    return f"{text} Allowed programs: {', '.join(sorted(allowed))}."


def _split(command: str | list[str]) -> list[str]:
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ToolError(f"cannot parse command line: {exc}") from None
    else:
        argv = list(command)
    if not argv or not argv[0]:
        raise ToolError("empty command")
    return argv


async def _run_program(argv: list[str], *, cwd: Path | None, limit: float) -> dict[str, Any]:
    try:
        with trio.move_on_after(limit) as scope:
            # run_process kills the child if this scope is cancelled, so nothing outlives us.
            done = await trio.run_process(
                argv,
                cwd=cwd,
                check=False,
                capture_stdout=True,
                capture_stderr=True,
                stdin=b"",
                deliver_cancel=_terminate,
            )
    except OSError as exc:
        raise ToolError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
    if scope.cancelled_caught:
        raise ToolError(f"command {argv[0]!r} timed out after {limit:g} s")
    output: dict[str, Any] = {
        "exit_code": done.returncode,
        "stdout": _decode(done.stdout),
        "stderr": _decode(done.stderr),
    }
    if done.returncode != 0:
        tail = output["stderr"].strip().splitlines()[-1:] or [""]
        detail = f": {tail[0][:200]}" if tail[0] else ""
        raise ToolError(f"command exited with status {done.returncode}{detail}", result=output)
    return output


async def _terminate(process: trio.Process) -> None:
    # SIGTERM first so the program may clean up, SIGKILL if it has not exited soon after.
    process.terminate()
    with trio.move_on_after(TERMINATE_GRACE):
        await process.wait()
    process.kill()


def _decode(data: bytes) -> str:
    text = data[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")
    if len(data) > MAX_OUTPUT_BYTES:
        text += f"\n[… {len(data) - MAX_OUTPUT_BYTES} more bytes]"
    return text


def _confined(root: Path | None, path: str, tool: str) -> Path:
    if root is None:
        raise ToolError(
            f"{tool} is disabled on this device; start it with a root directory "
            "(--root DIR, or default_tools(root=...))"
        )
    if "\x00" in path:
        raise ToolError("path contains a NUL character")
    # Resolving follows symlinks, so a link pointing outside the root is refused too.
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise ToolError(f"path {path!r} is outside the device's root directory")
    if not target.exists():
        raise ToolError(f"no such file or directory: {path!r}")
    return target


def _describe_entry(entry: os.DirEntry[str]) -> dict[str, Any]:
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return {"name": entry.name, "type": "unknown", "size": None}
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        kind = "symlink"
    elif stat.S_ISDIR(mode):
        kind = "directory"
    elif stat.S_ISREG(mode):
        kind = "file"
    else:
        kind = "other"
    return {"name": entry.name, "type": kind, "size": info.st_size if kind == "file" else None}
