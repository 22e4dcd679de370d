"""A running app (deployed, or ephemeral under `warmboot run`): its record and one pool per function.

A function's pool is made on its first call (or at start for ``min_containers``): the launch plan is
resolved here from the deployed spec, once; container starts then build and hash nothing.

A *variant* of a function (a class's ``modal.parameter()`` values, ``with_options`` overrides, or both) has a
pool of its own, keyed ``tag#<digest>``, and a memory snapshot of its own: the parameter values go into its
snapshot key, and the overrides into the spec that key is computed from (so overrides that change nothing a
snapshot holds, such as ``timeout=``, share the deployed snapshot). An app keeps at most
``WARMBOOT_MAX_VARIANT_POOLS`` (64) variant pools: past that, idle ones (no container, no input) are dropped,
and if none is idle the call is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmboot.errors import InvalidOptionError, NotFoundError, UnsupportedOptionError
from warmboot.sdk import parameter as parameters
from warmboot.sdk import retries as retry_rules
from warmboot.server.images import ResolvedImage
from warmboot.server.launcher import GpuPlan, Launcher, SnapshotPlan
from warmboot.server.pool import FunctionPool, Launch, PoolSettings
from warmboot.server.snapshots import snapshot_key
from warmboot.server.state import AppRecord
from warmboot.worker import cgroups, cuda_checkpoint, gpus, runtime_lib
from warmboot.worker.container import BindMount
from warmboot.worker.runner import LaunchPlan

if TYPE_CHECKING:
    from warmboot.server.daemon import ControlPlane

log = logging.getLogger("warmboot.server")

APP_DIR = "/root"  # where the app's file appears in its containers (Modal's place for it too)
#: Variant pools an app keeps at most (parameter sets and with_options handles); see the module docstring.
MAX_VARIANT_POOLS = int(os.environ.get("WARMBOOT_MAX_VARIANT_POOLS", "64"))


@dataclasses.dataclass(frozen=True)
class Variant:
    """Where a call runs: a function's deployed pool, or one of its variants' (checked parameters/overrides)."""

    tag: str
    parameters: dict[str, Any] | None = None  #: complete values (defaults filled in); None: not parametrized
    overrides: dict[str, Any] | None = None  #: checked ``with_options`` overrides

    @property
    def key(self) -> str:
        """The pool's key: the tag alone for the deployed pool, else ``tag#<digest of the variant>``."""
        if self.parameters is None and not self.overrides:
            return self.tag
        return f"{self.tag}#{parameters.variant_id(self.parameters, self.overrides)}"

    def describe(self) -> str:
        """``Model(size='large')``, ``f.with_options(timeout)``: how logs, labels and snapshot lists show it."""
        text = self.tag
        if self.parameters is not None:
            text += f"({parameters.describe(self.parameters)})"
        if self.overrides:
            text += ".with_options(" + ",".join(sorted(self.overrides)) + ")"
        return text

    def to_json(self) -> str:
        """What a queued call records of its variant, to be queued on the same pool after a restart."""
        import json

        values = json.loads(parameters.encode(self.parameters)) if self.parameters is not None else None
        return json.dumps({"parameters": values, "options": self.overrides or None}, sort_keys=True)

    def effective_spec(self, fspec: dict[str, Any]) -> dict[str, Any]:
        """The deployed spec with the overrides applied: what the variant's containers (and snapshot) get."""
        if not self.overrides:
            return fspec
        plain = {k: v for k, v in self.overrides.items() if k not in ("secrets", "volumes", "env")}
        options = {**fspec["options"], **plain, "env": {**fspec["options"]["env"], **self.overrides.get("env", {})}}
        return {
            **fspec,
            "options": options,
            "secrets": [*fspec["secrets"], *self.overrides.get("secrets", [])],
            "volumes": {**fspec["volumes"], **self.overrides.get("volumes", {})},
        }


def variant_snapshot_key(base: str, variant: Variant) -> str:
    """A variant's snapshot key: its parameter values hashed into the key of its (effective) spec.

    The overrides are already in ``base`` through the spec it was computed from; only what they change of a
    container's contents (resources, env, secrets' names, volumes) changes it.
    """
    if variant.parameters is None:
        return base
    material = base + "|parameters:" + parameters.encode(variant.parameters)
    # Half the parameters' digest (first: key prefixes, as `snapshot list` shows them, tell the sets apart),
    # half the function's key: a redeploy that keeps the function's key keeps the snapshots of its parameter
    # sets too (``variant_of``), without knowing which sets were ever called.
    return hashlib.sha256(material.encode()).hexdigest()[:16] + base[:16]


def warm_key(record: AppRecord, variant: Variant) -> str:
    """What a cluster's placement matches against the snapshots agents hold (``server.cluster.placement``): the
    app's name, function, parameter values, code and image. Not the app id, which a redeploy of unchanged code
    changes while its snapshots stay; not the fingerprint, which the agent adds itself."""
    fspec = record.spec["functions"][variant.tag]
    values = parameters.variant_id(variant.parameters, None) if variant.parameters is not None else ""
    return f"{record.name}/{variant.tag}/{values}/{Path(record.code_dir).name}/{fspec.get('image_digest', '')}"


def variant_of(key: str, base_keys: set[str]) -> bool:
    """Whether snapshot ``key`` is one of ``base_keys`` or a parameter set's snapshot of one of them."""
    return key in base_keys or key[16:] in {k[:16] for k in base_keys}


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

    def variant(
        self, tag: str, given_parameters: dict[str, Any] | None = None, options: dict[str, Any] | None = None
    ) -> Variant:
        """The variant a call asks for, checked as the SDK checks it (whatever client sent it).

        Raises :class:`InvalidOptionError` naming the bad parameter or option, :class:`NotFoundError` for a
        volume or secret that does not exist.
        """
        fspec = self.function_spec(tag)
        label = f"{self.record.name}.{tag}"
        decls = fspec.get("parameters") or {}
        values = None
        if decls or given_parameters:
            if fspec["kind"] != "cls":
                raise InvalidOptionError(f"{label} is a function: it takes no modal.parameter() values")
            values = parameters.bind(tag, decls, (), dict(given_parameters or {}))
        overrides = None
        if options:
            overrides = parameters.check_overrides(f"{label}.with_options", dict(options))
            for path, volume in (overrides.get("volumes") or {}).items():
                vdir = self.server.volume_dir(volume["name"])
                if not vdir.is_dir():
                    if not volume.get("create_if_missing"):
                        raise NotFoundError(
                            f"{label}.with_options: volume {volume['name']!r} (for {path}) does not exist; "
                            "use Volume.from_name(name, create_if_missing=True)"
                        )
                    vdir.mkdir(parents=True, exist_ok=True)
            for secret in overrides.get("secrets") or []:
                if secret.get("name") is not None:
                    self.server.state.get_secret(secret["name"])  # NotFoundError names it
            if overrides.get("gpu") and self.server.cluster is None:  # a cluster waits for an agent that fits
                gpus.check_request(overrides["gpu"], label)
        return Variant(tag, values, overrides)

    def variant_from_json(self, tag: str, text: str | None) -> Variant:
        """The variant a recovered call recorded (:meth:`Variant.to_json`), checked again."""
        if not text:
            return self.variant(tag)  # a parametrized class's default set (or an error naming what is missing)
        import json

        data = json.loads(text)
        decls = self.function_spec(tag).get("parameters") or {}
        values = data.get("parameters")
        given = parameters.decode(decls, json.dumps(values)) if values is not None else None
        return self.variant(tag, given, data.get("options"))

    def variant_pool(self, variant: Variant) -> FunctionPool:
        """The pool of ``variant``, made on first use; at most :data:`MAX_VARIANT_POOLS` variant pools per app."""
        with self._lock:
            return self._variant_pool_locked(variant)

    def call_pool(self, call: Any) -> FunctionPool:
        """The pool an accepted call was queued on (its variant's)."""
        return self.variant_pool(self.variant_from_json(call.tag, call.variant))

    def submit(self, variant: Variant, call: Any) -> None:
        """Queue ``call`` on its variant's pool (under the app's lock: an idle pool is never dropped in between)."""
        with self._lock:
            self._variant_pool_locked(variant).submit(call)

    def _variant_pool_locked(self, variant: Variant) -> FunctionPool:
        key = variant.key
        if key in self.pools:
            return self.pools[key]
        if key != variant.tag:
            variants = [k for k in self.pools if "#" in k]
            if len(variants) >= MAX_VARIANT_POOLS:
                idle = [k for k in variants if not any(self.pools[k].counts().values())]
                for k in idle[: len(variants) - MAX_VARIANT_POOLS + 1]:
                    dropped = self.pools.pop(k)
                    threading.Thread(target=dropped.stop, daemon=True).start()
                if len(variants) - len(idle) >= MAX_VARIANT_POOLS:
                    raise UnsupportedOptionError(
                        f"app {self.record.name!r} already runs {MAX_VARIANT_POOLS} variants (parameter sets or "
                        "with_options handles) that are all busy; wait for some to go idle, or raise "
                        "WARMBOOT_MAX_VARIANT_POOLS on the server"
                    )
        self.pools[key] = self._make_pool(variant.tag, variant)
        return self.pools[key]

    def _secret_env(self, fspec: dict[str, Any]) -> dict[str, str]:
        return self.server.secret_env(fspec["secrets"])

    def _make_pool(self, tag: str, variant: Variant | None = None) -> FunctionPool:
        variant = variant or Variant(tag)
        settings = self.pool_settings(variant)
        launch: Launch
        if self.server.cluster is not None:  # the agents run the containers (server.cluster)
            stopped = self.server.cluster.cancel_event()  # set by the pool's stop(): a start waiting for room ends
            launch = self.server.cluster.launcher(self, variant, stopped)
            on_first_input = None
        else:
            stopped = self.server.gpu_allocator.cancel_event()  # set by the pool's stop(): a waiting start ends
            launcher = self.launcher(variant, stopped)
            launch, on_first_input = launcher, launcher.first_input
        pool = FunctionPool(settings, launch, self.event, stopped=stopped, on_first_input=on_first_input)
        if isinstance(launch, Launcher):
            launch.still_needed = pool.start_still_needed
        return pool

    def pool_settings(self, variant: Variant) -> PoolSettings:
        """How a variant's pool scales and retries (its function's options, with the variant's overrides)."""
        fspec = variant.effective_spec(self.function_spec(variant.tag))
        opts = fspec["options"]
        concurrency = int((fspec.get("concurrency") or {}).get("max_inputs") or 1)
        batching = fspec.get("batching")
        retries, retry_delay, retry_backoff, retry_max_delay = retry_rules.policy(opts["retries"])
        return PoolSettings(
            label=f"{self.record.name}.{variant.describe()}",
            timeout=float(opts["timeout"]),
            retries=retries,
            min_containers=int(opts["min_containers"]),
            max_containers=int(opts["max_containers"]),
            scaledown_window=float(opts["scaledown_window"]),
            max_inputs=opts.get("max_inputs"),
            concurrency=concurrency,
            retry_delay=retry_delay,
            retry_backoff=retry_backoff,
            retry_max_delay=retry_max_delay,
            batch_size=int(batching["max_batch_size"]) if batching else 0,
            batch_wait=int(batching["wait_ms"]) / 1000 if batching else 0.0,
        )

    def launcher(self, variant: Variant, stopped: threading.Event) -> Launcher:
        """What starts a variant's containers on this machine: its launch plan, resolved once, and its snapshot
        plan (the single-machine server's pools, and an agent's containers, use it)."""
        tag = variant.tag
        fspec = variant.effective_spec(self.function_spec(tag))
        opts = fspec["options"]
        label = f"{self.record.name}.{variant.describe()}"
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
        if variant.parameters is not None:  # set on the instance before its @enter hooks (and the snapshot)
            runtime_env[parameters.ENV_VAR] = parameters.encode(variant.parameters)

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
                key=variant_snapshot_key(
                    snapshot_key(
                        self.record.name, tag, fspec, Path(self.record.code_dir).name, runtime_lib.ensure(home).name
                    ),
                    variant,
                ),
                app_name=self.record.name,
                starts=self.server.starts,
                tag=variant.describe(),
                reseed=bool(self.record.spec.get("reseed_after_restore", True)),
                slots=self.server.restore_slots,
                remote=self.server.remote_snapshots,
            )
        gpu_plan = GpuPlan(self.server.gpu_allocator, str(opts["gpu"]), stopped) if opts["gpu"] else None
        return Launcher(label, make_plan, start_env, on_output, self.event, snapshots, gpu_plan)

    def event(self, text: str) -> None:
        log.info("%s: %s", self.record.name, text)
        self.server.logs.write(self.record.name, "warmboot", text)

    def start_min_containers(self) -> None:
        for tag, fspec in self.record.spec["functions"].items():
            if fspec["options"]["min_containers"] > 0:
                if not fspec.get("parameters"):
                    self.pool(tag).ensure_min()
                    continue
                # A parametrized class: min_containers warms the default parameter set, if it has one.
                try:
                    self.variant_pool(self.variant(tag, {})).ensure_min()
                except InvalidOptionError as exc:
                    self.event(f"{tag}: min_containers starts no container: {exc}")

    def stop(self) -> None:
        with self._lock:
            pools = list(self.pools.values())
        for p in pools:
            p.stop()
