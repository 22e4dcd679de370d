"""Cold start versus snapshot restore, for a trivial Python process and one holding 300 MiB of numpy data.

Usage: ``.venv/bin/python bench/restore.py [--runs N] [--json PATH] [--workload NAME ...]`` (as root;
CRIU must be installed, see ``make setup``).

Each workload runs in a real container on an image built by the images package (``debian_slim``, plus
``pip_install("numpy")`` for the numpy one), with the runtime layer on top, as a function's container is.
Images are cached under ``--images`` (default /var/tmp/warmboot-bench-images), so only the first run builds.

For each workload the child process does its init, then loops: read a request line on its control-in pipe
(fd 3), write a reply line on its control-out pipe (fd 4). The reply echoes the request's token, the random
nonce the process drew at init and a value computed from its state (for numpy: the sum of the whole array),
so a correct reply proves that the state is there and, after a restore, that it is the snapshot's state.

* cold start: from ``container.start()`` to the reply to the first request (sent right after start returns);
* restore: one snapshot is made (cold start, one request answered, checkpoint without leave-running),
  then each run measures from ``store.restore()`` to the reply to the first request.

Cold and restore runs alternate, so drift on the host hits both alike. Every container is killed after its
measurement; the snapshot store is a temporary directory removed at the end. The snapshot images sit in the
page cache when they are restored (they were just written), so restore times are warm-cache times.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import select
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmboot.sdk.image import Image
from warmboot.worker import container as containers
from warmboot.worker import host, runtime_lib
from warmboot.worker.images import build_image
from warmboot.worker.snapshot import SnapshotStore

MIN_RUNS = 5
REPLY_TIMEOUT_S = 60.0

# The children write one reply line per request: "<token> <nonce> <value> <handler microseconds>".
TRIVIAL_CHILD = """
import os, time
nonce = os.urandom(8).hex()
state = {i: i * i for i in range(1000)}
cin = os.fdopen(3, "rb", buffering=0)
cout = os.fdopen(4, "wb", buffering=0)
for line in cin:
    t = time.perf_counter()
    value = sum(state.values())
    us = round((time.perf_counter() - t) * 1e6)
    cout.write(f"{line.decode().strip()} {nonce} {value} {us}\\n".encode())
"""

NUMPY_MIB = 300
NUMPY_ELEMENTS = NUMPY_MIB * 2**20 // 8  # float64
NUMPY_CHILD = f"""
import os, time
import numpy as np
nonce = os.urandom(8).hex()
a = np.arange({NUMPY_ELEMENTS}, dtype=np.float64)  # every page written
cin = os.fdopen(3, "rb", buffering=0)
cout = os.fdopen(4, "wb", buffering=0)
for line in cin:
    t = time.perf_counter()
    value = int(a.sum())  # reads every page; exact: all partial sums are integers below 2**53
    us = round((time.perf_counter() - t) * 1e6)
    cout.write(f"{{line.decode().strip()}} {{nonce}} {{value}} {{us}}\\n".encode())
"""


@dataclass(frozen=True)
class Workload:
    name: str
    image: Callable[[], Image]
    python_args: list[str]  #: the interpreter's arguments (the interpreter is the image's)
    expected_value: int


WORKLOADS = {
    w.name: w
    for w in (
        Workload("trivial", Image.debian_slim, ["-S", "-c", TRIVIAL_CHILD], sum(i * i for i in range(1000))),
        # No -S: numpy lives in the image's site-packages.
        Workload(
            f"numpy-{NUMPY_MIB}MB",
            lambda: Image.debian_slim().pip_install("numpy"),
            ["-c", NUMPY_CHILD],
            NUMPY_ELEMENTS * (NUMPY_ELEMENTS - 1) // 2,
        ),
    )
}


@dataclass
class Rootfs:
    """Where a workload's containers run: its image's layers with the runtime layer on top, and run dirs."""

    layers: tuple[Path, ...]
    python: str
    env: dict[str, str]
    run_root: Path
    _serial: Iterator[int] = field(default_factory=itertools.count)

    def spec(self, workload: Workload) -> containers.ContainerSpec:
        return containers.ContainerSpec(
            argv=[self.python, *workload.python_args],
            layers=self.layers,
            run_dir=self.next_run_dir(),
            env=self.env,
            cwd="/root",
        )

    def next_run_dir(self) -> Path:
        return self.run_root / f"c{next(self._serial)}"


def build_rootfs(workload: Workload, images_root: Path, run_root: Path, log: Callable[[str], None]) -> Rootfs:
    """Build (or find cached) the workload's image; its containers get the runtime layer on top, as functions do."""
    t0 = time.perf_counter()
    built = build_image(workload.image().to_spec(), root=images_root, progress=lambda line: log(f"  {line}"))
    log(f"{workload.name}: image {built.digest[:12]} ready in {time.perf_counter() - t0:.1f} s")
    runtime = runtime_lib.ensure(images_root / "home")
    return Rootfs((*built.layers, runtime), built.python, dict(built.env), run_root)


class BenchError(RuntimeError):
    """A container gave no reply, or a wrong one."""


@dataclass(frozen=True)
class Reply:
    token: str
    nonce: str
    value: int
    handler_us: int


@dataclass
class Result:
    workload: str
    runs: int
    cold_ms: list[float] = field(default_factory=list)
    cold_start_call_ms: list[float] = field(default_factory=list)
    restore_ms: list[float] = field(default_factory=list)
    restore_call_ms: list[float] = field(default_factory=list)
    handler_cold_ms: list[float] = field(default_factory=list)
    handler_restored_ms: list[float] = field(default_factory=list)
    first_cold_ms: float = 0.0  # the start that made the snapshot: first of all, caches coldest
    snapshot_bytes: int = 0
    snapshot_pages_bytes: int = 0
    dump_seconds: float = 0.0
    checkpoint_call_seconds: float = 0.0
    image_check_ms: float = 0.0

    @property
    def speedup(self) -> float:
        return statistics.median(self.cold_ms) / statistics.median(self.restore_ms)


def _drain(stream: Any) -> str:
    """Whatever the container has written on ``stream`` so far, without blocking (for error messages)."""
    try:
        fd = stream.fileno()
        os.set_blocking(fd, False)
        return os.read(fd, 65536).decode(errors="replace")
    except (OSError, ValueError):
        return ""


def _read_line(stream: Any, timeout: float) -> str:
    """One line from a container's pipe; raises :class:`BenchError` on timeout or end of file."""
    fd = stream.fileno()
    buf = b""
    deadline = time.perf_counter() + timeout
    while b"\n" not in buf:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise BenchError(f"no reply within {timeout} s (got {buf!r} so far)")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise BenchError(f"control-out pipe closed before a full reply (got {buf!r})")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    if rest:
        raise BenchError(f"more than one reply line: {buf!r}")
    return line.decode()


def _request(c: containers.Container, token: str, workload: Workload, nonce: str | None = None) -> Reply:
    """Send one request and check the reply: our token, the workload's value and (if given) the nonce."""
    c.channels.control_in.write(f"{token}\n".encode())
    try:
        line = _read_line(c.channels.control_out, REPLY_TIMEOUT_S)
    except BenchError as exc:
        raise BenchError(f"{workload.name}: {exc}; container stderr: {_drain(c.channels.stderr)!r}") from exc
    parts = line.split()
    if len(parts) != 4:
        raise BenchError(f"{workload.name}: malformed reply {line!r}")
    reply = Reply(parts[0], parts[1], int(parts[2]), int(parts[3]))
    if reply.token != token:
        raise BenchError(f"{workload.name}: reply to {reply.token!r}, expected {token!r}")
    if reply.value != workload.expected_value:
        raise BenchError(f"{workload.name}: state value {reply.value}, expected {workload.expected_value}")
    if nonce is not None and reply.nonce != nonce:
        raise BenchError(f"{workload.name}: nonce {reply.nonce}, expected the snapshot's {nonce}")
    return reply


@contextlib.contextmanager
def _killed_after(c: containers.Container) -> Iterator[containers.Container]:
    try:
        yield c
    finally:
        c.kill()


def bench_workload(
    workload: Workload, rootfs: Rootfs, runs: int, store: SnapshotStore, log: Callable[[str], None]
) -> Result:
    result = Result(workload.name, runs)

    # The snapshot: cold start, answer one request, dump (CRIU kills the container once dumped).
    t0 = time.perf_counter()
    source = containers.start(rootfs.spec(workload))
    with _killed_after(source):
        snap_reply = _request(source, "ready", workload)
        result.first_cold_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        snap = store.checkpoint(source, leave_running=False)
        result.checkpoint_call_seconds = time.perf_counter() - t1
    result.snapshot_bytes = snap.size_bytes
    result.snapshot_pages_bytes = snap.pages_bytes
    result.dump_seconds = float(snap.manifest["dump_seconds"])
    log(
        f"{workload.name}: snapshot {snap.size_bytes / 2**20:.1f} MiB, dump {result.dump_seconds:.3f} s "
        f"(checkpoint() {result.checkpoint_call_seconds:.3f} s)"
    )

    cold_nonces = set()
    for i in range(runs):
        t0 = time.perf_counter()
        c = containers.start(rootfs.spec(workload))
        started = time.perf_counter()
        with _killed_after(c):
            reply = _request(c, f"cold-{i}", workload)
            done = time.perf_counter()
        if reply.nonce == snap_reply.nonce or reply.nonce in cold_nonces:
            raise BenchError(f"{workload.name}: cold start {i} repeated nonce {reply.nonce}")
        cold_nonces.add(reply.nonce)
        result.cold_ms.append((done - t0) * 1e3)
        result.cold_start_call_ms.append((started - t0) * 1e3)
        result.handler_cold_ms.append(reply.handler_us / 1e3)

        t0 = time.perf_counter()
        r = store.restore(snap, rootfs.next_run_dir())
        restored = time.perf_counter()
        with _killed_after(r):
            reply = _request(r, f"restore-{i}", workload, nonce=snap_reply.nonce)
            done = time.perf_counter()
        result.restore_ms.append((done - t0) * 1e3)
        result.restore_call_ms.append((restored - t0) * 1e3)
        result.handler_restored_ms.append(reply.handler_us / 1e3)
        log(
            f"{workload.name}: run {i + 1}/{runs}: "
            f"cold {result.cold_ms[-1]:.1f} ms, restore {result.restore_ms[-1]:.1f} ms"
        )

    # What restore() spends verifying the images (xxh3 of every file) before CRIU runs.
    checks = []
    for _ in range(3):
        t0 = time.perf_counter()
        store.check(snap)
        checks.append((time.perf_counter() - t0) * 1e3)
    result.image_check_ms = statistics.median(checks)
    store.delete(snap.id)
    return result


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    # Nearest-rank p95: with a handful of runs it is the maximum.
    p95 = ordered[min(len(ordered) - 1, max(0, -(-95 * len(ordered) // 100) - 1))]
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p95": p95,
        "stdev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
    }


def _table_rows(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "workload",
        "cold median (ms)",
        "cold min-max (ms)",
        "restore median (ms)",
        "restore min-max (ms)",
        "speed-up",
        "snapshot (MiB)",
        "dump time (s)",
    ]
    rows = []
    for r in results:
        cold, rest = _summary(r.cold_ms), _summary(r.restore_ms)
        rows.append(
            [
                r.workload,
                f"{cold['median']:.1f}",
                f"{cold['min']:.1f}-{cold['max']:.1f}",
                f"{rest['median']:.1f}",
                f"{rest['min']:.1f}-{rest['max']:.1f}",
                f"{r.speedup:.1f}x",
                f"{r.snapshot_bytes / 2**20:.1f}",
                f"{r.dump_seconds:.2f}",
            ]
        )
    return headers, rows


def _print_table(results: list[Result], runs: int) -> None:
    headers, rows = _table_rows(results)
    title = f"warmboot: cold start vs restore, {runs} runs each (median; min-max)"
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        print(title)
        for cells in (headers, *rows):
            print(line(cells))
        return
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="right" if i else "left")
    for row in rows:
        table.add_row(*row)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)


def _print_breakdown(results: list[Result]) -> None:
    med = statistics.median
    for r in results:
        cold, start_call = med(r.cold_ms), med(r.cold_start_call_ms)
        restore, restore_call = med(r.restore_ms), med(r.restore_call_ms)
        print(
            f"{r.workload}: cold = start() {start_call:.1f} ms + init + first reply {cold - start_call:.1f} ms;"
            f" restore = restore() {restore_call:.1f} ms (image checksums {r.image_check_ms:.1f} ms of it)"
            f" + first reply {restore - restore_call:.1f} ms; handler {med(r.handler_cold_ms):.2f} ms cold,"
            f" {med(r.handler_restored_ms):.2f} ms restored; very first cold start {r.first_cold_ms:.1f} ms"
        )


def _to_json(results: list[Result], runs: int) -> dict[str, Any]:
    fp = host.fingerprint()
    return {
        "runs": runs,
        "host": {"kernel": fp.kernel, "cpu_model": fp.cpu_model, "criu_version": fp.criu_version},
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "workloads": [
            {
                "workload": r.workload,
                "cold_ms": _summary(r.cold_ms) | {"runs": r.cold_ms},
                "restore_ms": _summary(r.restore_ms) | {"runs": r.restore_ms},
                "speedup_median": r.speedup,
                "cold_start_call_ms": r.cold_start_call_ms,
                "restore_call_ms": r.restore_call_ms,
                "handler_cold_ms": r.handler_cold_ms,
                "handler_restored_ms": r.handler_restored_ms,
                "first_cold_ms": r.first_cold_ms,
                "snapshot_bytes": r.snapshot_bytes,
                "snapshot_pages_bytes": r.snapshot_pages_bytes,
                "dump_seconds": r.dump_seconds,
                "checkpoint_call_seconds": r.checkpoint_call_seconds,
                "image_check_ms": r.image_check_ms,
            }
            for r in results
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=MIN_RUNS, help=f"runs per workload (at least {MIN_RUNS})")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--workload", action="append", choices=sorted(WORKLOADS), help="only this workload (repeatable)"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-run progress on stderr")
    parser.add_argument(
        "--images",
        type=Path,
        default=Path("/var/tmp/warmboot-bench-images"),
        help="where images are built and cached (default: %(default)s)",
    )
    opts = parser.parse_args(argv)
    if opts.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS}")
    if os.geteuid() != 0:
        parser.error("must run as root (CRIU and namespaces)")

    def log(msg: str) -> None:
        if not opts.quiet:
            print(msg, file=sys.stderr, flush=True)

    names = opts.workload or list(WORKLOADS)
    tmp_root = "/var/tmp" if os.path.isdir("/var/tmp") else None
    work = Path(tempfile.mkdtemp(prefix="warmboot-bench-", dir=tmp_root))
    try:
        store = SnapshotStore(work / "snapshots")
        results = []
        for name in names:
            rootfs = build_rootfs(WORKLOADS[name], opts.images, work / "containers", log)
            results.append(bench_workload(WORKLOADS[name], rootfs, opts.runs, store, log))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    _print_table(results, opts.runs)
    _print_breakdown(results)
    if opts.json is not None:
        opts.json.write_text(json.dumps(_to_json(results, opts.runs), indent=2) + "\n")
        print(f"results written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
