"""Small helpers shared by the SDK's connection managers."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


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


def raise_single_error(
    group: BaseExceptionGroup[BaseException],
    translate: Callable[[BaseException], BaseException] | None = None,
) -> NoReturn:
    """Re-raise *group* at a context manager's boundary, unwrapped when it holds one error.

    Call it from ``except BaseExceptionGroup as group:`` around the nursery of an SDK context
    manager. The one error `single_error` finds is raised bare (passed through *translate*
    first, when given), without the group as its shown context; otherwise *group* itself
    propagates unchanged.
    """
    error = single_error(group)
    if error is None:
        raise group
    raise (error if translate is None else translate(error)) from None
