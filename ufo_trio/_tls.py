"""Built-in TLS: the server's certificate and key, loaded at start and reloaded on SIGHUP.

`ServerTLS` is built once at server start (`load_tls`) and owned by the `Server`. Every new
connection takes `ServerTLS.context` as it is at that moment; `reload()` swaps in a fresh
`ssl.SSLContext`, so live connections keep the one they were accepted with and are never
dropped. A reload that fails is logged and leaves the old pair in use.

`accept_tls` is the per-connection part: under the caller's LIM-2 deadline it refuses a
plain-HTTP request (one line of JSON, `400`) and otherwise runs the TLS handshake.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from typing import TYPE_CHECKING

import attrs
import trio

from ._errors import ConfigError
from ._http import HttpConnection, error_reply

if TYPE_CHECKING:
    from ._config import ServerConfig
    from ._metrics import Metrics

log = logging.getLogger("ufo_trio")

#: The first byte of every TLS record that opens a handshake (content type 22).
_TLS_HANDSHAKE = 0x16
#: What a plain-text request on the TLS port gets: one response, then the connection closes.
PLAIN_REFUSAL = error_reply(400, "This port speaks TLS: use wss:// or https:// URLs", close=True)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server `SSLContext` for the PEM files *cert* (chain) and *key*: TLS 1.2 or newer, the
    `ssl` module's default ciphers. Blocking (reads files). Raises `ConfigError` with one line
    for a missing, unreadable, malformed or mismatched pair."""
    # Checked one by one first: load_cert_chain's OSError does not say which file it was.
    _check_file("tls-cert", cert)
    _check_file("tls-key", key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 renegotiation started by a client only costs the server CPU: refuse it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls: cannot use certificate {cert!r} with key {key!r}: {_ssl_reason(exc)}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"tls: cannot read {cert!r} / {key!r}: {exc.strerror or exc}") from None
    return context


def _check_file(flag: str, path: str) -> None:
    """Raise `ConfigError` naming *path* unless it is a readable file."""
    if os.path.isdir(path):
        raise ConfigError(f"tls: {flag} {path!r} is a directory")
    if not os.path.exists(path):
        raise ConfigError(f"tls: {flag}: no such file: {path!r}")
    if not os.path.isfile(path):
        raise ConfigError(f"tls: {flag} {path!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"tls: {flag}: cannot read {path!r}: permission denied")


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or ""
    text = f"{reason} {exc}"
    if "KEY_VALUES_MISMATCH" in text:
        return "the key does not belong to the certificate"
    if "PEM" in text:
        return "not a PEM certificate and private key"
    return reason.lower().replace("_", " ") or str(exc)


@attrs.define(eq=False)
class ServerTLS:
    """The certificate and key files and the `SSLContext` new connections use."""

    cert: str
    key: str
    context: ssl.SSLContext

    async def reload(self) -> bool:
        """Load the files again (in a thread) and use them for new connections.

        True on success. On failure the old context stays and the reason is logged.
        """
        try:
            context = await trio.to_thread.run_sync(server_context, self.cert, self.key)
        except ConfigError as exc:
            log.error("TLS reload failed, keeping the previous certificate: %s", exc)
            return False
        self.context = context
        log.info("TLS certificate reloaded from %s", self.cert)
        return True


async def load_tls(cert: str, key: str) -> ServerTLS:
    """`ServerTLS` for the pair; raises `ConfigError` (one line) if it cannot be used."""
    context = await trio.to_thread.run_sync(server_context, cert, key)
    return ServerTLS(cert=cert, key=key, context=context)


async def accept_tls(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    remote: str,
    config: ServerConfig,
    metrics: Metrics,
) -> trio.SSLStream[trio.abc.Stream] | None:
    """Run the server side of the TLS handshake on *stream*; None if it failed.

    Call under the LIM-2 deadline. A peer whose first byte is not a TLS handshake record
    (plain `ws://` or `http://`) gets a `400` in plain text and None is returned; a failed
    handshake is logged at INFO in one line.
    """
    sock = getattr(stream, "socket", None)
    if sock is not None:
        try:
            first = await sock.recv(1, socket.MSG_PEEK)
        except OSError:  # reset before it sent anything
            return None
        if not first:
            return None
        if first[0] != _TLS_HANDSHAKE:
            log.info("%s: plain-text request on the TLS port refused (400)", remote)
            # Lingers after the answer, so the peer reads it instead of a reset.
            await HttpConnection(stream, remote, config, metrics).refuse_connection(
                PLAIN_REFUSAL
            )
            return None
    # https_compatible: clients often close without a TLS close_notify; the WebSocket and HTTP
    # layers above frame their own messages, so a bare EOF is an ordinary end.
    tls = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        reason = _ssl_reason(cause) if isinstance(cause, ssl.SSLError) else "connection lost"
        log.info("%s: TLS handshake failed: %s", remote, reason)
        return None
    return tls
