"""PROTOCOL.md §8 on the wire: one test per security case, SEC-1 … SEC-17.

Raw JSON over real sockets on 127.0.0.1 (`WireClient`, wsproto; HTTP through h11), asserting
only what a client sees: frames, close codes, HTTP statuses and bodies, `/api/*` listings.
"No session" is checked the way an outsider can: no ACK, no COMMAND anywhere, nothing in
`/api/sessions`, and a sentinel round trip (`wire_helpers.sentinel`) proving that nothing else
was queued for that client. Timing cases run in memory under MockClock.

Further limits that §8 does not list (connection cap, message rate) are at the end.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from wire_helpers import (
    Closed,
    Rejected,
    WireClient,
    assert_server_frame,
    close_leftovers,
    http_request,
    raw_http,
    sentinel,
)

from ufo_trio.testing import TEST_KEY, connect, open_memory_server, open_server

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from ufo_trio._server import Server

PLAN = json.dumps({"steps": [[{"tool_name": "probe", "tool_type": "action"}]]})
_sentinels = iter(range(10**9))


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    close_leftovers()


async def api(server: Server, path: str) -> Any:
    response = await http_request(server.port, "GET", path)
    assert response.status == 200, (path, response)
    return response.json()


async def online(server: Server) -> list[str]:
    clients: list[str] = (await api(server, "/api/clients"))["online_clients"]
    return clients


async def wait_online(server: Server, expected: list[str]) -> None:
    with trio.fail_after(5):
        while await online(server) != expected:
            await trio.sleep(0.005)


async def live_sessions(server: Server) -> list[dict[str, Any]]:
    sessions: list[dict[str, Any]] = (await api(server, "/api/sessions"))["sessions"]
    return sessions


async def join(
    server: Server, client_id: str, client_type: str = "device", **fields: Any
) -> WireClient:
    client, verdict = await WireClient.registered(server.port, client_id, client_type, **fields)
    assert verdict["type"] == "heartbeat", verdict
    assert verdict["status"] == "ok", verdict
    with trio.fail_after(5):  # REG-7: the entry is added right after the confirmation
        while client_id not in await online(server):
            await trio.sleep(0.001)
    return client


async def nothing_else(client: WireClient, client_type: str = "device") -> None:
    """Nothing is queued for `client` except the answer to a fresh sentinel."""
    frames = await sentinel(client, next(_sentinels), client_type)
    assert len(frames) == 1, frames


async def expect_error(client: WireClient, error: str, code: str) -> dict[str, Any]:
    frame = await client.recv()
    assert isinstance(frame, dict), frame
    assert_server_frame(frame)
    assert (frame["type"], frame["status"]) == ("error", "error")
    assert (frame["error"], frame["code"]) == (error, code)
    return frame


def task(client_id: str, **fields: Any) -> dict[str, Any]:
    return {"type": "task", "status": "continue", "client_type": "device",
            "client_id": client_id, "request": PLAN, **fields}  # fmt: skip


# ---------------------------------------------------------------------------------- SEC-1 … 3


async def test_sec_1_role_spoof_is_refused_without_session() -> None:
    async with open_server() as server:
        attacker = await join(server, "attacker-device")
        victim = await join(server, "victim-device")
        await attacker.send(
            {"type": "task", "status": "ok", "client_type": "constellation",
             "client_id": "attacker-device", "target_id": "victim-device", "request": "x",
             "session_id": "s-spoof"}
        )  # fmt: skip
        await expect_error(
            attacker, "client_type does not match the registered connection", "identity_mismatch"
        )
        await nothing_else(attacker)
        await nothing_else(victim)
        assert await live_sessions(server) == []


async def test_sec_2_identity_spoof_is_refused_for_every_type() -> None:
    async with open_server() as server:
        attacker = await join(server, "attacker-device")
        victim = await join(server, "victim-device")
        await attacker.send(
            {"type": "task", "status": "ok", "client_type": "device",
             "client_id": "victim-device", "request": "x", "session_id": "s-imp"}
        )  # fmt: skip
        text = "client_id does not match the registered connection"
        frame = await expect_error(attacker, text, "identity_mismatch")
        assert frame["session_id"] == "s-imp"  # WIRE-9: the frame passed schema validation
        for kind in ("heartbeat", "task", "command_results", "device_info_request",
                     "device_info_response", "error", "register", "task_end"):  # fmt: skip
            await attacker.send({"type": kind, "status": "ok", "client_id": "victim-device"})
            await expect_error(attacker, text, "identity_mismatch")
        await nothing_else(attacker)
        await nothing_else(victim)
        assert await live_sessions(server) == []


async def test_sec_3_device_cannot_steer_a_peer() -> None:
    async with open_server() as server:
        attacker = await join(server, "attacker-device", metadata={"platform": "linux"})
        victim = await join(server, "victim-device", metadata={"platform": "windows"})
        frame = {"type": "task", "status": "ok", "client_type": "device",
                 "client_id": "attacker-device", "target_id": "victim-device", "request": "x",
                 "session_id": "s-peer"}  # fmt: skip
        await attacker.send(frame)
        await expect_error(
            attacker, "Device clients may not target other devices", "not_authorized"
        )
        await nothing_else(attacker)  # no ACK and no TASK_END (TASK-9 is for constellations)
        await nothing_else(victim)
        assert await live_sessions(server) == []

        # Controls: target omitted, or A's own id → exactly one session each, run on A.
        for sid, target in (("s-peer", None), ("s-peer-own", "attacker-device")):
            control = {**frame, "session_id": sid, "request": PLAN}
            if target is None:
                del control["target_id"]
            else:
                control["target_id"] = target
            await attacker.send(control)
            ack = await attacker.recv()
            assert isinstance(ack, dict)
            assert (ack["type"], ack["session_id"]) == ("heartbeat", sid)
            command = await attacker.recv()
            assert isinstance(command, dict)
            assert (command["type"], command["session_id"]) == ("command", sid)
            assert command["agent_name"] == "LinuxAgent"  # A's platform, not the victim's
            await nothing_else(attacker)
        await nothing_else(victim)
        assert [s["executor_id"] for s in await live_sessions(server)] == ["attacker-device"] * 2


# ---------------------------------------------------------------------------------- SEC-4 … 5


@pytest.mark.parametrize(
    "first",
    [
        {"type": "task", "status": "continue", "client_id": "x", "request": PLAN},
        {"type": "command_results", "status": "continue", "client_id": "x"},
        {"type": "device_info_request", "status": "ok", "client_id": "x"},
        {"type": "heartbeat", "status": "ok", "client_id": "x"},
        {"type": "task_end", "status": "ok", "client_id": "x"},
        {"type": "no-such-type", "status": "ok", "client_id": "x"},
        {"status": "ok", "client_id": "x"},
    ],
)
async def test_sec_4_nothing_before_registration(first: dict[str, Any]) -> None:
    async with open_server() as server:
        client = await WireClient.open(server.port)
        assert isinstance(client, WireClient)
        await client.send({**first, "request_id": "r-1"})
        frame = await expect_error(
            client,
            "Connection is not registered; the first message must be a register message",
            "not_registered",
        )
        assert frame["response_id"] == "r-1"
        assert await client.wait_closed() == Closed(1008, "not_registered")
        assert await online(server) == []
        assert await live_sessions(server) == []


@pytest.mark.parametrize("case", ["reject", "probe-answering", "takeover", "probe-silent"])
async def test_sec_5_duplicate_id(case: str) -> None:
    policy = case.partition("-")[0]
    async with open_server(duplicate_policy=policy, ping_timeout=0.5) as server:
        impostor = {"type": "register", "status": "ok", "client_type": "constellation",
                    "client_id": "shadowed-device"}  # fmt: skip
        if case in ("reject", "probe-answering"):
            # S1 reads in the background (trio-websocket answers pings), so the probe succeeds.
            async with connect(server.url) as s1:
                assert (await s1.register("shadowed-device"))["status"] == "ok"
                await wait_online(server, ["shadowed-device"])
                s2 = await WireClient.open(server.port)
                assert isinstance(s2, WireClient)
                await s2.send(impostor)
                await expect_error(
                    s2,
                    "client_id 'shadowed-device' is already registered; "
                    "duplicate registrations are not allowed",
                    "duplicate_client_id",
                )
                assert await s2.wait_closed() == Closed(1008, "duplicate_client_id")
                entry = server.registry.get("shadowed-device")
                assert entry is not None
                assert entry.role.value == "device"
                # Traffic still reaches S1.
                response = await http_request(
                    server.port, "POST", "/api/dispatch",
                    json_body={"request": "x", "client_id": "shadowed-device"},
                )  # fmt: skip
                assert response.status == 200
                assert (await s1.recv())["type"] == "task"
            # Control: once S1 is gone and cleaned up, the same REGISTER succeeds.
            await wait_online(server, [])
            s3 = await WireClient.open(server.port)
            assert isinstance(s3, WireClient)
            await s3.send(impostor)
            verdict = await s3.recv()
            assert isinstance(verdict, dict)
            assert verdict["status"] == "ok"
            await wait_online(server, ["shadowed-device"])
            return
        # takeover, or probe with S1 silent (WireClient does not read, so no pong).
        s1 = await join(server, "shadowed-device")
        await wait_online(server, ["shadowed-device"])
        await s1.send(task("shadowed-device", session_id="s1-own"))
        s2 = await WireClient.open(server.port)
        assert isinstance(s2, WireClient)
        await s2.send(impostor)
        verdict = await s2.recv()
        assert isinstance(verdict, dict)
        assert (verdict["type"], verdict["status"]) == ("heartbeat", "ok")
        # S1's cleanup ran to completion first: its session is over, S1 got 4001.
        assert await live_sessions(server) == []
        entry = server.registry.get("shadowed-device")
        assert entry is not None
        assert entry.role.value == "constellation"
        closed = await s1.wait_closed()
        assert closed.code in (4001, None)  # the close frame is best effort to a dead peer
        if closed.code is not None:
            assert closed.reason == "session taken over"
        await s1.close()


# ---------------------------------------------------------------------------------- SEC-6 … 7


async def test_sec_6_replies_go_only_to_the_sender() -> None:
    async with open_server() as server:
        device = await join(
            server, "device-1", metadata={"system_info": {"hostname": "victim-host"}}
        )
        const = await join(server, "constellation-1", "constellation", target_id="device-1")
        observer = await join(server, "observer-1")
        await const.send(
            {"type": "device_info_request", "status": "ok", "client_type": "constellation",
             "client_id": "constellation-1", "target_id": "device-1", "request_id": "req-123"}
        )  # fmt: skip
        frame = await const.recv()
        assert isinstance(frame, dict)
        assert (frame["type"], frame["response_id"]) == ("device_info_response", "req-123")
        assert frame["result"] == {"hostname": "victim-host"}
        await nothing_else(device)
        await nothing_else(observer)

        await device.send(task("device-1", session_id="sess-1"))
        ack = await device.recv()
        assert isinstance(ack, dict)
        assert (ack["type"], ack["session_id"]) == ("heartbeat", "sess-1")
        assert [s["session_id"] for s in await live_sessions(server)] == ["sess-1"]
        await nothing_else(const, "constellation")
        await nothing_else(observer)


async def test_sec_7_device_info_is_scoped() -> None:
    async with open_server() as server:
        secret = {"hostname": "victim-host", "token": uuid.uuid4().hex}
        victim = await join(server, "device-1", metadata={"system_info": secret})
        await join(server, "device-2", metadata={"system_info": {"hostname": "other"}})
        # (a) a device asks about another device.
        attacker = await join(server, "attacker-device")
        await attacker.send(
            {"type": "device_info_request", "status": "ok", "client_id": "attacker-device",
             "target_id": "device-1", "request_id": "r-a"}
        )  # fmt: skip
        frames = await sentinel(attacker, next(_sentinels))
        assert (
            frames[0]["error"] == "DEVICE_INFO_REQUEST is permitted only for constellation clients"
        )
        assert frames[0]["response_id"] == "r-a"
        assert all(secret["token"] not in json.dumps(f) for f in frames)
        # (b) a constellation scoped to device-1 asks about device-2.
        const = await join(server, "c-1", "constellation", target_id="device-1")
        await const.send(
            {"type": "device_info_request", "status": "ok", "client_type": "constellation",
             "client_id": "c-1", "target_id": "device-2", "request_id": "r-b"}
        )  # fmt: skip
        frame = await expect_error(
            const, "Not authorized to request device info for this device", "not_authorized"
        )
        assert frame["result"] is None
        # (c) the same constellation asks about device-1: the exact stored system info.
        await const.send(
            {"type": "device_info_request", "status": "ok", "client_type": "constellation",
             "client_id": "c-1", "target_id": "device-1", "request_id": "r-c"}
        )  # fmt: skip
        frame = await const.recv()
        assert isinstance(frame, dict)
        assert (frame["type"], frame["result"], frame["response_id"]) == (
            "device_info_response", secret, "r-c",
        )  # fmt: skip
        await nothing_else(victim)


# ---------------------------------------------------------------------------------- SEC-8 … 10


async def test_sec_8_session_id_reuse_and_replay() -> None:
    async with open_server() as server:
        victim = await join(server, "victim-device")
        attacker = await join(server, "attacker-device")
        await victim.send(task("victim-device", session_id="demo@task_001", task_name="t"))
        ack = await victim.recv()
        assert isinstance(ack, dict)
        assert ack["session_id"] == "demo@task_001"
        command = await victim.recv()
        assert isinstance(command, dict)
        assert command["type"] == "command"

        replay = {"type": "task", "status": "continue", "client_type": "device",
                  "client_id": "attacker-device", "request": "replay",
                  "session_id": "demo@task_001", "task_name": "t"}  # fmt: skip
        await attacker.send(replay)
        await expect_error(
            attacker, "session_id 'demo@task_001' is owned by another client", "session_owned"
        )
        await nothing_else(attacker)  # no ACK, no TASK_END of any kind
        await nothing_else(victim)  # not run again, not disturbed
        [live] = await live_sessions(server)
        assert (live["session_id"], live["requester_id"]) == ("demo@task_001", "victim-device")

        await victim.send(task("victim-device", session_id="demo@task_001", task_name="t"))
        await expect_error(
            victim, "session_id 'demo@task_001' is already running", "session_running"
        )
        await nothing_else(victim)

        # The session ends; then the id is free for anyone (SESS-3).
        await victim.send(
            {"type": "command_results", "status": "continue", "client_id": "victim-device",
             "session_id": "demo@task_001", "prev_response_id": command["response_id"],
             "action_results": [{"status": "success", "result": "ok"}]}
        )  # fmt: skip
        end = await victim.recv()
        assert isinstance(end, dict)
        assert (end["type"], end["status"]) == ("task_end", "completed")
        await attacker.send({**replay, "request": PLAN})
        ack = await attacker.recv()
        assert isinstance(ack, dict)
        assert (ack["type"], ack["session_id"]) == ("heartbeat", "demo@task_001")


async def test_sec_9_result_injection_and_squatting() -> None:
    async with open_server() as server:
        attacker = await join(server, "attacker-device")
        # (a) results for sessions that do not exist: dropped silently, nothing created.
        for n in range(50):
            await attacker.send(
                {"type": "command_results", "status": "continue", "client_type": "device",
                 "client_id": "attacker-device", "session_id": f"demo@task_{n:03}",
                 "prev_response_id": "resp-1", "action_results": []}
            )  # fmt: skip
        await nothing_else(attacker)
        assert await live_sessions(server) == []
        assert len(server.sessions.results) == 0
        owner = await join(server, "device-A")
        await owner.send(task("device-A", session_id="demo@task_001"))
        ack = await owner.recv()
        assert isinstance(ack, dict)
        assert ack["session_id"] == "demo@task_001"
        command = await owner.recv()
        assert isinstance(command, dict)

        # (b) another device answers with the right prev_response_id: dropped, still pending.
        device_b = await join(server, "device-B")
        forged = {"type": "command_results", "status": "continue", "client_id": "device-B",
                  "session_id": "demo@task_001", "prev_response_id": command["response_id"],
                  "action_results": [{"status": "success", "result": "forged"}]}  # fmt: skip
        await device_b.send(forged)
        await nothing_else(device_b)
        await nothing_else(owner)
        assert [s["session_id"] for s in await live_sessions(server)] == ["demo@task_001"]

        # (c) the executor sends a list of the wrong length: ERROR, and the agent gets failures.
        await owner.send(
            {**forged, "client_id": "device-A",
             "action_results": [{"status": "success"}, {"status": "success"}]}
        )  # fmt: skip
        frame = await expect_error(
            owner, "Invalid command results: expected a list of 1 results", "invalid_results"
        )
        assert frame["session_id"] == "demo@task_001"
        end = await owner.recv()
        assert isinstance(end, dict)
        assert (end["type"], end["status"]) == ("task_end", "failed")
        assert end["error"] == "step 0 failed: invalid command results from executor"
        assert "forged" not in json.dumps(end)


async def test_sec_10_task_name_traversal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.chdir(root)
    async with open_server() as server:
        device = await join(server, "dev-1")
        await device.send(task("dev-1", task_name="../escape", request=json.dumps({"steps": []})))
        ack = await device.recv()
        assert isinstance(ack, dict)
        assert ack["task_name"] == "_escape"
        end = await device.recv()
        assert isinstance(end, dict)
        assert (end["type"], end["task_name"]) == ("task_end", "_escape")
        for name in ("../escape", "/abs/escape"):
            response = await http_request(
                server.port, "POST", "/api/dispatch",
                json_body={"request": "x", "client_id": "dev-1", "task_name": name},
            )  # fmt: skip
            assert response.status == 400
            assert response.detail.startswith("Invalid task_name")
    assert os.listdir(tmp_path) == ["root"]
    assert os.listdir(root) == []


# ---------------------------------------------------------------------------------- SEC-11 … 13


async def test_sec_11_authentication(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = "k-" + uuid.uuid4().hex
    async with open_server(api_key=key) as server:
        port = server.port
        refused: list[Any] = [
            await WireClient.open(port, token=None),
            await WireClient.open(port, token="wrong"),
            await WireClient.open(port, token="clé-é"),
            await WireClient.open(port, target="/ws?token=%FF%FE"),
            await WireClient.open(port, target=f"/ws?token={key}&token={key}"),
            await WireClient.open(port, token=None, headers=[(b"authorization", b"Bearer wrong")]),
        ]
        for result in refused:
            assert isinstance(result, Rejected), result
            assert result.status == 403
        bearer = await WireClient.open(
            port, token=None, headers=[(b"authorization", b"Bearer " + key.encode())]
        )
        assert isinstance(bearer, WireClient)
        await bearer.close()
        for api_key in (None, b"wrong", "clé".encode(), b"\xff"):
            response = await http_request(port, "GET", "/api/clients", key=api_key)
            assert response.status == 401
            assert response.detail in ("Missing API key", "Invalid API key")
        assert (await http_request(port, "GET", "/api/clients", key=key)).status == 200
        good = await WireClient.open(port, token=key)
        assert isinstance(good, WireClient)
        await good.close()
    logged = "\n".join(f"{r.getMessage()} {r.args}" for r in caplog.records)
    assert "token=***" in logged
    assert key not in logged


async def test_sec_12_origin_and_host_checks() -> None:
    async with open_server(allowed_origins=("https://ok.example",)) as server:
        evil = await WireClient.open(server.port, headers=[(b"origin", b"https://evil.example")])
        assert isinstance(evil, Rejected)
        assert evil.status == 403
        null = await WireClient.open(server.port, headers=[(b"origin", b"null")])
        assert isinstance(null, Rejected)
        assert null.status == 403
        allowed = await WireClient.open(server.port, headers=[(b"origin", b"HTTPS://OK.example")])
        assert isinstance(allowed, WireClient)
        await allowed.close()
        response = await http_request(server.port, "GET", "/api/clients", host=b"evil.example:5000")
        assert (response.status, response.detail) == (403, "Invalid Host header")


async def test_sec_13_oversize_and_binary_frames() -> None:
    async with open_server(max_message_size=1024) as server:
        # Over the limit in 64 small fragments: 1009, and the id is cleaned up.
        big = await join(server, "big-1")
        await wait_online(server, ["big-1"])
        text = json.dumps({"type": "heartbeat", "status": "ok", "pad": "x" * 2000})
        await big.send_fragments(text, 64)
        assert (await big.wait_closed()).code == 1009
        await wait_online(server, [])
        # Binary before REGISTER.
        early = await WireClient.open(server.port)
        assert isinstance(early, WireClient)
        await early.send(b'{"type":"register","status":"ok","client_id":"bin-0"}')
        await expect_error(early, "Binary frames are not supported", "binary_not_supported")
        assert (await early.wait_closed()).code == 1003
        # Binary after REGISTER: the id disappears from /api/clients.
        late = await join(server, "bin-1")
        await wait_online(server, ["bin-1"])
        await late.send(b"\x00\x01")
        await expect_error(late, "Binary frames are not supported", "binary_not_supported")
        assert (await late.wait_closed()).code == 1003
        await wait_online(server, [])
        # Exactly at the limit is still fine.
        ok = await join(server, "ok-1")
        frame = {"type": "heartbeat", "status": "ok", "pad": ""}
        frame["pad"] = "x" * (1024 - len(json.dumps(frame)))
        await ok.send_fragments(json.dumps(frame), 8)
        ack = await ok.recv()
        assert isinstance(ack, dict)
        assert ack["type"] == "heartbeat"


# ---------------------------------------------------------------------------------- SEC-14 … 17


async def test_sec_14_slow_handshake_and_silent_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_server(registration_timeout=30.0) as mem:
        # An incomplete request head is dropped after --registration-timeout (LIM-2).
        client, server_side = trio.testing.memory_stream_pair()
        mem.server.spawn_connection(server_side)
        t0 = trio.current_time()
        await client.send_all(b"GET /ws?token=test-key HTTP/1.1\r\nHost: localhost\r\n")
        assert await client.receive_some() == b""  # closed, no response
        assert trio.current_time() - t0 == 30.0
        # An accepted socket that stays silent: ERROR, then 1008 (REG-1).
        t0 = trio.current_time()
        silent = await mem.connect()
        frame = await silent.recv()
        assert (frame["type"], frame["code"]) == ("error", "registration_timeout")
        assert frame["error"] == "Registration timed out"
        assert (await silent.closed()).code == 1008
        assert trio.current_time() - t0 == 30.0


async def test_sec_15_constellation_scope() -> None:
    async with open_server() as server:
        device_1 = await join(server, "device-1")
        device_2 = await join(server, "device-2")
        const = await join(server, "c-1", "constellation", target_id="device-1")
        await const.send(
            {"type": "task", "status": "continue", "client_type": "constellation",
             "client_id": "c-1", "target_id": "device-2", "session_id": "c@1", "request": PLAN}
        )  # fmt: skip
        text = "Not authorized to dispatch tasks to this device"
        await expect_error(const, text, "not_authorized")
        end = await const.recv()
        assert isinstance(end, dict)
        assert (end["type"], end["status"], end["session_id"], end["error"], end["result"]) == (
            "task_end", "failed", "c@1", text, None,
        )  # fmt: skip
        await nothing_else(const, "constellation")
        await nothing_else(device_1)
        await nothing_else(device_2)
        assert await live_sessions(server) == []


async def test_sec_16_routing_by_connection_not_by_id() -> None:
    async with open_server() as server:
        dev = await join(server, "dev-1")
        await wait_online(server, ["dev-1"])
        await dev.send(task("dev-1", session_id="own-1", task_name="own"))
        await dev.recv_until(lambda f: f["type"] == "command")
        dev.reset()  # the session's connection drops
        await wait_online(server, [])
        newcomer = await join(server, "dev-1")
        await nothing_else(newcomer)  # nothing from the old session reaches the new holder
        result = await api(server, "/api/task_result/own")
        assert result == {
            "status": "failed",
            "error": "Task was cancelled because target device disconnected",
            "result": None,
        }


async def test_sec_17a_bounds_order_sessions_and_echo() -> None:
    async with open_server(max_sessions_per_client=64) as server:
        client = await join(server, "dev-1")
        # Replies follow the order of the frames they answer (PROC-1/2).
        expected: list[tuple[str, Any]] = []
        for n in range(30):
            if n % 3 == 0:
                await client.send({"type": "heartbeat", "status": "ok"})
                expected.append(("heartbeat", None))
            elif n % 3 == 1:
                await client.send({"type": "device_info_request", "status": "ok",
                                   "request_id": f"r-{n}"})  # fmt: skip
                expected.append(("error", f"r-{n}"))
            else:
                await client.send({"type": "nope", "status": "ok", "request_id": f"u-{n}"})
                expected.append(("error", f"u-{n}"))
        got = []
        for _want_type, want_id in expected:
            frame = await client.recv()
            assert isinstance(frame, dict)
            got.append((frame["type"], frame["response_id"] if want_id else None))
        assert got == expected
        # At most 64 live sessions per requester (LIM-7).
        for n in range(65):
            await client.send(task("dev-1", session_id=f"s-{n}"))
        mark = next(_sentinels)
        await client.send({"type": "device_info_request", "status": "ok",
                           "request_id": f"sentinel-{mark}"})  # fmt: skip
        frames = []
        with trio.fail_after(10):  # every answer, and each session's first COMMAND
            while (
                sum(f["type"] == "command" for f in frames) < 64
                or frames[-1:] == []
                or not any(f["response_id"] == f"sentinel-{mark}" for f in frames)
            ):
                frame = await client.recv()
                assert isinstance(frame, dict)
                frames.append(frame)
        acks = [f for f in frames if f["type"] == "heartbeat"]
        errors = [f for f in frames if f["type"] == "error" and f.get("code") == "rate_limited"]
        assert len(acks) == 64
        assert len([f for f in frames if f["type"] == "command"]) == 64
        assert [(e["error"], e["session_id"]) for e in errors] == [
            ("Too many running sessions for this client", "s-64")
        ]
        assert not [f for f in frames if f["type"] == "task_end"]
        # A client ERROR gets exactly one echo, capped at 200 characters.
        await client.send({"type": "error", "status": "error", "error": "E" * 5000})
        frames = await sentinel(client, next(_sentinels))
        echoes = [f for f in frames if f.get("code") == "client_error"]
        assert [e["error"] for e in echoes] == ["E" * 200]
        assert len(frames) == 2


async def test_sec_17b_peer_that_does_not_read_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """PROC-4: a peer that stops reading is closed after SEND_TIMEOUT; others are unaffected."""
    async with open_memory_server(send_timeout=30.0, ping_interval=0, message_rate=0) as mem:
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
        mem.server.spawn_connection(server_stream)
        stalled = await _wrap(mem, client_stream)
        assert (await stalled.register("slow-1"))["status"] == "ok"
        other = await mem.connect()
        assert (await other.register("fast-1"))["status"] == "ok"
        # The stalled peer keeps sending heartbeats and never reads their acks.
        stalled.ws._reader_running = False

        async def flood() -> None:
            with trio.move_on_after(1000):
                try:
                    while True:
                        await stalled.send({"type": "heartbeat", "status": "ok"})
                except Exception:
                    return

        entry = mem.server.registry.get("slow-1")
        assert entry is not None
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            nursery.start_soon(flood)
            await trio.sleep(1)
            # Meanwhile another client is served without delay.
            await other.send({"type": "heartbeat", "status": "ok"})
            assert (await other.recv())["type"] == "heartbeat"
            assert trio.current_time() == t0 + 1
            await entry.connection.finished.wait()
            assert trio.current_time() == t0 + 30.0
            assert entry.connection.close_code == 4003
            nursery.cancel_scope.cancel()
        assert [e.client_id for e in mem.server.registry] == ["fast-1"]


async def _wrap(mem: Any, stream: Any) -> Any:
    import trio_websocket

    from ufo_trio.testing import RawClient

    ws = await trio_websocket.wrap_client_stream(
        mem._nursery, stream, "localhost", f"/ws?token={TEST_KEY}", message_queue_size=1
    )
    return RawClient(ws)


# ------------------------------------------------------------------- limits beyond §8 (issue 5)


async def test_limit_max_connections_refuses_with_503(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ufo_trio")
    async with open_server(max_connections=2) as server:
        first, _ = await WireClient.registered(server.port, "dev-1")
        second = await WireClient.open(server.port)  # handshaken, not yet registered
        assert isinstance(second, WireClient)
        refused = await WireClient.open(server.port)
        assert isinstance(refused, Rejected)
        assert refused.status == 503
        assert json.loads(refused.body) == {"detail": "Too many connections"}
        # Plain HTTP shares the cap.
        response = await http_request(server.port, "GET", "/api/health")
        assert (response.status, response.detail) == (503, "Too many connections")
        assert response.headers["retry-after"] == "1"
        assert server.open_streams == 2
        await second.close()
        with trio.fail_after(5):
            while server.open_streams > 1:
                await trio.sleep(0.005)
        again, verdict = await WireClient.registered(server.port, "dev-2")
        assert verdict["status"] == "ok"
        await first.close()
        with trio.fail_after(5):
            while server.open_streams > 1:
                await trio.sleep(0.005)
        assert await online(server) == ["dev-2"]
        await again.close()
    refusals = [r for r in caplog.records if "limit max-connections" in r.getMessage()]
    assert len(refusals) == 2
    assert all("127.0.0.1:" in r.getMessage() and "(2)" in r.getMessage() for r in refusals)


async def test_limit_message_rate_token_bucket(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ufo_trio")
    heartbeat = {"type": "heartbeat", "status": "ok"}
    async with open_memory_server(message_rate=10, message_burst=20, ping_interval=0) as mem:
        client = await mem.connect()
        assert (await client.register("dev-1"))["status"] == "ok"
        t0 = trio.current_time()
        for _ in range(20):  # the burst
            await client.send(heartbeat)
            assert (await client.recv())["type"] == "heartbeat"
        await trio.sleep(1.0)  # 10 tokens back
        for _ in range(10):
            await client.send(heartbeat)
            assert (await client.recv())["type"] == "heartbeat"
        await client.send(heartbeat)  # one too many
        frame = await client.recv()
        assert (frame["type"], frame["code"], frame["error"]) == (
            "error", "rate_limited", "Message rate limit exceeded",
        )  # fmt: skip
        reason = await client.closed()
        assert (reason.code, reason.reason) == (1008, "rate_limited")
        assert trio.current_time() - t0 == 1.0
        await trio.testing.wait_all_tasks_blocked()
        assert mem.server.registry.get("dev-1") is None
        # A connection's bucket is its own: a newcomer starts full.
        other = await mem.connect()
        assert (await other.register("dev-2"))["status"] == "ok"
        for _ in range(20):
            await other.send(heartbeat)
            assert (await other.recv())["type"] == "heartbeat"
    refusals = [r.getMessage() for r in caplog.records if "limit message-rate" in r.getMessage()]
    assert refusals == ["'dev-1' (device, memory): limit message-rate reached (10/s, burst 20)"]


async def test_limit_message_rate_zero_is_off(autojump_clock: trio.testing.MockClock) -> None:
    async with open_memory_server(message_rate=0, ping_interval=0) as mem:
        client = await mem.connect()
        assert (await client.register("dev-1"))["status"] == "ok"
        for _ in range(3000):
            await client.send({"type": "heartbeat", "status": "ok"})
            assert (await client.recv())["type"] == "heartbeat"


async def test_each_limit_refusal_is_logged_once_with_client_and_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ufo_trio")
    async with open_server(max_message_size=1024, max_sessions_per_client=1) as server:
        port = server.port
        head = b"GET /api/clients HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 20000
        await raw_http(port, head + b"\r\n\r\n")  # 431
        await http_request(port, "POST", "/api/dispatch", body=b" " * (1024 * 1024 + 1))  # 413
        big = await join(server, "big-1")
        await big.send("x" * 2000)  # 1009
        await big.wait_closed()
        busy = await join(server, "busy-1")
        for n in range(2):  # the second is over max-sessions-per-client
            await busy.send(task("busy-1", session_id=f"b-{n}"))
        await sentinel(busy, next(_sentinels))
        await busy.close()
    lines = [r.getMessage() for r in caplog.records if " limit " in r.getMessage()]
    assert len(lines) == 4, lines
    assert lines[0].startswith("127.0.0.1:")
    assert "limit max-header-size reached (16384 bytes; 431)" in lines[0]
    assert "limit max-body-size reached (1048576 bytes; 413)" in lines[1]
    assert lines[2].startswith("'big-1' (device, 127.0.0.1:")
    assert lines[2].endswith("limit max-message-size reached (1024 bytes; close 1009)")
    assert lines[3].startswith("'busy-1' (device, 127.0.0.1:")
    assert lines[3].endswith("limit max-sessions-per-client reached (1 live sessions)")
