"""Trio clients for an AIP server: devices that run tools, constellations that submit tasks.

The SDK speaks only the wire protocol (PROTOCOL.md) and imports nothing from the server, so it
works against any AIP server and doubles as an outside check of ufo_trio. See docs/sdk.md.

::

    async with open_device(url, "dev-1", api_key=key) as device:
        await trio.sleep_forever()

    async with open_constellation(url, "orchestrator", api_key=key) as constellation:
        outcome = await constellation.run_task("dev-1", Plan.of(Command(tool_name="echo", ...)))
"""

from __future__ import annotations

from ._backoff import Backoff as Backoff
from ._builtins import collect_system_info as collect_system_info
from ._builtins import default_tools as default_tools
from ._constellation import Constellation as Constellation
from ._constellation import open_constellation as open_constellation
from ._device import Device as Device
from ._device import open_device as open_device
from ._device import run_device as run_device
from ._errors import AuthenticationFailed as AuthenticationFailed
from ._errors import ClientError as ClientError
from ._errors import ConnectFailed as ConnectFailed
from ._errors import ConnectionLost as ConnectionLost
from ._errors import DeviceNotFound as DeviceNotFound
from ._errors import PlanError as PlanError
from ._errors import ProtocolViolation as ProtocolViolation
from ._errors import RegistrationRefused as RegistrationRefused
from ._errors import RequestRejected as RequestRejected
from ._errors import RequestTimeout as RequestTimeout
from ._errors import TLSError as TLSError
from ._http import ApiUnavailable as ApiUnavailable
from ._http import list_clients as list_clients
from ._outcome import TaskOutcome as TaskOutcome
from ._outcome import format_outcome as format_outcome
from ._plan import Plan as Plan
from ._plan import StepResult as StepResult
from ._plan import load_plan as load_plan
from ._plan import parse_plan as parse_plan
from ._tls import client_context as client_context
from ._tools import Tool as Tool
from ._tools import ToolContext as ToolContext
from ._tools import ToolError as ToolError
from ._tools import ToolRegistry as ToolRegistry
from ._wire import Command as Command
from ._wire import ToolResult as ToolResult

__all__ = [
    "ApiUnavailable",
    "AuthenticationFailed",
    "Backoff",
    "ClientError",
    "Command",
    "ConnectFailed",
    "ConnectionLost",
    "Constellation",
    "Device",
    "DeviceNotFound",
    "Plan",
    "PlanError",
    "ProtocolViolation",
    "RegistrationRefused",
    "RequestRejected",
    "RequestTimeout",
    "StepResult",
    "TLSError",
    "TaskOutcome",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolRegistry",
    "ToolResult",
    "client_context",
    "collect_system_info",
    "default_tools",
    "format_outcome",
    "list_clients",
    "load_plan",
    "open_constellation",
    "open_device",
    "parse_plan",
    "run_device",
]
