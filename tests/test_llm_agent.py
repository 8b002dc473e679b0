"""The llm agent (issue 10, docs/agents.md) under MockClock: the loop, every fault of the issue's
"Bad input and faults" list, and cancellation of an in-flight model call (CAN-1, CAN-2, DC-2,
DC-3, SHUT-1).

The model is `FakeChatModel.transport()`: an in-process httpx transport whose delays sleep on the
virtual clock, so every time asserted here is exact. The device answers `list_tools` with the
descriptor shape of a real UFO device; the requester is a raw constellation frame.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from llm_helpers import (
    EXECUTE_COMMAND,
    LINUX_TOOLS,
    descriptor,
    galaxy,
    linux_device,
    llm_server,
    run_device,
    run_task,
    scene,
    start_task,
    task_end,
    tool_messages,
)

from ufo_trio.testing import FakeChatModel, FakeReply, FakeRequest

DEVICE_GONE = "Task was cancelled because target device disconnected"
REQUESTER_GONE = "Task was cancelled because the requesting client disconnected"
SHUTTING_DOWN = "Server shutting down"



def assert_llm_failure(end: dict[str, Any], starts: str) -> None:
    assert end["type"] == "task_end"
    assert end["status"] == "failed"
    assert end["error"].startswith("llm agent: "), end["error"]
    assert end["error"].startswith(starts), end["error"]
    assert "Traceback" not in end["error"]
    assert "\n" not in end["error"]


# ------------------------------------------------------------------------------ the loop


async def test_happy_path_loop_wire_and_result_shape(autojump_clock: trio.testing.MockClock) -> None:
    """First COMMAND is list_tools (exact frame); tools become functions; the system prompt names
    the device; the request is the user message verbatim; a turn's calls are ONE COMMAND in order;
    results go back as tool messages; TASK_END carries answer, steps and usage."""
    model = FakeChatModel(
        [
            FakeReply.calls(
                ("execute_command", {"command": "du -sh /tmp"}),
                ("get_system_info", {}),
            ),
            "Freed 1 GiB in /tmp.",
        ]
    )
    commands: list[dict[str, Any]] = []
    request = "Task Description: free disk space in /tmp\nTips for Completion: be careful"
    end = await run_task(model, request, commands=commands)

    assert end["status"] == "completed", end
    assert end["error"] is None
    first, second = commands
    assert [
        {k: a[k] for k in ("tool_name", "tool_type", "parameters")} for a in first["actions"]
    ] == [{"tool_name": "list_tools", "tool_type": "action", "parameters": {"tool_type": "action"}}]
    assert [(a["tool_name"], a["parameters"]) for a in second["actions"]] == [
        ("execute_command", {"command": "du -sh /tmp"}),
        ("get_system_info", {}),
    ]
    assert second["agent_name"] == "LinuxAgent"

    result = end["result"]
    assert result["answer"] == "Freed 1 GiB in /tmp."
    [step] = result["steps"]
    assert [c["tool_name"] for c in step["tool_calls"]] == ["execute_command", "get_system_info"]
    assert step["results"][0] == {
        "status": "success",
        "error": None,
        "result": {"success": True, "exit_code": 0, "stdout": "ran du -sh /tmp"},
    }
    assert result["usage"]["prompt_tokens"] > 0
    assert result["usage"]["completion_tokens"] > 0
    usage = [json.loads(r.body) for r in model.requests]
    assert len(usage) == 2

    first_request = model.requests[0]
    body = first_request.json
    assert first_request.path == "/v1/chat/completions"
    assert body["model"] == "gpt-test"
    assert body["tool_choice"] == "auto"
    assert body["temperature"] == 0.0
    names = [t["function"]["name"] for t in body["tools"]]
    assert names == ["execute_command", "get_system_info", "task_failed"]
    assert body["tools"][0]["function"]["parameters"] == EXECUTE_COMMAND["input_schema"]
    assert body["tools"][0]["function"]["description"] == EXECUTE_COMMAND["description"]
    system, user = body["messages"]
    assert system["role"] == "system"
    for fact in ("build-7", "Ubuntu 22.04.4 LTS", "linux", "not instructions", "task_failed"):
        assert fact in system["content"]
    assert user == {"role": "user", "content": request}
    assert "authorization" not in first_request.headers  # no key configured

    tools = tool_messages(model.requests[1])
    assert [t["tool_call_id"] for t in tools] == ["call_1_0", "call_1_1"]
    assert json.loads(tools[0]["content"])["result"]["stdout"] == "ran du -sh /tmp"


async def test_function_names_are_made_valid_unique_and_mapped_back(autojump_clock: trio.testing.MockClock) -> None:
    """A tool name the API would refuse, two that collide after cleaning, and one called
    `task_failed` get valid, unique function names; calls go back under the exact tool_name."""
    tools = [
        descriptor("open file.v2"),
        descriptor("open_file_v2"),
        descriptor("task_failed"),
        descriptor("x" * 80),
    ]
    model = FakeChatModel(
        rule=lambda req: (
            FakeReply.calls(*[(t["function"]["name"], {}) for t in req.tools[:-1]])
            if len(model.requests) == 1
            else "ok"
        )
    )
    commands: list[dict[str, Any]] = []
    end = await run_task(model, tools=tools, commands=commands)
    assert end["status"] == "completed", end
    names = [t["function"]["name"] for t in model.requests[0].tools]
    assert names == ["open_file_v2", "open_file_v2_2", "task_failed_2", "x" * 64, "task_failed"]
    assert [a["tool_name"] for a in commands[1]["actions"]] == [
        "open file.v2", "open_file_v2", "task_failed", "x" * 80,
    ]  # fmt: skip


async def test_device_without_tools_fails_clearly(autojump_clock: trio.testing.MockClock) -> None:
    model = FakeChatModel(["never asked"])
    end = await run_task(model, tools=[])
    assert_llm_failure(end, "llm agent: device 'dev-1' advertises no tools")
    assert model.requests == []


async def test_list_tools_failure_fails_clearly(autojump_clock: trio.testing.MockClock) -> None:
    model = FakeChatModel(["never asked"])

    async with llm_server(model) as mem, trio.open_nursery() as nursery:
        dev = await linux_device(mem)

        async def broken_device() -> None:
            frame = await dev.recv()
            await dev.send(
                {
                    "type": "command_results", "status": "continue", "client_type": "device",
                    "client_id": "dev-1", "session_id": frame["session_id"],
                    "prev_response_id": frame["response_id"],
                    "action_results": [{"status": "failure", "error": "no such tool",
                                        "call_id": frame["actions"][0]["call_id"]}],
                }
            )  # fmt: skip

        nursery.start_soon(broken_device)
        requester = await galaxy(mem)
        await start_task(requester, "do it")
        end = await task_end(requester)
    assert_llm_failure(end, "llm agent: device 'dev-1' could not list its tools (list_tools: no such tool)")


async def test_task_failed_builtin_ends_failed_with_steps_so_far(autojump_clock: trio.testing.MockClock) -> None:
    model = FakeChatModel(
        [
            FakeReply.call("execute_command", {"command": "ls"}),
            FakeReply.call("task_failed", {"reason": "the disk is read-only"}),
        ]
    )
    end = await run_task(model)
    assert_llm_failure(end, "llm agent: the disk is read-only")
    assert end["error"] == "llm agent: the disk is read-only"
    assert len(end["result"]["steps"]) == 1
    assert end["result"]["answer"] is None


async def test_step_limit_for_a_model_that_never_stops(autojump_clock: trio.testing.MockClock) -> None:
    model = FakeChatModel(rule=lambda req: FakeReply.call("get_system_info", {}))
    commands: list[dict[str, Any]] = []
    end = await run_task(model, llm_max_steps=3, commands=commands)
    assert_llm_failure(end, "llm agent: step limit (3) reached")
    assert len(end["result"]["steps"]) == 3
    assert len(model.requests) == 4  # 3 steps, then the 4th turn still wants a tool
    assert len(commands) == 1 + 3


# ------------------------------------------------------------------------------ bad model output


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (FakeReply.call("execute_command", "{not json"), "the arguments are not valid JSON"),
        (FakeReply.call("rm_rf", {}), "unknown function 'rm_rf'"),
        (FakeReply.call("execute_command", {"timeout": 5}), "missing required property 'command'"),
        (FakeReply.call("execute_command", {"command": 7}), "arguments.command must be string"),
        (FakeReply.call("execute_command", "[1]"), "the arguments must be a JSON object"),
    ],
    ids=["non-json-arguments", "unknown-function", "missing-required", "wrong-type", "not-object"],
)
async def test_bad_tool_call_goes_back_to_the_model_as_a_tool_error(
    autojump_clock: trio.testing.MockClock, reply: FakeReply, error: str
) -> None:
    model = FakeChatModel([reply, "gave up politely"])
    commands: list[dict[str, Any]] = []
    end = await run_task(model, commands=commands)
    assert end["status"] == "completed", end
    assert end["result"]["answer"] == "gave up politely"
    assert len(commands) == 1  # list_tools only: nothing reached the device
    [message] = tool_messages(model.requests[1])
    content = json.loads(message["content"])
    assert content["status"] == "failure"
    assert content["error"].startswith("llm agent: ")
    assert error in content["error"]
    assert end["result"]["steps"][0]["results"][0]["status"] == "failure"


async def test_at_most_32_calls_per_turn_reach_the_device(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One COMMAND carries at most 32 calls; the rest get a tool error (every call id answered)."""
    calls = [("execute_command", {"command": f"echo {i}"}) for i in range(40)]
    model = FakeChatModel([FakeReply.calls(*calls), "done"])
    commands: list[dict[str, Any]] = []
    end = await run_task(model, commands=commands)
    assert end["status"] == "completed", end
    assert [a["parameters"]["command"] for a in commands[1]["actions"]] == [
        f"echo {i}" for i in range(32)
    ]
    messages = tool_messages(model.requests[1])
    assert len(messages) == 40
    assert "too many function calls in one turn (at most 32)" in messages[39]["content"]


async def test_ten_mib_tool_result_is_cut_for_the_model_and_the_task_end(autojump_clock: trio.testing.MockClock) -> None:
    big = "x" * (10 * 1024 * 1024)

    def handler(action: dict[str, Any]) -> dict[str, Any]:
        return {"status": "success", "error": None, "result": big}

    model = FakeChatModel([FakeReply.call("execute_command", {"command": "cat big"}), "done"])
    end = await run_task(model, handler=handler)
    assert end["status"] == "completed", end
    [message] = tool_messages(model.requests[1])
    content = message["content"]
    full = len(json.dumps({"status": "success", "error": None, "result": big}, separators=(",", ":")))
    assert content.endswith(f"…[cut {full - 16384} bytes]")
    assert len(content.encode()) < 16384 + 40
    recorded = end["result"]["steps"][0]["results"][0]["result"]
    assert recorded.endswith(f"…[cut {len(big) + 2 - 16384} bytes]")
    assert len(json.dumps(end)) < 64 * 1024


async def test_max_output_bytes_is_configurable(autojump_clock: trio.testing.MockClock) -> None:
    model = FakeChatModel([FakeReply.call("execute_command", {"command": "ls"}), "done"])
    end = await run_task(model, llm_max_output_bytes=20)
    assert end["status"] == "completed"
    [message] = tool_messages(model.requests[1])
    assert message["content"].startswith('{"status":"success",')
    assert "…[cut " in message["content"]


async def test_one_mib_request_reaches_the_model_verbatim(autojump_clock: trio.testing.MockClock) -> None:
    request = "Task Description: " + "é" * (512 * 1024)
    model = FakeChatModel(["read it"])
    end = await run_task(model, request)
    assert end["status"] == "completed", end
    assert model.requests[0].messages[1] == {"role": "user", "content": request}


# ------------------------------------------------------------------------------ model server faults


async def test_model_server_down_retries_three_times_then_fails(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    times: list[float] = []

    def rule(req: FakeRequest) -> FakeReply:
        times.append(trio.current_time())
        return FakeReply.disconnect()

    model = FakeChatModel(rule=rule)
    caplog.set_level(logging.WARNING, "ufo_trio")
    end = await run_task(model)
    assert_llm_failure(end, "llm agent: cannot reach the model server at http://model.invalid/v1/chat/completions")
    assert "gave up after 3 retries" in end["error"]
    assert "--llm-base-url" in end["error"]
    assert [t - times[0] for t in times] == pytest.approx([0, 1, 3, 7])  # backoff 1, 2, 4 s
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert [m.split("; retry ")[1] for m in retries] == ["1/3 in 1s", "2/3 in 2s", "3/3 in 4s"]


@pytest.mark.parametrize(
    ("status", "starts", "hint"),
    [
        (401, "llm agent: the model server refused the API key (HTTP 401: bad key)", "UFO_TRIO_LLM_API_KEY"),
        (403, "llm agent: the model server refused the API key (HTTP 403", "UFO_TRIO_LLM_API_KEY"),
        (404, "llm agent: the model server answered 404 for POST http://model.invalid/v1/chat/completions", "--llm-base-url"),
        (400, "llm agent: the model server rejected the request (HTTP 400: bad key)", "HTTP 400"),
    ],
)
async def test_client_errors_fail_at_once(
    autojump_clock: trio.testing.MockClock, status: int, starts: str, hint: str
) -> None:
    model = FakeChatModel([FakeReply.http(status, {"error": {"message": "bad key"}})])
    end = await run_task(model)
    assert_llm_failure(end, starts)
    assert hint in end["error"]
    assert len(model.requests) == 1  # never retried


async def test_429_honours_retry_after_then_succeeds(autojump_clock: trio.testing.MockClock) -> None:
    times: list[float] = []
    replies = iter([FakeReply.http(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}), FakeReply.answer("ok")])

    def rule(req: FakeRequest) -> FakeReply:
        times.append(trio.current_time())
        return next(replies)

    end = await run_task(FakeChatModel(rule=rule))
    assert end["status"] == "completed", end
    assert times[1] - times[0] == pytest.approx(7)


async def test_429_every_time_gives_up_after_three_retries(autojump_clock: trio.testing.MockClock) -> None:
    model = FakeChatModel(rule=lambda req: FakeReply.http(429, "", {"Retry-After": "2"}))
    end = await run_task(model)
    assert_llm_failure(end, "llm agent: the model server is rate limiting (HTTP 429) (gave up after 3 retries)")
    assert len(model.requests) == 4


async def test_500_then_success(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    times: list[float] = []
    replies = iter([FakeReply.http(500, "oops"), FakeReply.answer("fine")])

    def rule(req: FakeRequest) -> FakeReply:
        times.append(trio.current_time())
        return next(replies)

    caplog.set_level(logging.WARNING, "ufo_trio")
    end = await run_task(FakeChatModel(rule=rule))
    assert end["status"] == "completed", end
    assert end["result"]["answer"] == "fine"
    assert times[1] - times[0] == pytest.approx(1)
    assert any("HTTP 500" in r.getMessage() and "retry 1/3" in r.getMessage() for r in caplog.records)


async def test_model_timeout_fails_at_the_exact_instant(autojump_clock: trio.testing.MockClock) -> None:
    model = FakeChatModel(["too late"], delay=1000)
    async with scene(model, llm_timeout=30) as (_mem, _dev, requester):
        await start_task(requester, "hello")
        started = trio.current_time()
        end = await task_end(requester)
        assert trio.current_time() - started == pytest.approx(30, abs=1e-6)
    assert_llm_failure(end, "llm agent: the model did not answer within 30 s")
    assert "--llm-timeout" in end["error"]
    assert model.requests[0].cancelled


@pytest.mark.parametrize(
    ("reply", "starts"),
    [
        (FakeReply.http(200, "<html>hello</html>"), "llm agent: the model server's answer is not JSON"),
        (FakeReply.http(200, {"choices": []}), "llm agent: the model server answered without choices"),
        (FakeReply.http(200, {"choices": [{"message": None}]}), "llm agent: the model server's answer has no message"),
    ],
    ids=["body-not-json", "choices-empty", "no-message"],
)
async def test_malformed_model_answers(
    autojump_clock: trio.testing.MockClock, reply: FakeReply, starts: str
) -> None:
    model = FakeChatModel([reply])
    end = await run_task(model)
    assert_llm_failure(end, starts)


# ------------------------------------------------------------------------------ cancellation


async def test_device_drop_mid_model_call_cancels_it_in_the_same_tick(autojump_clock: trio.testing.MockClock) -> None:
    """DC-2/CAN-1: the model request is in flight (its answer is 1000 s away); the device drops;
    the requester's TASK_END arrives at the very instant of the drop and the request is cancelled."""
    model = FakeChatModel(["never"], delay=1000)
    async with llm_server(model) as mem, trio.open_nursery() as nursery:
        dev = await linux_device(mem)
        device_scope = trio.CancelScope()

        async def device() -> None:
            with device_scope:
                await run_device(dev)

        nursery.start_soon(device)
        requester = await galaxy(mem)
        await start_task(requester, "hello")
        await trio.sleep(5)
        assert len(model.requests) == 1
        assert not model.requests[0].cancelled
        device_scope.cancel()
        dropped_at = trio.current_time()
        await trio.aclose_forcefully(dev.ws._stream)
        end = await task_end(requester)
        assert trio.current_time() == dropped_at
        assert end["error"] == DEVICE_GONE
        assert model.requests[0].cancelled
        assert mem.server.sessions.live == {}


async def test_requester_drop_mid_model_call_cancels_it_in_the_same_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """DC-3/CAN-1: the constellation drops while the model call is in flight; the target device
    gets its TASK_END (END-3) at that very instant and the model request is cancelled."""
    model = FakeChatModel(["never"], delay=1000)
    ends: list[tuple[float, dict[str, Any]]] = []
    async with scene(model, task_ends=ends) as (mem, _dev, requester):
        await start_task(requester, "hello")
        await trio.sleep(5)
        dropped_at = trio.current_time()
        await trio.aclose_forcefully(requester.ws._stream)
        with trio.fail_after(1):
            while not ends:
                await trio.testing.wait_all_tasks_blocked()
        [(at, end)] = ends
        assert at == dropped_at
        assert end["status"] == "failed"
        assert end["error"] == REQUESTER_GONE
        assert model.requests[0].cancelled
        assert mem.server.sessions.live == {}


async def test_shutdown_mid_model_call_cancels_it_in_the_same_tick(autojump_clock: trio.testing.MockClock) -> None:
    model = FakeChatModel(["never"], delay=1000)
    async with scene(model) as (mem, _dev, requester):
        await start_task(requester, "hello")
        await trio.sleep(5)
        asked_at = trio.current_time()
        mem.server.request_shutdown()
        end = await task_end(requester)
        assert trio.current_time() == asked_at
        assert end["error"] == SHUTTING_DOWN
        assert model.requests[0].cancelled


# ------------------------------------------------------------------------------ auto


async def test_auto_runs_plans_with_the_script_agent_and_text_with_the_llm(autojump_clock: trio.testing.MockClock) -> None:
    plan = json.dumps({"steps": [[{"tool_name": "get_system_info", "tool_type": "action"}]]})
    model = FakeChatModel(["text answer"])
    async with scene(model) as (_mem, _dev, requester):
        await start_task(requester, plan, session_id="plan")
        end = await task_end(requester)
        assert end["status"] == "completed"
        assert end["result"][0]["step"] == 0  # the script agent's result shape
        assert model.requests == []
        await start_task(requester, "Task Description: tell me the hostname", session_id="text")
        end = await task_end(requester)
        assert end["status"] == "completed"
        assert end["result"]["answer"] == "text answer"


async def test_agent_llm_runs_even_a_json_plan_through_the_model(autojump_clock: trio.testing.MockClock) -> None:
    plan = json.dumps({"steps": []})
    model = FakeChatModel(["the model saw it"])
    end = await run_task(model, plan, agent="llm")
    assert end["result"]["answer"] == "the model saw it"
    assert model.requests[0].messages[1]["content"] == plan


async def test_linux_tools_are_unchanged_by_default(autojump_clock: trio.testing.MockClock) -> None:
    """No --tool-secret: schemas reach the model exactly as the device sent them."""
    model = FakeChatModel(["ok"])
    await run_task(model)
    assert [t["function"]["parameters"] for t in model.requests[0].tools[:-1]] == [
        t["input_schema"] for t in LINUX_TOOLS
    ]


# ------------------------------------------------------------------------------ Galaxy (item 8)


async def test_galaxy_natural_language_task_runs_under_auto_end_to_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Galaxy, unchanged (COMPAT-3…8, §4.9 frames): registers with its metadata, asks for the
    device profile, heartbeats without a role, and sends `TaskStar.to_request_string()` text. With
    a model configured and no --agent, `auto` runs it through the model; Galaxy's TASK_END on its
    connection is `completed` with the model's answer, and the device gets the same TASK_END."""
    model = FakeChatModel(
        [FakeReply.call("execute_command", {"command": "df -h /tmp"}), "42% of /tmp is used."]
    )
    async with llm_server(model) as mem, trio.open_nursery() as nursery:
        assert mem.server.config.effective_agent == "auto"
        dev = await linux_device(mem, "dev-1")
        device_frames: list[dict[str, Any]] = []
        nursery.start_soon(lambda: run_device(dev, commands=device_frames))
        g = await mem.connect()
        verdict = await g.register(
            "demo@dev-1", "constellation", target_id="dev-1",
            metadata={"type": "constellation_client", "task_name": "demo",
                      "targeted_device_id": "dev-1", "version": "2.0",
                      "capabilities": ["task_distribution", "session_management", "device_coordination"]},
        )  # fmt: skip
        assert (verdict["type"], verdict["status"]) == ("heartbeat", "ok")
        await g.send({"type": "device_info_request", "status": "ok", "client_type": "constellation",
                      "client_id": "demo@dev-1", "target_id": "dev-1",
                      "request_id": "device_info_dev-1_1767225600.123456"})  # fmt: skip
        info = await g.recv()
        assert info["type"] == "device_info_response"
        assert info["result"]["hostname"] == "build-7"
        await g.send({"type": "heartbeat", "status": "ok", "client_type": "device",
                      "client_id": "demo@dev-1", "metadata": {"device_id": "dev-1"}})  # fmt: skip
        assert (await g.recv())["type"] == "heartbeat"
        request = (
            "Task Description: Check how full /tmp is on the build machine\n"
            "Tips for Completion: use df\n"
        )
        await g.send({"type": "task", "status": "continue", "client_type": "constellation",
                      "client_id": "demo@dev-1", "target_id": "dev-1", "session_id": "demo@task-1",
                      "task_name": "galaxy/demo/task-1", "request": request})  # fmt: skip
        ack = await g.recv()
        assert (ack["type"], ack["session_id"]) == ("heartbeat", "demo@task-1")
        end = await task_end(g)
        assert end["status"] == "completed", end
        assert end["session_id"] == "demo@task-1"
        assert end["task_name"] == "galaxy_demo_task-1"
        assert end["result"]["answer"] == "42% of /tmp is used."
        assert model.requests[0].messages[1]["content"] == request
        with trio.fail_after(1):
            while len(device_frames) < 2:
                await trio.testing.wait_all_tasks_blocked()
        assert device_frames[1]["actions"][0]["parameters"] == {"command": "df -h /tmp"}
        nursery.cancel_scope.cancel()
