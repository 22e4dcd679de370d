"""The local server: the control plane that owns deployed apps, their pools and the calls they run.

This module composes the parts and answers the operations; each job lives in its own module:
transport (``api``), deploys (``deploy``), running apps and their pools (``apps``, ``pool``, ``launcher``),
durable calls (``calls``), snapshot records and their policy (``snapshots``, ``snapshot_policy``).

At start it cleans up after a server that died: containers left running are killed through their cgroups,
calls that were running end with :class:`ServerRestartedError`, and queued calls are queued again.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import warmboot
from warmboot import config, protocol, validation
from warmboot.cluster import settings as cluster_settings
from warmboot.errors import (
    InputCancelledError,
    InvalidOptionError,
    NotFoundError,
    ServerError,
    ServerRestartedError,
    UnsupportedOptionError,
    WarmbootError,
)
from warmboot.server import call_log, restore_slots
from warmboot.server import deploy as deploys
from warmboot.server import scheduler as schedules
from warmboot.server.api import ApiServer
from warmboot.server.apps import RunningApp, variant_of
from warmboot.server.call_log import CallLog
from warmboot.server.calls import Call, CallBook
from warmboot.server.cluster.control import ClusterControl
from warmboot.server.db import Database
from warmboot.server.gateway import serve as gateway_server
from warmboot.server.gateway.asgi import Gateway
from warmboot.server.gateway.serve import GatewayServer
from warmboot.server.gateway.tokens import ProxyTokens
from warmboot.server.gpu_alloc import GpuAllocator
from warmboot.server.logs import LogBook
from warmboot.server.restore_slots import RestoreSlots
from warmboot.server.snapshots import SnapshotRegistry, snapshot_key
from warmboot.server.start_log import StartLog, snapshot_rows
from warmboot.server.state import AppRecord, State
from warmboot.worker import container as containers
from warmboot.worker import gpus, runtime_lib, snapshot_remote
from warmboot.worker.snapshot import SnapshotStore

log = logging.getLogger("warmboot.server")


class ControlPlane:
    """The server's state: running apps, calls, snapshots; and the operations the API answers."""

    def __init__(self, home: Path | None = None):
        self.home = home or config.home()
        _refuse_second_server(config.server_socket())  # before the clean-up below touches its containers
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        self.state = State(Database.from_env(self.home))
        self.logs = LogBook(self.home / "logs")
        store = SnapshotStore(self.home / "snapshots")
        self.snapshots = SnapshotRegistry(self.state.connection, self.state.lock, store)
        self.calls = CallBook(self.state.connection, self.state.lock)
        self.starts = StartLog(self.state.connection, self.state.lock)  #: each start's times (server.start_log)
        self.call_log = CallLog(self.state.connection, self.state.lock)  #: finished calls, for the dashboard
        self.apps: dict[str, RunningApp] = {}
        #: How many restores run at once on this host, for every app's pools (server.restore_slots).
        self.restore_slots = RestoreSlots(restore_slots.max_parallel_from_env())
        #: Object storage shared with other agents (WARMBOOT_S3_*), or None (worker/snapshot_remote.py).
        s3 = snapshot_remote.settings_from_env()
        self.remote_snapshots = snapshot_remote.RemoteSnapshots(snapshot_remote.S3Bucket(s3)) if s3 else None
        self.gpu_allocator = GpuAllocator(gpus.inventory())  #: this host's GPUs, shared by every app's pools
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.started_at = time.time()
        self.code_digest = runtime_lib.code_digest()  # what this process runs, whatever the disk says later
        self.api: ApiServer | None = None
        self.proxy_tokens = ProxyTokens(self.state.connection, self.state.lock)
        self.gateway: GatewayServer | None = None  #: the HTTP gateway, started by serve()
        self._gateway_error = "not started yet"
        self.web = Gateway(self, self.proxy_tokens, require_all=False)
        #: Agents run the containers when WARMBOOT_CLUSTER_LISTEN is set (server/cluster); else this process does.
        listen = cluster_settings.cluster_listen()
        self.cluster: ClusterControl | None = ClusterControl(self, listen) if listen else None
        self._recover()
        self.scheduler = schedules.for_plane(self)  #: started by serve(): schedules resume from the state table

    # ----- after a crash ---------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Clean up after a server that died, then bring back its apps and its unfinished calls."""
        containers.remove_leftovers(self.home / "containers", "a previous server")
        for app_id in self.state.stop_ephemeral():
            log.info("ephemeral app %s ended with the server that ran it", app_id)
        for record in self.state.running_apps():
            app = self.apps[record.app_id] = RunningApp(self, record)
            threading.Thread(target=app.start_min_containers, daemon=True).start()
        queued, interrupted = self.calls.recover(
            ServerRestartedError(
                "the server restarted while this call ran, so it did not finish (its function may have run in "
                "part); call it again"
            ),
            collect=self.cluster.collect if self.cluster is not None else None,
        )
        for call in interrupted:
            log.warning("call %s was running when the server stopped: it ends with an error", call.call_id)
        for call in queued:
            self._enqueue(call)
        if queued or interrupted:
            log.info("recovered calls: %d queued again, %d ended by the restart", len(queued), len(interrupted))

    # ----- apps --------------------------------------------------------------------------------------------

    def volume_dir(self, name: str) -> Path:
        return config.volume_dir(name, self.home)

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

    def install_app(self, record: AppRecord, *, replacing: str | None) -> RunningApp:
        """Serve a newly recorded app; the version it replaces (if any) stops in the background."""
        app = RunningApp(self, record)
        with self._lock:
            self.apps[record.app_id] = app
            old = self.apps.pop(replacing, None) if replacing else None
        if old is not None:
            threading.Thread(target=old.stop, daemon=True).start()
        self.scheduler.sync()  # the new version's schedules begin; the old version's end
        return app

    def retain_snapshots(self, app: RunningApp) -> None:
        """After a redeploy: delete the app's snapshots the new version no longer uses."""
        record = app.record
        runtime = runtime_lib.ensure(self.home).name
        keep = {
            snapshot_key(record.name, tag, fspec, Path(record.code_dir).name, runtime)
            for tag, fspec in record.spec["functions"].items()
            if fspec["options"]["enable_memory_snapshot"]
        }
        keep |= {r.key for r in self.snapshots.list() if r.app_name == record.name and variant_of(r.key, keep)}
        for key in self.snapshots.retain_only(record.name, keep):
            app.event(f"Deleted memory snapshot {key[:12]}: the new version changes what it holds")

    def secret_env(self, secrets: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        """Secrets (``Secret.to_spec()`` dicts) as environment variables: named ones read from the state now."""
        env: dict[str, str] = {}
        for secret in secrets:
            env.update(self.state.get_secret(secret["name"]) if secret.get("name") else secret["values"])
        return env

    # ----- calls -----------------------------------------------------------------------------------------

    def accept_call(
        self,
        target: protocol.Target,
        args: bytes,
        detached: bool,
        on_item: Callable[[bytes], None] | None = None,
    ) -> Call:
        """Check the target, record the call, and queue it; the call is durable from here on.

        ``on_item``: a generator call (``.remote_gen``), whose values go there as the container yields them.
        """
        app = self.running_app(app_id=target.app_id, app_name=target.app_name)
        fspec = app.function_spec(target.tag)
        if fspec["kind"] == "cls":
            if target.method is None:
                raise InvalidOptionError(
                    f"{app.record.name}.{target.tag} is a class, not a function: call one of its methods, "
                    f"Cls.from_name({app.record.name!r}, {target.tag!r})().METHOD.remote(...)"
                )
            if target.method not in fspec["lifecycle"]["methods"]:
                methods = ", ".join(fspec["lifecycle"]["methods"]) or "none"
                raise NotFoundError(
                    f"{app.record.name}.{target.tag} has no @method() named {target.method!r} (it has: {methods})"
                )
        elif target.method is not None:
            raise InvalidOptionError(f"{app.record.name}.{target.tag} is a function, not a class")
        if fspec["options"].get("gpu") and self.cluster is None:  # a cluster's placement waits for an agent that fits
            gpus.check_request(fspec["options"]["gpu"], f"{app.record.name}.{target.tag}")
        # modal.parameter() values and with_options overrides: checked now, before the call is recorded
        variant = app.variant(target.tag, target.parameters, target.options)
        recorded = variant.to_json() if variant.key != variant.tag else None
        call = self.calls.accept(target, app.record.app_id, args, detached=detached, on_item=on_item, variant=recorded)
        app_name = app.record.name
        call.when_done(lambda done: self._log_call(done, app_name))
        try:
            app.submit(variant, call)
        except (NotFoundError, UnsupportedOptionError) as exc:  # no pool for it (too many variants busy)
            call.fail(exc)  # recorded: it must end, not wait in the database forever
            raise
        return call

    def _log_call(self, call: Call, app_name: str) -> None:
        try:
            self.call_log.record(call_log.entry_for(call, app_name))
        except Exception:  # the dashboard's history must never fail a call
            log.exception("recording call %s in the call log", call.call_id)

    def _enqueue(self, call: Call) -> None:
        """Queue a recovered call on its app's pool, or end it if the app is gone."""
        with self._lock:
            app = self.apps.get(call.app_id)
        if app is None:
            call.fail(ServerRestartedError("the server restarted and this call's app is no longer running"))
            return
        try:
            app.submit(app.variant_from_json(call.tag, call.variant), call)
        except (NotFoundError, InvalidOptionError) as exc:  # the app changed under it
            call.fail(exc)

    # ----- operations (each takes its typed request; see protocol.REQUESTS) --------------------------------

    def op_ping(self, request: protocol.Ping) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": warmboot.__version__,
            "code": self.code_digest,
            "home": str(self.home),
            "started_at": self.started_at,
            "apps": len(self.apps),
            "calls_in_flight": self.calls.unfinished(),
        }

    def op_deploy(
        self, request: protocol.Deploy, emit: Callable[[str, str], None], gone: threading.Event
    ) -> dict[str, Any]:
        return deploys.deploy(self, request, lambda line: emit("log", line))

    def op_submit(self, request: protocol.Submit) -> str:
        return self.accept_call(request.target, request.args, True).call_id

    def op_cancel(self, request: protocol.Cancel) -> bool:
        """Cancel a call: a queued one ends at once, a running one's container is stopped (see ``pool.cancel``)."""
        call = self.calls.get(request.call_id)  # NotFoundError for an unknown id
        if call.done.is_set():
            return False  # finished already: like Modal, cancelling it changes nothing
        cancelled = InputCancelledError(
            f"call {call.call_id} was cancelled (FunctionCall.cancel()) before it finished; call it again to run it"
        )
        with self._lock:
            app = self.apps.get(call.app_id)
        if app is None:
            return call.fail(cancelled)
        try:
            pool = app.call_pool(call)
        except WarmbootError:  # its variant's pool is gone and no new one can be made: it is in no queue
            return call.fail(cancelled)
        return pool.cancel(call, cancelled)

    def op_app_list(self, request: protocol.AppList) -> list[dict[str, Any]]:
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
                "schedules": self.scheduler.describe(a.record.app_id),
            }
            for a in apps
        ]

    def op_app_stop(self, request: protocol.AppStop) -> str:
        app = self.running_app(app_name=request.app)
        with self._lock:
            self.apps.pop(app.record.app_id, None)
        self.state.stop_app(app.record.app_id)
        self.scheduler.sync()  # its schedules end before its pools stop
        app.event(f"Stopping app {app.record.name}")
        app.stop()
        return app.record.name

    def op_container_list(self, request: protocol.ContainerList) -> list[dict[str, Any]]:
        with self._lock:
            apps = list(self.apps.values())
        return [{"app": a.record.name, **c} for a in apps for p in list(a.pools.values()) for c in p.describe()]

    def _cluster(self) -> ClusterControl:
        if self.cluster is None:
            raise InvalidOptionError(
                "this server runs its containers itself (no cluster): set WARMBOOT_CLUSTER_LISTEN to let agents join"
            )
        return self.cluster

    def op_agent_list(self, request: protocol.AgentList) -> list[dict[str, Any]]:
        return self._cluster().book.describe()

    def op_agent_drain(self, request: protocol.AgentDrain) -> str:
        if not self._cluster().book.drain(request.name, on=not request.undo):
            raise NotFoundError(f"no live agent named {request.name!r}; `warmboot agent list` shows them")
        return request.name

    def op_secret_create(self, request: protocol.SecretCreate) -> str:
        validation.name("secret", request.name)
        values = validation.environment(f"secret {request.name}", request.values)
        self.state.put_secret(request.name, values)
        return request.name

    def op_secret_list(self, request: protocol.SecretList) -> list[dict[str, Any]]:
        return self.state.list_secrets()

    def op_logs(self, request: protocol.Logs, emit: Callable[[str, str], None], gone: threading.Event) -> None:
        name = validation.name("app", request.app)  # a name, never a path: logs/<name>.log and nothing else
        if name.startswith("ap-"):
            name = self.state.get_app(name).name
        elif not self.logs.path(name).exists():
            raise NotFoundError(f"no logs for an app named {name!r}; `warmboot app list` shows the apps")
        for line in self.logs.follow(
            name,
            from_end=request.from_end,
            follow=request.follow,
            keep_going=lambda: not (self._stop.is_set() or gone.is_set()),
        ):
            emit("line", line)

    def op_snapshot_list(self, request: protocol.SnapshotList) -> list[dict[str, Any]]:
        rows = snapshot_rows(self.snapshots, self.starts)
        if self.cluster is not None:  # a cluster's snapshots are the agents': each reports its own
            rows += self.cluster.book.snapshot_rows()
        return rows

    def op_start_log(self, request: protocol.StartLogList) -> list[dict[str, Any]]:
        return self.starts.rows(request.key)

    def op_snapshot_rm(self, request: protocol.SnapshotRm) -> dict[str, Any]:
        if not request.key.strip():
            raise InvalidOptionError(
                "snapshot rm: the key is empty; give a snapshot key (or a unique prefix of one): "
                "`warmboot snapshot list` shows them"
            )
        return vars(self.snapshots.remove(request.key))

    # ----- web endpoints ------------------------------------------------------------------------------------

    def web_endpoints(self) -> list[dict[str, Any]]:
        """Every endpoint of the running apps, with its URL (for `warmboot deploy`, `app list`, the SDK)."""
        with self._lock:
            apps = dict(self.apps)
        base = self.gateway.base_url if self.gateway is not None else None
        return [
            {
                "label": e.label,
                "app": e.app_name,
                "app_id": e.app_id,
                "function": e.tag,
                "method": e.method,
                "kind": e.kind,
                "requires_proxy_auth": e.requires_proxy_auth,
                "url": f"{base}/{e.label}" if base else None,
            }
            for e in self.web.routes.all(apps)
        ]

    def op_web_list(self, request: protocol.WebList) -> list[dict[str, Any]]:
        return self.web_endpoints()

    def op_web_url(self, request: protocol.WebUrl) -> str | None:
        target = request.target
        app = self.running_app(app_id=target.app_id, app_name=target.app_name)
        for endpoint in self.web_endpoints():
            if (
                endpoint["app_id"] == app.record.app_id
                and endpoint["function"] == target.tag
                and (endpoint["method"] == target.method)
            ):
                if endpoint["url"] is None:
                    raise ServerError(f"the HTTP gateway is not running (see the server log): {self._gateway_error}")
                return str(endpoint["url"])
        app.function_spec(target.tag)  # NotFoundError for a function the app does not have
        return None  # a function that is not a web endpoint has no URL (Modal's get_web_url() says None too)

    def op_token_create(self, request: protocol.TokenCreate) -> dict[str, Any]:
        return self.proxy_tokens.create()

    def op_token_list(self, request: protocol.TokenList) -> list[dict[str, Any]]:
        return self.proxy_tokens.list()

    def op_token_rm(self, request: protocol.TokenRm) -> str:
        self.proxy_tokens.delete(request.token_id)
        return request.token_id

    def _start_gateway(self) -> None:
        """Serve the web endpoints; a gateway that cannot start is logged, and the rest of the server runs."""
        host, port = gateway_server.settings()
        allow_public = os.environ.get("WARMBOOT_GATEWAY_ALLOW_PUBLIC") == "1"
        # Beyond loopback, every endpoint needs a token unless the operator says the gateway is public.
        self.web.require_all = not gateway_server.is_loopback(host) and not allow_public
        try:
            self.gateway = GatewayServer(self.web, host, port)
        except ServerError as exc:
            self._gateway_error = str(exc)
            log.error("%s", exc)
            return
        self.gateway.start()
        (self.home / "gateway.url").write_text(self.gateway.base_url + "\n")
        log.info("HTTP gateway listening on %s%s", self.gateway.base_url,
                 " (every endpoint needs a proxy auth token)" if self.web.require_all else "")  # fmt: skip

    def op_dashboard_url(self, request: protocol.DashboardUrl) -> str:
        """The dashboard's URL with its login token (a new token first, with ``renew``)."""
        if self.gateway is None:
            raise ServerError(f"the HTTP gateway, which serves the dashboard, is not running: {self._gateway_error}")
        token = self.web.dashboard.auth.renew() if request.renew else self.web.dashboard.auth.token
        return f"{self.gateway.base_url}/_dashboard/?token={token}"

    def op_server_stop(self, request: protocol.ServerStop) -> None:
        threading.Thread(target=self.shutdown, daemon=True).start()

    # ----- serving -------------------------------------------------------------------------------------------

    def serve(self) -> None:
        sock = config.server_socket()
        self.api = ApiServer(self, sock)

        def listening() -> None:
            (self.home / "server.pid").write_text(str(os.getpid()))
            log.info("warmboot server %s listening on %s (pid %d)", warmboot.__version__, sock, os.getpid())
            self._start_gateway()
            if self.cluster is not None:
                self.cluster.start()
            self.scheduler.start()

        self.api.serve_forever(listening)

    def shutdown(self) -> None:
        """Stop every app's containers (running their @exit hooks) and stop serving."""
        if self._stop.is_set():
            return
        self._stop.set()
        log.info("server stopping")
        self.scheduler.stop()
        if self.gateway is not None:
            self.gateway.stop()
        if self.cluster is not None:
            self.cluster.stop()
        with self._lock:
            # A cluster's containers live on the agents and outlive this process: calls they run finish there and
            # the next control plane collects them; the agents stop the idle ones when it registers them again.
            apps = list(self.apps.values()) if self.cluster is None else []
        threads = [threading.Thread(target=a.stop) for a in apps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)  # each pool waits up to 60 s for containers still starting
        with contextlib.suppress(OSError):
            config.server_socket().unlink()
        with contextlib.suppress(OSError):
            (self.home / "server.pid").unlink()
        os._exit(0)


def _refuse_second_server(sock: Path) -> None:
    """Raise if a server answers on ``sock``; remove a socket file left by a dead one."""
    if not sock.exists():
        return
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(sock))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.unlink(missing_ok=True)
    else:
        raise ServerError(f"a warmboot server is already running on {sock}")
    finally:
        probe.close()


def run_forever() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` dumps every thread's stack to the server log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plane = ControlPlane()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=plane.shutdown).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=plane.shutdown).start())
    plane.serve()
