"""How the SDK's context managers let an exception group out (`raise_single_error`)."""

from __future__ import annotations

import pytest

from ufo_trio.client import ConnectFailed, ConnectionLost
from ufo_trio.client._util import raise_single_error


def test_a_group_of_one_error_is_raised_bare_without_shown_context() -> None:
    lost = ConnectionLost("gone")
    group = BaseExceptionGroup("g", [BaseExceptionGroup("inner", [lost])])
    with pytest.raises(ConnectionLost) as info:
        raise_single_error(group)
    assert info.value is lost
    assert info.value.__suppress_context__
    assert info.value.__cause__ is None


def test_translate_maps_the_single_error() -> None:
    group = BaseExceptionGroup("g", [OSError("refused")])
    with pytest.raises(ConnectFailed, match=r"^mapped$"):
        raise_single_error(group, lambda error: ConnectFailed("mapped"))


def test_several_errors_propagate_as_the_same_group() -> None:
    group = BaseExceptionGroup("g", [ValueError("a"), KeyError("b")])
    with pytest.raises(BaseExceptionGroup) as info:
        raise_single_error(group, lambda error: ConnectFailed("never"))
    assert info.value is group
