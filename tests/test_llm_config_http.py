"""The llm agent's configuration (flags, env, start-up errors: EP-3), secrets (never in logs,
results, TASK_END, HTTP responses or errors) and the real-HTTP path through `FakeChatModel`
(a loopback Chat Completions server): a cancelled model call closes its connection at once."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
import trio.testing
from llm_helpers import EXECUTE_COMMAND, SYSTEM_INFO, descriptor, run_device
from test_cli import clean_env, one_line, run_to_exit

from ufo_trio import ConfigError, ServerConfig
from ufo_trio._cli import build_parser, config_from_args
from ufo_trio.testing import TEST_KEY, FakeChatModel, FakeReply, connect, open_server

if TYPE_CHECKING:
    from ufo_trio.testing import RawClient

WAIT = 30.0
LLM_KEY = "sk-planted-llm-key-0123456789"
# `"` and `\` are escaped in JSON text: masking must find the secret in that form too.
TOOL_KEY = 'planted-tool-"secret"\\9876543210'


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--agent", "llm"], {}, "agent 'llm' needs --llm-base-url"),
        (["--agent", "auto"], {}, "agent 'auto' needs --llm-base-url"),
        (["--llm-base-url", "http://127.0.0.1:9/v1"], {}, "--llm-model is required"),
        (["--llm-base-url", "ftp://x", "--llm-model", "m"], {}, "http:// or https://"),
        (
            ["--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--tool-secret", "api_key=NOT_SET_ANYWHERE"],
            {},
            "environment variable NOT_SET_ANYWHERE is not set",
        ),
        (
            ["--llm-base-url", "http://127.0.0.1:9/v1", "--llm-model", "m", "--tool-secret", "api_key"],
            {},
            "tool-secret must be PARAM=ENV_VAR",
        ),
        (["--llm-max-steps", "0"], {}, "expected a positive integer"),
        ([], {"UFO_TRIO_LLM_TEMPERATURE": "9"}, "llm-temperature must be between 0 and 2"),
        (["--llm-base-url", "http://[::1", "--llm-model", "m"], {}, "llm-base-url is not a valid URL"),
        (["--llm-base-url", "http://h:99999/v1", "--llm-model", "m"], {}, "llm-base-url has a bad port"),
    ],
    ids=["llm-no-url", "auto-no-url", "no-model", "bad-scheme", "secret-env-unset", "secret-spec", "steps-0", "temperature", "bad-ipv6", "bad-port"],
)
async def test_start_up_errors_exit_2_with_one_line(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = await run_to_exit("--port", "0", *args, env=clean_env(**env))
    assert result.returncode == 2, result
    one_line(result.stderr)
    assert message in result.stderr.decode()
    assert b"listening" not in result.stdout


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1", "llm-base-url is not a valid URL (Invalid IPv6 URL)"),
        ("http://u:pw@h:99999/v1?key=sk-q#f",
         "llm-base-url has a bad port (not a number in 0-65535): 'http://h/v1'"),
        ("http://u:pw@h:port/v1?key=sk-q",
         "llm-base-url has a bad port (not a number in 0-65535): 'http://h/v1'"),
        ("ftp://u:pw@h:21/v1?key=sk-q", "must be an http:// or https:// URL, got 'ftp://h:21/v1'"),
    ],
)
def test_bad_base_url_is_a_config_error_without_user_info_or_query(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ServerConfig(llm_base_url=url, llm_model="m")
    text = str(caught.value)
    assert text.endswith(message)
    assert "pw" not in text
    assert "sk-q" not in text


def parse(argv: list[str]) -> ServerConfig:
    parser = build_parser()
    return config_from_args(parser.parse_args(["serve", *argv]), parser)


def test_defaults_agent_is_script_without_and_auto_with_a_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UFO_TRIO_AGENT", "UFO_TRIO_LLM_BASE_URL", "UFO_TRIO_LLM_API_KEY", "UFO_TRIO_TOOL_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert parse([]).effective_agent == "script"
    config = parse(["--llm-base-url", "http://h/v1", "--llm-model", "m"])
    assert config.effective_agent == "auto"
    assert (config.llm_max_steps, config.llm_timeout, config.llm_temperature) == (20, 120.0, 0.0)
    assert config.llm_max_output_bytes == 16 * 1024
    assert config.llm_api_key is None
    explicit = parse(["--llm-base-url", "http://h/v1", "--llm-model", "m", "--agent", "script"])
    assert explicit.effective_agent == "script"


def test_key_only_from_env_and_tool_secrets_from_flags_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UFO_TRIO_LLM_API_KEY", LLM_KEY)
    monkeypatch.setenv("UFO_TRIO_TOOL_SECRET", "api_key=A, token=B")
    config = parse(["--llm-base-url", "http://h/v1", "--llm-model", "m"])
    assert config.llm_api_key == LLM_KEY
    assert LLM_KEY not in repr(config)
    assert config.tool_secrets == ("api_key=A", "token=B")
    flags = parse(["--llm-base-url", "http://h/v1", "--llm-model", "m",
                   "--tool-secret", "api_key=X", "--tool-secret", "pw=Y"])  # fmt: skip
    assert flags.tool_secrets == ("api_key=X", "pw=Y")
    with pytest.raises(SystemExit):
        parse(["--llm-api-key", "x"])  # there is no such flag: argv is visible to everyone


def test_server_config_checks_llm_settings() -> None:
    with pytest.raises(ConfigError, match="agent 'llm' needs --llm-base-url"):
        ServerConfig(agent="llm")
    with pytest.raises(ConfigError, match="--llm-model is required"):
        ServerConfig(llm_base_url="http://h/v1")
    assert ServerConfig(llm_base_url="http://h/v1", llm_model="m").effective_agent == "auto"


# ------------------------------------------------------------------------------ over real HTTP


async def device_and_galaxy(url: str, stack: Any) -> tuple[RawClient, RawClient]:
    dev = await stack.enter_async_context(connect(url))
    verdict = await dev.register(
        "dev-1", metadata={"platform": "linux", "system_info": SYSTEM_INFO}
    )
    assert verdict["type"] == "heartbeat"
    requester = await stack.enter_async_context(connect(url))
    verdict = await requester.register("galaxy@dev-1", "constellation", target_id="dev-1")
    assert verdict["type"] == "heartbeat"
    return dev, requester


def task(request: str, session_id: str, task_name: str = "t1") -> dict[str, Any]:
    return {
        "type": "task", "status": "continue", "client_type": "constellation",
        "client_id": "galaxy@dev-1", "target_id": "dev-1", "session_id": session_id,
        "task_name": task_name, "request": request,
    }  # fmt: skip


async def end_of(client: RawClient) -> tuple[dict[str, Any], str]:
    while True:
        text = await client.ws.get_message()
        frame = json.loads(text)
        if frame["type"] == "task_end":
            return frame, str(text)


async def test_secrets_never_leak(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A planted LLM key and tool secret: the tool secret reaches only the device (filled into
    every call of a tool that declares it, hidden from the model's schema); the LLM key only the
    model server's Authorization header. Neither appears in logs, TASK_END, the HTTP result API,
    the model's requests (tool secret) or error messages — even when the device and the model
    server echo them back."""
    from contextlib import AsyncExitStack

    monkeypatch.setenv("PLANTED_TOOL_KEY", TOOL_KEY)
    caplog.set_level(logging.DEBUG)
    bash = descriptor(
        "execute_command",
        {"command": {"type": "string"}, "api_key": {"type": "string"}},
        ["command", "api_key"],
    )

    def echo(action: dict[str, Any]) -> dict[str, Any]:
        key = action["parameters"].get("api_key")
        # The result is an object holding the key raw, and as JSON text (escaped).
        result = {"echo": f"key={key}", "json": json.dumps({"key": key}), "n": [1, key]}
        return {"status": "failure", "error": f"api_key {key} refused", "result": result}

    model = FakeChatModel(
        [
            FakeReply.call("execute_command", {"command": "ls"}),
            "done",
            FakeReply.http(401, {"error": {"message": f"Incorrect API key provided: {LLM_KEY}"}}),
        ]
    )
    commands: list[dict[str, Any]] = []
    async with model, open_server(
        llm_base_url=model.base_url, llm_model="m", llm_api_key=LLM_KEY,
        tool_secrets=("api_key=PLANTED_TOOL_KEY",), log_level="DEBUG",
    ) as server, AsyncExitStack() as stack:  # fmt: skip
        dev, requester = await device_and_galaxy(server.url, stack)
        nursery = await stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(lambda: run_device(dev, tools=[bash], handler=echo, commands=commands))
        with trio.fail_after(WAIT):
            await requester.send(task("list files", "s-1"))
            first, first_text = await end_of(requester)
            await requester.send(task("again", "s-2", "t2"))
            second, second_text = await end_of(requester)
        async with httpx.AsyncClient() as http:
            replies = [
                await http.get(
                    f"http://127.0.0.1:{server.port}/api/task_result/{name}",
                    headers={"X-API-Key": TEST_KEY},
                )
                for name in ("t1", "t2")
            ]
        nursery.cancel_scope.cancel()

    assert first["status"] == "completed", first
    assert commands[1]["actions"][0]["parameters"] == {"command": "ls", "api_key": TOOL_KEY}
    schema = model.requests[0].tools[0]["function"]["parameters"]
    assert schema["properties"] == {"command": {"type": "string"}}
    assert schema["required"] == ["command"]
    assert all(r.headers["authorization"] == f"Bearer {LLM_KEY}" for r in model.requests)
    tool_text = model.requests[1].messages[-1]["content"]
    assert "key=***" in tool_text
    assert "api_key *** refused" in tool_text
    # The step record keeps the result's type (an object), masked in every string.
    recorded = first["result"]["steps"][0]["results"][0]
    assert recorded["result"] == {"echo": "key=***", "json": '{"key": "***"}', "n": [1, "***"]}
    assert recorded["error"] == "api_key *** refused"
    assert second["status"] == "failed"
    assert second["error"].startswith("llm agent: the model server refused the API key (HTTP 401")
    assert all(reply.status_code == 200 for reply in replies)
    escaped = [json.dumps(s, ensure_ascii=a)[1:-1] for s in (LLM_KEY, TOOL_KEY) for a in (0, 1)]
    assert json.dumps(TOOL_KEY)[1:-1] != TOOL_KEY
    for secret in (LLM_KEY, TOOL_KEY, *escaped):
        for request in model.requests:
            assert (secret in (LLM_KEY, *escaped[:2])) or secret.encode() not in request.body
        assert secret not in first_text
        assert secret not in second_text
        assert all(secret not in reply.text for reply in replies)
        assert secret not in caplog.text
        assert secret not in repr(server.config)


async def test_real_http_model_call_is_closed_when_the_device_drops() -> None:
    """CAN-1 over a real socket: the fake model holds its answer for 1000 s; the device drops;
    the requester gets its TASK_END and the model server sees the connection closed (no answer
    awaited)."""
    from contextlib import AsyncExitStack

    model = FakeChatModel(["never"], delay=1000)
    async with model, open_server(llm_base_url=model.base_url, llm_model="m") as server:
        async with AsyncExitStack() as stack:
            dev, requester = await device_and_galaxy(server.url, stack)
            nursery = await stack.enter_async_context(trio.open_nursery())
            device_scope = trio.CancelScope()

            async def device() -> None:
                with device_scope:
                    await run_device(dev)

            nursery.start_soon(device)
            with trio.fail_after(WAIT):
                await requester.send(task("hello", "s-1"))
                while not model.requests:
                    await trio.sleep(0.01)
                device_scope.cancel()
                await trio.aclose_forcefully(dev.ws._stream)
                end, _ = await end_of(requester)
                assert end["error"] == "Task was cancelled because target device disconnected"
                while not model.requests[0].cancelled:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


async def test_fake_model_over_http_speaks_chat_completions() -> None:
    """FakeChatModel on its own: the Chat Completions wire format, keep-alive, recording."""
    model = FakeChatModel([FakeReply.call("execute_command", {"command": "ls"}), "bye"])
    async with model, httpx.AsyncClient() as http:
        first = await http.post(f"{model.base_url}/chat/completions", json={"model": "x", "messages": []})
        second = await http.post(f"{model.base_url}/chat/completions", json={"model": "x", "messages": []})
        exhausted = await http.post(f"{model.base_url}/chat/completions", json={})
    body = first.json()
    assert body["object"] == "chat.completion"
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call["type"] == "function"
    assert call["function"] == {"name": "execute_command", "arguments": '{"command": "ls"}'}
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert second.json()["choices"][0]["message"]["content"] == "bye"
    assert exhausted.status_code == 400
    assert "script exhausted after 2 replies" in exhausted.text
    assert len(model.requests) == 3
    assert model.requests[0].json == {"model": "x", "messages": []}
    assert EXECUTE_COMMAND["tool_name"] == "execute_command"


async def test_model_calls_honour_the_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model call goes through the transport httpx picks for the endpoint: with HTTP_PROXY
    set, the request reaches the proxy in absolute form (here FakeChatModel plays the proxy);
    with NO_PROXY covering the host, it goes direct. The body is the usual Chat Completions
    request, the API key is sent as a bearer token, and the reply is parsed."""
    from ufo_trio._llm import EncodedList, LlmSettings, OpenAIChatModel

    proxy = FakeChatModel(["via the proxy"])
    direct = FakeChatModel(["direct"])
    async with proxy, direct:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy.base_url.removesuffix("/v1"))
        settings = LlmSettings(
            base_url="http://model.invalid:8000/v1", model="m-1", api_key=LLM_KEY, temperature=0.5
        )
        messages = EncodedList([{"role": "user", "content": "é"}])
        tools = EncodedList([{"type": "function", "function": {"name": "f", "parameters": {}}}])
        async with OpenAIChatModel(settings) as model:
            reply = await model.complete(messages, tools)
        assert reply.content == "via the proxy"
        [seen] = proxy.requests
        assert seen.path == "http://model.invalid:8000/v1/chat/completions"
        assert seen.headers["authorization"] == f"Bearer {LLM_KEY}"
        assert seen.headers["content-type"] == "application/json"
        assert seen.json == {
            "model": "m-1",
            "messages": [{"role": "user", "content": "é"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "temperature": 0.5,
        }

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        settings = LlmSettings(base_url=direct.base_url, model="m-1")
        async with OpenAIChatModel(settings) as model:
            reply = await model.complete([{"role": "user", "content": "x"}], [])
        assert reply.content == "direct"
        assert direct.requests[0].path == "/v1/chat/completions"
        assert "authorization" not in direct.requests[0].headers
        assert len(proxy.requests) == 1


async def test_fake_model_start_failure_closes_its_listener_at_once(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """FakeChatModel.__aenter__ failing after its listener started: the listener is cancelled
    and the error comes out at once (before, closing the nursery waited for it forever)."""
    listener_done = trio.Event()

    async def serve_tcp(*_args: Any, task_status: Any, **_kwargs: Any) -> None:
        try:
            task_status.started([object()])  # no .socket: __aenter__ fails after the start
            await trio.sleep_forever()
        finally:
            listener_done.set()

    monkeypatch.setattr(trio, "serve_tcp", serve_tcp)
    start = trio.current_time()
    with trio.fail_after(5), pytest.raises(AttributeError):
        async with FakeChatModel(["x"]):
            pass
    assert listener_done.is_set()
    assert trio.current_time() == start


@pytest.mark.parametrize(
    ("base_url", "key", "warned"),
    [
        ("http://10.0.0.5:8000/v1", LLM_KEY, True),
        ("http://models.example/v1?x=1", LLM_KEY, True),
        ("http://127.0.0.1:11434/v1", LLM_KEY, False),
        ("http://localhost:11434/v1", LLM_KEY, False),
        ("https://models.example/v1", LLM_KEY, False),
        ("http://10.0.0.5:8000/v1", None, False),
    ],
)
def test_start_warns_when_the_llm_key_would_travel_in_clear_text(
    base_url: str, key: str | None, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from ufo_trio._llm import build_agent

    caplog.set_level(logging.WARNING, logger="ufo_trio")
    build_agent(ServerConfig(llm_base_url=base_url, llm_model="m", llm_api_key=key))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        shown = base_url.split("?")[0]
        assert warnings == [
            f"the LLM API key is sent in clear text to {shown} (plain http:// to another "
            "host); use an https:// --llm-base-url"
        ]
    else:
        assert warnings == []


async def test_serve_builds_the_agent_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import ufo_trio._server as server_module
    from ufo_trio import serve

    calls: list[ServerConfig] = []
    real = server_module.build_agent

    def counting(config: ServerConfig, **kwargs: Any) -> Any:
        calls.append(config)
        return real(config, **kwargs)

    monkeypatch.setattr(server_module, "build_agent", counting)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(serve, ServerConfig(host="127.0.0.1", port=0, api_key="k"))
        nursery.cancel_scope.cancel()
    assert len(calls) == 1


async def test_model_client_splits_its_connections_into_small_pools() -> None:
    """httpcore's pool does work quadratic in its size on every request (bench llm-concurrent:
    114 s for 500 tasks with one pool of 1000): `--llm-max-connections` becomes pools of
    POOL_SIZE and each call goes to the least busy one, so 70 calls in flight spread evenly."""
    import httpx

    from ufo_trio._llm import POOL_SIZE, LlmSettings, OpenAIChatModel

    release = trio.Event()
    arrived = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal arrived
        arrived += 1
        await release.wait()
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}]})

    settings = LlmSettings(base_url="http://model.invalid/v1", model="m", max_connections=70)
    model = OpenAIChatModel(settings, transport=httpx.MockTransport(handler))
    async with model, trio.open_nursery() as nursery:
        assert POOL_SIZE == 8
        assert len(model._clients) == 9  # 8 × 8 + 6
        for _ in range(70):
            nursery.start_soon(model.complete, [{"role": "user", "content": "x"}], [])
        await trio.testing.wait_all_tasks_blocked()
        assert arrived == 70
        assert sorted(model._busy) == [7, 7, 8, 8, 8, 8, 8, 8, 8]
        release.set()
    assert model._clients == []
