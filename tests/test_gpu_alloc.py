"""The fast layer: host-wide GPU allocation (server.gpu_alloc) on a fake inventory; no GPU, no container, no sleeps.

A request that has to wait says so through ``on_wait`` (an Event the test waits on), so every test knows the
moment a request is queued; releases, cancellations and launches are then done by the test, in its order.
The launcher and pool tests use the real Launcher and FunctionPool with FunctionContainer's boot, start, call
and health check replaced: what is under test is which GPUs each container's plan holds, and when they go back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from warmboot.errors import ContainerBootError, GpuAllocationCancelledError, UnsupportedOptionError, WarmbootError
from warmboot.protocol import Outcome
from warmboot.server.calls import Call
from warmboot.server.gpu_alloc import Allocation, GpuAllocator
from warmboot.server.launcher import GpuPlan, Launcher
from warmboot.server.pool import FunctionPool, PoolSettings
from warmboot.worker import gpus
from warmboot.worker.runner import FunctionContainer, LaunchPlan

WAIT = 30.0  # an upper bound on waits for other threads: reached only when the code under test is broken

H100 = "NVIDIA H100 80GB HBM3"
A10G = "NVIDIA A10G"
CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm")


def inventory(*models: str, first: int = 0) -> gpus.GpuInventory:
    """Fake GPUs with these models, at host indices ``first``, ``first + 1``, ... (nodes /dev/nvidiaN)."""
    indices = tuple(range(first, first + len(models)))
    return gpus.GpuInventory(tuple(f"/dev/nvidia{i}" for i in indices), CONTROL, indices, models)


class Request:
    """``allocator.acquire`` on a thread of its own; ``waiting`` is set when it queues, ``done`` when it ends."""

    def __init__(self, allocator: GpuAllocator, model: str, count: int, cancelled: threading.Event | None = None):
        self.waiting = threading.Event()
        self.done = threading.Event()
        self.allocation: Allocation | None = None
        self.error: WarmbootError | None = None

        def run() -> None:
            try:
                self.allocation = allocator.acquire(model, count, cancelled, on_wait=self.waiting.set)
            except WarmbootError as exc:
                self.error = exc
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def queued(self) -> Request:
        assert self.waiting.wait(WAIT), "the request never had to wait"
        assert not self.done.is_set()
        return self

    def granted(self) -> Allocation:
        assert self.done.wait(WAIT), "the request was never granted"
        assert self.error is None, self.error
        assert self.allocation is not None
        return self.allocation


# ----- the allocator ----------------------------------------------------------------------------------------------


def test_requests_for_one_and_two_get_distinct_free_gpus_of_their_type() -> None:
    allocator = GpuAllocator(inventory(H100, H100, H100, A10G))
    one = allocator.acquire("h100", 1)
    two = allocator.acquire("H100", 2)
    assert len(one.indices) == 1 and len(two.indices) == 2
    assert not set(one.indices) & set(two.indices)
    assert set(one.indices) | set(two.indices) == {0, 1, 2}
    assert allocator.free() == (3,)  # the A10G
    a10g = allocator.acquire("a10g", 1)
    assert a10g.indices == (3,)
    assert allocator.free() == ()
    for allocation in (one, two, a10g):
        allocation.release()
    assert allocator.free() == (0, 1, 2, 3)


def test_an_allocation_shows_only_its_gpus_nodes_and_visible_devices() -> None:
    allocator = GpuAllocator(inventory(*[H100] * 8))
    held = allocator.acquire("any", 5)  # 0-4
    mine = allocator.acquire("h100", 2)
    assert mine.indices == (5, 6)
    inv = mine.inventory
    assert inv.nodes() == ("/dev/nvidia5", "/dev/nvidia6", *CONTROL)
    # The container has only these two GPU nodes, so CUDA numbers them 0 and 1; the toolkit's variable names
    # their host indices.
    assert inv.visible_env() == {"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "5,6"}
    assert [g.model for g in inv.devices()] == [H100, H100]
    # The plan a launcher makes from it hands exactly these nodes to the container.
    plan = LaunchPlan(python="p", app_file="a", tag="f", env={}, layers=(), containers_dir=Path("/x"), gpus=inv)
    assert plan.gpus is not None and plan.gpus.nodes() == inv.nodes()
    held.release()
    mine.release()


def test_the_whole_inventory_keeps_its_old_visible_env() -> None:
    assert gpus.GpuInventory(("/dev/nvidia0", "/dev/nvidia1"), ()).visible_env() == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "NVIDIA_VISIBLE_DEVICES": "0,1",
    }
    assert inventory(H100, H100, first=2).subset([3]).visible_env() == {
        "CUDA_VISIBLE_DEVICES": "0",
        "NVIDIA_VISIBLE_DEVICES": "3",
    }


def test_a_request_waits_while_none_is_free_and_takes_the_released_gpu() -> None:
    allocator = GpuAllocator(inventory(H100, H100))
    first = allocator.acquire("h100", 1)
    second = allocator.acquire("h100", 1)
    waiting = Request(allocator, "h100", 1).queued()
    assert allocator.waiting() == 1
    second.release()
    assert waiting.granted().indices == second.indices
    assert allocator.waiting() == 0 and allocator.free() == ()
    first.release()
    waiting.granted().release()
    assert allocator.free() == (0, 1)


def test_a_request_for_two_is_not_overtaken_by_requests_for_one() -> None:
    allocator = GpuAllocator(inventory(H100, H100))
    holder = allocator.acquire("h100", 1)  # one GPU stays free
    pair = Request(allocator, "h100", 2).queued()
    single = Request(allocator, "h100", 1).queued()  # the free GPU is kept for the older request
    assert allocator.free() == (1,)
    holder.release()
    assert set(pair.granted().indices) == {0, 1}
    assert not single.done.is_set()
    pair.granted().release()
    single.granted().release()
    assert allocator.free() == (0, 1) and allocator.waiting() == 0


def test_a_request_for_another_type_does_not_wait_behind_a_queued_one() -> None:
    allocator = GpuAllocator(inventory(H100, H100, A10G))
    holder = allocator.acquire("h100", 1)
    Request(allocator, "h100", 2).queued()
    assert allocator.acquire("a10g", 1).indices == (2,)
    holder.release()


def test_cancelling_wakes_a_waiting_request_and_lets_the_next_one_through() -> None:
    allocator = GpuAllocator(inventory(H100, H100))
    holder = allocator.acquire("h100", 1)
    cancel = allocator.cancel_event()
    pair = Request(allocator, "h100", 2, cancelled=cancel).queued()
    single = Request(allocator, "h100", 1).queued()  # behind the pair, though a GPU is free
    cancel.set()  # nothing is released: only the event can wake the pair's wait
    assert pair.done.wait(WAIT)
    assert isinstance(pair.error, GpuAllocationCancelledError)
    assert single.granted().indices == (1,)
    assert allocator.waiting() == 0
    holder.release()


def test_an_already_cancelled_request_gets_nothing_even_with_free_gpus() -> None:
    allocator = GpuAllocator(inventory(H100))
    cancel = allocator.cancel_event()
    cancel.set()
    with pytest.raises(GpuAllocationCancelledError):
        allocator.acquire("h100", 1, cancel)
    assert allocator.free() == (0,) and allocator.waiting() == 0


@pytest.mark.parametrize(
    ("inv", "model", "count"),
    [
        (inventory(H100, H100, A10G), "h100", 3),  # more than the host has of that type
        (inventory(H100, H100, A10G), "a100", 1),  # a type the host does not have
        (inventory(H100), "any", 0),
        (gpus.GpuInventory((), ()), "any", 1),  # no GPU at all
    ],
)
def test_a_request_that_can_never_be_met_is_refused_at_once(inv: gpus.GpuInventory, model: str, count: int) -> None:
    allocator = GpuAllocator(inv)
    with pytest.raises(UnsupportedOptionError, match="cannot be met"):
        allocator.acquire(model, count)
    assert allocator.waiting() == 0


def test_release_is_idempotent_and_never_frees_a_later_holders_gpu() -> None:
    allocator = GpuAllocator(inventory(H100))
    old = allocator.acquire("h100", 1)
    old.release()
    old.release()
    new = allocator.acquire("h100", 1)
    old.release()  # a late second release of the old allocation
    assert allocator.free() == ()
    new.release()
    assert allocator.free() == (0,)


def test_gpus_of_unknown_model_fit_any_type() -> None:
    allocator = GpuAllocator(gpus.GpuInventory(("/dev/nvidia0",), ()))
    assert allocator.acquire("h100", 1).indices == (0,)


def test_check_request_accepts_a_type_a_mixed_host_has_and_counts_only_that_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gpus, "models", lambda: [H100, H100, A10G])
    inv = inventory(H100, H100, A10G)
    gpus.check_request("h100:2", "app.f", inv)
    gpus.check_request("a10g", "app.f", inv)
    with pytest.raises(UnsupportedOptionError, match="asks for 2 GPUs of that type; this machine has 1"):
        gpus.check_request("a10g:2", "app.f", inv)
    assert gpus.parse_request("h100:2") == ("h100", 2) and gpus.parse_request("any") == ("any", 1)


# ----- the launcher and the pool ----------------------------------------------------------------------------------


@dataclass
class FakeBoots:
    """Stands in for FunctionContainer's boot/start/call: records each container's GPUs, fails a boot on demand."""

    plans: list[LaunchPlan] = field(default_factory=list)
    fail_boot: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        boots = self

        def boot(fc: FunctionContainer, *, snapshot_phase: bool = False) -> None:
            with boots.lock:
                boots.plans.append(fc.plan)
            if boots.fail_boot:
                raise ContainerBootError(f"{fc.plan.label} failed while importing the app:")

        def call(
            fc: FunctionContainer, call_id: str, method: str | None, args: bytes, timeout: float, on_item: object = None
        ) -> Outcome:
            fc.calls_served += 1
            return Outcome(ok=True, value=args)

        monkeypatch.setattr(FunctionContainer, "boot", boot)
        monkeypatch.setattr(FunctionContainer, "start", lambda fc, env, reseed=False: None)
        monkeypatch.setattr(FunctionContainer, "call", call)
        monkeypatch.setattr(FunctionContainer, "healthy", lambda fc: True)


@pytest.fixture
def boots(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBoots]:
    fake = FakeBoots()
    fake.install(monkeypatch)
    yield fake


def make_launcher(
    allocator: GpuAllocator, request: str, on_event: Callable[[str], None], cancelled: threading.Event | None = None
) -> Launcher:
    plan = LaunchPlan(
        python="/usr/bin/python3",
        app_file="/root/app.py",
        tag="f",
        env={},
        layers=(),
        containers_dir=Path("/nonexistent"),
        label="app.f",
        gpus=allocator.inventory,  # the whole host: what the launcher must narrow down
    )
    return Launcher(
        "app.f", lambda: plan, dict, lambda *_: None, on_event, None, GpuPlan(allocator, request, cancelled)
    )


def test_each_launched_container_gets_only_its_own_gpus_until_it_shuts_down(boots: FakeBoots) -> None:
    allocator = GpuAllocator(inventory(*[H100] * 4))
    launcher = make_launcher(allocator, "h100:2", lambda _: None)
    first, second = launcher(), launcher()
    assert first.plan.gpus is not None and second.plan.gpus is not None
    assert first.plan.gpus.nodes() == ("/dev/nvidia0", "/dev/nvidia1", *CONTROL)
    assert second.plan.gpus.nodes() == ("/dev/nvidia2", "/dev/nvidia3", *CONTROL)
    assert second.plan.gpus.visible_env() == {"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "2,3"}
    assert allocator.free() == ()
    first.shutdown()
    assert allocator.free() == (0, 1)
    first.shutdown()  # the pool may shut a container down twice (its stop, then its thread)
    second.kill()  # a crash or a timeout ends in kill()
    assert allocator.free() == (0, 1, 2, 3)


def test_a_failed_boot_gives_its_gpus_back(boots: FakeBoots) -> None:
    allocator = GpuAllocator(inventory(H100))
    boots.fail_boot = True
    with pytest.raises(ContainerBootError):
        make_launcher(allocator, "h100", lambda _: None)()
    assert len(boots.plans) == 1 and allocator.free() == (0,)


def test_a_queued_call_waits_for_a_gpu_then_runs_and_stopping_cancels_a_waiting_start(boots: FakeBoots) -> None:
    allocator = GpuAllocator(inventory(H100))
    outside = allocator.acquire("h100", 1)  # another app's container holds the only GPU
    events: list[str] = []
    waits = threading.Event()
    failed_starts = threading.Semaphore(0)

    def on_event(text: str) -> None:
        events.append(text)
        if "waits for 1 free GPU" in text:
            waits.set()
        if "failed to start" in text:
            failed_starts.release()

    stopped = allocator.cancel_event()
    settings = PoolSettings("app.f", timeout=60.0, retries=0, min_containers=0, max_containers=1, scaledown_window=60.0)
    pool = FunctionPool(settings, make_launcher(allocator, "h100:1", on_event, stopped), on_event, stopped=stopped)

    call = Call(app_id="ap-test", tag="f", method=None, args=b"x")
    pool.submit(call)
    assert waits.wait(WAIT), "the start never waited for the GPU"
    assert not call.done.is_set() and pool.counts() == {"booting": 1, "running": 0, "idle": 0, "waiting": 1}
    outside.release()
    assert call.done.wait(WAIT) and call.outcome is not None and call.outcome.value == b"x"
    assert boots.plans[-1].gpus is not None and boots.plans[-1].gpus.gpus == ("/dev/nvidia0",)
    assert allocator.free() == ()  # the idle container keeps its GPU

    # A second pool of the same host waits for that GPU; stopping it ends the waiting start, nothing stays stuck.
    waits.clear()
    other_stopped = allocator.cancel_event()
    other_settings = PoolSettings("app.g", 60.0, 0, 0, 1, 60.0)
    other = FunctionPool(
        other_settings, make_launcher(allocator, "h100:1", on_event, other_stopped), on_event, stopped=other_stopped
    )
    queued = Call(app_id="ap-test", tag="g", method=None, args=b"y")
    other.submit(queued)
    assert waits.wait(WAIT)
    (starter,) = [t for t in threading.enumerate() if t.name == "pool-app.g"]
    other.stop()
    assert queued.done.is_set() and queued.outcome is not None and not queued.outcome.ok  # failed by stop()
    starter.join(WAIT)
    assert not starter.is_alive(), "the waiting start did not end when its pool stopped"
    assert failed_starts.acquire(timeout=0)
    assert other.counts()["booting"] == 0 and allocator.waiting() == 0
    assert any("cancelled while it waited for free GPUs" in e for e in events)

    pool.stop()  # shuts the idle container down: its GPU goes back
    assert allocator.free() == (0,)
