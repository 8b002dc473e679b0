"""The public surface of the server package is what docs/api.md lists (STYLE 1)."""

from __future__ import annotations

import ufo_trio
import ufo_trio.testing


def test_server_package_surface() -> None:
    assert sorted(ufo_trio.__all__) == sorted(
        [
            "Agent", "AgentFactory", "ClientMessage", "ClientMessageType", "ClientType",
            "Command", "ConfigError", "ConnectionGone", "Result", "ResultStatus", "ScriptAgent",
            "Server", "ServerConfig", "ServerMessage", "ServerMessageType", "SessionContext",
            "TaskFailed", "TaskStatus", "ToolType", "UfoTrioError", "UnsupportedPlatform",
            "__version__", "serve",
        ]
    )  # fmt: skip
    for name in ufo_trio.__all__:
        assert getattr(ufo_trio, name) is not None


def test_testing_helpers_surface() -> None:
    assert sorted(ufo_trio.testing.__all__) == [
        "FakeChatModel", "FakeReply", "FakeRequest", "MemoryServer", "RawClient", "TEST_KEY",
        "connect", "open_memory_server", "open_server",
    ]  # fmt: skip
