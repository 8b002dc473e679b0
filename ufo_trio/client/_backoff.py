"""Reconnection delays: exponential backoff with jitter, as a pure, seedable schedule."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterator


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _fraction(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{attribute.name} must be between 0 and 1, got {value!r}")


def _factor(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value!r}")


def _attempts(_inst: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be >= 1 or None, got {value!r}")


@attrs.frozen(kw_only=True)
class Backoff:
    """How a device waits between reconnection attempts.

    Attempt ``n`` (from 0) waits ``min(max_delay, initial * factor**n)`` seconds, shortened by
    a random fraction of up to ``jitter`` so that many devices dropped at once by a restarting
    server do not all come back in the same instant. After ``max_attempts`` failed attempts in
    a row (``None`` = never give up) the device stops. The count restarts after every
    successful registration.
    """

    initial: float = attrs.field(default=1.0, validator=_positive)
    factor: float = attrs.field(default=2.0, validator=_factor)
    max_delay: float = attrs.field(default=30.0, validator=_positive)
    jitter: float = attrs.field(default=0.5, validator=_fraction)
    max_attempts: int | None = attrs.field(default=None, validator=_attempts)

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits before attempt 1, 2, ...; finite when ``max_attempts`` is set."""
        rng = rng if rng is not None else random.Random()
        attempt = 0
        while self.max_attempts is None or attempt < self.max_attempts:
            # Cap the exponent so a device that retries for days never overflows a float.
            base = min(self.max_delay, self.initial * self.factor ** min(attempt, 64))
            yield base * (1.0 - self.jitter * rng.random())
            attempt += 1
