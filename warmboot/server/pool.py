"""One pool of containers per deployed function: its input queue, and when containers start and stop.

Containers *pull* inputs: each container has a thread that takes the next queued input, runs it and comes
back for more. A new container starts when an input arrives and no container is idle (up to
``max_containers``); an idle container stops after ``scaledown_window`` seconds (down to
``min_containers``). Every accepted input ends with a result or an error: a container that dies mid-call
fails that call (or retries it, up to ``retries``), and inputs left queued get a fresh container.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from warmboot.errors import (
    ContainerBootError,
    ContainerCrashedError,
    FunctionTimeoutError,
    WarmbootError,
)
from warmboot.protocol import Outcome
from warmboot.server.calls import Call

log = logging.getLogger("warmboot.pool")


class ContainerHandle(Protocol):
    """What the pool needs of a started container (``worker.runner.FunctionContainer``, or a fake in tests)."""

    id: str
    started_at: float
    calls_served: int

    @property
    def pid(self) -> int | None: ...

    def healthy(self) -> bool:
        """Whether it can take an input now (alive, and has not spoken out of turn since its last reply)."""
        ...

    def call(
        self,
        call_id: str,
        method: str | None,
        args: bytes,
        timeout: float,
        on_item: Callable[[bytes], None] | None = None,
    ) -> Outcome:
        """Run one input (a generator's values go to ``on_item``); raises FunctionTimeoutError or
        ContainerCrashedError (the container is then dead)."""
        ...

    def shutdown(self) -> None: ...


#: Starts one container for the pool (a restore or a cold boot: ``server.launcher.Launcher``).
Launch = Callable[[], ContainerHandle]


@dataclass
class PoolSettings:
    label: str  #: "app.function", for logs
    timeout: float
    retries: int
    min_containers: int
    max_containers: int
    scaledown_window: float
    max_inputs: int | None = None  #: a container stops after serving this many inputs (None: no limit)
    concurrency: int = 1  #: inputs one container runs at once (``@modal.concurrent(max_inputs=)``)


@dataclass
class _Running:
    """A started container and its slots: one serving loop (thread) per input it may run at once."""

    handle: ContainerHandle
    slots: int
    retiring: bool = False  #: it takes no more inputs: its slots end as they finish


class FunctionPool:
    """Containers of one function, the queue of inputs waiting for them, and the rules that scale them."""

    def __init__(
        self,
        settings: PoolSettings,
        launch: Launch,
        on_event: Callable[[str], None],
        stopped: threading.Event | None = None,
    ):
        self.settings = settings
        #: Set by stop(): a start still waiting for GPUs (``server.launcher``) gives up.
        self.stopped = stopped if stopped is not None else threading.Event()
        self._launch = launch
        self._event = on_event
        self._queue: collections.deque[Call] = collections.deque()
        self._cond = threading.Condition()
        self._containers: dict[str, _Running] = {}
        self._booting = 0
        self._threads = 0  #: container threads alive: starting, serving or stopping a container
        self._idle = 0  #: idle slots (a container with input concurrency N has N)
        self._stopping = False

    # ----- the caller's side -------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        with self._cond:
            if self._stopping:
                call.fail(WarmbootError(f"{self.settings.label} is stopped"))
                return
            self._queue.append(call)
            self._cond.notify()
            self._scale_up_locked()

    def ensure_min(self) -> None:
        with self._cond:
            while len(self._containers) + self._booting < self.settings.min_containers:
                self._spawn_locked()

    def describe(self) -> list[dict[str, Any]]:
        with self._cond:
            return [
                {
                    "id": r.handle.id,
                    "function": self.settings.label,
                    "started_at": r.handle.started_at,
                    "calls": r.handle.calls_served,
                    "pid": r.handle.pid,
                }
                for r in self._containers.values()
            ]

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking inputs, fail those still queued, and shut every container down (running @exit).

        Waits (up to ``timeout``) for containers still starting, too: each stops as soon as its start ends, and
        the server must not exit while one is half set up (a mounted root, a cgroup, a restored copy not yet
        in its cgroup).
        """
        with self._cond:
            self._stopping = True
            leftover = list(self._queue)
            self._queue.clear()
            containers = [r.handle for r in self._containers.values()]
            self._cond.notify_all()
        self.stopped.set()
        for call in leftover:
            call.fail(WarmbootError(f"{self.settings.label} was stopped before this input ran"))
        for c in containers:
            c.shutdown()
        with self._cond:
            if not self._cond.wait_for(lambda: self._threads == 0, timeout):
                log.warning("%s: %d container(s) still starting or stopping after %.0f s", self.settings.label,
                            self._threads, timeout)  # fmt: skip

    # ----- scaling -------------------------------------------------------------------------------------

    def _scale_up_locked(self) -> None:
        """Start containers for the inputs that no idle slot and no starting container will take.

        Never more containers starting than the waiting inputs need: with input concurrency N, one container
        per N waiting inputs.
        """
        slots = self.settings.concurrency
        uncovered = len(self._queue) - self._idle - self._booting * slots
        needed = -(-uncovered // slots) if uncovered > 0 else 0  # ceil
        capacity = self.settings.max_containers - len(self._containers) - self._booting
        for _ in range(max(0, min(needed, capacity))):
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        self._booting += 1
        self._threads += 1
        threading.Thread(target=self._container_thread, name=f"pool-{self.settings.label}", daemon=True).start()

    def _container_thread(self) -> None:
        try:
            self._run_container()
        finally:
            with self._cond:
                self._threads -= 1
                self._cond.notify_all()

    def _run_container(self) -> None:
        try:
            fc = self._launch()
        except WarmbootError as exc:
            self._boot_failed(exc)
            return
        except Exception as exc:
            log.exception("starting a container for %s failed", self.settings.label)
            self._boot_failed(ContainerBootError(f"{self.settings.label}: internal error starting a container: {exc}"))
            return
        running = _Running(fc, self.settings.concurrency)
        with self._cond:
            self._booting -= 1
            self._containers[fc.id] = running
            self._threads += running.slots - 1
        for _ in range(running.slots - 1):
            threading.Thread(target=self._slot_thread, args=(running,), name=f"slot-{fc.id}", daemon=True).start()
        self._serve_slot(running)

    def _slot_thread(self, running: _Running) -> None:
        try:
            self._serve_slot(running)
        finally:
            with self._cond:
                self._threads -= 1
                self._cond.notify_all()

    def _slot_ended(self, running: _Running) -> None:
        """One serving loop of ``running`` ended; the last one stops the container."""
        with self._cond:
            running.slots -= 1
            running.retiring = True  # a slot ends only when the container should stop taking inputs
            self._cond.notify_all()  # its other idle slots see it
            if running.slots > 0:
                return
            self._containers.pop(running.handle.id, None)
        running.handle.shutdown()
        with self._cond:
            # Inputs still queued must not be stranded by a container that went away.
            if not self._stopping:
                self._scale_up_locked()

    def _boot_failed(self, exc: WarmbootError) -> None:
        """A container could not start: the inputs waiting for it would meet the same failure, so fail them."""
        self._event(f"Container for {self.settings.label} failed to start: {str(exc).splitlines()[0]}")
        with self._cond:
            self._booting -= 1
            if self._containers or self._booting:
                return  # others will serve the queue
            failed = list(self._queue)
            self._queue.clear()
        for call in failed:
            call.fail(exc if isinstance(exc, ContainerBootError) else ContainerBootError(str(exc)))

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def counts(self) -> dict[str, int]:
        """Containers by phase and inputs waiting (for tests, logs and `warmboot app list`)."""
        with self._cond:
            return {
                "booting": self._booting,
                "running": len(self._containers),
                "idle": self._idle,
                "waiting": len(self._queue),
            }

    def _next_call(self, running: _Running, *, already_idle: bool = False) -> Call | None:
        """The next input for an idle slot, or ``None`` when the slot should end (scale-down, retiring, stop)."""
        with self._cond:
            if not already_idle:
                self._idle += 1
            try:
                while True:
                    if self._stopping or running.retiring:
                        return None
                    if self._queue:
                        return self._queue.popleft()
                    timed_out = not self._cond.wait(self.settings.scaledown_window)
                    if (
                        timed_out
                        and not self._queue
                        and not running.retiring
                        and len(self._containers) > self.settings.min_containers
                    ):
                        # Leave the count now, under the lock: two containers idling out together must not
                        # both see room above min_containers.
                        self._containers.pop(running.handle.id, None)
                        running.retiring = True
                        self._cond.notify_all()
                        return None
            finally:
                self._idle -= 1

    def _serve_slot(self, running: _Running) -> None:
        try:
            self._serve(running)
        finally:
            self._slot_ended(running)

    def _serve(self, running: _Running) -> None:
        fc = running.handle
        idle = False
        while (call := self._next_call(running, already_idle=idle)) is not None:
            idle = False
            if not fc.healthy():
                # It died or misbehaved while idle: the input was never sent, so it goes back to the front of
                # the queue without costing an attempt, and this container stops.
                self._event(f"Container {fc.id} of {self.settings.label} stopped while idle; its next input waits")
                with self._cond:
                    self._queue.appendleft(call)
                    self._cond.notify()
                return
            call.started()
            began = time.monotonic()
            try:
                outcome = fc.call(call.call_id, call.method, call.args, self.settings.timeout, call.on_item)
            except FunctionTimeoutError as exc:
                self._event(str(exc))
                call.fail(exc)
                return
            except ContainerCrashedError as exc:
                self._event(f"{exc}; call {call.call_id} attempt {call.attempts} of {self.settings.retries + 1}")
                self._retry_or_fail(call, exc)
                return
            except Exception as exc:  # a bug here must still end the call, never leave its caller waiting
                log.exception("call %s on %s failed in the worker", call.call_id, fc.id)
                call.fail(ContainerCrashedError(f"{self.settings.label}: internal error running the call: {exc}"))
                return
            if fc.calls_served == 1:
                self._event(f"First input on container {fc.id} took {(time.monotonic() - began) * 1000:.0f} ms")
            used_up = self.settings.max_inputs is not None and fc.calls_served >= self.settings.max_inputs
            with self._cond:
                if used_up:
                    running.retiring = True  # used up: it stops, and inputs still queued get a fresh container
                else:
                    # Idle again *before* the caller hears back, so that its next call finds this container
                    # instead of starting another one.
                    self._idle += 1
                    idle = True
            call.finish(outcome)
            if used_up:
                return

    def _retry_or_fail(self, call: Call, exc: WarmbootError) -> None:
        with self._cond:
            if call.attempts <= self.settings.retries and not self._stopping:
                self._queue.appendleft(call)
                self._cond.notify()  # an idle container takes the retry now, not after its window
                return
        call.fail(exc)
