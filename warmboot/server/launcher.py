"""Starting one container of a function: restored from its memory snapshot when there is a good one, else cold.

The pool decides *when* a container starts (``server.pool``); this module decides *how*, and keeps the
snapshot registry told of every outcome: a cold boot of a snapshotting function makes the snapshot when it
is this boot's turn, and a failed restore is classified (``server.snapshot_policy``) before booting cold.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from warmboot.errors import ContainerBootError, ContainerError, SnapshotError
from warmboot.server.gpu_alloc import GpuAllocator
from warmboot.server.restore_slots import RestoreSlots
from warmboot.server.snapshots import SnapshotRegistry
from warmboot.server.start_log import StartChoice, StartLog
from warmboot.worker import gpus as gpu_devices
from warmboot.worker.runner import FunctionContainer, LaunchPlan, OutputSink
from warmboot.worker.snapshot import Snapshot
from warmboot.worker.snapshot_remote import RemoteSnapshots

log = logging.getLogger("warmboot.launcher")


@dataclass
class SnapshotPlan:
    """Where a function's memory snapshot lives and how restored copies start."""

    registry: SnapshotRegistry
    key: str
    app_name: str
    tag: str
    reseed: bool = True
    starts: StartLog | None = None  #: where each start's times go (and what decides restore or cold boot)
    slots: RestoreSlots | None = None  #: the host's limit on restores at once (None: no limit)
    #: Object storage shared by the agents (``WARMBOOT_S3_*``): snapshots made here are pushed there, and a key
    #: with no snapshot here is looked up there before booting cold.
    remote: RemoteSnapshots | None = None


@dataclass
class GpuPlan:
    """Where a gpu= function's containers get their GPUs: ``request`` (``"h100:2"``) from the host's allocator."""

    allocator: GpuAllocator
    request: str
    cancelled: threading.Event | None = None  #: set when the pool stops: a start still waiting for GPUs gives up


class Launcher:
    """Starts containers of one function (called by its pool, from the pool's container threads)."""

    def __init__(
        self,
        label: str,
        make_plan: Callable[[], LaunchPlan],
        start_env: Callable[[], dict[str, str]],
        on_output: OutputSink,
        on_event: Callable[[str], None],
        snapshots: SnapshotPlan | None = None,
        gpus: GpuPlan | None = None,
    ):
        self.label = label
        self._make_plan = make_plan
        self._start_env = start_env
        self._on_output = on_output
        self._event = on_event
        self.snapshots = snapshots
        self.gpus = gpus
        self._choice = StartChoice(always_restore=os.environ.get("WARMBOOT_RESTORE_ALWAYS") == "1")
        #: Asked by a restore that waited for a slot whether its pool still needs it (``FunctionPool
        #: .start_still_needed``, wired by the app when it makes the pool).
        self.still_needed: Callable[[], bool] = lambda: True

    def __call__(self, *, may_snapshot: bool = True) -> FunctionContainer:
        """A started container, ready for inputs (holding GPUs of its own, for a gpu= function).

        ``may_snapshot=False``: a cold boot makes no snapshot (a cluster's control plane lets one agent of a
        fingerprint class make it at a time: ``server.cluster.remote``).
        """
        plan = self._make_plan()
        if self.gpus is None:
            return self._launch(plan, may_snapshot)
        kind, count = gpu_devices.parse_request(self.gpus.request)
        allocation = self.gpus.allocator.acquire(
            kind,
            count,
            self.gpus.cancelled,
            on_wait=lambda: self._event(f"{self.label} waits for {count} free GPU(s) of type {kind!r}"),
        )
        try:
            fc = self._launch(dataclasses.replace(plan, gpus=allocation.inventory), may_snapshot)
        except BaseException:
            allocation.release()
            raise
        fc.on_finished(allocation.release)  # whenever it is killed: shutdown, crash, timeout, pool stop
        return fc

    def _launch(self, plan: LaunchPlan, may_snapshot: bool = True) -> FunctionContainer:
        snap = self.snapshots
        chosen_cold = snap is not None and not self._should_restore(snap)
        if snap is not None and not chosen_cold and (restored := self._restore(plan, snap)) is not None:
            return restored
        fc = FunctionContainer(plan, self._on_output)
        started = time.monotonic()
        snapshot_seconds = 0.0
        try:
            fc.boot(snapshot_phase=snap is not None)
            booted = time.monotonic()
            if snap is not None and may_snapshot and snap.registry.claim_creation(snap.key, snap.app_name, snap.tag):
                if not self._make_snapshot(fc, snap):
                    # The dump failed in a way that leaves this container's state unknown (CRIU hung and was
                    # killed): boot another one. The key is 'failed' now, so that one does not try again.
                    fc.kill()
                    return self._launch(plan, may_snapshot)
                snapshot_seconds = time.monotonic() - booted
                fc.made_snapshot = True
            fc.start(self._start_env())
        except BaseException:
            fc.kill()
            raise
        seconds = time.monotonic() - started
        chosen = ", chosen over a restore" if chosen_cold else ""
        self._event(f"Container {fc.id} started for {self.label} (cold boot in {seconds:.2f} s{chosen})")
        if snap is not None and snap.starts is not None:
            # The snapshot's own creation is not part of what a cold boot costs.
            phases = {"boot_ms": (booted - started) * 1000}
            start_phases = ("start_ms", "network_ms", "resume_ms", "enter_ms")
            phases.update({k: fc.timings[k] for k in start_phases if k in fc.timings})
            fc.start_row = snap.starts.record(snap.key, "cold", fc.id, (seconds - snapshot_seconds) * 1000, phases)
        return fc

    def _should_restore(self, snap: SnapshotPlan) -> bool:
        """Restore, unless the measured times say that this function boots faster cold (``start_log``)."""
        if snap.starts is None:
            return True
        kind, why = self._choice.next_kind(snap.starts.stats(snap.key, "cold"), snap.starts.stats(snap.key, "restore"))
        if why:
            self._event(f"{self.label}: {why}")
        return kind == "restore"

    def first_input(self, fc: FunctionContainer, millis: float) -> None:
        """The pool's report of a container's first input: the last phase of its start."""
        row = getattr(fc, "start_row", None)
        if row is not None and self.snapshots is not None and self.snapshots.starts is not None:
            self.snapshots.starts.first_input(row, millis)

    def _restore(self, plan: LaunchPlan, snap: SnapshotPlan) -> FunctionContainer | None:
        """A container restored from the snapshot, or ``None`` (no usable snapshot, or the restore failed)."""
        fetch_ms = 0.0
        snapshot = snap.registry.usable(snap.key, on_failure=self._restore_failed)
        if snapshot is None and snap.remote is not None:
            fetching = time.monotonic()
            snapshot = self._fetch(snap, snap.remote)
            fetch_ms = (time.monotonic() - fetching) * 1000
        if snapshot is None:
            return None
        if snap.slots is None:
            return self._restore_now(plan, snap, snapshot, fetch_ms)
        with snap.slots.slot(self.still_needed):  # raises StartNotNeeded for the pool when it waited in vain
            return self._restore_now(plan, snap, snapshot, fetch_ms)

    def _fetch(self, snap: SnapshotPlan, remote: RemoteSnapshots) -> Snapshot | None:
        """The key's snapshot from object storage, made by another agent, or None (booting cold makes one)."""
        record = snap.registry.get(snap.key)
        if record is not None and record.state in ("ok", "creating", "refused"):
            return None  # ours is backed off or being made, or this function cannot be snapshotted
        try:
            snapshot_id = remote.find_key(snap.key)
            if snapshot_id is None:
                return None
            started = time.monotonic()
            snapshot = remote.fetch(snapshot_id, snap.registry.store)
        except (SnapshotError, OSError) as exc:
            self._event(f"Fetching the memory snapshot of {self.label} from object storage failed, booting cold: {exc}")
            return None
        snap.registry.fetched(snap.key, snap.app_name, snap.tag, snapshot)
        self._event(
            f"Fetched memory snapshot {snapshot.id} of {self.label} from object storage in "
            f"{(time.monotonic() - started) * 1000:.0f} ms ({snapshot.size_bytes / 1e6:.0f} MB)"
        )
        return snapshot

    def _push(self, snap: SnapshotPlan, remote: RemoteSnapshots, snapshot: Snapshot) -> None:
        """Upload a snapshot made here for the other agents (on a thread of its own: no call waits for it)."""
        started = time.monotonic()
        try:
            pushed = remote.push(snapshot)
            remote.publish_key(snap.key, snapshot.id)
        except Exception as exc:
            log.warning("pushing snapshot %s of %s failed", snapshot.id, self.label, exc_info=True)
            self._event(f"Pushing memory snapshot {snapshot.id} of {self.label} to object storage failed: {exc}")
            return
        chunks = sum(len(f["chunks"]) for f in pushed["files"].values())
        self._event(
            f"Pushed memory snapshot {snapshot.id} of {self.label} to object storage in "
            f"{time.monotonic() - started:.2f} s ({chunks} chunks)"
        )

    def _restore_now(
        self, plan: LaunchPlan, snap: SnapshotPlan, snapshot: Snapshot, fetch_ms: float
    ) -> FunctionContainer | None:
        fc = FunctionContainer(plan, self._on_output)
        if fetch_ms:
            fc.timings["fetch_ms"] = fetch_ms
        started = time.monotonic() - fetch_ms / 1000  # the start began with the fetch
        try:
            fc.restore(snap.registry.store, snapshot)
            fc.start(self._start_env(), reseed=snap.reseed)
        except ContainerBootError:
            fc.kill()
            raise  # user code failed in @enter(snap=False): booting cold would fail the same way
        except (SnapshotError, ContainerError, OSError) as exc:
            fc.kill()
            self._restore_failed(snapshot.id, exc, snap.registry.restore_failed(snap.key, snapshot.id, exc))
            return None
        millis = (time.monotonic() - started) * 1000
        snap.registry.restored(snap.key, millis)
        t = fc.timings
        if snap.starts is not None:
            fc.start_row = snap.starts.record(snap.key, "restore", fc.id, millis, dict(t))
        self._event(
            f"Restored {self.label} from memory snapshot in {millis:.0f} ms (container {fc.id}: "
            + (f"fetched from object storage {fetch_ms:.0f} ms, " if fetch_ms else "")
            + "checks "
            f"{t.get('check_ms', 0):.0f} ms, CRIU restore {t.get('criu_restore_ms', 0):.0f} ms, "
            f"@enter(snap=False) and runtime {t.get('start_ms', 0):.0f} ms)"
        )
        return fc

    def _restore_failed(self, snapshot_id: str, exc: BaseException, verdict: str) -> None:
        self._event(
            f"Restore of {self.label} from memory snapshot {snapshot_id} failed ({verdict}), booting cold "
            f"instead: {str(exc).splitlines()[0]}"
        )

    def _make_snapshot(self, fc: FunctionContainer, snap: SnapshotPlan) -> bool:
        """Checkpoint a cold-booted container at its snapshot point, unless it holds network connections.

        Never raises for the snapshot's sake, and never leaves the key 'creating'. Returns whether ``fc`` can
        serve: ``False`` only when the dump failed in a way that leaves its state unknown.
        """
        try:
            connections = fc.open_connections()
        except OSError as exc:
            snap.registry.creation_failed(snap.key, exc)
            self._event(f"No memory snapshot for {self.label}: its connections could not be read ({exc})")
            return True
        if connections:
            reason = "open network connection(s) at the snapshot point: " + ", ".join(connections)
            snap.registry.not_created(snap.key, "refused", reason)
            self._event(
                f"No memory snapshot for {self.label}: the container holds {reason}. A snapshot cannot carry a live "
                "connection into its copies; open it in an @enter(snap=False) method instead. "
                "Serving from the cold-booted container."
            )
            return True
        self._event(f"Creating memory snapshot for {self.label}")
        started = time.monotonic()
        try:
            snapshot = fc.checkpoint(snap.registry.store, app=snap.app_name, tag=snap.tag, key=snap.key)
        except (SnapshotError, OSError) as exc:
            verdict = snap.registry.creation_failed(snap.key, exc)
            self._event(
                f"Memory snapshot of {self.label} failed ({verdict}); serving from the cold-booted container: {exc}"
            )
            return True
        except Exception as exc:  # a hung CRIU killed at its deadline, or a bug: not the call's failure
            log.exception("snapshot of %s failed", self.label)
            verdict = snap.registry.creation_failed(snap.key, exc)
            self._event(f"Memory snapshot of {self.label} failed ({verdict}); booting another container: {exc}")
            return False
        except BaseException as exc:
            snap.registry.creation_failed(snap.key, exc)  # never leave the key 'creating'
            raise
        seconds = time.monotonic() - started
        snap.registry.created(snap.key, snapshot, seconds)
        if snap.remote is not None:
            threading.Thread(target=self._push, args=(snap, snap.remote, snapshot), name="push", daemon=True).start()
        self._event(f"Snapshot created in {seconds:.2f} s ({snapshot.size_bytes / 1e6:.0f} MB) for {self.label}")
        return True
