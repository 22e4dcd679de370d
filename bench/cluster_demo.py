"""`make cluster-demo`: a warmboot cluster on this machine, and the Embedder spread over it.

What runs (all real, all local; traffic stays on loopback and inside network namespaces made here):

- a **hub** network namespace holding an S3 server (SeaweedFS), an OCI registry (Debian's docker-registry) and the
  **control plane** (``python -m warmboot.server`` with ``WARMBOOT_CLUSTER_LISTEN``), its state in a PostgreSQL
  cluster (Debian's, on a Unix socket);
- three **agents** (``python -m warmboot.agent``), each in its own network namespace (a veth on the hub's bridge)
  with its own ``WARMBOOT_HOME``.

Then, through the SDK as a user would: deploy examples/sentence_transformers_embedder.py (its image built on the
control plane, pushed to the registry, pulled by each agent); the first call boots cold on one agent and makes
the memory snapshot (pushed to S3); a fresh container restores it **on the same agent** (local); with that agent
drained, **on another agent** (fetching the snapshot first); finally an agent is **killed mid-call** and the call,
retried (``with_options(retries=1)``), runs again elsewhere. Timings are printed and written to
docs/benchmarks/cluster-demo.md.

State lives under ``WARMBOOT_CLUSTER_DEMO_HOME`` (``/var/lib/warmboot-cluster-demo``): images are kept between
runs (the first run builds the Embedder's image: minutes), snapshots and state are not.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import MODEL_DIR, MODEL_VOLUME, console, deploy_app, ensure_model_volume, load, stop_app
from rich.table import Table

from warmboot.devservices import processes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sentence_transformers_embedder.py"
DEMO_HOME = Path(os.environ.get("WARMBOOT_CLUSTER_DEMO_HOME", "/var/lib/warmboot-cluster-demo"))
AGENTS = ("agent-1", "agent-2", "agent-3")
SENTENCES = ["what is the meaning of life?"]
#: Enough sentences that embedding them takes seconds on this machine: the call is still running when its agent
#: is killed.
LONG = [f"sentence number {i} of a long batch, about nothing in particular" for i in range(1500)]
CLUSTER_PORT = 8701
AGENT_PORT = 8702
LOST_AFTER_S = "3"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def wait(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Poll ``check`` until it is true (the demo's processes tell nobody when they are ready)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"cluster demo: timed out waiting for {what}")
        time.sleep(0.05)


class Processes:
    """The demo's own processes, each logging to a file, all stopped at the end."""

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        self.running[name] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.terminate()  # all at once; then each is waited for
        for proc in self.running.values():
            processes.stop(proc, timeout=60)


def fresh_homes() -> tuple[Path, dict[str, Path]]:
    """The control plane's and agents' homes: images kept from an earlier run, everything else made new."""
    control = DEMO_HOME / "control"
    agents = {name: DEMO_HOME / name for name in AGENTS}
    for home in (control, *agents.values()):
        home.mkdir(parents=True, exist_ok=True)
        for entry in home.iterdir():
            if entry.name not in ("images", "runtime", "volumes"):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()
    return control, agents


def prebuild_image(control: Path) -> None:
    """Build the Embedder's image here, where PyPI is reachable (the hub namespace reaches nothing): the deploy
    then finds it built. Cached: a second run builds nothing."""
    from warmboot.server.images import resolve_image

    spec = load(EXAMPLE).spec()
    image = next(iter(spec["functions"].values()))["image"]
    console.print("Building the Embedder's image on the control plane (cached after the first run) ...")
    resolve_image(image, control, progress=lambda line: console.print(f"  {line}", highlight=False, markup=False))


def copy_model(agents: dict[str, Path]) -> None:
    """Volumes are per agent: each gets the model (a fleet would use a shared file system or bake it in)."""
    source = ensure_model_volume()
    for home in agents.values():
        target = home / "volumes" / MODEL_VOLUME / MODEL_DIR
        if not (target / "model.safetensors").exists():
            shutil.copytree(source, target, dirs_exist_ok=True)


def log_times(path: Path, pattern: str) -> list[datetime.datetime]:
    """The timestamps of the server log's lines that match ``pattern``."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if re.search(pattern, line) and (m := _STAMP.match(line)):
            found.append(datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"))
    return found


def started_on(log: Path, since: int) -> str:
    """The agent of the newest container start logged after line ``since`` of the control plane's log."""
    lines = log.read_text(errors="replace").splitlines()[since:]
    starts = [line for line in lines if " on agent " in line and "started for" in line]
    if not starts:
        return "?"
    return starts[-1].split(" on agent ")[1].split(" ")[0]


def found(path: Path, since: int, pattern: str) -> str:
    """The first group of ``pattern`` in the log's lines after line ``since`` ("" if none)."""
    for line in path.read_text(errors="replace").splitlines()[since:]:
        if m := re.search(pattern, line):
            return m.group(1)
    return ""


def line_count(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines()) if path.exists() else 0


@contextlib.contextmanager
def services(control: Path, agents: dict[str, Path]) -> Iterator[dict[str, Any]]:
    from warmboot.devservices import netns, postgres, registry, seaweedfs

    token = secrets.token_hex(16)
    procs = Processes()
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(netns.cluster_network(list(AGENTS), prefix="wbdemo"))
        hub = net.hub
        console.print(f"Network: hub {hub.address}, " + ", ".join(f"{n} {ns.address}" for n, ns in net.agents.items()))
        pg = stack.enter_context(postgres.cluster())
        database = postgres.create_database(pg)
        s3 = stack.enter_context(seaweedfs.s3_server(host=hub.address, argv_prefix=hub.argv(())))
        reg = stack.enter_context(
            registry.registry_server(DEMO_HOME / "registry", listen=f"{hub.address}:0", argv_prefix=hub.argv(()))
        )
        console.print(f"PostgreSQL on a Unix socket, S3 at {s3.endpoint}, registry at {reg.host}")
        stack.callback(procs.stop_all)
        base = {k: v for k, v in os.environ.items() if not k.startswith("WARMBOOT_")}
        control_env = {
            **base,
            "WARMBOOT_HOME": str(control),
            "WARMBOOT_DATABASE_URL": database,
            "WARMBOOT_CLUSTER_LISTEN": f"{hub.address}:{CLUSTER_PORT}",
            "WARMBOOT_JOIN_TOKEN": token,
            "WARMBOOT_REGISTRY": reg.host,
            "WARMBOOT_REGISTRY_INSECURE": "1",
            "WARMBOOT_AGENT_LOST_S": LOST_AFTER_S,
            "WARMBOOT_GATEWAY_PORT": "0",
        }
        server_log = control / "server.log"
        procs.start("control", hub.argv([sys.executable, "-m", "warmboot.server"]), control_env, server_log)
        wait("the control plane", lambda: (control / "server.sock").exists())
        agent_env = {}
        for name, home in agents.items():
            ns = net.agents[name]
            agent_env[name] = {
                **base,
                "WARMBOOT_HOME": str(home),
                "WARMBOOT_AGENT_NAME": name,
                "WARMBOOT_AGENT_LISTEN": f"{ns.address}:{AGENT_PORT}",
                "WARMBOOT_CONTROL_PLANE_URL": f"http://{hub.address}:{CLUSTER_PORT}",
                "WARMBOOT_JOIN_TOKEN": token,
                "WARMBOOT_S3_ENDPOINT": f"http://{s3.endpoint}",
                "WARMBOOT_S3_ACCESS_KEY": s3.access_key,
                "WARMBOOT_S3_SECRET_KEY": s3.secret_key,
                "WARMBOOT_S3_BUCKET": s3.bucket,
                "WARMBOOT_REGISTRY_INSECURE": "1",
                "WARMBOOT_SNAPSHOT_CACHE_DIR": f"/dev/shm/warmboot-demo-cache-{name}",
            }
            procs.start(name, ns.argv([sys.executable, "-m", "warmboot.agent"]), agent_env[name], home / "agent.log")
        yield {"procs": procs, "net": net, "agent_env": agent_env, "server_log": server_log}


def agent_states() -> dict[str, str]:
    from warmboot.sdk import client

    return {a["name"]: a["state"] for a in client.request("agent_list")}


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("make cluster-demo must run as root (containers, CRIU, network namespaces)")
    # A TERM (a CI timeout, `kill`) unwinds like Ctrl-C: every service and namespace made here is taken down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    control, agents = fresh_homes()
    prebuild_image(control)
    copy_model(agents)
    os.environ["WARMBOOT_HOME"] = str(control)  # the SDK and CLI below talk to the control plane
    rows: list[tuple[str, str, str]] = []
    with services(control, agents) as run:
        from warmboot.sdk import client

        procs, log = run["procs"], run["server_log"]
        wait(
            "3 agents registered", lambda: sorted(n for n, s in agent_states().items() if s == "alive") == list(AGENTS)
        )
        console.print("[bold]Agents registered:[/] " + ", ".join(AGENTS))

        app = load(EXAMPLE)
        embedder = app.registered["Embedder"]
        console.print("[bold]Deploying the Embedder[/] (image pushed to the registry) ...")
        began = time.perf_counter()
        deploy_app(EXAMPLE, app, name=app.name)
        rows.append(("deploy (build cached, push to the registry)", f"{time.perf_counter() - began:.2f} s", ""))

        def first_call(label: str, fn: Callable[[], Any]) -> tuple[float, str]:
            mark = line_count(log)
            began = time.perf_counter()
            fn()
            seconds = time.perf_counter() - began
            agent = started_on(log, mark)
            console.print(f"  {label}: {seconds:.2f} s on {agent}")
            return seconds, agent

        def fresh_container() -> None:  # no warm container: the next call starts one
            stop_app(app.name)
            deploy_app(EXAMPLE, app, name=app.name)

        call = lambda: embedder().run.remote(sentences=SENTENCES)  # noqa: E731
        # The agents' own events (images pulled, snapshots made, pushed, fetched) come with their heartbeats into
        # the app's log.
        app_log = control / "logs" / f"{app.name}.log"
        cold_s, maker = first_call("first call: cold boot + snapshot", call)
        wait("the snapshot pushed to S3", lambda: "Pushed memory snapshot" in app_log.read_text(), timeout=300)
        pulled = found(app_log, 0, r"Pulled the image of .* in ([\d.]+) s")
        rows.append(("first call: cold boot, make the snapshot", f"{cold_s:.2f} s",
                     f"{maker}: " + (f"image pull {pulled} s" if pulled else "image already there")))  # fmt: skip

        fresh_container()
        local_s, where = first_call("local restore", call)
        rows.append(("restore on the agent that made the snapshot (local)", f"{local_s:.2f} s", where))

        client.request("agent_drain", name=maker, undo=False)
        fresh_container()
        events = line_count(app_log)
        remote_s, elsewhere = first_call(f"remote restore ({maker} drained)", call)
        wait("the fetch logged", lambda: found(app_log, events, r"Restored .* in (\d+) ms \(.*fetched"))
        pulled = found(app_log, events, r"Pulled the image of .* in ([\d.]+) s")
        fetch_ms = found(app_log, events, r"from object storage in (\d+) ms")
        restore_ms = found(app_log, events, r"Restored .* in (\d+) ms")
        parts = [
            f"image pull {pulled} s" if pulled else "image already there",
            f"snapshot fetch {fetch_ms} ms",
            f"restore with the fetch {restore_ms} ms",
        ]
        rows.append(("restore on another agent, fetching the snapshot first (remote)", f"{remote_s:.2f} s",
                     f"{elsewhere}: " + ", ".join(parts)))  # fmt: skip
        client.request("agent_drain", name=maker, undo=True)

        # Failover: kill the agent running a long call; the call runs again elsewhere (retries=1).
        fresh_container()
        retrying = embedder.with_options(retries=1)
        long_s, _ = first_call("the long call, undisturbed (a warm container for the next round)",
                               lambda: retrying().run.remote(sentences=LONG))  # fmt: skip
        rows.append((f"the long call ({len(LONG)} sentences) undisturbed", f"{long_s:.2f} s", ""))
        mark = line_count(log)
        call_handle = retrying().run.spawn(sentences=LONG)

        def busy_agent() -> str:
            return next((c["agent"] for c in client.request("container_list") if c.get("busy") and c.get("agent")), "")

        victim = wait("the long call running", busy_agent)
        killed_at = datetime.datetime.now()
        began = time.perf_counter()
        processes.kill_agent(procs.running[victim], agents[victim])
        console.print(f"[bold]Killed {victim}[/] (agent and containers) while it ran the long call")
        result = call_handle.get(timeout=600)
        rerun_s = time.perf_counter() - began
        since = killed_at - datetime.timedelta(seconds=1)  # the log's clock and ours agree to the millisecond
        detected = [t for t in log_times(log, rf"agent {victim} stopped answering") if t >= since]
        lost = [t for t in log_times(log, rf"agent {victim} is lost") if t >= since]
        rerun_on = started_on(log, mark)
        detect_ms = (detected[0] - killed_at).total_seconds() * 1000 if detected else float("nan")
        lost_s = (lost[0] - killed_at).total_seconds() if lost else float("nan")
        rows.append(("kill -> the call's failure detected (connection dropped)", f"{detect_ms:.0f} ms", victim))
        rows.append((f"kill -> agent marked lost (silent {LOST_AFTER_S} s)", f"{lost_s:.2f} s", victim))
        rows.append(
            (
                "kill -> the call's result, re-run elsewhere",
                f"{rerun_s:.2f} s",
                f"{rerun_on}; {len(result)} rows; {rerun_s - long_s:+.2f} s against undisturbed (a 1 s retry delay)",
            )
        )

    table = Table(title="warmboot cluster on one machine: 3 agents, each in its own network namespace")
    for column in ("step", "time", "where"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    out = ROOT / "docs" / "benchmarks" / "cluster-demo.md"
    lines = [
        "# `make cluster-demo`",
        "",
        f"Run on {datetime.date.today()} on this machine (2 cores, 24 GiB; Linux {os.uname().release}).",
        "",
        "| step | time | where |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
    ]
    out.write_text("\n".join(lines))
    console.print(f"Written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
