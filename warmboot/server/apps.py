"""A running app (deployed, or ephemeral under `warmboot run`): its record and one pool per function.

A function's pool is made on its first call (or at start for ``min_containers``): the launch plan is
resolved here from the deployed spec, once; container starts then build and hash nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmboot.errors import NotFoundError
from warmboot.server.images import ResolvedImage
from warmboot.server.launcher import GpuPlan, Launcher, SnapshotPlan
from warmboot.server.pool import FunctionPool, PoolSettings
from warmboot.server.snapshots import snapshot_key
from warmboot.server.state import AppRecord
from warmboot.worker import cgroups, cuda_checkpoint, gpus, runtime_lib
from warmboot.worker.container import BindMount
from warmboot.worker.runner import LaunchPlan

if TYPE_CHECKING:
    from warmboot.server.daemon import ControlPlane

log = logging.getLogger("warmboot.server")

APP_DIR = "/root"  # where the app's file appears in its containers (Modal's place for it too)


class RunningApp:
    """A deployed or ephemeral app: its record and the pools of its functions (made on first call)."""

    def __init__(self, server: ControlPlane, record: AppRecord):
        self.server = server
        self.record = record
        self.pools: dict[str, FunctionPool] = {}
        self._lock = threading.Lock()

    def function_spec(self, tag: str) -> dict[str, Any]:
        try:
            return self.record.spec["functions"][tag]
        except KeyError:
            names = ", ".join(self.record.spec["functions"]) or "none"
            raise NotFoundError(
                f"app {self.record.name!r} has no function or class {tag!r} (it has: {names})"
            ) from None

    def pool(self, tag: str) -> FunctionPool:
        with self._lock:
            if tag not in self.pools:
                self.pools[tag] = self._make_pool(tag)
            return self.pools[tag]

    def _secret_env(self, fspec: dict[str, Any]) -> dict[str, str]:
        return self.server.secret_env(fspec["secrets"])

    def _make_pool(self, tag: str) -> FunctionPool:
        fspec = self.function_spec(tag)
        opts = fspec["options"]
        label = f"{self.record.name}.{tag}"
        home = self.server.home

        if "resolved_image" not in fspec:
            raise NotFoundError(
                f"{label} was deployed by an older warmboot whose images were virtualenvs, not root filesystems; "
                f"deploy the app again (warmboot deploy) to build its image"
            )
        resolved = ResolvedImage.from_json(fspec["resolved_image"])
        gpu_layers: tuple[Path, ...] = ()
        gpu_env: dict[str, str] = {}
        if opts["gpu"]:
            version = cuda_checkpoint.driver_version() or "unknown"
            gpu_layers = (gpus.driver_layer(home / "images" / "drivers", version),)
            gpu_env = dict(gpus.DRIVER_ENV)

        concurrency = int((fspec.get("concurrency") or {}).get("max_inputs") or 1)
        runtime_env = {"WARMBOOT_MAX_CONCURRENT_INPUTS": str(concurrency)}

        def env() -> dict[str, str]:
            # Secrets are read at each start: a changed secret reaches new containers without a redeploy.
            return {**resolved.image.env, **gpu_env, **self._secret_env(fspec), **opts["env"], **runtime_env}

        plan = LaunchPlan(
            python=resolved.image.python,
            app_file=f"{APP_DIR}/{self.record.app_file}",
            tag=tag,
            env=env(),
            layers=(
                *resolved.image.layers,
                *resolved.local_layers,
                *gpu_layers,
                Path(self.record.code_dir),
                runtime_lib.ensure(home),
            ),
            containers_dir=home / "containers",
            workdir=resolved.image.workdir,
            mounts=[
                BindMount(str(self.server.volume_dir(vol["name"])), path) for path, vol in fspec["volumes"].items()
            ],
            limits=cgroups.Limits.for_function(opts["memory"], opts["cpu"]),
            network=not opts.get("block_network", False),
            label=label,
            gpus=gpus.inventory() if opts["gpu"] else None,
            gpus_after_snapshot=bool(
                opts["enable_memory_snapshot"] and not opts["experimental_options"].get("enable_gpu_snapshot")
            ),
        )

        def make_plan() -> LaunchPlan:
            return dataclasses.replace(plan, env=env())

        def start_env() -> dict[str, str]:
            return {**self._secret_env(fspec), **opts["env"]}

        def on_output(container_id: str, stream: str, line: str) -> None:
            self.server.logs.write(self.record.name, f"{tag} {container_id}", line)

        snapshots = None
        if opts["enable_memory_snapshot"] and self.record.state == "deployed":
            snapshots = SnapshotPlan(
                registry=self.server.snapshots,
                key=snapshot_key(
                    self.record.name, tag, fspec, Path(self.record.code_dir).name, runtime_lib.ensure(home).name
                ),
                app_name=self.record.name,
                tag=tag,
                reseed=bool(self.record.spec.get("reseed_after_restore", True)),
            )
        stopped = self.server.gpu_allocator.cancel_event()  # set by the pool's stop(): a start waiting for GPUs ends
        gpu_plan = GpuPlan(self.server.gpu_allocator, str(opts["gpu"]), stopped) if opts["gpu"] else None
        launcher = Launcher(label, make_plan, start_env, on_output, self.event, snapshots, gpu_plan)
        settings = PoolSettings(
            label=label,
            timeout=float(opts["timeout"]),
            retries=int(opts["retries"]),
            min_containers=int(opts["min_containers"]),
            max_containers=int(opts["max_containers"]),
            scaledown_window=float(opts["scaledown_window"]),
            max_inputs=opts.get("max_inputs"),
            concurrency=concurrency,
        )
        return FunctionPool(settings, launcher, self.event, stopped=stopped)

    def event(self, text: str) -> None:
        log.info("%s: %s", self.record.name, text)
        self.server.logs.write(self.record.name, "warmboot", text)

    def start_min_containers(self) -> None:
        for tag, fspec in self.record.spec["functions"].items():
            if fspec["options"]["min_containers"] > 0:
                self.pool(tag).ensure_min()

    def stop(self) -> None:
        with self._lock:
            pools = list(self.pools.values())
        for p in pools:
            p.stop()
