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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from warmboot.errors import (
    ContainerBootError,
    ContainerCrashedError,
    FunctionTimeoutError,
    WarmbootError,
)
from warmboot.protocol import Outcome
from warmboot.sdk import retries as retry_rules
from warmboot.server.calls import Call
from warmboot.server.restore_slots import StartNotNeeded

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

    def call_batch(self, calls: Sequence[tuple[str, bytes]], method: str | None, timeout: float) -> list[Outcome]:
        """Run inputs of a ``@modal.batched`` function as one; raises like :meth:`call` for the whole batch."""
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
    batch_size: int = 0  #: ``@modal.batched(max_batch_size=)``: a slot runs up to this many inputs as one (0: off)
    batch_wait: float = 0.0  #: seconds a slot with one input waits for more to fill its batch (``wait_ms``)
    #: The wait before each retry (``modal.Retries``): ``retry_delay`` s before the first, times ``retry_backoff``
    #: after each, at most ``retry_max_delay``. 0: at once.
    retry_delay: float = 0.0
    retry_backoff: float = 1.0
    retry_max_delay: float = 60.0

    @property
    def inputs_per_container(self) -> int:
        """How many waiting inputs one container takes at once: what scaling counts per container."""
        return self.concurrency * max(1, self.batch_size)


@dataclass
class _Running:
    """A started container and its slots: one serving loop (thread) per input it may run at once."""

    handle: ContainerHandle
    slots: int
    retiring: bool = False  #: it takes no more inputs: its slots end as they finish
    waiting: int = 0  #: its slots idle now, waiting for an input
    leased: int = 0  #: of those, lent out (:meth:`FunctionPool.try_lease`): they take no input until returned


@dataclass(frozen=True)
class Lease:
    """An idle slot of a running container, lent to a web request that drives the container itself (the
    gateway's fast path: no slot thread is woken). :meth:`FunctionPool.release` gives it back."""

    running: _Running

    @property
    def handle(self) -> ContainerHandle:
        return self.running.handle


class FunctionPool:
    """Containers of one function, the queue of inputs waiting for them, and the rules that scale them."""

    def __init__(
        self,
        settings: PoolSettings,
        launch: Launch,
        on_event: Callable[[str], None],
        stopped: threading.Event | None = None,
        schedule: Callable[[float, Callable[[], None]], None] | None = None,
        on_first_input: Callable[[ContainerHandle, float], None] | None = None,
    ):
        self.settings = settings
        #: Told how long each container's first input took (the last phase of its start: ``server.start_log``).
        self._on_first_input = on_first_input
        #: Runs a callable after a delay (a retry's back-off); tests pass a fake clock.
        self._schedule = schedule or _after
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
        self._batch_room = 0  #: inputs that slots gathering a batch would still take
        self._stopping = False
        self._retrying: dict[str, Call] = {}  #: failed inputs waiting out their retry back-off, by call id
        self._running_on: dict[str, ContainerHandle] = {}  #: call id -> the container running it (for cancel)

    # ----- the caller's side -------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        with self._cond:
            if self._stopping:
                call.fail(WarmbootError(f"{self.settings.label} is stopped"))
                return
            self._queue.append(call)
            if self.settings.batch_size > 1:
                self._cond.notify_all()  # the slot gathering a batch must see it, not only one idle slot
            else:
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
                    "busy": r.slots - r.waiting,  #: inputs it runs now
                    "agent": agent.name if (agent := getattr(r.handle, "agent", None)) is not None else None,
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
            leftover = list(self._queue) + list(self._retrying.values())
            self._queue.clear()
            self._retrying.clear()
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
        slots = self.settings.inputs_per_container
        uncovered = len(self._queue) - self._idle * max(1, self.settings.batch_size) - self._batch_room
        uncovered -= self._booting * slots
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

    def start_still_needed(self) -> bool:
        """Whether a start of this pool that has not begun its work yet (it waits for a restore slot:
        ``server.restore_slots``) would still be made now. False once the inputs it was started for were taken
        by containers that became ready meanwhile: the same count as :meth:`_scale_up_locked`, without it."""
        with self._cond:
            if self._stopping:
                return False
            others_booting = self._booting - 1
            if len(self._containers) + others_booting < self.settings.min_containers:
                return True
            slots = self.settings.inputs_per_container
            uncovered = len(self._queue) - self._idle * max(1, self.settings.batch_size) - self._batch_room
            return uncovered - others_booting * slots > 0

    def _run_container(self) -> None:
        try:
            fc = self._launch()
        except StartNotNeeded:
            with self._cond:
                self._booting -= 1
                waiting = len(self._queue)
            log.info("%s: a container start was dropped: running containers took its inputs (%d waiting)",
                     self.settings.label, waiting)  # fmt: skip
            return
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
                running.waiting += 1
            try:
                while True:
                    if self._stopping or running.retiring:
                        return None
                    while self._queue and self._queue[0].done.is_set():
                        self._queue.popleft()  # ended while it waited (cancelled): nothing to run
                    # Inputs that a gathering batch has room for are left to it: taking one here would start a
                    # second partial batch, and both would wait out wait_ms. A slot lent out takes nothing.
                    if len(self._queue) > self._batch_room and running.waiting > running.leased:
                        if self.settings.batch_size > 1:
                            # The batch this input starts counts as capacity from now on (see _gather_batch).
                            self._batch_room += self.settings.batch_size - 1
                        return self._queue.popleft()
                    timed_out = not self._cond.wait(self.settings.scaledown_window)
                    if (
                        timed_out
                        and not self._queue
                        and not running.retiring
                        and not running.leased
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
                running.waiting -= 1

    # ----- lent slots (the gateway's fast path) ---------------------------------------------------------------

    def try_lease(self) -> Lease | None:
        """An idle slot of a running container, taken without waking its thread; ``None`` when there is none
        (or inputs are queued: they come first), and the caller submits a call instead."""
        if self.settings.max_inputs is not None or self.settings.batch_size:
            return None  # those count inputs per container: they take the ordinary path
        with self._cond:
            if self._stopping or self._queue:
                return None
            for running in self._containers.values():
                if not running.retiring and running.waiting > running.leased:
                    running.leased += 1
                    self._idle -= 1
                    return Lease(running)
        return None

    def release(self, lease: Lease, *, broken: bool = False) -> None:
        """Give a lent slot back; ``broken``: its container failed (it stops, and its other slots with it)."""
        with self._cond:
            lease.running.leased -= 1
            self._idle += 1
            if broken:
                lease.running.retiring = True
                self._cond.notify_all()  # its slots end
            elif self._queue:
                # A queued input may take the slot now. Every waiting slot hears it (one woken at random could be
                # a slot whose container has none free, and the input would wait out a scale-down window); with
                # nothing queued, nobody needs waking.
                self._cond.notify_all()

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
                    self._batch_room -= max(0, self.settings.batch_size - 1)  # the batch it would have started
                    self._queue.appendleft(call)
                    self._cond.notify()
                return
            calls = self._gather_batch(call) if self.settings.batch_size > 1 else [call]
            kind = start_kind(fc)
            for each in calls:
                each.start_kind, each.container_id = kind, fc.id
                each.started()
            self._mark_running(calls, fc)
            began = time.monotonic()
            try:
                if call.run is not None:
                    outcomes = [call.run(fc, self.settings.timeout)]
                elif self.settings.batch_size:
                    outcomes = fc.call_batch([(c.call_id, c.args) for c in calls], call.method, self.settings.timeout)
                else:
                    outcomes = [fc.call(call.call_id, call.method, call.args, self.settings.timeout, call.on_item)]
            except FunctionTimeoutError as exc:
                self._event(str(exc))
                for each in calls:
                    each.fail(exc)
                return
            except ContainerCrashedError as exc:
                for each in calls:
                    if each.done.is_set():
                        continue  # cancelled: its container was stopped for that (pool.cancel logged it)
                    self._event(f"{exc}; call {each.call_id} attempt {each.attempts} of {self.settings.retries + 1}")
                    self._retry_or_fail(each, exc)
                return
            except Exception as exc:  # a bug here must still end the call, never leave its caller waiting
                log.exception("call %s on %s failed in the worker", call.call_id, fc.id)
                for each in calls:
                    each.fail(ContainerCrashedError(f"{self.settings.label}: internal error running the call: {exc}"))
                return
            if fc.calls_served == len(calls):
                first_ms = (time.monotonic() - began) * 1000
                self._event(f"First input on container {fc.id} took {first_ms:.0f} ms")
                if self._on_first_input is not None:
                    self._on_first_input(fc, first_ms)
            if len(calls) > 1 or self.settings.batch_size:
                self._event(f"Batch of {len(calls)} input(s) on container {fc.id}")
            used_up = self.settings.max_inputs is not None and fc.calls_served >= self.settings.max_inputs
            with self._cond:
                if used_up:
                    running.retiring = True  # used up: it stops, and inputs still queued get a fresh container
                else:
                    # Idle again *before* the caller hears back, so that its next call finds this container
                    # instead of starting another one.
                    self._idle += 1
                    running.waiting += 1
                    idle = True
            for each, outcome in zip(calls, outcomes, strict=True):
                self._finish(each, outcome)
            if used_up:
                return

    def _gather_batch(self, first: Call) -> list[Call]:
        """``first`` and the inputs that arrive within ``batch_wait`` of it, up to ``batch_size`` in all.

        While it waits, the room left in the batch counts as capacity, so the inputs it is waiting for do not
        start containers of their own.
        """
        size = self.settings.batch_size
        calls = [first]
        deadline = time.monotonic() + self.settings.batch_wait
        room = size - 1  #: counted in _batch_room by _next_call, under the same lock as the pop
        with self._cond:
            try:
                while len(calls) < size:
                    if self._queue:
                        calls.append(self._queue.popleft())
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._batch_room += size - len(calls) - room
                    room = size - len(calls)
                    self._cond.wait(remaining)
            finally:
                self._batch_room -= room
                self._cond.notify_all()  # inputs left to this batch are free for other slots again
        return calls

    def _finish(self, call: Call, outcome: Outcome) -> None:
        """End ``call`` with ``outcome``, or run it again if its function raised and it has retries left.

        Only an exception raised by user code is retried (a remote exception: no warmboot error type), never a
        generator call's: its values may already have reached the caller.
        """
        raised = not outcome.ok and outcome.error_type is None and bool(outcome.traceback)
        if raised and not call.generator and call.attempts <= self.settings.retries:
            first = (outcome.message or "an exception").splitlines()[0]
            self._event(f"Call {call.call_id} raised {first}; attempt {call.attempts} of {self.settings.retries + 1}")
            self._retry_or_fail(call, outcome)
            return
        call.finish(outcome)

    def _retry_or_fail(self, call: Call, failure: WarmbootError | Outcome) -> None:
        """Queue ``call`` again after its back-off if it has retries left; otherwise end it with ``failure``."""
        if call.done.is_set():
            return  # it was cancelled while it ran
        s = self.settings
        with self._cond:
            # A web request is never run twice: part of its response may have reached its client.
            retry = call.attempts <= s.retries and not self._stopping and call.run is None
            wait = retry_rules.delay(call.attempts, s.retry_delay, s.retry_backoff, s.retry_max_delay) if retry else 0
            if retry and wait <= 0:
                self._queue.appendleft(call)
                self._cond.notify()  # an idle container takes the retry now, not after its window
                self._scale_up_locked()
                return
            if retry:
                self._retrying[call.call_id] = call
        if retry:
            attempt = f"attempt {call.attempts + 1} of {s.retries + 1}"
            self._event(f"Call {call.call_id} runs again in {wait:g} s ({attempt})")
            self._schedule(wait, lambda: self._requeue(call))
            return
        if isinstance(failure, Outcome):
            call.finish(failure)
        else:
            call.fail(failure)

    def _requeue(self, call: Call) -> None:
        """A retry's back-off is over: the call goes to the front of the queue (unless stopped or cancelled)."""
        with self._cond:
            if self._retrying.pop(call.call_id, None) is None:
                return  # the pool stopped, or the call was cancelled, while it waited
            if call.done.is_set() or self._stopping:
                return
            self._queue.appendleft(call)
            self._cond.notify()
            self._scale_up_locked()

    # ----- cancelling -------------------------------------------------------------------------------------

    def _mark_running(self, calls: list[Call], fc: ContainerHandle) -> None:
        with self._cond:
            for call in calls:
                self._running_on[call.call_id] = fc
        for call in calls:
            call.when_done(self._forget_running)

    def _forget_running(self, call: Call) -> None:
        with self._cond:
            self._running_on.pop(call.call_id, None)

    def cancel(self, call: Call, exc: WarmbootError) -> bool:
        """End ``call`` with ``exc`` (``FunctionCall.cancel()``); False if it had already ended.

        A queued input (or one waiting out a retry's back-off) just ends. A running one ends, and the container
        running it is stopped (killed: a container cannot stop one input halfway), as Modal's
        ``terminate_containers=True`` does; other inputs that container ran at the same time (input concurrency,
        batches) end as after a crash: retried if they have retries left, failed otherwise.
        """
        with self._cond:
            queued = [c for c in self._queue if c is not call]
            if len(queued) != len(self._queue):
                self._queue = collections.deque(queued)
            self._retrying.pop(call.call_id, None)
            container = self._running_on.get(call.call_id)
        if not call.fail(exc):
            return False
        if container is not None:
            self._event(f"Call {call.call_id} cancelled: stopping container {container.id}, which was running it")
            stop = getattr(container, "kill", None) or container.shutdown
            stop()
        return True


def start_kind(handle: ContainerHandle) -> str:
    """How a container's next input finds it: ``warm`` once it has served one, else how it started."""
    if handle.calls_served > 0:
        return "warm"
    return "restore" if getattr(handle, "restored", False) else "cold"


def _after(seconds: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
