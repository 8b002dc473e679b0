"""Black-box tests of a REGISTERED connection: WIRE-6 validation, identity pinning, dispatch,
ERROR correlation and device info. Raw JSON over a real WebSocket on 127.0.0.1, port 0.

Written from PROTOCOL.md §1, §3.3, §3.4, §5 and §8, not from the server code.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from blackbox_helpers import KEYS, WAIT, check_frame, is_uuid4

from ufo_trio.testing import RawClient, connect, open_server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ufo_trio._server import Server

SECRET = "SECRET-VALUE"
ID1 = "client_id does not match the registered connection"
ID2 = "client_type does not match the registered connection"
DI1 = "DEVICE_INFO_REQUEST is permitted only for constellation clients"
DI2 = "Not authorized to request device info for this device"


def check_error(
    frame: dict[str, Any],
    text: str,
    code: str,
    *,
    session_id: str | None = None,
    response_id: str | None = None,
) -> None:
    """WIRE-9: ERROR/error with `code`; `response_id` is the request_id if given, else a uuid4."""
    check_frame(frame, ("code",))
    assert (frame["type"], frame["status"]) == ("error", "error")
    assert (frame["error"], frame["code"]) == (text, code)
    assert frame["session_id"] == session_id
    if response_id is None:
        assert is_uuid4(frame["response_id"])
    else:
        assert frame["response_id"] == response_id
    for key in ("user_request", "agent_name", "actions", "task_name", "result"):
        assert frame[key] is None


def check_ack(frame: dict[str, Any]) -> None:
    """DISP-1: heartbeat/ok, fresh uuid4, no session_id, nothing else set, no extra keys."""
    check_frame(frame)
    assert (frame["type"], frame["status"]) == ("heartbeat", "ok")
    assert all(
        frame[k] is None for k in KEYS if k not in ("type", "status", "timestamp", "response_id")
    )
    assert is_uuid4(frame["response_id"])


async def nothing_pending(client: RawClient, client_id: str) -> None:
    """The next frame after a fresh heartbeat is its ack, so nothing else was queued before it
    (replies follow request order, PROC-2)."""
    await trio.testing.wait_all_tasks_blocked()
    await client.send({"type": "heartbeat", "status": "ok", "client_id": client_id})
    check_ack(await client.recv())


@asynccontextmanager
async def device(
    server: Server, client_id: str = "dev-1", **fields: Any
) -> AsyncIterator[RawClient]:
    async with connect(server.url) as client:
        confirmation = await client.register(client_id, **fields)
        assert (confirmation["type"], confirmation["status"]) == ("heartbeat", "ok")
        yield client


@asynccontextmanager
async def constellation(
    server: Server, client_id: str, target_id: str | None = None
) -> AsyncIterator[RawClient]:
    async with connect(server.url) as client:
        fields = {} if target_id is None else {"target_id": target_id}
        confirmation = await client.register(client_id, "constellation", **fields)
        assert (confirmation["type"], confirmation["status"]) == ("heartbeat", "ok")
        yield client


@asynccontextmanager
async def one_device() -> AsyncIterator[tuple[Server, RawClient]]:
    with trio.fail_after(WAIT):
        async with open_server() as server, device(server) as dev:
            yield server, dev


# --- heartbeat and WIRE-4 ------------------------------------------------------------------------


async def test_heartbeat_ack_disp1_wire8() -> None:
    """DISP-1 / WIRE-8: each heartbeat gets an ack with a fresh uuid4 (not the request_id) and no
    session_id, even when the heartbeat carries one. WIRE-4: status is not checked against type,
    unknown keys are ignored, and the last occurrence of a duplicated key wins."""
    async with one_device() as (_server, dev):
        seen = set()
        for frame in (
            {"type": "heartbeat", "status": "ok", "client_id": "dev-1"},
            {"type": "heartbeat", "status": "continue", "session_id": "s-1", "request_id": "rq-1"},
            {"type": "heartbeat", "status": "failed", "unknown_key": [1, {"x": 2}]},
            '{"type":"bogus","type":"heartbeat","status":"ok"}',
        ):
            await dev.send(frame)
            raw = await dev.ws.get_message()
            assert raw == json.dumps(json.loads(raw), separators=(",", ":"))  # WIRE-3: compact
            ack = json.loads(raw)
            check_ack(ack)
            assert ack["response_id"] not in seen
            seen.add(ack["response_id"])


async def test_galaxy_heartbeats_are_acked_id2_exception() -> None:
    """ID-2 exception: a constellation's heartbeat is acked whether `client_type` is "device"
    (Galaxy's serialised default, COMPAT-5), absent or "constellation"; an empty or absent
    client_id is fine. ID-1 still applies: a foreign client_id is refused, and the connection
    stays open."""
    with trio.fail_after(WAIT):
        async with (
            open_server() as server,
            device(server) as _dev,
            constellation(server, "demo@dev-1", "dev-1") as galaxy,
        ):
            for extra in (
                {
                    "client_type": "device",
                    "client_id": "demo@dev-1",
                    "metadata": {"device_id": "dev-1"},
                },
                {"client_id": "demo@dev-1"},
                {"client_type": "constellation", "client_id": "demo@dev-1"},
                {},
                {"client_id": ""},
            ):
                await galaxy.send({"type": "heartbeat", "status": "ok", **extra})
                check_ack(await galaxy.recv())
            await galaxy.send(
                {"type": "heartbeat", "status": "ok", "client_type": "device", "client_id": "dev-1"}
            )
            check_error(await galaxy.recv(), ID1, "identity_mismatch")
            await galaxy.send({"type": "heartbeat", "status": "ok", "client_id": "demo@dev-1"})
            check_ack(await galaxy.recv())


async def test_device_heartbeat_with_constellation_role_is_acked_id2_exception() -> None:
    """ID-2 exception: on heartbeats `client_type` is ignored whatever it says."""
    async with one_device() as (_server, dev):
        await dev.send(
            {
                "type": "heartbeat",
                "status": "ok",
                "client_type": "constellation",
                "client_id": "dev-1",
            }
        )
        check_ack(await dev.recv())


# --- identity pinning (§3.3, SEC-1, SEC-2) -------------------------------------------------------


async def test_role_spoof_sec1_id2() -> None:
    """SEC-1 / ID-2: a device claiming `constellation` in a TASK gets the client_type ERROR
    (with the frame's session_id and request_id, WIRE-9); no session: no ACK or TASK_END for the
    attacker, nothing reaches the victim, the live store stays empty."""
    with trio.fail_after(WAIT):
        async with (
            open_server() as server,
            device(server, "attacker-device") as attacker,
            device(server, "victim-device") as victim,
        ):
            await attacker.send(
                {"type": "task", "status": "ok", "client_type": "constellation",
                 "client_id": "attacker-device", "target_id": "victim-device", "request": "x",
                 "session_id": "s-spoof", "request_id": "rq-spoof"}
            )  # fmt: skip
            check_error(
                await attacker.recv(), ID2, "identity_mismatch",
                session_id="s-spoof", response_id="rq-spoof",
            )  # fmt: skip
            await nothing_pending(attacker, "attacker-device")
            await nothing_pending(victim, "victim-device")
            assert len(server.sessions.live) == 0


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "task", "status": "ok", "client_type": "device", "request": "x", "session_id": "s-imp"},
        {"type": "heartbeat", "status": "ok", "session_id": "s-imp"},
        {"type": "command_results", "status": "continue", "session_id": "s-imp",
         "prev_response_id": "r-1", "action_results": []},
        {"type": "device_info_request", "status": "ok", "target_id": "victim-device", "session_id": "s-imp"},
        {"type": "device_info_response", "status": "ok", "session_id": "s-imp"},
        {"type": "error", "status": "error", "error": "spoofed", "session_id": "s-imp"},
    ],
    ids=lambda frame: frame["type"],
)  # fmt: skip
async def test_identity_spoof_every_type_sec2_id1(frame: dict[str, Any]) -> None:
    """SEC-2 / ID-1: any frame naming another client_id (heartbeats included) gets the
    client_id ERROR, carrying the frame's session_id; it is dropped, and nothing reaches the
    victim."""
    with trio.fail_after(WAIT):
        async with (
            open_server() as server,
            device(server, "attacker-device") as attacker,
            device(server, "victim-device") as victim,
        ):
            await attacker.send({**frame, "client_id": "victim-device"})
            check_error(await attacker.recv(), ID1, "identity_mismatch", session_id="s-imp")
            await nothing_pending(attacker, "attacker-device")
            await nothing_pending(victim, "victim-device")
            assert len(server.sessions.live) == 0


async def test_id1_is_checked_before_id2() -> None:
    """§3.3 order: with both client_id and client_type wrong, the client_id ERROR wins."""
    async with one_device() as (_server, dev):
        await dev.send(
            {"type": "task", "status": "ok", "client_type": "constellation", "client_id": "other",
             "target_id": "dev-1", "request": "x"}
        )  # fmt: skip
        check_error(await dev.recv(), ID1, "identity_mismatch")


async def test_constellation_frame_without_role_id2() -> None:
    """ID-2: an omitted client_type means "device", so a constellation's non-heartbeat frame
    without it is refused; the connection stays open."""
    with trio.fail_after(WAIT):
        async with (
            open_server() as server,
            device(server) as _dev,
            constellation(server, "c-1") as con,
        ):
            await con.send(
                {"type": "device_info_request", "status": "ok", "client_id": "c-1",
                 "target_id": "dev-1", "request_id": "rq-1"}
            )  # fmt: skip
            check_error(await con.recv(), ID2, "identity_mismatch", response_id="rq-1")
            await nothing_pending(con, "c-1")


# --- WIRE-6 validation order and texts -----------------------------------------------------------

CR = {"type": "command_results", "status": "continue", "session_id": "s", "prev_response_id": "r"}


@pytest.mark.parametrize(
    ("frame", "text", "code"),
    [
        ("{not json", "Invalid message: not valid JSON", "invalid_message"),
        ("", "Invalid message: not valid JSON", "invalid_message"),
        ("[]", "Invalid message: expected a JSON object", "invalid_message"),
        ("null", "Invalid message: expected a JSON object", "invalid_message"),
        (f'"{SECRET}"', "Invalid message: expected a JSON object", "invalid_message"),
        ({"status": "ok"}, "Invalid message: type: field required", "invalid_message"),
        ({"type": 5, "status": "ok"}, "Invalid message: type: wrong type", "invalid_message"),
        ({"type": [SECRET], "status": "ok"}, "Invalid message: type: wrong type", "invalid_message"),
        ({"type": "bogus", "status": "ok"}, "Unknown message type: bogus", "unknown_type"),
        ({"type": "HEARTBEAT", "status": "ok"}, "Unknown message type: HEARTBEAT", "unknown_type"),
        ({"type": "bogus"}, "Unknown message type: bogus", "unknown_type"),
        ({"type": "heartbeat"}, "Invalid message: status: field required", "invalid_message"),
        ({"type": "heartbeat", "status": "OK"}, "Invalid message: status: invalid value", "invalid_message"),
        ({"type": "heartbeat", "status": SECRET}, "Invalid message: status: invalid value", "invalid_message"),
        ({"type": "heartbeat", "status": 1}, "Invalid message: status: wrong type", "invalid_message"),
        ({"type": "heartbeat", "status": "ok", "client_id": 5}, "Invalid message: client_id: wrong type", "invalid_message"),
        ({"type": "heartbeat", "status": "ok", "client_type": "Device"}, "Invalid message: client_type: invalid value", "invalid_message"),
        ({"type": "heartbeat", "status": "ok", "session_id": True}, "Invalid message: session_id: wrong type", "invalid_message"),
        ({"type": "task", "status": "ok", "request": {"k": SECRET}}, "Invalid message: request: wrong type", "invalid_message"),
        ({"type": "heartbeat", "status": "ok", "metadata": SECRET}, "Invalid message: metadata: wrong type", "invalid_message"),
        ({**CR, "action_results": SECRET}, "Invalid message: action_results: wrong type", "invalid_message"),
        ({**CR, "action_results": [SECRET]}, "Invalid message: action_results.0: wrong type", "invalid_message"),
        ({**CR, "action_results": [{"status": SECRET}]}, "Invalid message: action_results.0.status: invalid value", "invalid_message"),
        ({**CR, "action_results": [{"status": "success"}, {"status": "FAILURE"}]}, "Invalid message: action_results.1.status: invalid value", "invalid_message"),
        ({**CR, "action_results": [{"status": "success"}, {"result": SECRET}]}, "Invalid message: action_results.1.status: field required", "invalid_message"),
        ({**CR, "action_results": [{"status": "failure", "error": [SECRET]}]}, "Invalid message: action_results.0.error: wrong type", "invalid_message"),
    ],
)  # fmt: skip
async def test_validation_order_and_texts_wire6(
    frame: dict[str, Any] | str, text: str, code: str
) -> None:
    """WIRE-6 steps 1–5 (and DISP-1 for `register`/`task_end`): exact text and code, dotted
    paths with numeric indices, no input values in invalid_message texts, ≤ 200 characters,
    session_id null (the frame did not pass schema validation, WIRE-9); then the frame is
    dropped and the connection stays open."""
    async with one_device() as (_server, dev):
        await dev.send(frame if isinstance(frame, str) else json.dumps(frame))
        reply = await dev.recv()
        check_error(reply, text, code)
        assert len(reply["error"]) <= 200
        assert SECRET not in json.dumps(reply)
        await nothing_pending(dev, "dev-1")


@pytest.mark.parametrize("kind", ["register", "task_end"])
async def test_register_and_task_end_after_registration_disp1(kind: str) -> None:
    """DISP-1: `register` and `task_end` are client types, so the frame passes WIRE-6 and the
    identity checks, and is then answered `Unknown message type: <type>` (unknown_type). It
    passed schema validation, so the ERROR carries its session_id (WIRE-9)."""
    async with one_device() as (server, dev):
        await dev.send(
            {"type": kind, "status": "ok", "client_type": "device", "client_id": "dev-1",
             "session_id": "s-1", "request_id": "rq-1"}
        )  # fmt: skip
        check_error(
            await dev.recv(), f"Unknown message type: {kind}", "unknown_type",
            session_id="s-1", response_id="rq-1",
        )  # fmt: skip
        await nothing_pending(dev, "dev-1")
        assert server.registry.online_ids() == ["dev-1"]


@pytest.mark.parametrize(
    ("frame", "prefix"),
    [
        ({"type": None, "status": "ok"}, "Invalid message: type: "),
        ({"type": "heartbeat", "status": "ok", "client_type": None}, "Invalid message: client_type: "),
        ({"type": "heartbeat", "status": None}, "Invalid message: status: "),
    ],
)  # fmt: skip
async def test_explicit_nulls_wire4_wire6(frame: dict[str, Any], prefix: str) -> None:
    """WIRE-4: an explicit null `client_type` is invalid (unlike an omitted one), and `type` and
    `status` are required; WIRE-6 names the field."""
    async with one_device() as (_server, dev):
        await dev.send(frame)
        reply = await dev.recv()
        assert reply["code"] == "invalid_message"
        assert reply["error"].startswith(prefix)
        assert reply["error"].removeprefix(prefix) in (
            "field required",
            "wrong type",
            "invalid value",
        )


async def test_unknown_type_text_is_truncated_scope4() -> None:
    """SCOPE-4 / WIRE-6 step 4: the unknown type is echoed, cut to 200 characters."""
    async with one_device() as (_server, dev):
        long_type = "x" * 150 + "y" * 850
        await dev.send({"type": long_type, "status": "ok"})
        check_error(await dev.recv(), "Unknown message type: " + long_type[:200], "unknown_type")


# --- ERROR correlation (WIRE-8, WIRE-9, CLAR-1) --------------------------------------------------


async def test_error_correlation_wire8_wire9_clar1() -> None:
    """WIRE-8: ERROR response_id = the frame's non-empty string request_id, else a fresh uuid4
    (also for frames that failed schema validation, CLAR-1). WIRE-9: session_id = the frame's
    non-empty session_id only if the frame passed schema validation."""
    async with one_device() as (_server, dev):
        cases: list[tuple[dict[str, Any] | str, str, str | None, str | None]] = [
            # frame, code, expected session_id, expected response_id (None = fresh uuid4)
            ({"type": "heartbeat", "status": "bad", "request_id": "rq-1", "session_id": "s-1"},
             "invalid_message", None, "rq-1"),
            ({"status": "ok", "request_id": "rq-2", "session_id": "s-2"}, "invalid_message", None, "rq-2"),
            ({"type": "bogus", "status": "ok", "request_id": "rq-3", "session_id": "s-3"},
             "unknown_type", None, "rq-3"),
            ({"type": "heartbeat", "status": "ok", "client_id": "x", "request_id": "rq-4",
              "session_id": "s-4"}, "identity_mismatch", "s-4", "rq-4"),
            ({"type": "heartbeat", "status": "ok", "client_id": "x", "request_id": "",
              "session_id": ""}, "identity_mismatch", None, None),
            ({"type": "heartbeat", "status": "ok", "client_id": "x", "request_id": None,
              "session_id": None}, "identity_mismatch", None, None),
            ({"type": "heartbeat", "status": "ok", "request_id": 7}, "invalid_message", None, None),
            ('{"not json', "invalid_message", None, None),
        ]  # fmt: skip
        for frame, code, session_id, response_id in cases:
            await dev.send(frame)
            reply = await dev.recv()
            assert reply["code"] == code, frame
            assert reply["session_id"] == session_id, frame
            if response_id is None:
                assert is_uuid4(reply["response_id"]), frame
            else:
                assert reply["response_id"] == response_id, frame


# --- client ERROR echo, silent types (DISP-1) ----------------------------------------------------


@pytest.mark.parametrize(
    ("error", "echo"),
    [
        ("boom", "boom"),
        ("é" * 150 + "z" * 350, "é" * 150 + "z" * 50),
        ("", "Unknown error"),
        (None, "Unknown error"),
        (..., "Unknown error"),
    ],
    ids=["text", "long", "empty", "null", "absent"],
)
async def test_client_error_is_echoed_once_disp1(error: object, echo: str) -> None:
    """DISP-1 / SCOPE-4 / SEC-17: a client ERROR gets exactly one echo, code client_error, its
    text cut to 200 characters or `Unknown error`; it carries session_id and request_id."""
    async with one_device() as (_server, dev):
        frame: dict[str, Any] = {
            "type": "error", "status": "error", "session_id": "s-e", "request_id": "rq-e",
        }  # fmt: skip
        if error is not ...:
            frame["error"] = error
        await dev.send(frame)
        check_error(await dev.recv(), echo, "client_error", session_id="s-e", response_id="rq-e")
        await nothing_pending(dev, "dev-1")


async def test_silent_types_disp1() -> None:
    """DISP-1: `device_info_response` is only logged, and COMMAND_RESULTS for no live session
    is dropped silently (CMD-2): no reply, nothing created."""
    async with one_device() as (server, dev):
        await dev.send({"type": "device_info_response", "status": "ok", "result": {"a": 1}})
        await dev.send(
            {"type": "command_results", "status": "continue", "session_id": "nope",
             "prev_response_id": "r-1", "action_results": [{"status": "success"}]}
        )  # fmt: skip
        await nothing_pending(dev, "dev-1")
        assert len(server.sessions.live) == 0


# --- device info (§5, SEC-6, SEC-7) --------------------------------------------------------------

VICTIM_INFO = {
    "hostname": "victim-host",
    "platform": "linux",
    "cpus": [1, 2],
    "nested": {"x": None},
}


def di_request(
    client_id: str, target_id: str | None = None, request_id: str | None = None
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "device_info_request", "status": "ok", "client_type": "constellation",
        "client_id": client_id,
    }  # fmt: skip
    if target_id is not None:
        frame["target_id"] = target_id
    if request_id is not None:
        frame["request_id"] = request_id
    return frame


def check_di_response(frame: dict[str, Any], result: Any, response_id: str | None) -> None:
    """DI-3: device_info_response/ok, result, error null, response_id = request_id verbatim."""
    check_frame(frame)
    assert (frame["type"], frame["status"]) == ("device_info_response", "ok")
    assert frame["result"] == result
    assert frame["response_id"] == response_id
    assert frame["error"] is None
    assert frame["session_id"] is None


def not_found(target: str) -> dict[str, str]:
    return {"error": f"Device {target} not found or no system info available"}


async def test_device_info_scoped_constellation_di3_sec7c() -> None:
    """DI-3 / SEC-7 (c) / COMPAT-7: a constellation scoped to device-1 gets the exact stored
    system info, with response_id = its request_id verbatim (null when it sent none)."""
    with trio.fail_after(WAIT):
        async with (
            open_server() as server,
            device(server, "device-1", metadata={"platform": "linux", "system_info": VICTIM_INFO}),
            constellation(server, "demo@device-1", "device-1") as con,
        ):
            request_id = "device_info_device-1_1767225600.123456"
            await con.send(di_request("demo@device-1", "device-1", request_id))
            check_di_response(await con.recv(), VICTIM_INFO, request_id)
            await con.send(di_request("demo@device-1", "device-1"))
            check_di_response(await con.recv(), VICTIM_INFO, None)


async def test_device_info_unscoped_and_not_found_di2_di3() -> None:
    """DI-2: an unscoped constellation may ask about any id. DI-3: an unknown id, a device with
    no system info, a non-object system info (App. B #36), a constellation id, and an absent
    target_id (`None`) all get status ok with the not-found result."""
    with trio.fail_after(WAIT):
        async with (
            open_server() as server,
            device(server, "device-1", metadata={"system_info": VICTIM_INFO}),
            device(server, "bare-device"),
            device(server, "odd-device", metadata={"system_info": ["not", "an", "object"]}),
            constellation(server, "orchestrator") as con,
        ):
            cases: list[tuple[str | None, Any]] = [
                ("device-1", VICTIM_INFO),
                ("ghost", not_found("ghost")),
                ("bare-device", not_found("bare-device")),
                ("odd-device", not_found("odd-device")),
                ("orchestrator", not_found("orchestrator")),
                (None, not_found("None")),
            ]
            for index, (target, result) in enumerate(cases):
                await con.send(di_request("orchestrator", target, f"rq-{index}"))
                check_di_response(await con.recv(), result, f"rq-{index}")


async def test_device_asking_for_device_info_di1_sec7a() -> None:
    """DI-1 / SEC-7 (a): a device asking about another device gets the not_authorized ERROR as
    its last frame, and no frame it receives contains the victim's data."""
    with trio.fail_after(WAIT):
        async with (
            open_server() as server,
            device(server, "device-1", metadata={"system_info": VICTIM_INFO}),
            device(server, "device-2") as asker,
        ):
            await asker.send(
                {"type": "device_info_request", "status": "ok", "client_type": "device",
                 "client_id": "device-2", "target_id": "device-1", "request_id": "rq-a"}
            )  # fmt: skip
            raw = await asker.ws.get_message()
            assert "victim-host" not in raw
            check_error(json.loads(raw), DI1, "not_authorized", response_id="rq-a")
            await nothing_pending(asker, "device-2")


async def test_scoped_constellation_asking_about_another_device_di2_sec7b() -> None:
    """DI-2 / SEC-7 (b): a constellation scoped to device-1 asking about device-2 gets the
    not_authorized ERROR, without device-2's data."""
    with trio.fail_after(WAIT):
        async with (
            open_server() as server,
            device(server, "device-1", metadata={"system_info": {"hostname": "one"}}),
            device(server, "device-2", metadata={"system_info": {"hostname": "victim-host"}}),
            constellation(server, "constellation-1", "device-1") as con,
        ):
            await con.send(di_request("constellation-1", "device-2", "rq-b"))
            raw = await con.ws.get_message()
            assert "victim-host" not in raw
            check_error(json.loads(raw), DI2, "not_authorized", response_id="rq-b")
            await nothing_pending(con, "constellation-1")


async def test_isolation_sec6_di4_disp1() -> None:
    """SEC-6 / DI-4 / DISP-1: replies go only to the sender. The device-info response reaches
    only constellation-1; device-1's TASK `sess-1` is ACKed to device-1 only, runs exactly once
    (one ACK, one TASK_END) and nobody else hears of it."""
    with trio.fail_after(WAIT):
        async with (
            open_server() as server,
            device(
                server, "device-1", metadata={"system_info": {"hostname": "victim-host"}}
            ) as dev,
            constellation(server, "constellation-1", "device-1") as con,
            device(server, "observer-1") as observer,
        ):
            await con.send(di_request("constellation-1", "device-1", "req-123"))
            check_di_response(await con.recv(), {"hostname": "victim-host"}, "req-123")
            await nothing_pending(dev, "device-1")
            await nothing_pending(observer, "observer-1")

            await dev.send(
                {"type": "task", "status": "continue", "client_type": "device",
                 "client_id": "device-1", "session_id": "sess-1", "task_name": "t",
                 "request": json.dumps({"steps": []})}
            )  # fmt: skip
            ack = await dev.recv()
            check_frame(ack)
            assert (ack["type"], ack["status"], ack["session_id"]) == ("heartbeat", "ok", "sess-1")
            assert ack["task_name"] == "t"
            end = await dev.recv()
            assert (end["type"], end["status"], end["session_id"]) == (
                "task_end",
                "completed",
                "sess-1",
            )
            assert end["result"] == []
            await nothing_pending(dev, "device-1")
            await nothing_pending(con, "constellation-1")
            await nothing_pending(observer, "observer-1")
            assert len(server.sessions.live) == 0


async def test_replies_follow_frame_order_proc1_proc2() -> None:
    """PROC-1 / PROC-2: frames are handled strictly in arrival order and the replies on a
    connection follow the order of the frames they answer (acks, ERRORs and echoes mixed)."""
    async with one_device() as (_server, dev):
        expected = []
        for i in range(60):
            kind = i % 3
            if kind == 0:
                await dev.send({"type": "heartbeat", "status": "ok", "request_id": f"h-{i}"})
                expected.append(("heartbeat", None))
            elif kind == 1:
                await dev.send({"type": "bogus", "status": "ok", "request_id": f"rq-{i}"})
                expected.append(("error", f"rq-{i}"))
            else:
                await dev.send(
                    {"type": "error", "status": "error", "error": f"e-{i}", "request_id": f"rq-{i}"}
                )
                expected.append(("error", f"rq-{i}"))
        for kind, response_id in expected:
            frame = await dev.recv()
            assert frame["type"] == kind
            if response_id is not None:
                assert frame["response_id"] == response_id
