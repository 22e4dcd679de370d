"""`make demo`: the cold-start win of the snapshot engine, shown on one heavy process.

Starts a container whose Python imports numpy and builds 200 MB of state (the stand-in for `import torch`
plus a model load), times it to its first reply, checkpoints it with CRIU, then restores copies and times
them to their first reply. Prints both timings and the ratio.

The container is a function's: a ``debian_slim().pip_install("numpy")`` image built by the images package
(cached under /var/tmp/warmboot-bench-images, so only the first demo builds it), the runtime layer on top.
"""

from __future__ import annotations

import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from warmboot.sdk.image import Image
from warmboot.worker import container as containers
from warmboot.worker import runtime_lib
from warmboot.worker.images import build_image
from warmboot.worker.snapshot import SnapshotStore

CHILD = r"""
import os
import numpy as np
weights = np.random.default_rng(0).standard_normal(200 * 2**20 // 8)   # 200 MB of "model weights"
control_in, control_out = os.fdopen(3, "rb", 0), os.fdopen(4, "wb", 0)
for line in control_in:
    control_out.write(f"{float(weights[:1000].sum()):.6f}\n".encode())
"""
RUNS = 3
IMAGES = Path("/var/tmp/warmboot-bench-images")


def first_reply(c: containers.Container) -> bytes:
    c.channels.control_in.write(b"go\n")
    reply = c.channels.control_out.readline()
    if not reply:
        raise SystemExit(f"container exited without answering: {c.channels.stderr.read().decode()}")
    return reply


def main() -> None:
    console = Console()
    console.print("[bold]warmboot demo[/]: a process that imports numpy and builds 200 MB of state")
    console.print("  image: debian_slim().pip_install('numpy') (built once, then cached) ...")
    image = build_image(Image.debian_slim().pip_install("numpy").to_spec(), root=IMAGES, progress=lambda _: None)
    layers = (*image.layers, runtime_lib.ensure(IMAGES / "home"))
    work = Path(tempfile.mkdtemp(prefix="warmboot-demo-", dir="/var/tmp"))
    serial = itertools.count()

    def run_dir() -> Path:
        return work / "containers" / f"c{next(serial)}"

    def spec() -> containers.ContainerSpec:
        return containers.ContainerSpec(
            argv=[image.python, "-c", CHILD],
            layers=layers,
            run_dir=run_dir(),
            env=image.env,
            cwd="/root",
        )

    store = SnapshotStore(work / "snapshots")
    cold, restored = [], []
    try:
        for i in range(RUNS):
            t0 = time.perf_counter()
            c = containers.start(spec())
            answer = first_reply(c)
            cold.append(time.perf_counter() - t0)
            console.print(f"  cold start {i + 1}/{RUNS}: {cold[-1] * 1000:.0f} ms to the first reply")
            if i < RUNS - 1:
                c.kill()
        console.print("  checkpointing the last one with CRIU ...")
        snap = store.checkpoint(c)
        c.kill()  # already ended by the dump: this reaps it and removes its run directory
        console.print(
            f"  snapshot {snap.id}: {snap.size_bytes / 1e6:.0f} MB, dumped in {snap.manifest['dump_seconds']:.2f} s"
        )
        for i in range(RUNS):
            t0 = time.perf_counter()
            r = store.restore(snap, run_dir())
            got = first_reply(r)
            restored.append(time.perf_counter() - t0)
            r.kill()
            if got != answer:
                raise SystemExit(f"restored copy answered {got!r}, the original {answer!r}")
            console.print(f"  restore {i + 1}/{RUNS}: {restored[-1] * 1000:.0f} ms to the first reply (same answer)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"cold start vs memory-snapshot restore (median of {RUNS})")
    table.add_column("path")
    table.add_column("to first reply", justify="right")
    table.add_row("cold start (import numpy + build state)", f"{statistics.median(cold) * 1000:.0f} ms")
    table.add_row("restore from memory snapshot", f"{statistics.median(restored) * 1000:.0f} ms")
    table.add_row("speed-up", f"{statistics.median(cold) / statistics.median(restored):.1f}x")
    console.print(table)


if __name__ == "__main__":
    main()
