"""Direct unit tests of the server's pure helpers: `Registry`, `TokenBucket`, `ResultStore`,
`credential_ok` / `origin_ok`, and `Shutdown` (time passed in or read from a MockClock)."""

from __future__ import annotations

import json
import math

import h11
import pytest
import trio
import trio.testing

from ufo_trio._context import Auth, Shutdown
from ufo_trio._endpoint import RequestHead, credential_ok, origin_ok
from ufo_trio._limits import TokenBucket
from ufo_trio._messages import ClientType, TaskStatus
from ufo_trio._registry import ClientEntry, Registry
from ufo_trio._sessions import ResultStore, SessionRecord

# ------------------------------------------------------------------------------ Registry


def entry(client_id: str, role: ClientType = ClientType.DEVICE) -> ClientEntry:
    return ClientEntry(
        client_id=client_id,
        role=role,
        platform="windows",
        metadata=None,
        system_info=None,
        target_id=None,
        connection=None,  # type: ignore[arg-type]  # the registry never touches it
        connected_at=0.0,
    )


def test_registry_keeps_registration_order_for_both_roles() -> None:
    """HTTP-1: every registered id, devices and constellations, in registration order."""
    registry = Registry()
    for e in (entry("b"), entry("a", ClientType.CONSTELLATION), entry("c")):
        registry.add(e)
    assert registry.online_ids() == ["b", "a", "c"]
    assert [e.client_id for e in registry] == ["b", "a", "c"]
    assert len(registry) == 3
    assert registry.get("a") is not None
    assert registry.get("zz") is None


def test_registry_remove_only_own_epoch() -> None:
    """DUP-5: cleanup of an old epoch never removes the entry of a newer one."""
    registry = Registry()
    old = entry("dev")
    registry.add(old)
    assert registry.remove(old)
    new = entry("dev")
    registry.add(new)
    assert new.epoch > old.epoch
    assert not registry.remove(old)  # the old connection's late cleanup
    assert registry.get("dev") is new
    assert registry.remove(new)
    assert registry.online_ids() == []


def test_registry_reservation_is_separate_from_entries() -> None:
    """REG-6: a reserved id is not registered (not online) until the verdict adds it."""
    registry = Registry()
    registry.reserve("dev")
    assert registry.is_reserved("dev")
    assert registry.get("dev") is None
    assert registry.online_ids() == []
    registry.release("dev")
    assert not registry.is_reserved("dev")
    registry.release("dev")  # releasing twice is harmless (the `finally` of a refusal)


def test_registry_iteration_is_a_snapshot() -> None:
    """Iterating while entries come and go (teardown during shutdown) must not fail."""
    registry = Registry()
    a, b = entry("a"), entry("b")
    registry.add(a)
    registry.add(b)
    seen = []
    for e in registry:
        registry.remove(e)
        seen.append(e.client_id)
    assert seen == ["a", "b"]
    assert len(registry) == 0


# ------------------------------------------------------------------------------ TokenBucket


def test_token_bucket_starts_full_then_runs_dry() -> None:
    """--message-burst frames at once, then one more is refused at the same instant."""
    bucket = TokenBucket(rate=10.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_token_bucket_refills_at_rate_up_to_burst() -> None:
    """`rate` tokens per second, never more than `burst` stored."""
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    for _ in range(3):
        assert bucket.take(0.0)
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)  # 0.05 s more: one whole token
    assert not bucket.take(0.1)
    # A long idle time refills only up to the burst.
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]


def test_token_bucket_ignores_time_going_backwards() -> None:
    """A stamp earlier than the last one adds nothing (and takes nothing away)."""
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


# ------------------------------------------------------------------------------ ResultStore


def record(
    session_id: str, task_name: str, status: TaskStatus = TaskStatus.COMPLETED
) -> SessionRecord:
    return SessionRecord(
        session_id=session_id,
        task_name=task_name,
        status=status,
        error=None,
        result=session_id,
        finished_at="",
    )


def test_result_store_by_id_and_latest_by_name() -> None:
    """RES-1, NAME-2: found by session id and by task name; the latest record of a name wins."""
    store = ResultStore(10)
    first, second = record("s1", "job"), record("s2", "job", TaskStatus.FAILED)
    store.add(first)
    store.add(second)
    assert store.by_session_id("s1") is first
    assert store.by_task_name("job") is second
    assert store.by_task_name("other") is None
    assert len(store) == 2


def test_result_store_is_bounded_oldest_first() -> None:
    """LIM-8: beyond its size the oldest record goes, and with it its name, unless a newer
    record holds that name."""
    store = ResultStore(2)
    store.add(record("s1", "a"))
    store.add(record("s2", "b"))
    store.add(record("s3", "a"))  # "a" now points at s3
    store.add(record("s4", "c"))  # evicts s1 (name "a" is s3's, kept) and then nothing else
    assert len(store) == 2
    assert store.by_session_id("s1") is None
    assert store.by_session_id("s2") is None
    by_a = store.by_task_name("a")
    assert by_a is not None
    assert by_a.session_id == "s3"
    assert store.by_task_name("b") is None  # evicted with s2
    store.add(record("s5", "d"))  # evicts s3, which owns "a"
    assert store.by_task_name("a") is None


def test_result_store_re_adding_an_id_refreshes_it() -> None:
    """A session id stored again moves to the young end instead of being evicted first."""
    store = ResultStore(2)
    store.add(record("s1", "a"))
    store.add(record("s2", "b"))
    store.add(record("s1", "a2"))
    store.add(record("s3", "c"))  # evicts s2, the oldest now
    assert store.by_session_id("s1") is not None
    assert store.by_session_id("s2") is None


# ------------------------------------------------------------------------------ credentials


def head(target: str, *headers: tuple[str, str]) -> RequestHead:
    request = h11.Request(method="GET", target=target, headers=[("host", "x"), *headers])
    return RequestHead(h11.Connection(h11.SERVER), request, b"")


KEY = b"s3cret"


def test_credential_ok_token_query_parameter() -> None:
    """AUTH-2: exactly one `token` query parameter equal to the key."""
    assert credential_ok(head("/ws?token=s3cret"), KEY)
    assert not credential_ok(head("/ws?token=wrong"), KEY)
    assert not credential_ok(head("/ws?token=s3cret&token=s3cret"), KEY)  # not exactly one
    assert not credential_ok(head("/ws"), KEY)
    assert not credential_ok(head("/ws?token="), KEY)


def test_credential_ok_bearer_header() -> None:
    """AUTH-2: `Authorization: Bearer <key>` (scheme case-insensitive, extra spaces ignored)."""
    assert credential_ok(head("/ws", ("authorization", "Bearer s3cret")), KEY)
    assert credential_ok(head("/ws", ("authorization", "bearer   s3cret")), KEY)
    assert not credential_ok(head("/ws", ("authorization", "Basic s3cret")), KEY)
    assert not credential_ok(head("/ws", ("authorization", "Bearer nope")), KEY)
    # Either credential is enough.
    assert credential_ok(head("/ws?token=wrong", ("authorization", "Bearer s3cret")), KEY)


def test_credential_ok_never_for_an_empty_key() -> None:
    """An empty key authenticates nobody, not even an empty token."""
    assert not credential_ok(head("/ws?token="), b"")
    assert not credential_ok(head("/ws", ("authorization", "Bearer")), b"")


def test_origin_ok() -> None:
    """AUTH-1(a): no Origin, or every Origin listed (case-insensitive, trimmed)."""
    allowed = Auth.build("k", (" https://OK.example ",)).allowed_origins
    assert allowed == frozenset({"https://ok.example"})
    assert origin_ok(head("/ws"), allowed)
    assert origin_ok(head("/ws", ("origin", "HTTPS://ok.example")), allowed)
    assert not origin_ok(head("/ws", ("origin", "https://evil.example")), allowed)
    assert not origin_ok(
        head("/ws", ("origin", "https://ok.example"), ("origin", "https://evil.example")), allowed
    )


def test_auth_build_keeps_the_key_bytes() -> None:
    """The key is compared as bytes; a lone surrogate survives (surrogateescape)."""
    assert Auth.build("s3cret", ()).api_key == b"s3cret"
    assert Auth.build("a\udcff", ()).api_key == b"a\xff"


# ------------------------------------------------------------------------------ Shutdown


async def test_shutdown_bounded_by_seconds_then_by_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SHUT-2: a bounded wait gives up after its own seconds, or at the grace deadline if sooner."""
    shutdown = Shutdown()
    assert not shutdown.started
    assert shutdown.deadline == math.inf
    start = trio.current_time()
    with shutdown.bounded(3.0) as scope:
        await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() == start + 3.0
    deadline = shutdown.begin(2.0)
    assert shutdown.started
    assert deadline == shutdown.deadline == start + 5.0
    with shutdown.bounded(30.0):
        await trio.sleep_forever()
    assert trio.current_time() == start + 5.0
    with shutdown.bounded(30.0) as late:  # already past the deadline: gives up at once
        await trio.sleep_forever()
    assert late.cancelled_caught
    assert trio.current_time() == start + 5.0


@pytest.mark.parametrize("status", list(TaskStatus))
def test_enums_are_their_wire_strings(status: TaskStatus) -> None:
    """The wire enums are StrEnums: a member equals and serialises as its wire string, which is
    what the HTTP API and the result store rely on (requester_type, SessionRecord.status)."""
    assert status == status.value
    assert json.dumps({"s": status}) == json.dumps({"s": status.value})
