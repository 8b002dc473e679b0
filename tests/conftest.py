"""Shared fixtures. Keep each addition small and self-contained: several test files use this."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from collections.abc import Iterator

# --- Hypothesis: repeatable by default --------------------------------------------------------
#
# CI must not fail on an example nobody has seen before, so every run draws the same examples
# and keeps no database. `HYPOTHESIS_PROFILE=explore` searches with fresh randomness instead.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


# --- chromium: one headless Debian Chromium per run, driven by Selenium (tests/browser.py) -------


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    from browser import chromium_session

    yield from chromium_session()
