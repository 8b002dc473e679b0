"""Small helpers shared by the SDK's connection managers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Iterator


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def single_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception in *group*, if it holds exactly one and that one is not `Cancelled`.

    The SDK's context managers run the caller's block inside a nursery whose background tasks
    report expected failures without raising, so a group reaching the boundary usually holds
    one error: the caller's own, or the one fatal error of the connection. That one is
    re-raised bare; anything else (several errors, cancellations) propagates untouched.
    """
    leaves = list(_leaves(group))
    if len(leaves) == 1 and not isinstance(leaves[0], trio.Cancelled):
        return leaves[0]
    return None
