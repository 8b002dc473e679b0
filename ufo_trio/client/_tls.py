"""TLS for ``wss://`` and ``https://``: the client context and a handshake with clear errors.

Verification is always on unless the caller passes a context that turns it off. The default
context is `ssl.create_default_context()`: the system's trust store, which ``SSL_CERT_FILE``
and ``SSL_CERT_DIR`` override; `client_context(cafile)` trusts a private CA instead.
"""

from __future__ import annotations

import ssl

import trio

from ._errors import ConnectFailed, TLSError


def client_context(cafile: str | None = None, *, insecure: bool = False) -> ssl.SSLContext:
    """A client `SSLContext`: the default trust store, or only the CA(s) in *cafile* (PEM).

    *insecure* turns certificate and host name verification off (for tests against a
    throw-away certificate only). Raises `ValueError` with one line if *cafile* is unusable.
    """
    try:
        context = ssl.create_default_context(cafile=cafile)
    except FileNotFoundError:
        raise ValueError(f"CA file not found: {cafile}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cannot load CA file {cafile}: {getattr(exc, 'reason', None) or exc}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def handshake(
    stream: trio.SSLStream[trio.SocketStream], shown: str
) -> None:
    """Complete the TLS handshake on *stream*; `TLSError` (one line) if it fails.

    The server hanging up mid-handshake is a (retryable) `ConnectFailed`; any other failure
    comes out as `trio.BrokenResourceError`.
    """
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        error = exc.__cause__
        if isinstance(error, ssl.SSLCertVerificationError):
            detail = error.verify_message or error.reason or str(error)
            hint = ""
            if error.verify_code in (19, 20, 21):  # self-signed / unknown issuer
                hint = " (for a private CA use --ca FILE, or ssl_context=client_context(FILE))"
            raise TLSError(
                f"cannot connect to {shown}: the server's TLS certificate was refused: "
                f"{detail.rstrip('.')}{hint}"
            ) from None
        if isinstance(error, ssl.SSLEOFError):
            # The server hung up mid-handshake (e.g. at its connection cap): worth a retry.
            raise ConnectFailed(
                f"cannot connect to {shown}: the server closed the connection during the "
                "TLS handshake"
            ) from None
        if isinstance(error, ssl.SSLError):
            raise TLSError(
                f"cannot connect to {shown}: TLS handshake failed "
                f"({(error.reason or str(error)).lower().replace('_', ' ')}); "
                "does the server serve TLS on this port?"
            ) from None
        raise
