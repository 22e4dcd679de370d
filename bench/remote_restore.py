"""`make bench-remote`: the first restore on an agent that must fetch W2's snapshot from S3, against a local one.

Usage: ``.venv/bin/python bench/remote_restore.py [--runs N]`` (as root; after `make bench`, whose W2 snapshot
it uses: the Embedder, 339 MB of pages, 71 MB stored).

A real S3 server (SeaweedFS on loopback, ``warmboot/devservices/seaweedfs.py``) gets the snapshot once (the push
is timed). Then, alternating:

- **local**: the snapshot restored from the server's own store (its copy in memory warm), START and one call
  written on the copy's pipes, timed to the call's result (as ``bench/raw_baseline.py`` does);
- **fetched**: a fresh, empty store (another agent's): the snapshot fetched from S3 (chunks in parallel), then
  restored and called the same way; its first restore also decompresses the images into its copy in memory.

Writes docs/benchmarks/remote-restore.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from restore_techniques import restore_and_call, w2_snapshot

from warmboot import config
from warmboot.devservices import seaweedfs
from warmboot.worker.snapshot import SnapshotStore
from warmboot.worker.snapshot_files import MemoryCache
from warmboot.worker.snapshot_remote import RemoteSnapshots, S3Bucket

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"


def ms(values: list[float]) -> dict[str, Any]:
    return {"median_ms": round(statistics.median(values) * 1000, 1), "runs_ms": [round(v * 1000, 1) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each kind (default 5)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/remote_restore.py must run as root")
    store = SnapshotStore(config.snapshots_dir())
    snap = w2_snapshot(store)
    local_ms: list[float] = []
    fetch_s: list[float] = []
    fetched_total: list[float] = []
    with seaweedfs.s3_server() as s3:
        remote = RemoteSnapshots(S3Bucket(s3))
        started = time.perf_counter()
        pushed = remote.push(snap)
        push_s = time.perf_counter() - started
        chunks = sum(len(f["chunks"]) for f in pushed["files"].values())
        reference = restore_and_call(store, snap)["value"]
        for i in range(args.runs):
            r = restore_and_call(store, snap)
            local_ms.append(r["seconds"])
            agent = Path(tempfile.mkdtemp(prefix="agent-", dir="/var/tmp"))
            cache = Path(tempfile.mkdtemp(prefix="agent-cache-", dir="/dev/shm"))
            try:
                other = SnapshotStore(agent / "snapshots", cache=MemoryCache(agent / "snapshots", root=cache))
                t = time.perf_counter()
                copy = remote.fetch(snap.id, other)
                fetched = time.perf_counter() - t
                r2 = restore_and_call(other, copy)
                fetch_s.append(fetched)
                fetched_total.append(fetched + r2["seconds"])
                for value in (r["value"], r2["value"]):
                    if not np.allclose(np.asarray(value), np.asarray(reference), atol=1e-4):
                        raise AssertionError("a restored copy answered differently")
            finally:
                shutil.rmtree(agent, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
            print(
                f"  run {i + 1}/{args.runs}: local {r['seconds'] * 1000:.0f} ms; fetched {fetched * 1000:.0f} ms "
                f"+ first restore {r2['seconds'] * 1000:.0f} ms",
                flush=True,
            )
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "snapshot": {"id": snap.id, "stored_bytes": snap.size_bytes, "memory_bytes": snap.memory_bytes},
        "chunks": chunks,
        "push_s": round(push_s, 3),
        "local": ms(local_ms),
        "fetch": ms(fetch_s),
        "fetched_first_restore": ms(fetched_total),
    }
    results["ratio"] = round(results["fetched_first_restore"]["median_ms"] / results["local"]["median_ms"], 2)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "remote-restore.json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    (OUT_DIR / "remote-restore.md").write_text(md)
    print(md)


def markdown(r: dict[str, Any]) -> str:
    s = r["snapshot"]
    return "\n".join(
        [
            "# The first restore on an agent that must fetch the snapshot",
            "",
            f"Measured {r['date']} by `bench/remote_restore.py`: W2's snapshot ({s['stored_bytes'] / 1e6:.0f} MB "
            f"stored, {s['memory_bytes'] / 1e6:.0f} MB uncompressed, {r['chunks']} chunks), SeaweedFS on loopback. "
            f"Pushing it took {r['push_s']:.2f} s. Times to the first call's result, engine level (no server).",
            "",
            "| restore | median | runs |",
            "|---|---:|---|",
            f"| local (its copy in memory) | {r['local']['median_ms']:.0f} ms | "
            f"{', '.join(f'{v:.0f}' for v in r['local']['runs_ms'])} |",
            f"| fetched by an empty agent: the fetch | {r['fetch']['median_ms']:.0f} ms | "
            f"{', '.join(f'{v:.0f}' for v in r['fetch']['runs_ms'])} |",
            f"| fetched by an empty agent: fetch + first restore | {r['fetched_first_restore']['median_ms']:.0f} ms "
            f"| {', '.join(f'{v:.0f}' for v in r['fetched_first_restore']['runs_ms'])} |",
            "",
            f"The first restore on an agent without the snapshot takes **{r['ratio']:.1f}x** a local restore.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
