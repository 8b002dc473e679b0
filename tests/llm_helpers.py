"""Shared pieces of the llm agent tests: a UFO-shaped device that answers `list_tools` with real
descriptors, and a constellation that starts natural-language tasks (raw JSON on the wire)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ufo_trio.testing import FakeChatModel, MemoryServer, RawClient, open_memory_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

BASE_URL = "http://model.invalid/v1"
SYSTEM_INFO = {
    "device_id": "dev-1",
    "platform": "linux",
    "os_version": "Ubuntu 22.04.4 LTS",
    "cpu_count": 4,
    "memory_total_gb": 15.6,
    "hostname": "build-7",
    "ip_address": "10.0.0.7",
    "supported_features": ["cli", "file_system"],
    "platform_type": "computer",
    "schema_version": "1.0",
}


def descriptor(
    tool_name: str,
    properties: dict[str, Any] | None = None,
    required: list[str] | None = None,
    *,
    namespace: str = "BashExecutor",
    description: str = "",
) -> dict[str, Any]:
    """A tool descriptor exactly as a real UFO device answers `list_tools`."""
    return {
        "tool_key": f"action::{tool_name}",
        "tool_name": tool_name,
        "namespace": namespace,
        "tool_type": "action",
        "description": description or f"The {tool_name} tool.",
        "input_schema": {
            "type": "object",
            "properties": properties or {},
            "required": required or [],
            "title": f"{tool_name}Arguments",
        },
        "output_schema": {"type": "object", "properties": {"result": {"type": "string"}}},
    }


EXECUTE_COMMAND = descriptor(
    "execute_command",
    {"command": {"type": "string"}, "timeout": {"type": "integer"}},
    ["command"],
    description="Run a shell command and return stdout, stderr and the exit code.",
)
LINUX_TOOLS = [EXECUTE_COMMAND, descriptor("get_system_info")]

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def shell(action: dict[str, Any]) -> dict[str, Any]:
    """Default tool behaviour: echo the command like BashExecutor would."""
    params = action.get("parameters") or {}
    return {
        "status": "success",
        "error": None,
        "result": {"success": True, "exit_code": 0, "stdout": f"ran {params.get('command')}"},
    }


async def run_device(
    dev: RawClient,
    *,
    tools: Any = None,
    handler: Handler = shell,
    commands: list[dict[str, Any]] | None = None,
    client_id: str = "dev-1",
    task_ends: list[tuple[float, dict[str, Any]]] | None = None,
) -> None:
    """Answer every COMMAND like the real device: `list_tools` with descriptors, else `handler`."""
    tools = LINUX_TOOLS if tools is None else tools
    n = 0
    while True:
        frame = await dev.recv()
        if frame["type"] == "task_end" and task_ends is not None:
            task_ends.append((trio.current_time(), frame))
        if frame["type"] != "command":
            continue
        if commands is not None:
            commands.append(frame)
        results = []
        for action in frame["actions"]:
            if action["tool_name"] == "list_tools":
                out: dict[str, Any] = {"status": "success", "error": None, "result": tools}
            else:
                out = handler(action)
            results.append({"namespace": "BashExecutor", "call_id": action["call_id"], **out})
        n += 1
        await dev.send(
            {
                "type": "command_results",
                "status": "continue",
                "client_type": "device",
                "client_id": client_id,
                "session_id": frame["session_id"],
                "action_results": results,
                "request_id": f"r-{n}",
                "prev_response_id": frame["response_id"],
            }
        )


@asynccontextmanager
async def llm_server(
    model: FakeChatModel, **overrides: Any
) -> AsyncIterator[MemoryServer]:
    settings: dict[str, Any] = {"llm_base_url": BASE_URL, "llm_model": "gpt-test"}
    settings.update(overrides)
    async with open_memory_server(model_transport=model.transport(), **settings) as mem:
        yield mem


async def register(mem: MemoryServer, client_id: str, client_type: str = "device", **fields: Any) -> RawClient:
    client = await mem.connect()
    verdict = await client.register(client_id, client_type, **fields)
    assert verdict["type"] == "heartbeat", verdict
    return client


async def linux_device(mem: MemoryServer, client_id: str = "dev-1") -> RawClient:
    info = {**SYSTEM_INFO, "device_id": client_id}
    return await register(
        mem, client_id, metadata={"platform": "linux", "system_info": info}
    )


async def galaxy(mem: MemoryServer, device_id: str = "dev-1") -> RawClient:
    return await register(mem, f"galaxy@{device_id}", "constellation", target_id=device_id)


async def start_task(
    client: RawClient, request: str, *, session_id: str = "s-1", device_id: str = "dev-1"
) -> None:
    await client.send(
        {
            "type": "task",
            "status": "continue",
            "client_type": "constellation",
            "client_id": f"galaxy@{device_id}",
            "target_id": device_id,
            "session_id": session_id,
            "task_name": "t1",
            "request": request,
        }
    )
    ack = await client.recv()
    assert ack["type"] == "heartbeat", ack
    assert ack["session_id"] == session_id


async def task_end(client: RawClient) -> dict[str, Any]:
    while True:
        frame = await client.recv()
        if frame["type"] == "task_end":
            return frame


@asynccontextmanager
async def scene(
    model: FakeChatModel,
    *,
    tools: Any = None,
    handler: Handler = shell,
    commands: list[dict[str, Any]] | None = None,
    task_ends: list[tuple[float, dict[str, Any]]] | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[MemoryServer, RawClient, RawClient]]:
    """Memory server + answering linux device + constellation scoped to it."""
    async with llm_server(model, **overrides) as mem, trio.open_nursery() as nursery:
        dev = await linux_device(mem)
        nursery.start_soon(
            lambda: run_device(
                dev, tools=tools, handler=handler, commands=commands, task_ends=task_ends
            )
        )
        requester = await galaxy(mem)
        yield mem, dev, requester
        nursery.cancel_scope.cancel()


async def run_task(model: FakeChatModel, request: str = "free disk space in /tmp", **kw: Any) -> dict[str, Any]:
    """One natural-language task end to end; returns the constellation's TASK_END."""
    async with scene(model, **kw) as (_mem, _dev, requester):
        await start_task(requester, request)
        return await task_end(requester)


def tool_messages(request: Any) -> list[dict[str, Any]]:
    return [m for m in request.messages if m["role"] == "tool"]


def dumps(value: Any) -> str:
    return json.dumps(value)
