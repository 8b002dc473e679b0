"""ufo_trio: a Trio server for the Agent Interaction Protocol (AIP) of Microsoft UFO.

The public API is what this module re-exports; everything in `ufo_trio._*` is private.
"""

from ._agents import (
    Agent,
    AgentFactory,
    ScriptAgent,
    SessionContext,
    TaskFailed,
    UnsupportedPlatform,
)
from ._config import ServerConfig
from ._errors import ConfigError, ConnectionGone, UfoTrioError
from ._messages import (
    ClientMessage,
    ClientMessageType,
    ClientType,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
    ToolType,
)
from ._server import Server, serve
from ._version import __version__

__all__ = [
    "Agent",
    "AgentFactory",
    "ClientMessage",
    "ClientMessageType",
    "ClientType",
    "Command",
    "ConfigError",
    "ConnectionGone",
    "Result",
    "ResultStatus",
    "ScriptAgent",
    "Server",
    "ServerConfig",
    "ServerMessage",
    "ServerMessageType",
    "SessionContext",
    "TaskFailed",
    "TaskStatus",
    "ToolType",
    "UfoTrioError",
    "UnsupportedPlatform",
    "__version__",
    "serve",
]
