"""The fast layer: the pool's scheduling and the calls book, with fake containers and barriers (no CRIU, no sleeps).

A fake container's boot and each of its calls block on events the test controls, so every test decides exactly
when a container finishes starting or a call returns, and checks the pool's counts at those moments.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from warmboot.errors import (
    ContainerBootError,
    ContainerCrashedError,
    FunctionTimeoutError,
    InvalidOptionError,
    NotFoundError,
    ServerRestartedError,
)
from warmboot.protocol import Outcome, Target
from warmboot.server import restore_slots
from warmboot.server.calls import Call, CallBook
from warmboot.server.db import Database
from warmboot.server.pool import FunctionPool, PoolSettings
from warmboot.server.restore_slots import RestoreSlots

WAIT = 30.0  # an upper bound on waits for other threads: reached only when the code under test is broken


class FakeContainer:
    """A container whose calls return when the test releases them (or raise what the test says)."""

    def __init__(self, fleet: Fleet, n: int):
        self.id = f"fake-{n}"
        self.started_at = 0.0
        self.calls_served = 0
        self.pid = None
        self.fleet = fleet
        self.stopped = threading.Event()
        self.broken = False  #: died or spoke out of turn while idle
        self.active = 0  #: inputs running in it now
        self.max_active = 0

    def healthy(self) -> bool:
        return not self.broken

    def call(self, call_id: str, method: str | None, args: bytes, timeout: float, on_item: object = None) -> Outcome:
        fleet = self.fleet
        with fleet.lock:
            fleet.running_calls.append(call_id)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            fleet.changed.notify_all()
            released = fleet.changed.wait_for(lambda: fleet.call_gate.is_set() or self.stopped.is_set(), WAIT)
            self.active -= 1
        assert released, "the test never released the call"
        if self.stopped.is_set():
            raise ContainerCrashedError(f"container {self.id} was stopped while running")
        queued = self.fleet.failures.get(args)
        if queued:
            raise queued.pop(0)
        self.calls_served += 1
        return Outcome(ok=True, value=args)

    def shutdown(self) -> None:
        with self.fleet.lock:
            self.stopped.set()
            self.fleet.changed.notify_all()


class Gate:
    """An Event that also wakes the fleet's condition, so fake calls can wait for it or for their own stop."""

    def __init__(self, changed: threading.Condition):
        self._set = False
        self._changed = changed

    def set(self) -> None:
        with self._changed:
            self._set = True
            self._changed.notify_all()

    def is_set(self) -> bool:
        return self._set


class Fleet:
    """The launcher of fake containers: counts starts, holds each boot until the test releases it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.boot_gate = threading.Event()
        self.call_gate = Gate(self.changed)
        self.starts = 0
        self.booting = 0
        self.max_booting = 0
        self.running_calls: list[str] = []
        self.boot_failure: Exception | None = None
        self.failures: dict[bytes, list[Exception]] = {}  #: raised by calls with these args, one per attempt
        self.containers: list[FakeContainer] = []

    def __call__(self) -> FakeContainer:
        with self.lock:
            self.starts += 1
            self.booting += 1
            self.max_booting = max(self.max_booting, self.booting)
            n = self.starts
            self.changed.notify_all()
        try:
            assert self.boot_gate.wait(WAIT), "the test never released the boot"
            if self.boot_failure is not None:
                raise self.boot_failure
            container = FakeContainer(self, n)
            with self.lock:
                self.containers.append(container)
            return container
        finally:
            with self.lock:
                self.booting -= 1
                self.changed.notify_all()

    def wait_for(self, predicate: str, check: object) -> None:
        with self.lock:
            assert self.changed.wait_for(check, WAIT), f"timed out waiting until {predicate}"  # type: ignore[arg-type]


def make_pool(fleet: Fleet, **settings: object) -> tuple[FunctionPool, list[str]]:
    events: list[str] = []
    base = {
        "label": "app.f",
        "timeout": 60.0,
        "retries": 0,
        "min_containers": 0,
        "max_containers": 10,
        "scaledown_window": 60.0,
    }
    pool = FunctionPool(PoolSettings(**{**base, **settings}), fleet, events.append)  # type: ignore[arg-type]
    return pool, events


def new_call(payload: bytes = b"x") -> Call:
    return Call(app_id="ap-test", tag="f", method=None, args=payload)


def poll_until(what: str, check: Callable[[], bool]) -> None:
    """For states the fakes are not told about (the pool's own counters): check until true, with a deadline."""
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


def wait_done(*calls: Call) -> None:
    for call in calls:
        assert call.done.wait(WAIT), f"call {call.call_id} never ended"


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    fleet = Fleet()
    yield fleet
    fleet.boot_gate.set()  # nothing left blocked when a test fails half-way
    fleet.call_gate.set()


# ----- scale-up matched to demand -------------------------------------------------------------------------------


def test_a_burst_starts_one_container_per_waiting_call_and_no_more(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet, max_containers=20)
    calls = [new_call(bytes([i])) for i in range(12)]
    for call in calls:
        pool.submit(call)
    fleet.wait_for("12 containers are booting", lambda: fleet.booting == 12)
    assert fleet.starts == 12 and pool.counts()["booting"] == 12
    fleet.boot_gate.set()
    fleet.call_gate.set()
    wait_done(*calls)
    assert [c.outcome.value for c in calls] == [bytes([i]) for i in range(12)]  # type: ignore[union-attr]
    assert fleet.starts == 12, "no container started beyond the calls that waited"
    pool.stop()


def test_calls_arriving_while_containers_boot_do_not_start_extra_ones(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet)
    first = new_call()
    pool.submit(first)
    fleet.wait_for("one booting", lambda: fleet.booting == 1)
    second = new_call()
    pool.submit(second)  # one more waiting call: one more container, not two
    fleet.wait_for("two booting", lambda: fleet.booting == 2)
    assert pool.counts() == {"booting": 2, "running": 0, "idle": 0, "waiting": 2}
    fleet.boot_gate.set()
    fleet.call_gate.set()
    wait_done(first, second)
    assert fleet.starts == 2
    pool.stop()


def test_an_idle_container_takes_the_next_call_instead_of_a_new_start(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    for i in range(5):
        call = new_call(bytes([i]))
        pool.submit(call)
        wait_done(call)
    assert fleet.starts == 1
    pool.stop()


class _HeldSlot:
    """Holds the one restore slot of ``slots`` on a thread of its own until released."""

    def __init__(self, slots: RestoreSlots):
        self.release = threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(slots,), daemon=True)
        self._thread.start()
        poll_until("the slot is held", lambda: slots.busy == slots.limit)

    def _hold(self, slots: RestoreSlots) -> None:
        with slots.slot(lambda: True):
            self.release.wait(WAIT)

    def end(self) -> None:
        self.release.set()
        self._thread.join(WAIT)


def _slotted_pool(fleet: Fleet, slots: RestoreSlots) -> FunctionPool:
    """A pool whose starts take a restore slot first, as the launcher's restores do."""
    holder: list[FunctionPool] = []

    def launch() -> FakeContainer:
        with slots.slot(holder[0].start_still_needed):
            return fleet()

    pool = FunctionPool(PoolSettings("app.f", 60.0, 0, 0, 10, 60.0), launch, lambda _e: None)
    holder.append(pool)
    return pool


def test_starts_waiting_for_a_restore_slot_are_dropped_when_a_ready_container_takes_their_calls(
    fleet: Fleet,
) -> None:
    slots = RestoreSlots(1)
    pool = _slotted_pool(fleet, slots)
    fleet.boot_gate.set()
    first = new_call(b"a")
    pool.submit(first)
    fleet.wait_for("the first container runs call a", lambda: fleet.running_calls == [first.call_id])
    held = _HeldSlot(slots)  # another function's restore, say
    later = [new_call(b"b"), new_call(b"c")]
    for call in later:
        pool.submit(call)
    poll_until("two starts wait for the slot", lambda: pool.counts()["booting"] == 2)
    fleet.call_gate.set()  # the running container ends a, then takes b and c
    wait_done(first, *later)
    poll_until("the waiting starts were dropped", lambda: pool.counts()["booting"] == 0)
    assert fleet.starts == 1, "no container was started for calls that a ready one took"
    assert [c.outcome.value for c in (first, *later)] == [b"a", b"b", b"c"]  # type: ignore[union-attr]
    held.end()
    pool.stop()


def test_a_start_still_needed_takes_the_slot_when_it_frees(fleet: Fleet) -> None:
    slots = RestoreSlots(1)
    pool = _slotted_pool(fleet, slots)
    fleet.boot_gate.set()
    held = _HeldSlot(slots)
    call = new_call()
    pool.submit(call)
    poll_until("the start waits for the slot", lambda: pool.counts()["booting"] == 1)
    assert fleet.starts == 0
    held.end()
    fleet.call_gate.set()
    wait_done(call)
    assert fleet.starts == 1 and call.outcome.ok  # type: ignore[union-attr]
    pool.stop()


def test_restore_slots_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMBOOT_MAX_PARALLEL_RESTORES", "0")
    with pytest.raises(InvalidOptionError, match="WARMBOOT_MAX_PARALLEL_RESTORES"):
        restore_slots.max_parallel_from_env()
    monkeypatch.setenv("WARMBOOT_MAX_PARALLEL_RESTORES", "3")
    assert restore_slots.max_parallel_from_env() == 3
    monkeypatch.delenv("WARMBOOT_MAX_PARALLEL_RESTORES")
    assert restore_slots.max_parallel_from_env() >= 1


def test_max_containers_caps_starts_and_the_rest_queue(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet, max_containers=3)
    calls = [new_call(bytes([i])) for i in range(8)]
    for call in calls:
        pool.submit(call)
    fleet.wait_for("three booting", lambda: fleet.booting == 3)
    assert pool.counts()["waiting"] == 8 and fleet.starts == 3
    fleet.boot_gate.set()
    fleet.call_gate.set()
    wait_done(*calls)
    assert fleet.starts == 3 and fleet.max_booting == 3
    pool.stop()


def test_max_inputs_retires_a_container_and_queued_calls_get_a_fresh_one(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet, max_inputs=1, max_containers=1)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    calls = [new_call(bytes([i])) for i in range(3)]
    for call in calls:
        pool.submit(call)
    wait_done(*calls)
    assert fleet.starts == 3, "each container served one input"
    assert all(c.stopped.wait(WAIT) for c in fleet.containers)
    pool.stop()


def test_input_concurrency_starts_one_container_per_n_waiting_inputs(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet, concurrency=4)
    calls = [new_call(bytes([i])) for i in range(10)]
    for call in calls:
        pool.submit(call)
    fleet.wait_for("three containers booting", lambda: fleet.booting == 3)
    assert fleet.starts == 3, "10 waiting inputs at 4 per container: 3 containers"
    fleet.boot_gate.set()
    fleet.wait_for("all ten inputs running at once", lambda: len(fleet.running_calls) == 10)
    assert all(c.max_active <= 4 for c in fleet.containers), [c.max_active for c in fleet.containers]
    poll_until("12 slots, 10 busy: two idle", lambda: pool.counts()["idle"] == 2)  # slot threads may still start
    more = [new_call(b"a"), new_call(b"b")]
    for call in more:
        pool.submit(call)  # two idle slots take them: no new container
    fleet.wait_for("twelve inputs running", lambda: len(fleet.running_calls) == 12)
    assert fleet.starts == 3
    fleet.call_gate.set()
    wait_done(*calls, *more)
    assert all(c.outcome is not None and c.outcome.ok for c in [*calls, *more])
    pool.stop()
    assert all(c.stopped.is_set() for c in fleet.containers)


def test_a_concurrent_container_idles_out_as_a_whole(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet, concurrency=3, scaledown_window=1.0)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    call = new_call()
    pool.submit(call)
    wait_done(call)
    [container] = fleet.containers
    assert container.stopped.wait(WAIT), "its slots idled out and the container stopped"
    fleet.wait_for("no container left", lambda: pool.counts()["running"] == 0)
    assert pool.counts() == {"booting": 0, "running": 0, "idle": 0, "waiting": 0}
    pool.stop()


# ----- every accepted call ends -----------------------------------------------------------------------------------


def test_a_crash_is_retried_up_to_retries_then_fails(fleet: Fleet) -> None:
    pool, events = make_pool(fleet, retries=1)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    fleet.failures[b"boom"] = [ContainerCrashedError("container died while running")]
    call = new_call(b"boom")
    pool.submit(call)
    wait_done(call)
    assert call.outcome is not None and call.outcome.ok, "the retry ran on a fresh container and succeeded"
    assert call.attempts == 2 and fleet.starts == 2
    fleet.failures[b"boom"] = [ContainerCrashedError("died once"), ContainerCrashedError("died twice")]
    again = new_call(b"boom")
    pool.submit(again)
    wait_done(again)
    assert again.attempts == 2
    assert again.outcome is not None and again.outcome.error_type == "ContainerCrashedError"
    assert again.outcome.message == "died twice"
    assert any("attempt 2 of 2" in e for e in events)
    pool.stop()


def test_a_timeout_fails_only_its_call(fleet: Fleet) -> None:
    pool, events = make_pool(fleet)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    fleet.failures[b"slow"] = [FunctionTimeoutError("app.f call exceeded its timeout of 3 s")]
    slow, fine = new_call(b"slow"), new_call(b"fine")
    pool.submit(slow)
    wait_done(slow)
    pool.submit(fine)
    wait_done(fine)
    assert slow.outcome is not None and slow.outcome.error_type == "FunctionTimeoutError"
    assert fine.outcome is not None and fine.outcome.ok
    assert any("exceeded its timeout" in e for e in events)
    pool.stop()


def test_a_failed_boot_fails_the_calls_waiting_for_it(fleet: Fleet) -> None:
    pool, events = make_pool(fleet, max_containers=1)
    fleet.boot_failure = ContainerBootError("app.f failed while importing the app:", "Traceback ...")
    calls = [new_call(), new_call()]
    for call in calls:
        pool.submit(call)
    fleet.boot_gate.set()
    wait_done(*calls)
    assert all(c.outcome is not None and c.outcome.error_type == "ContainerBootError" for c in calls)
    assert any("failed to start" in e for e in events)
    pool.stop()


def test_stopping_the_pool_ends_queued_and_running_calls(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet, max_containers=1)
    fleet.boot_gate.set()
    running, queued = new_call(b"r"), new_call(b"q")
    pool.submit(running)
    pool.submit(queued)
    fleet.wait_for("the first call runs", lambda: running.call_id in fleet.running_calls)
    pool.stop()  # shutting the container down ends its running call; stop() returns once its thread is gone
    assert running.done.is_set() and queued.done.is_set()
    assert pool.counts() == {"booting": 0, "running": 0, "idle": 0, "waiting": 0}
    assert queued.outcome is not None and "was stopped before this input ran" in queued.outcome.message
    assert running.outcome is not None and not running.outcome.ok
    late = new_call()
    pool.submit(late)
    wait_done(late)
    assert late.outcome is not None and "is stopped" in late.outcome.message


def test_an_input_is_never_sent_to_a_container_that_broke_while_idle(fleet: Fleet) -> None:
    pool, events = make_pool(fleet)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    first = new_call(b"1")
    pool.submit(first)
    wait_done(first)
    fleet.containers[0].broken = True
    second = new_call(b"2")
    pool.submit(second)
    wait_done(second)
    assert second.outcome is not None and second.outcome.ok and second.attempts == 1
    assert fleet.starts == 2 and fleet.containers[0].stopped.is_set()
    assert any("stopped while idle" in e for e in events)
    pool.stop()


def test_stop_waits_for_a_container_still_starting_and_stops_it(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet)
    call = new_call()
    pool.submit(call)
    fleet.wait_for("one booting", lambda: fleet.booting == 1)
    stopper = threading.Thread(target=pool.stop)
    stopper.start()
    wait_done(call)  # the queued input is failed at once ...
    assert stopper.is_alive(), "... but stop() waits for the container that is still starting"
    fleet.boot_gate.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    [container] = fleet.containers
    assert container.stopped.is_set(), "a container whose start ended after stop() is shut down, not left running"


def test_an_unexpected_worker_error_still_ends_the_call(fleet: Fleet) -> None:
    pool, _ = make_pool(fleet)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    fleet.failures[b"bug"] = [KeyError("a bug in the worker")]
    call = new_call(b"bug")
    pool.submit(call)
    wait_done(call)
    assert call.outcome is not None and "internal error running the call" in call.outcome.message
    pool.stop()


# ----- the calls book: durable calls --------------------------------------------------------------------------------


def _book(open_db: Callable[[], Database]) -> CallBook:
    return CallBook(open_db(), threading.Lock())


def test_calls_survive_a_restart_running_ones_end_and_queued_ones_come_back(
    open_db: Callable[[], Database],
) -> None:
    db = open_db
    book = _book(db)
    target = Target(tag="f", app_name="app")
    done = book.accept(target, "ap-1", b"a", detached=True)
    running = book.accept(target, "ap-1", b"b", detached=True)
    queued = book.accept(target, "ap-1", b"c", detached=True)
    done.started()
    done.finish(Outcome(ok=True, value=b"42"))
    running.started()

    after = _book(db)  # a new server on the same database, the old one gone without a word
    requeued, interrupted = after.recover(ServerRestartedError("the server restarted while this call ran"))
    assert [c.call_id for c in requeued] == [queued.call_id] and requeued[0].args == b"c"
    assert [c.call_id for c in interrupted] == [running.call_id]
    ended = after.get(running.call_id)
    assert ended.outcome is not None and ended.outcome.error_type == "ServerRestartedError"
    fetched = after.get(done.call_id)
    assert fetched.outcome == Outcome(ok=True, value=b"42")


def test_a_cluster_collects_spawned_calls_that_were_running_on_an_agent(open_db: Callable[[], Database]) -> None:
    book = _book(open_db)
    target = Target(tag="f", app_name="app")
    on_agent = book.accept(target, "ap-1", b"a", detached=True)
    remote = book.accept(target, "ap-1", b"b", detached=False)  # .remote(): its caller left with the old process
    local = book.accept(target, "ap-1", b"c", detached=True)  # running, but never sent to an agent
    for call in (on_agent, remote, local):
        call.started()
    book.placed(on_agent.call_id, "node-2")
    book.placed(remote.call_id, "node-2")

    collected: list[tuple[str, str]] = []
    after = _book(open_db)
    requeued, interrupted = after.recover(
        ServerRestartedError("restarted"), collect=lambda call, agent: collected.append((call.call_id, agent))
    )
    assert collected == [(on_agent.call_id, "node-2")] and requeued == []
    assert sorted(c.call_id for c in interrupted) == sorted([remote.call_id, local.call_id])
    assert after.get(on_agent.call_id).outcome is None  # not ended: its agent gives the outcome


def test_delivered_calls_are_forgotten_and_results_expire(open_db: Callable[[], Database]) -> None:
    book = _book(open_db)
    target = Target(tag="f", app_name="app")
    sync = book.accept(target, "ap-1", b"a", detached=False)
    sync.finish(Outcome(ok=True, value=b"1"))
    book.delivered(sync)
    with pytest.raises(NotFoundError, match="unknown, or its result expired"):
        book.get(sync.call_id)
    spawned = book.accept(target, "ap-1", b"b", detached=True)
    spawned.finish(Outcome(ok=True, value=b"2"))
    assert book.get(spawned.call_id).outcome == Outcome(ok=True, value=b"2")
    assert book.expire(now=spawned.submitted_at + 10 * 24 * 3600) == 1
    with pytest.raises(NotFoundError):
        book.get(spawned.call_id)


def test_a_call_finishes_once(open_db: Callable[[], Database]) -> None:
    book = _book(open_db)
    call = book.accept(Target(tag="f", app_name="app"), "ap-1", b"a", detached=True)
    heard: list[Outcome | None] = []
    call.when_done(lambda c: heard.append(c.outcome))
    assert call.finish(Outcome(ok=True, value=b"first"))
    assert not call.finish(Outcome(ok=True, value=b"second"))
    assert not call.fail(ContainerCrashedError("late"))
    assert heard == [Outcome(ok=True, value=b"first")]
    call.when_done(lambda c: heard.append(c.outcome))  # registered after the end: runs at once
    assert len(heard) == 2 and book.get(call.call_id).outcome == Outcome(ok=True, value=b"first")


# ----- @modal.batched ---------------------------------------------------------------------------------------------


class BatchingContainer(FakeContainer):
    """A fake that records each batch it is given (as its calls' payloads) and returns them one by one."""

    def call_batch(self, calls: list[tuple[str, bytes]], method: str | None, timeout: float) -> list[Outcome]:
        with self.fleet.lock:
            self.fleet.batches.append([args for _, args in calls])
            self.fleet.changed.notify_all()
            released = self.fleet.changed.wait_for(lambda: self.fleet.call_gate.is_set(), WAIT)
        assert released, "the test never released the batch"
        self.calls_served += len(calls)
        return [Outcome(ok=True, value=args) for _, args in calls]


class BatchingFleet(Fleet):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[bytes]] = []

    def __call__(self) -> FakeContainer:
        plain = super().__call__()
        container = BatchingContainer(self, self.starts)
        with self.lock:
            self.containers[self.containers.index(plain)] = container
        return container


@pytest.fixture
def batching_fleet() -> Iterator[BatchingFleet]:
    fleet = BatchingFleet()
    yield fleet
    fleet.boot_gate.set()
    fleet.call_gate.set()


def test_batches_take_up_to_max_batch_size_waiting_inputs(batching_fleet: BatchingFleet) -> None:
    fleet = batching_fleet
    pool, _ = make_pool(fleet, batch_size=3, batch_wait=60.0, max_containers=1)
    calls = [new_call(bytes([i])) for i in range(5)]
    for call in calls:
        pool.submit(call)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    fleet.wait_for("the first batch ran", lambda: len(fleet.batches) == 1)
    wait_done(*calls[:3])
    assert fleet.batches[0] == [b"\x00", b"\x01", b"\x02"], "a full batch goes at once, without waiting"
    # The other two wait (up to 60 s) for a third: it arrives, and the batch goes as soon as it is full.
    sixth = new_call(b"\x05")
    pool.submit(sixth)
    wait_done(*calls[3:], sixth)
    assert fleet.batches[1] == [b"\x03", b"\x04", b"\x05"]
    assert [c.outcome.value for c in [*calls, sixth]] == [bytes([i]) for i in range(6)]  # type: ignore[union-attr]
    assert fleet.starts == 1
    pool.stop()


def test_a_partial_batch_runs_when_wait_ms_has_passed(batching_fleet: BatchingFleet) -> None:
    fleet = batching_fleet
    pool, _ = make_pool(fleet, batch_size=4, batch_wait=0.05)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    call = new_call()
    pool.submit(call)
    wait_done(call)
    assert fleet.batches == [[b"x"]]
    pool.stop()


def test_inputs_arriving_for_a_gathering_batch_start_no_container(batching_fleet: BatchingFleet) -> None:
    fleet = batching_fleet
    pool, _ = make_pool(fleet, batch_size=4, batch_wait=60.0)
    first = new_call(b"a")
    pool.submit(first)
    fleet.boot_gate.set()
    fleet.wait_for("one container started", lambda: len(fleet.containers) == 1)
    rest = [new_call(p) for p in (b"b", b"c", b"d")]
    for call in rest:
        pool.submit(call)  # the gathering batch has room for them: no second container
    fleet.call_gate.set()
    wait_done(first, *rest)
    assert fleet.starts == 1
    assert fleet.batches == [[b"a", b"b", b"c", b"d"]]
    assert pool._batch_room == 0, "the room a batch counted is given back"
    pool.stop()


def test_a_burst_for_a_batched_function_starts_one_container_per_batch(batching_fleet: BatchingFleet) -> None:
    fleet = batching_fleet
    pool, _ = make_pool(fleet, batch_size=4, batch_wait=60.0)
    calls = [new_call(bytes([i])) for i in range(9)]
    for call in calls:
        pool.submit(call)
    fleet.wait_for("three containers booting", lambda: fleet.booting == 3)
    assert fleet.starts == 3, "9 inputs at 4 per batch: 3 containers"
    fleet.boot_gate.set()
    fleet.call_gate.set()
    extra = [new_call(p) for p in (b"x", b"y", b"z")]
    for call in extra:
        pool.submit(call)  # ... and they fill the last batch: still 3 containers, every batch full
    wait_done(*calls, *extra)
    assert fleet.starts == 3
    assert sorted(len(b) for b in fleet.batches) == [4, 4, 4], fleet.batches
    pool.stop()


# ----- retry back-off and cancellation ----------------------------------------------------------------------------


class FakeClock:
    """The pool's ``schedule``: records each delayed action; the test runs them when it chooses (no sleeping)."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, seconds: float, action: Callable[[], None]) -> None:
        with self.lock:
            self.pending.append((seconds, action))
            self.lock.notify_all()

    def next_delay(self) -> float:
        with self.lock:
            assert self.lock.wait_for(lambda: self.pending, WAIT), "no retry was scheduled"
            return self.pending[0][0]

    def advance(self) -> None:
        with self.lock:
            _, action = self.pending.pop(0)
        action()


class RaisingContainer(FakeContainer):
    """A fake whose calls with args in ``fleet.raises`` return a user exception's outcome (the function raised)."""

    def call(self, call_id: str, method: str | None, args: bytes, timeout: float, on_item: object = None) -> Outcome:
        outcome = super().call(call_id, method, args, timeout, on_item)
        left = getattr(self.fleet, "raises", {}).get(args, 0)
        if left:
            self.fleet.raises[args] = left - 1  # type: ignore[attr-defined]
            return Outcome(ok=False, message="ValueError: flaky", traceback="Traceback ...\nValueError: flaky")
        return outcome


def retry_pool(fleet: Fleet, clock: FakeClock, **settings: object) -> tuple[FunctionPool, list[str]]:
    events: list[str] = []
    base = {"label": "app.f", "timeout": 60.0, "retries": 3, "min_containers": 0, "max_containers": 10,
            "scaledown_window": 60.0}  # fmt: skip

    def launch() -> FakeContainer:
        plain = fleet()
        container = RaisingContainer(fleet, int(plain.id.split("-")[1]))
        with fleet.lock:
            fleet.containers[fleet.containers.index(plain)] = container
        return container

    settings = {**base, **settings}
    return FunctionPool(PoolSettings(**settings), launch, events.append, schedule=clock), events  # type: ignore[arg-type]


def test_retries_wait_their_back_off_doubling_up_to_max_delay(fleet: Fleet) -> None:
    clock = FakeClock()
    pool, events = retry_pool(fleet, clock, retry_delay=1.0, retry_backoff=2.0, retry_max_delay=3.0)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    fleet.raises = {b"flaky": 3}  # type: ignore[attr-defined]
    call = new_call(b"flaky")
    pool.submit(call)
    delays = []
    for attempt in (1, 2, 3):
        delays.append(clock.next_delay())
        assert not call.done.is_set() and call.attempts == attempt
        assert pool.counts()["waiting"] == 0, "during its back-off the input is not queued"
        clock.advance()
    wait_done(call)
    assert delays == [1.0, 2.0, 3.0], "1 s, then doubled, then capped at max_delay"
    assert call.outcome is not None and call.outcome.ok and call.attempts == 4
    assert f"Call {call.call_id} runs again in 2 s (attempt 3 of 4)" in events
    pool.stop()


def test_a_raising_function_is_retried_then_fails_with_its_own_exception(fleet: Fleet) -> None:
    clock = FakeClock()
    pool, _ = retry_pool(fleet, clock, retries=1)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    fleet.raises = {b"bad": 5}  # type: ignore[attr-defined]
    call = new_call(b"bad")
    pool.submit(call)
    wait_done(call)  # retry_delay=0 (the default here): at once, no clock involved
    assert call.attempts == 2 and not clock.pending
    assert call.outcome is not None and call.outcome.message == "ValueError: flaky"
    generator = Call(app_id="ap-test", tag="f", method=None, args=b"bad", generator=True, on_item=lambda _: None)
    pool.submit(generator)
    wait_done(generator)
    assert generator.attempts == 1, "a generator's values may have reached its caller: never run again"
    pool.stop()


def test_a_stop_during_a_back_off_fails_the_waiting_input(fleet: Fleet) -> None:
    clock = FakeClock()
    pool, _ = retry_pool(fleet, clock, retry_delay=5.0)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    fleet.raises = {b"flaky": 1}  # type: ignore[attr-defined]
    call = new_call(b"flaky")
    pool.submit(call)
    assert clock.next_delay() == 5.0
    pool.stop()
    wait_done(call)
    assert call.outcome is not None and "was stopped before this input ran" in call.outcome.message
    clock.advance()  # the timer firing late changes nothing
    assert call.attempts == 1


def test_cancel_ends_a_queued_input_at_once_and_stops_a_running_ones_container(fleet: Fleet) -> None:
    from warmboot.errors import InputCancelledError

    pool, events = make_pool(fleet, max_containers=1)
    fleet.boot_gate.set()
    running, queued = new_call(b"r"), new_call(b"q")
    pool.submit(running)
    fleet.wait_for("the first input runs", lambda: running.call_id in fleet.running_calls)
    pool.submit(queued)
    assert pool.cancel(queued, InputCancelledError("cancelled q"))
    assert queued.outcome is not None and queued.outcome.error_type == "InputCancelledError"
    assert pool.counts()["waiting"] == 0
    assert pool.cancel(running, InputCancelledError("cancelled r"))
    [container] = fleet.containers
    assert container.stopped.is_set(), "the container running it was stopped"
    assert running.outcome is not None and running.outcome.message == "cancelled r"
    assert not pool.cancel(running, InputCancelledError("again")), "a finished call cannot be cancelled"
    assert any(f"Call {running.call_id} cancelled: stopping container fake-1" in e for e in events)
    after = new_call(b"after")
    pool.submit(after)
    fleet.call_gate.set()
    wait_done(after)
    assert after.outcome is not None and after.outcome.ok and fleet.starts == 2, "a fresh container serves on"
    assert fleet.running_calls.count(queued.call_id) == 0, "the cancelled queued input never ran"
    pool.stop()


# ----- lent slots (the gateway's fast path) ------------------------------------------------------------------------


def _one_idle_container(fleet: Fleet, **settings: object) -> FunctionPool:
    pool, _ = make_pool(fleet, **settings)
    fleet.boot_gate.set()
    fleet.call_gate.set()
    first = new_call()
    pool.submit(first)
    wait_done(first)
    poll_until("its slots are idle", lambda: pool.counts()["idle"] == settings.get("concurrency", 1))
    return pool


def test_a_lent_slot_is_busy_for_the_pool_until_it_is_given_back(fleet: Fleet) -> None:
    pool = _one_idle_container(fleet, max_containers=1)
    lease = pool.try_lease()
    assert lease is not None and pool.counts()["idle"] == 0
    assert pool.try_lease() is None, "one slot: lent once"
    queued = new_call(b"q")
    pool.submit(queued)  # the container's only slot is lent: this input waits (max_containers=1)
    assert pool.counts()["waiting"] == 1 and not queued.done.is_set()
    pool.release(lease)
    wait_done(queued)
    assert queued.outcome is not None and queued.outcome.value == b"q" and fleet.starts == 1
    pool.stop()


def test_a_lease_given_back_broken_retires_its_container(fleet: Fleet) -> None:
    pool = _one_idle_container(fleet, concurrency=2)
    lease = pool.try_lease()
    assert lease is not None
    pool.release(lease, broken=True)
    assert fleet.containers[0].stopped.wait(WAIT), "its slots ended and the container stopped"
    later = new_call(b"after")
    pool.submit(later)
    wait_done(later)
    assert later.outcome is not None and later.outcome.value == b"after" and fleet.starts == 2
    pool.stop()


def test_a_container_with_a_lent_slot_does_not_idle_out(fleet: Fleet) -> None:
    pool = _one_idle_container(fleet, scaledown_window=1.0)
    lease = pool.try_lease()
    assert lease is not None
    # Past the window the container's slot times out, sees the lease and stays; given back, it idles out.
    assert not fleet.containers[0].stopped.wait(2.5), "an idle-out while a request runs on it"
    pool.release(lease)
    assert fleet.containers[0].stopped.wait(WAIT)
    pool.stop()


def test_pools_that_count_inputs_per_container_lend_nothing(fleet: Fleet) -> None:
    pool = _one_idle_container(fleet, max_inputs=5)
    assert pool.try_lease() is None
    pool.stop()
