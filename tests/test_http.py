"""The HTTP API on the WebSocket's port (§6, EP-1, AUTH-4/5, LIM-2/3/4), from the outside.

Requests are framed and parsed with h11 on the client side over real sockets on 127.0.0.1;
the timing cases (slow bodies, idle keep-alive) run on in-memory streams under MockClock.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from blackbox_helpers import KEYS, is_uuid4
from wire_helpers import (
    WireClient,
    close_leftovers,
    http_request,
    memory_http,
    open_http,
    parse_responses,
    raw_http,
)

from ufo_trio._connection import State
from ufo_trio._http import host_allowed, is_loopback_host
from ufo_trio.testing import TEST_KEY, open_memory_server, open_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ufo_trio._server import Server

ONE_STEP = json.dumps({"steps": [[{"tool_name": "probe", "tool_type": "action"}]]})
NO_STEPS = json.dumps({"steps": []})
INVALID_TASK_NAME = (
    "Invalid task_name: must be a non-empty string of characters [A-Za-z0-9._-] "
    "and must not start with '.'"
)
WIRE7 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?\+00:00")


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    close_leftovers()


async def get(server: Server, path: str, **kwargs: Any) -> tuple[int, Any]:
    response = await http_request(server.port, "GET", path, **kwargs)
    return response.status, response.json()


async def dispatch(server: Server, body: Any, **kwargs: Any) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await http_request(server.port, "POST", "/api/dispatch", body=raw, **kwargs)
    return response.status, response.json()


# ----------------------------------------------------------------------------- routes and bodies


async def test_clients_and_health_list_every_registered_id_in_order_http1_http2() -> None:
    async with open_server() as server:
        assert await get(server, "/api/clients") == (200, {"online_clients": []})
        dev, _ = await WireClient.registered(server.port, "dev-1")
        const, _ = await WireClient.registered(
            server.port, "demo@dev-1", "constellation", target_id="dev-1"
        )
        dev2, _ = await WireClient.registered(server.port, "dev 2/@")
        ids = ["dev-1", "demo@dev-1", "dev 2/@"]
        assert await get(server, "/api/clients") == (200, {"online_clients": ids})
        assert await get(server, "/api/health") == (
            200,
            {"status": "healthy", "online_clients": ids},
        )
        await const.close()
        with trio.fail_after(5):
            while (await get(server, "/api/clients"))[1]["online_clients"] != ["dev-1", "dev 2/@"]:
                await trio.sleep(0.01)
        await dev.close()
        await dev2.close()


async def test_responses_are_json_with_length_and_no_store() -> None:
    async with open_server() as server:
        response = await http_request(server.port, "GET", "/api/health")
        assert response.headers["content-type"] == "application/json"
        assert int(response.headers["content-length"]) == len(response.body)
        assert response.headers["cache-control"] == "no-store"


# `/` is the dashboard page (issue 12; tests/test_fleet_server.py).
@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/api", "/api/clients/"])
async def test_unknown_paths_are_404_including_docs(path: str) -> None:
    async with open_server() as server:
        response = await http_request(server.port, "GET", path)
        assert (response.status, response.json()) == (404, {"detail": "Not Found"})


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/api/clients", "GET"),
        ("DELETE", "/api/health", "GET"),
        ("GET", "/api/dispatch", "POST"),
        ("PUT", "/api/task_result/x", "GET"),
        ("OPTIONS", "/api/sessions", "GET"),
    ],
)
async def test_wrong_method_is_405(method: str, path: str, allow: str) -> None:
    async with open_server() as server:
        response = await http_request(server.port, method, path)
        assert (response.status, response.json()) == (405, {"detail": "Method Not Allowed"})
        assert response.headers["allow"] == allow


async def test_head_request_gets_headers_only() -> None:
    async with open_server() as server:
        data = (
            f"HEAD /api/clients HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"X-API-Key: {TEST_KEY}\r\nConnection: close\r\n\r\n"
        ).encode()
        responses, raw = await raw_http(server.port, data, methods=["HEAD"])
        assert [r.status for r in responses] == [405]
        assert raw.endswith(b"\r\n\r\n")  # no body after the head


async def test_plain_get_on_ws_path_is_426_and_upgrade_elsewhere_404_ep1() -> None:
    async with open_server() as server:
        response = await http_request(server.port, "GET", "/ws", key=None)
        assert (response.status, response.json()) == (426, {"detail": "WebSocket upgrade required"})
        rejected = await WireClient.open(server.port, target=f"/other?token={TEST_KEY}")
        assert not isinstance(rejected, WireClient)
        assert rejected.status == 404


# ------------------------------------------------------------------------------- authentication


async def test_api_key_or_bearer_accepted_auth4() -> None:
    async with open_server() as server:
        ok = {"online_clients": []}
        assert await get(server, "/api/clients") == (200, ok)
        bearer = [(b"authorization", b"Bearer " + TEST_KEY.encode())]
        assert await get(server, "/api/clients", key=None, headers=bearer) == (200, ok)
        lower = [(b"authorization", b"bearer " + TEST_KEY.encode())]
        assert await get(server, "/api/clients", key=None, headers=lower) == (200, ok)


@pytest.mark.parametrize(
    ("key", "headers", "detail"),
    [
        (None, [], "Missing API key"),
        (b"", [], "Missing API key"),
        (None, [(b"authorization", b"Basic dGVzdC1rZXk6")], "Missing API key"),
        (b"wrong", [], "Invalid API key"),
        (b"test-k\xc3\xa9y", [], "Invalid API key"),  # non-ASCII (UTF-8) → 401, never 500
        (b"\xff\xfe", [], "Invalid API key"),  # not even UTF-8
        (None, [(b"authorization", b"Bearer wrong")], "Invalid API key"),
        (b"test-key", [(b"authorization", b"Bearer wrong")], "Invalid API key"),
        (b"TEST-KEY", [], "Invalid API key"),
    ],
)
async def test_missing_or_wrong_key_is_401_with_www_authenticate_auth4(
    key: bytes | None, headers: list[tuple[bytes, bytes]], detail: str
) -> None:
    async with open_server() as server:
        response = await http_request(server.port, "GET", "/api/health", key=key, headers=headers)
        assert (response.status, response.json()) == (401, {"detail": detail})
        assert response.headers["www-authenticate"] == "Bearer"


async def test_non_ascii_server_key_compares_on_utf8_bytes_auth2() -> None:
    async with open_server(api_key="clé-ü") as server:
        good = "clé-ü".encode()
        assert (await get(server, "/api/clients", key=good))[0] == 200
        assert (await get(server, "/api/clients", key="clé-ü".encode("latin-1")))[0] == 401


# ------------------------------------------------------------------------------------ Host (AUTH-5)


@pytest.mark.parametrize(
    "host",
    [b"localhost", b"LOCALHOST:1", b"127.0.0.1", b"127.0.0.1:5000", b"[::1]", b"[::1]:80",
     b"localhost:"],
)  # fmt: skip
async def test_loopback_host_names_accepted_auth5(host: bytes) -> None:
    async with open_server() as server:
        assert (await get(server, "/api/clients", host=host))[0] == 200


@pytest.mark.parametrize(
    "host",
    [b"evil.example", b"evil.example:5000", b"127.0.0.2", b"localhost.evil.example",
     b"localhost:80@evil", b"[::1]evil", b"127.0.0.1:\xc2\xb2", b"", b"0.0.0.0", b"::1"],
)  # fmt: skip
async def test_foreign_host_is_403_auth5(host: bytes) -> None:
    async with open_server() as server:
        status, body = await get(server, "/api/clients", host=host)
        assert (status, body) == (403, {"detail": "Invalid Host header"})


async def test_missing_host_http10_is_403_auth5() -> None:
    async with open_server() as server:
        data = f"GET /api/clients HTTP/1.0\r\nX-API-Key: {TEST_KEY}\r\n\r\n".encode()
        responses, _ = await raw_http(server.port, data)
        assert [(r.status, r.json()) for r in responses] == [
            (403, {"detail": "Invalid Host header"})
        ]


def test_host_check_applies_only_to_loopback_binds() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LocalHost"):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com", ""):
        assert not is_loopback_host(host), host
    assert host_allowed([b"localhost:5000"])
    assert not host_allowed([b"localhost", b"localhost"])  # two Host headers: refuse
    assert not host_allowed([])


async def test_steps_run_in_order_host_route_auth_handler() -> None:
    """§6: Host check → route (404/405) → key (401) → handler (422 here)."""
    async with open_server() as server:
        port = server.port
        evil = b"evil.example"
        r = await http_request(port, "GET", "/nope", key=None, host=evil)
        assert (r.status, r.detail) == (403, "Invalid Host header")
        r = await http_request(port, "GET", "/nope", key=None)
        assert (r.status, r.detail) == (404, "Not Found")
        r = await http_request(port, "GET", "/api/dispatch", key=b"wrong")
        assert (r.status, r.detail) == (405, "Method Not Allowed")
        r = await http_request(port, "POST", "/api/dispatch", key=None, body=b"[]")
        assert (r.status, r.detail) == (401, "Missing API key")
        r = await http_request(port, "POST", "/api/dispatch", body=b"[]")
        assert (r.status, r.detail) == (422, "Request body must be a JSON object")


# ----------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"", 422, "Request body must be a JSON object"),
        (b"not json", 422, "Request body must be a JSON object"),
        (b"\xff\xfe\x00", 422, "Request body must be a JSON object"),
        (b"[1, 2]", 422, "Request body must be a JSON object"),
        (b'"text"', 422, "Request body must be a JSON object"),
        (b"null", 422, "Request body must be a JSON object"),
        (b"[" * 100_000, 422, "Request body must be a JSON object"),
        ({}, 400, "Empty task content"),
        ({"request": ""}, 400, "Empty task content"),
        ({"request": 5, "client_id": "dev-1"}, 400, "Empty task content"),
        ({"request": ["x"], "client_id": "dev-1"}, 400, "Empty task content"),
        ({"request": "x"}, 400, "Empty client ID"),
        ({"request": "x", "client_id": ""}, 400, "Empty client ID"),
        ({"request": "x", "client_id": 7}, 400, "Empty client ID"),
        ({"request": "x", "client_id": "dev-1", "task_name": None}, 400, INVALID_TASK_NAME),
        ({"request": "x", "client_id": "dev-1", "task_name": ""}, 400, INVALID_TASK_NAME),
        ({"request": "x", "client_id": "dev-1", "task_name": 3}, 400, INVALID_TASK_NAME),
        ({"request": "x", "client_id": "dev-1", "task_name": "../escape"}, 400, INVALID_TASK_NAME),
        (
            {"request": "x", "client_id": "dev-1", "task_name": "/abs/escape"},
            400,
            INVALID_TASK_NAME,
        ),
        ({"request": "x", "client_id": "dev-1", "task_name": ".hidden"}, 400, INVALID_TASK_NAME),
        ({"request": "x", "client_id": "dev-1", "task_name": "a b"}, 400, INVALID_TASK_NAME),
        ({"request": "x", "client_id": "dev-1", "task_name": "naïve"}, 400, INVALID_TASK_NAME),
        ({"request": "x", "client_id": "dev-1", "task_name": "ok\n"}, 400, INVALID_TASK_NAME),
        # Only after the name is checked does the target's presence matter.
        ({"request": "x", "client_id": "nobody", "task_name": "bad/name"}, 400, INVALID_TASK_NAME),
        ({"request": "x", "client_id": "nobody", "task_name": "t-1"}, 404, "Client not online"),
        ({"request": "x", "client_id": "nobody"}, 404, "Client not online"),
    ],
)
async def test_dispatch_validation_order_and_texts_http3(
    body: Any, status: int, detail: str
) -> None:
    async with open_server() as server:
        dev, _ = await WireClient.registered(server.port, "dev-1")
        assert await dispatch(server, body) == (status, {"detail": detail})
        await dev.close()


async def test_dispatch_queues_the_task_assignment_frame_http3() -> None:
    async with open_server() as server:
        dev, _ = await WireClient.registered(server.port, "dev-1")
        status, body = await dispatch(
            server, {"request": "open notepad", "client_id": "dev-1", "task_name": "t-42"}
        )
        assert status == 200
        assert body["status"] == "dispatched"
        assert (body["task_name"], body["client_id"]) == ("t-42", "dev-1")
        assert is_uuid4(body["session_id"])
        frame = await dev.recv()
        assert isinstance(frame, dict)
        assert tuple(frame) == KEYS
        assert frame["type"] == "task"
        assert frame["status"] == "continue"
        assert frame["user_request"] == "open notepad"
        assert frame["task_name"] == "t-42"
        assert frame["session_id"] == body["session_id"]
        assert is_uuid4(frame["response_id"])
        assert frame["response_id"] != frame["session_id"]
        assert frame["error"] is None
        assert frame["actions"] is None

        # Without task_name the server picks a uuid4; a constellation id is "online" too.
        const, _ = await WireClient.registered(server.port, "c-1", "constellation")
        status, body = await dispatch(server, {"request": "x", "client_id": "c-1"})
        assert status == 200
        assert is_uuid4(body["task_name"])
        frame = await const.recv()
        assert isinstance(frame, dict)
        assert frame["task_name"] == body["task_name"]
        await dev.close()
        await const.close()


async def test_dispatch_failure_to_queue_is_500_http3() -> None:
    """PROC-3: a send to a connection that has begun closing fails at once → 500."""
    async with open_server() as server:
        dev, _ = await WireClient.registered(server.port, "dev-1")
        with trio.fail_after(5):  # REG-7: the entry is added just after the confirmation
            while (entry := server.registry.get("dev-1")) is None:
                await trio.sleep(0.001)
        # The window between "CLOSING" and the registry removal, held open by hand.
        entry.connection.state = State.CLOSING
        try:
            assert await dispatch(server, {"request": "x", "client_id": "dev-1"}) == (
                500,
                {"detail": "Failed to send task to client"},
            )
        finally:
            entry.connection.state = State.REGISTERED
        await dev.close()


async def test_dispatched_task_runs_and_its_result_is_readable_http3_http4() -> None:
    """The device answers the assignment with an ordinary TASK; track it by task_name."""
    async with open_server() as server:
        dev, _ = await WireClient.registered(server.port, "dev-1")
        status, body = await dispatch(
            server, {"request": ONE_STEP, "client_id": "dev-1", "task_name": "job-1"}
        )
        assert status == 200
        assignment = await dev.recv()
        assert isinstance(assignment, dict)
        await dev.send(
            {"type": "task", "status": "continue", "client_id": "dev-1", "session_id": None,
             "task_name": assignment["task_name"], "request": assignment["user_request"]}
        )  # fmt: skip
        ack = await dev.recv()
        assert isinstance(ack, dict)
        assert ack["type"] == "heartbeat"
        assert ack["session_id"] != body["session_id"]  # A is never used again
        command = await dev.recv()
        assert isinstance(command, dict)
        assert command["type"] == "command"
        assert await get(server, "/api/task_result/job-1") == (200, {"status": "pending"})
        result = {
            "status": "success",
            "result": "done",
            "call_id": command["actions"][0]["call_id"],
        }
        await dev.send(
            {"type": "command_results", "status": "continue", "client_id": "dev-1",
             "session_id": command["session_id"], "prev_response_id": command["response_id"],
             "action_results": [result]}
        )  # fmt: skip
        end = await dev.recv()
        assert isinstance(end, dict)
        assert end["type"] == "task_end"
        status, body = await get(server, "/api/task_result/job-1")
        assert status == 200
        assert body["status"] == "done"
        assert body["result"][0]["results"][0]["result"] == "done"
        await dev.close()


# -------------------------------------------------------------------------------- task_result


async def test_task_result_pending_done_failed_and_percent_decoding_http4() -> None:
    async with open_server() as server:
        dev, _ = await WireClient.registered(server.port, "dev-1")

        async def run(task_name: str, request: str) -> dict[str, Any]:
            await dev.send(
                {"type": "task", "status": "continue", "client_id": "dev-1",
                 "task_name": task_name, "request": request}
            )  # fmt: skip
            frames = await dev.recv_until(lambda f: f["type"] in ("task_end", "command"))
            return frames[-1]

        assert await get(server, "/api/task_result/never-seen") == (200, {"status": "pending"})
        end = await run("galaxy/demo/task-1", NO_STEPS)
        assert end["status"] == "completed"
        assert end["task_name"] == "galaxy_demo_task-1"
        done = (200, {"status": "done", "result": []})
        assert await get(server, "/api/task_result/galaxy_demo_task-1") == done
        assert await get(server, "/api/task_result/galaxy%2Fdemo%2Ftask-1") == done
        assert await get(server, "/api/task_result/galaxy%2fdemo%2ftask-1") == done

        end = await run("broken", "not json")
        status, body = await get(server, "/api/task_result/broken")
        assert status == 200
        assert body == {"status": "failed", "error": end["error"], "result": None}
        assert body["error"].startswith("script agent:")

        # A live session with the same name makes the name pending again (latest wins).
        command = await run("broken", ONE_STEP)
        assert command["type"] == "command"
        assert await get(server, "/api/task_result/broken") == (200, {"status": "pending"})
        # The route never blocks, even with an odd segment.
        for segment in ("..", "%2e%2e", "%ff%fe", "%", "%%41", "a%00b"):
            assert (await get(server, f"/api/task_result/{segment}"))[0] == 200, segment
        await dev.close()


async def test_task_result_of_cancelled_session_is_failed_http4() -> None:
    async with open_server() as server:
        dev, _ = await WireClient.registered(server.port, "dev-1")
        await dev.send(
            {"type": "task", "status": "continue", "client_id": "dev-1", "task_name": "doomed",
             "request": ONE_STEP}
        )  # fmt: skip
        await dev.recv_until(lambda f: f["type"] == "command")
        dev.reset()
        with trio.fail_after(5):
            while (await get(server, "/api/task_result/doomed"))[1]["status"] == "pending":
                await trio.sleep(0.01)
        assert await get(server, "/api/task_result/doomed") == (
            200,
            {"status": "failed", "error": "Task was cancelled because target device disconnected",
             "result": None},
        )  # fmt: skip


# ----------------------------------------------------------------------------------- sessions


async def test_sessions_lists_live_sessions_in_start_order_http5() -> None:
    async with open_server() as server:
        assert await get(server, "/api/sessions") == (200, {"sessions": []})
        dev, _ = await WireClient.registered(server.port, "dev-1")
        const, _ = await WireClient.registered(
            server.port, "demo@dev-1", "constellation", target_id="dev-1"
        )
        await dev.send(
            {"type": "task", "status": "continue", "client_id": "dev-1", "session_id": "s-own",
             "task_name": "own task", "request": ONE_STEP}
        )  # fmt: skip
        await dev.recv_until(lambda f: f["type"] == "command")
        await const.send(
            {"type": "task", "status": "continue", "client_type": "constellation",
             "client_id": "demo@dev-1", "target_id": "dev-1", "session_id": "demo@task-1",
             "task_name": "galaxy/demo/task-1", "request": ONE_STEP}
        )  # fmt: skip
        await const.recv()  # ACK
        await dev.recv_until(lambda f: f["type"] == "command")
        status, body = await get(server, "/api/sessions")
        assert status == 200
        sessions = body["sessions"]
        assert [s["session_id"] for s in sessions] == ["s-own", "demo@task-1"]
        for entry in sessions:
            assert set(entry) == {
                "session_id", "task_name", "requester_id", "requester_type", "executor_id",
                "started_at",
            }  # fmt: skip
            assert WIRE7.fullmatch(entry["started_at"]), entry["started_at"]
        assert sessions[0] | {"started_at": ""} == {
            "session_id": "s-own", "task_name": "own_task", "requester_id": "dev-1",
            "requester_type": "device", "executor_id": "dev-1", "started_at": "",
        }  # fmt: skip
        assert sessions[1] | {"started_at": ""} == {
            "session_id": "demo@task-1", "task_name": "galaxy_demo_task-1",
            "requester_id": "demo@dev-1", "requester_type": "constellation",
            "executor_id": "dev-1", "started_at": "",
        }  # fmt: skip
        dev.reset()
        with trio.fail_after(5):
            while (await get(server, "/api/sessions"))[1]["sessions"]:
                await trio.sleep(0.01)
        await const.close()


# --------------------------------------------------------------------------------- keep-alive


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    async with open_server() as server, open_http(server.port) as client:
        for _ in range(3):
            response = await client.request("GET", "/api/health")
            assert response.status == 200
            assert client.reusable
        # Error answers keep the connection too.
        assert (await client.request("GET", "/nope")).status == 404
        assert (await client.request("GET", "/api/clients", key=None)).status == 401
        assert (await client.request("POST", "/api/dispatch", body=b"{}")).status == 400
        # A body the route did not need is discarded, and the connection still works.
        assert (await client.request("POST", "/api/clients", body=b"x" * 5000)).status == 405
        assert (await client.request("GET", "/api/clients")).status == 200
        assert client.reusable
        assert server.open_streams == 1


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with open_server() as server:
        head = f"Host: localhost\r\nX-API-Key: {TEST_KEY}\r\n"
        data = (
            f"GET /api/health HTTP/1.1\r\n{head}\r\n"
            f"POST /api/dispatch HTTP/1.1\r\n{head}Content-Length: 2\r\n\r\n{{}}"
            f"GET /nope HTTP/1.1\r\n{head}\r\n"
            f"GET /api/clients HTTP/1.1\r\n{head}Connection: close\r\n\r\n"
            f"GET /api/clients HTTP/1.1\r\n{head}\r\n"  # after the close: never answered
        ).encode()
        responses, _ = await raw_http(server.port, data, half_close=False)
        assert [r.status for r in responses] == [200, 400, 404, 200]
        assert responses[-1].headers["connection"] == "close"


async def test_connection_close_and_http10_end_the_connection() -> None:
    async with open_server() as server, open_http(server.port) as client:
        response = await client.request("GET", "/api/clients", headers=[(b"connection", b"close")])
        assert response.status == 200
        assert response.headers["connection"] == "close"
        assert await client.server_closed()
    async with open_server() as server:
        data = f"GET /api/clients HTTP/1.0\r\nHost: localhost\r\nX-API-Key: {TEST_KEY}\r\n\r\n"
        responses, _ = await raw_http(server.port, data.encode(), half_close=False)
        assert [r.status for r in responses] == [200]


async def test_expect_100_continue_gets_interim_response() -> None:
    async with open_server() as server:
        dev, _ = await WireClient.registered(server.port, "dev-1")
        body = json.dumps({"request": "x", "client_id": "dev-1"}).encode()
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        with trio.fail_after(5):
            await stream.send_all(
                b"POST /api/dispatch HTTP/1.1\r\nHost: localhost\r\nX-API-Key: test-key\r\n"
                b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
            )
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += await stream.receive_some(1024)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            await stream.send_eof()
            rest = interim.partition(b"\r\n\r\n")[2]
            while chunk := await stream.receive_some(65536):
                rest += chunk
        await stream.aclose()
        [response] = parse_responses(rest, ["POST"])
        assert response.status == 200
        assert response.json()["status"] == "dispatched"
        await dev.close()


# ------------------------------------------------------------------------------------- limits


async def test_body_over_limit_is_413_lim4(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ufo_trio")
    async with open_server() as server:
        port = server.port
        too_big = b"{" + b" " * (1024 * 1024) + b"}"
        # Declared length over the limit: refused before the body is read, then closed.
        async with open_http(port) as client:
            response = await client.request("POST", "/api/dispatch", body=too_big)
            assert (response.status, response.json()) == (413, {"detail": "Request body too large"})
            assert response.headers["connection"] == "close"
        # Chunked, no declared length: refused once the limit is passed.
        head = b"POST /api/dispatch HTTP/1.1\r\nHost: localhost\r\nX-API-Key: test-key\r\n"
        chunk = b"x" * 65536
        data = head + b"Transfer-Encoding: chunked\r\n\r\n"
        data += (b"10000\r\n" + chunk + b"\r\n") * 17 + b"0\r\n\r\n"
        responses, _ = await raw_http(port, data)
        assert [(r.status, r.detail) for r in responses] == [(413, "Request body too large")]
        # Exactly at the limit is fine (and then judged on its content).
        at_limit = b"{" + b" " * (1024 * 1024 - 2) + b"}"
        response = await http_request(port, "POST", "/api/dispatch", body=at_limit)
        assert (response.status, response.detail) == (400, "Empty task content")
    refusals = [r.getMessage() for r in caplog.records if "limit max-body-size" in r.getMessage()]
    assert len(refusals) == 2
    assert all("1048576 bytes" in text and "127.0.0.1:" in text for text in refusals)


async def test_body_limit_is_configurable() -> None:
    async with open_server(max_body_size=10) as server:
        response = await http_request(server.port, "POST", "/api/dispatch", body=b"{" + b" " * 10)
        assert response.status == 413
        response = await http_request(server.port, "POST", "/api/dispatch", body=b"{}")
        assert response.status == 400


async def test_head_over_limit_is_431_on_first_and_later_requests_lim3() -> None:
    async with open_server() as server:
        big = b"X-Pad: " + b"a" * (16 * 1024) + b"\r\n"
        request = b"GET /api/clients HTTP/1.1\r\nHost: localhost\r\nX-API-Key: test-key\r\n"
        responses, _ = await raw_http(server.port, request + big + b"\r\n")
        assert [r.status for r in responses] == [431]
        responses, _ = await raw_http(server.port, request + b"\r\n" + request + big + b"\r\n")
        assert [r.status for r in responses] == [200, 431]
        # Just under the limit passes.
        pad = b"X-Pad: " + b"a" * (16 * 1024 - len(request) - 200) + b"\r\n"
        responses, _ = await raw_http(server.port, request + pad + b"\r\n")
        assert [r.status for r in responses] == [200]


async def test_malformed_requests_get_400_and_close() -> None:
    async with open_server() as server:
        for junk in (
            b"garbage\r\n\r\n",
            b"GET /api/clients HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
            b"GET /api/clients HTTP/1.1\r\nBad Header\r\n\r\n",
        ):
            responses, _ = await raw_http(server.port, junk)
            assert [r.status for r in responses] == [400], junk
        # The second request of a kept-alive connection is broken: 400, then closed.
        data = b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nX-API-Key: test-key\r\n\r\n"
        responses, _ = await raw_http(server.port, data + b"NOT HTTP\r\n\r\n")
        assert [r.status for r in responses] == [200, 400]


async def test_broken_chunked_body_is_400() -> None:
    async with open_server() as server:
        data = (
            b"POST /api/dispatch HTTP/1.1\r\nHost: localhost\r\nX-API-Key: test-key\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        responses, _ = await raw_http(server.port, data, half_close=False)
        assert [r.status for r in responses] == [400]


async def test_log_masks_token_and_never_shows_keys_auth3(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ufo_trio")
    secret = "s3cr3t-" + uuid.uuid4().hex
    async with open_server(api_key=secret) as server:
        await http_request(server.port, "GET", f"/nope?token={secret}&x=1", key=secret)
        await http_request(server.port, "GET", "/api/clients", key="wrong-" + secret)
        await http_request(
            server.port, "GET", "/api/clients", key=None,
            headers=[(b"authorization", b"Bearer " + secret.encode())],
        )  # fmt: skip
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "/nope?token=***&x=1" in text
    assert secret not in text


# ----------------------------------------------------------------- timing (in memory, MockClock)


async def _memory_http(mem: Any) -> trio.testing.MemoryReceiveStream | Any:
    client, server_side = trio.testing.memory_stream_pair()
    mem.server.spawn_connection(server_side)
    return client


async def test_slow_body_and_idle_keep_alive_are_dropped_lim2(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ufo_trio")
    async with open_memory_server(registration_timeout=30.0) as mem:
        # A body that never completes: closed without an answer after the deadline.
        client = await _memory_http(mem)
        await client.send_all(
            b"POST /api/dispatch HTTP/1.1\r\nHost: localhost\r\nX-API-Key: test-key\r\n"
            b"Content-Length: 10\r\n\r\n12345"
        )
        t0 = trio.current_time()
        assert await client.receive_some() == b""
        assert trio.current_time() - t0 == 30.0

        # An idle kept-alive connection: closed 30 s after its last answer.
        client = await _memory_http(mem)
        await client.send_all(
            b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nX-API-Key: test-key\r\n\r\n"
        )
        answer = await client.receive_some()
        assert answer.startswith(b"HTTP/1.1 200 ")
        t0 = trio.current_time()
        assert await client.receive_some() == b""
        assert trio.current_time() - t0 == 30.0
        await trio.testing.wait_all_tasks_blocked()
        assert mem.server.open_streams == 0
    # The slow body is a refusal and logged once; an idle keep-alive ending is not.
    lines = [r.getMessage() for r in caplog.records if " limit " in r.getMessage()]
    assert lines == ["memory: limit registration-timeout reached (30s for the body)"]


async def test_shutdown_ends_idle_keep_alive_connections_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SHUT-2 without waiting out the grace period for HTTP connections that sit idle."""
    async with open_memory_server(shutdown_grace=5.0) as mem:
        client = memory_http(mem.server)
        assert (await client.request("GET", "/api/health")).status == 200
        t0 = trio.current_time()
        mem.server.request_shutdown()
        await mem.server.wait_stopped()
        assert trio.current_time() == t0
        assert await client.server_closed()
