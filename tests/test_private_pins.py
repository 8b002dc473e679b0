"""The private names of trio-websocket and h11 that ufo_trio reaches into still exist.

pyproject.toml caps both dependencies at the minor version tested. When one of them is
upgraded, this file says exactly which private name went missing, instead of the server
failing in some unrelated-looking way at run time.
"""

from __future__ import annotations

import h11
import pytest
import trio
import trio.testing
import trio_websocket
from wsproto import ConnectionType, WSConnection

from ufo_trio._websocket import ServerWebSocket

#: Methods of WebSocketConnection that ufo_trio/_websocket.py overrides or calls.
WS_METHODS = (
    "_abort_web_socket",
    "_get_request",
    "_handle_close_connection_event",
    "_handle_message_event",
    "_reader_task",
    "_send",
)
#: Attributes WebSocketConnection sets in __init__ that ufo_trio/_websocket.py reads or writes
#: (`_stream` is also closed by ufo_trio.testing.connect).
WS_ATTRIBUTES = (
    "_close_reason",
    "_max_message_size",
    "_message_parts",
    "_message_size",
    "_pings",
    "_reader_running",
    "_recv_channel",
    "_stream",
    "_stream_lock",
    "_wsproto",
)

UPGRADE_HINT = (
    "the private API changed: adapt ufo_trio/_websocket.py (or ufo_trio/_http.py) before "
    "raising the cap in pyproject.toml"
)


@pytest.mark.parametrize("name", WS_METHODS)
def test_trio_websocket_private_methods_exist(name: str) -> None:
    base = trio_websocket.WebSocketConnection
    assert callable(getattr(base, name, None)), (
        f"trio-websocket {trio_websocket.__version__}: WebSocketConnection.{name} is gone; "
        + UPGRADE_HINT
    )


@pytest.mark.parametrize("name", ["_handle_close_connection_event", "_handle_message_event"])
def test_the_overrides_really_override(name: str) -> None:
    """A rename upstream would leave our method in place but never called."""
    assert getattr(ServerWebSocket, name) is not getattr(trio_websocket.WebSocketConnection, name)
    assert name in vars(trio_websocket.WebSocketConnection), (
        f"trio-websocket {trio_websocket.__version__}: WebSocketConnection no longer defines "
        f"{name}, so ServerWebSocket's override is dead code; " + UPGRADE_HINT
    )


async def test_trio_websocket_private_attributes_exist() -> None:
    stream, _ = trio.testing.memory_stream_pair()
    connection = trio_websocket.WebSocketConnection(stream, WSConnection(ConnectionType.SERVER))
    missing = [name for name in WS_ATTRIBUTES if not hasattr(connection, name)]
    assert not missing, (
        f"trio-websocket {trio_websocket.__version__}: WebSocketConnection instances lack "
        f"{missing}; " + UPGRADE_HINT
    )


def test_h11_keeps_the_request_method_privately() -> None:
    """ufo_trio/_http.py reads `_request_method` to frame the refusal of a HEAD request."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    assert getattr(conn, "_request_method", None) == b"HEAD", (
        f"h11 {h11.__version__}: Connection._request_method no longer holds the request "
        "method; " + UPGRADE_HINT
    )


def test_httpx_client_private_transport_lookup_exists() -> None:
    """ufo_trio/_llm.py sends model calls through the transport the client picked for the URL."""
    import httpx

    assert callable(getattr(httpx.AsyncClient, "_transport_for_url", None)), (
        f"httpx {httpx.__version__}: AsyncClient._transport_for_url is gone; adapt "
        "OpenAIChatModel.__aenter__ in ufo_trio/_llm.py before raising the cap in pyproject.toml"
    )
