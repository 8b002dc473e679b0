"""The model client's own httpx transport (`ufo_trio._model_http.ModelTransport`, issue 10).

Every test talks to a loopback HTTP/1.1 server on 127.0.0.1 port 0 whose answers it scripts
byte for byte and which counts what a model server would see: connections opened, requests,
and connections the client closed. Calls go through `OpenAIChatModel.complete` (what the llm
agent does) or through an `httpx.AsyncClient` on the transport (httpx's decoding on top).
"""

from __future__ import annotations

import functools
import gzip
import json
import socket
import ssl
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import pytest
import trio
import trio.testing
import trustme

from ufo_trio._llm import MAX_RESPONSE_BYTES, LlmSettings, ModelError, OpenAIChatModel
from ufo_trio._model_http import ModelTransport

if TYPE_CHECKING:
    from pathlib import Path

WAIT = 30.0
MESSAGES = [{"role": "user", "content": "hello"}]


def reply_body(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()


def with_length(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}"]
    return ("\r\n".join([*head, *headers]) + "\r\n\r\n").encode() + body


def chunked(*pieces: bytes, headers: tuple[str, ...] = ()) -> bytes:
    head = ["HTTP/1.1 200 OK", "content-type: application/json", "transfer-encoding: chunked"]
    return (
        ("\r\n".join([*head, *headers]) + "\r\n\r\n").encode()
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
        + b"0\r\n\r\n"
    )


@attrs.define
class Seen:
    """One request as the server read it."""

    connection: int
    head: bytes
    body: bytes


class ModelServer:
    """A scripted HTTP/1.1 server. `answer(seen, stream)` writes the response bytes itself and
    returns False to close the connection after it. Counts connections (opened, open now, the
    most open at once) and the connections the client closed (EOF seen)."""

    def __init__(self, answer: Any, *, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.requests: list[Seen] = []
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.client_closed = 0
        self._closed_changed = trio.Event()
        self.alpn: list[str | None] = []
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> ModelServer:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]
        return self

    def url(self, host: str = "127.0.0.1") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}/v1"

    async def _serve(self, tcp: trio.SocketStream) -> None:
        self.connections += 1
        number = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        stream: Any = tcp
        try:
            if self.tls is not None:
                stream = trio.SSLStream(tcp, self.tls, server_side=True)
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError:
                    return
                self.alpn.append(stream.selected_alpn_protocol())
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await self._receive(stream)
                    if not data:
                        self.saw_close()
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    data = await self._receive(stream)
                    if not data:
                        return
                    buffer += data
                seen = Seen(connection=number, head=head, body=buffer[:length])
                buffer = buffer[length:]
                self.requests.append(seen)
                if not await self.answer(seen, stream):
                    return
        finally:
            self.open_now -= 1
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    def saw_close(self) -> None:
        self.client_closed += 1
        self._closed_changed.set()
        self._closed_changed = trio.Event()

    async def closed(self, n: int) -> None:
        """Wait until the client closed `n` connections (the server read EOF on them)."""
        while self.client_closed < n:
            await self._closed_changed.wait()

    async def until_client_closes(self, stream: Any) -> bool:
        """Read (and drop) what comes until the client closes; record it."""
        while await self._receive(stream):
            pass
        self.saw_close()
        return False

    @staticmethod
    async def _receive(stream: Any) -> bytes:
        try:
            return bytes(await stream.receive_some(65536))
        except trio.BrokenResourceError:
            return b""


def keep_alive(text: str = "ok") -> Any:
    async def answer(seen: Seen, stream: Any) -> bool:
        await stream.send_all(with_length(reply_body(f"{text} {len(seen.body)}")))
        return True

    return answer


def settings_for(url: str, **kw: Any) -> LlmSettings:
    return LlmSettings(base_url=url, model="m", **kw)


async def test_calls_reuse_one_kept_alive_connection_and_exit_closes_it() -> None:
    """Several calls, one after another: one TCP connection; the model server sees it close
    when the model client closes (OpenAIChatModel owns the pool)."""
    async with trio.open_nursery() as nursery:
        server = await ModelServer(keep_alive()).start(nursery)
        with trio.fail_after(WAIT):
            async with OpenAIChatModel(settings_for(server.url())) as model:
                replies = [await model.complete(MESSAGES, []) for _ in range(4)]
                assert server.connections == 1
                assert server.client_closed == 0
            await server.closed(1)
        assert [r.content.split()[0] for r in replies] == ["ok"] * 4  # type: ignore[union-attr]
        assert len(server.requests) == 4
        assert {s.connection for s in server.requests} == {1}
        head = server.requests[0].head.decode().lower()
        assert head.startswith("post /v1/chat/completions http/1.1\r\n")
        assert f"host: 127.0.0.1:{server.port}" in head
        assert json.loads(server.requests[0].body)["messages"] == MESSAGES
        assert server.client_closed == 1
        nursery.cancel_scope.cancel()


async def test_a_connection_the_server_closed_while_idle_is_retried_on_a_fresh_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The server answers and closes (no `Connection: close` header): the next call finds the
    idle connection dead before any response byte and goes out again on a new connection,
    transparently; the model server got each request once."""

    async def answer_then_close(seen: Seen, stream: Any) -> bool:
        await stream.send_all(with_length(reply_body(f"answer {len(seen.body)}")))
        return False

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer_then_close).start(nursery)
        # (No deadline around __aenter__: it loads the CA bundle in a thread, and the
        # autojump clock would jump to the deadline meanwhile.)
        async with OpenAIChatModel(settings_for(server.url())) as model:
            for _ in range(3):
                with trio.fail_after(WAIT):
                    reply = await model.complete(MESSAGES, [])
                assert reply.content is not None
                assert reply.content.startswith("answer")
                while server.open_now:  # the server has closed before the next call
                    await trio.sleep(0.001)
        assert server.connections == 3
        assert len(server.requests) == 3
        assert [s.connection for s in server.requests] == [1, 2, 3]
        nursery.cancel_scope.cancel()


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried_by_the_transport() -> (
    None
):
    """Only a reused connection is retried: a new one closed before any byte is the server's
    failure, reported as httpx's RemoteProtocolError (the agent's retry policy decides)."""

    async def hang_up(seen: Seen, stream: Any) -> bool:
        return False

    async with trio.open_nursery() as nursery:
        server = await ModelServer(hang_up).start(nursery)
        with trio.fail_after(WAIT):
            async with OpenAIChatModel(settings_for(server.url())) as model:
                with pytest.raises(ModelError) as caught:
                    await model.complete(MESSAGES, [])
        assert caught.value.retryable
        assert caught.value.message == (
            f"the model server at {server.url()}/chat/completions dropped the connection "
            "before a complete answer (RemoteProtocolError); check the model server"
        )
        assert len(server.requests) == 1
        nursery.cancel_scope.cancel()


async def test_a_request_the_server_read_is_never_sent_again_on_a_reused_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The second call on a kept-alive connection: the server reads the whole POST, works on it
    for 60 s and dies without answering. The transport must not POST it again on a new
    connection (the model would run it twice): the call fails, retryable, and the server saw
    the request once. (The agent's retry policy then decides, logged and counted.)"""

    async def answer(seen: Seen, stream: Any) -> bool:
        if len(server.requests) == 2:
            await trio.sleep(60)
            return False  # close without a byte of answer
        await stream.send_all(with_length(reply_body("first")))
        return True

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer).start(nursery)
        async with OpenAIChatModel(settings_for(server.url())) as model:
            await model.complete(MESSAGES, [])
            started = trio.current_time()
            with pytest.raises(ModelError) as caught:
                await model.complete(MESSAGES, [])
            assert trio.current_time() - started == 60
        assert caught.value.retryable
        assert "dropped the connection before a complete answer" in caught.value.message
        assert len(server.requests) == 2
        assert server.connections == 1
        nursery.cancel_scope.cancel()


async def test_an_idle_connection_with_an_unasked_408_is_not_reused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Some servers and proxies answer an idle keep-alive timeout with `408 Request Timeout`
    and close. The next call must not take that 408 as its own answer: the connection is
    dropped before reuse and the call goes out on a fresh one."""

    async def answer(seen: Seen, stream: Any) -> bool:
        if len(server.requests) == 1:
            await stream.send_all(with_length(reply_body("first")))
            await trio.sleep(5)  # the server's idle timeout
            await stream.send_all(
                with_length(b'{"error":{"message":"idle timeout"}}', status="408 Request Timeout")
            )
            return False
        await stream.send_all(with_length(reply_body("second")))
        return True

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer).start(nursery)
        async with OpenAIChatModel(settings_for(server.url())) as model:
            await model.complete(MESSAGES, [])
            await trio.sleep(10)  # within the 30 s keep-alive
            reply = await model.complete(MESSAGES, [])
        assert reply.content == "second"
        assert len(server.requests) == 2
        assert server.connections == 2
        nursery.cancel_scope.cancel()


async def test_a_gzip_answer_is_bounded_after_decoding() -> None:
    """The answer limit applies to the decoded body: 20 MiB of JSON sent gzip'd (~20 KiB on
    the wire) is refused with a clear `llm agent` error, not inflated into memory whole."""
    head = json.dumps({"choices": [{"message": {"role": "assistant", "content": "x"}}]})
    body = (head[:-1] + ',"pad":"' + "a" * (20 * 1024 * 1024) + '"}').encode()
    wire = gzip.compress(body)
    assert len(wire) < MAX_RESPONSE_BYTES < len(body)

    async def answer(seen: Seen, stream: Any) -> bool:
        await stream.send_all(with_length(wire, "content-encoding: gzip"))
        return True

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer).start(nursery)
        async with OpenAIChatModel(settings_for(server.url())) as model:
            with trio.fail_after(WAIT), pytest.raises(ModelError) as caught:
                await model.complete(MESSAGES, [])
        assert caught.value.message == (
            f"the model server's answer is larger than {MAX_RESPONSE_BYTES} bytes once decoded"
        )
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("framing", ["content-length", "chunked", "gzip", "gzip-chunked"])
async def test_response_framings_and_gzip_reach_the_agent_decoded(
    framing: str, autojump_clock: trio.testing.MockClock
) -> None:
    """Content-Length and chunked bodies (split over several writes), gzip decoded by httpx;
    the connection is reused after each (the body was read to its end)."""
    text = "é" * 3000

    async def answer(seen: Seen, stream: Any) -> bool:
        body = reply_body(text)
        headers = []
        if framing.startswith("gzip"):
            body = gzip.compress(body)
            headers.append("content-encoding: gzip")
        if framing.endswith("chunked"):
            third = len(body) // 3
            raw = chunked(
                body[:third], body[third : 2 * third], body[2 * third :], headers=tuple(headers)
            )
        else:
            raw = with_length(body, *headers)
        for i in range(0, len(raw), 700):  # several segments, read one by one
            await stream.send_all(raw[i : i + 700])
            await trio.sleep(0.01)
        return True

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer).start(nursery)
        async with OpenAIChatModel(settings_for(server.url())) as model:
            for _ in range(2):
                with trio.fail_after(WAIT):
                    reply = await model.complete(MESSAGES, [])
                assert reply.content == text
        assert server.connections == 1
        nursery.cancel_scope.cancel()


async def test_connection_close_header_is_honoured() -> None:
    async def answer(seen: Seen, stream: Any) -> bool:
        await stream.send_all(with_length(reply_body("bye"), "connection: close"))
        return True  # the client must close; the server would go on reading

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer).start(nursery)
        with trio.fail_after(WAIT):
            async with OpenAIChatModel(settings_for(server.url())) as model:
                await model.complete(MESSAGES, [])
                await model.complete(MESSAGES, [])
                await server.closed(2)  # each closed by the client after its answer
        assert server.connections == 2
        nursery.cancel_scope.cancel()


async def test_connection_refused_gives_the_agents_message() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nobody listens there
    url = f"http://127.0.0.1:{port}/v1"
    with trio.fail_after(WAIT):
        async with OpenAIChatModel(settings_for(url)) as model:
            with pytest.raises(ModelError) as caught:
                await model.complete(MESSAGES, [])
    assert caught.value.retryable
    assert caught.value.message == (
        f"cannot reach the model server at {url}/chat/completions (connection refused or "
        "unreachable); check --llm-base-url and that the server is running"
    )


async def test_cancelled_mid_response_closes_the_connection_at_once_and_never_reuses_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The session is cancelled while the answer is half read: the call ends in the same tick,
    the model server sees its connection close, and the next call opens a new connection."""
    half_sent = trio.Event()

    async def answer(seen: Seen, stream: Any) -> bool:
        body = reply_body("x" * 5000)
        raw = with_length(body)
        if len(server.requests) == 1:
            await stream.send_all(raw[:2000])
            half_sent.set()
            return await server.until_client_closes(stream)
        await stream.send_all(raw)
        return True

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer).start(nursery)
        async with OpenAIChatModel(settings_for(server.url())) as model:
            with trio.CancelScope() as scope:

                async def cancel_when_half_read() -> None:
                    await half_sent.wait()
                    await trio.sleep(1)  # autojump: the client has read what there is
                    scope.cancel()
                    nonlocal cancelled_at
                    cancelled_at = trio.current_time()

                cancelled_at = -1.0
                nursery.start_soon(cancel_when_half_read)
                await model.complete(MESSAGES, [])
            assert scope.cancelled_caught
            assert trio.current_time() == cancelled_at
            with trio.fail_after(WAIT):
                await server.closed(1)
            assert server.client_closed == 1
            reply = await model.complete(MESSAGES, [])
            assert reply.content == "x" * 5000
        assert server.connections == 2
        assert [s.connection for s in server.requests] == [1, 2]
        nursery.cancel_scope.cancel()


async def test_an_answer_too_large_drops_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent stops reading an oversized answer: that connection is closed, not pooled."""
    import ufo_trio._llm as llm

    monkeypatch.setattr(llm, "MAX_RESPONSE_BYTES", 1000)

    async def answer(seen: Seen, stream: Any) -> bool:
        size = 5000 if len(server.requests) == 1 else 10
        await stream.send_all(with_length(reply_body("y" * size)))
        return True

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer).start(nursery)
        with trio.fail_after(WAIT):
            async with OpenAIChatModel(settings_for(server.url())) as model:
                with pytest.raises(ModelError, match="larger than 1000 bytes"):
                    await model.complete(MESSAGES, [])
                await server.closed(1)
                reply = await model.complete(MESSAGES, [])
        assert reply.content == "y" * 10
        assert server.connections == 2
        nursery.cancel_scope.cancel()


async def test_pool_bound_holds_under_concurrency_and_connections_are_reused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """--llm-max-connections 3 and 10 calls at once: never more than 3 connections; the calls
    beyond 3 wait and then go out on those same 3 connections."""
    release = trio.Event()
    arrived = 0

    async def answer(seen: Seen, stream: Any) -> bool:
        nonlocal arrived
        arrived += 1
        await release.wait()
        await stream.send_all(with_length(reply_body("ok")))
        return True

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer).start(nursery)
        async with OpenAIChatModel(settings_for(server.url(), max_connections=3)) as model:
            done = 0

            async def call() -> None:
                nonlocal done
                await model.complete(MESSAGES, [])
                done += 1

            async with trio.open_nursery() as calls:
                for _ in range(10):
                    calls.start_soon(call)
                await trio.sleep(5)
                assert arrived == 3
                assert server.open_now == 3
                release.set()
            assert done == 10
        assert server.connections == 3
        assert server.most_open == 3
        assert len(server.requests) == 10
        nursery.cancel_scope.cancel()


async def test_idle_connections_expire_after_30_s(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        server = await ModelServer(keep_alive()).start(nursery)
        async with OpenAIChatModel(settings_for(server.url())) as model:
            await model.complete(MESSAGES, [])
            await trio.sleep(29.5)
            await model.complete(MESSAGES, [])
            assert server.connections == 1
            await trio.sleep(30)
            await model.complete(MESSAGES, [])
            assert server.connections == 2
            with trio.fail_after(1):
                await server.closed(1)  # the expired one was closed
            assert server.client_closed == 1
        nursery.cancel_scope.cancel()


async def test_https_with_sni_hostname_check_and_alpn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """https:// through trio's SSL stream with the context the model client builds (here the
    CA comes from SSL_CERT_FILE, as httpx reads it): ALPN http/1.1, kept alive; a certificate
    for another name is refused with the agent's "cannot reach" message."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    sni: list[str | None] = []
    server_context.sni_callback = lambda _sock, name, _ctx: sni.append(name)  # type: ignore[assignment,func-returns-value]

    async with trio.open_nursery() as nursery:
        server = await ModelServer(keep_alive("secure"), tls=server_context).start(nursery)
        with trio.fail_after(WAIT):
            async with OpenAIChatModel(settings_for(server.url("localhost"))) as model:
                first = await model.complete(MESSAGES, [])
                second = await model.complete(MESSAGES, [])
            assert first.content is not None
            assert first.content.startswith("secure")
            assert second.content is not None
            assert server.connections == 1
            assert server.alpn == ["http/1.1"]
            assert sni == ["localhost"]
            # 127.0.0.1 is not a name on the certificate: refused at the handshake.
            async with OpenAIChatModel(settings_for(server.url("127.0.0.1"))) as model:
                with pytest.raises(ModelError, match="cannot reach the model server"):
                    await model.complete(MESSAGES, [])
        nursery.cancel_scope.cancel()


async def test_direct_endpoints_use_the_own_transport_and_proxies_keep_httpx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a proxy for the endpoint the model client speaks through `ModelTransport`;
    with HTTP_PROXY set it keeps the proxy transport httpx mounts (the request then reaches
    the proxy in absolute form, see test_llm_config_http), and an injected transport wins."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = settings_for("http://127.0.0.1:9/v1")
    async with OpenAIChatModel(settings) as model:
        assert [type(t) for t in model._sends] == [ModelTransport]
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:8/")
    async with OpenAIChatModel(settings) as model:
        assert model._sends
        assert not any(isinstance(t, ModelTransport) for t in model._sends)
    monkeypatch.delenv("HTTP_PROXY")
    mock = httpx.MockTransport(lambda request: httpx.Response(200))
    async with OpenAIChatModel(settings, transport=mock) as model:
        assert not any(isinstance(t, ModelTransport) for t in model._sends)


async def test_through_an_httpx_client_too() -> None:
    """The transport is a plain httpx transport: an AsyncClient on it posts, streams and
    decodes as usual; a scheme it does not speak is httpx's UnsupportedProtocol."""

    async def answer(seen: Seen, stream: Any) -> bool:
        await stream.send_all(chunked(b'{"a":', b"1}"))
        return True

    async with trio.open_nursery() as nursery:
        server = await ModelServer(answer).start(nursery)
        with trio.fail_after(WAIT):
            transport = ModelTransport(max_connections=2)
            async with httpx.AsyncClient(transport=transport) as client:
                response = await client.post(server.url() + "/x", json={"q": 1})
                assert response.status_code == 200
                assert response.json() == {"a": 1}
                assert response.http_version == "HTTP/1.1"
                with pytest.raises(httpx.UnsupportedProtocol):
                    await transport.handle_async_request(httpx.Request("GET", "ftp://x/"))
            assert transport.open_connections == 0
        nursery.cancel_scope.cancel()
