"""Host-wide GPU allocation: a gpu= container gets GPUs of its own, and waits while none are free.

One :class:`GpuAllocator` per server, shared by every app's pools. A container start asks for ``count`` GPUs of
a type (``gpu="h100:2"``), blocks until that many are free, and gets an :class:`Allocation` whose
``inventory`` holds only those GPUs (their device nodes and visible-devices variables); the allocation is
released when the container is finished with. Waiters are served first come, first served among those that want
the same GPUs: a request for two is not overtaken forever by a stream of requests for one, while a request for
another type of GPU does not wait behind it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from warmboot.errors import GpuAllocationCancelledError, UnsupportedOptionError
from warmboot.worker.gpus import Gpu, GpuInventory


@dataclass(eq=False)
class Allocation:
    """GPUs held by one container; :meth:`release` gives them back (once, whoever calls it how often)."""

    inventory: GpuInventory  #: only the allocated GPUs, with the driver's control nodes
    _allocator: GpuAllocator = field(repr=False)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.inventory.devices())

    def release(self) -> None:
        self._allocator.release(self)


@dataclass(eq=False)
class _Waiter:
    candidates: tuple[Gpu, ...]
    count: int


class CancelEvent(threading.Event):
    """An Event that also wakes the waiters of a condition when set, so that a start waiting there (for GPUs, for
    an agent with room) sees it at once."""

    def __init__(self, cond: threading.Condition):
        super().__init__()
        self._cond = cond

    def set(self) -> None:
        super().set()
        with self._cond:
            self._cond.notify_all()


class GpuAllocator:
    """The GPUs of this host and which of them are taken; thread-safe."""

    def __init__(self, inventory: GpuInventory):
        self.inventory = inventory
        self._cond = threading.Condition()
        self._taken: dict[int, Allocation] = {}  #: host index -> the allocation holding it
        self._waiters: list[_Waiter] = []  #: oldest first

    def cancel_event(self) -> CancelEvent:
        """An Event for :meth:`acquire`'s ``cancelled`` that wakes a waiting acquire when set."""
        return CancelEvent(self._cond)

    def acquire(
        self,
        model: str,
        count: int,
        cancelled: threading.Event | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> Allocation:
        """``count`` free GPUs that ``model`` fits (``"any"``, ``"h100"``), waiting until they are free.

        Raises :class:`UnsupportedOptionError` if this host has fewer GPUs of that type than ``count`` (it would
        wait forever) and :class:`GpuAllocationCancelledError` once ``cancelled`` is set. ``cancelled`` wakes a
        waiting call when it is a :meth:`cancel_event`; a plain Event is seen at the next release. ``on_wait`` is
        called once (without the lock held) when the request has to wait.
        """
        candidates = self.inventory.matching(model)
        if count < 1 or count > len(candidates):
            have = f"{len(candidates)} GPU(s) that gpu={model!r} fits" if self.inventory.gpus else "no GPU"
            raise UnsupportedOptionError(
                f"a request for {count} GPU(s) of type {model!r} cannot be met: this host has {have}"
            )
        waiter = _Waiter(candidates, count)
        with self._cond:
            self._waiters.append(waiter)
            granted = self._try_grant_locked(waiter, cancelled)
        if granted is not None:
            return granted
        try:
            if on_wait is not None:
                on_wait()
            with self._cond:
                while (granted := self._try_grant_locked(waiter, cancelled)) is None:
                    self._cond.wait()
            return granted
        finally:
            if granted is None:  # on_wait raised, or the wait was interrupted: leave the queue
                with self._cond:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
                        self._cond.notify_all()

    def _try_grant_locked(self, waiter: _Waiter, cancelled: threading.Event | None) -> Allocation | None:
        """Grant ``waiter`` its GPUs if free and no older waiter wants them; raises if cancelled."""
        if cancelled is not None and cancelled.is_set():
            self._waiters.remove(waiter)
            self._cond.notify_all()  # whoever queued behind it may go now
            raise GpuAllocationCancelledError("the start was cancelled while it waited for free GPUs")
        reserved: set[int] = set()  # what older waiters are waiting for
        for older in self._waiters:
            if older is waiter:
                break
            reserved.update(g.index for g in older.candidates)
        free = [g.index for g in waiter.candidates if g.index not in self._taken and g.index not in reserved]
        if len(free) < waiter.count:
            return None
        allocation = Allocation(self.inventory.subset(free[: waiter.count]), self)
        for index in allocation.indices:
            self._taken[index] = allocation
        self._waiters.remove(waiter)
        self._cond.notify_all()  # a waiter that was behind this one may fit now
        return allocation

    def release(self, allocation: Allocation) -> None:
        """Give ``allocation``'s GPUs back and wake the waiters; releasing twice does nothing."""
        with self._cond:
            freed = [i for i in allocation.indices if self._taken.get(i) is allocation]
            for index in freed:
                del self._taken[index]
            if freed:
                self._cond.notify_all()

    def free(self) -> tuple[int, ...]:
        """Host indices of the GPUs no container holds (for tests and status)."""
        with self._cond:
            return tuple(g.index for g in self.inventory.devices() if g.index not in self._taken)

    def waiting(self) -> int:
        """Requests waiting for GPUs."""
        with self._cond:
            return len(self._waiters)
