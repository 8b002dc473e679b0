"""Black-box registration tests: raw JSON over a real WebSocket on 127.0.0.1, port 0.

Written from PROTOCOL.md §1, §3.1, §3.2 and §8, not from the server code. Each docstring names
the rules it checks.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from blackbox_helpers import KEYS, WAIT, check_frame, is_uuid4
from wire_helpers import wire_client

from ufo_trio.testing import RawClient, connect, open_memory_server, open_server

if TYPE_CHECKING:

    from ufo_trio._server import Server

NOT_REGISTERED = "Connection is not registered; the first message must be a register message"


def check_confirmation(frame: dict[str, Any]) -> None:
    """REG-7 / WIRE-8: heartbeat/ok, everything else null, fresh uuid4, protocol and server."""
    check_frame(frame, ("protocol", "server"))
    assert frame["type"] == "heartbeat"
    assert frame["status"] == "ok"
    assert all(
        frame[key] is None
        for key in KEYS
        if key not in ("type", "status", "timestamp", "response_id")
    )
    assert is_uuid4(frame["response_id"])
    assert frame["protocol"] == "aip/1"
    assert frame["server"] == f"ufo_trio/{importlib.metadata.version('ufo_trio')}"
    sent = datetime.datetime.fromisoformat(frame["timestamp"])
    assert sent.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.UTC) - sent) < datetime.timedelta(minutes=1)


def check_error(
    frame: dict[str, Any], text: str, code: str, *, session_id: str | None = None
) -> None:
    """WIRE-9: an ERROR frame with `code`; response_id is a fresh uuid4 unless checked apart."""
    check_frame(frame, ("code",))
    assert (frame["type"], frame["status"]) == ("error", "error")
    assert frame["error"] == text
    assert frame["code"] == code
    assert frame["session_id"] == session_id


async def recv_raw(client: RawClient) -> str:
    message = await client.ws.get_message()
    assert isinstance(message, str)
    return message


async def rejected(server: Server, first: dict[str, Any] | str, text: str, code: str) -> None:
    """Send `first` as the first frame; expect ERROR `text`/`code`, then close 1008 (REG-2)."""
    with trio.fail_after(WAIT):
        async with connect(server.url) as client:
            await client.send(first if isinstance(first, str) else json.dumps(first))
            check_error(await client.recv(), text, code)
            assert (await client.closed()).code == 1008
        await trio.testing.wait_all_tasks_blocked()
    assert server.registry.online_ids() == []
    assert len(server.sessions.live) == 0


async def heartbeat_acked(client: RawClient, client_id: str) -> None:
    """The connection is alive and registered: a heartbeat gets its ack as the next frame."""
    await client.send({"type": "heartbeat", "status": "ok", "client_id": client_id})
    frame = await client.recv()
    assert (frame["type"], frame["status"], frame["error"]) == ("heartbeat", "ok", None)


# --- confirmation --------------------------------------------------------------------------------


async def test_device_confirmation_is_first_frame_wire3_wire7_wire8_reg7() -> None:
    """WIRE-3 (compact, 14 keys in order, nulls, extras last), WIRE-7 (timestamp format),
    WIRE-8 (fresh uuid4), REG-7 (confirmation is the first frame, protocol/server keys),
    REG-3 (ids with `@`, `/` and spaces)."""
    async with open_server() as server:
        with trio.fail_after(WAIT):
            for client_id in ("dev-1", "demo@dev 1/x"):
                async with connect(server.url) as client:
                    await client.send(
                        {"type": "register", "status": "ok", "client_type": "device",
                         "client_id": client_id, "timestamp": "whatever",
                         "metadata": {"platform": "linux", "system_info": {"hostname": "vm1"}}}
                    )  # fmt: skip
                    raw = await recv_raw(client)
                    assert raw == json.dumps(json.loads(raw), separators=(",", ":"))
                    frame = json.loads(raw)
                    check_confirmation(frame)
                    assert client_id in server.registry.online_ids()
                    await heartbeat_acked(client, client_id)


async def test_constellation_confirmation_reg4_reg7() -> None:
    """REG-7 for a Galaxy-shaped constellation REGISTER (scoped to a registered device, REG-4),
    and for an unscoped one; both ids are then online (REG-8)."""
    async with open_server() as server:
        with trio.fail_after(WAIT):
            async with (
                connect(server.url) as dev,
                connect(server.url) as scoped,
                connect(server.url) as unscoped,
            ):
                check_confirmation(await dev.register("dev-1"))
                check_confirmation(
                    await scoped.register(
                        "demo@dev-1", "constellation", target_id="dev-1",
                        metadata={"type": "constellation_client", "task_name": "demo",
                                  "targeted_device_id": "dev-1", "version": "2.0",
                                  "capabilities": ["task_distribution"]},
                    )
                )  # fmt: skip
                check_confirmation(await unscoped.register("orchestrator", "constellation"))
                assert server.registry.online_ids() == ["dev-1", "demo@dev-1", "orchestrator"]


async def test_device_target_id_is_ignored_reg4() -> None:
    """REG-4: a device's `target_id` is ignored, even when it names nobody."""
    async with open_server() as server, connect(server.url) as client:
        with trio.fail_after(WAIT):
            check_confirmation(await client.register("dev-1", target_id="ghost"))


# --- registration failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "text", "code"),
    [
        pytest.param("{not json", "Invalid message: not valid JSON", "invalid_message", id="not-json"),
        pytest.param("[1, 2]", "Invalid message: expected a JSON object", "invalid_message", id="array"),
        pytest.param('"register"', "Invalid message: expected a JSON object", "invalid_message", id="string"),
        pytest.param({"status": "ok", "client_id": "d"}, NOT_REGISTERED, "not_registered", id="type-missing"),
        pytest.param({"type": "bogus", "status": "ok", "client_id": "d"}, NOT_REGISTERED, "not_registered", id="type-unknown"),
        pytest.param({"type": "REGISTER", "status": "ok", "client_id": "d"}, NOT_REGISTERED, "not_registered", id="type-case"),
        pytest.param({"type": 7, "status": "ok", "client_id": "d"}, NOT_REGISTERED, "not_registered", id="type-number"),
        pytest.param({"type": "heartbeat", "status": "ok", "client_id": "d"}, NOT_REGISTERED, "not_registered", id="heartbeat"),
        pytest.param({"type": "register", "client_id": "d"}, "Invalid message: status: field required", "invalid_message", id="status-missing"),
        pytest.param({"type": "register", "status": "OK", "client_id": "d"}, "Invalid message: status: invalid value", "invalid_message", id="status-case"),
        pytest.param({"type": "register", "status": "ok", "client_id": 5}, "Invalid message: client_id: wrong type", "invalid_message", id="client-id-number"),
        pytest.param({"type": "register", "status": "ok", "client_id": "d", "client_type": "robot"}, "Invalid message: client_type: invalid value", "invalid_message", id="client-type-value"),
        pytest.param({"type": "register", "status": "ok", "client_id": "d", "metadata": []}, "Invalid message: metadata: wrong type", "invalid_message", id="metadata-list"),
        pytest.param({"type": "register", "status": "ok"}, "Registration requires a non-empty client_id", "invalid_registration", id="client-id-absent"),
        pytest.param({"type": "register", "status": "ok", "client_id": None}, "Registration requires a non-empty client_id", "invalid_registration", id="client-id-null"),
        pytest.param({"type": "register", "status": "ok", "client_id": ""}, "Registration requires a non-empty client_id", "invalid_registration", id="client-id-empty"),
        pytest.param({"type": "register", "status": "ok", "client_type": "constellation", "client_id": "c", "target_id": "ghost"}, "Target device 'ghost' is not connected", "unknown_target", id="unknown-target"),
    ],
)  # fmt: skip
async def test_registration_failures_reg2_reg4(
    first: dict[str, Any] | str, text: str, code: str
) -> None:
    """REG-2 steps 1–4 in order, and REG-4 (unknown target): exact ERROR text and code as the
    first frame, then close 1008; nothing is registered."""
    async with open_server() as server:
        await rejected(server, first, text, code)


async def test_registration_schema_error_hides_values_reg2() -> None:
    """REG-2 step 3 / WIRE-6: a schema error names the path only; the bad value is not echoed."""
    async with open_server() as server:
        await rejected(
            server,
            {"type": "register", "status": "ok", "client_id": "d", "target_id": ["SECRET-VALUE"]},
            "Invalid message: target_id: wrong type",
            "invalid_message",
        )


async def test_registration_not_registered_beats_schema_reg2() -> None:
    """REG-2: step 2 (type) is checked before step 3 (schema) and step 4 (client_id)."""
    async with open_server() as server:
        await rejected(server, {"type": "task", "status": 5}, NOT_REGISTERED, "not_registered")
        await rejected(
            server,
            {"type": "register", "status": "nope", "client_id": ""},
            "Invalid message: status: invalid value",
            "invalid_message",
        )


async def test_target_that_is_a_constellation_reg4() -> None:
    """REG-4: a constellation's target must be REGISTERED as a device; a constellation id is
    'not connected' (unknown_target, close 1008) and only the first constellation stays online."""
    async with open_server() as server, connect(server.url) as first:
        with trio.fail_after(WAIT):
            check_confirmation(await first.register("c-0", "constellation"))
            async with connect(server.url) as second:
                await second.send(
                    {"type": "register", "status": "ok", "client_type": "constellation",
                     "client_id": "c-1", "target_id": "c-0"}
                )  # fmt: skip
                check_error(
                    await second.recv(), "Target device 'c-0' is not connected", "unknown_target"
                )
                assert (await second.closed()).code == 1008
            assert server.registry.online_ids() == ["c-0"]


@pytest.mark.parametrize(
    "first",
    [
        {"type": "task", "status": "continue", "client_type": "device", "client_id": "d",
         "session_id": "s-early", "request": '{"steps":[]}'},
        {"type": "command_results", "status": "continue", "client_id": "d", "session_id": "s-early",
         "prev_response_id": "r", "action_results": []},
        {"type": "device_info_request", "status": "ok", "client_type": "constellation",
         "client_id": "c", "target_id": "d", "request_id": "q"},
        {"type": "error", "status": "error", "error": "boom"},
        {"type": "task_end", "status": "completed", "session_id": "s-early"},
    ],
    ids=["task", "command_results", "device_info_request", "error", "task_end"],
)  # fmt: skip
async def test_first_frame_not_register_sec4(first: dict[str, Any]) -> None:
    """SEC-4 / REG-2 step 2: any non-register first frame → ERROR not_registered, close 1008,
    and nothing is created (no registry entry, no session)."""
    async with open_server() as server:
        await rejected(server, first, NOT_REGISTERED, "not_registered")


# --- duplicate client_id (§3.2, SEC-5) ----------------------------------------------------------

SHADOW_REGISTER = {
    "type": "register", "status": "ok", "client_type": "constellation", "client_id": "shadowed-device",
}  # fmt: skip
DUPLICATE = (
    "client_id 'shadowed-device' is already registered; duplicate registrations are not allowed"
)


async def assert_still_shadowed_device(server: Server, s1: RawClient) -> None:
    """The id still maps to S1 as a device: S1 is acked, and an unscoped constellation sees S1's
    system info; a constellation may scope itself to it (REG-4 needs a device)."""
    await heartbeat_acked(s1, "shadowed-device")
    async with connect(server.url) as observer:
        check_confirmation(await observer.register("observer", "constellation"))
        await observer.send(
            {"type": "device_info_request", "status": "ok", "client_type": "constellation",
             "client_id": "observer", "target_id": "shadowed-device", "request_id": "q-1"}
        )  # fmt: skip
        reply = await observer.recv()
        assert reply["type"] == "device_info_response"
        assert reply["result"] == {"hostname": "s1-host"}
    async with connect(server.url) as scoped:
        check_confirmation(
            await scoped.register("scoped", "constellation", target_id="shadowed-device")
        )


@pytest.mark.parametrize("policy", ["reject", "probe"])
async def test_duplicate_rejected_sec5_dup2_dup4(policy: str) -> None:
    """SEC-5 / DUP-2 under `reject`, and DUP-4 under `probe` with S1 answering pings: S2 gets
    the exact DUP-2 ERROR and close 1008; the id still maps to S1 as a device, S1 still works."""
    async with open_server(duplicate_policy=policy) as server, connect(server.url) as s1:
        with trio.fail_after(WAIT):
            check_confirmation(
                await s1.register(
                    "shadowed-device", metadata={"system_info": {"hostname": "s1-host"}}
                )
            )
            async with connect(server.url) as s2:
                await s2.send(SHADOW_REGISTER)
                check_error(await s2.recv(), DUPLICATE, "duplicate_client_id")
                assert (await s2.closed()).code == 1008
            await assert_still_shadowed_device(server, s1)


async def test_duplicate_takeover_sec5_dup3() -> None:
    """SEC-5 / DUP-3 under `takeover`: S1 is closed with 4001, S2 is confirmed and the id now
    maps to S2 (a constellation: a device-scoped constellation can no longer target it)."""
    async with open_server(duplicate_policy="takeover") as server, connect(server.url) as s1:
        with trio.fail_after(WAIT):
            check_confirmation(await s1.register("shadowed-device"))
            async with connect(server.url) as s2:
                await s2.send(SHADOW_REGISTER)
                check_confirmation(await s2.recv())
                assert (await s1.closed()).code == 4001
                await heartbeat_acked_as(s2, "shadowed-device", "constellation")
                assert server.registry.online_ids() == ["shadowed-device"]
                async with connect(server.url) as scoped:
                    await scoped.send(
                        {"type": "register", "status": "ok", "client_type": "constellation",
                         "client_id": "scoped", "target_id": "shadowed-device"}
                    )  # fmt: skip
                    check_error(
                        await scoped.recv(),
                        "Target device 'shadowed-device' is not connected",
                        "unknown_target",
                    )


async def heartbeat_acked_as(client: RawClient, client_id: str, client_type: str) -> None:
    await client.send(
        {"type": "heartbeat", "status": "ok", "client_type": client_type, "client_id": client_id}
    )
    frame = await client.recv()
    assert (frame["type"], frame["status"]) == ("heartbeat", "ok")


async def test_duplicate_probe_silent_peer_real_socket_sec5_dup4(
) -> None:
    """SEC-5 / DUP-4 under `probe` with S1 silent (a raw client that has stopped reading, so
    pings go unanswered): after min(ping-timeout, 5 s) S2 is confirmed (DUP-3), and S1's
    registry entry is gone. A short ping timeout keeps the real wait small."""
    async with open_server(ping_timeout=0.2) as server, wire_client(server.port) as s1:
        with trio.fail_after(WAIT):
            await s1.send(
                {"type": "register", "status": "ok", "client_type": "device",
                 "client_id": "shadowed-device"}
            )  # fmt: skip
            check_confirmation(await s1.recv())
            # From here on s1 never reads again.
            async with connect(server.url) as s2:
                start = trio.current_time()
                await s2.send(SHADOW_REGISTER)
                check_confirmation(await s2.recv())
                assert trio.current_time() - start >= 0.2
                await heartbeat_acked_as(s2, "shadowed-device", "constellation")
                entry = server.registry.get("shadowed-device")
                assert entry is not None
                assert entry.role.value == "constellation"


async def test_duplicate_probe_silent_peer_memory_dup4(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """DUP-4 with exact virtual time: default ping timeout 20 s, so the probe lasts
    min(20, 5) = 5 s; silence means takeover (DUP-3) and S2 is confirmed at exactly t+5."""
    async with open_memory_server(ping_interval=0) as mem:
        s1 = await mem.connect()
        check_confirmation(await s1.register("shadowed-device"))
        s1.ws._reader_running = False  # S1 goes silent: its pings are never answered
        s2 = await mem.connect()
        start = trio.current_time()
        await s2.send(SHADOW_REGISTER)
        check_confirmation(await s2.recv())
        assert trio.current_time() - start == 5.0
        assert mem.server.registry.online_ids() == ["shadowed-device"]


async def test_reserved_id_is_rejected_under_any_policy_reg6(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """REG-6: while S2's probe is pending the id is reserved, so S3's REGISTER for it gets the
    DUP-2 ERROR and close 1008 at once; S2's verdict still comes when the probe ends."""
    async with open_memory_server(ping_interval=0) as mem:
        s1 = await mem.connect()
        check_confirmation(await s1.register("shadowed-device"))
        s1.ws._reader_running = False
        s2 = await mem.connect()
        start = trio.current_time()
        await s2.send(SHADOW_REGISTER)
        await trio.testing.wait_all_tasks_blocked()
        s3 = await mem.connect()
        await s3.send({**SHADOW_REGISTER, "client_type": "device"})
        check_error(await s3.recv(), DUPLICATE, "duplicate_client_id")
        assert (await s3.closed()).code == 1008
        assert trio.current_time() - start < 5.0
        check_confirmation(await s2.recv())
        assert trio.current_time() - start == 5.0


async def test_duplicate_control_after_cleanup_sec5() -> None:
    """SEC-5 control: once S1 has disconnected and been cleaned up, the same REGISTER succeeds,
    even under `reject`."""
    async with open_server(duplicate_policy="reject") as server:
        with trio.fail_after(WAIT):
            async with connect(server.url) as s1:
                check_confirmation(await s1.register("shadowed-device"))
            await trio.testing.wait_all_tasks_blocked()
            assert server.registry.online_ids() == []
            async with connect(server.url) as s2:
                await s2.send(SHADOW_REGISTER)
                check_confirmation(await s2.recv())


async def test_registration_wire4_leniency_reg3() -> None:
    """WIRE-4 on REGISTER: `status` is not checked against `type`, the last duplicated key wins,
    unknown keys are ignored. REG-3: the role comes only from `client_type` (`metadata.type`
    is ignored); REG-4: an empty target_id leaves a constellation unscoped."""
    async with open_server() as server:
        with trio.fail_after(WAIT):
            async with connect(server.url) as a:
                await a.send(
                    '{"type":"heartbeat","status":"ok","type":"register","client_id":"a",'
                    '"status":"failed","surprise":{"x":[1]}}'
                )
                check_confirmation(await a.recv())
            async with (
                connect(server.url) as dev,
                connect(server.url) as con,
                connect(server.url) as unscoped,
            ):
                check_confirmation(
                    await dev.register("dev-x", metadata={"type": "constellation_client"})
                )
                # dev-x is a device, so a constellation may scope itself to it (REG-4).
                check_confirmation(await con.register("con-x", "constellation", target_id="dev-x"))
                check_confirmation(await unscoped.register("free", "constellation", target_id=""))
                await unscoped.send(
                    {"type": "device_info_request", "status": "ok", "client_type": "constellation",
                     "client_id": "free", "target_id": "con-x", "request_id": "q"}
                )  # fmt: skip
                reply = await unscoped.recv()
                assert reply["type"] == "device_info_response"


@pytest.mark.parametrize(
    ("first", "text", "code"),
    [
        ({"type": "register", "status": "ok", "client_id": ""},
         "Registration requires a non-empty client_id", "invalid_registration"),
        ({"type": "register", "status": "ok", "client_type": "constellation", "client_id": "c",
          "target_id": "ghost"}, "Target device 'ghost' is not connected", "unknown_target"),
    ],
    ids=["invalid_registration", "unknown_target"],
)  # fmt: skip
async def test_registration_error_correlation_wire8_wire9(
    first: dict[str, Any], text: str, code: str
) -> None:
    """WIRE-8 / WIRE-9 on a rejected REGISTER that passed schema validation: the ERROR echoes
    the frame's request_id as response_id and its session_id."""
    async with open_server() as server, connect(server.url) as client:
        with trio.fail_after(WAIT):
            await client.send({**first, "request_id": "rq-reg", "session_id": "s-reg"})
            frame = await client.recv()
            check_error(frame, text, code, session_id="s-reg")
            assert frame["response_id"] == "rq-reg"
            assert (await client.closed()).code == 1008


async def test_registration_error_echoes_request_id_clar1() -> None:
    """WIRE-8 / CLAR-1: a first frame that fails before or at schema validation still echoes a
    readable string request_id (session_id stays null, WIRE-9)."""
    async with open_server() as server:
        with trio.fail_after(WAIT):
            for first, code in (
                (
                    {"type": "task", "status": "ok", "request_id": "rq-1", "session_id": "s"},
                    "not_registered",
                ),
                (
                    {"type": "register", "status": 3, "request_id": "rq-1", "session_id": "s"},
                    "invalid_message",
                ),
            ):
                async with connect(server.url) as client:
                    await client.send(first)
                    frame = await client.recv()
                    assert frame["code"] == code
                    assert frame["response_id"] == "rq-1"
                    assert frame["session_id"] is None


async def test_ids_in_error_texts_are_truncated_scope4() -> None:
    """SCOPE-4: a client-supplied id is cut to 200 characters before it goes into an error text
    (REG-4 unknown target, DUP-2 duplicate id), then formatted with repr."""
    long_target = "t" * 150 + "u" * 350
    long_id = "d" * 120 + "e" * 380
    async with open_server(duplicate_policy="reject") as server:
        with trio.fail_after(WAIT):
            async with connect(server.url) as client:
                await client.send(
                    {"type": "register", "status": "ok", "client_type": "constellation",
                     "client_id": "c", "target_id": long_target}
                )  # fmt: skip
                check_error(
                    await client.recv(),
                    f"Target device {long_target[:200]!r} is not connected",
                    "unknown_target",
                )
            async with connect(server.url) as first, connect(server.url) as second:
                check_confirmation(await first.register(long_id))
                await second.send({"type": "register", "status": "ok", "client_id": long_id})
                check_error(
                    await second.recv(),
                    f"client_id {long_id[:200]!r} is already registered; "
                    "duplicate registrations are not allowed",
                    "duplicate_client_id",
                )
