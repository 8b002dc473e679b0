"""The client SDK's exceptions.

They are deliberately separate from the server's hierarchy: the SDK talks only the wire protocol
and shares no code with the server. Every message is one line, fit for a CLI.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base class of every error the client SDK raises on purpose."""


class ConnectFailed(ClientError):
    """The WebSocket connection could not be opened (unreachable host, timeout, wrong path)."""


class AuthenticationFailed(ConnectFailed):
    """The server refused the WebSocket handshake with HTTP 403 (AUTH-1).

    The protocol does not say whether the key was wrong or an ``Origin`` was refused; either
    way retrying with the same settings cannot help, so the SDK never retries this error.
    """


class TLSError(ConnectFailed):
    """The TLS handshake with a ``wss://`` or ``https://`` server failed.

    Either the server's certificate could not be verified (expired, issued for another host
    name, signed by a CA this client does not trust), or the URL's scheme does not match the
    port (``wss://`` to a plain server, ``ws://`` to a TLS one). Retrying with the same settings cannot help, so the SDK never retries this error.
    """


class RegistrationRefused(ClientError):
    """The server answered REGISTER with an ERROR (REG-2, REG-4, DUP-2).

    ``code`` is the ERROR's ``code`` key (for example ``duplicate_client_id`` or
    ``unknown_target``), ``error`` the server's text.
    """

    def __init__(self, client_id: str, error: str, code: str | None) -> None:
        self.client_id = client_id
        self.error = error
        self.code = code
        suffix = f" ({code})" if code else ""
        super().__init__(f"registration of {client_id!r} refused by the server: {error}{suffix}")


class ConnectionLost(ClientError):
    """An open connection ended: the peer closed it, the network failed or a send timed out.

    ``code`` and ``reason`` are the WebSocket close code and reason when one was received.
    """

    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None) -> None:
        self.code = code
        self.reason = reason
        super().__init__(message)


class ProtocolViolation(ClientError):
    """The server sent something the protocol does not allow (for example a bad first frame)."""


class RequestRejected(ClientError):
    """The server answered a request (such as a device-info request) with an ERROR frame."""

    def __init__(self, error: str, code: str | None) -> None:
        self.error = error
        self.code = code
        suffix = f" ({code})" if code else ""
        super().__init__(f"{error}{suffix}")


class DeviceNotFound(ClientError):
    """A device-info request named a device that is not registered or has no system info."""


class RequestTimeout(ClientError, TimeoutError):
    """No answer arrived within the caller's timeout.

    For a task this does not stop it on the server: AIP has no cancel message (CAN-2).
    """


class PlanError(ClientError, ValueError):
    """A task plan is malformed; the message names the first problem."""
