"""A minimal HTTP/1.1 GET for the server's JSON API (§6), built on h11.

Enough for ``GET /api/clients``: one request per connection, ``Connection: close``, a bounded
response body, and the key in ``X-API-Key`` (AUTH-4).
"""

from __future__ import annotations

import json
import urllib.parse
from typing import TYPE_CHECKING, Any

import attrs
import h11
import trio

from ._errors import AuthenticationFailed, ClientError, ConnectFailed, TLSError
from ._tls import client_context, handshake

if TYPE_CHECKING:
    import ssl

#: Largest response body read.
MAX_BODY = 16 * 1024 * 1024


@attrs.frozen
class HttpResponse:
    status: int
    body: Any  # decoded JSON, or the raw text if it is not JSON


class ApiUnavailable(ClientError):
    """The server does not offer this HTTP API route (HTTP 404)."""


def api_url(ws_url: str, path: str) -> tuple[str, str, int, bool]:
    """(host, path, port, tls) of *path* on the server behind *ws_url* (a ``ws://``/``wss://``
    WebSocket URL, or the server's ``http://``/``https://`` base URL)."""
    parts = urllib.parse.urlsplit(ws_url)
    tls = parts.scheme in ("wss", "https")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if tls else 80)
    return host, path, port, tls


async def get_json(
    ws_url: str,
    path: str,
    *,
    api_key: str | None,
    wait: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> HttpResponse:
    """GET *path* from the server of *ws_url*. Raises `ConnectFailed` on network errors and
    `TLSError` if the TLS handshake fails (see `open_link`)."""
    host, target, port, tls = api_url(ws_url, path)
    host_header = f"[{host}]" if ":" in host else host
    if port not in (80, 443):
        host_header += f":{port}"
    headers = [("Host", host_header), ("Accept", "application/json"), ("Connection", "close")]
    if api_key is not None:
        headers.append(("X-API-Key", api_key))
    conn = h11.Connection(our_role=h11.CLIENT)
    try:
        with trio.fail_after(wait):
            stream: trio.abc.Stream
            if tls:
                tls_stream = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=ssl_context or client_context()
                )
                stream = tls_stream
                try:
                    await handshake(tls_stream, f"https://{host_header}")
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await trio.aclose_forcefully(stream)
                    raise
            else:
                stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(
                    conn.send(h11.Request(method="GET", target=target, headers=headers))
                    + conn.send(h11.EndOfMessage())
                )
                status = 0
                body = bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(bytes(await stream.receive_some(65536)))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_BODY:
                            raise ConnectFailed("response body too large")
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
    except trio.TooSlowError:
        raise ConnectFailed(f"no HTTP response from {host}:{port} within {wait:g} s") from None
    except (OSError, trio.BrokenResourceError, h11.RemoteProtocolError) as exc:
        raise ConnectFailed(f"HTTP request to {host}:{port} failed: {exc}") from None
    text = body.decode("utf-8", errors="replace")
    try:
        decoded: Any = json.loads(text)
    except ValueError:
        decoded = text
    return HttpResponse(status=status, body=decoded)


async def list_clients(
    ws_url: str, *, api_key: str | None, ssl_context: ssl.SSLContext | None = None
) -> list[Any]:
    """The server's ``online_clients`` list, in registration order (HTTP-1).

    *ws_url* is the server's WebSocket URL (or its ``http(s)://`` base URL); ``wss://`` and
    ``https://`` are verified with *ssl_context* (default: the system trust store).
    Raises `ApiUnavailable` if the server has no ``/api/clients`` route,
    `AuthenticationFailed` for 401/403, `TLSError` for a refused certificate and
    `ConnectFailed` otherwise.
    """
    response = await get_json(ws_url, "/api/clients", api_key=api_key, ssl_context=ssl_context)
    detail = response.body.get("detail") if isinstance(response.body, dict) else None
    if response.status == 404:
        raise ApiUnavailable(
            "this server does not offer the HTTP API (GET /api/clients answered 404)"
        )
    if response.status == 400 and isinstance(detail, str) and "speaks TLS" in detail:
        raise TLSError(f"{detail} (the server at {ws_url} was asked without TLS)")
    if response.status in (401, 403):
        raise AuthenticationFailed(
            f"the HTTP API refused the request ({response.status}: {detail or 'no detail'})"
        )
    if response.status != 200 or not isinstance(response.body, dict):
        raise ConnectFailed(f"GET /api/clients answered HTTP {response.status}")
    clients = response.body.get("online_clients")
    if not isinstance(clients, list):
        raise ConnectFailed("GET /api/clients answered without an 'online_clients' list")
    return clients


#: The detail of the task API's 404 for a session it does not (yet) know (api_contract).
TASK_NOT_FOUND = "Task not found"


async def get_task(
    ws_url: str,
    session_id: str,
    *,
    api_key: str | None,
    wait: float = 5.0,
    ssl_context: ssl.SSLContext | None = None,
) -> dict[str, Any] | None:
    """The server's task summary for *session_id* (``GET /api/tasks/{id}``), or ``None`` if
    the server does not know that session (yet).

    Raises `ApiUnavailable` if the server has no task API (any other 404),
    `AuthenticationFailed` for 401/403 and `ConnectFailed` otherwise.
    """
    path = f"/api/tasks/{urllib.parse.quote(session_id, safe='')}"
    response = await get_json(ws_url, path, api_key=api_key, wait=wait, ssl_context=ssl_context)
    detail = response.body.get("detail") if isinstance(response.body, dict) else None
    if response.status == 404:
        if detail == TASK_NOT_FOUND:
            return None
        raise ApiUnavailable("this server does not offer the task API (GET /api/tasks/...)")
    if response.status in (401, 403):
        raise AuthenticationFailed(
            f"the HTTP API refused the request ({response.status}: {detail or 'no detail'})"
        )
    if response.status != 200 or not isinstance(response.body, dict):
        raise ConnectFailed(f"GET {path} answered HTTP {response.status}")
    return response.body
