"""The local server: a root-only Unix socket API over deployed apps, their pools and the calls they run."""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import warmboot
from warmboot import config, validation
from warmboot.errors import (
    InvalidOptionError,
    NotFoundError,
    ServerError,
    WarmbootError,
)
from warmboot.server.images import ResolvedImage, code_layer, resolve_image
from warmboot.server.logs import LogBook
from warmboot.server.pool import Call, FunctionPool, PoolSettings, SnapshotPlan
from warmboot.server.snapshots import SnapshotRegistry, snapshot_key
from warmboot.server.state import AppRecord, State
from warmboot.worker import cgroups, cuda_checkpoint, gpus, runtime_lib
from warmboot.worker.container import BindMount
from warmboot.worker.runner import LaunchPlan
from warmboot.worker.sandbox import rootfs
from warmboot.worker.snapshot import SnapshotStore

log = logging.getLogger("warmboot.server")

APP_DIR = "/root"  # where the app's file appears in its containers (Modal's place for it too)
_FINISHED_CALL_TTL = 3600.0
#: Connections served at once, each on a thread of its own (a follower of `warmboot logs -f` holds one).
MAX_CONNECTIONS = int(os.environ.get("WARMBOOT_MAX_CONNECTIONS", "256"))


def _check_function(label: str, fspec: dict[str, Any]) -> None:
    """The rules the SDK applies at decoration, again: a deploy request need not come from our SDK."""
    opts = fspec["options"]
    validation.timeout(f"{label}: timeout", opts["timeout"])
    validation.timeout(f"{label}: scaledown_window", opts["scaledown_window"])
    validation.environment(f"{label}: env=", opts["env"])
    for path in fspec["volumes"]:
        validation.mount_point(f"{label}: volumes=", path)
    for secret in fspec["secrets"]:
        if secret.get("name"):
            validation.name("secret", secret["name"])
        else:
            validation.environment(f"{label}: Secret.from_dict()", secret.get("values"))


class RunningApp:
    """A deployed or ephemeral app: its record and the pools of its functions (made on first call)."""

    def __init__(self, server: Server, record: AppRecord):
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

        def env() -> dict[str, str]:
            # Secrets are read at each start: a changed secret reaches new containers without a redeploy.
            return {**resolved.image.env, **gpu_env, **self._secret_env(fspec), **opts["env"]}

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
        settings = PoolSettings(
            snapshots=snapshots,
            label=label,
            timeout=float(opts["timeout"]),
            retries=int(opts["retries"]),
            min_containers=int(opts["min_containers"]),
            max_containers=int(opts["max_containers"]),
            scaledown_window=float(opts["scaledown_window"]),
            max_inputs=opts.get("max_inputs"),
        )
        return FunctionPool(settings, make_plan, start_env, on_output, self.event)

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


class Server:
    """The server's state in memory: running apps, calls in flight, and the request handlers."""

    def __init__(self, home: Path | None = None):
        self.home = home or config.home()
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        self.state = State(self.home / "state.db")
        self.logs = LogBook(self.home / "logs")
        store = SnapshotStore(self.home / "snapshots")
        self.snapshots = SnapshotRegistry(self.state.connection, self.state.lock, store)
        self.apps: dict[str, RunningApp] = {}
        self.calls: dict[str, Call] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connection_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.started_at = time.time()
        self.code_digest = runtime_lib.code_digest()  # what this process runs, whatever the disk says later
        self.state.stop_ephemeral()
        rootfs.remove_stale(self.home / "containers", alive=set())  # left by a server that died
        for record in self.state.running_apps():
            app = self.apps[record.app_id] = RunningApp(self, record)
            threading.Thread(target=app.start_min_containers, daemon=True).start()

    def volume_dir(self, name: str) -> Path:
        return config.volume_dir(name, self.home)

    # ----- resolving targets -----------------------------------------------------------------------

    def running_app(self, *, app_id: str | None = None, app_name: str | None = None) -> RunningApp:
        if app_id is None:
            if not app_name:
                raise InvalidOptionError("name an app (by name or id)")
            app_id = app_name if app_name.startswith("ap-") else self.state.deployed(app_name).app_id
        with self._lock:
            app = self.apps.get(app_id)
        if app is None:
            raise NotFoundError(f"app {app_name or app_id} is not running (stopped, or an ended `warmboot run`)")
        return app

    # ----- operations ------------------------------------------------------------------------------

    def op_ping(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": warmboot.__version__,
            "code": self.code_digest,
            "home": str(self.home),
            "started_at": self.started_at,
            "apps": len(self.apps),
        }

    def op_deploy(self, msg: dict[str, Any], emit: Any) -> dict[str, Any]:
        spec, name = msg["spec"], msg.get("name") or msg["spec"].get("name")
        if not name:
            raise InvalidOptionError("the App has no name: give it one, App('my-app'), or pass --name")
        validation.name("app", name)
        if name.startswith("ap-"):
            raise InvalidOptionError(f"app name {name!r}: names may not start with 'ap-' (app ids do)")
        functions = spec["functions"]
        if not functions:
            raise InvalidOptionError(f"app {name!r} defines no @app.function or @app.cls: nothing to deploy")
        for tag, fspec in functions.items():
            _check_function(f"{name}.{tag}", fspec)
            if fspec["options"].get("gpu"):
                gpus.check_request(fspec["options"]["gpu"], f"{name}.{tag}")
            for path, vol in fspec["volumes"].items():
                vdir = self.volume_dir(vol["name"])
                if not vdir.is_dir():
                    if not vol["create_if_missing"]:
                        raise NotFoundError(
                            f"{name}.{tag}: volume {vol['name']!r} (for {path}) does not exist; "
                            "use Volume.from_name(name, create_if_missing=True)"
                        )
                    vdir.mkdir(parents=True)
                    emit({"log": f"Created volume {vol['name']}"})
            for secret in fspec["secrets"]:
                if secret.get("name"):
                    self.state.get_secret(secret["name"])
        built: dict[str, ResolvedImage] = {}
        for tag, fspec in functions.items():
            key = json.dumps(fspec["image"], sort_keys=True)
            if key not in built:
                emit({"log": f"Building image for {name}.{tag}"})
                built[key] = resolve_image(
                    fspec["image"],
                    self.home,
                    progress=lambda line: emit({"log": line}),
                    secrets=self.secret_env,
                )
            # The image is pinned here, by digest and layer paths: container starts never build or hash.
            fspec["image_digest"] = built[key].image.digest
            fspec["resolved_image"] = built[key].to_json()
        code_dir = code_layer(self.home / "code", msg["filename"], msg["source"], APP_DIR)
        ephemeral = bool(msg.get("ephemeral"))
        previous = None
        if not ephemeral:
            with contextlib.suppress(NotFoundError):
                previous = self.state.deployed(name)
        record = self.state.add_app(
            name, ephemeral=ephemeral, spec=spec, code_dir=str(code_dir), app_file=msg["filename"]
        )
        app = RunningApp(self, record)
        with self._lock:
            self.apps[record.app_id] = app
            old = self.apps.pop(previous.app_id, None) if previous else None
        if old is not None:
            threading.Thread(target=old.stop, daemon=True).start()
        if not ephemeral:
            keep = {
                snapshot_key(name, tag, fspec, code_dir.name, runtime_lib.ensure(self.home).name)
                for tag, fspec in functions.items()
                if fspec["options"]["enable_memory_snapshot"]
            }
            for key in self.snapshots.retain_only(name, keep):
                app.event(f"Deleted memory snapshot {key[:12]}: the new version changes what it holds")
        app.event(
            f"{'Running' if ephemeral else 'Deployed'} app {name} version {record.version} ({', '.join(functions)})"
        )
        app.start_min_containers()
        return {"app_id": record.app_id, "name": name, "version": record.version, "functions": list(functions)}

    def secret_env(self, secrets: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        """Secrets (``Secret.to_spec()`` dicts) as environment variables: named ones read from the state now."""
        env: dict[str, str] = {}
        for secret in secrets:
            env.update(self.state.get_secret(secret["name"]) if secret.get("name") else secret["values"])
        return env

    def _submit(self, msg: dict[str, Any]) -> Call:
        target = msg["target"]
        app = self.running_app(app_id=target.get("app_id"), app_name=target.get("app_name"))
        fspec = app.function_spec(target["tag"])
        method = target.get("method")
        if fspec["kind"] == "cls":
            if method not in fspec["lifecycle"]["methods"]:
                raise NotFoundError(f"{app.record.name}.{target['tag']} has no @method() named {method!r}")
        elif method is not None:
            raise InvalidOptionError(f"{app.record.name}.{target['tag']} is a function, not a class")
        if fspec["options"].get("gpu"):
            gpus.check_request(fspec["options"]["gpu"], f"{app.record.name}.{target['tag']}")
        call = Call(method=method, args=msg["args"])
        with self._lock:
            self._forget_old_calls()
            self.calls[call.call_id] = call
        app.pool(target["tag"]).submit(call)
        return call

    def _forget_old_calls(self) -> None:
        cutoff = time.time() - _FINISHED_CALL_TTL
        for call_id in [c.call_id for c in self.calls.values() if c.done.is_set() and c.submitted_at < cutoff]:
            del self.calls[call_id]

    def op_call(self, msg: dict[str, Any]) -> dict[str, Any]:
        call = self._submit(msg)
        call.done.wait()
        with self._lock:
            self.calls.pop(call.call_id, None)
        assert call.outcome is not None
        return call.outcome

    def op_submit(self, msg: dict[str, Any]) -> str:
        return self._submit(msg).call_id

    def op_get(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        with self._lock:
            call = self.calls.get(msg["call_id"])
        if call is None:
            raise NotFoundError(f"no call {msg['call_id']} (unknown, or its result was already fetched long ago)")
        if not call.done.wait(msg.get("timeout")):
            return None
        return call.outcome

    def op_app_list(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            apps = list(self.apps.values())
        return [
            {
                "app_id": a.record.app_id,
                "name": a.record.name,
                "state": a.record.state,
                "version": a.record.version,
                "created_at": a.record.created_at,
                "functions": list(a.record.spec["functions"]),
                "containers": sum(len(p.describe()) for p in list(a.pools.values())),
            }
            for a in apps
        ]

    def op_app_stop(self, msg: dict[str, Any]) -> str:
        app = self.running_app(app_name=msg["app"])
        with self._lock:
            self.apps.pop(app.record.app_id, None)
        self.state.stop_app(app.record.app_id)
        app.event(f"Stopping app {app.record.name}")
        app.stop()
        return app.record.name

    def op_container_list(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            apps = list(self.apps.values())
        return [{"app": a.record.name, **c} for a in apps for p in list(a.pools.values()) for c in p.describe()]

    def op_secret_create(self, msg: dict[str, Any]) -> str:
        validation.name("secret", msg["name"])
        validation.environment(f"secret {msg['name']}", msg["values"])
        self.state.put_secret(msg["name"], msg["values"])
        return msg["name"]

    def op_secret_list(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        return self.state.list_secrets()

    def op_logs(self, msg: dict[str, Any], emit: Any) -> None:
        name = validation.name("app", msg["app"])  # a name, never a path: logs/<name>.log and nothing else
        if name.startswith("ap-"):
            name = self.state.get_app(name).name
        elif not self.logs.path(name).exists():
            raise NotFoundError(f"no logs for an app named {name!r}")
        for line in self.logs.follow(
            name,
            from_end=bool(msg.get("from_end")),
            follow=bool(msg.get("follow")),
            keep_going=lambda: not self._stop.is_set(),
        ):
            emit({"line": line})

    def op_snapshot_list(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        return [vars(r) for r in self.snapshots.list()]

    def op_snapshot_rm(self, msg: dict[str, Any]) -> dict[str, Any]:
        return vars(self.snapshots.remove(msg["key"]))

    def op_server_stop(self, msg: dict[str, Any]) -> None:
        threading.Thread(target=self.shutdown, daemon=True).start()

    STREAMING = frozenset({"deploy", "logs"})

    # ----- serving ---------------------------------------------------------------------------------

    def _serve_connection(self, conn: Connection) -> None:
        try:
            self.handle(conn)
        finally:
            self._connection_slots.release()

    def _refuse_busy(self, conn: Connection) -> None:
        """Past the connection cap: say so at once (each connection holds a thread while it is open)."""
        with conn, contextlib.suppress(OSError):
            conn.send(
                {
                    "ok": False,
                    "error_type": "ServerError",
                    "message": f"the server is busy: {MAX_CONNECTIONS} connections are open "
                    "(WARMBOOT_MAX_CONNECTIONS); retry when some have finished",
                }
            )

    def handle(self, conn: Connection) -> None:
        with conn:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            op = msg.get("op", "")
            handler = getattr(self, f"op_{op}", None)
            try:
                if handler is None:
                    raise InvalidOptionError(f"unknown server operation {op!r}")
                if op in self.STREAMING:
                    value = handler(msg, conn.send)
                    conn.send({"ok": True, "done": True, "value": value})
                else:
                    conn.send({"ok": True, "value": handler(msg)})
            except (BrokenPipeError, ConnectionResetError, EOFError):
                return
            except WarmbootError as exc:
                with contextlib.suppress(OSError):
                    conn.send({"ok": False, "error_type": type(exc).__name__, "message": str(exc)})
            except Exception as exc:
                log.exception("operation %s failed", op)
                with contextlib.suppress(OSError):
                    conn.send(
                        {
                            "ok": False,
                            "error_type": "ServerError",
                            "message": f"internal error in {op}: {type(exc).__name__}: {exc}",
                        }
                    )

    def serve(self) -> None:
        sock = config.server_socket()
        if sock.exists():
            try:
                Client(str(sock), family="AF_UNIX").close()
            except (ConnectionRefusedError, FileNotFoundError):
                sock.unlink(missing_ok=True)
            else:
                raise ServerError(f"a warmboot server is already running on {sock}")
        old_umask = os.umask(0o177)  # the socket is born root-only
        try:
            listener = Listener(str(sock), family="AF_UNIX")
        finally:
            os.umask(old_umask)
        os.chmod(sock, 0o600)
        self._listener = listener
        (self.home / "server.pid").write_text(str(os.getpid()))
        log.info("warmboot server %s listening on %s (pid %d)", warmboot.__version__, sock, os.getpid())
        try:
            while not self._stop.is_set():
                try:
                    conn = listener.accept()
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                if not self._connection_slots.acquire(blocking=False):
                    self._refuse_busy(conn)
                    continue
                threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()
        finally:
            with contextlib.suppress(OSError):
                listener.close()

    def shutdown(self) -> None:
        """Stop every app's containers (running their @exit hooks) and stop serving."""
        if self._stop.is_set():
            return
        self._stop.set()
        log.info("server stopping")
        with self._lock:
            apps = list(self.apps.values())
        threads = [threading.Thread(target=a.stop) for a in apps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        with contextlib.suppress(OSError):
            config.server_socket().unlink()
        with contextlib.suppress(OSError):
            (self.home / "server.pid").unlink()
        with contextlib.suppress(OSError):
            self._listener.close()
        os._exit(0)


def run_forever() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` dumps every thread's stack to the server log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = Server()
    signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
    signal.signal(signal.SIGINT, lambda *_: server.shutdown())
    server.serve()
