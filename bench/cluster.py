"""`make bench-cluster`: a warmboot cluster on this one machine: calls per second over 3 agents against 1, and
how fast a call fails over when its agent dies mid-call.

Everything runs on loopback (127.0.0.1) on this box (2 cores, 24 GiB): a control plane (``python -m
warmboot.server`` with ``WARMBOOT_CLUSTER_LISTEN``) and agents (``python -m warmboot.agent``), each with its own
``WARMBOOT_HOME`` under one temp dir; the SDK in this process talks to the control plane through its socket.
Times of the control plane's events are its log lines' own millisecond timestamps (the same clock as ours).

1. **Throughput.** A function with ``cpu=1.0, max_containers=16`` that sleeps 0.2 s (I/O-bound: placement's CPU
   reservations, 2 containers per 2-CPU agent, limit the concurrency, not this box's cores) and returns its
   container id. Each configuration (1 agent, then 3) gets a fresh control plane and fresh agents; the app is
   deployed and warmed (rounds of one call per container slot until every slot has its container), then 24
   threads here call ``.remote()`` in a loop (a closed loop of user calls, each timed to its result; ``.map``
   would time the server's own fan-out): 3 s to fill the queue, then a 10 s window. Calls/s = calls completed in
   the window / 10 s; latency percentiles over the calls started in it. Containers per agent come from the
   control plane's log (``Container wc-... started for APP.FUNC on agent NAME``), calls per agent from the
   container ids returned.
2. **Failover.** A function with ``retries=1`` (Modal's meaning: one retry after a fixed 1 s) that writes a marker
   (its container id) into the volume ``marks`` (per agent: ``<agent home>/volumes/marks/``), then sleeps 3 s;
   2 agents, the default heartbeat (1 s) and loss timeout (``WARMBOOT_AGENT_LOST_S``, 5 s). Each round:
   ``.spawn()``; wait for the marker (polled with a deadline), which names the agent running the call; t0;
   SIGKILL that agent and kill its containers (their cgroups: ``container.remove_leftovers``); then t0 -> the control
   plane's ``agent NAME stopped answering`` (the connection dropped), t0 -> ``agent NAME is lost`` (heartbeats
   missed), t0 -> the re-run's ``Container ... started`` on the other agent, t0 -> ``FunctionCall.get()``
   returning (minus the 3 s of work: the failover's overhead). The killed agent is restarted (same name, same
   home) and waited for before the next round.

Writes docs/benchmarks/cluster.{json,md}. Usage: ``.venv/bin/python bench/cluster.py [--load-s S] [--rounds N]``
(as root). Takes about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from harness import console, deploy_app, load
from rich.table import Table

from warmboot.devservices import processes
from warmboot.sdk import client
from warmboot.worker import container

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"
MACHINE = "this machine: 2 cores, 24 GiB, every agent on 127.0.0.1"
CALLERS = 24
WORK_S = 0.2
RAMP_S = 3.0  #: load before the measured window: 24 callers on 2 containers queue 2.4 s deep
FAILOVER_WORK_S = 3.0
LOST_AFTER_S = 5.0  #: the default WARMBOOT_AGENT_LOST_S (not set here)

THROUGHPUT_APP = f"""
import os, time
import warmboot as modal

app = modal.App("bench-cluster-throughput")


@app.function(cpu=1.0, max_containers=16)
def wait(x):
    time.sleep({WORK_S})
    return os.environ["WARMBOOT_CONTAINER_ID"]
"""
FAILOVER_APP = f"""
import os, pathlib, time
import warmboot as modal

app = modal.App("bench-cluster-failover")
marks = modal.Volume.from_name("marks", create_if_missing=True)


@app.function(retries=1, volumes={{"/marks": marks}})
def work(x):
    pathlib.Path(f"/marks/{{x}}").write_text(os.environ["WARMBOOT_CONTAINER_ID"])
    time.sleep({FAILOVER_WORK_S})
    return os.environ["WARMBOOT_CONTAINER_ID"]
"""
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")
_RETRY = re.compile(r"runs again in ([\d.]+) s")
_STARTED = re.compile(r"Container (wc-\w+) started for \S+ on agent (\S+) \((cold boot|restored) in ([\d.]+) s")


def wait(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll ``check`` (every 5 ms) until it returns something true; the other processes tell us nothing."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return value


class Cluster:
    """A control plane and its agents on loopback, all under one temp dir; :meth:`close` stops and removes all."""

    def __init__(self, root: Path):
        self.root = Path(tempfile.mkdtemp(prefix="cl-", dir=root))
        self.token = secrets.token_hex(16)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.home = self.root / "control"
        self.log_path = self.home / "control.log"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.base = {k: v for k, v in os.environ.items() if not k.startswith("WARMBOOT_")}

    def _spawn(self, name: str, module: str, home: Path, env: dict[str, str]) -> None:
        home.mkdir(parents=True, exist_ok=True)
        with open(home / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", module],
                env={**self.base, "WARMBOOT_HOME": str(home), **env},
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C here reaches us only: the finally stops them in order
            )

    def start(self, agents: list[str]) -> Cluster:
        self._spawn("control", "warmboot.server", self.home, {
            "WARMBOOT_CLUSTER_LISTEN": f"127.0.0.1:{self.port}", "WARMBOOT_JOIN_TOKEN": self.token,
            "WARMBOOT_GATEWAY_PORT": "0",
        })  # fmt: skip
        wait("the control plane", lambda: (self.home / "server.sock").exists() or self.procs["control"].poll())
        if self.procs["control"].poll() is not None:
            raise RuntimeError(f"the control plane exited:\n{self.log_path.read_text()[-3000:]}")
        os.environ["WARMBOOT_HOME"] = str(self.home)  # the SDK below talks to this control plane
        for name in agents:
            self.start_agent(name)
        return self

    def agent_home(self, name: str) -> Path:
        return self.root / name

    def start_agent(self, name: str) -> None:
        self._spawn(name, "warmboot.agent", self.agent_home(name), {
            "WARMBOOT_AGENT_NAME": name, "WARMBOOT_CONTROL_PLANE_URL": f"http://127.0.0.1:{self.port}",
            "WARMBOOT_JOIN_TOKEN": self.token,
        })  # fmt: skip

        def alive() -> bool:
            if self.procs[name].poll() is not None:
                log = (self.agent_home(name) / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"agent {name} exited:\n{log}")
            return self.agents().get(name, {}).get("state") == "alive"

        wait(f"agent {name} alive", alive)

    def agents(self) -> dict[str, dict[str, Any]]:
        return {a["name"]: a for a in client.request("agent_list")}

    def kill_agent(self, name: str) -> None:
        """The machine dies: the agent SIGKILLed, then its containers (their cgroups)."""
        processes.kill_agent(self.procs[name], self.agent_home(name))

    def log(self) -> list[tuple[datetime.datetime, str]]:
        """The control plane's log lines with their timestamps (continuation lines skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if m := _LINE.match(line):
                out.append((datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), m.group(2)))
        return out

    def logged(self, text: str, after: datetime.datetime) -> list[tuple[datetime.datetime, str]]:
        """The control plane's log lines with ``text`` logged at or after ``after`` (to its millisecond)."""
        after -= datetime.timedelta(microseconds=after.microsecond % 1000)
        return [(t, line) for t, line in self.log() if t >= after and text in line]

    def starts(self) -> dict[str, dict[str, Any]]:
        """Every container start in the log: container id -> agent, how and how long."""
        found = {}
        for at, line in self.log():
            if m := _STARTED.search(line):
                found[m.group(1)] = {"agent": m.group(2), "how": m.group(3), "boot_s": float(m.group(4)), "at": at}
        return found

    def close(self) -> None:
        agents = [n for n in self.procs if n != "control"]
        for name in [*agents, "control"]:  # agents first: the control plane then has nothing in flight
            processes.stop(self.procs[name])
        for name in agents:
            container.remove_leftovers(self.agent_home(name) / "containers", f"agent {name}")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def cluster(root: Path, agents: list[str]) -> Iterator[Cluster]:
    c = Cluster(root)
    try:
        yield c.start(agents)
    finally:
        c.close()


def deploy(root: Path, source: str, stem: str) -> Any:
    path = root / f"{stem}.py"
    path.write_text(source)
    app = load(path)
    deploy_app(path, app, name=app.name)
    return app


def calls(fn: Any, callers: int, *, deadline: float = float("inf"), each: int = 1 << 30) -> tuple[list, list]:
    """``callers`` threads, each calling ``fn.remote(i)`` ``each`` times or until ``deadline`` (perf_counter):
    (start, end, container) of every call, and the errors (a caller that meets one stops)."""
    done: list[tuple[float, float, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def caller(i: int) -> None:
        for _ in range(each):
            began = time.perf_counter()
            if stop.is_set() or began >= deadline:
                return
            try:
                container = fn.remote(i)
            except Exception as exc:  # noqa: BLE001 - reported, not raised: the others go on
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            done.append((began, time.perf_counter(), container))

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(callers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:  # on Ctrl-C: no new calls, and none still calling when the cluster stops
        stop.set()
        for t in threads:
            t.join(timeout=30)
    return done, errors


def throughput(root: Path, agents: list[str], load_s: float) -> dict[str, Any]:
    with cluster(root, agents) as c:
        slots = sum(int(a["cpus"] // 1.0) for a in c.agents().values())
        fn = deploy(c.root, THROUGHPUT_APP, "throughput").registered["wait"]
        warm: set[str] = set()
        began = time.perf_counter()
        while len(warm) < slots:  # one call per slot, until every slot has its container
            if time.perf_counter() - began > 120:
                raise TimeoutError(f"only {len(warm)} of {slots} containers after 120 s of warm-up")
            done, errors = calls(fn, slots, each=1)
            if errors:
                raise RuntimeError(f"warm-up call failed: {errors[0]}")
            warm |= {container for *_, container in done}
        warmup_s = time.perf_counter() - began
        console.print(f"  {len(agents)} agent(s): {slots} containers warm in {warmup_s:.1f} s; driving {CALLERS} "
                      f"callers for {load_s:.0f} s ...")  # fmt: skip
        window = time.perf_counter() + RAMP_S  # the first RAMP_S s only fill the queue: not counted
        deadline = window + load_s
        done, errors = calls(fn, CALLERS, deadline=deadline)
        counted = [(b, e, cid) for b, e, cid in done if window <= e <= deadline]  # completed in the window
        latency = [e - b for b, e, _ in done if window <= b]  # started in it (finished, maybe after it)
        starts = c.starts()
    per_agent = Counter(s["agent"] for s in starts.values())
    served = Counter(starts.get(cid, {}).get("agent", "?") for *_, cid in counted)
    return {
        "agents": len(agents),
        "container_slots": slots,
        "warmup_s": round(warmup_s, 2),
        "calls": len(counted),
        "latency_calls": len(latency),
        "calls_per_s": round(len(counted) / load_s, 2),
        "p50_ms": round(float(np.percentile(latency, 50)) * 1000, 1) if latency else None,
        "p95_ms": round(float(np.percentile(latency, 95)) * 1000, 1) if latency else None,
        "containers_started_per_agent": dict(sorted(per_agent.items())),
        "calls_per_agent": dict(sorted(served.items())),
        "containers_serving": len({cid for *_, cid in counted}),
        "errors": errors,
    }


def failover(root: Path, rounds: int) -> list[dict[str, Any]]:
    names = ["agent-1", "agent-2"]
    runs = []
    with cluster(root, names) as c:
        fn = deploy(c.root, FAILOVER_APP, "failover").registered["work"]
        for r in range(rounds):
            x = f"round-{r}-{secrets.token_hex(3)}"
            handle = fn.spawn(x)
            marks = {n: c.agent_home(n) / "volumes" / "marks" / x for n in names}
            victim = wait(f"round {r}'s marker", lambda m=marks: next((n for n, p in m.items() if p.exists()), None))
            t0 = datetime.datetime.now()
            p0 = time.perf_counter()
            c.kill_agent(victim)
            kill_ms = (time.perf_counter() - p0) * 1000
            result = handle.get(timeout=120)
            result_s = time.perf_counter() - p0

            lost = wait(f"agent {victim} lost", lambda v=victim, t=t0: c.logged(f"agent {v} is lost", t), timeout=30)
            dropped = c.logged(f"agent {victim} stopped answering", t0)
            again = c.logged("runs again in", t0)
            starts = c.starts()
            first = marks[victim].read_text()
            rerun = starts.get(result, {})
            run = {
                "victim": victim,
                "container_killed": first,
                "killed_container_started_on": starts.get(first, {}).get("agent"),
                "kill_ms": round(kill_ms, 1),
                "detected_ms": round((dropped[0][0] - t0).total_seconds() * 1000, 1) if dropped else None,
                "lost_s": round((lost[0][0] - t0).total_seconds(), 3),
                "retry_delay_s": float(_RETRY.search(again[0][1]).group(1)) if again else None,
                "starts_refused_by_the_dead_agent": len(c.logged(f"Agent {victim} did not start a container", t0)),
                "result_s": round(result_s, 3),
                "rerun_overhead_s": round(result_s - FAILOVER_WORK_S, 3),
                "rerun_started_s": round((rerun["at"] - t0).total_seconds(), 3) if rerun else None,
                "rerun_on": rerun.get("agent"),
                "rerun_how": rerun.get("how"),  # cold boot or restored
                "rerun_boot_s": rerun.get("boot_s"),
            }
            runs.append(run)
            console.print(f"  round {r + 1}/{rounds}: killed {victim}; failure seen {run['detected_ms']} ms, lost "
                          f"{run['lost_s']:.2f} s, result {result_s:.2f} s (re-run on {run['rerun_on']}, "
                          f"{run['rerun_how']} in {run['rerun_boot_s']} s)")  # fmt: skip
            c.start_agent(victim)
    return runs


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-s", type=float, default=10.0, help="seconds of load per configuration (10)")
    parser.add_argument("--rounds", type=int, default=5, help="failover rounds (5)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/cluster.py must run as root (containers, cgroups)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `kill` cleans up too, as Ctrl-C does
    root = Path(tempfile.mkdtemp(prefix="warmboot-bench-cluster-", dir="/var/tmp"))
    began = time.perf_counter()
    try:
        console.print(f"[bold]Throughput[/] ({MACHINE})")
        one = throughput(root, ["agent-1"], args.load_s)
        three = throughput(root, ["agent-1", "agent-2", "agent-3"], args.load_s)
        console.print(f"[bold]Failover[/]: {args.rounds} rounds, 2 agents")
        runs = failover(root, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        os.environ.pop("WARMBOOT_HOME", None)
    memory_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    settings = {
        "callers": CALLERS,
        "ramp_s": RAMP_S,
        "load_s": args.load_s,
        "work_s": WORK_S,
        "cpu": 1.0,
        "max_containers": 16,
    }
    settings |= {"heartbeat_s": 1.0, "lost_after_s": LOST_AFTER_S, "failover_work_s": FAILOVER_WORK_S}
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(memory_gib, 1), "kernel": platform.release()},
        "settings": {**settings, "rounds": args.rounds},
        "throughput": {
            "one_agent": one,
            "three_agents": three,
            "ratio": round(three["calls_per_s"] / one["calls_per_s"], 2) if one["calls_per_s"] else None,
        },
        "failover": {"median": {k: median(runs, k) for k in FAILOVER_KEYS}, "runs": runs},
        "wall_s": round(time.perf_counter() - began, 1),
    }
    print_tables(results)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "cluster.json").write_text(json.dumps(results, indent=1) + "\n")
    (OUT_DIR / "cluster.md").write_text(markdown(results))
    console.print(f"Written docs/benchmarks/cluster.json and cluster.md ({results['wall_s']:.0f} s in all)")


def _per_agent(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


def throughput_rows(r: dict[str, Any]) -> list[list[str]]:
    return [
        [f"{t['agents']} agent(s), {t['container_slots']} containers", f"{t['calls_per_s']:.1f}", f"{t['p50_ms']:.0f}",
         f"{t['p95_ms']:.0f}", _per_agent(t["containers_started_per_agent"]), _per_agent(t["calls_per_agent"]),
         str(len(t["errors"]))]
        for t in (r["throughput"]["one_agent"], r["throughput"]["three_agents"])
    ]  # fmt: skip


THROUGHPUT_COLUMNS = ["configuration", "calls/s", "p50 ms", "p95 ms", "containers started", "calls served", "errors"]
FAILOVER_COLUMNS = ["round", "killed", "failure seen", "lost", "retry delay", "re-run started", "result", "overhead",
                    "re-run on"]  # fmt: skip
FAILOVER_KEYS = ("kill_ms", "detected_ms", "lost_s", "rerun_started_s", "result_s", "rerun_overhead_s")


def failover_rows(r: dict[str, Any]) -> list[list[str]]:
    def row(label: str, f: dict[str, Any], victim: str, delay: str, on: str) -> list[str]:
        detected = "n/a" if f["detected_ms"] is None else f"{f['detected_ms']:.0f} ms"
        started = "n/a" if f["rerun_started_s"] is None else f"{f['rerun_started_s']:.2f} s"
        return [label, victim, detected, f"{f['lost_s']:.2f} s", delay, started, f"{f['result_s']:.2f} s",
                f"{f['rerun_overhead_s']:.2f} s", on]  # fmt: skip

    rows = []
    for i, f in enumerate(r["failover"]["runs"]):
        refused = f["starts_refused_by_the_dead_agent"]
        on = (
            f"{f['rerun_on']} ({f['rerun_how']} {f['rerun_boot_s']:.2f} s"
            + (f", {refused} refused" * bool(refused))
            + ")"
        )
        rows.append(row(str(i + 1), f, f["victim"], f"{f['retry_delay_s']:g} s", on))
    return [*rows, row("median", r["failover"]["median"], "", "", "")]


def print_tables(r: dict[str, Any]) -> None:
    for title, columns, rows in (
        (f"Calls/s, {CALLERS} callers, 0.2 s calls, cpu=1.0 ({MACHINE})", THROUGHPUT_COLUMNS, throughput_rows(r)),
        (
            "Failover of a 3 s call whose agent is killed (2 agents, retries=1; times from the kill)",
            FAILOVER_COLUMNS,
            failover_rows(r),
        ),
    ):
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    console.print(f"3 agents / 1 agent: [bold]{r['throughput']['ratio']}x[/] the calls per second")


def md_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns), *(f"| {' | '.join(row)} |" for row in rows)]


def markdown(r: dict[str, Any]) -> str:
    t, s, m = r["throughput"], r["settings"], r["failover"]["median"]
    work = f"{s['failover_work_s']:.0f} s"
    return "\n".join([
        "# A cluster on one machine: throughput over agents, and failover",
        "",
        f"Measured {r['date']} by `bench/cluster.py` (`make bench-cluster`, {r['wall_s']:.0f} s) on {MACHINE} "
        f"(Linux {r['machine']['kernel']}). A control plane (`python -m warmboot.server` with "
        "`WARMBOOT_CLUSTER_LISTEN`) and agents (`python -m warmboot.agent`), each with its own `WARMBOOT_HOME`, "
        "all on loopback and sharing these 2 cores: a real cluster's agents would each have their own machine, "
        "and a dead machine would not refuse connections at once as a dead process on loopback does.",
        "",
        "## Calls per second: 3 agents against 1",
        "",
        f"A function with `cpu=1.0, max_containers=16` that sleeps {s['work_s']} s and returns its container id: "
        "placement reserves 1 CPU per container, so each 2-CPU agent runs 2 containers (the sleep is I/O-bound: "
        "the reservations, not the cores, limit the concurrency). Each configuration gets a fresh control plane "
        "and fresh agents; the app is deployed and warmed (rounds of one call per container slot until every slot "
        f"has its container). Then {s['callers']} threads in one process call `.remote()` in a loop (a closed "
        f"loop of user calls; `.map` would time the server's own fan-out instead): {s['ramp_s']:.0f} s to fill "
        f"the queue, then a {s['load_s']:.0f} s window. calls/s = calls completed in the window / its length; "
        "latency (`.remote()` to its result) of the calls started in it. Containers started per agent come from "
        "the control plane's log (`Container ... started for ... on agent NAME`, warm-up included), calls served "
        "per agent (in the window) from the container ids returned.",
        "",
        *md_table(THROUGHPUT_COLUMNS, throughput_rows(r)),
        "",
        f"3 agents give **{t['ratio']}x** the calls per second of 1 (ideal: 3x, 6 containers against 2, each at "
        f"most {1 / s['work_s']:.0f} calls/s).",
        "",
        "## Failover: the agent running a call is killed (times from the kill)",
        "",
        f"A function with `retries=1` that writes a marker into the volume `marks` and sleeps {work}; 2 agents, "
        f"heartbeat {s['heartbeat_s']:g} s, `WARMBOOT_AGENT_LOST_S` {s['lost_after_s']:g} s (the defaults). Each "
        "round: `.spawn()`, wait for the marker in an agent's volume (polled with a deadline; it names the agent "
        "running the call), t0, SIGKILL that agent and kill its containers' cgroups (median "
        f"{m['kill_ms']:.0f} ms). From t0: *failure seen*, the control plane's `agent NAME stopped answering while "
        "container ... ran call ...` (the connection dropped); *lost*, its `agent NAME is lost: silent for N s` "
        "(5 s after the last heartbeat, which came up to 1 s before the kill; checked every 0.5 s); *retry delay*, "
        "from its `Call ... runs again in N s` (`retries=1` means Modal's "
        "fixed 1 s delay); *re-run started*, its `Container ... started for ... on agent OTHER` line; *result*, "
        f"`FunctionCall.get()` returning; *overhead* = result - {work} of work. Log times are the lines' "
        "millisecond timestamps (the same clock as t0). The killed agent is restarted (same name and home) and "
        "waited for before the next round. *Re-run on*: the other agent, how its container started (from the same log "
        "line), and how many container starts for the retry went first to the dead agent, not yet marked lost, and "
        "were refused (`Agent NAME did not start a container for ...: ... Connection refused`).",
        "",
        *md_table(FAILOVER_COLUMNS, failover_rows(r)),
        "",
        f"Medians: the failure is seen {m['detected_ms']:.0f} ms after the kill, the re-run's container has "
        f"started {m['rerun_started_s']:.2f} s after it and the result arrives {m['result_s']:.2f} s after it "
        f"({m['rerun_overhead_s']:.2f} s more than the work, mostly the retry delay); the agent is marked lost "
        f"after {m['lost_s']:.2f} s, which the retry does not wait for.",
        "",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
