"""Hypothesis against one live server: valid, near-valid and junk input, WebSocket and HTTP.

One server runs for the whole module, in its own thread with its own `trio.run`, on a real
socket on 127.0.0.1; every example is a fresh client in a fresh `trio.run`. So state left by
one example (sessions, registry entries, half-finished teardowns) is there for the next, as on a
real server. The properties:

* the server never crashes and logs no error (no `ERROR` record from `ufo_trio` at all);
* every frame a client sends is answered or the connection is closed: after each fuzz frame a
  sentinel frame must get its answer (replies come in request order, PROC-2), or a close must
  arrive with a code that frame explains (1003 binary, 1009 oversize);
* every frame the server sends is a well-formed ServerMessage (WIRE-3, COMPAT-4);
* every HTTP request gets a well-formed JSON answer with an expected status, or a close, and
  the server closes once the client has half-closed;
* after each example a well-formed client still registers, and gets its heartbeat acked;
* at the end, nothing is left: no connection, registry entry, session or TCP stream.

`UFO_TRIO_FUZZ_EXAMPLES` sets the number of examples per property (default 150).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import pytest
import trio
from blackbox_helpers import CLIENT_TYPES, STATUSES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_helpers import (
    Closed,
    WireClient,
    assert_server_frame,
    close_leftovers,
    http_request,
    raw_http,
)

from ufo_trio.testing import TEST_KEY, open_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ufo_trio._server import Server

EXAMPLES = int(os.environ.get("UFO_TRIO_FUZZ_EXAMPLES", "150"))
MAX_MESSAGE = 8 * 1024
SELF = "$SELF"  # replaced by the example's own client id
#: How many examples ran, per property, and what came back (reported by the last test).
COUNTS = {"websocket": 0, "http": 0}
SEEN: collections.Counter[str] = collections.Counter()

ERROR_CODES = {
    "invalid_message", "unknown_type", "not_registered", "invalid_registration",
    "registration_timeout", "unknown_target", "duplicate_client_id", "identity_mismatch",
    "missing_target", "not_authorized", "invalid_target", "session_owned", "session_running",
    "rate_limited", "unsupported_platform", "shutting_down", "invalid_results",
    "binary_not_supported", "client_error",
}  # fmt: skip


# ------------------------------------------------------------------------------- the server


class ServerThread:
    """A server in its own thread and trio run, for the whole module."""

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.server: Server | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.errors: list[str] = []
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        async with open_server(**self.config) as server:
            self.server = server
            self.token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "server did not start"

    def stop(self) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(10)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port


class _ErrorRecords(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record))


@pytest.fixture(scope="module")
def live() -> Iterator[ServerThread]:
    thread = ServerThread(max_message_size=MAX_MESSAGE)
    handler = _ErrorRecords(thread.errors)
    logger = logging.getLogger("ufo_trio")
    logger.addHandler(handler)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()
        logger.removeHandler(handler)
        close_leftovers()


# ------------------------------------------------------------------------------ frame strategies

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
short = st.text(max_size=12)
maybe_str = st.none() | short
command = st.fixed_dictionaries(
    {"tool_name": short, "tool_type": st.sampled_from(["action", "data_collection"])},
    optional={"parameters": st.none() | st.dictionaries(short, json_values, max_size=2),
              "call_id": maybe_str},
)  # fmt: skip
result = st.fixed_dictionaries(
    {"status": st.sampled_from(["success", "failure", "skipped", "none"])},
    optional={"error": maybe_str, "result": json_values, "namespace": maybe_str,
              "call_id": maybe_str},
)  # fmt: skip
plan = st.builds(
    lambda steps, on_failure: json.dumps({"steps": steps, "on_failure": on_failure}),
    st.lists(st.lists(command, min_size=1, max_size=2), max_size=2),
    st.sampled_from(["stop", "continue", "bogus"]),
)
valid_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(CLIENT_TYPES), "status": st.sampled_from(STATUSES)},
    optional={
        "client_type": st.sampled_from(["device", "constellation"]),
        "client_id": st.sampled_from([SELF, SELF, None, "", "someone-else"]),
        "session_id": st.none() | st.sampled_from(["s-1", "s-2", "demo@task_1"]) | short,
        "task_name": st.none() | st.sampled_from(["../escape", "a/b", "..", "t-1"]) | short,
        "target_id": st.none() | st.sampled_from([SELF, "nobody", ""]),
        "request": st.none() | plan | short,
        "action_results": st.none() | st.lists(result, max_size=3),
        "timestamp": maybe_str,
        "request_id": maybe_str,
        "prev_response_id": maybe_str,
        "error": st.none() | st.text(max_size=400),
        "metadata": st.none() | st.dictionaries(short, json_values, max_size=3),
    },
)
SCHEMA_KEYS = [
    "type", "status", "client_type", "client_id", "session_id", "task_name", "target_id",
    "request", "action_results", "timestamp", "request_id", "prev_response_id", "error",
    "metadata",
]  # fmt: skip


def _mutate(frame: dict[str, Any], key: str, value: Any, how: str) -> Any:
    frame = dict(frame)
    if how == "set":
        frame[key] = value
    elif how == "delete":
        frame.pop(key, None)
    elif how == "upper":
        frame[key] = str(frame.get(key, "")).upper()
    elif how == "nest":
        return [frame]
    elif how == "results":
        frame["action_results"] = [value, {"status": value}]
    return frame


near_valid_frames = st.builds(
    _mutate,
    valid_frames,
    st.sampled_from(SCHEMA_KEYS),
    json_values,
    st.sampled_from(["set", "set", "delete", "upper", "nest", "results"]),
)
raw_texts = st.sampled_from(
    [
        "", " ", "{", "}", "null", "[]", "{}", '""', "1e999999", "-0", "NaN",
        '{"type":NaN,"status":"ok"}', '{"type":"heartbeat","status":"ok","x":Infinity}',
        '{"type":"heartbeat","type":"task","status":"ok"}',
        '{"type":"heartbeat","status":"ok","client_id":"\\ud800"}',
        '{"type":"task","status":"ok","request":"\\udfff\\ud800"}',
        "\ufeff" + '{"type":"heartbeat","status":"ok"}',
        '{"type":"heartbeat","status":"ok"} trailing',
        "[" * 3000 + "]" * 3000,  # deeper than json's recursion limit, under MAX_MESSAGE
        '{"a":' * 1200 + "1" + "}" * 1200,
        '{"type":"heartbeat","status":"ok","request_id":"' + "r" * 500 + '"}',
    ]
)  # fmt: skip


def _text(obj: Any) -> tuple[str, Any]:
    return ("text", obj if isinstance(obj, str) else json.dumps(obj))


actions = st.one_of(
    valid_frames.map(_text),
    valid_frames.map(_text),
    near_valid_frames.map(_text),
    raw_texts.map(_text),
    st.text(max_size=200).map(_text),
    st.binary(max_size=100).map(lambda b: ("binary", b)),
    st.tuples(valid_frames, st.integers(2, 6)).map(lambda t: ("fragments", json.dumps(t[0]), t[1])),
    st.integers(MAX_MESSAGE + 1, 2 * MAX_MESSAGE).map(lambda n: ("fragments", "x" * n, 4)),
)


def _substitute(action: tuple[Any, ...], client_id: str) -> tuple[Any, ...]:
    if action[0] == "binary":
        return action
    return (action[0], action[1].replace(SELF, client_id), *action[2:])


async def _send(client: WireClient, action: tuple[Any, ...]) -> None:
    try:
        if action[0] == "text":
            await client.send(action[1])
        elif action[0] == "binary":
            await client.send(action[1])
        else:
            await client.send_fragments(action[1], action[2])
    except trio.BrokenResourceError:
        pass  # the server closed first; `recv` reports the close


def _expected_close(action: tuple[Any, ...]) -> set[int | None]:
    """Close codes this action may legitimately cause (None: TCP closed after a close frame)."""
    if action[0] == "binary":
        return {1003}
    if len(action[1].encode()) > MAX_MESSAGE:
        return {1009, None}
    return set()


def _check_frame(frame: dict[str, Any]) -> None:
    assert_server_frame(frame)
    SEEN[f"{frame['type']}:{frame.get('code', frame['status'])}"] += 1
    if frame["type"] == "error":
        assert frame["code"] in ERROR_CODES, frame
        if frame["code"] == "invalid_message":
            assert len(frame["error"]) <= 200, frame  # WIRE-6


# ------------------------------------------------------------------------------- the examples


async def _websocket_example(
    port: int, steps: list[tuple[Any, ...]], role: str, first_is_fuzz: bool, ending: str
) -> None:
    client_id = f"fuzz-{uuid.uuid4().hex[:12]}"
    client = await WireClient.open(port)
    assert isinstance(client, WireClient)
    steps = [_substitute(step, client_id) for step in steps]
    if first_is_fuzz:
        # REG-2: the first frame gets a verdict, confirmation or ERROR + close; never silence.
        await _send(client, steps[0])
        verdict = await client.recv(within=5)
        if isinstance(verdict, Closed):
            assert verdict.code in _expected_close(steps[0]) | {1008}, (steps[0], verdict)
            return await _fresh_client_works(port)
        _check_frame(verdict)
        if verdict["type"] == "error":
            closed = await client.wait_closed(within=5)
            assert closed.code in (1008, 1003), (steps[0], closed)
            return await _fresh_client_works(port)
        assert (verdict["type"], verdict["status"]) == ("heartbeat", "ok"), verdict
        assert verdict.get("protocol") == "aip/1"
        # It registered under whatever the frame said; keep going with that identity.
        sent = json.loads(steps[0][1])
        client_id, role = sent["client_id"], sent.get("client_type", "device")
        steps = steps[1:]
    else:
        fields = {"client_type": role, "client_id": client_id}
        await client.send({"type": "register", "status": "ok", **fields})
        verdict = await client.recv(within=5)
        assert isinstance(verdict, dict)
        assert verdict["status"] == "ok", verdict

    for n, step in enumerate(steps):
        await _send(client, step)
        marker = f"sentinel-{n}"
        await _send(client, _text({"type": "device_info_request", "status": "ok",
                                   "client_type": role, "request_id": marker}))  # fmt: skip
        while True:
            frame = await client.recv(within=5)
            if isinstance(frame, Closed):
                SEEN[f"close:{frame.code}"] += 1
                assert frame.code in _expected_close(step), (step, frame)
                return await _fresh_client_works(port)
            _check_frame(frame)
            if frame["response_id"] == marker:
                break

    if ending == "close":
        await client.close()
    elif ending == "reset":
        client.reset()
    await _fresh_client_works(port)
    return None


async def _fresh_client_works(port: int) -> None:
    client, verdict = await WireClient.registered(port, f"fresh-{uuid.uuid4().hex[:12]}")
    assert verdict["status"] == "ok", verdict
    await client.send({"type": "heartbeat", "status": "ok"})
    ack = await client.recv(within=5)
    assert isinstance(ack, dict)
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
    await client.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    steps=st.lists(actions, min_size=1, max_size=8),
    role=st.sampled_from(["device", "constellation"]),
    first_is_fuzz=st.booleans(),
    ending=st.sampled_from(["close", "reset", "drop"]),
)
def test_fuzz_websocket_frames(
    live: ServerThread, steps: list[tuple[Any, ...]], role: str, first_is_fuzz: bool, ending: str
) -> None:
    COUNTS["websocket"] += 1
    try:
        trio.run(partial(_websocket_example, live.port, steps, role, first_is_fuzz, ending))
    finally:
        close_leftovers()
    assert live.errors == []


# -------------------------------------------------------------------------- HTTP strategies

header_pool = st.sampled_from(
    [
        (b"Host", b"localhost"), (b"Host", b"127.0.0.1:5000"), (b"Host", b"evil.example"),
        (b"Host", b"[::1]"), (b"X-API-Key", TEST_KEY.encode()), (b"X-API-Key", b"wrong"),
        (b"X-API-Key", b"cl\xc3\xa9"), (b"X-API-Key", b"\xff"), (b"X-API-Key", b""),
        (b"Authorization", b"Bearer " + TEST_KEY.encode()), (b"Authorization", b"Bearer"),
        (b"Authorization", b"Basic eA=="), (b"Content-Length", b"0"), (b"Content-Length", b"5"),
        (b"Content-Length", b"-1"), (b"Content-Length", b"99999999999"),
        (b"Content-Length", b"abc"), (b"Transfer-Encoding", b"chunked"),
        (b"Transfer-Encoding", b"gzip"), (b"Connection", b"close"),
        (b"Connection", b"keep-alive"), (b"Expect", b"100-continue"),
        (b"Upgrade", b"websocket"), (b"Upgrade", b"h2c"), (b"Origin", b"https://evil.example"),
        (b"X-Pad", b"a" * 20000), (b"Bad Header", b"x"), (b"X", b"\x00"),
    ]
)  # fmt: skip
paths = st.one_of(
    st.sampled_from(
        ["/api/clients", "/api/health", "/api/dispatch", "/api/sessions", "/api/task_result/t-1",
         "/api/task_result/%2e%2e%2fx", "/api/task_result/", "/ws", "/ws?token=test-key", "/",
         "/docs", "/openapi.json", "*", "http://localhost/api/health", "/api/clients?token=x",
         "/api/task_result/a/b", "/%00", "/api/task_result/%ff"]
    ),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(
        lambda p: "/" + p
    ),
)  # fmt: skip
dispatch_bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={"request": st.none() | short | plan, "client_id": st.none() | short,
                  "task_name": st.none() | short | st.sampled_from(["t-1", "../x", ".h"])},
    ).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=100),
)  # fmt: skip


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    method = draw(
        st.sampled_from(["GET", "GET", "POST", "POST", "HEAD", "PUT", "OPTIONS", "GE T", "get"])
    )
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.x"]))
    mostly = st.sampled_from([True, True, True, False])
    headers = [(b"Host", b"localhost")] if draw(mostly) else []
    if draw(mostly):
        headers.append((b"X-API-Key", TEST_KEY.encode()))
    headers += draw(st.lists(header_pool, max_size=4))
    body = draw(dispatch_bodies) if draw(st.booleans()) else b""
    if body and not any(
        name.lower() in (b"content-length", b"transfer-encoding") for name, _ in headers
    ):
        headers.append((b"Content-Length", str(len(body)).encode()))
    if any(v == b"chunked" for _, v in headers) and draw(st.booleans()):
        body = hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    head = f"{method} {draw(paths)} {version}\r\n".encode()
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


HTTP_STATUSES = {200, 400, 401, 403, 404, 405, 413, 422, 426, 431, 501, 505}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    requests=st.lists(
        st.one_of(http_requests(), http_requests(), http_requests(), st.binary(max_size=300)),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_http_requests(live: ServerThread, requests: list[bytes]) -> None:
    COUNTS["http"] += 1

    async def example() -> None:
        # Everything pipelined, then a half-close: the server must answer what it can and
        # close; a request it is still waiting on ends at the EOF, not at a timeout.
        # For HEAD framing: the method answered by each response, in order (an empty item
        # sends nothing and gets nothing).
        methods = [r.split(b" ", 1)[0].decode("latin-1") for r in requests if r]
        # raw_http reads until the server closes (bounded): never a hang.
        responses, _ = await raw_http(live.port, b"".join(requests), methods=methods)
        for response in responses:
            SEEN[f"http:{response.status}"] += 1
            assert response.status in HTTP_STATUSES, (response, requests)
            if response.body:
                body = response.json()
                assert isinstance(body, dict), body
                if response.status >= 400:
                    assert isinstance(body["detail"], str), body
        # A well-formed caller is still served.
        health = await http_request(live.port, "GET", "/api/health")
        assert health.status == 200

    trio.run(example)
    assert live.errors == []


# ----------------------------------------------------------------------------------- afterwards


def test_fuzz_left_nothing_behind(live: ServerThread) -> None:
    """Runs after the fuzz tests above (file order): the server is clean and still serving."""

    def state() -> tuple[int, int, int, int]:
        server = live.server
        assert server is not None
        return (
            len(server.connections),
            len(server.registry),
            len(server.sessions.live),
            server.open_streams,
        )

    async def settle() -> tuple[int, int, int, int]:  # runs in the server's own trio run
        with trio.move_on_after(10):
            while state() != (0, 0, 0, 0):
                await trio.sleep(0.01)
        return state()

    assert trio.from_thread.run(settle, trio_token=live.token) == (0, 0, 0, 0)
    assert live.errors == []
    print(f"\nfuzz examples run: {COUNTS}; answers seen: {dict(sorted(SEEN.items()))}")
