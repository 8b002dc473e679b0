"""Server configuration: one frozen attrs value, shared by the CLI, tests and embedders."""

from __future__ import annotations

import enum
import urllib.parse
from typing import Any, Final

import attrs

from ._errors import ConfigError


class DuplicatePolicy(enum.StrEnum):
    """`--duplicate-policy`: what a REGISTER for an id that is already online gets (§3.2)."""

    PROBE = "probe"
    REJECT = "reject"
    TAKEOVER = "takeover"


DUPLICATE_POLICIES = tuple(p.value for p in DuplicatePolicy)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: LIM-5: inbound frames queued per connection before the reader pauses.
INBOUND_QUEUE_SIZE = 32
#: LIM-6: writing one outbound frame.
SEND_TIMEOUT = 30.0
#: LIM-3: HTTP request head.
MAX_HEADER_SIZE = 16 * 1024
#: LIM-4: HTTP request body.
MAX_BODY_SIZE = 1024 * 1024
#: LIM-7: live sessions per requesting connection.
MAX_SESSIONS_PER_CLIENT = 64
#: LIM-8: finished-session result store.
RESULT_STORE_SIZE = 1024
#: Concurrent TCP connections (WebSocket and HTTP); one more gets 503.
MAX_CONNECTIONS = 16384
#: Data frames per second a registered connection may send on average, and the burst on top.
MESSAGE_RATE = 1000.0
MESSAGE_BURST = 2000
#: DUP-4: upper bound of the duplicate-id probe.
PROBE_TIMEOUT_CAP = 5.0
#: How long the WebSocket closing handshake may take before the socket is aborted.
CLOSE_TIMEOUT = 5.0
#: Task history (issue 11): retention, row cap, stored result size.
DB_RETENTION_DAYS = 30.0
DB_MAX_TASKS = 100_000
DB_MAX_RESULT_BYTES = 1024 * 1024


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be >= 0, got {value:g}")


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be > 0, got {value:g}")


def _key(_inst: object, _attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not value.strip():
        raise ConfigError("api-key must not be empty (leave it unset to generate one)")


def _db_path(_inst: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not value.strip() or "\x00" in value:
        raise ConfigError("db must be a file path or :memory:")


def _port(_inst: object, _attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, got {value}")


def _one_of(choices: tuple[str, ...]) -> attrs._ValidatorType[str]:
    def check(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            raise ConfigError(
                f"{attribute.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}"
            )

    return check


def shown_url(parts: urllib.parse.SplitResult) -> str:
    """scheme://host[:port]/path of a URL for messages: no user info, query or fragment
    (they may hold keys)."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


#: The built-in agents that need a model (`--llm-base-url`); ufo_trio._llm builds them.
LLM_AGENTS: Final = ("llm", "auto")


def parse_tool_secret(spec: str) -> tuple[str, str]:
    """`--tool-secret PARAM=ENV_VAR` → (PARAM, ENV_VAR); raises `ConfigError` with one line."""
    param, sep, env_var = spec.partition("=")
    param, env_var = param.strip(), env_var.strip()
    if not sep or not param or not env_var:
        raise ConfigError(f"tool-secret must be PARAM=ENV_VAR, got {spec!r}")
    return param, env_var


def _http_url(_inst: object, _attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError as exc:  # e.g. "http://[::1": the message does not echo the URL
        raise ConfigError(f"llm-base-url is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"llm-base-url must be an http:// or https:// URL, got {shown_url(parts)!r}"
        )
    try:
        parts.port  # noqa: B018  (raises on a port that is not a number in 0-65535)
    except ValueError:
        raise ConfigError(
            f"llm-base-url has a bad port (not a number in 0-65535): {shown_url(parts)!r}"
        ) from None


def _temperature(_inst: object, _attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value <= 2:
        raise ConfigError(f"llm-temperature must be between 0 and 2, got {value:g}")


def _upper(value: str) -> str:
    return value.upper()


def _duplicate_policy(value: str) -> DuplicatePolicy:
    try:
        return DuplicatePolicy(value)
    except ValueError:
        raise ConfigError(
            f"duplicate-policy must be one of {', '.join(DUPLICATE_POLICIES)}, got {value!r}"
        ) from None


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Everything `serve` needs. Defaults follow PROTOCOL.md §2 (EP-2).

    `api_key=None` means "generate one" (`secrets.token_urlsafe(32)`) when the server starts.
    Invalid values raise `ConfigError` with a one-line message.
    """

    host: str = "127.0.0.1"
    port: int = attrs.field(default=5000, validator=_port)
    api_key: str | None = attrs.field(default=None, validator=_key)
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    registration_timeout: float = attrs.field(default=30.0, validator=_positive)
    ping_interval: float = attrs.field(default=20.0, validator=_non_negative)
    ping_timeout: float = attrs.field(default=20.0, validator=_positive)
    heartbeat_timeout: float = attrs.field(default=0.0, validator=_non_negative)
    command_timeout: float = attrs.field(default=600.0, validator=_positive)
    max_message_size: int = attrs.field(default=100 * 1024 * 1024, validator=_positive)
    duplicate_policy: DuplicatePolicy = attrs.field(
        default=DuplicatePolicy.PROBE, converter=_duplicate_policy
    )
    shutdown_grace: float = attrs.field(default=5.0, validator=_non_negative)
    log_level: str = attrs.field(default="INFO", converter=_upper, validator=_one_of(LOG_LEVELS))
    #: `script`, `llm`, `auto` or `package.module:factory`; None = `auto` with an LLM base URL,
    #: else `script` (see `effective_agent`).
    agent: str | None = None
    # The llm agent (docs/agents.md). The key comes only from env UFO_TRIO_LLM_API_KEY on the CLI.
    llm_base_url: str | None = attrs.field(default=None, validator=_http_url)
    llm_model: str | None = None
    llm_api_key: str | None = attrs.field(default=None, repr=False)
    llm_max_steps: int = attrs.field(default=20, validator=_positive)
    llm_timeout: float = attrs.field(default=120.0, validator=_positive)
    llm_temperature: float = attrs.field(default=0.0, validator=_temperature)
    llm_max_output_bytes: int = attrs.field(default=16 * 1024, validator=_positive)
    llm_max_connections: int = attrs.field(default=100, validator=_positive)
    #: `PARAM=ENV_VAR` each: PARAM is hidden from the model and filled from ENV_VAR on every call.
    tool_secrets: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    # Limits that are not CLI flags in the spec but that tests and embedders may tune.
    send_timeout: float = attrs.field(default=SEND_TIMEOUT, validator=_positive)
    inbound_queue_size: int = attrs.field(default=INBOUND_QUEUE_SIZE, validator=_positive)
    max_sessions_per_client: int = attrs.field(
        default=MAX_SESSIONS_PER_CLIENT, validator=_positive
    )
    result_store_size: int = attrs.field(default=RESULT_STORE_SIZE, validator=_positive)
    #: trio-websocket reads 4 KiB at a time by default, which is slow for large frames.
    receive_buffer_size: int = attrs.field(default=64 * 1024, validator=_positive)
    # Hardening limits (docs/operations.md); 0 turns the connection cap and the rate limit off.
    max_connections: int = attrs.field(default=MAX_CONNECTIONS, validator=_non_negative)
    message_rate: float = attrs.field(default=MESSAGE_RATE, validator=_non_negative)
    message_burst: int = attrs.field(default=MESSAGE_BURST, validator=_positive)
    max_header_size: int = attrs.field(default=MAX_HEADER_SIZE, validator=_positive)
    max_body_size: int = attrs.field(default=MAX_BODY_SIZE, validator=_positive)
    # Task history (issue 11, docs/operations.md). ":memory:" (the embedding default) keeps it in
    # memory only; the CLI defaults to ufo_trio.db. 0 turns the age limit / the row cap off.
    db: str = attrs.field(default=":memory:", validator=_db_path)
    db_retention_days: float = attrs.field(default=DB_RETENTION_DAYS, validator=_non_negative)
    db_max_tasks: int = attrs.field(default=DB_MAX_TASKS, validator=_non_negative)
    db_max_result_bytes: int = attrs.field(default=DB_MAX_RESULT_BYTES, validator=_positive)
    # Built-in TLS (docs/operations.md "TLS"): PEM certificate chain and private key, both or none.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Monitoring (docs/operations.md "Monitoring"): counting on/off, and `/metrics` without the key.
    metrics: bool = True
    metrics_public: bool = False

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls-cert and tls-key must be given together")
        agent = self.effective_agent
        if agent in LLM_AGENTS and not self.llm_base_url:
            raise ConfigError(f"agent {agent!r} needs --llm-base-url (and --llm-model)")
        if self.llm_base_url and not self.llm_model:
            raise ConfigError("--llm-model is required with --llm-base-url")
        for spec in self.tool_secrets:
            parse_tool_secret(spec)

    @property
    def effective_agent(self) -> str:
        """`agent`, or its default: `auto` when an LLM base URL is configured, else `script`."""
        if self.agent:
            return self.agent
        return "auto" if self.llm_base_url else "script"
