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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from warmboot.errors import (
    ContainerBootError,
    ContainerCrashedError,
    ContainerError,
    FunctionTimeoutError,
    SnapshotError,
    WarmbootError,
)
from warmboot.server.snapshots import SnapshotRegistry
from warmboot.worker.runner import FunctionContainer, LaunchPlan

log = logging.getLogger("warmboot.pool")


@dataclass
class Call:
    """One accepted input and, once done, its outcome (the dict the SDK unpacks)."""

    method: str | None
    args: bytes
    call_id: str = field(default_factory=lambda: "fc-" + uuid.uuid4().hex[:16])
    attempts: int = 0
    submitted_at: float = field(default_factory=time.time)
    outcome: dict[str, Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, outcome: dict[str, Any]) -> None:
        if not self.done.is_set():
            self.outcome = outcome
            self.done.set()

    def fail(self, exc: WarmbootError) -> None:
        self.finish(
            {"ok": False, "exception": None, "error_type": type(exc).__name__, "message": str(exc), "traceback": ""}
        )


@dataclass
class PoolSettings:
    label: str  #: "app.function", for logs
    timeout: float
    retries: int
    min_containers: int
    max_containers: int
    scaledown_window: float
    max_inputs: int | None = None  #: a container stops after serving this many inputs (None: no limit)
    snapshots: SnapshotPlan | None = None  #: set for deployed functions with enable_memory_snapshot


@dataclass
class SnapshotPlan:
    """Where a function's memory snapshot lives and how restored copies start."""

    registry: SnapshotRegistry
    key: str
    app_name: str
    tag: str
    reseed: bool = True


class FunctionPool:
    """Containers of one function, the queue of inputs waiting for them, and the rules that scale them."""

    def __init__(
        self,
        settings: PoolSettings,
        make_plan: Callable[[], LaunchPlan],
        start_env: Callable[[], dict[str, str]],
        on_output: Callable[[str, str, str], None],
        on_event: Callable[[str], None],
    ):
        self.settings = settings
        self._make_plan = make_plan
        self._start_env = start_env
        self._on_output = on_output
        self._event = on_event
        self._queue: collections.deque[Call] = collections.deque()
        self._cond = threading.Condition()
        self._containers: dict[str, FunctionContainer] = {}
        self._booting = 0
        self._idle = 0
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
                    "id": c.id,
                    "function": self.settings.label,
                    "started_at": c.started_at,
                    "calls": c.calls_served,
                    "pid": c.container.pid if c.container else None,
                }
                for c in self._containers.values()
            ]

    def stop(self) -> None:
        """Stop taking inputs, fail those still queued, and shut every container down (running @exit)."""
        with self._cond:
            self._stopping = True
            leftover = list(self._queue)
            self._queue.clear()
            containers = list(self._containers.values())
            self._cond.notify_all()
        for call in leftover:
            call.fail(WarmbootError(f"{self.settings.label} was stopped before this input ran"))
        for c in containers:
            c.shutdown()

    # ----- scaling -------------------------------------------------------------------------------------

    def _scale_up_locked(self) -> None:
        waiting = len(self._queue)
        capacity = self.settings.max_containers - len(self._containers) - self._booting
        needed = waiting - self._idle - self._booting
        for _ in range(max(0, min(needed, capacity))):
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        self._booting += 1
        threading.Thread(target=self._run_container, name=f"pool-{self.settings.label}", daemon=True).start()

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
        with self._cond:
            self._booting -= 1
            self._containers[fc.id] = fc
        try:
            self._serve(fc)
        finally:
            with self._cond:
                self._containers.pop(fc.id, None)
            fc.shutdown()
            with self._cond:
                # Inputs still queued must not be stranded by a container that went away.
                if not self._stopping:
                    self._scale_up_locked()

    def _launch(self) -> FunctionContainer:
        """A started container: restored from the function's memory snapshot if it has a good one, else cold."""
        plan = self._make_plan()
        snap = self.settings.snapshots
        label = self.settings.label
        if snap is not None and (snapshot := snap.registry.usable(snap.key)) is not None:
            fc = FunctionContainer(plan, self._on_output)
            started = time.monotonic()
            try:
                fc.restore(snap.registry.store, snapshot)
                fc.start(self._start_env(), reseed=snap.reseed)
            except ContainerBootError:
                fc.kill()
                raise  # user code failed in @enter(snap=False): booting cold would fail the same way
            except (SnapshotError, ContainerError) as exc:
                fc.kill()
                snap.registry.mark_broken(snap.key, str(exc))
                self._event(
                    f"Restore of {label} from memory snapshot {snapshot.id} failed, booting cold instead "
                    f"(the snapshot is discarded): {str(exc).splitlines()[0]}"
                )
            else:
                millis = (time.monotonic() - started) * 1000
                snap.registry.restored(snap.key, millis)
                t = fc.timings
                self._event(
                    f"Restored {label} from memory snapshot in {millis:.0f} ms (container {fc.id}: checks "
                    f"{t.get('check_ms', 0):.0f} ms, CRIU restore {t.get('criu_restore_ms', 0):.0f} ms, "
                    f"@enter(snap=False) and runtime {t.get('start_ms', 0):.0f} ms)"
                )
                return fc
        fc = FunctionContainer(plan, self._on_output)
        started = time.monotonic()
        try:
            fc.boot(snapshot_phase=snap is not None)
            if snap is not None and snap.registry.claim_creation(snap.key, snap.app_name, snap.tag):
                self._make_snapshot(fc, snap)
            fc.start(self._start_env())
        except BaseException:
            fc.kill()
            raise
        self._event(f"Container {fc.id} started for {label} (cold boot in {time.monotonic() - started:.2f} s)")
        return fc

    def _make_snapshot(self, fc: FunctionContainer, snap: SnapshotPlan) -> None:
        """Checkpoint a cold-booted container at its snapshot point, unless it holds network connections."""
        label = self.settings.label
        connections = fc.open_connections()
        if connections:
            reason = "open network connection(s) at the snapshot point: " + ", ".join(connections)
            snap.registry.not_created(snap.key, "refused", reason)
            self._event(
                f"No memory snapshot for {label}: the container holds {reason}. A snapshot cannot carry a live "
                "connection into its copies; open it in an @enter(snap=False) method instead. "
                "Serving from the cold-booted container."
            )
            return
        self._event(f"Creating memory snapshot for {label}")
        started = time.monotonic()
        try:
            snapshot = fc.checkpoint(snap.registry.store, app=snap.app_name, tag=snap.tag, key=snap.key)
        except SnapshotError as exc:
            snap.registry.not_created(snap.key, "failed", str(exc))
            self._event(f"Memory snapshot of {label} failed; serving from the cold-booted container: {exc}")
            return
        seconds = time.monotonic() - started
        snap.registry.created(snap.key, snapshot, seconds)
        self._event(f"Snapshot created in {seconds:.2f} s ({snapshot.size_bytes / 1e6:.0f} MB) for {label}")

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

    def _next_call(self, fc_id: str, *, already_idle: bool = False) -> Call | None:
        """The next input for an idle container, or ``None`` when it should stop (scale-down, pool stop)."""
        with self._cond:
            if not already_idle:
                self._idle += 1
            try:
                while True:
                    if self._stopping:
                        return None
                    if self._queue:
                        return self._queue.popleft()
                    timed_out = not self._cond.wait(self.settings.scaledown_window)
                    if timed_out and not self._queue and len(self._containers) > self.settings.min_containers:
                        # Leave the count now, under the lock: two containers idling out together must not
                        # both see room above min_containers.
                        self._containers.pop(fc_id, None)
                        return None
            finally:
                self._idle -= 1

    def _serve(self, fc: FunctionContainer) -> None:
        idle = False
        while (call := self._next_call(fc.id, already_idle=idle)) is not None:
            idle = False
            call.attempts += 1
            started = time.monotonic()
            try:
                outcome = fc.call(call.call_id, call.method, call.args, self.settings.timeout)
                if fc.calls_served == 1:
                    self._event(f"First input on container {fc.id} took {(time.monotonic() - started) * 1000:.0f} ms")
            except FunctionTimeoutError as exc:
                self._event(str(exc))
                call.fail(exc)
                return
            except ContainerCrashedError as exc:
                self._event(f"{exc}; call {call.call_id} attempt {call.attempts} of {self.settings.retries + 1}")
                if call.attempts <= self.settings.retries:
                    with self._cond:
                        self._queue.appendleft(call)
                        self._cond.notify()  # an idle container takes the retry now, not after its window
                else:
                    call.fail(exc)
                return
            with self._cond:
                # Idle again *before* the caller hears back, so that its next call finds this container
                # instead of starting another one.
                self._idle += 1
                idle = True
            call.finish(outcome)
            if self.settings.max_inputs is not None and fc.calls_served >= self.settings.max_inputs:
                with self._cond:
                    self._idle -= 1
                return  # used up: it stops, and inputs still queued get a fresh container
