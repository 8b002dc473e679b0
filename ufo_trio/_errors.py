"""The project's exception hierarchy."""

from __future__ import annotations


class UfoTrioError(Exception):
    """Base class of every error ufo_trio raises on purpose."""


class ConfigError(UfoTrioError, ValueError):
    """A configuration value is invalid; the message is one line, fit for a CLI."""


class ConnectionGone(UfoTrioError):
    """A frame could not be sent because the connection is closing or closed (PROC-3)."""
