"""`make bench-techniques`: issue 12's restore techniques, each measured on W2's own snapshot, kept or not.

Usage: ``.venv/bin/python bench/restore_techniques.py [--runs N] [--host-thp]`` (as root; after `make bench`,
whose W2 snapshot it restores: the Embedder, sentence-transformers with all-MiniLM-L6-v2).

Every timed run restores W2's snapshot with the engine (``SnapshotStore.restore``), writes START and one call on
the copy's pipes and stops the clock at the call's result, as ``bench/raw_baseline.py`` does; the result is
checked against the first run's. Variants alternate run by run, so drift on the host hits them alike:

- **memory copy** (what warmboot does): CRIU reads the uncompressed copy kept in a tmpfs;
- **page cache**: the images uncompressed in a folder on disk, page cache warm (warmboot before compression);
- **lazy pages**: CRIU's ``--lazy-pages`` with its ``lazy-pages`` daemon serving the copy over userfaultfd;
- **THP always** (only with ``--host-thp``, which sets the host-wide THP mode to ``always`` for those runs and
  puts it back): what huge pages would give restored memory;
- disk-cold (page cache dropped before each run): raw images on disk; compressed images with no memory copy
  (decompressed on the restore's path); the memory copy (a tmpfs is not dropped).

Also measured: how much of the snapshot's memory the first call touches (the working set a REAP-style prefetch
would load first), CRIU's page loading by one thread against two (parallel page loading), and what the setup
around CRIU costs per restore (what a container shell prepared ahead would save).

Writes docs/benchmarks/restore-techniques.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import mmap
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from raw_baseline import restore_and_call as raw_restore_and_call

from warmboot import config
from warmboot.worker import cgroups, criu
from warmboot.worker import container as containers
from warmboot.worker.container import Container
from warmboot.worker.sandbox import netns, rootfs
from warmboot.worker.snapshot import Snapshot, SnapshotStore

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"
W2_APP = "sentence-transformers"
KWARGS = {"sentences": ["what is the meaning of life?"]}
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def w2_snapshot(store: SnapshotStore) -> Snapshot:
    found = [s for s in store.list() if s.manifest.get("metadata", {}).get("app") == W2_APP]
    if not found:
        raise SystemExit(f"no snapshot of {W2_APP} in {store.root}: run `make bench` first")
    return found[-1]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextlib.contextmanager
def images_from(store: SnapshotStore, folder: Path | None) -> Iterator[None]:
    """Restores of ``store`` read their images from ``folder`` (None: the store's own way)."""
    if folder is None:
        yield
        return
    original = store._images

    @contextlib.contextmanager
    def fixed(_snapshot: Snapshot) -> Iterator[Path]:
        yield folder

    store._images = fixed  # type: ignore[method-assign]
    try:
        yield
    finally:
        store._images = original  # type: ignore[method-assign]


@contextlib.contextmanager
def lazy_pages(images: Path, work: Path) -> Iterator[None]:
    """CRIU restores run with ``--lazy-pages``, a ``criu lazy-pages`` daemon serving ``images`` to each."""
    original = criu.run
    daemons: list[subprocess.Popen[bytes]] = []

    def run(args: list[str], **kw: Any) -> criu.CriuResult:
        if args and args[0] == "restore":
            socket = work / "lazy-pages.socket"
            socket.unlink(missing_ok=True)  # a previous daemon's: its existence is how we see the new one listen
            cmd = [*criu._kdat_cache_prefix(), str(criu.binary()), "lazy-pages", "-D", str(images), "-W", str(work)]
            cmd += ["--log-file", str(work / "lazy-pages.log")]
            daemons.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
            deadline = time.monotonic() + 10
            while not socket.exists():  # the daemon's socket is how a restore reaches it: nothing to wait on
                if time.monotonic() > deadline or daemons[-1].poll() is not None:
                    raise RuntimeError(f"criu lazy-pages did not start; see {work / 'lazy-pages.log'}")
                time.sleep(0.001)
            args = [*args, "--lazy-pages", "-W", str(work)]
        return original(args, **kw)

    criu.run = run  # type: ignore[assignment]
    try:
        yield
    finally:
        criu.run = original
        for d in daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                d.wait(10)
            if d.poll() is None:
                d.kill()


@contextlib.contextmanager
def host_thp(mode: str) -> Iterator[None]:
    before = THP.read_text().split("[")[1].split("]")[0]
    THP.write_text(mode)
    try:
        yield
    finally:
        THP.write_text(before)


def anon_referenced(pids: list[int]) -> int:
    """Bytes of anonymous memory these processes touched since their referenced bits were cleared."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps") as f:
            anon = False
            for line in f:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                    anon = len(fields) < 6 or fields[5].startswith("[")
                elif anon and fields[0] == "Referenced:":
                    total += int(fields[1]) * 1024
    return total


def _clear_referenced(copy: Container) -> None:
    for pid in copy.pids():
        Path(f"/proc/{pid}/clear_refs").write_text("1")


def restore_and_call(store: SnapshotStore, snap: Snapshot, *, working_set: bool = False) -> dict[str, Any]:
    """W2's snapshot restored and called (``raw_baseline.restore_and_call``); with ``working_set``, also the
    anonymous memory its call touched."""
    run = raw_restore_and_call(
        store,
        snap,
        "run",
        KWARGS,
        on_ready=_clear_referenced if working_set else None,
        on_result=(lambda copy: anon_referenced(copy.pids())) if working_set else None,
    )
    return {"seconds": run.seconds, "value": run.value, "criu_ms": run.criu_ms, "working_set_bytes": run.extra}


def page_fill(path: Path, threads: int) -> float:
    """Seconds to read ``path`` into fresh anonymous memory with ``threads`` threads (preadv, as CRIU's restorer)."""
    size = path.stat().st_size
    buf = mmap.mmap(-1, size)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    part = -(-size // threads // mmap.PAGESIZE) * mmap.PAGESIZE

    def fill(i: int) -> None:
        lo, hi = i * part, min(size, (i + 1) * part)
        off = lo
        while off < hi:
            off += os.preadv(fd, [view[off : min(hi, off + (64 << 20))]], off)

    started = time.perf_counter()
    workers = [threading.Thread(target=fill, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    os.close(fd)
    view.release()
    buf.close()
    return seconds


def shell_steps(snap: Snapshot, runs: int) -> dict[str, float]:
    """Median ms of each setup step around CRIU that a container shell prepared ahead would take off the path."""
    layers = [Path(p) for p in snap.manifest["layers"]]
    steps: dict[str, list[float]] = {"run dir + writable layer + overlay mount": [], "network namespace": [],
                                     "cgroup create + remove": [], "pipes": []}  # fmt: skip
    for i in range(runs):
        run_dir = Path(tempfile.mkdtemp(prefix="shell-", dir="/var/tmp"))
        shutil.rmtree(run_dir)
        t = time.perf_counter()
        rootfs.prepare(run_dir)
        rootfs.seed_upper(snap.path / "rootfs-upper", run_dir)
        rootfs.mount_root(layers, run_dir)
        rootfs.detach(run_dir)
        steps["run dir + writable layer + overlay mount"].append(time.perf_counter() - t)
        rootfs.remove(run_dir)
        t = time.perf_counter()
        os.close(netns.fresh())
        steps["network namespace"].append(time.perf_counter() - t)
        t = time.perf_counter()
        groups = cgroups.create(f"technique-{os.getpid()}-{i}", cgroups.Limits.for_function(None, None))
        groups.remove()
        steps["cgroup create + remove"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pipes = containers.new_pipes()
        steps["pipes"].append(time.perf_counter() - t)
        pipes.close_container_ends()
        pipes.channels.close()
    return {k: round(statistics.median(v) * 1000, 2) for k, v in steps.items()}


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values) * 1000, 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
        "runs_ms": [round(v * 1000, 1) for v in values],
    }


def alternate(variants: dict[str, Callable[[], dict[str, Any]]], runs: int, reference: Any) -> dict[str, Any]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    criu_ms: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(runs):
        for name, fn in variants.items():
            r = fn()
            if not np.allclose(np.asarray(r["value"]), np.asarray(reference), atol=1e-4):
                raise AssertionError(f"{name}: the restored copy answered differently from the eager restore")
            times[name].append(r["seconds"])
            criu_ms[name].append(r["criu_ms"])
            print(f"  {name} {i + 1}/{runs}: {r['seconds'] * 1000:.0f} ms (CRIU {r['criu_ms']:.0f} ms)", flush=True)
    return {k: {**summary(v), "criu_median_ms": round(statistics.median(criu_ms[k]), 1)} for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each variant (default 5)")
    parser.add_argument("--host-thp", action="store_true", help="also measure with the host's THP mode 'always'")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/restore_techniques.py must run as root")
    store = SnapshotStore(config.snapshots_dir())
    snap = w2_snapshot(store)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "snapshot": {
            "id": snap.id,
            "pages_bytes": snap.pages_bytes,
            "disk_bytes": snap.size_bytes,
            "memory_bytes": snap.memory_bytes,
            "rss_bytes": snap.rss_bytes,
        },
        "runs": args.runs,
    }
    work = Path(tempfile.mkdtemp(prefix="techniques-", dir=store.root / ".logs"))
    raw_on_disk = Path(tempfile.mkdtemp(prefix="raw-images-", dir="/var/tmp"))
    try:
        with store.cache.images(snap.id, snap.path, snap.manifest) as copy_dir:
            for f in copy_dir.iterdir():
                if not f.name.startswith("."):
                    shutil.copyfile(f, raw_on_disk / f.name)
        print("Reference call (eager restore from the memory copy)")
        reference = restore_and_call(store, snap)["value"]
        ws = restore_and_call(store, snap, working_set=True)
        results["working_set"] = {
            "first_call_touched_anon_bytes": ws["working_set_bytes"],
            "of_pages_bytes": snap.pages_bytes,
        }

        print("Page cache warm")
        with store.cache.images(snap.id, snap.path, snap.manifest) as copy_dir:

            def lazy() -> dict[str, Any]:
                with images_from(store, copy_dir), lazy_pages(copy_dir, work):
                    return restore_and_call(store, snap)

            def on_disk() -> dict[str, Any]:
                with images_from(store, raw_on_disk):
                    return restore_and_call(store, snap)

            variants = {"memory copy": lambda: restore_and_call(store, snap), "page cache": on_disk, "lazy pages": lazy}
            results["warm"] = alternate(variants, args.runs, reference)
            if args.host_thp:
                print("THP 'always' (host-wide, for these runs only)")

                def thp() -> dict[str, Any]:
                    with host_thp("always"):
                        return restore_and_call(store, snap)

                results["thp"] = alternate({"memory copy": variants["memory copy"], "THP always": thp}, args.runs,
                                           reference)  # fmt: skip

        print("Disk-cold (page cache dropped before each run)")

        def cold(fn: Callable[[], dict[str, Any]], evict: bool = False) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                if evict:
                    store.cache.drop(snap.id)
                drop_caches()
                return fn()

            return run

        def disk_raw() -> dict[str, Any]:
            with images_from(store, raw_on_disk):
                return restore_and_call(store, snap)

        results["disk_cold"] = alternate(
            {
                "raw images on disk": cold(disk_raw),
                "compressed, no memory copy": cold(lambda: restore_and_call(store, snap), evict=True),
                "memory copy": cold(lambda: restore_and_call(store, snap)),
            },
            args.runs,
            reference,
        )

        print("Page loading: one thread vs two")
        pages = max(raw_on_disk.glob("pages-*.img"), key=lambda p: p.stat().st_size)
        fills = {n: [page_fill(pages, n) for _ in range(args.runs)] for n in (1, 2)}
        results["page_fill"] = {f"{n} thread(s)": summary(v) for n, v in fills.items()}
        print("Setup steps around CRIU")
        results["shell_steps_ms"] = shell_steps(snap, args.runs * 4)
    finally:
        shutil.rmtree(raw_on_disk, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "restore-techniques.json").write_text(json.dumps(results, indent=1) + "\n")
    (OUT_DIR / "restore-techniques.md").write_text(markdown(results))
    print(markdown(results))


def _table(rows: dict[str, Any]) -> str:
    out = ["| variant | median | min | max | CRIU restore (median) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        out.append(
            f"| {name} | {r['median_ms']:.0f} ms | {r['min_ms']:.0f} ms | {r['max_ms']:.0f} ms "
            f"| {r['criu_median_ms']:.0f} ms |"
        )
    return "\n".join(out)


def markdown(r: dict[str, Any]) -> str:
    s = r["snapshot"]
    ws = r["working_set"]
    parts = [
        "# Restore techniques, measured on W2's snapshot",
        "",
        f"Measured {r['date']} by `bench/restore_techniques.py` ({r['runs']} runs of each variant, alternating). "
        "Each time is from the engine's restore to the result of one call written on the copy's pipes (no "
        f"server). Snapshot {s['id']}: {s['pages_bytes'] / 1e6:.0f} MB of pages, {s['disk_bytes'] / 1e6:.0f} MB "
        f"on disk, {s['memory_bytes'] / 1e6:.0f} MB uncompressed, container RSS "
        f"{(s['rss_bytes'] or 0) / 1e6:.0f} MB at the dump.",
        "",
        "## Page cache warm",
        "",
        _table(r["warm"]),
        "",
    ]
    if "thp" in r:
        parts += ["## Huge pages (host THP mode `always`, for these runs only)", "", _table(r["thp"]), ""]
    parts += [
        "## Disk-cold (page cache dropped before each run)",
        "",
        _table(r["disk_cold"]),
        "",
        "## Working set of the first call",
        "",
        f"The first call after START touched {ws['first_call_touched_anon_bytes'] / 1e6:.0f} MB of anonymous "
        f"memory, of the {ws['of_pages_bytes'] / 1e6:.0f} MB of pages a restore loads.",
        "",
        "## Page loading: one thread against two",
        "",
        "The pages image read with `preadv` into fresh anonymous memory, as CRIU's restorer does, by one thread "
        "and by two (each half):",
        "",
        "| threads | median | min | max |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['median_ms']:.0f} ms | {v['min_ms']:.0f} ms | {v['max_ms']:.0f} ms |"
            for k, v in r["page_fill"].items()
        ),
        "",
        "## Setup around CRIU, per restore (medians)",
        "",
        "| step | ms |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in r["shell_steps_ms"].items()),
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
