"""The HTTP layer's own parts: the route table (§6 step 2), reply values, streamed replies.

Route matching is pure and tested synchronously. The stream and custom-route cases add routes
to a running in-memory server (as a later endpoint will: one `Route` row plus a handler) and
read the wire with an h11 client under MockClock.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import h11
import pytest
import trio
import trio.testing
from wire_helpers import memory_http

from ufo_trio._api import ROUTES, Api, ApiContext, Request, Route, api_key_problem, match_route
from ufo_trio._http import (
    HttpService,
    Reply,
    RequestHead,
    StreamReply,
    error_reply,
    json_reply,
    sse_event,
    sse_reply,
)
from ufo_trio.testing import TEST_KEY, open_memory_server

if TYPE_CHECKING:
    from ufo_trio._server import Server


async def _never(ctx: ApiContext, request: Request) -> Reply:
    raise AssertionError("not called")  # pragma: no cover


# ---------------------------------------------------------------------- route matching (sync)


@pytest.mark.parametrize(
    ("method", "path", "handler"),
    [
        ("GET", "/api/clients", "list_clients"),
        ("GET", "/api/health", "health"),
        ("POST", "/api/dispatch", "dispatch"),
        ("GET", "/api/sessions", "list_sessions"),
        ("GET", "/api/task_result/t-1", "task_result"),
        ("GET", "/api/task_result/a%2Fb", "task_result"),  # still encoded: one segment
    ],
)
def test_routes_of_section_6_match_their_handlers(method: str, path: str, handler: str) -> None:
    match = match_route(method, path, ROUTES)
    assert match is not None
    assert match.route is not None
    assert match.route.handler.__name__ == handler
    assert match.route.needs_key  # every §6 route needs the key (HTTP-2 included)


def test_path_parameters_are_one_non_empty_segment_http4() -> None:
    match = match_route("GET", "/api/task_result/x%20y", ROUTES)
    assert match is not None
    assert match.params == {"task_name": "x%20y"}
    for path in ("/api/task_result/", "/api/task_result", "/api/task_result/a/b"):
        assert match_route("GET", path, ROUTES) is None, path


@pytest.mark.parametrize(
    "path", ["/api", "/api/", "/api/clients/", "/API/clients", "/docs", "/ws", "api/clients", "//"]
)
def test_unknown_paths_match_nothing_404(path: str) -> None:
    assert match_route("GET", path, ROUTES) is None


def test_wrong_method_matches_the_path_without_a_route_405() -> None:
    match = match_route("HEAD", "/api/clients", ROUTES)
    assert match is not None
    assert (match.route, match.allow) == (None, ("GET",))
    match = match_route("GET", "/api/dispatch", ROUTES)
    assert match is not None
    assert (match.route, match.allow) == (None, ("POST",))


def test_several_methods_on_one_path_are_all_allowed() -> None:
    routes = (
        Route("GET", "/api/tasks/{task_id}", _never),
        Route("DELETE", "/api/tasks/{task_id}", _never),
        Route("GET", "/api/tasks", _never),
    )
    match = match_route("PUT", "/api/tasks/7", routes)
    assert match is not None
    assert (match.route, match.allow) == (None, ("GET", "DELETE"))
    match = match_route("DELETE", "/api/tasks/7", routes)
    assert match is not None
    assert match.route is routes[1]
    assert match.params == {"task_id": "7"}
    match = match_route("GET", "/api/tasks", routes)
    assert match is not None
    assert match.route is routes[2]
    assert match.params == {}


def test_first_matching_row_wins() -> None:
    routes = (Route("GET", "/static/app.js", _never), Route("GET", "/static/{name}", _never))
    match = match_route("GET", "/static/app.js", routes)
    assert match is not None
    assert match.route is routes[0]


# --------------------------------------------------------------------- the API key (sync)


def _head(*headers: bytes) -> RequestHead:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(
        b"GET /api/clients HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    return RequestHead(conn, request, b"")


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ((), "Missing API key"),
        ((b"X-API-Key: ",), "Missing API key"),  # blank is no credential at all
        ((b"Authorization: Basic a2V5",), "Missing API key"),  # not a Bearer token
        ((b"X-API-Key: key",), None),
        ((b"Authorization: Bearer key",), None),
        ((b"authorization: bearer   key  ",), None),
        ((b"X-API-Key: key", b"Authorization: Bearer key"), None),
        ((b"X-API-Key: nope",), "Invalid API key"),
        ((b"X-API-Key: key", b"Authorization: Bearer nope"), "Invalid API key"),  # never a guess
        ((b"X-API-Key: key", b"X-API-Key: nope"), "Invalid API key"),
        ((b"X-API-Key: k\xc3\xa9y",), "Invalid API key"),  # non-ASCII: a mismatch, not a 500
    ],
)
def test_api_key_problem_auth4_auth2(headers: tuple[bytes, ...], problem: str | None) -> None:
    assert api_key_problem(_head(*headers), b"key") == problem


# ------------------------------------------------------------------------- reply values (sync)


def test_json_and_error_replies_are_compact_json() -> None:
    reply = json_reply(200, {"a": [1, "é"]}, headers=((b"x-extra", b"1"),))
    assert reply == Reply(
        200,
        ((b"content-type", b"application/json"), (b"x-extra", b"1")),
        b'{"a":[1,"\\u00e9"]}',
    )
    assert json.loads(error_reply(404, "Not Found").body) == {"detail": "Not Found"}
    assert error_reply(413, "x", close=True).close
    with pytest.raises(ValueError, match="JSON"):
        json_reply(200, float("nan"))


def test_sse_event_format() -> None:
    assert sse_event("one") == b"data: one\n\n"
    assert (
        sse_event("a\nb", event="task", event_id="7") == b"event: task\nid: 7\ndata: a\ndata: b\n\n"
    )


# ----------------------------------------------------------------- custom routes (in memory)


def _with_routes(server: Server, *extra: Route) -> None:
    """Serve `ROUTES` plus `extra` from now on (what a later endpoint does in the table)."""
    api = Api(ApiContext(shared=server.context, sessions=server.sessions), (*ROUTES, *extra))
    server.http = HttpService(api.respond, server.context.shutdown)


async def test_a_public_route_with_its_own_headers_skips_the_key_not_the_host_check() -> None:
    page = b"<!doctype html><title>fleet</title>"

    async def dashboard(ctx: ApiContext, request: Request) -> Reply:
        headers = (
            (b"content-type", b"text/html; charset=utf-8"),
            (b"content-security-policy", b"default-src 'self'"),
            (b"cache-control", b"max-age=60"),
        )
        return Reply(200, headers, page)

    async with open_memory_server() as mem:
        _with_routes(mem.server, Route("GET", "/page", dashboard, needs_key=False))
        client = memory_http(mem.server)
        response = await client.request("GET", "/page", key=None)
        assert (response.status, response.body) == (200, page)
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["content-security-policy"] == "default-src 'self'"
        assert response.headers["cache-control"] == "max-age=60"  # not overridden by no-store
        assert response.headers["x-content-type-options"] == "nosniff"
        assert int(response.headers["content-length"]) == len(page)
        # AUTH-5 still comes first, and the §6 routes still need the key.
        response = await client.request("GET", "/page", key=None, host=b"evil.example")
        assert (response.status, response.detail) == (403, "Invalid Host header")
        response = await client.request("GET", "/api/clients", key=None)
        assert (response.status, response.detail) == (401, "Missing API key")
        assert client.reusable


# ---------------------------------------------------------------------- streamed replies


class _StreamClient:
    """An h11 client reading one streamed response event by event."""

    def __init__(self, server: Server) -> None:
        self.stream, server_stream = trio.testing.memory_stream_pair()
        server.spawn_connection(server_stream)
        self.conn = h11.Connection(h11.CLIENT)

    async def get(self, path: str) -> None:
        headers = [(b"host", b"localhost"), (b"authorization", b"Bearer " + TEST_KEY.encode())]
        data = self.conn.send(h11.Request(method="GET", target=path, headers=headers)) or b""
        await self.stream.send_all(data + (self.conn.send(h11.EndOfMessage()) or b""))

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))


def _chunk(data: bytes) -> h11.Data:
    """One whole chunk of a chunked body, as the h11 client reports it."""
    return h11.Data(data=data, chunk_start=True, chunk_end=True)


@pytest.fixture
def subscribers() -> list[trio.MemorySendChannel[bytes]]:
    return []


def _event_route(subscribers: list[trio.MemorySendChannel[bytes]]) -> Route:
    async def events(ctx: ApiContext, request: Request) -> StreamReply:
        send, receive = trio.open_memory_channel[bytes](4)  # bounded, per subscriber
        subscribers.append(send)
        return sse_reply(receive)

    return Route("GET", "/test/events", events)


async def test_stream_reply_is_chunked_and_ends_at_shutdown_at_once(
    autojump_clock: trio.testing.MockClock, subscribers: list[trio.MemorySendChannel[bytes]]
) -> None:
    async with open_memory_server(shutdown_grace=5.0) as mem:
        server = mem.server
        _with_routes(server, _event_route(subscribers))
        client = _StreamClient(server)
        await client.get("/test/events")
        response = await client.next_event()
        assert isinstance(response, h11.Response)
        headers = {k.decode(): v.decode() for k, v in response.headers}
        assert response.status_code == 200
        assert headers["transfer-encoding"] == "chunked"
        assert headers["content-type"] == "text/event-stream"
        assert headers["connection"] == "close"
        assert "content-length" not in headers

        [send] = subscribers
        await send.send(sse_event('{"n":1}', event="task"))
        assert await client.next_event() == _chunk(b'event: task\ndata: {"n":1}\n\n')
        # Nothing to send: a heartbeat comment after exactly 15 s.
        t0 = trio.current_time()
        assert await client.next_event() == _chunk(b":\n\n")
        assert trio.current_time() - t0 == 15.0
        assert server.open_streams == 1  # counted like any connection (--max-connections)

        # Shutdown ends the stream at once (no grace period wait) with its last chunk.
        t0 = trio.current_time()
        server.request_shutdown()
        assert isinstance(await client.next_event(), h11.EndOfMessage)
        assert isinstance(await client.next_event(), h11.ConnectionClosed)
        await server.wait_stopped()
        assert trio.current_time() == t0
        assert server.open_streams == 0
        with pytest.raises(trio.BrokenResourceError):  # the producer learns the reader is gone
            send.send_nowait(b"late")


async def test_stream_ends_when_the_producer_closes_and_counts_against_max_connections(
    autojump_clock: trio.testing.MockClock, subscribers: list[trio.MemorySendChannel[bytes]]
) -> None:
    async with open_memory_server(max_connections=1) as mem:
        server = mem.server
        _with_routes(server, _event_route(subscribers))
        client = _StreamClient(server)
        await client.get("/test/events")
        assert isinstance(await client.next_event(), h11.Response)
        # While the stream is open it holds the only connection slot.
        response = await memory_http(server).request("GET", "/api/health")
        assert (response.status, response.detail) == (503, "Too many connections")

        [send] = subscribers
        await send.send(b"data: bye\n\n")
        await send.aclose()
        assert await client.next_event() == _chunk(b"data: bye\n\n")
        assert isinstance(await client.next_event(), h11.EndOfMessage)
        assert isinstance(await client.next_event(), h11.ConnectionClosed)
        await trio.testing.wait_all_tasks_blocked()
        assert server.open_streams == 0
