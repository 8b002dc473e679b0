"""Limits that refuse work, and the one log line each refusal writes (§2.2, issue 5).

* the connection cap (`--max-connections`): a TCP connection over the cap gets HTTP 503 and is
  closed before anything else is read or allocated for it;
* the per-connection message rate (`--message-rate`, `--message-burst`): a token bucket checked
  for every data frame a registered connection sends; running dry means ERROR `rate_limited`,
  then close 1008.

The other limits live where they are enforced (LIM-1 in trio-websocket, LIM-2/3/4 and the 503 in
`_http`, LIM-6 in `_connection`, LIM-7 in `_sessions`); they all log through
`log_refusal`, so one grep for `limit ` finds every refusal.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from ._config import ServerConfig
    from ._connection import Connection
    from ._metrics import Metrics

log = logging.getLogger("ufo_trio")

#: ERROR text when a connection runs out of message tokens (code `rate_limited`).
MESSAGE_RATE_EXCEEDED: Final = "Message rate limit exceeded"
#: `detail` of the 503 a connection over `--max-connections` gets.
TOO_MANY_CONNECTIONS: Final = "Too many connections"

#: How long a refused or closing HTTP connection may keep draining what the peer still sends,
#: so that closing does not reset the connection before the peer has read our answer.
LINGER_SECONDS: Final = 1.0
LINGER_BYTES: Final = 1024 * 1024


def log_refusal(metrics: Metrics, client: str, limit: str, detail: str) -> None:
    """The one log line of a limit refusal: who, which limit (its flag name), and its value;
    counted in `limit_refusals_total{limit}`."""
    metrics.limit_refused(limit)
    log.warning("%s: limit %s reached (%s)", client, limit, detail)


class TokenBucket:
    """`rate` tokens per second, at most `burst` stored; starts full. Pure: time is passed in."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False if the bucket is dry."""
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
            self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def message_bucket(config: ServerConfig) -> TokenBucket | None:
    """A fresh bucket for one connection, or None when `--message-rate` is 0 (off)."""
    if config.message_rate <= 0:
        return None
    return TokenBucket(config.message_rate, config.message_burst, trio.current_time())


async def refuse_rate_limited(conn: Connection) -> None:
    """A connection sent frames faster than its bucket allows: ERROR, then close 1008."""
    config = conn.context.config
    log_refusal(
        conn.context.metrics,
        conn.label,
        "message-rate", f"{config.message_rate:g}/s, burst {config.message_burst}"
    )
    await conn.send_error(MESSAGE_RATE_EXCEEDED, "rate_limited")
    conn.close(1008, "rate_limited")


async def linger(stream: trio.abc.Stream) -> None:
    """Half-close our side, then discard what the peer still sends until it closes (bounded).

    Closing a socket with unread input makes the kernel send RST, and a peer that gets RST may
    drop our response unread. Call with a deadline around it; errors mean the peer is gone.
    """
    with trio.move_on_after(LINGER_SECONDS):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            drained = 0
            while drained < LINGER_BYTES:
                data = await stream.receive_some(65536)
                if not data:
                    return
                drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
