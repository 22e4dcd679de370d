"""How many memory-snapshot restores run at once on this host, and giving up a restore that is no longer needed.

A restore is bound by the CPU: CRIU fills hundreds of MB of pages, one page fault at a time. Eight restores
started together on two cores all finish late (each gets a quarter of a core), while the same eight run two
at a time have the first copies serving after one restore's time, and those copies answer the queued calls
of the burst (a W2 call takes ~15 ms once restored) before most of the other restores would have finished.
So restores take a slot from a host-wide pool of ``WARMBOOT_MAX_PARALLEL_RESTORES`` (default: the CPU
count), and a start that waited for a slot first asks its pool whether it is still needed: when containers
that became ready have taken the inputs it was started for, it is dropped instead of restored.

Cold boots take no slot: their initialisation may wait on the network or the disk rather than the CPU, and
holding them back would delay a burst by whole boot times.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

from warmboot.errors import InvalidOptionError

#: How often a start waiting for a slot asks again whether it is still needed. Its pool changes state (a
#: container ready, an input taken) without telling the slots, so waiters look again at this interval.
RECHECK_S = 0.02


class StartNotNeeded(Exception):
    """A start waited for a restore slot and, meanwhile, running containers took the inputs it was for.

    Internal: the pool forgets the start; no input fails.
    """


def max_parallel_from_env() -> int:
    """``WARMBOOT_MAX_PARALLEL_RESTORES``, or the CPU count this process may use."""
    raw = os.environ.get("WARMBOOT_MAX_PARALLEL_RESTORES", "").strip()
    if not raw:
        return max(1, len(os.sched_getaffinity(0)))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidOptionError(
            f"WARMBOOT_MAX_PARALLEL_RESTORES={raw!r}: expected a whole number of restores, at least 1 "
            "(unset it to use the CPU count)"
        )
    return value


class RestoreSlots:
    """At most ``limit`` restores at once on this host, shared by every function's pool."""

    def __init__(self, limit: int):
        self.limit = limit
        self._cond = threading.Condition()
        self._busy = 0

    @property
    def busy(self) -> int:
        with self._cond:
            return self._busy

    @contextlib.contextmanager
    def slot(self, still_needed: Callable[[], bool], cancelled: threading.Event | None = None) -> Iterator[None]:
        """Hold a slot for the body; raises :class:`StartNotNeeded` instead when ``still_needed()`` turns false
        (or ``cancelled`` is set) before one is free."""
        with self._cond:
            waited = False
            while True:
                if waited and ((cancelled is not None and cancelled.is_set()) or not still_needed()):
                    self._cond.notify()  # the slot this start leaves may be free: the next waiter takes it
                    raise StartNotNeeded()
                if self._busy < self.limit:
                    break
                self._cond.wait(RECHECK_S)
                waited = True
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify()
