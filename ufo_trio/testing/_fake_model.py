"""`FakeChatModel`: an OpenAI-compatible Chat Completions server for tests and demos.

It answers `POST …/chat/completions` from a script of replies (or a rule function), records every
request, and can be reached two ways:

* over real HTTP on 127.0.0.1 (`async with FakeChatModel(...) as model:` → `model.base_url`), for
  end-to-end runs and examples;
* in process (`model.transport()`, an `httpx.MockTransport`), for MockClock tests: its delays sleep
  on trio's clock, so `autojump_clock` drives them.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import attrs
import h11
import httpx
import trio

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["FakeChatModel", "FakeReply", "FakeRequest"]

_MAX_BODY = 64 * 1024 * 1024


@attrs.frozen(kw_only=True)
class FakeReply:
    """One scripted answer. Build it with the class methods; a plain `str` means `answer(str)`."""

    content: str | None = None
    #: (function name, arguments) pairs; arguments is a dict (sent as JSON text) or raw text.
    tool_calls: tuple[tuple[str, Any], ...] = ()
    status: int = 200
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    drop: bool = False
    delay: float | None = None

    @classmethod
    def answer(cls, text: str, *, delay: float | None = None) -> FakeReply:
        """A final answer (no tool calls)."""
        return cls(content=text, delay=delay)

    @classmethod
    def call(cls, name: str, arguments: Any = None, *, delay: float | None = None) -> FakeReply:
        """One function call; `arguments` a dict, or a string sent verbatim (e.g. broken JSON)."""
        return cls(tool_calls=((name, {} if arguments is None else arguments),), delay=delay)

    @classmethod
    def calls(cls, *calls: tuple[str, Any], delay: float | None = None) -> FakeReply:
        """Several function calls in one turn (parallel tool calls)."""
        return cls(tool_calls=tuple(calls), delay=delay)

    @classmethod
    def http(
        cls,
        status: int,
        body: str | bytes | dict[str, Any] = b"",
        headers: dict[str, str] | None = None,
        *,
        delay: float | None = None,
    ) -> FakeReply:
        """A raw HTTP answer (errors, non-JSON bodies, `choices: []`, …)."""
        if isinstance(body, dict):
            data = json.dumps(body).encode()
        else:
            data = body.encode() if isinstance(body, str) else body
        return cls(
            status=status, body=data, headers=tuple((headers or {}).items()), delay=delay
        )

    @classmethod
    def disconnect(cls) -> FakeReply:
        """Close the connection without answering (a crashed or unreachable server)."""
        return cls(drop=True)


@attrs.define(eq=False)
class FakeRequest:
    """One request the fake model received. `cancelled`: the client went away before the answer."""

    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    cancelled: bool = False

    @property
    def messages(self) -> list[dict[str, Any]]:
        value = self.json.get("messages") if isinstance(self.json, dict) else None
        return value if isinstance(value, list) else []

    @property
    def tools(self) -> list[dict[str, Any]]:
        value = self.json.get("tools") if isinstance(self.json, dict) else None
        return value if isinstance(value, list) else []


Rule = Callable[[FakeRequest], "FakeReply | str"]


class FakeChatModel:
    """A scripted Chat Completions server (see the module docstring).

    `replies` are used in order (a `str` is a final answer); `rule(request) -> reply` is used
    instead when given. A request after the script ran out gets HTTP 400 with a message saying so.
    `delay` (seconds, trio clock) applies before every answer unless the reply sets its own.
    """

    def __init__(
        self,
        replies: Iterable[FakeReply | str] = (),
        *,
        rule: Rule | None = None,
        delay: float = 0.0,
        model: str = "fake-model",
    ) -> None:
        self._replies = list(replies)
        self._next = 0
        self._rule = rule
        self.delay = delay
        self.model = model
        self.requests: list[FakeRequest] = []
        self.base_url = ""
        self._ids = itertools.count(1)
        self._stack: AsyncExitStack | None = None

    # ------------------------------------------------------------------ answering

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> FakeRequest:
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        request = FakeRequest(path=path, headers=headers, body=body, json=value)
        self.requests.append(request)
        return request

    def _reply(self, request: FakeRequest) -> FakeReply:
        if not request.path.rstrip("/").endswith("/chat/completions"):
            return FakeReply.http(404, {"error": {"message": f"no route {request.path}"}})
        if self._rule is not None:
            reply: FakeReply | str = self._rule(request)
        elif self._next < len(self._replies):
            reply = self._replies[self._next]
            self._next += 1
        else:
            return FakeReply.http(
                400,
                {"error": {"message": f"FakeChatModel: script exhausted after {self._next} replies"}},
            )
        return FakeReply.answer(reply) if isinstance(reply, str) else reply

    def _render(self, reply: FakeReply, request: FakeRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = list(reply.headers)
        if reply.body is not None or reply.status != 200:
            return reply.status, headers, reply.body or b""
        n = next(self._ids)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{n}_{i}",
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": args if isinstance(args, str) else json.dumps(args),
                    },
                }
                for i, (name, args) in enumerate(reply.tool_calls)
            ]
        completion = max(1, len(json.dumps(message)) // 4)
        prompt = max(1, len(request.body) // 4)
        body = {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if reply.tool_calls else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        headers.append(("content-type", "application/json"))
        return 200, headers, json.dumps(body).encode()

    # ------------------------------------------------------------------ in process

    def transport(self) -> httpx.MockTransport:
        """An httpx transport that answers in process; delays sleep on trio's (mock) clock."""

        async def handle(http_request: httpx.Request) -> httpx.Response:
            body = await http_request.aread()
            request = self._record(
                http_request.url.path, dict(http_request.headers.items()), body
            )
            reply = self._reply(request)
            try:
                await trio.sleep(self.delay if reply.delay is None else reply.delay)
            except trio.Cancelled:
                request.cancelled = True
                raise
            if reply.drop:
                raise httpx.ConnectError("FakeChatModel: connection dropped", request=http_request)
            status, headers, data = self._render(reply, request)
            return httpx.Response(status, headers=headers, content=data)

        return httpx.MockTransport(handle)

    # ------------------------------------------------------------------ over HTTP

    async def __aenter__(self) -> FakeChatModel:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            nursery = await stack.enter_async_context(trio.open_nursery())
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, self._serve_one, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            self.base_url = f"http://127.0.0.1:{port}/v1"
            stack.callback(nursery.cancel_scope.cancel)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        return await stack.__aexit__(exc_type, exc, tb)

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        async with stream:
            while True:
                head = await self._next_event(conn, stream)
                if not isinstance(head, h11.Request):
                    return
                body = bytearray()
                while True:
                    event = await self._next_event(conn, stream)
                    if isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > _MAX_BODY:
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    else:
                        return
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in head.headers}
                request = self._record(head.target.decode("latin-1").split("?")[0], headers, bytes(body))
                reply = self._reply(request)
                delay = self.delay if reply.delay is None else reply.delay
                if not await self._wait_unless_gone(stream, conn, delay):
                    request.cancelled = True
                    return
                if reply.drop:
                    return
                status, extra, data = self._render(reply, request)
                out = [*extra, ("content-length", str(len(data)))]
                try:
                    await stream.send_all(conn.send(h11.Response(status_code=status, headers=out)) or b"")
                    await stream.send_all(conn.send(h11.Data(data=data)) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                except trio.BrokenResourceError:
                    request.cancelled = True
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()

    @staticmethod
    async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            conn.receive_data(data)

    @staticmethod
    async def _wait_unless_gone(stream: trio.SocketStream, conn: h11.Connection, delay: float) -> bool:
        """Sleep `delay`; False as soon as the client closes the connection meanwhile."""
        if delay <= 0:
            return True
        gone = False
        with trio.move_on_after(delay):
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                gone = True
            else:  # a pipelined request: keep it for the next cycle, then wait out the delay
                conn.receive_data(data)
                await trio.sleep_forever()
        return not gone
