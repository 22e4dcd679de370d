"""Isolation runtime for the snapshot engine: runc (OCI runtime) vs raw namespaces + CRIU, measured here.

Run as root from the repository root::

    .venv/bin/python bench/runtime_choice.py [--runs N]

For a small ``python3 -S`` process that answers one line on a pipe, it measures the median time

  (a) from start to the first reply: warmboot's ``container.start`` (``unshare --pid --fork --mount``)
      vs ``runc run -d`` (stdio pipes passed through to the container);
  (b) from restore to the first reply: ``SnapshotStore.restore`` (``criu restore`` with ``--inherit-fd``)
      vs ``runc restore -d`` from a ``runc checkpoint`` image (runc maps the stdio pipes itself).

The runc half is skipped, with a message, when ``runc`` is not installed; this script installs nothing.
runc is given warmboot's CRIU (``WARMBOOT_CRIU`` or /opt/warmboot/criu/bin/criu) through a private ``criu``
symlink put first on ``PATH`` for runc's commands only. The runc bundle's root is an empty directory with the
host's /usr bind-mounted read-only and /bin, /lib, /lib64, /sbin as symlinks into /usr (bind mounts of the
host's merged-/usr symlinks there make CRIU's restore fail in mnt-v2 ``move_mount``).

Prints a table and writes docs/benchmarks/runtime-choice.json. Every container and temporary directory it
makes is removed at the end (``runc delete -f``, then the runc state root).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from warmboot import config
from warmboot.errors import WarmbootError
from warmboot.worker import container as containers
from warmboot.worker import criu
from warmboot.worker.snapshot import SnapshotStore

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "benchmarks" / "runtime-choice.json"
PYTHON = "/usr/bin/python3"  # the host's Debian python: the same binary inside the runc bundle (host /usr)
REQUEST = b"ping\n"
REPLY = b"pong ping\n"
REPLY_TIMEOUT_S = 15.0

# The process under test: answer every line read on fd argv[1] with "pong <line>" on fd argv[2].
CHILD = (
    "import os, sys\n"
    "i, o = int(sys.argv[1]), int(sys.argv[2])\n"
    "f = os.fdopen(i, 'rb', 0)\n"
    "for line in iter(f.readline, b''):\n"
    "    os.write(o, b'pong ' + line)\n"
)


class BenchError(RuntimeError):
    """One measurement step failed; the message carries the error lines to record."""


#: What a failed step raises: recorded as a result (the runtime does not work here), not a crash.
STEP_ERRORS = (BenchError, WarmbootError, OSError, subprocess.SubprocessError, TimeoutError, ValueError)


def read_line(fd: int, timeout: float = REPLY_TIMEOUT_S) -> bytes:
    """Read one line from ``fd`` (a pipe), byte by byte, giving up after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BenchError(f"no reply within {timeout} s (got {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            raise BenchError(f"pipe closed before a reply (got {buf!r})")
        buf += chunk
    return buf


def summary(samples: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in samples]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "min_ms": round(min(ms), 1),
        "max_ms": round(max(ms), 1),
        "samples_ms": [round(x, 1) for x in ms],
    }


def criu_binary() -> str:
    return str(shutil.which(str(criu.binary())) or criu.binary())


# ----- raw: warmboot's own engine ------------------------------------------------------------------------------


class Raw:
    def __init__(self, tmp: Path):
        self.store = SnapshotStore(tmp / "snapshots")
        self.live: list[containers.Container] = []

    def _spec(self) -> containers.ContainerSpec:
        return containers.ContainerSpec(argv=[PYTHON, "-S", "-c", CHILD, "3", "4"], env={"PATH": "/usr/bin:/bin"})

    def _ask(self, c: containers.Container) -> None:
        c.channels.control_in.write(REQUEST)
        reply = read_line(c.channels.control_out.fileno())
        if reply != REPLY:
            raise BenchError(f"raw: unexpected reply {reply!r}")

    def start(self) -> float:
        t0 = time.perf_counter()
        c = containers.start(self._spec())
        self.live.append(c)
        self._ask(c)
        elapsed = time.perf_counter() - t0
        self._kill(c)
        return elapsed

    def make_snapshot(self) -> Any:
        c = containers.start(self._spec())
        self.live.append(c)
        self._ask(c)  # the snapshot is of a process that has answered once, as a warm worker would be
        snap = self.store.checkpoint(c)
        c.wait(timeout=10)
        self._kill(c)
        return snap

    def restore(self, snap: Any) -> float:
        t0 = time.perf_counter()
        c = self.store.restore(snap)
        self.live.append(c)
        self._ask(c)
        elapsed = time.perf_counter() - t0
        self._kill(c)
        return elapsed

    def _kill(self, c: containers.Container) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            c.kill(timeout=10)
        with contextlib.suppress(ValueError):
            self.live.remove(c)

    def cleanup(self) -> None:
        for c in list(self.live):
            self._kill(c)


# ----- runc ------------------------------------------------------------------------------------------------------


class Runc:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.state = tmp / "runc-state"
        self.state.mkdir()
        bindir = tmp / "bin"
        bindir.mkdir()
        (bindir / "criu").symlink_to(criu_binary())
        self.env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        self.bundle = tmp / "bundle"
        self.config = self._make_bundle()
        self.created: list[str] = []
        self._seq = 0

    def _make_bundle(self) -> dict[str, Any]:
        rootfs = self.bundle / "rootfs"
        rootfs.mkdir(parents=True)
        for d in ("usr", "proc", "dev", "sys", "tmp", "etc"):
            (rootfs / d).mkdir()
        for link in ("bin", "lib", "lib64", "sbin"):
            (rootfs / link).symlink_to(f"usr/{link}")
        self.run(["spec", "--bundle", str(self.bundle)])
        cfg = json.loads((self.bundle / "config.json").read_text())
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = [PYTHON, "-S", "-c", CHILD, "0", "1"]
        cfg["process"]["env"] = ["PATH=/usr/bin:/bin"]
        cfg["hostname"] = "wb-bench"
        cfg["mounts"].append({"destination": "/usr", "type": "bind", "source": "/usr", "options": ["bind", "ro"]})
        cfg["mounts"].append(
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        )
        # Same namespaces as the raw engine's (pid, mount) plus runc's ipc and uts; no network namespace,
        # which the raw engine does not make either.
        cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
        (self.bundle / "config.json").write_text(json.dumps(cfg, indent=1))
        return cfg

    def run(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            ["runc", "--root", str(self.state), *args], env=self.env, capture_output=True, check=False, **kw
        )
        if proc.returncode != 0:
            raise BenchError(f"runc {args[0]} failed (exit {proc.returncode}): {proc.stderr.decode().strip()}")
        return proc

    def _new_id(self, what: str) -> str:
        self._seq += 1
        cid = f"wb-bench-{os.getpid()}-{what}{self._seq}"
        self.created.append(cid)
        return cid

    def _launch(self, args: list[str]) -> tuple[float, int, int, int]:
        """Run a detached runc command with fresh stdio pipes; return (time to first reply, fds to close...)."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                ["runc", "--root", str(self.state), *args],
                env=self.env,
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                close_fds=True,
            )
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        try:
            os.write(in_w, REQUEST)
            try:
                reply = read_line(out_r)
            except BenchError as exc:
                proc.wait(timeout=30)
                raise BenchError(f"runc {args[0]}: {exc}; stderr: {_drain(err_r)}") from None
            elapsed = time.perf_counter() - t0
            if reply != REPLY:
                raise BenchError(f"runc {args[0]}: unexpected reply {reply!r}")
            if proc.wait(timeout=30) != 0:
                raise BenchError(f"runc {args[0]} exited {proc.returncode}: {_drain(err_r)}")
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        return elapsed, in_w, out_r, err_r

    def start(self) -> float:
        cid = self._new_id("run")
        elapsed, *fds = self._launch(["run", "-d", "--bundle", str(self.bundle), cid])
        self._close(fds)
        self.delete(cid)
        return elapsed

    def make_snapshot(self) -> Path:
        cid = self._new_id("ckpt")
        _, *fds = self._launch(["run", "-d", "--bundle", str(self.bundle), cid])
        image = self.tmp / "image"
        try:
            self.run(["checkpoint", "--image-path", str(image), "--work-path", str(self.tmp / "ckpt-work"), cid])
        except BenchError as exc:
            raise BenchError(f"{exc}; criu log: {_criu_errors(self.tmp / 'ckpt-work' / 'dump.log')}") from None
        finally:
            self._close(fds)
        self.delete(cid)
        return image

    def restore(self, image: Path) -> float:
        cid = self._new_id("rst")
        work = self.tmp / f"restore-work-{cid}"
        args = ["restore", "-d", "--image-path", str(image), "--work-path", str(work), "--bundle", str(self.bundle)]
        try:
            elapsed, *fds = self._launch([*args, cid])
        except BenchError as exc:
            raise BenchError(f"{exc}; criu log: {_criu_errors(work / 'restore.log')}") from None
        self._close(fds)
        self.delete(cid)
        shutil.rmtree(work, ignore_errors=True)
        return elapsed

    def delete(self, cid: str) -> None:
        pid = None
        with contextlib.suppress(BenchError, ValueError, KeyError):
            pid = int(json.loads(self.run(["state", cid]).stdout)["pid"])
        self.run(["delete", "-f", cid])
        self.created.remove(cid)
        if pid:  # this process is a child subreaper (warmboot's restore made it one): reap the init
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    @staticmethod
    def _close(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def cleanup(self) -> list[str]:
        errors = []
        for cid in list(self.created):
            try:
                self.delete(cid)
            except BenchError as exc:
                if "does not exist" not in str(exc):
                    errors.append(str(exc))
                with contextlib.suppress(ValueError):
                    self.created.remove(cid)
        leftovers = self.run(["list", "-q"]).stdout.decode().split()
        errors += [f"runc container {cid} left behind" for cid in leftovers]
        return errors


def _drain(fd: int) -> str:
    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace").strip()


def _criu_errors(log: Path) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return [f"(no CRIU log at {log})"]
    errs = [ln.strip() for ln in lines if re.search(r"\bError\b", ln) and "RLIMIT_NOFILE" not in ln]
    return errs[-15:]


def runc_version() -> str | None:
    if shutil.which("runc") is None:
        return None
    out = subprocess.run(["runc", "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].removeprefix("runc version ").strip() if out else "unknown"


# ----- driver ----------------------------------------------------------------------------------------------------


def measure(name: str, fn: Callable[[], float], runs: int, failures: list[dict[str, str]]) -> list[float]:
    """``runs`` timed calls of ``fn`` after one untimed warm-up; stops at the first failure and records it."""
    samples: list[float] = []
    for i in range(runs + 1):
        try:
            elapsed = fn()
        except STEP_ERRORS as exc:
            failures.append({"what": name, "run": str(i), "error": str(exc), "type": type(exc).__name__})
            print(f"  {name}: FAILED: {exc}", file=sys.stderr)
            break
        if i > 0:
            samples.append(elapsed)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each measurement (default 10, min 5)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    opts = parser.parse_args()
    runs = max(5, opts.runs)
    if os.geteuid() != 0:
        print("must run as root (namespaces, CRIU, runc)", file=sys.stderr)
        return 2

    failures: list[dict[str, str]] = []
    results: dict[str, dict[str, Any]] = {"start_to_first_reply": {}, "restore_to_first_reply": {}}
    rv = runc_version()
    runc_skipped = None
    if rv is None:
        runc_skipped = "runc is not installed (not on PATH): runc half skipped; install it (apt-get install runc)"
        print(runc_skipped, file=sys.stderr)

    containers.ensure_subreaper()  # as warmboot's worker is; done up front so both halves run alike
    tmp = Path(tempfile.mkdtemp(prefix="wb-runtime-choice-"))
    raw = Raw(tmp / "raw")
    rc: Runc | None = None
    cleanup_errors: list[str] = []
    try:
        if rv is not None:
            try:
                (tmp / "runc").mkdir()
                rc = Runc(tmp / "runc")
            except (BenchError, OSError) as exc:
                failures.append({"what": "runc bundle", "run": "-", "error": str(exc), "type": type(exc).__name__})
        print(f"(a) start to first reply, {runs} runs each ...", file=sys.stderr)
        results["start_to_first_reply"]["raw"] = summary(measure("raw start", raw.start, runs, failures))
        if rc is not None:
            results["start_to_first_reply"]["runc"] = summary(measure("runc run -d", rc.start, runs, failures))

        print(f"(b) restore to first reply, {runs} runs each ...", file=sys.stderr)
        try:
            snap = raw.make_snapshot()
            results["restore_to_first_reply"]["raw"] = summary(
                measure("raw restore", lambda: raw.restore(snap), runs, failures)
            )
        except STEP_ERRORS as exc:
            failures.append({"what": "raw checkpoint", "run": "-", "error": str(exc), "type": type(exc).__name__})
        if rc is not None:
            try:
                image = rc.make_snapshot()
                results["restore_to_first_reply"]["runc"] = summary(
                    measure("runc restore -d", lambda: rc.restore(image), runs, failures)
                )
            except STEP_ERRORS as exc:
                failures.append({"what": "runc checkpoint", "run": "-", "error": str(exc), "type": type(exc).__name__})
    finally:
        raw.cleanup()
        if rc is not None:
            try:
                cleanup_errors = rc.cleanup()
            except BenchError as exc:
                cleanup_errors = [str(exc)]
        shutil.rmtree(tmp, ignore_errors=True)

    report = {
        "what": "isolation runtime for the snapshot engine: runc vs raw unshare + CRIU (median of timed runs)",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "os": _os_release(),
        },
        "runc_version": rv,
        "criu_version": criu.version(),
        "criu_binary": str(config.criu_path()),
        "process": f"{PYTHON} -S -c <answer each line read on a pipe>",
        "runs": runs,
        "warmup_runs": 1,
        "method": {
            "start_to_first_reply": "from launching (containers.start / Popen `runc run -d`) until the reply line "
            "to a request written right after launch is read; runc's stdio pipes are passed through to the container",
            "restore_to_first_reply": "from calling SnapshotStore.restore (manifest + checksum check, criu restore "
            "--inherit-fd) / Popen `runc restore -d` until the reply line is read; both images are of a process "
            "that has answered once, restored sequentially from one image",
            "runc_bundle": "rootfs = empty dir + host /usr bind (ro), /bin /lib /lib64 /sbin symlinks into /usr; "
            "`runc spec` defaults otherwise, minus the network namespace; terminal false",
            "runc_namespaces": [n["type"] for n in rc.config["linux"]["namespaces"]] if rc else None,
            "raw_namespaces": ["pid", "mount"],
        },
        "results": results,
        "runc_skipped": runc_skipped,
        "failures": failures,
        "cleanup_errors": cleanup_errors,
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"\nwritten: {opts.output}")
    return 1 if failures or cleanup_errors else 0


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\nruntime choice: kernel {report['host']['kernel']}, {report['host']['cpus']} CPUs, "
        f"runc {report['runc_version'] or '(not installed)'}, CRIU {report['criu_version']}, "
        f"{report['runs']} runs each (median / min, ms)"
    )
    print(f"{'measurement':<26}{'raw (unshare + criu)':>24}{'runc':>20}{'runc - raw':>14}")
    for key, label in (
        ("start_to_first_reply", "start -> first reply"),
        ("restore_to_first_reply", "restore -> first reply"),
    ):
        row = report["results"][key]
        cells = []
        for rt in ("raw", "runc"):
            s = row.get(rt)
            cells.append(f"{s['median_ms']:.1f} / {s['min_ms']:.1f}" if s and s.get("n") else "n/a")
        r, u = row.get("raw", {}), row.get("runc", {})
        diff = f"{u['median_ms'] - r['median_ms']:+.1f}" if r.get("n") and u.get("n") else "n/a"
        print(f"{label:<26}{cells[0]:>24}{cells[1]:>20}{diff:>14}")
    if report["runc_skipped"]:
        print(f"note: {report['runc_skipped']}")
    for f in report["failures"]:
        print(f"FAILED {f['what']} (run {f['run']}): {f['error']}")
    for e in report["cleanup_errors"]:
        print(f"cleanup: {e}")


if __name__ == "__main__":
    sys.exit(main())
