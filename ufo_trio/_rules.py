"""The AIP acceptance rules as plain functions: no I/O, no awaits, no clock (h11's `_state.py`).

Each function takes the frame and the state it needs as plain values and returns a verdict; the
async handlers (`_handlers`, `_sessions`) look the state up, call the rule and act on the verdict
(write the ERROR, close, start the session). A `Reject` carries the exact wire text and code.
`tests/test_rules.py` tests every rule synchronously, citing its rule ID.

Covered: registration (REG-2 step 4, REG-3, REG-4, REG-6) and the duplicate policy (DUP-1…4),
identity pinning (ID-1/ID-2 with the heartbeat exemption), TASK acceptance (TASK-1…TASK-7, with
TASK-9's fail-fast flag), COMMAND_RESULTS matching (CMD-2…CMD-5) and device info (DI-1…DI-3).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Final

import attrs

from ._codec import quoted, truncate
from ._config import DuplicatePolicy
from ._messages import ClientMessage, ClientMessageType, ClientType, Result
from ._registry import ClientEntry

if TYPE_CHECKING:
    from collections.abc import Callable


@attrs.frozen
class Reject:
    """A refusal: the ERROR text and code, exactly as they go on the wire.

    `fail_fast` (TASK acceptance only): whether TASK-9's TASK_END may follow the ERROR; False for
    the refusals TASK-9 excludes (TASK-3, SESS-1, SESS-2).
    """

    error: str
    code: str
    fail_fast: bool = True


# ------------------------------------------------------------------------------ registration

SHUTTING_DOWN: Final = "Server shutting down"
EMPTY_CLIENT_ID: Final = Reject(
    "Registration requires a non-empty client_id", "invalid_registration"
)
#: REG-3: the platform of a client whose metadata names none.
DEFAULT_PLATFORM: Final = "windows"


def not_connected(target_id: str) -> Reject:
    """REG-4, TASK-2.3, TASK-7: the named device is not (or no longer) registered."""
    return Reject(f"Target device {quoted(target_id)} is not connected", "unknown_target")


def duplicate(client_id: str) -> Reject:
    """DUP-2 (and REG-6, DUP-4 when the old connection answers)."""
    return Reject(
        f"client_id {quoted(client_id)} is already registered; "
        "duplicate registrations are not allowed",
        "duplicate_client_id",
    )


def check_registration(
    msg: ClientMessage, lookup: Callable[[str], ClientEntry | None]
) -> Reject | None:
    """REG-2 step 4 and REG-4 for a REGISTER that passed the schema; None if it may go on.

    `lookup` finds a registered client by id (the registry's `get`).
    """
    if not msg.client_id:
        return EMPTY_CLIENT_ID
    target_id = registered_target(msg)
    if target_id is not None:
        target = lookup(target_id)
        if target is None or target.role is not ClientType.DEVICE:
            return not_connected(target_id)
    return None


def registered_target(msg: ClientMessage) -> str | None:
    """REG-4/REG-8: the `target_id` a constellation pins (None: unscoped); a device's is ignored."""
    if msg.client_type is ClientType.CONSTELLATION:
        return msg.target_id or None
    return None


def registered_platform(metadata: dict[str, Any] | None) -> str:
    """REG-3: `metadata.platform` if it is a non-empty string, otherwise `"windows"`."""
    platform = metadata.get("platform") if metadata else None
    return platform if type(platform) is str and platform else DEFAULT_PLATFORM


def registered_system_info(
    role: ClientType, metadata: dict[str, Any] | None
) -> dict[str, Any] | None:
    """REG-3: for devices only, `metadata.system_info` verbatim if it is an object."""
    if role is not ClientType.DEVICE or not metadata:
        return None
    info = metadata.get("system_info")
    return info if type(info) is dict else None


class Duplicate(enum.Enum):
    """What to do about the id of a REGISTER (§3.2)."""

    #: The id is free: confirm.
    NONE = "none"
    #: DUP-2 / REG-6: refuse the newcomer; the existing connection is left untouched.
    REJECT = "reject"
    #: DUP-4: ping the old connection; an answer means REJECT, silence TAKEOVER.
    PROBE = "probe"
    #: DUP-3: close the old connection (4001), wait for its cleanup, then confirm.
    TAKEOVER = "takeover"


def duplicate_decision(policy: DuplicatePolicy, *, reserved: bool, registered: bool) -> Duplicate:
    """REG-6 then DUP-1: the verdict for an id that is `reserved` by a pending registration
    and/or `registered` already, under `--duplicate-policy` `policy`."""
    if reserved:  # REG-6: whatever the policy
        return Duplicate.REJECT
    if not registered:
        return Duplicate.NONE
    if policy is DuplicatePolicy.REJECT:
        return Duplicate.REJECT
    if policy is DuplicatePolicy.PROBE:
        return Duplicate.PROBE
    return Duplicate.TAKEOVER


def after_probe(answered: bool) -> Duplicate:
    """DUP-4: a pong or any inbound frame in time means DUP-2, silence means DUP-3."""
    return Duplicate.REJECT if answered else Duplicate.TAKEOVER


# ----------------------------------------------------------------------------- identity (§3.3)

ID_CLIENT_MISMATCH: Final = Reject(
    "client_id does not match the registered connection", "identity_mismatch"
)
ID_TYPE_MISMATCH: Final = Reject(
    "client_type does not match the registered connection", "identity_mismatch"
)


def check_identity(client_id: str, role: ClientType, msg: ClientMessage) -> Reject | None:
    """ID-1, then ID-2 (not on heartbeats): None if the frame matches the pinned identity.

    Runs for every frame: no allocation (the verdicts are constants).
    """
    if msg.client_id and msg.client_id != client_id:  # ID-1, heartbeats included
        return ID_CLIENT_MISMATCH
    # ID-2; exempt on heartbeats, whose client_type Galaxy always sends as "device" (COMPAT-5).
    if msg.type is not ClientMessageType.HEARTBEAT and msg.client_type is not role:
        return ID_TYPE_MISMATCH
    return None


# ------------------------------------------------------------------------------ TASK (§4.1)


@attrs.frozen
class TaskAccepted:
    """TASK-1…TASK-6 passed: the executor (TASK-2/3) and the session id (TASK-4)."""

    executor: ClientEntry
    session_id: str


TOO_MANY_SESSIONS: Final = Reject("Too many running sessions for this client", "rate_limited")


def check_task(
    requester: ClientEntry,
    msg: ClientMessage,
    *,
    shutting_down: bool,
    lookup: Callable[[str], ClientEntry | None],
    owner_of: Callable[[str], str | None],
    new_session_id: Callable[[], str],
    live_sessions: int,
    max_sessions: int,
) -> TaskAccepted | Reject:
    """TASK-1…TASK-6, in the spec's order, for a TASK from `requester` (its pinned identity).

    `lookup` finds a registered client by id; `owner_of` gives the requester id of the live
    session with an id (None: no such session); `new_session_id` makes a `<uuid4>` (TASK-4);
    `live_sessions` is how many sessions `requester` already has running (TASK-6).
    TASK-7 (the agent factory, the executor closing) is the caller's: see `unsupported_platform`
    and `not_connected`.
    """
    if shutting_down:  # TASK-1
        return Reject(SHUTTING_DOWN, "shutting_down")
    target_id = msg.target_id or None
    if requester.role is ClientType.CONSTELLATION:  # TASK-2
        if target_id is None:
            return Reject("Constellation task requests require target_id", "missing_target")
        if requester.target_id is not None and target_id != requester.target_id:
            return Reject("Not authorized to dispatch tasks to this device", "not_authorized")
        target = lookup(target_id)
        if target is None:
            return not_connected(target_id)
        if target.role is not ClientType.DEVICE:
            return Reject("Constellation tasks may only target device clients", "invalid_target")
        executor = target
    else:  # TASK-3
        if target_id is not None and target_id != requester.client_id:
            return Reject(
                "Device clients may not target other devices", "not_authorized", fail_fast=False
            )
        executor = requester
    session_id = msg.session_id or new_session_id()  # TASK-4
    owner = owner_of(session_id)
    if owner is not None:  # TASK-5
        if owner != requester.client_id:  # SESS-1
            return Reject(
                f"session_id {quoted(session_id)} is owned by another client",
                "session_owned",
                fail_fast=False,
            )
        return Reject(  # SESS-2
            f"session_id {quoted(session_id)} is already running",
            "session_running",
            fail_fast=False,
        )
    if live_sessions >= max_sessions:  # TASK-6
        return TOO_MANY_SESSIONS
    return TaskAccepted(executor, session_id)


def unsupported_platform(platform: str) -> Reject:
    """TASK-7: the agent factory refused the executor's platform."""
    return Reject(f"Service session not supported on {platform}", "unsupported_platform")


def task_end_after_reject(
    reject: Reject, role: ClientType, session_id: str | None, *, live: bool
) -> bool:
    """TASK-9: whether a TASK_END follows the refusal's ERROR.

    Only for a constellation that named a session id, only for the refusals TASK-9 lists, and
    never with the id of a live session (`live`): that would read as its end.
    """
    return reject.fail_fast and role is ClientType.CONSTELLATION and bool(session_id) and not live


# ------------------------------------------------------------------------ COMMAND_RESULTS (§4.4)

INVALID_RESULTS: Final = "invalid command results from executor"


class Match(enum.Enum):
    """What COMMAND_RESULTS does to its waiter (CMD-2…CMD-5)."""

    #: CMD-2/3/4: dropped silently.
    DROP = "drop"
    #: CMD-5: a list with one Result per Command: the waiter gets it as received.
    RESOLVE = "resolve"
    #: CMD-5: anything else: ERROR `invalid_results` to the sender, synthetic failures (CMD-7)
    #: to the waiter.
    INVALID = "invalid"


def match_results(
    *,
    session_live: bool,
    from_executor: bool,
    waiter_pending: bool,
    expected: int,
    results: list[Result] | None,
) -> Match:
    """CMD-2…CMD-5 for one COMMAND_RESULTS frame.

    `session_live`: a live session has the frame's `session_id`; `from_executor`: the sender is
    that session's executor connection; `waiter_pending`: `prev_response_id` names a waiter of
    that session that is still pending; `expected`: how many Commands that waiter sent.
    """
    if not session_live or not from_executor:  # CMD-2, CMD-3
        return Match.DROP
    if not waiter_pending:  # CMD-4
        return Match.DROP
    if results is None or len(results) != expected:  # CMD-5
        return Match.INVALID
    return Match.RESOLVE


def invalid_results(expected: int) -> Reject:
    """CMD-5: the ERROR the sender of a malformed COMMAND_RESULTS gets."""
    return Reject(
        f"Invalid command results: expected a list of {expected} results", "invalid_results"
    )


# ------------------------------------------------------------------------------ device info (§5)

DI_NOT_CONSTELLATION: Final = Reject(
    "DEVICE_INFO_REQUEST is permitted only for constellation clients", "not_authorized"
)
DI_NOT_AUTHORIZED: Final = Reject(
    "Not authorized to request device info for this device", "not_authorized"
)


@attrs.frozen
class DeviceInfo:
    """DI-3: the `result` of the DEVICE_INFO_RESPONSE."""

    result: Any


def device_info(
    requester: ClientEntry, target_id: str | None, lookup: Callable[[str], ClientEntry | None]
) -> Reject | DeviceInfo:
    """DI-1, DI-2, then DI-3: a refusal, or the answer.

    The answer comes from the registration cache (`lookup`); the device is never contacted.
    """
    if requester.role is not ClientType.CONSTELLATION:  # DI-1
        return DI_NOT_CONSTELLATION
    if requester.target_id is not None and target_id != requester.target_id:  # DI-2
        return DI_NOT_AUTHORIZED
    target = lookup(target_id) if target_id else None
    if target is not None and target.role is ClientType.DEVICE and target.system_info is not None:
        return DeviceInfo(target.system_info)
    shown = truncate(target_id) if target_id is not None else "None"
    return DeviceInfo({"error": f"Device {shown} not found or no system info available"})
