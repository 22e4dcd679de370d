"""`make bench`: cold boot versus memory-snapshot restore, through the real SDK, from `.remote()` to the result.

Workloads (app files under bench/workloads/, W2 is examples/sentence_transformers_embedder.py itself):

- W0 hello: a function with no imports;
- W1 `import torch` (the CPU build) and a small MLP forward pass;
- W2 the reference's Embedder: sentence-transformers all-MiniLM-L6-v2 loaded from a Volume, one embedding;
- W3 4 and 8 simultaneous cold calls of W2 (`.spawn()` all, then `.get()` each): time to the last result.

Each workload is deployed once after its old snapshots are deleted, so its first call is a cold boot that makes
the memory snapshot (its size and creation time come from the server's snapshot records). Then, alternating,
with no warm container left before any timed call:

- cold boot (snapshots off): the app run ephemerally (as `warmboot run` does, which never snapshots), one timed
  call, app stopped;
- restore (snapshots on): the deployed app redeployed unchanged (same snapshot, no container), one timed call,
  app stopped. The server runs with ``WARMBOOT_RESTORE_ALWAYS=1``: left to itself it boots a function cold where
  its measured cold boots are faster (W0's can be, once disk-cold restores are among its samples).

A second pass repeats W0-W2 with the page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`) right before each
timed call: the disk-cold case. The server's log lines of every run (restore, cold boot, first input) are kept,
and one W2 restore (the median run) is broken down into its phases as the server recorded them (its start log:
checks, CRIU restore, cgroup join, START to READY, first call).

Writes docs/benchmarks/cold-starts.{json,md,png} and the README's Benchmarks section; prints the table and
which targets were met. Usage: `.venv/bin/python bench/cold_starts.py [--runs N] [--quick]` (as root).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from harness import app_log, console, deploy_app, ensure_model_volume, load, snapshot_records, stop_app
from raw_baseline import restore_and_call

from warmboot import config
from warmboot.errors import NotFoundError
from warmboot.sdk import client
from warmboot.sdk.app import App
from warmboot.worker import runtime_lib
from warmboot.worker.snapshot import SnapshotStore

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS_DIR = ROOT / "bench" / "workloads"
OUT_DIR = ROOT / "docs" / "benchmarks"
QUICK_OUT_DIR = Path("/var/tmp/warmboot-bench-quick")
README = ROOT / "README.md"
README_BEGIN = "<!-- cold-starts:begin (written by bench/cold_starts.py) -->"
README_END = "<!-- cold-starts:end -->"
MIN_RUNS = 5
W3_COLD_RUNS_FIRST = 3  #: W3 cold runs always made; more only while they fit --budget-s
SENTENCES = ["what is the meaning of life?"]
DISK_COLD = "disk-cold (page cache dropped)"
WARM = "page cache warm"
CALL_TIMEOUT_S = 300.0

RESTORED_RE = re.compile(
    r"Restored (?P<label>\S+) from memory snapshot in (?P<total>\d+) ms \(container (?P<container>wc-\w+): "
    r"(?:fetched from object storage \d+ ms, )?checks (?P<checks>\d+) ms, CRIU restore (?P<criu>\d+) ms, "
    r"@enter\(snap=False\) and runtime (?P<start>\d+) ms\)"
)
COLD_RE = re.compile(r"Container (?P<container>wc-\w+) started for (?P<label>\S+) \(cold boot in (?P<boot>[\d.]+) s\)")
FIRST_RE = re.compile(r"First input on container (?P<container>wc-\w+) took (?P<first>\d+) ms")
FAILED_RESTORE_RE = re.compile(r"Restore of \S+ from memory snapshot \S+ failed")


# ----- workloads -----------------------------------------------------------------------------------------------


@dataclass
class Workload:
    key: str
    title: str
    path: Path
    tag: str  #: the function's or class's name
    method: str | None = None  #: for classes: the @method called
    kwargs: dict[str, Any] = field(default_factory=dict)
    app: App | None = None
    reference: Any = None

    @property
    def name(self) -> str:
        assert self.app is not None and self.app.name
        return self.app.name

    @property
    def cold_name(self) -> str:
        return f"{self.name}-cold"

    def invocable(self) -> Any:
        assert self.app is not None
        target = self.app.registered[self.tag]
        return getattr(target(), self.method) if self.method else target

    def remote(self) -> Any:
        return self.invocable().remote(**self.kwargs)

    def spawn(self) -> Any:
        return self.invocable().spawn(**self.kwargs)


WORKLOADS = [
    Workload("W0", "hello (no imports)", WORKLOADS_DIR / "w0_hello.py", "hello"),
    Workload("W1", "import torch + MLP forward (CPU)", WORKLOADS_DIR / "w1_torch_mlp.py", "forward"),
    Workload(
        "W2",
        "Embedder: all-MiniLM-L6-v2 from a Volume, one embedding",
        ROOT / "examples" / "sentence_transformers_embedder.py",
        "Embedder",
        method="run",
        kwargs={"sentences": SENTENCES},
    ),
]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, str | int) or a is None:
        return a == b
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=1e-4))


# ----- statistics ----------------------------------------------------------------------------------------------


def p95(values: list[float]) -> float:
    """The 95th percentile, linearly interpolated (with 5 runs: between the two slowest)."""
    return float(np.percentile(values, 95))


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "runs_s": [round(v, 4) for v in values],
        "n": len(values),
        "median_s": round(statistics.median(values), 4),
        "p95_s": round(p95(values), 4),
        "min_s": round(min(values), 4),
        "max_s": round(max(values), 4),
    }


# ----- the platform --------------------------------------------------------------------------------------------


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def stop_quietly(name: str) -> None:
    """Stop every running app (deployed or ephemeral) named ``name``."""
    for app in client.request("app_list"):
        if app["name"] == name:
            with contextlib.suppress(NotFoundError):
                stop_app(app["app_id"])


def fresh_server() -> dict[str, Any]:
    """The server's ping, after (re)starting it with ``WARMBOOT_RESTORE_ALWAYS=1``.

    A benchmark times restores and cold boots on purpose, so the server must not swap one for the other (it boots
    a function cold when its measured cold boots are faster, and a disk-cold pass makes restores look slow); and
    a server left running from before an edit would run other code than this tree's.
    """
    os.environ["WARMBOOT_RESTORE_ALWAYS"] = "1"
    with contextlib.suppress(Exception):
        client.request("server_stop")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client.connect_existing().close()
        except (FileNotFoundError, ConnectionRefusedError):
            break
        time.sleep(0.1)
    client.ensure_server()
    ping = client.request("ping")
    if ping["code"] != runtime_lib.code_digest():
        raise SystemExit("the warmboot server that answers runs other code than this tree; stop it and retry")
    return ping


def snapshot_of(w: Workload) -> dict[str, Any] | None:
    records = [r for r in snapshot_records(w.name) if r["state"] == "ok"]
    return records[0] if records else None


def manifest_of(snapshot_id: str) -> dict[str, Any]:
    """The snapshot's manifest, as the store wrote it (its sizes, the container's RSS when it was dumped)."""
    return json.loads((config.home() / "snapshots" / snapshot_id / "manifest.json").read_text())


def disk_bytes(snapshot_id: str) -> int:
    """Bytes the snapshot's files take on disk (allocated blocks)."""
    root = config.home() / "snapshots" / snapshot_id
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def log_events(lines: list[str]) -> dict[str, Any]:
    """What the server logged about containers in ``lines``: restores, cold boots, first inputs, failures."""
    restores, boots, firsts, failures = [], [], {}, []
    for line in lines:
        if m := RESTORED_RE.search(line):
            restores.append(
                {
                    "container": m["container"],
                    "restore_ms": int(m["total"]),
                    "checks_ms": int(m["checks"]),
                    "criu_restore_ms": int(m["criu"]),
                    "enter_and_runtime_ms": int(m["start"]),
                }
            )
        elif m := COLD_RE.search(line):
            boots.append({"container": m["container"], "cold_boot_ms": round(float(m["boot"]) * 1000)})
        elif m := FIRST_RE.search(line):
            firsts[m["container"]] = int(m["first"])
        elif FAILED_RESTORE_RE.search(line):
            failures.append(line)
    for entry in restores + boots:
        entry["first_input_ms"] = firsts.get(entry["container"])
    return {"restores": restores, "cold_boots": boots, "failed_restores": failures}


class LogCursor:
    """The lines an app's log gained since the cursor was made."""

    def __init__(self, app_name: str):
        self.app_name = app_name
        self.start = self._count()

    def _count(self) -> int:
        try:
            return len(app_log(self.app_name))
        except NotFoundError:
            return 0

    def new_lines(self) -> list[str]:
        try:
            return app_log(self.app_name)[self.start :]
        except NotFoundError:
            return []


# ----- one run -------------------------------------------------------------------------------------------------


def timed_call(w: Workload, *, n_calls: int) -> dict[str, Any]:
    """``n_calls == 1``: one ``.remote()``; otherwise spawn them all at once and wait for every result."""
    if n_calls == 1:
        started = time.perf_counter()
        value = w.remote()
        seconds = time.perf_counter() - started
        if not same(value, w.reference):
            raise AssertionError(f"{w.key}: the result differs from the first call's")
        return {"seconds": seconds}
    started = time.perf_counter()
    handles = [w.spawn() for _ in range(n_calls)]
    spawned = time.perf_counter() - started

    def wait(handle: Any) -> float:
        value = handle.get(timeout=CALL_TIMEOUT_S)
        seconds = time.perf_counter() - started
        if not same(value, w.reference):
            raise AssertionError(f"{w.key}: a result differs from the first call's")
        return seconds

    with concurrent.futures.ThreadPoolExecutor(n_calls) as pool:
        results = sorted(pool.map(wait, handles))
    return {"seconds": results[-1], "results_s": [round(r, 4) for r in results], "spawn_s": round(spawned, 4)}


def run_once(w: Workload, kind: str, *, n_calls: int = 1, disk_cold: bool = False) -> dict[str, Any]:
    """One timed cold start (``kind`` "cold" or "restore"), from no container to the result(s)."""
    name = w.cold_name if kind == "cold" else w.name
    wall_started = time.perf_counter()
    before = snapshot_of(w)
    cursor = LogCursor(name)
    app_id = deploy_app(w.path, w.app, name=name, ephemeral=kind == "cold")  # restore: an unchanged redeploy
    try:
        if disk_cold:
            drop_caches()
        run = timed_call(w, n_calls=n_calls)
    finally:
        stop_app(app_id)  # synchronous: every container is gone before the next run
    run["log"] = log_events(cursor.new_lines())
    run["wall_s"] = round(time.perf_counter() - wall_started, 3)  # deploy, call, stop: what the run cost
    if kind == "restore":
        after = snapshot_of(w)
        if after is not None:
            # Each restore's phases, as the server recorded them (server/start_log.py): the breakdown reads these.
            mine = {entry["container"] for entry in run["log"]["restores"]}
            run["starts"] = [s for s in client.request("start_log", key=after["key"]) if s["container_id"] in mine]
        restored = after is not None and before is not None and after["restores"] - before["restores"]
        run["restored_containers"] = restored or 0
        # A burst of calls may be served by fewer containers than calls (restores run a few at a time, and a
        # start is dropped when ready containers took its calls: server/restore_slots.py); none may boot cold.
        if not run["restored_containers"] or run["log"]["cold_boots"]:
            console.print(
                f"[yellow]warning:[/] {w.key} restore run: {len(run['log']['cold_boots'])} container(s) booted cold "
                f"({run['restored_containers']} restored); {run['log']['failed_restores'] or 'see the app log'}"
            )
    return run


def prepare(w: Workload) -> dict[str, Any]:
    """Deploy ``w`` with no snapshot; its first call is a cold boot that makes one."""
    w.app = load(w.path)
    stop_quietly(w.name)
    stop_quietly(w.cold_name)
    for record in snapshot_records(w.name):
        with contextlib.suppress(NotFoundError):
            client.request("snapshot_rm", key=record["key"])
    cursor = LogCursor(w.name)
    deploy_app(w.path, w.app, name=w.name)
    started = time.perf_counter()
    w.reference = w.remote()
    first_call = time.perf_counter() - started
    stop_app(w.name)
    record = snapshot_of(w)
    if record is None:
        raise SystemExit(
            f"{w.key}: the first call of the deployed {w.name} made no memory snapshot; "
            f"see `warmboot logs {w.name}` and `warmboot snapshot list`"
        )
    snapshot = {
        "size_bytes": record["size_bytes"],
        "disk_bytes": disk_bytes(record["snapshot_id"]),
        "create_seconds": round(record["create_seconds"], 4),
        "rss_bytes": manifest_of(record["snapshot_id"]).get("rss_bytes"),
    }
    console.print(
        f"[bold]{w.key}[/] {w.title}: first call {first_call:.2f} s (cold boot + snapshot: "
        f"{snapshot['size_bytes'] / 1e6:.0f} MB made in {snapshot['create_seconds']:.2f} s)"
    )
    log = log_events(cursor.new_lines())
    return {"first_call_s": round(first_call, 4), "snapshot": snapshot, "first_call_log": log}


def measure(
    w: Workload,
    *,
    cold_runs: int,
    restore_runs: int,
    n_calls: int = 1,
    disk_cold: bool = False,
    label: str,
    after_restore: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Alternating cold and restore runs (so drift on the host hits both alike); ``after_restore(i)`` runs after
    the i-th restore run (the raw baseline, interleaved for the same reason)."""
    runs: dict[str, list[dict[str, Any]]] = {"cold": [], "restore": []}
    for i in range(max(cold_runs, restore_runs)):
        for kind, wanted in (("cold", cold_runs), ("restore", restore_runs)):
            if i >= wanted:
                continue
            run = run_once(w, kind, n_calls=n_calls, disk_cold=disk_cold)
            runs[kind].append(run)
            say_run(label, kind, i + 1, wanted, run)
            if kind == "restore" and after_restore is not None:
                after_restore(i)
    return summarize(runs)


def say_run(label: str, kind: str, i: int, wanted: int, run: dict[str, Any]) -> None:
    extra = f" (results at {', '.join(f'{s:.2f}' for s in run['results_s'])} s)" if "results_s" in run else ""
    console.print(f"  {label} {kind:7} {i}/{wanted}: {run['seconds']:.3f} s{extra}")


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, kind_runs in runs.items():
        out[kind] = {**summary([r["seconds"] for r in kind_runs]), "details": kind_runs}
    out["speedup"] = round(out["cold"]["median_s"] / out["restore"]["median_s"], 2)
    return out


def top_up_cold(
    w: Workload, measured: dict[str, Any], *, wanted: int, n_calls: int, deadline: float, label: str
) -> int:
    """More cold runs of ``measured`` (up to ``wanted`` in all) while the slowest one so far still fits the deadline.

    Returns how many cold runs ``measured`` has in the end (it is updated in place).
    """
    runs = {"cold": measured["cold"]["details"], "restore": measured["restore"]["details"]}
    while len(runs["cold"]) < wanted:
        if time.perf_counter() + max(r["wall_s"] for r in runs["cold"]) > deadline:
            break
        run = run_once(w, "cold", n_calls=n_calls)
        runs["cold"].append(run)
        say_run(label, "cold", len(runs["cold"]), wanted, run)
    measured.update(summarize(runs))
    return len(runs["cold"])


# ----- the host ------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    mem_kb = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)[1])
    try:
        from warmboot.worker import criu

        criu_version = criu.version()
    except Exception as exc:  # noqa: BLE001 (informational only)
        criu_version = f"unknown ({exc})"
    return {
        "cpu": model[1].strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "virtual_machine": bool(flags and "hypervisor" in flags[1].split()),
        "kernel": platform.release(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "os": _os_name(),
        "python": platform.python_version(),
        "criu": criu_version,
    }


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return None


def machine_line(m: dict[str, Any]) -> str:
    vm = ", virtual machine" if m["virtual_machine"] else ""
    return f"{m['cpu']}, {m['cores']} cores{vm}, {m['ram_gib']:.0f} GiB RAM, Linux {m['kernel']}, {m['os']}"


# ----- targets -------------------------------------------------------------------------------------------------


def target(name: str, met: bool, value: str, margin: str) -> dict[str, Any]:
    return {"target": name, "met": met, "value": value, "margin": margin}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's targets, from this run's medians (ratios where a baseline was measured in the same run)."""
    out = []
    w0, w2 = results["workloads"]["W0"], results["workloads"]["W2"]
    median = w2[WARM]["restore"]["median_s"]
    if raw := w2.get("raw"):
        ratio = median / raw["median_s"]
        out.append(
            target(
                "W2 `.remote()` restore <= 1.1x the raw restore, and <= 250 ms (medians)",
                ratio <= 1.1 and median <= 0.25,
                f"{median * 1000:.0f} ms, {ratio:.2f}x raw ({raw['median_s'] * 1000:.0f} ms)",
                f"{ratio - 1.1:+.2f}x vs 1.1x; {(median - 0.25) * 1000:+.0f} ms vs 250 ms",
            )
        )
    ratio = w0[WARM]["restore"]["median_s"] / w0[WARM]["cold"]["median_s"]
    out.append(
        target(
            "W0 restore <= 1.2x its cold boot (medians)",
            ratio <= 1.2,
            f"{ratio:.2f}x ({w0[WARM]['restore']['median_s'] * 1000:.0f} ms vs "
            f"{w0[WARM]['cold']['median_s'] * 1000:.0f} ms)",
            f"{ratio - 1.2:+.2f}x vs the 1.2x limit",
        )
    )
    if DISK_COLD in w2:
        disk = w2[DISK_COLD]["restore"]["median_s"]
        out.append(target("W2 disk-cold restore <= 0.6 s (median)", disk <= 0.6, f"{disk:.3f} s",
                          f"{(disk - 0.6) * 1000:+.0f} ms vs 0.6 s"))  # fmt: skip
    if w3 := results["workloads"].get("W3x8"):
        slowest = statistics.median(max(r["results_s"]) for r in w3[WARM]["restore"]["details"])
        out.append(
            target(
                "W3x8 (8 simultaneous W2 calls, restore): slowest result <= 0.8 s (median over runs)",
                slowest <= 0.8,
                f"{slowest:.3f} s",
                f"{(slowest - 0.8) * 1000:+.0f} ms vs 0.8 s",
            )
        )
    snap = w2["snapshot"]
    if snap.get("rss_bytes"):
        ratio = snap["disk_bytes"] / snap["rss_bytes"]
        out.append(
            target(
                "W2 snapshot on disk <= 0.6x the container's RSS",
                ratio <= 0.6,
                f"{ratio:.2f}x ({snap['disk_bytes'] / 1e6:.0f} MB on disk, RSS {snap['rss_bytes'] / 1e6:.0f} MB)",
                f"{ratio - 0.6:+.2f}x vs 0.6x",
            )
        )
    return out


# ----- reports -------------------------------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(results: dict[str, Any], variant: str) -> str:
    rows = [
        "| workload | cold boot median | cold boot p95 | restore median | restore p95 | speed-up (cold / restore) "
        "| snapshot on disk | snapshot made in | runs (cold / restore) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, w in results["workloads"].items():
        if variant not in w:
            continue
        v = w[variant]
        snap = results["workloads"][w.get("snapshot_of", key)]["snapshot"]
        rows.append(
            f"| {key} {w['title']} | {fmt_s(v['cold']['median_s'])} | {fmt_s(v['cold']['p95_s'])} "
            f"| {fmt_s(v['restore']['median_s'])} | {fmt_s(v['restore']['p95_s'])} | {v['speedup']:.1f}x "
            f"| {snap['disk_bytes'] / 1e6:.0f} MB | {snap['create_seconds']:.2f} s "
            f"| {v['cold']['n']} / {v['restore']['n']} |"
        )
    return "\n".join(rows)


def w3_table(results: dict[str, Any]) -> str:
    rows = [
        "| workload | kind | runs | each result, median run (s) | last result: median | last result: p95 | slowest |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for key, w in results["workloads"].items():
        if not key.startswith("W3"):
            continue
        for kind in ("cold", "restore"):
            v = w[WARM][kind]
            ordered = sorted(v["details"], key=lambda r: r["seconds"])
            mid = ordered[(len(ordered) - 1) // 2]
            slowest = max(r["seconds"] for r in v["details"])
            rows.append(
                f"| {key} | {'cold boot' if kind == 'cold' else 'restore'} | {v['n']} "
                f"| {', '.join(f'{s:.2f}' for s in mid['results_s'])} | {fmt_s(v['median_s'])} "
                f"| {fmt_s(v['p95_s'])} | {fmt_s(slowest)} |"
            )
    return "\n".join(rows)


class RawBaseline:
    """W2's snapshot restored and called with no platform (``raw_baseline``), one run after each of W2's restore
    runs, results checked."""

    def __init__(self, w: Workload, home: Path, runs: int):
        self.w, self.runs = w, runs
        self.store = SnapshotStore(home / "snapshots")
        self.seconds: list[float] = []

    def __call__(self, i: int) -> None:
        record = snapshot_of(self.w)
        if record is None:
            raise SystemExit(f"{self.w.key}: no memory snapshot to take the raw baseline from")
        run = restore_and_call(self.store, self.store.get(record["snapshot_id"]), self.w.method, self.w.kwargs)
        elapsed = run.seconds
        if not same(run.value, self.w.reference):
            raise AssertionError(f"{self.w.key} raw restore {i + 1}: the result differs from the first call's")
        self.seconds.append(elapsed)
        console.print(f"  {self.w.key} raw restore (no platform) {i + 1}/{self.runs}: {elapsed * 1000:.0f} ms")


def raw_line(results: dict[str, Any]) -> str:
    """W2's restore through warmboot against the raw baseline, as one sentence."""
    w2 = results["workloads"]["W2"]
    raw, restore = w2.get("raw"), w2[WARM]["restore"]
    if not raw:
        return ""
    ratio = restore["median_s"] / raw["median_s"]
    return (
        f"Raw baseline: W2's own snapshot restored and called with no platform (CRIU restore by the engine, START "
        f"and the call written on its pipes; `bench/raw_baseline.py`), one run after each W2 restore run: median "
        f"{raw['median_s'] * 1000:.0f} ms over {raw['n']} runs; warmboot's `.remote()` restore median "
        f"{restore['median_s'] * 1000:.0f} ms is **{ratio:.2f}x** the raw restore."
    )


def breakdown(results: dict[str, Any]) -> dict[str, Any] | None:
    """The W2 restore whose client-side time is the median one, split by the phases the server recorded for it
    (its start log row: ``warmboot`` operation ``start_log``)."""
    runs = [r for r in results["workloads"]["W2"][WARM]["restore"]["details"] if r.get("starts")]
    if not runs:
        return None
    run = sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]
    start = run["starts"][0]
    phases = start["phases"]
    total_ms = run["seconds"] * 1000
    first = phases.get("first_input_ms", 0.0)
    named = {
        "cgroup_ms": "making the container's cgroups (CRIU runs in them)",
        "check_ms": "snapshot checks (manifest, fingerprint, image checksums)",
        "unpack_ms": "its images' copy in memory (decompressed only after an eviction)",
        "mounts_ms": "run directory, writable layer, overlay root, network namespace, pipes",
        "criu_restore_ms": "CRIU restore (of which the next line)",
        "pages_ms": "of which: the restored processes restoring themselves (memory mapped, pages loaded; CPU time)",
        "cuda_restore_ms": "GPU state back on the GPU (cuda-checkpoint)",
        "network_ms": "outbound network attached",
        "resume_ms": "START to READY: the runtime resumes (environment, reseed)",
        "enter_ms": "@enter(snap=False)",
    }
    if "enter_ms" not in phases:  # rows recorded before start_ms was split
        named["start_ms"] = "START to READY: network, reseed, @enter(snap=False)"
    steps = [(title, phases[key]) for key, title in named.items() if key in phases]
    inside = phases.get("pages_ms", 0.0)  # part of criu_restore_ms, shown apart
    steps.append(("restore bookkeeping (plan, registry)", start["total_ms"] - sum(ms for _, ms in steps) + inside))
    steps.append(("first call: the input in the container, encode, result back", first))
    steps.append(("SDK and server: request, dispatch, queueing, reply", total_ms - start["total_ms"] - first))
    return {
        "container": start["container_id"],
        "client_total_ms": round(total_ms),
        "steps": [{"step": s, "ms": round(ms)} for s, ms in steps],
    }


def breakdown_table(b: dict[str, Any]) -> str:
    rows = ["| step | ms | share |", "|---|---:|---:|"]
    for s in b["steps"]:
        rows.append(f"| {s['step']} | {s['ms']} | {s['ms'] / b['client_total_ms']:.0%} |")
    rows.append(f"| **total, `.remote()` to the result** | **{b['client_total_ms']}** | 100% |")
    return "\n".join(rows)


def targets_table(ts: list[dict[str, Any]]) -> str:
    rows = ["| target | result | met? | margin |", "|---|---|---|---|"]
    for t in ts:
        rows.append(f"| {t['target']} | {t['value']} | {'met' if t['met'] else '**missed**'} | {t['margin']} |")
    return "\n".join(rows)


def markdown(results: dict[str, Any], plot_name: str) -> str:
    m = results["machine"]
    notes = "".join(f"- {n}\n" for n in results["notes"])
    parts = [
        "# Cold starts: cold boot vs memory-snapshot restore",
        "",
        f"Measured {results['date']} on {machine_line(m)}; warmboot {results['warmboot']['version']} "
        f"(commit {results['warmboot']['commit']}), CRIU {m['criu']}, Python {m['python']}. "
        f"Written by `make bench` (`bench/cold_starts.py`) in {results['total_runtime_s']:.0f} s.",
        "",
        "Every number is the time from the `.remote()` call to its result, through the real SDK and server, with no "
        "warm container: **cold boot** runs the app ephemerally (no snapshots); **restore** redeploys the "
        "deployed app unchanged, so its cold start restores the memory snapshot its first call made. Medians and "
        "p95 (interpolated) over the runs shown; speed-up = cold median / restore median; snapshot size is the "
        "space its files take on disk.",
        "",
        f"## {WARM.capitalize()}",
        "",
        table(results, WARM),
        "",
        raw_line(results),
        "",
        f"## {DISK_COLD.capitalize()}",
        "",
        "The same workloads with `echo 3 > /proc/sys/vm/drop_caches` right before each timed call: the image's "
        "files (torch, the model) and the snapshot's images are read from disk.",
        "",
        table(results, DISK_COLD),
        "",
        "## W3: simultaneous calls of W2",
        "",
        "All calls `.spawn()`ed at once, then `.get()` on each; the run's time is that of its last result.",
        "",
        w3_table(results),
        "",
    ]
    if results["breakdown"]:
        b = results["breakdown"]
        parts += [
            "## Where one W2 restore's time goes",
            "",
            f"The median W2 restore run ({WARM}), container {b['container']}, from the phases the server recorded "
            "for it (its start log, `server/start_log.py`) and the client's clock:",
            "",
            breakdown_table(b),
            "",
        ]
    parts += [
        "## Targets",
        "",
        targets_table(results["targets"]),
        "",
        "## Notes",
        "",
        notes,
        f"![cold boot vs restore]({plot_name})",
        "",
    ]
    return "\n".join(parts)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [WARM, DISK_COLD]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, variant in zip(axes, variants, strict=True):
        keys = [k for k, w in results["workloads"].items() if variant in w]
        x = np.arange(len(keys))
        width = 0.38
        for offset, kind, colour, label in (
            (-width / 2, "cold", "#c0504d", "cold boot (snapshots off)"),
            (width / 2, "restore", "#4f81bd", "restore (snapshots on)"),
        ):
            med = np.array([results["workloads"][k][variant][kind]["median_s"] for k in keys])
            hi = np.array([results["workloads"][k][variant][kind]["p95_s"] for k in keys])
            bars = ax.bar(x + offset, med, width, color=colour, label=label)
            ax.errorbar(x + offset, med, yerr=[np.zeros_like(med), hi - med], fmt="none", ecolor="black", capsize=4)
            for bar, value, top in zip(bars, med, hi, strict=True):
                ax.annotate(
                    fmt_s(float(value)),
                    (bar.get_x() + bar.get_width() / 2, top),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
        raw = results["workloads"]["W2"].get("raw")
        if variant == WARM and raw and "W2" in keys:
            at = keys.index("W2") + width + 0.1  # right of W2's restore bar, clear of the next workload's
            label = "raw CRIU restore (no platform)"
            ax.bar(at, raw["median_s"], 0.18, color="#9bbb59", hatch="//", label=label)
            ax.annotate(fmt_s(raw["median_s"]), (at, raw["median_s"]), xytext=(0, 3), textcoords="offset points",
                        ha="center", fontsize=7)  # fmt: skip
        ax.set_xticks(x, [k.replace("W3x", "W3: last of ") for k in keys], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(variant if variant == WARM else f"{variant}: W0-W2")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel(".remote() to result, s (bar: median, whisker: p95)")
    axes[0].legend(loc="upper left", fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"warmboot cold starts, {results['date'][:10]}: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(results: dict[str, Any]) -> None:
    m = results["machine"]
    block = "\n".join(
        [
            README_BEGIN,
            f"Measured {results['date'][:10]} on {machine_line(m)} (warmboot {results['warmboot']['version']}, "
            f"commit {results['warmboot']['commit']}), by `make bench` in {results['total_runtime_s']:.0f} s. "
            "Time from `.remote()` to the result with no warm container, page cache warm; cold boot = the app run "
            "ephemerally (no snapshots), restore = the deployed app restoring its memory snapshot. W3's per-result "
            "times, a breakdown of one restore and the targets are in "
            "[docs/benchmarks/cold-starts.md](docs/benchmarks/cold-starts.md).",
            "",
            table(results, WARM),
            "",
            raw_line(results),
            "",
            "Targets (restore speed), from this run:",
            "",
            targets_table(results["targets"]),
            "",
            "Disk-cold (page cache dropped before each timed call):",
            "",
            table(results, DISK_COLD),
            "",
            "![cold boot vs restore, per workload](docs/benchmarks/cold-starts.png)",
            "",
            "Each restore technique tried (compressed images, copies in memory, huge pages, lazy pages, parallel "
            "page loading, prepared shells, restores a few at a time), with its numbers: "
            "[docs/snapshot-engine.md](docs/snapshot-engine.md#what-was-tried-kept-or-dropped) and "
            "[docs/benchmarks/restore-techniques.md](docs/benchmarks/restore-techniques.md) (`make bench-techniques`).",
            README_END,
        ]
    )
    text = README.read_text()
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        tail = rest.split(README_END, 1)[1]
        text = head + block + tail
    else:
        section = f"## Benchmarks\n\n{block}\n\n"
        anchor = "## Where things are"
        text = text.replace(anchor, section + anchor, 1) if anchor in text else text.rstrip() + "\n\n" + section
    README.write_text(text)


# ----- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=MIN_RUNS, help=f"timed runs of each kind (at least {MIN_RUNS})")
    parser.add_argument(
        "--w3-cold-runs",
        type=int,
        default=None,
        help="cold runs of W3, where 8 cold boots of W2 share the cores (default --runs; fewer to save time)",
    )
    parser.add_argument("--disk-cold-runs", type=int, default=None, help="runs of the disk-cold pass (default --runs)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540,
        help="W3 cold runs beyond the first 3 are made only while they fit this many seconds in all (default 540)",
    )
    parser.add_argument("--quick", action="store_true", help="2 runs of each, for development; results not published")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {OUT_DIR.relative_to(ROOT)})")
    args = parser.parse_args()
    if args.quick:
        runs, w3_cold_runs, disk_runs = 2, 1, 1
    else:
        if args.runs < MIN_RUNS:
            parser.error(f"--runs must be at least {MIN_RUNS} (use --quick for a short development run)")
        runs, w3_cold_runs = args.runs, max(1, args.w3_cold_runs or args.runs)
        disk_runs = args.disk_cold_runs or runs
    out_dir = args.out or (QUICK_OUT_DIR if args.quick else OUT_DIR)
    if os.geteuid() != 0:
        raise SystemExit("bench/cold_starts.py must run as root (CRIU, containers, drop_caches)")

    started = time.perf_counter()
    deadline = started + args.budget_s
    ping = fresh_server()
    ensure_model_volume()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "warmboot": {"version": ping["version"], "commit": git_commit(), "home": ping["home"]},
        "quick": args.quick,
        "runs": runs,
        "workloads": {},
    }
    notes = []
    try:
        for w in WORKLOADS:
            entry = results["workloads"][w.key] = {"title": w.title, **prepare(w)}
            entry["app"], entry["app_file"] = w.name, str(w.path.relative_to(ROOT))
            raw_runs = RawBaseline(w, Path(ping["home"]), runs) if w.key == "W2" else None
            entry[WARM] = measure(w, cold_runs=runs, restore_runs=runs, label=w.key, after_restore=raw_runs)
            if raw_runs is not None:
                entry["raw"] = raw = summary(raw_runs.seconds)
                raw["ratio"] = round(entry[WARM]["restore"]["median_s"] / raw["median_s"], 3)
        w2 = WORKLOADS[2]
        w3_first = min(w3_cold_runs, W3_COLD_RUNS_FIRST)
        for n in (4, 8):
            key = f"W3x{n}"
            console.print(f"[bold]{key}[/] {n} simultaneous calls of W2")
            results["workloads"][key] = {
                "title": f"{n} simultaneous calls of W2 (to the last result)",
                "calls": n,
                "snapshot_of": "W2",
                WARM: measure(w2, cold_runs=w3_first, restore_runs=runs, n_calls=n, label=key),
            }
        console.print(f"[bold]{DISK_COLD}[/]: W0-W2, page cache dropped before each timed call")
        for w in WORKLOADS:
            results["workloads"][w.key][DISK_COLD] = measure(
                w, cold_runs=disk_runs, restore_runs=disk_runs, disk_cold=True, label=f"{w.key} disk-cold"
            )
        w3_done = {}
        for n in (4, 8):
            key = f"W3x{n}"
            if w3_cold_runs > w3_first:
                console.print(f"[bold]{key}[/] more cold runs, while they fit the {args.budget_s:.0f} s budget")
            w3_done[key] = top_up_cold(
                w2, results["workloads"][key][WARM], wanted=w3_cold_runs, n_calls=n, deadline=deadline, label=key
            )
    finally:
        for w in WORKLOADS:
            if w.app is not None:
                stop_quietly(w.name)
                stop_quietly(w.cold_name)

    for key, done in w3_done.items():
        if done < runs:
            why = (
                f"the next would not have fit the {args.budget_s:.0f} s budget (`make bench` must fit 10 minutes)"
                if done < w3_cold_runs
                else "as asked (--w3-cold-runs)"
            )
            notes.append(
                f"{key} cold boots: {done} run(s), not {runs}: {why}. Each runs {key[3:]} cold boots of W2 at once "
                f"on {results['machine']['cores']} cores, tens of seconds per run."
            )
    if disk_runs < runs:
        notes.append(f"{DISK_COLD}: {disk_runs} run(s) of each kind, not {runs}.")
    if args.quick:
        notes.append("QUICK development run (--quick): too few runs to publish.")
    unrestored = [
        (key, variant)
        for key, w in results["workloads"].items()
        for variant in (WARM, DISK_COLD)
        if variant in w
        for r in w[variant]["restore"]["details"]
        if not r.get("restored_containers") or r["log"]["cold_boots"]
    ]
    idle = [
        (len(r["log"]["restores"]), sum(1 for e in r["log"]["restores"] if e["first_input_ms"] is None))
        for key in ("W3x4", "W3x8")
        for r in results["workloads"][key][WARM]["restore"]["details"]
    ]
    if any(unused for _, unused in idle):
        notes.append(
            f"W3 restores: {sum(u for _, u in idle)} of the {sum(n for n, _ in idle)} containers restored served no "
            "call: each call goes to whichever container is ready first, and a container that has answered takes the "
            "next queued call, so the slowest restores found the queue empty."
        )
    per_run = {
        key: [len(r["log"]["restores"]) for r in results["workloads"][key][WARM]["restore"]["details"]]
        for key in ("W3x4", "W3x8")
    }
    notes.append(
        f"W3 restore runs: containers restored per run {per_run}. Restores run a few at a time "
        "(WARMBOOT_MAX_PARALLEL_RESTORES, default the CPU count), and a start still waiting for its turn is dropped "
        "once containers that became ready have taken its calls (server/restore_slots.py)."
    )
    if unrestored:
        notes.append(f"Restore runs where not every container was restored from the snapshot: {unrestored}.")
    notes.append(
        "Cold-boot and restore runs alternate, so drift on the host (other work, memory handed back to a "
        "balloon) hits both; on a shared 2-core VM single runs can be noisy."
    )
    results["notes"] = notes
    results["breakdown"] = breakdown(results)
    results["targets"] = targets(results)
    results["total_runtime_s"] = round(time.perf_counter() - started, 1)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cold-starts.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out_dir / "cold-starts.png")
    md = markdown(results, "cold-starts.png")
    (out_dir / "cold-starts.md").write_text(md)
    if not args.quick and out_dir.resolve() == OUT_DIR.resolve():
        update_readme(results)

    print(f"\n{WARM}:\n{table(results, WARM)}\n")
    print(f"{DISK_COLD}:\n{table(results, DISK_COLD)}\n")
    print(f"W3 (simultaneous calls of W2):\n{w3_table(results)}\n")
    if results["breakdown"]:
        print(f"One W2 restore:\n{breakdown_table(results['breakdown'])}\n")
    print("Targets:")
    for t in results["targets"]:
        print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']} ({t['margin']})")
    for n in notes:
        print(f"Note: {n}")
    print(f"\nTotal runtime {results['total_runtime_s']:.0f} s. Wrote {out_dir}/cold-starts.{{json,md,png}}", end="")
    print(" and README.md's Benchmarks section." if not args.quick and out_dir.resolve() == OUT_DIR.resolve() else ".")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
