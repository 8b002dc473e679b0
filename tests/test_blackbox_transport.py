"""Black-box transport tests over real sockets on 127.0.0.1, port 0: the handshake (EP-1,
AUTH-1/2, SEC-11/12), binary and oversize frames (DISP-2, LIM-1, SEC-13) and connection leaks.

Written from PROTOCOL.md §2, §3.4 and §8, not from the server code. HTTP is spoken with h11 over
a plain TCP stream and WebSocket with trio-websocket or, where frames must be built by hand,
the wsproto-driven `WireClient` of wire_helpers.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import TYPE_CHECKING, Any

import h11
import pytest
import trio
import trio.testing
from blackbox_helpers import WAIT
from wire_helpers import WireClient, wire_client
from wsproto.events import AcceptConnection, TextMessage
from wsproto.extensions import PerMessageDeflate

from ufo_trio.testing import TEST_KEY, connect, open_memory_server, open_server

if TYPE_CHECKING:
    from ufo_trio._server import Server

async def http_get(
    server: Server, target: str, headers: list[tuple[str, str]] | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.1 GET over a fresh TCP connection; returns (status, body)."""
    host = f"127.0.0.1:{server.port}"
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=target,
        headers=[("Host", host), ("Connection", "close"), *(headers or [])],
    )
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, body


async def online_clients(server: Server) -> list[str]:
    """HTTP-1, as an outsider sees it."""
    status, body = await http_get(server, "/api/clients", [("X-API-Key", TEST_KEY)])
    assert status == 200, body
    ids: list[str] = json.loads(body)["online_clients"]
    return ids


async def rejected_status(
    url: str, *, token: str | None = TEST_KEY, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, bytes]:
    """The HTTP status and body of a refused WebSocket handshake.

    The handshake is driven by `WireClient`: trio-websocket's client raises
    `ConnectionRejected` but never closes its socket, which `filterwarnings=error` turns into a
    failure.
    """
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if token is not None:
        target += ("&" if parts.query else "?") + "token=" + urllib.parse.quote(token)
    stream = await trio.open_tcp_stream("127.0.0.1", parts.port or 80)
    answer = await WireClient.handshake(stream, parts.netloc, target, headers)
    if isinstance(answer, WireClient):
        await trio.aclose_forcefully(stream)
        raise AssertionError(f"the handshake was accepted: {target}")
    return answer.status, answer.body


async def registers(url: str, client_id: str = "dev-1", **kwargs: Any) -> None:
    async with connect(url, **kwargs) as client:
        frame = await client.register(client_id)
        assert (frame["type"], frame["status"]) == ("heartbeat", "ok")


# --- handshake -----------------------------------------------------------------------------------


async def test_handshake_rejections_are_403_auth1_auth2_sec11_sec12() -> None:
    """AUTH-1 (b) / AUTH-2 / SEC-11: no token, a wrong token, a non-ASCII token (percent-encoded
    UTF-8), a token that is not valid UTF-8, a repeated token and a wrong Bearer each get HTTP 403
    before accept. AUTH-1 (a) / SEC-12: a valid handshake with a foreign Origin (or `null`)
    gets 403 too. Every 403 body is the same (it must not reveal which case applied), and
    nothing is registered."""
    async with open_server() as server:
        with trio.fail_after(WAIT):
            url = server.url
            cases: list[tuple[str, dict[str, Any]]] = [
                (url, {"token": None}),
                (url, {"token": "wrong-key"}),
                (url, {"token": "test-kéy-ключ"}),
                (url, {"token": TEST_KEY + "\u00e9"}),
                (url + "?token=%FF%FE", {"token": None}),
                (url + f"?token={TEST_KEY}&token={TEST_KEY}", {"token": None}),
                (url, {"token": None, "headers": [(b"Authorization", b"Bearer wrong-key")]}),
                (
                    url,
                    {"token": None, "headers": [(b"Authorization", f"Basic {TEST_KEY}".encode())]},
                ),
                (url, {"token": None, "headers": [(b"Authorization", "Bearer tést".encode())]}),
                (url, {"headers": [(b"Origin", b"https://evil.example")]}),
                (url, {"headers": [(b"Origin", b"null")]}),
            ]
            bodies = set()
            for target, kwargs in cases:
                status, body = await rejected_status(target, **kwargs)
                assert status == 403, (target, kwargs)
                bodies.add(body)
            assert len(bodies) == 1
            assert server.registry.online_ids() == []


async def test_bearer_and_allowed_origin_are_accepted_auth1() -> None:
    """AUTH-1: `Authorization: Bearer <key>` authenticates without a token; an Origin in
    `--allowed-origins` is accepted (case-insensitive) while any other Origin is refused."""
    async with open_server(allowed_origins=("https://good.example",)) as server:
        with trio.fail_after(WAIT):
            await registers(
                server.url, "bearer", token=None,
                headers=[(b"Authorization", f"Bearer {TEST_KEY}".encode())],
            )  # fmt: skip
            await registers(server.url, "origin", headers=[(b"Origin", b"https://GOOD.example")])
            status, _ = await rejected_status(
                server.url, headers=[(b"Origin", b"https://evil.example")]
            )
            assert status == 403


async def test_upgrade_to_another_path_is_404_ep1() -> None:
    """EP-1: a WebSocket upgrade to any path but /ws gets HTTP 404."""
    async with open_server() as server:
        with trio.fail_after(WAIT):
            base = server.url.removesuffix("/ws")
            for path in ("/other", "/ws/extra", "/api/clients", "/"):
                status, _ = await rejected_status(base + path)
                assert status == 404, path


@pytest.mark.parametrize("target", ["/ws", f"/ws?token={TEST_KEY}"])
async def test_plain_get_on_ws_is_426_ep1(target: str) -> None:
    """EP-1: a non-upgrade request to /ws gets 426 {"detail":"WebSocket upgrade required"}."""
    async with open_server() as server:
        with trio.fail_after(WAIT):
            status, body = await http_get(server, target)
    assert status == 426
    assert json.loads(body) == {"detail": "WebSocket upgrade required"}


async def test_non_ascii_token_raw_bytes_never_500_auth2() -> None:
    """AUTH-2: a raw (not percent-encoded) non-ASCII byte in the token is refused, never a
    server error and never an accepted handshake."""
    async with open_server() as server:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(
                    b"GET /ws?token=test-k\xc3\xa9y HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                )
                head = b""
                while b"\r\n" not in head:
                    chunk = await stream.receive_some(4096)
                    assert chunk, "closed without a response"
                    head += chunk
            # Raw non-ASCII in a request target is malformed HTTP: 400 or 403 both refuse it.
            assert head.startswith((b"HTTP/1.1 403 ", b"HTTP/1.1 400 ")), head


async def test_no_extension_or_subprotocol_is_negotiated_wire1() -> None:
    """WIRE-1: permessage-deflate is not negotiated and no sub-protocol is selected, even when
    the client offers them."""
    async with open_server() as server:
        offer = {"extensions": [PerMessageDeflate()], "subprotocols": ["aip"]}
        async with wire_client(server.port, **offer) as client:
            accepted = client.accepted
            assert isinstance(accepted, AcceptConnection)
            assert accepted.extensions == []
            assert accepted.subprotocol is None


async def test_slow_handshake_is_dropped_lim2_sec14() -> None:
    """LIM-2 / SEC-14: an incomplete request head is dropped after --registration-timeout with
    no response at all (a short timeout keeps the real wait small)."""
    async with open_server(registration_timeout=0.3) as server:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(b"GET /ws?token=test-key HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                start = trio.current_time()
                received = b""
                while chunk := await stream.receive_some(4096):
                    received += chunk
                assert received == b""
                assert trio.current_time() - start >= 0.3


async def test_silent_socket_gets_registration_timeout_reg1_sec14() -> None:
    """REG-1 / SEC-14 over a real socket: an accepted connection that never registers gets
    ERROR `Registration timed out` (registration_timeout) and close 1008."""
    async with open_server(registration_timeout=0.3) as server, connect(server.url) as client:
        with trio.fail_after(WAIT):
            frame = await client.recv()
            assert (frame["type"], frame["status"]) == ("error", "error")
            assert (frame["error"], frame["code"]) == (
                "Registration timed out",
                "registration_timeout",
            )
            assert (await client.closed()).code == 1008


# --- binary and oversize frames ------------------------------------------------------------------


async def test_binary_frame_before_register_disp2_sec13() -> None:
    """DISP-2 / SEC-13: a binary frame before REGISTER gets ERROR binary_not_supported, then close
    1003; nothing is registered."""
    async with open_server() as server, connect(server.url) as client:
        with trio.fail_after(WAIT):
            await client.send(b'{"type":"register","status":"ok","client_id":"dev-1"}')
            frame = await client.recv()
            assert (frame["type"], frame["status"]) == ("error", "error")
            assert (frame["error"], frame["code"]) == (
                "Binary frames are not supported",
                "binary_not_supported",
            )
            assert (await client.closed()).code == 1003
            assert await online_clients(server) == []


async def test_binary_frame_after_register_disp2_sec13() -> None:
    """DISP-2 / SEC-13: a binary frame after REGISTER gets ERROR binary_not_supported, then close
    1003 and cleanup: the id disappears from /api/clients while other clients stay."""
    async with open_server() as server, connect(server.url) as other:
        with trio.fail_after(WAIT):
            await other.register("other")
            async with connect(server.url) as client:
                await client.register("dev-1")
                assert await online_clients(server) == ["other", "dev-1"]
                await client.send(b"\x00\xffbinary")
                frame = await client.recv()
                assert (frame["error"], frame["code"]) == (
                    "Binary frames are not supported",
                    "binary_not_supported",
                )
                assert (await client.closed()).code == 1003
            await trio.testing.wait_all_tasks_blocked()
            assert await online_clients(server) == ["other"]


def padded_heartbeat(size: int) -> str:
    """A valid heartbeat of exactly `size` bytes (an unknown key pads it, WIRE-4)."""
    text = json.dumps({"type": "heartbeat", "status": "ok", "pad": ""})
    text = text[:-2] + "x" * (size - len(text)) + text[-2:]
    assert len(text.encode()) == size
    return text


async def test_message_size_limit_lim1_sec13() -> None:
    """LIM-1 / SEC-13: a message of exactly `--max-message-size` bytes is fine; one byte more
    gets close 1009 and cleanup (the id leaves the registry)."""
    async with open_server(max_message_size=1024) as server, connect(server.url) as client:
        with trio.fail_after(WAIT):
            await client.register("dev-1")
            await client.send(padded_heartbeat(1024))
            assert (await client.recv())["type"] == "heartbeat"
            await client.send(padded_heartbeat(1025))
            reason = await client.closed()
            assert (reason.code, reason.reason) == (1009, "message too big")
            await trio.testing.wait_all_tasks_blocked()
            assert server.registry.online_ids() == []


async def test_fragmented_message_size_limit_lim1_sec13(
) -> None:
    """LIM-1 / SEC-13: the limit is summed over fragments. A heartbeat in three fragments is
    acked (WIRE-1: one message); a message of many small fragments that adds up to more than
    `--max-message-size` gets close 1009 and cleanup."""
    async with open_server(max_message_size=1024) as server, wire_client(server.port) as peer:
        with trio.fail_after(WAIT):
            await peer.send({"type": "register", "status": "ok", "client_id": "dev-1"})
            assert (await peer.recv())["status"] == "ok"
            heartbeat = json.dumps({"type": "heartbeat", "status": "ok"})
            await peer.send_raw(TextMessage(data=heartbeat[:5], message_finished=False))
            await peer.send_raw(TextMessage(data=heartbeat[5:15], message_finished=False))
            await peer.send(heartbeat[15:])
            assert (await peer.recv())["type"] == "heartbeat"
            try:
                start = '{"type":"heartbeat","status":"ok","pad":"'
                await peer.send_raw(TextMessage(data=start, message_finished=False))
                for _ in range(40):  # 40 × 64 bytes, each fragment far below the limit
                    await peer.send_raw(TextMessage(data="y" * 64, message_finished=False))
                await peer.send('"}')
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the server may already have closed the socket
            assert (await peer.wait_closed()).code == 1009
            await trio.testing.wait_all_tasks_blocked()
            assert server.registry.online_ids() == []


async def test_oversize_first_frame_lim1() -> None:
    """LIM-1 applies before registration too: close 1009, nothing registered."""
    async with open_server(max_message_size=256) as server, connect(server.url) as client:
        with trio.fail_after(WAIT):
            await client.send(
                json.dumps({"type": "register", "status": "ok", "client_id": "d" * 300})
            )
            assert (await client.closed()).code == 1009
            await trio.testing.wait_all_tasks_blocked()
            assert server.registry.online_ids() == []


def text_frame(payload: bytes, *, masked: bool = True) -> bytes:
    """A single client text frame built by hand (FIN, opcode 1; a zero mask key if masked)."""
    assert len(payload) < 126
    if not masked:  # a protocol violation: client frames must be masked
        return bytes((0x81, len(payload))) + payload
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


BAD_FRAMES = [
    pytest.param(text_frame(b'{"type":"\xff\xfe"}'), 1007, id="invalid-utf8"),
    pytest.param(text_frame(b'{"type":"heartbeat"}', masked=False), 1002, id="unmasked"),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_frame_ends_connection_and_cleans_up(
    frame: bytes, code: int
) -> None:
    """§2.3 / DC-1: invalid UTF-8 or a WebSocket protocol violation ends the connection, and the
    registered id is cleaned up. (The close code is checked apart, below.)"""
    async with open_server() as server, wire_client(server.port) as peer:
        with trio.fail_after(WAIT):
            await peer.send({"type": "register", "status": "ok", "client_id": "dev-1"})
            assert (await peer.recv())["status"] == "ok"
            await peer.stream.send_all(frame)
            assert (await peer.wait_closed()).code in (code, None)
            await trio.testing.wait_all_tasks_blocked()
            assert server.registry.online_ids() == []


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_bad_frame_close_code(
    frame: bytes, code: int
) -> None:
    """§2.3: invalid UTF-8 is answered with close 1007, a protocol violation with 1002."""
    async with open_server() as server, wire_client(server.port) as peer:
        with trio.fail_after(WAIT):
            await peer.send({"type": "register", "status": "ok", "client_id": "dev-1"})
            assert (await peer.recv())["status"] == "ok"
            await peer.stream.send_all(frame)
            assert (await peer.wait_closed()).code == code


# --- leak checks ---------------------------------------------------------------------------------


async def test_no_leaks_after_many_connections_real_socket(
) -> None:
    """DC-1 / DC-4 / STYLE 19: after 50 connect/register/disconnect cycles (clean closes,
    abrupt TCP closes and rejected registrations) the registry is empty and the server's
    connection nursery is back to its baseline."""
    async with open_server() as server:
        with trio.fail_after(30):
            nursery = server._nursery
            assert nursery is not None
            await trio.testing.wait_all_tasks_blocked()
            baseline = len(nursery.child_tasks)
            for i in range(50):
                if i % 5 == 0:
                    async with wire_client(server.port) as peer:  # abrupt close at exit
                        await peer.send(
                            {"type": "register", "status": "ok", "client_id": f"d-{i}"}
                        )
                        assert (await peer.recv())["status"] == "ok"
                elif i % 5 == 1:
                    async with connect(server.url) as client:
                        await client.send({"type": "heartbeat", "status": "ok"})
                        assert (await client.recv())["code"] == "not_registered"
                        assert (await client.closed()).code == 1008
                else:
                    async with connect(server.url) as client:
                        await client.register(f"d-{i}", "device" if i % 2 else "constellation")
                        await client.send(
                            {"type": "heartbeat", "status": "ok", "client_id": f"d-{i}"}
                        )
                        assert (await client.recv())["type"] == "heartbeat"
            await trio.testing.wait_all_tasks_blocked()
            assert server.registry.online_ids() == []
            assert len(server.sessions.live) == 0
            assert len(nursery.child_tasks) == baseline


async def test_no_leaks_after_many_connections_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The same leak check on the in-memory server: 50 cycles leave no connection task and no
    registry entry behind."""
    async with open_memory_server() as mem:
        assert mem.connection_tasks() == 0
        for i in range(50):
            client = await mem.connect()
            await client.register(f"d-{i}")
            await client.send({"type": "heartbeat", "status": "ok"})
            assert (await client.recv())["type"] == "heartbeat"
            await client.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert mem.server.registry.online_ids() == []
        assert mem.connection_tasks() == 0


def test_percent_encoding_of_helpers_is_utf8() -> None:
    """Guard for the non-ASCII case above: the test client percent-encodes UTF-8."""
    assert urllib.parse.quote("kéy") == "k%C3%A9y"
