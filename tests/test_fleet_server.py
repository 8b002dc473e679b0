"""Issue 12 against the real server: `GET /metrics`, the dashboard's files, and their faults.

Real sockets on 127.0.0.1 port 0. What is checked is what a scraper, a browser or an operator
sees: status codes, headers, the exposition text (parsed with prometheus-client's own parser)
counting what really happened on the wire, and the server's tasks and fds after churn.
"""

from __future__ import annotations

import gc
import json
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from agents_for_tests import answer
from prometheus_client.parser import text_string_to_metric_families
from wire_helpers import (
    WireClient,
    close_leftovers,
    fd_count,
    http_request,
    open_http,
    task_count,
    wait_quiescent,
)

from ufo_trio._cli import build_parser, config_from_args
from ufo_trio._dashboard import CONTENT_SECURITY_POLICY
from ufo_trio.testing import open_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from ufo_trio._server import Server

PLAN = json.dumps({"steps": [[{"tool_name": "probe", "tool_type": "action"}]]})


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    close_leftovers()


def families(body: bytes) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(fams: dict[str, Metric], name: str, suffix: str = "", **labels: str) -> float:
    family = fams[name]
    found = [
        s.value for s in family.samples if s.name == name + suffix and s.labels == labels
    ]
    assert len(found) == 1, (name, suffix, labels)
    return found[0]


def live_objects() -> int:
    """Objects the garbage collector tracks, less trio's deadline heap: every write's timeout
    scope stays in it, as a (deadline, id, scope) tuple, until trio prunes it in bulk."""
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if not isinstance(o, trio.CancelScope)
        and not (type(o) is tuple and len(o) == 3 and isinstance(o[2], trio.CancelScope))
    )


async def scrape(server: Server) -> dict[str, Metric]:
    response = await http_request(server.port, "GET", "/metrics")
    assert response.status == 200, response
    return families(response.body)


# ------------------------------------------------------------------------------- /metrics auth


async def test_metrics_needs_the_key_like_every_api_route() -> None:
    async with open_server() as server:
        response = await http_request(server.port, "GET", "/metrics", key=None)
        assert (response.status, response.detail) == (401, "Missing API key")
        assert response.headers["www-authenticate"] == "Bearer"
        response = await http_request(server.port, "GET", "/metrics", key="wrong")
        assert (response.status, response.detail) == (401, "Invalid API key")
        response = await http_request(server.port, "GET", "/metrics")
        assert response.status == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert response.headers["cache-control"] == "no-store"
        fams = families(response.body)
        assert value(fams, "ufo_trio_build_info", version=server_version()) == 1
        assert "ufo_trio_process_open_fds" in fams  # the library's process collector


def server_version() -> str:
    from ufo_trio import __version__

    return __version__


async def test_metrics_public_opens_metrics_alone() -> None:
    async with open_server(metrics_public=True) as server:
        response = await http_request(server.port, "GET", "/metrics", key=None)
        assert response.status == 200
        assert "ufo_trio_connections" in families(response.body)
        # Every other route still needs the key.
        response = await http_request(server.port, "GET", "/api/clients", key=None)
        assert (response.status, response.detail) == (401, "Missing API key")
        # AUTH-5 still applies on a loopback bind.
        response = await http_request(server.port, "GET", "/metrics", key=None, host=b"evil.test")
        assert (response.status, response.detail) == (403, "Invalid Host header")


async def test_no_metrics_serves_no_metrics_route() -> None:
    async with open_server(metrics=False) as server:
        device, verdict = await WireClient.registered(server.port, "dev-1")
        assert verdict["status"] == "ok"
        response = await http_request(server.port, "GET", "/metrics")
        assert (response.status, response.detail) == (404, "Not Found")
        await device.close()


def test_metrics_switches_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()

    def config(*argv: str) -> Any:
        return config_from_args(parser.parse_args(["serve", *argv]), parser)

    assert (config().metrics, config().metrics_public) == (True, False)
    assert (config("--no-metrics").metrics, config("--metrics-public").metrics_public) == (
        False,
        True,
    )
    monkeypatch.setenv("UFO_TRIO_NO_METRICS", "1")
    monkeypatch.setenv("UFO_TRIO_METRICS_PUBLIC", "true")
    assert (config().metrics, config().metrics_public) == (False, True)
    monkeypatch.setenv("UFO_TRIO_NO_METRICS", "no")
    assert config().metrics is True
    monkeypatch.setenv("UFO_TRIO_NO_METRICS", "maybe")
    with pytest.raises(SystemExit) as exc:
        config()
    assert exc.value.code == 2


# --------------------------------------------------------------------- counting what happened


async def test_exposition_counts_a_real_registration_heartbeat_and_task() -> None:
    async with open_server() as server:
        before = await scrape(server)
        assert value(before, "ufo_trio_registrations", "_total", outcome="ok") == 0
        device, verdict = await WireClient.registered(server.port, "dev-1")
        assert verdict["status"] == "ok"
        await device.send({"type": "heartbeat", "status": "ok", "client_id": "dev-1"})
        assert (await device.recv())["type"] == "heartbeat"
        fams = await scrape(server)
        assert value(fams, "ufo_trio_connections", role="device") == 1
        assert value(fams, "ufo_trio_connections", role="unregistered") == 0
        await device.send(
            {"type": "task", "status": "continue", "client_id": "dev-1",
             "session_id": "s-1", "request": PLAN}
        )  # fmt: skip
        frames = await device.recv_until(lambda f: f["type"] == "command")
        command = frames[-1]
        assert value(await scrape(server), "ufo_trio_live_sessions") == 1
        await device.send(answer(command, "dev-1"))
        end = (await device.recv_until(lambda f: f["type"] == "task_end"))[-1]
        assert end["status"] == "completed"
        # Refusals: an unknown frame type (ERROR), a second client refused (duplicate id).
        await device.send("{not json")
        error = await device.recv()
        assert isinstance(error, dict)
        assert (error["type"], error["code"]) == ("error", "invalid_message")
        await device.send({"type": "task_end", "status": "ok", "client_id": "dev-1"})
        error = await device.recv()
        assert isinstance(error, dict)
        assert (error["type"], error["code"]) == ("error", "unknown_type")
        await device.close()
        await wait_quiescent(server)
        fams = await scrape(server)

    total = lambda name, **labels: value(fams, name, "_total", **labels)  # noqa: E731
    assert total("ufo_trio_registrations", outcome="ok") == 1
    assert total("ufo_trio_frames_received", type="register") == 1
    assert total("ufo_trio_frames_received", type="heartbeat") == 1
    assert total("ufo_trio_frames_received", type="task") == 1
    assert total("ufo_trio_frames_received", type="command_results") == 1
    assert total("ufo_trio_frames_received", type="task_end") == 1
    assert total("ufo_trio_frames_received", type="invalid") == 1  # not JSON
    # Sent: confirmation + heartbeat ack + TASK ACK, the COMMAND, the TASK_END, two ERRORs.
    assert total("ufo_trio_frames_sent", type="heartbeat") == 3
    assert total("ufo_trio_frames_sent", type="command") == 1
    assert total("ufo_trio_frames_sent", type="task_end") == 1
    assert total("ufo_trio_frames_sent", type="error") == 2
    assert total("ufo_trio_error_frames", code="unknown_type") == 1
    assert total("ufo_trio_error_frames", code="invalid_message") == 1
    assert total("ufo_trio_tasks_ended", status="completed", agent="script") == 1
    assert total("ufo_trio_commands_sent") == 1
    assert total("ufo_trio_command_timeouts") == 0
    assert value(fams, "ufo_trio_task_duration_seconds", "_count") == 1
    assert value(fams, "ufo_trio_command_round_trip_seconds", "_count") == 1
    assert value(fams, "ufo_trio_heartbeat_handling_seconds", "_count") == 1
    assert total("ufo_trio_disconnects", code="1000") == 1
    assert value(fams, "ufo_trio_connections", role="device") == 0
    assert value(fams, "ufo_trio_live_sessions") == 0
    # The scrape itself is an open HTTP connection.
    assert value(fams, "ufo_trio_http_connections") == 1


async def test_limit_refusals_and_close_codes_are_counted() -> None:
    async with open_server(max_body_size=10, duplicate_policy="reject") as server:
        response = await http_request(
            server.port, "POST", "/api/dispatch", body=b"x" * 100
        )
        assert response.status == 413
        first, _ = await WireClient.registered(server.port, "dev-1")
        second = await WireClient.open(server.port)
        assert isinstance(second, WireClient)
        verdict = await second.register("dev-1")
        assert verdict["code"] == "duplicate_client_id"
        assert (await second.wait_closed()).code == 1008
        first.reset()  # no close frame: 1006
        await wait_quiescent(server)
        fams = await scrape(server)
    total = lambda name, **labels: value(fams, name, "_total", **labels)  # noqa: E731
    assert total("ufo_trio_limit_refusals", limit="max-body-size") == 1
    assert total("ufo_trio_registrations", outcome="duplicate_client_id") == 1
    assert total("ufo_trio_error_frames", code="duplicate_client_id") == 1
    assert total("ufo_trio_disconnects", code="1008") == 1
    assert total("ufo_trio_disconnects", code="1006") == 1


async def test_a_thousand_scrapes_during_heartbeat_load() -> None:
    """No error, every body parses, and the server's memory does not grow with scrapes."""
    async with open_server(message_rate=0) as server:  # heartbeats as fast as they go
        devices = [(await WireClient.registered(server.port, f"hb-{i}"))[0] for i in range(5)]
        beats = 0

        async def beat(device: WireClient, i: int) -> None:
            nonlocal beats
            while True:
                await device.send({"type": "heartbeat", "status": "ok", "client_id": f"hb-{i}"})
                assert (await device.recv())["type"] == "heartbeat"
                beats += 1

        async with trio.open_nursery() as nursery:
            for i, device in enumerate(devices):
                nursery.start_soon(beat, device, i)
            async with open_http(server.port) as http:
                for n in range(1000):
                    response = await http.request("GET", "/metrics")
                    assert response.status == 200
                    if n % 100 == 0:
                        assert families(response.body)
                    if n == 99:
                        baseline = live_objects()
                grown = live_objects() - baseline
            nursery.cancel_scope.cancel()
        assert beats > 1000  # the heartbeats really ran alongside
        # 900 more scrapes keep nothing: the live objects stay put (give or take a few).
        assert grown < 100, grown
        fams = families(response.body)
        assert value(fams, "ufo_trio_frames_received", "_total", type="heartbeat") > 0
        for device in devices:
            await device.close()


# --------------------------------------------------------------------------------- dashboard


async def test_dashboard_files_without_key_with_their_headers() -> None:
    async with open_server() as server:
        for path in ("/", "/dashboard"):
            response = await http_request(server.port, "GET", path, key=None)
            assert response.status == 200
            assert response.headers["content-type"] == "text/html; charset=utf-8"
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["cache-control"] == "no-cache"
            assert b'<script src="/dashboard/dashboard.js"' in response.body
        script = await http_request(server.port, "GET", "/dashboard/dashboard.js", key=None)
        assert script.headers["content-type"] == "text/javascript; charset=utf-8"
        etag = script.headers["etag"]
        again = await http_request(
            server.port, "GET", "/dashboard/dashboard.js", key=None,
            headers=[(b"if-none-match", etag.encode())],
        )  # fmt: skip
        assert (again.status, again.body, again.headers["etag"]) == (304, b"", etag)
        assert "content-length" not in again.headers
        # Not a dashboard path: 404, and the data behind the page still needs the key.
        response = await http_request(server.port, "GET", "/dashboard/other.js", key=None)
        assert response.status == 404
        response = await http_request(server.port, "GET", "/api/sessions", key=None)
        assert response.status == 401


async def test_dashboard_with_hostile_host_on_loopback_is_refused() -> None:
    # AUTH-5: DNS rebinding must not get the page (or anything else) on a loopback bind.
    async with open_server() as server:
        for path in ("/", "/dashboard", "/dashboard/dashboard.js"):
            response = await http_request(
                server.port, "GET", path, key=None, host=b"rebind.attacker.example"
            )
            assert (response.status, response.detail) == (403, "Invalid Host header")


async def test_websocket_upgrade_to_root_stays_404() -> None:
    # EP-1: only /ws upgrades, even though / is now a page.
    async with open_server() as server:
        for target in ("/", "/dashboard"):
            rejected = await WireClient.open(server.port, target=target + "?token=test-key")
            assert not isinstance(rejected, WireClient)
            assert rejected.status == 404


async def test_dashboard_clients_connecting_and_vanishing_leak_nothing() -> None:
    """200 page loads (page, script, style, one poll), half of them cut off mid-way."""
    async with open_server() as server:

        async def visit(n: int) -> None:
            async with open_http(server.port) as http:
                await http.request("GET", "/", key=None)
                if n % 2:
                    # Vanish in the middle of the next request's head.
                    await http.stream.send_all(b"GET /dashboard/dashboard.js HTTP/1.1\r\nHost: 127")
                    return
                await http.request("GET", "/dashboard/dashboard.js", key=None)
                await http.request("GET", "/dashboard/dashboard.css", key=None)
                await http.request("GET", "/api/sessions")

        for n in range(4):  # warm-up
            await visit(n)
        await wait_quiescent(server)
        close_leftovers()
        fds, tasks = fd_count(), task_count()
        limiter = trio.CapacityLimiter(20)

        async def one(n: int) -> None:
            async with limiter:
                await visit(n)

        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(one, n)
        await wait_quiescent(server, within=30)
        assert server.open_streams == 0
        assert task_count() == tasks
        assert fd_count() == fds
        fams = await scrape(server)
        assert value(fams, "ufo_trio_http_connections") == 1  # this scrape only


# ------------------------------------------------------------------------- llm model calls


async def _llm_families(model: Any, request: str, **overrides: Any) -> dict[str, Metric]:
    """One natural-language task through the llm agent (in memory), then a real scrape."""
    from llm_helpers import scene, start_task, task_end
    from wire_helpers import memory_http

    async with scene(model, **overrides) as (mem, _dev, requester):
        await start_task(requester, request)
        await task_end(requester)
        response = await memory_http(mem.server).request("GET", "/metrics")
    assert response.status == 200
    return families(response.body)


async def test_llm_model_calls_are_counted(autojump_clock: trio.testing.MockClock) -> None:
    from ufo_trio.testing import FakeChatModel, FakeReply

    model = FakeChatModel([FakeReply.call("get_system_info", {}), "done"], delay=2)
    fams = await _llm_families(model, "what machine is this?")
    assert value(fams, "ufo_trio_model_calls", "_total", outcome="ok") == 2
    assert value(fams, "ufo_trio_model_calls", "_total", outcome="error") == 0
    assert value(fams, "ufo_trio_model_call_seconds", "_count") == 2
    assert value(fams, "ufo_trio_model_call_seconds", "_sum") == pytest.approx(4)  # virtual time
    # --llm-base-url without --agent runs `auto`: that is the agent label.
    assert value(fams, "ufo_trio_tasks_ended", "_total", status="completed", agent="auto") == 1


async def test_llm_model_timeouts_and_errors_are_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from ufo_trio.testing import FakeChatModel, FakeReply

    fams = await _llm_families(FakeChatModel(["too late"], delay=1000), "hi", llm_timeout=30)
    assert value(fams, "ufo_trio_model_calls", "_total", outcome="timeout") == 1
    assert value(fams, "ufo_trio_model_call_seconds", "_sum") == pytest.approx(30)
    assert value(fams, "ufo_trio_tasks_ended", "_total", status="failed", agent="auto") == 1
    bad_key = FakeChatModel([FakeReply.http(401, {"error": {"message": "bad key"}})])
    fams = await _llm_families(bad_key, "hi")
    assert value(fams, "ufo_trio_model_calls", "_total", outcome="error") == 1
    assert value(fams, "ufo_trio_model_calls", "_total", outcome="ok") == 0
