"""The AIP acceptance rules of `ufo_trio._rules`, tested synchronously (no sockets, no clock).

Each test cites the PROTOCOL.md rule it checks. The wire-level tests (test_sessions_*.py,
test_blackbox_*.py) check the same rules end to end; these pin the decision itself, including
its order, with plain values.
"""

from __future__ import annotations

from typing import Any

import pytest

from ufo_trio._config import DuplicatePolicy
from ufo_trio._messages import (
    ClientMessage,
    ClientMessageType,
    ClientType,
    Result,
    ResultStatus,
    TaskStatus,
)
from ufo_trio._registry import ClientEntry
from ufo_trio._rules import (
    DI_NOT_AUTHORIZED,
    DI_NOT_CONSTELLATION,
    EMPTY_CLIENT_ID,
    ID_CLIENT_MISMATCH,
    ID_TYPE_MISMATCH,
    SHUTTING_DOWN,
    TOO_MANY_SESSIONS,
    DeviceInfo,
    Duplicate,
    Match,
    Reject,
    TaskAccepted,
    after_probe,
    check_identity,
    check_registration,
    check_task,
    device_info,
    duplicate,
    duplicate_decision,
    invalid_results,
    match_results,
    not_connected,
    registered_platform,
    registered_system_info,
    registered_target,
    task_end_after_reject,
    unsupported_platform,
)

DEVICE, CONSTELLATION = ClientType.DEVICE, ClientType.CONSTELLATION


def entry(
    client_id: str,
    role: ClientType = DEVICE,
    *,
    target_id: str | None = None,
    platform: str = "windows",
    system_info: dict[str, Any] | None = None,
) -> ClientEntry:
    return ClientEntry(
        client_id=client_id,
        role=role,
        platform=platform,
        metadata=None,
        system_info=system_info,
        target_id=target_id,
        connection=None,  # type: ignore[arg-type]  # the rules never touch the connection
        connected_at=0.0,
    )


def frame(kind: ClientMessageType = ClientMessageType.TASK, **fields: Any) -> ClientMessage:
    return ClientMessage(type=kind, status=TaskStatus.CONTINUE, **fields)


def register(**fields: Any) -> ClientMessage:
    return frame(ClientMessageType.REGISTER, **fields)


# ------------------------------------------------------------------------------ registration


def test_reg2_empty_client_id_is_refused_first() -> None:
    """REG-2 step 4: a null or empty client_id, before the target check of REG-4."""
    lookup: dict[str, ClientEntry] = {}
    for msg in (register(), register(client_id="")):
        assert check_registration(msg, lookup.get) == EMPTY_CLIENT_ID
    refusal = check_registration(
        register(client_type=CONSTELLATION, target_id="nobody"), lookup.get
    )
    assert refusal == Reject("Registration requires a non-empty client_id", "invalid_registration")


def test_reg4_constellation_target_must_be_a_registered_device() -> None:
    """REG-4: a constellation's non-empty target_id must name a registered device."""
    online = {"dev-1": entry("dev-1"), "c-1": entry("c-1", CONSTELLATION)}
    ok = register(client_id="c-2", client_type=CONSTELLATION, target_id="dev-1")
    assert check_registration(ok, online.get) is None
    for target in ("missing", "c-1"):
        msg = register(client_id="c-2", client_type=CONSTELLATION, target_id=target)
        assert check_registration(msg, online.get) == Reject(
            f"Target device {target!r} is not connected", "unknown_target"
        )


def test_reg4_unscoped_constellation_and_device_target_ignored() -> None:
    """REG-4: no target_id → unscoped; a device's target_id is ignored (unchecked, unpinned)."""
    assert check_registration(register(client_id="c", client_type=CONSTELLATION), {}.get) is None
    assert (
        registered_target(register(client_id="c", client_type=CONSTELLATION, target_id="")) is None
    )
    device = register(client_id="d", target_id="whatever")
    assert check_registration(device, {}.get) is None
    assert registered_target(device) is None
    scoped = register(client_id="c", client_type=CONSTELLATION, target_id="dev-1")
    assert registered_target(scoped) == "dev-1"


def test_reg4_target_text_is_truncated_repr() -> None:
    """REG-4 with SCOPE-4: the id in the error is `repr` of the id cut to 200 characters."""
    long_id = "x" * 500
    refusal = not_connected(long_id)
    assert refusal.error == f"Target device {'x' * 200!r} is not connected"


def test_reg3_platform_defaults_to_windows() -> None:
    """REG-3: metadata.platform if it is a non-empty string, otherwise "windows"."""
    assert registered_platform({"platform": "linux"}) == "linux"
    for metadata in (None, {}, {"platform": ""}, {"platform": 3}, {"platform": None}):
        assert registered_platform(metadata) == "windows"


def test_reg3_system_info_only_for_devices_and_only_objects() -> None:
    """REG-3: system info is stored verbatim for devices, only if it is an object."""
    info = {"cpu": 8}
    assert registered_system_info(DEVICE, {"system_info": info}) is info
    assert registered_system_info(CONSTELLATION, {"system_info": info}) is None
    for metadata in (None, {}, {"system_info": [1]}, {"system_info": "x"}):
        assert registered_system_info(DEVICE, metadata) is None


@pytest.mark.parametrize("policy", list(DuplicatePolicy))
def test_reg6_reserved_id_is_refused_under_every_policy(policy: DuplicatePolicy) -> None:
    """REG-6: a reserved id is rejected as in DUP-2, whatever the policy."""
    for registered in (False, True):
        assert duplicate_decision(policy, reserved=True, registered=registered) is Duplicate.REJECT


@pytest.mark.parametrize("policy", list(DuplicatePolicy))
def test_dup1_free_id_is_confirmed(policy: DuplicatePolicy) -> None:
    """DUP-1 applies only to an id that is already registered."""
    assert duplicate_decision(policy, reserved=False, registered=False) is Duplicate.NONE


def test_dup1_policy_decides_for_a_registered_id() -> None:
    """DUP-2 reject, DUP-3 takeover, DUP-4 probe."""
    decide = duplicate_decision
    assert decide(DuplicatePolicy.REJECT, reserved=False, registered=True) is Duplicate.REJECT
    assert decide(DuplicatePolicy.TAKEOVER, reserved=False, registered=True) is Duplicate.TAKEOVER
    assert decide(DuplicatePolicy.PROBE, reserved=False, registered=True) is Duplicate.PROBE


def test_dup4_probe_answer_decides() -> None:
    """DUP-4: an answer within the patience means DUP-2; silence means DUP-3."""
    assert after_probe(True) is Duplicate.REJECT
    assert after_probe(False) is Duplicate.TAKEOVER


def test_dup2_text_and_code() -> None:
    """DUP-2: the exact text, with the id as `repr`."""
    assert duplicate("dev 1") == Reject(
        "client_id 'dev 1' is already registered; duplicate registrations are not allowed",
        "duplicate_client_id",
    )


# ------------------------------------------------------------------------------ identity


def test_id1_other_client_id_is_refused_even_on_heartbeats() -> None:
    """ID-1: a non-empty client_id that differs from the pinned id; heartbeats included."""
    for kind in (ClientMessageType.HEARTBEAT, ClientMessageType.TASK):
        msg = frame(kind, client_id="intruder")
        assert check_identity("dev-1", DEVICE, msg) is ID_CLIENT_MISMATCH
    assert ID_CLIENT_MISMATCH == Reject(
        "client_id does not match the registered connection", "identity_mismatch"
    )


def test_id1_absent_or_same_client_id_passes() -> None:
    """ID-1: only a *non-empty* differing client_id is refused."""
    for client_id in (None, "", "dev-1"):
        assert check_identity("dev-1", DEVICE, frame(client_id=client_id)) is None


def test_id2_other_role_is_refused() -> None:
    """ID-2: a client_type (default device) that differs from the pinned role."""
    assert check_identity("c-1", CONSTELLATION, frame()) is ID_TYPE_MISMATCH  # default "device"
    assert check_identity("d-1", DEVICE, frame(client_type=CONSTELLATION)) is ID_TYPE_MISMATCH
    assert check_identity("c-1", CONSTELLATION, frame(client_type=CONSTELLATION)) is None
    assert ID_TYPE_MISMATCH == Reject(
        "client_type does not match the registered connection", "identity_mismatch"
    )


def test_id2_heartbeat_exemption_for_galaxy() -> None:
    """ID-2 exception (COMPAT-5): Galaxy's heartbeats carry client_type "device" whatever the
    role; on heartbeats the role is ignored, but ID-1 still applies."""
    heartbeat = frame(ClientMessageType.HEARTBEAT, client_id="c-1", client_type=DEVICE)
    assert check_identity("c-1", CONSTELLATION, heartbeat) is None
    assert check_identity("c-2", CONSTELLATION, heartbeat) is ID_CLIENT_MISMATCH


def test_id1_before_id2() -> None:
    """§3.3: the checks apply in order; a frame wrong on both counts gets the ID-1 text."""
    msg = frame(client_id="other", client_type=CONSTELLATION)
    assert check_identity("dev-1", DEVICE, msg) is ID_CLIENT_MISMATCH


# ------------------------------------------------------------------------------ TASK

_COUNTER = iter(range(1_000_000))


def task(
    requester: ClientEntry,
    *,
    online: dict[str, ClientEntry] | None = None,
    owners: dict[str, str] | None = None,
    shutting_down: bool = False,
    live_sessions: int = 0,
    max_sessions: int = 64,
    **fields: Any,
) -> TaskAccepted | Reject:
    registry = {requester.client_id: requester, **(online or {})}
    return check_task(
        requester,
        frame(**fields),
        shutting_down=shutting_down,
        lookup=registry.get,
        owner_of=(owners or {}).get,
        new_session_id=lambda: f"generated-{next(_COUNTER)}",
        live_sessions=live_sessions,
        max_sessions=max_sessions,
    )


DEV = entry("dev-1")
DEV2 = entry("dev-2")
UNSCOPED = entry("c-1", CONSTELLATION)
SCOPED = entry("c-2", CONSTELLATION, target_id="dev-1")


def test_task1_shutting_down_comes_first() -> None:
    """TASK-1: `Server shutting down` (`shutting_down`), before every other check."""
    refusal = task(UNSCOPED, shutting_down=True)  # would also miss its target (TASK-2.1)
    assert refusal == Reject(SHUTTING_DOWN, "shutting_down")
    assert SHUTTING_DOWN == "Server shutting down"


def test_task2_constellation_checks_in_order() -> None:
    """TASK-2.1…2.4 for a constellation requester, in the spec's order."""
    online = {"dev-1": DEV, "c-9": entry("c-9", CONSTELLATION)}
    assert task(UNSCOPED, online=online) == Reject(
        "Constellation task requests require target_id", "missing_target"
    )
    assert task(SCOPED, online=online, target_id="dev-2") == Reject(
        "Not authorized to dispatch tasks to this device", "not_authorized"
    )
    assert task(UNSCOPED, online=online, target_id="dev-2") == Reject(
        "Target device 'dev-2' is not connected", "unknown_target"
    )
    assert task(UNSCOPED, online=online, target_id="c-9") == Reject(
        "Constellation tasks may only target device clients", "invalid_target"
    )


def test_task2_executor_is_the_target() -> None:
    """TASK-2: executor = the target's connection (its entry), for scoped and unscoped."""
    for requester in (UNSCOPED, SCOPED):
        verdict = task(requester, online={"dev-1": DEV}, target_id="dev-1", session_id="s")
        assert verdict == TaskAccepted(DEV, "s")


def test_task2_scope_checked_before_target_lookup() -> None:
    """TASK-2.2 precedes 2.3: a scoped constellation naming another, missing device is told it is
    not authorised, not that the device is missing."""
    refusal = task(SCOPED, target_id="nowhere")
    assert isinstance(refusal, Reject)
    assert refusal.code == "not_authorized"


def test_task3_device_runs_on_itself() -> None:
    """TASK-3: a device may name no target or itself; any other target is refused."""
    assert task(DEV, session_id="s") == TaskAccepted(DEV, "s")
    assert task(DEV, target_id="dev-1", session_id="s") == TaskAccepted(DEV, "s")
    assert task(DEV, online={"dev-2": DEV2}, target_id="dev-2") == Reject(
        "Device clients may not target other devices", "not_authorized", fail_fast=False
    )


def test_task4_session_id_as_sent_or_generated() -> None:
    """TASK-4: the frame's session_id exactly as sent if non-empty, otherwise a new one."""
    accepted = task(DEV, session_id=" odd id ")
    assert isinstance(accepted, TaskAccepted)
    assert accepted.session_id == " odd id "
    for sid in (None, ""):
        generated = task(DEV, session_id=sid)
        assert isinstance(generated, TaskAccepted)
        assert generated.session_id.startswith("generated-")


def test_task5_live_session_conflicts() -> None:
    """TASK-5: SESS-1 (another owner) and SESS-2 (same owner); never fail-fast (TASK-9)."""
    assert task(DEV, owners={"s": "someone"}, session_id="s") == Reject(
        "session_id 's' is owned by another client", "session_owned", fail_fast=False
    )
    assert task(DEV, owners={"s": "dev-1"}, session_id="s") == Reject(
        "session_id 's' is already running", "session_running", fail_fast=False
    )


def test_task6_live_session_limit() -> None:
    """TASK-6: at the limit, `Too many running sessions for this client` (`rate_limited`)."""
    assert isinstance(task(DEV, live_sessions=63, max_sessions=64), TaskAccepted)
    assert task(DEV, live_sessions=64, max_sessions=64) is TOO_MANY_SESSIONS
    assert TOO_MANY_SESSIONS == Reject("Too many running sessions for this client", "rate_limited")


def test_task5_before_task6() -> None:
    """§4.1 order: a duplicate session id is reported even when the limit is also reached."""
    refusal = task(DEV, owners={"s": "dev-1"}, session_id="s", live_sessions=64, max_sessions=64)
    assert isinstance(refusal, Reject)
    assert refusal.code == "session_running"


def test_task7_texts() -> None:
    """TASK-7: the agent factory refused the platform; the executor began closing."""
    assert unsupported_platform("mobile") == Reject(
        "Service session not supported on mobile", "unsupported_platform"
    )
    assert not_connected("dev-1") == Reject(
        "Target device 'dev-1' is not connected", "unknown_target"
    )


def test_task9_fail_fast_only_where_allowed() -> None:
    """TASK-9: a TASK_END follows the ERROR only for a constellation that named a session id,
    only for TASK-1/2/6/7 refusals, and never with a live session's id."""
    shutting = Reject(SHUTTING_DOWN, "shutting_down")
    assert task_end_after_reject(shutting, CONSTELLATION, "s", live=False)
    assert not task_end_after_reject(shutting, DEVICE, "s", live=False)
    assert not task_end_after_reject(shutting, CONSTELLATION, None, live=False)
    assert not task_end_after_reject(shutting, CONSTELLATION, "", live=False)
    assert not task_end_after_reject(shutting, CONSTELLATION, "s", live=True)
    sess = task(
        UNSCOPED, online={"dev-1": DEV}, owners={"s": "x"}, target_id="dev-1", session_id="s"
    )
    assert isinstance(sess, Reject)
    assert not task_end_after_reject(sess, CONSTELLATION, "s", live=False)


# ------------------------------------------------------------------------------ COMMAND_RESULTS

OK = Result(status=ResultStatus.SUCCESS)


def results(**overrides: Any) -> Match:
    args: dict[str, Any] = {
        "session_live": True,
        "from_executor": True,
        "waiter_pending": True,
        "expected": 2,
        "results": [OK, OK],
    }
    args.update(overrides)
    return match_results(**args)


def test_cmd5_matching_list_resolves() -> None:
    """CMD-5: a list with one Result per Command resolves the waiter as received."""
    assert results() is Match.RESOLVE


def test_cmd2_unknown_session_is_dropped() -> None:
    """CMD-2: no live session with that id → dropped silently, whatever else the frame holds."""
    assert results(session_live=False, from_executor=False, results=None) is Match.DROP


def test_cmd3_not_the_executor_is_dropped() -> None:
    """CMD-3: a sender that is not the session's executor is dropped silently."""
    assert results(from_executor=False, results=None) is Match.DROP


def test_cmd4_no_pending_waiter_is_dropped() -> None:
    """CMD-4: an unknown, resolved or timed-out waiter → dropped, even if the list is wrong."""
    assert results(waiter_pending=False, results=[OK]) is Match.DROP


def test_cmd5_wrong_length_or_missing_list_is_invalid() -> None:
    """CMD-5: anything but exactly one entry per Command is invalid; the sender gets an ERROR."""
    for bad in (None, [], [OK], [OK, OK, OK]):
        assert results(results=bad) is Match.INVALID
    assert invalid_results(2) == Reject(
        "Invalid command results: expected a list of 2 results", "invalid_results"
    )


# ------------------------------------------------------------------------------ device info


def test_di1_only_constellations_may_ask() -> None:
    """DI-1: any other sender gets `not_authorized`."""
    assert device_info(DEV, "dev-1", {"dev-1": DEV}.get) is DI_NOT_CONSTELLATION
    assert DI_NOT_CONSTELLATION == Reject(
        "DEVICE_INFO_REQUEST is permitted only for constellation clients", "not_authorized"
    )


def test_di2_scoped_constellation_may_ask_only_about_its_target() -> None:
    """DI-2: a scoped constellation asking about another id is refused; unscoped may ask any."""
    other = entry("dev-2", system_info={"os": "linux"})
    online = {"dev-2": other}
    assert device_info(SCOPED, "dev-2", online.get) is DI_NOT_AUTHORIZED
    assert device_info(SCOPED, None, online.get) is DI_NOT_AUTHORIZED
    assert device_info(UNSCOPED, "dev-2", online.get) == DeviceInfo({"os": "linux"})
    assert DI_NOT_AUTHORIZED == Reject(
        "Not authorized to request device info for this device", "not_authorized"
    )


def test_di3_answer_from_the_registration_cache() -> None:
    """DI-3: the stored system_info; otherwise an `error` object naming the raw id (or None)."""
    info = {"cpu": 4}
    online = {
        "dev-1": entry("dev-1", system_info=info),
        "bare": entry("bare"),
        "c-9": entry("c-9", CONSTELLATION, system_info={"x": 1}),
    }
    answer = device_info(UNSCOPED, "dev-1", online.get)
    assert isinstance(answer, DeviceInfo)
    assert answer.result is info
    for target in ("bare", "c-9", "missing"):
        assert device_info(UNSCOPED, target, online.get) == DeviceInfo(
            {"error": f"Device {target} not found or no system info available"}
        )
    assert device_info(UNSCOPED, None, online.get) == DeviceInfo(
        {"error": "Device None not found or no system info available"}
    )
