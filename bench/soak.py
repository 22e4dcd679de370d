"""`make soak`: a thousand memory-snapshot restores through the real SDK, checked for failures, fallbacks and leaks.

The soak starts its own warmboot server on a fresh ``WARMBOOT_HOME`` under /var/tmp, deploys a small app written
in Modal's style and calls its one function, which has ``enable_memory_snapshot=True`` and ``max_inputs=1``: every
container stops after one input, so every call needs a fresh container, that is a restore of the snapshot. The
first call boots cold and makes the snapshot (it is not counted); then the calls run one at a time (``.remote()``)
and in bursts (``.spawn()`` then ``.get()``, or ``.map()``), alternating, until ``--restores`` calls are done.

What it checks:

- every call returns its own input's answer (``x``, ``x*x``), from a container of its own (``max_inputs=1``),
  restored from the snapshot (the module-level token drawn at import is the snapshot's) and reseeded (no two
  calls draw the same random number);
- the server's own records: the app log's "Restored ... in N ms", cold-boot and failed-restore lines, and the
  restores counted by ``warmboot snapshot list``;
- leaks, once every container has gone: processes of the server's containers, mounts of the soak's home, the
  containers' cgroups, run directories, CRIU's temporary files, and the server's file descriptors, threads and
  memory (VmRSS) against baselines taken after the first call and after the first 100 calls.

It prints a line every 100 calls and a summary at the end, and exits 1 on any failure, fallback, wrong result
or leak. Usage (as root): ``.venv/bin/python bench/soak.py [--restores N] [--burst N]`` (``--help`` for the
rest); ``make soak`` runs it with the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import warmboot as modal
from warmboot.errors import WarmbootError
from warmboot.sdk import client

APP_NAME = "soak"
FUNCTION = "square"
WARMBOOT_CLI = str(Path(sys.executable).parent / "warmboot")
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROGRESS_EVERY = 100
FIRST_CALL_TIMEOUT_S = 600.0  #: the first call may build the image (the Debian base is cached host-wide)
SCALE_DOWN_TIMEOUT_S = 120.0  #: every container must be gone this long after the last result
SETTLE_TIMEOUT_S = 30.0  #: what a container leaves behind must be gone this long after it left the list
MAX_FAILURES = 50  #: give up after this many failed calls (something is badly wrong)

APP_SOURCE = f'''
"""The soak's app (written by bench/soak.py): every call needs a container of its own, restored from the snapshot."""

import os
import random
import uuid

import warmboot as modal

app = modal.App("{APP_NAME}")

#: Drawn once per cold boot, at import (before the snapshot point): every restored copy carries the snapshot's.
BOOT_TOKEN = uuid.uuid4().hex


@app.function(enable_memory_snapshot=True, max_inputs=1, timeout=60)
def {FUNCTION}(x: int) -> dict:
    return {{
        "x": x,
        "square": x * x,
        "container": os.environ.get("WARMBOOT_CONTAINER_ID"),
        "boot_token": BOOT_TOKEN,
        "draw": random.getrandbits(64),  # restored copies are reseeded: no two calls may draw the same
    }}
'''

RESTORED_RE = re.compile(r"Restored \S+ from memory snapshot in (?P<ms>\d+) ms \(container (?P<container>wc-\w+)")
COLD_RE = re.compile(r"Container (?P<container>wc-\w+) started for \S+ \(cold boot in")
FAILED_RESTORE_RE = re.compile(r"Restore of \S+ from memory snapshot \S+ failed")
FAILED_START_RE = re.compile(r"Container for \S+ failed to start")
CONTAINER_ID_RE = re.compile(r"\bwc-[0-9a-f]{12}\b")


# ----- the server ----------------------------------------------------------------------------------------------


class Server:
    """A warmboot server of our own, on a fresh home under /var/tmp, stopped and removed by :meth:`close`."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="warmboot-soak-", dir="/var/tmp"))
        # The soak measures restores: no cold boot chosen now and then to compare (server.start_log.StartChoice).
        self.env = {**os.environ, "WARMBOOT_HOME": str(self.home), "COLUMNS": "200", "WARMBOOT_RESTORE_ALWAYS": "1"}
        self.log_path = self.home / "soak-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.container_ids: set[str] = set()  #: every container this server is known to have run

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> None:
        """Start ``python -m warmboot.server`` (in a session of its own: Ctrl-C reaches the soak, not the server)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "warmboot.server"],
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not (self.home / "server.sock").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def cli(self, *args: str, timeout: float = 600.0) -> str:
        """Run the real ``warmboot`` CLI against this server; its output, or RuntimeError."""
        proc = subprocess.run(
            [WARMBOOT_CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"warmboot {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the server stops its apps, running their containers' shutdown), SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"soak: the server (pid {self.pid}) did not stop within {timeout:.0f} s; killing it", flush=True)
            self.process.kill()
            self.process.wait()

    def close(self, keep_home: bool = False) -> None:
        """Stop the server, clear up what it left behind, then remove its home (unless kept).

        The summary has already counted any leak; this only leaves the host clean, also after Ctrl-C.
        """
        self.stop()
        if self.process is not None:
            cleared = self.clear_leftovers()
            if any(cleared.values()):
                what = ", ".join(f"{n} {kind}" for kind, n in cleared.items() if n)
                print(f"soak: cleared up after the stopped server: {what}", flush=True)
        if keep_home:
            print(f"soak: kept {self.home} (server log: {self.log_path})", flush=True)
        elif mounts_under(self.home):
            print(f"soak: {self.home} still has mounts; not removing it", flush=True)
        else:
            shutil.rmtree(self.home, ignore_errors=True)

    def known_container_ids(self) -> set[str]:
        """Containers the server ran: those seen so far, those its logs name and those with a run directory."""
        ids = set(self.container_ids)
        for path in [*(self.home / "logs").glob("*.log*"), self.log_path]:
            with contextlib.suppress(OSError):
                ids.update(CONTAINER_ID_RE.findall(path.read_text(errors="replace")))
        with contextlib.suppress(OSError):
            ids.update(p.name for p in (self.home / "containers").iterdir())
        return ids

    def clear_leftovers(self) -> dict[str, int]:
        """Kill the server's leftover processes (by pid), unmount its mounts, remove its containers' cgroups."""
        ids = self.known_container_ids()
        procs = processes_of(self, container_ids=ids, exclude_server=False)
        for proc in procs:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGKILL)
        wait_until(lambda: all(p.gone() for p in procs), 5.0)
        mounts = mount_points_under(self.home)
        for mount_point, _ in reversed(mounts):
            subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
        groups = [d for d in cgroup_dirs() if d.name in ids]
        for group in groups:
            with contextlib.suppress(OSError):
                group.rmdir()
        return {"processes killed": len(procs), "mounts unmounted": len(mounts), "cgroups removed": len(groups)}


# ----- what the host holds -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: int  #: start time in clock ticks since boot: (pid, start) names a process even if pids are reused
    cmdline: str
    cgroup: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.state}) {self.cmdline[:100] or '[no cmdline]'}"

    def gone(self) -> bool:
        """Whether this process has exited (a zombie counts: it only waits to be reaped)."""
        now = read_proc(self.pid)
        return now is None or now.start != self.start or now.state == "Z"


def read_proc(pid: int) -> Proc | None:
    """One process's parent, state, start time, command line and cgroups; ``None`` if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ..., starttime is the 20th
    return Proc(pid, int(fields[1]), fields[0], int(fields[19]), cmdline, cgroup)


def all_processes() -> list[Proc]:
    return [p for pid in os.listdir("/proc") if pid.isdigit() and (p := read_proc(int(pid))) is not None]


def descendants(procs: list[Proc], root: int) -> list[Proc]:
    """Every process below ``root`` (the server is a subreaper, so restored containers stay below it too)."""
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def root_mount(pid: int) -> str:
    """The mountinfo line of ``pid``'s root, if it lives in another mount namespace than ours (else "")."""
    with contextlib.suppress(OSError):
        if os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            return ""
        for line in mountinfo_lines(pid):
            if line.split()[4] == "/":
                return line
    return ""


def processes_of(server: Server, *, container_ids: set[str], exclude_server: bool = True) -> list[Proc]:
    """Processes that belong to the soak's server, wherever they are on the host.

    Four ways to belong, any one enough: below the server in the process tree (containers, restored copies,
    slirp4netns, CRIU); in the cgroup of one of its containers; naming the soak's home on its command line; or
    having a root filesystem on the soak's home (a container that escaped both the tree and its cgroup, as one
    orphaned by a server that stopped mid-restore does). Other warmboot servers' containers match none of them.
    """
    procs = all_processes()
    home = str(server.home)
    mine = {p.pid: p for p in descendants(procs, server.pid)}
    for p in procs:
        in_our_cgroup = not container_ids.isdisjoint(CONTAINER_ID_RE.findall(p.cgroup))
        if in_our_cgroup or home in p.cmdline or home in root_mount(p.pid):
            mine.setdefault(p.pid, p)
    if exclude_server:
        mine.pop(server.pid, None)
    mine.pop(os.getpid(), None)
    return sorted(mine.values(), key=lambda p: p.pid)


def mountinfo_lines(pid: int | str = "self") -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    return []


def mount_points_under(home: Path, pid: int | str = "self") -> list[tuple[str, str]]:
    """(mount point, "fstype source on mount point") of each mount that mentions ``home`` as ``pid`` sees them.

    Overlay roots mention it in their mount point or their layers (lowerdir=, upperdir=).
    """
    found = []
    for line in mountinfo_lines(pid):
        if str(home) in line:
            fields = line.split()
            sep = fields.index("-")
            found.append((fields[4], f"{fields[sep + 1]} {fields[sep + 2]} on {fields[4]}"))
    return found


def mounts_under(home: Path, server_pid: int | None = None) -> list[str]:
    """Mounts that mention ``home``, as this process and (if given) the server see them."""
    found = mount_points_under(home)
    if server_pid is not None:
        found += mount_points_under(home, server_pid)
    return sorted({description for _, description in found})


def cgroup_dirs() -> list[Path]:
    """Containers' cgroup directories: ``warmboot/wc-*`` in the v2 hierarchy or under any v1 controller."""
    return sorted(CGROUP_ROOT.glob("warmboot/wc-*")) + sorted(CGROUP_ROOT.glob("*/warmboot/wc-*"))


def proc_status_value(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class HostSample:
    """What the soak's server and its containers hold on the host at one moment."""

    processes: list[str]
    mounts: list[str]
    cgroups: list[str]
    run_dirs: list[str]
    criu_files: list[str]  #: CRIU's per-restore log and pid files (removed after each successful restore; its
    #: stats-* files are overwritten by each run, not counted)
    server_fds: int
    server_threads: int
    server_rss_kib: int


def sample(server: Server, container_ids: set[str]) -> HostSample:
    """Measure the host now; ``container_ids``: every container the soak's server is known to have run."""
    containers_dir = server.home / "containers"
    criu_logs = server.home / "snapshots" / ".logs"
    return HostSample(
        processes=[p.describe() for p in processes_of(server, container_ids=container_ids)],
        mounts=mounts_under(server.home, server.pid),
        cgroups=[str(d) for d in cgroup_dirs() if d.name in container_ids],
        run_dirs=sorted(p.name for p in containers_dir.iterdir()) if containers_dir.is_dir() else [],
        criu_files=sorted(p.name for p in criu_logs.iterdir() if not p.name.startswith("stats-"))
        if criu_logs.is_dir()
        else [],
        server_fds=len(os.listdir(f"/proc/{server.pid}/fd")),
        server_threads=len(os.listdir(f"/proc/{server.pid}/task")),
        server_rss_kib=proc_status_value(server.pid, "VmRSS"),
    )


@dataclass(frozen=True)
class Tolerances:
    """How much the server may grow between the warm baseline and the end without it counting as a leak.

    Its file descriptors must come back exactly. Its worker-thread pools may still be growing towards their size
    (one thread per concurrent request at most: ``threads`` is the burst size); a leak grows with every call.
    """

    rss_mib: float
    threads: int


def leaks(before: HostSample, after: HostSample, tolerances: Tolerances) -> dict[str, str]:
    """What ``after`` holds that ``before`` did not, by kind (an empty dict: no leak)."""
    found: dict[str, str] = {}
    for kind in ("processes", "mounts", "cgroups", "run_dirs", "criu_files"):
        new = sorted(set(getattr(after, kind)) - set(getattr(before, kind)))
        if new:
            found[kind] = f"{len(new)}: " + "; ".join(new[:5]) + (" ..." if len(new) > 5 else "")
    if after.server_fds > before.server_fds:
        found["server_fds"] = f"{before.server_fds} -> {after.server_fds}"
    if after.server_threads > before.server_threads + tolerances.threads:
        found["server_threads"] = (
            f"{before.server_threads} -> {after.server_threads} (more than {tolerances.threads} more)"
        )
    grew_mib = (after.server_rss_kib - before.server_rss_kib) / 1024
    if grew_mib > tolerances.rss_mib:
        found["server_rss"] = f"+{grew_mib:.1f} MiB (more than the {tolerances.rss_mib:g} MiB allowed)"
    return found


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``check`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def wait_for_no_containers(timeout: float = SCALE_DOWN_TIMEOUT_S) -> bool:
    """Whether ``warmboot container list`` is empty within ``timeout`` (containers stop after their one input)."""
    return wait_until(lambda: not client.request("container_list"), timeout)


def settled_sample(
    server: Server, ids: Callable[[], set[str]], reference: HostSample, tolerances: Tolerances, *, counters: bool
) -> HostSample:
    """A sample once nothing is left over against ``reference``, or the last one taken by the deadline.

    A container leaves the list before it has finished stopping (its processes reaped, cgroup and run directory
    removed), so the first sample after the list empties may catch it on the way out. ``counters``: the server's
    file descriptors, threads and memory must be back to the reference's too.
    """
    latest: list[HostSample] = []

    def clean() -> bool:
        latest[:] = [sample(server, ids())]
        found = leaks(reference, latest[0], tolerances)
        return not (found if counters else {k: v for k, v in found.items() if not k.startswith("server_")})

    wait_until(clean, SETTLE_TIMEOUT_S, interval=0.25)
    return latest[0]


@dataclass
class Baselines:
    """What the host held before the soak's calls, to compare the end with."""

    #: after the first call's container has gone: nothing of any container may be left at the end either
    before: HostSample
    #: after the first round of calls (one at a time and in bursts) has gone: the server's thread pools and caches
    #: have grown to their working size, so its file descriptors, threads and memory are compared with these
    warm: HostSample | None = None

    def reference(self) -> HostSample:
        warm = self.warm or self.before
        return dataclasses.replace(
            self.before,
            server_fds=warm.server_fds,
            server_threads=warm.server_threads,
            server_rss_kib=warm.server_rss_kib,
        )


# ----- the server's records ------------------------------------------------------------------------------------


class AppLog:
    """The app's log file under ``$WARMBOOT_HOME/logs`` (what ``warmboot logs APP`` prints), read from a mark."""

    def __init__(self, home: Path, app: str) -> None:
        self.path = home / "logs" / f"{app}.log"
        self.rotated = self.path.with_name(self.path.name + ".1")
        self.mark = 0

    def _size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def set_mark(self) -> None:
        """Later reads start here."""
        self.mark = self._size()

    def lines_since_mark(self) -> list[str]:
        size = self._size()
        text = ""
        if size < self.mark and self.rotated.exists():  # rotated since the mark: the rest of the old file first
            with open(self.rotated, errors="replace") as f:
                f.seek(self.mark)
                text = f.read()
        if self.path.exists():
            with open(self.path, errors="replace") as f:
                f.seek(self.mark if size >= self.mark else 0)
                text += f.read()
        return text.splitlines()


@dataclass
class LogCounts:
    """What the server logged about the soak's containers."""

    restore_ms: list[int] = field(default_factory=list)
    restored_ids: set[str] = field(default_factory=set)
    cold_boot_ids: list[str] = field(default_factory=list)
    failed_restores: list[str] = field(default_factory=list)
    failed_starts: list[str] = field(default_factory=list)
    container_ids: set[str] = field(default_factory=set)


def parse_log(lines: list[str]) -> LogCounts:
    counts = LogCounts()
    for line in lines:
        counts.container_ids.update(CONTAINER_ID_RE.findall(line))
        if m := RESTORED_RE.search(line):
            counts.restore_ms.append(int(m["ms"]))
            counts.restored_ids.add(m["container"])
        elif m := COLD_RE.search(line):
            counts.cold_boot_ids.append(m["container"])
        elif FAILED_RESTORE_RE.search(line):
            counts.failed_restores.append(line)
        elif FAILED_START_RE.search(line):
            counts.failed_starts.append(line)
    return counts


def snapshot_record() -> dict[str, Any] | None:
    """The soak function's snapshot, as ``warmboot snapshot list`` shows it (its state, restores count)."""
    records = [r for r in client.request("snapshot_list") if r["app_name"] == APP_NAME and r["tag"] == FUNCTION]
    ok = [r for r in records if r["state"] == "ok"]
    return (ok or records or [None])[0]


# ----- the calls -----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """The calls made so far and what came back."""

    boot_token: str = ""  #: the snapshot's token: a call answered with another one was served by a cold boot
    calls: int = 0
    sequential: int = 0
    burst: int = 0
    failures: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    #: containers that answered with another token than the first call's: cold-booted, or restored from a
    #: snapshot made after the first one was lost
    other_token: list[str] = field(default_factory=list)
    containers: set[str] = field(default_factory=set)
    draws: set[int] = field(default_factory=set)
    sequential_s: list[float] = field(default_factory=list)  #: each one-at-a-time call, to its result
    burst_s: list[float] = field(default_factory=list)  #: each burst, to its last result

    def check(self, x: int, value: Any) -> None:
        """Record one result: right for its input, from a container of its own, restored and reseeded."""
        self.calls += 1
        if not isinstance(value, dict) or value.get("x") != x or value.get("square") != x * x:
            self.wrong.append(f"input {x}: got {value!r:.200}")
            return
        container = value.get("container") or "?"
        if container in self.containers:
            self.wrong.append(f"input {x}: container {container} served a second input (max_inputs=1)")
        self.containers.add(container)
        if value.get("draw") in self.draws:
            self.wrong.append(f"input {x}: container {container} drew a random number another call drew")
        self.draws.add(value.get("draw"))
        if value.get("boot_token") != self.boot_token:
            self.other_token.append(container)

    def fail(self, x: int, exc: BaseException) -> None:
        self.calls += 1
        self.failures.append(f"input {x}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


class CallTimeout(Exception):
    """A call (or the first result of a ``.map()``) took longer than it may."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`CallTimeout` in the block if it runs longer than ``seconds`` (``.remote()`` has no timeout).

    SIGALRM interrupts the blocking read on the server's socket; only the main thread makes calls.
    """

    def expire(_signum: int, _frame: Any) -> None:
        raise CallTimeout(f"{what}: no result after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def one_at_a_time(fn: modal.Function, inputs: list[int], tally: Tally, *, timeout: float) -> None:
    """``.remote()`` each input in turn."""
    for x in inputs:
        tally.sequential += 1
        started = time.perf_counter()
        try:
            with time_limit(timeout, f"input {x}"):
                value = fn.remote(x)
        except Exception as exc:  # noqa: BLE001 - any failure (remote ones re-raise as they are) is counted
            tally.fail(x, exc)
            continue
        tally.sequential_s.append(time.perf_counter() - started)
        tally.check(x, value)


def burst(fn: modal.Function, inputs: list[int], tally: Tally, *, use_map: bool, timeout: float) -> None:
    """All of ``inputs`` at once: ``.map()``, or ``.spawn()`` each then ``.get()`` each."""
    started = time.perf_counter()
    tally.burst += len(inputs)
    if use_map:
        results = fn.map(inputs)
        for i, x in enumerate(inputs):
            try:
                with time_limit(timeout, f"input {x}"):
                    value = next(results)
            except Exception as exc:  # noqa: BLE001 - .map() stops at its first failure: the rest are lost too
                for lost in inputs[i:]:
                    tally.fail(lost, exc)
                break
            tally.check(x, value)
    else:
        handles = []
        for x in inputs:
            try:
                handles.append((x, fn.spawn(x)))
            except Exception as exc:  # noqa: BLE001 - counted
                tally.fail(x, exc)
        for x, handle in handles:
            try:
                tally.check(x, handle.get(timeout=timeout))
            except Exception as exc:  # noqa: BLE001 - counted
                tally.fail(x, exc)
    tally.burst_s.append(time.perf_counter() - started)


def schedule(total: int, burst_size: int) -> Iterator[tuple[str, list[int]]]:
    """Rounds of ``PROGRESS_EVERY`` inputs: half one at a time, half in bursts (alternately spawned and mapped)."""
    inputs = itertools.count(1)
    done, bursts = 0, 0
    while done < total:
        in_round = min(PROGRESS_EVERY, total - done)
        alone = in_round // 2
        yield "remote", [next(inputs) for _ in range(alone)]
        left = in_round - alone
        while left:
            size = min(burst_size, left)
            yield ("map" if bursts % 2 else "spawn"), [next(inputs) for _ in range(size)]
            bursts += 1
            left -= size
        done += in_round


# ----- the report ----------------------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """The ``pct``-th percentile, linearly interpolated between the closest ranks."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def progress(tally: Tally, log: AppLog, server: Server, total: int, started: float) -> None:
    counts = parse_log(log.lines_since_mark())
    ms = counts.restore_ms
    fds = len(os.listdir(f"/proc/{server.pid}/fd"))
    rss = proc_status_value(server.pid, "VmRSS") / 1024
    print(
        f"soak: {tally.calls}/{total} calls ({tally.sequential} one at a time, {tally.burst} in bursts), "
        f"{len(ms)} restores (p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms), "
        f"{len(tally.failures)} failed, {fallback_count(tally, counts)} fallbacks, "
        f"{len(tally.wrong)} wrong; server {fds} fds, {rss:.0f} MiB; {time.monotonic() - started:.0f} s",
        flush=True,
    )


def report(
    tally: Tally,
    counts: LogCounts,
    snapshot_restores: int,
    baselines: Baselines,
    after: HostSample,
    found_leaks: dict[str, str],
    scaled_down: bool,
    wall_s: float,
) -> list[tuple[str, str]]:
    """The summary table's rows."""
    ms = counts.restore_ms
    before, warm = baselines.before, baselines.warm or baselines.before
    rows = [
        ("calls", f"{tally.calls} ({tally.sequential} one at a time, {tally.burst} in {len(tally.burst_s)} bursts)"),
        ("failures (exceptions)", str(len(tally.failures))),
        ("fallbacks (cold boots, failed restores)", str(fallback_count(tally, counts))),
        ("wrong results", str(len(tally.wrong))),
        ("restores (app log)", str(len(ms))),
        ("restores (warmboot snapshot list)", str(snapshot_restores)),
        ("restore p50 / p95 / p99", " / ".join(f"{percentile(ms, p):.0f} ms" for p in (50, 95, 99))),
        ("restore min / max", f"{min(ms, default=0)} ms / {max(ms, default=0)} ms"),
        (
            "call p50 / p99 (one at a time)",
            " / ".join(f"{percentile(tally.sequential_s, p) * 1000:.0f} ms" for p in (50, 99)),
        ),
        ("burst p50 / p99 (to its last result)", " / ".join(f"{percentile(tally.burst_s, p):.2f} s" for p in (50, 99))),
        ("wall time", f"{wall_s:.0f} s"),
        ("containers gone (container list empty)", "yes" if scaled_down else f"NO after {SCALE_DOWN_TIMEOUT_S:.0f} s"),
    ]
    for kind in ("processes", "mounts", "cgroups", "run_dirs", "criu_files"):
        rows.append(
            (
                f"{kind.replace('_', ' ')} left (before -> after)",
                f"{len(getattr(before, kind))} -> {len(getattr(after, kind))}",
            )
        )
    rows += [
        ("server fds (first call, warm, end)", f"{before.server_fds}, {warm.server_fds}, {after.server_fds}"),
        (
            "server threads (first call, warm, end)",
            f"{before.server_threads}, {warm.server_threads}, {after.server_threads}",
        ),
        (
            "server VmRSS (first call, warm, end)",
            ", ".join(f"{s.server_rss_kib / 1024:.1f}" for s in (before, warm, after)) + " MiB",
        ),
        ("leaks", ", ".join(f"{k} {v}" for k, v in found_leaks.items()) or "none"),
    ]
    return rows


def cold_boots(tally: Tally, counts: LogCounts) -> list[str]:
    """Containers cold-booted once the snapshot existed: logged as such, or answering with a token of their own
    where the log shows no restore of theirs."""
    by_results = [c for c in tally.other_token if c not in counts.restored_ids]
    return sorted(set(counts.cold_boot_ids) | set(by_results))


def fallback_count(tally: Tally, counts: LogCounts) -> int:
    """Cold boots in place of a restore. A failed restore is followed by a cold boot (or a failed start) in its
    place, so the two are not added up."""
    return max(len(cold_boots(tally, counts)), len(counts.failed_restores))


def other_snapshot(tally: Tally, counts: LogCounts) -> list[str]:
    """Containers restored from a snapshot other than the first call's (it was replaced mid-soak)."""
    return [c for c in tally.other_token if c in counts.restored_ids]


def problems(tally: Tally, counts: LogCounts, snapshot_restores: int, scaled_down: bool) -> list[str]:
    """Everything that makes the soak fail, besides leaks (reported with the table); at most 10 of each kind."""
    out = [f"failed: {f}" for f in tally.failures[:10]]
    out += [f"wrong result: {w}" for w in tally.wrong[:10]]
    out += [f"cold boot once the snapshot existed: container {c}" for c in cold_boots(tally, counts)[:10]]
    out += [
        f"restored from another snapshot than the first call's: container {c}"
        for c in other_snapshot(tally, counts)[:10]
    ]
    out += [f"failed restore: {line}" for line in counts.failed_restores[:10]]
    out += [f"failed start: {line}" for line in counts.failed_starts[:10]]
    ok_calls = tally.calls - len(tally.failures)
    if len(counts.restore_ms) < ok_calls or snapshot_restores < ok_calls:
        out.append(
            f"{ok_calls} calls succeeded but the app log shows {len(counts.restore_ms)} restores and "
            f"`warmboot snapshot list` {snapshot_restores}"
        )
    if not scaled_down:
        out.append(f"containers still listed {SCALE_DOWN_TIMEOUT_S:.0f} s after the last result")
    return out


# ----- main ----------------------------------------------------------------------------------------------------


def deploy(server: Server) -> modal.Function:
    """Write the app file, ``warmboot deploy`` it, and look its function up by name, as a user would."""
    app_dir = server.home / "appfiles"
    app_dir.mkdir()
    path = app_dir / "soak_app.py"
    path.write_text(textwrap.dedent(APP_SOURCE).lstrip())
    server.cli("deploy", str(path))
    return modal.Function.from_name(APP_NAME, FUNCTION)


def first_call(fn: modal.Function, tally: Tally) -> None:
    """The cold boot that makes the snapshot; its token is what every restored copy must answer with."""
    started = time.perf_counter()
    with time_limit(FIRST_CALL_TIMEOUT_S, "the first call"):
        value = fn.remote(0)
    if not isinstance(value, dict) or value.get("square") != 0 or not value.get("boot_token"):
        raise RuntimeError(f"the first call returned {value!r}")
    tally.boot_token = value["boot_token"]
    tally.containers.add(value["container"])
    tally.draws.add(value["draw"])
    record = snapshot_record()
    if record is None or record["state"] != "ok":
        raise RuntimeError(f"the first call made no memory snapshot (record: {record}); see `warmboot logs {APP_NAME}`")
    print(
        f"soak: first call (cold boot + snapshot, {record['size_bytes'] / 1e6:.0f} MB made in "
        f"{record['create_seconds']:.2f} s) took {time.perf_counter() - started:.2f} s",
        flush=True,
    )


class Soak:
    """One soak: the deployed function, the calls' tally, the app log and the host's baselines."""

    def __init__(self, server: Server, args: argparse.Namespace) -> None:
        self.server = server
        self.args = args
        self.started = time.monotonic()
        self.fn = deploy(server)
        self.log = AppLog(server.home, APP_NAME)
        self.tally = Tally()
        self.stopped_early: str | None = None
        self.tolerances = Tolerances(rss_mib=args.rss_tolerance_mib, threads=args.burst)

    def why_stop(self) -> str | None:
        """Why no more calls should be made (past ``--timeout-s``, too many failures), or ``None``."""
        if time.monotonic() - self.started > self.args.timeout_s:
            return f"past --timeout-s ({self.args.timeout_s:.0f} s) after {self.tally.calls} calls"
        if len(self.tally.failures) >= MAX_FAILURES:
            return f"{len(self.tally.failures)} calls failed"
        return None

    def known_ids(self) -> set[str]:
        """Every container the server ran for the soak: from the results and from the app log."""
        self.server.container_ids |= self.tally.containers | parse_log(self.log.lines_since_mark()).container_ids
        return self.server.container_ids

    def quiet_sample(self, reference: HostSample | None, *, counters: bool = False) -> tuple[bool, HostSample]:
        """Whether every container has gone (``warmboot container list`` empty), and the host then."""
        gone = wait_for_no_containers()
        empty = HostSample([], [], [], [], [], 0, 0, 0)
        return gone, settled_sample(self.server, self.known_ids, reference or empty, self.tolerances, counters=counters)

    def run(self) -> int:
        """Make the snapshot, run the calls, wait for every container to go, report; the exit status."""
        first_call(self.fn, self.tally)
        gone, before = self.quiet_sample(None)
        if not gone:
            raise RuntimeError("the first call's container did not stop (is max_inputs=1 honoured?)")
        baselines = Baselines(before)
        self.log.set_mark()
        restores_before = (snapshot_record() or {}).get("restores", 0)
        print(
            f"soak: baseline: server pid {self.server.pid}, {before.server_fds} fds, {before.server_threads} threads, "
            f"{before.server_rss_kib / 1024:.0f} MiB; {self.args.restores} calls, bursts of {self.args.burst}",
            flush=True,
        )
        for kind, inputs in schedule(self.args.restores, self.args.burst):
            if (why := self.why_stop()) is not None:
                self.stopped_early = why
                print(f"soak: stopping early: {why}", flush=True)
                break
            if kind == "remote":
                one_at_a_time(self.fn, inputs, self.tally, timeout=self.args.call_timeout_s)
            else:
                burst(self.fn, inputs, self.tally, use_map=kind == "map", timeout=self.args.call_timeout_s)
            if self.tally.calls % PROGRESS_EVERY == 0 or self.tally.calls == self.args.restores:
                progress(self.tally, self.log, self.server, self.args.restores, self.started)
            if baselines.warm is None and self.tally.calls >= PROGRESS_EVERY:
                baselines.warm = self.quiet_sample(before)[1]

        gone, after = self.quiet_sample(baselines.reference(), counters=True)
        counts = parse_log(self.log.lines_since_mark())
        record = snapshot_record()
        snapshot_restores = (record["restores"] if record else 0) - restores_before
        found_leaks = leaks(baselines.reference(), after, self.tolerances)
        wall_s = time.monotonic() - self.started

        print(f"\nsoak summary (WARMBOOT_HOME {self.server.home}):")
        print(table(report(self.tally, counts, snapshot_restores, baselines, after, found_leaks, gone, wall_s)))
        issues = problems(self.tally, counts, snapshot_restores, gone)
        if self.stopped_early:
            issues.append(f"stopped early: {self.stopped_early}")
        issues += [f"leak: {k}: {v}" for k, v in found_leaks.items()]
        for issue in issues:
            print(f"  ! {issue}")
        print(f"\nsoak: {'FAILED' if issues else 'PASSED'}", flush=True)
        return 1 if issues else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restores", type=int, default=1000, help="calls after the first, each one a restore")
    parser.add_argument("--burst", type=int, default=8, help="calls started at once in a burst (default 8)")
    parser.add_argument(
        "--rss-tolerance-mib",
        type=float,
        default=64.0,
        help="how much the server's VmRSS may grow before it counts as a leak (default 64 MiB)",
    )
    parser.add_argument(
        "--call-timeout-s", type=float, default=120.0, help="a call with no result after this long fails (120 s)"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=900.0, help="make no more calls after this long, and fail (default 900 s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the soak's WARMBOOT_HOME (for its logs)")
    args = parser.parse_args(argv)
    if args.restores < 1 or args.burst < 1:
        parser.error("--restores and --burst must be at least 1")
    return args


def on_sigterm(_signum: int, _frame: Any) -> None:
    """SIGTERM ends the soak through its cleanup, as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench/soak.py must run as root (CRIU, containers, cgroups)")
    server = Server()
    os.environ["WARMBOOT_HOME"] = str(server.home)  # the SDK in this process talks to our server only
    signal.signal(signal.SIGTERM, on_sigterm)
    status = 1
    try:
        server.start()
        print(f"soak: server pid {server.pid} on WARMBOOT_HOME={server.home}", flush=True)
        status = Soak(server, args).run()
    except KeyboardInterrupt:
        print("\nsoak: interrupted", flush=True)
        status = 130
    except (RuntimeError, CallTimeout, OSError, WarmbootError) as exc:
        print(f"\nsoak: {exc}\n--- server log (tail) ---\n{server.log_tail()}", flush=True)
    finally:
        server.close(keep_home=args.keep)
    return status


if __name__ == "__main__":
    sys.exit(main())
