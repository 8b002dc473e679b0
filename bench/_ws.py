"""A minimal sans-IO WebSocket *client* codec for the load generator.

Why not trio-websocket or wsproto on the client side: the generator runs on its own CPU and must
stay far cheaper per round trip than the server it measures, or the benchmark measures the
generator. A client that only ever sends small text frames and reads unmasked server frames
needs very little of RFC 6455, so this module does just that:

* the opening handshake request and a check of the server's 101 answer;
* encoding client frames with an all-zero masking key. RFC 6455 wants an unpredictable key to
  stop cache poisoning through browser scripts; a benchmark on loopback has no such attacker,
  and a zero key turns masking into a no-op, so a 4 MiB frame costs one copy instead of an XOR
  pass in Python. Servers must unmask whatever key they get, so they cannot tell the difference;
* a frame parser that reassembles fragmented messages and reports control frames.

Nothing here touches a socket, so it can be tested with plain bytes.
"""

from __future__ import annotations

import base64
import hashlib
import os

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_ZERO_MASK = b"\x00\x00\x00\x00"


class WsError(Exception):
    """The server broke the handshake or the framing."""


def handshake_request(host: str, port: int, target: str) -> tuple[bytes, bytes]:
    """Return (request bytes, expected Sec-WebSocket-Accept value)."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    request = (
        f"GET {target} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode()
    return request, accept


def check_handshake_response(head: bytes, expected_accept: bytes) -> None:
    """Raise WsError unless `head` (up to, excluding, the blank line) is a valid 101."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"101":
        raise WsError(f"handshake refused: {lines[0].decode(errors='replace')}")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            if value.strip() != expected_accept:
                raise WsError("handshake: wrong Sec-WebSocket-Accept")
            return
    raise WsError("handshake: no Sec-WebSocket-Accept")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with the zero key (see the module docstring)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 0x10000:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + _ZERO_MASK + payload


def encode_text(payload: bytes) -> bytes:
    """A text frame; `payload` must already be UTF-8 JSON."""
    return encode_frame(OP_TEXT, payload)


def encode_close(code: int = 1000) -> bytes:
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big"))


class FrameParser:
    """Turns received bytes into (opcode, payload) events.

    Data messages come out whole (continuations joined) with opcode OP_TEXT or OP_BINARY;
    control frames come out as they arrive, which RFC 6455 allows between fragments.
    """

    __slots__ = ("_buf", "_frag_op", "_frags")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._frag_op = 0
        self._frags: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        events: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b1 & 0x80:
                raise WsError("server frames must not be masked")
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if end - pos < head + n:
                # Incomplete frame: wait for more bytes. Re-parsing the header next time costs
                # a few operations, so a 4 MiB frame arriving in many chunks stays linear.
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            if opcode >= OP_CLOSE:
                events.append((opcode, payload))
            elif opcode == OP_CONTINUATION:
                self._frags.append(payload)
                if fin:
                    events.append((self._frag_op, b"".join(self._frags)))
                    self._frags = []
            elif fin:
                events.append((opcode, payload))
            else:
                self._frag_op = opcode
                self._frags = [payload]
        if pos:
            del buf[:pos]
        return events
