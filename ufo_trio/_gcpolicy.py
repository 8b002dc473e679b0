"""The server's garbage-collector policy: survivors of a full collection are frozen.

Why (docs/performance.md, "gcburst"): CPython's full (generation-2) collection scans every
tracked object the process holds, so its pause grows with the fleet: at 10,000 idle devices each
full pass took 0.3-0.7 s, and CPython runs one every time the old generation has grown by a
quarter, i.e. about a dozen while 10,000 devices register, and more while they leave. The
objects such a pass scans are almost all alive (it freed nothing in the benchmarks): connections,
their tasks, the registry.

The policy: after each full collection, its survivors move to the permanent generation
(`gc.freeze()`), so the next full pass scans only what became old since. The price is that
cyclic garbage among frozen objects is not collected while they stay frozen (objects freed by
reference counting, i.e. almost all of them, go at once, frozen or not). So the frozen set is
thawed (`gc.unfreeze()`) whenever it has doubled since the last thaw: the next full pass then
scans everything once, collects such garbage, and freezes the survivors again. Dead cycles held
frozen are thus bounded by about the frozen set after the last thaw (the peak live heap since
then, at least `THAW_MIN_OBJECTS`), never unbounded; a fleet that grows pays one full-size pass
per doubling instead of one per quarter.

Installed once by `python -m ufo_trio` (`_cli.run_serve`) after start-up, right after the first
`gc.freeze()` of everything imported. A `gc.callbacks` hook, no task.
"""

from __future__ import annotations

import gc
import sys
from typing import Any, Final

#: Thaw once the frozen objects beyond the start-up set have grown to this many times what they
#: were after the last thaw ...
THAW_FACTOR: Final = 2
#: ... and to at least this many objects (about 2,500 idle devices; one full pass over them takes
#: tens of milliseconds). Without the floor a 500-session burst on a fresh server thawed at once
#: and its next full pass rescanned everything (bench llm-concurrent, docs/performance.md).
THAW_MIN_OBJECTS: Final = 100_000


class FreezeSurvivors:
    """A `gc.callbacks` hook: freeze the survivors of full collections, thaw when doubled."""

    __slots__ = ("_baseline", "_startup", "_thawed", "thaws")

    def __init__(self) -> None:
        self._startup = gc.get_freeze_count()  # modules, classes, config: alive for good
        self._baseline = 0  # frozen objects beyond the start-up set after the last thaw's pass
        self._thawed = False  # the next full pass scans everything
        self.thaws = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        if self._thawed:  # the pass that scanned everything is done: start afresh
            gc.freeze()
            self._thawed = False
            self._baseline = gc.get_freeze_count() - self._startup
            return
        gc.freeze()
        grown = gc.get_freeze_count() - self._startup
        if grown > max(THAW_FACTOR * self._baseline, THAW_MIN_OBJECTS):
            # Everything goes back to the old generation: the next full pass scans it all once
            # (and collects any cycle that died while frozen), then its survivors are frozen.
            gc.unfreeze()
            self._thawed = True
            self.thaws += 1


#: CPython 3.14's collector is incremental (a young generation plus increments of the old one),
#: so no single pass rescans the whole heap and generation-2 callbacks mean something else: the
#: hook is for the generational collector of 3.11-3.13 only.
APPLIES: Final = sys.version_info < (3, 14)


def install() -> FreezeSurvivors | None:
    """Freeze what exists now (everything start-up made) and, where it applies, install the
    hook. `python -m ufo_trio` calls it once."""
    gc.freeze()
    if not APPLIES:
        return None
    hook = FreezeSurvivors()
    gc.callbacks.append(hook)
    return hook


def uninstall(hook: FreezeSurvivors | None) -> None:
    """Remove the hook and thaw everything (tests; a process that embeds the server)."""
    if hook in gc.callbacks:
        gc.callbacks.remove(hook)
    gc.unfreeze()
