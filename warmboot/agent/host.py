"""What an agent's machine runs: containers started for the control plane, with this machine's snapshot store,
start log, image cache and GPUs.

Starting a container reuses the single-machine server's launcher (``server.apps.RunningApp.launcher``): the
same restore-or-boot choice, snapshot creation and policy, object-storage fetch and push. The app's record comes
with each start request (the control plane owns apps); the agent keeps its code layer, its image (pulled from
the registry, or built here when there is none) and its snapshots under its own ``WARMBOOT_HOME``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from warmboot import config
from warmboot.cluster import messages
from warmboot.errors import ContainerCrashedError, WarmbootError
from warmboot.protocol import Outcome
from warmboot.server import restore_slots
from warmboot.server.apps import APP_DIR, RunningApp, warm_key
from warmboot.server.db import Database
from warmboot.server.gpu_alloc import GpuAllocator
from warmboot.server.images import ResolvedImage, code_layer, resolve_image
from warmboot.server.launcher import Launcher
from warmboot.server.restore_slots import RestoreSlots
from warmboot.server.snapshots import SnapshotRegistry
from warmboot.server.start_log import StartLog, snapshot_rows
from warmboot.server.state import AppRecord, State
from warmboot.worker import container as containers
from warmboot.worker import gpus, snapshot_remote
from warmboot.worker.runner import FunctionContainer
from warmboot.worker.snapshot import SnapshotStore

log = logging.getLogger("warmboot.agent")

#: Outcomes kept for a restarted control plane to collect (``CollectCall``), newest last.
KEEP_OUTCOMES = 10_000
#: Container output lines held for the next heartbeat at most; past that the oldest are dropped.
MAX_PENDING_LINES = 20_000
#: Apps whose launch plans an agent keeps; past that, those without a container here are forgotten (a redeploy is
#: a new app id: without a bound, every deploy the cluster ever ran would stay in memory).
MAX_APPS = 64


class LineBuffer:
    """Container output waiting for the next heartbeat (``logs.write``'s signature, so launchers write here)."""

    def __init__(self) -> None:
        self._lines: collections.deque[messages.ContainerLine] = collections.deque(maxlen=MAX_PENDING_LINES)
        self._lock = threading.Lock()

    def write(self, app_name: str, source: str, line: str) -> None:
        with self._lock:
            self._lines.append(messages.ContainerLine(app_name, source, line))

    def take(self) -> list[messages.ContainerLine]:
        with self._lock:
            lines = list(self._lines)
            self._lines.clear()
        return lines


@dataclasses.dataclass
class _Started:
    fc: FunctionContainer
    pool: str  #: ``"<app id>/<pool key>"``
    launcher: Launcher
    busy: int = 0  #: inputs running on it now
    orphan: bool = False  #: started for an earlier session of the control plane, which no longer knows it


class _AppView:
    """What ``RunningApp`` needs of its server, on an agent: this machine's parts, and the app's secret values
    as the control plane sent them with the latest start (secrets live in the control plane)."""

    def __init__(self, host: AgentHost):
        self._host = host
        self.secret_values: dict[str, str] = {}
        self.cluster = None
        self.state = self  # variant checks look secrets up: the control plane checked them before placing the call

    def get_secret(self, name: str) -> dict[str, str]:
        return {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def secret_env(self, secrets: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        return dict(self.secret_values)


class AgentHost:
    """The containers of one agent and the machine's parts they use."""

    def __init__(self, home: Path | None = None):
        self.home = home or config.home()
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        state = State(
            Database.sqlite(self.home / "state.db")
        )  # this machine's snapshots and starts, never the cluster's
        self.snapshots = SnapshotRegistry(state.connection, state.lock, SnapshotStore(self.home / "snapshots"))
        self.starts = StartLog(state.connection, state.lock)
        self.restore_slots = RestoreSlots(restore_slots.max_parallel_from_env())
        s3 = snapshot_remote.settings_from_env()
        self.remote_snapshots = snapshot_remote.RemoteSnapshots(snapshot_remote.S3Bucket(s3)) if s3 else None
        self.gpu_allocator = GpuAllocator(gpus.inventory())
        self.logs = LineBuffer()
        self._lock = threading.Lock()
        self._apps: dict[str, tuple[RunningApp, _AppView]] = {}
        self._launchers: dict[str, Launcher] = {}  #: by ``"<app id>/<pool key>"``
        self._warm_keys: dict[str, str] = {}  #: the same keys -> ``apps.warm_key`` of their pool
        self._images: dict[str, ResolvedImage] = {}
        self._started: dict[str, _Started] = {}
        self._running: dict[str, threading.Event] = {}  #: call id -> set when its outcome is kept
        self._outcomes: collections.OrderedDict[str, Outcome] = collections.OrderedDict()
        # What a previous agent process on this home left running goes: its control plane retried or failed the
        # calls those containers ran when it found that agent lost.
        containers.remove_leftovers(self.home / "containers", "a previous agent")

    def volume_dir(self, name: str) -> Path:
        path = config.volume_dir(name, self.home)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ----- starting ------------------------------------------------------------------------------------------

    def start(self, request: messages.StartContainer) -> messages.ContainerStarted:
        began = time.monotonic()
        app, view = self._app(request)
        view.secret_values = dict(request.secret_env)
        variant = app.variant_from_json(request.tag, request.variant)
        warm = f"{request.app_id}/{variant.key}"
        with self._lock:
            launcher = self._launchers.get(warm)
        if launcher is None:
            launcher = app.launcher(variant, threading.Event())
            with self._lock:
                launcher = self._launchers.setdefault(warm, launcher)
                self._warm_keys[warm] = warm_key(app.record, variant)
        fc = launcher(may_snapshot=request.may_snapshot)
        with self._lock:
            self._started[fc.id] = _Started(fc, warm, launcher)
        return messages.ContainerStarted(fc.id, fc.restored, time.monotonic() - began, time.time(), fc.made_snapshot)

    def _app(self, request: messages.StartContainer) -> tuple[RunningApp, _AppView]:
        with self._lock:
            known = self._apps.get(request.app_id)
        if known is not None:
            return known
        spec = json.loads(json.dumps(request.spec))
        for tag, fspec in spec["functions"].items():
            began = time.monotonic()
            fspec["resolved_image"] = self._image(fspec).to_json()
            if (seconds := time.monotonic() - began) > 0.1:  # it was pulled (or built), not found
                how = "Pulled" if fspec.get("image_ref") else "Got"
                self.logs.write(
                    request.app_name, "warmboot", f"{how} the image of {request.app_name}.{tag} in {seconds:.2f} s"
                )
        code_dir = code_layer(self.home / "code", request.filename, request.source, APP_DIR)
        record = AppRecord(
            app_id=request.app_id,
            name=request.app_name,
            version=0,
            state=request.app_state,
            spec=spec,
            code_dir=str(code_dir),
            app_file=request.filename,
            created_at=time.time(),
        )
        view = _AppView(self)
        app = RunningApp(view, record)  # type: ignore[arg-type]  # the view stands in for the server
        with self._lock:
            known = self._apps.setdefault(request.app_id, (app, view))
            self._forget_idle_apps_locked()
            return known

    def _forget_idle_apps_locked(self) -> None:
        """Past MAX_APPS, forget the oldest apps that run no container here (their launchers with them)."""
        busy = {s.pool.split("/")[0] for s in self._started.values()}
        for app_id in [a for a in self._apps if a not in busy][: max(0, len(self._apps) - MAX_APPS)]:
            del self._apps[app_id]
            for pool in [p for p in self._launchers if p.split("/")[0] == app_id]:
                del self._launchers[pool]
                self._warm_keys.pop(pool, None)

    def _image(self, fspec: dict[str, Any]) -> ResolvedImage:
        """The function's image on this machine: pulled from the registry the control plane pushed it to, or the
        control plane's own layers when this machine shares its disk, or else built here from its definition."""
        # The pushed reference names the local files too (a redeploy may change only those); else the digest.
        digest = fspec.get("image_ref") or fspec.get("image_digest", "")
        with self._lock:
            cached = self._images.get(digest)
        if cached is not None:
            return cached
        resolved = ResolvedImage.from_json(fspec["resolved_image"])
        ref = fspec.get("image_ref")
        if ref:
            from warmboot.worker.images import distribute

            resolved = distribute.pull_image(
                ref,
                images_root=self.home / "images",
                insecure=os.environ.get("WARMBOOT_REGISTRY_INSECURE") == "1",
                progress=lambda line: log.info("pull %s: %s", ref, line),
            )
        elif not all(p.is_dir() for p in (*resolved.image.layers, *resolved.local_layers)):
            resolved = resolve_image(fspec["image"], self.home, progress=lambda line: log.info("build: %s", line))
        with self._lock:
            self._images[digest] = resolved
        return resolved

    # ----- running ---------------------------------------------------------------------------------------------

    def run(self, request: messages.RunInputs, emit: Callable[[str, Any], None]) -> messages.Outcomes:
        with self._lock:
            started = self._started.get(request.container_id)
            if started is None:
                raise ContainerCrashedError(f"container {request.container_id} is not running on this agent")
            fc = started.fc
            started.busy += 1
            done = threading.Event()
            for call_id, _ in request.inputs:
                self._running[call_id] = done
        try:
            try:
                if request.batch:
                    outcomes = fc.call_batch(request.inputs, request.method, request.timeout)
                else:
                    ((call_id, args),) = request.inputs
                    on_item = (lambda value: emit("item", messages.Item(value))) if request.generator else None
                    outcomes = [fc.call(call_id, request.method, args, request.timeout, on_item)]
            except WarmbootError as exc:
                outcomes = [Outcome.failure(exc) for _ in request.inputs]
                self._keep(request.inputs, outcomes, done)
                return messages.Outcomes(error_type=type(exc).__name__, message=str(exc))
            self._keep(request.inputs, outcomes, done)
            return messages.Outcomes(outcomes)
        finally:
            with self._lock:
                started.busy -= 1
            done.set()

    def _keep(self, inputs: list[tuple[str, bytes]], outcomes: list[Outcome], done: threading.Event) -> None:
        with self._lock:
            for (call_id, _), outcome in zip(inputs, outcomes, strict=True):
                self._outcomes[call_id] = outcome
                self._running.pop(call_id, None)
            while len(self._outcomes) > KEEP_OUTCOMES:
                self._outcomes.popitem(last=False)

    def collect(self, request: messages.CollectCall) -> messages.Collected:
        with self._lock:
            outcome = self._outcomes.get(request.call_id)
            running = self._running.get(request.call_id)
        if outcome is None and running is not None:
            running.wait(request.wait_s)
            with self._lock:
                outcome = self._outcomes.get(request.call_id)
        return messages.Collected(known=outcome is not None or running is not None, outcome=outcome)

    def stop(self, request: messages.StopContainer) -> messages.Empty:
        with self._lock:
            started = self._started.pop(request.container_id, None)
        if started is not None:
            if request.kill:
                started.fc.kill()
            else:
                started.fc.shutdown()
        return messages.Empty()

    def orphan_all(self) -> None:
        """A new session with the control plane: the containers started before belong to none of its pools."""
        with self._lock:
            for started in self._started.values():
                started.orphan = True

    def stop_idle_orphans(self) -> int:
        """Stop orphans that run nothing (those still running an input finish it first: a restarted control
        plane collects its outcome)."""
        with self._lock:
            idle = [cid for cid, s in self._started.items() if s.orphan and s.busy == 0]
            stopping = [self._started.pop(cid) for cid in idle]
        for each in stopping:
            log.info("stopping container %s: the control plane that started it is gone", each.fc.id)
            each.fc.shutdown()
        return len(stopping)

    def stop_all(self) -> None:
        with self._lock:
            started = list(self._started.values())
            self._started.clear()
        for each in started:
            each.fc.kill()

    # ----- what heartbeats report -------------------------------------------------------------------------------

    def alive(self) -> list[str]:
        with self._lock:
            started = list(self._started.items())
        gone = [cid for cid, s in started if s.fc.container is None or not s.fc.container.is_running()]
        if gone:
            with self._lock:
                for cid in gone:
                    self._started.pop(cid, None)
        return [cid for cid, _ in started if cid not in gone]

    def warm(self) -> list[str]:
        """The pools whose snapshot this machine holds ready to restore (the placement prefers this agent)."""
        with self._lock:
            launchers = [(self._warm_keys[pool], launcher) for pool, launcher in self._launchers.items()]
        warm = set()
        for key, launcher in launchers:
            plan = launcher.snapshots
            if plan is None:
                continue
            record = plan.registry.get(plan.key)
            if record is not None and record.state == "ok":
                warm.add(key)
        return sorted(warm)

    def snapshot_rows(self) -> list[dict[str, Any]]:
        """This machine's snapshots with their restore and cold-boot times (sent to the control plane)."""
        return snapshot_rows(self.snapshots, self.starts)

    def images(self) -> list[str]:
        """Digests of the images this machine holds (placement prefers an agent with the function's image)."""
        with self._lock:
            return [image.image.digest for image in self._images.values()]
