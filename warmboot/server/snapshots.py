"""Which memory snapshots exist, what they are keyed by, and when one is made, used, or given up on.

A snapshot is keyed by everything that decides what the container holds at its snapshot point: the app's
name and code, warmboot's own code (an upgrade recaptures snapshots), the function's definition and
configuration (image, env, secrets' *names*, volume mount points, gpu/cpu/memory), and this worker's
fingerprint (CPU, kernel, CRIU). Volume *contents* and secret
*values* are not in the key: a restored container is given the current values when it starts.

Policy, per key:
- the first cold boot that reaches the snapshot point makes the snapshot (one at a time per key);
- a container holding an open network connection at that point is not snapshotted, and the key is marked
  ``refused`` (the log names the peer), so later boots don't try again until the app changes;
- a snapshot whose restore fails is deleted and marked ``broken``; it is recreated at most once per key,
  after which that function boots cold (no re-snapshot storm).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmboot.errors import SnapshotError, SnapshotNotFoundError
from warmboot.worker import cuda_checkpoint, gpus, host
from warmboot.worker.snapshot import Snapshot, SnapshotStore

MAX_RECREATIONS = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    key TEXT PRIMARY KEY,
    app_name TEXT NOT NULL,
    tag TEXT NOT NULL,
    state TEXT NOT NULL,            -- creating | ok | broken | refused | failed
    snapshot_id TEXT,
    size_bytes INTEGER,
    created_at REAL,
    create_seconds REAL,
    restores INTEGER NOT NULL DEFAULT 0,
    last_restore_ms REAL,
    last_restore_at REAL,
    recreations INTEGER NOT NULL DEFAULT 0,
    reason TEXT
);
"""


def snapshot_key(app_name: str, tag: str, fspec: dict[str, Any], code_digest: str, runtime_digest: str) -> str:
    """The key of a function's snapshot on this worker (see the module docstring for what it covers)."""
    opts = fspec["options"]
    fp = host.fingerprint()
    material = {
        "app": app_name,
        "tag": tag,
        "code": code_digest,
        "runtime": runtime_digest,  # warmboot's own code inside the container is part of what the snapshot holds
        "kind": fspec["kind"],
        "lifecycle": fspec.get("lifecycle"),
        "image": fspec.get("image_digest") or fspec["image"],
        "env": opts.get("env", {}),
        "secrets": sorted(s.get("name") or ",".join(sorted(s.get("values") or {})) for s in fspec["secrets"]),
        "volumes": sorted(fspec["volumes"]),
        "local_files": [Path(p).name for p in fspec.get("resolved_image", {}).get("local_layers", [])],
        "resources": {k: opts.get(k) for k in ("gpu", "cpu", "memory", "block_network")},
        "experimental": opts.get("experimental_options", {}),
        "worker": {"cpu": fp.cpu, "kernel": fp.kernel, "criu": fp.criu_version},
    }
    if opts.get("gpu"):  # GPU state (or a GPU function's libraries) must meet the driver it was made with
        material["worker"]["gpu_driver"] = cuda_checkpoint.driver_version()
        material["worker"]["gpu_models"] = gpus.models()
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class SnapshotRecord:
    key: str
    app_name: str
    tag: str
    state: str
    snapshot_id: str | None
    size_bytes: int | None
    created_at: float | None
    create_seconds: float | None
    restores: int
    last_restore_ms: float | None
    last_restore_at: float | None
    recreations: int
    reason: str | None


class SnapshotRegistry:
    """The snapshots table plus the store holding the images, with the policy above."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, store: SnapshotStore):
        self._db = db
        self._lock = lock
        self.store = store
        with self._lock:
            self._db.executescript(_SCHEMA)
            # A server that died while creating leaves 'creating' rows: nobody is creating them now.
            self._db.execute("UPDATE snapshots SET state = 'failed', reason = 'interrupted' WHERE state = 'creating'")

    def _exec(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def get(self, key: str) -> SnapshotRecord | None:
        rows = self._exec("SELECT * FROM snapshots WHERE key = ?", key)
        return SnapshotRecord(*rows[0]) if rows else None

    def list(self) -> list[SnapshotRecord]:
        return [SnapshotRecord(*r) for r in self._exec("SELECT * FROM snapshots ORDER BY created_at")]

    # ----- the policy ------------------------------------------------------------------------------

    def usable(self, key: str) -> Snapshot | None:
        """The snapshot to restore for ``key``, if there is a good one."""
        record = self.get(key)
        if record is None or record.state != "ok" or not record.snapshot_id:
            return None
        try:
            return self.store.get(record.snapshot_id)
        except SnapshotError as exc:
            self.mark_broken(key, f"snapshot files unusable: {exc}")
            return None

    def claim_creation(self, key: str, app_name: str, tag: str) -> bool:
        """Whether the caller should make the snapshot for ``key`` now (and, if so, it is now making it)."""
        with self._lock:
            row = self._db.execute("SELECT state, recreations FROM snapshots WHERE key = ?", (key,)).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO snapshots (key, app_name, tag, state) VALUES (?, ?, ?, 'creating')",
                    (key, app_name, tag),
                )
                return True
            state, recreations = row
            if state == "broken" and recreations < MAX_RECREATIONS:
                self._db.execute(
                    "UPDATE snapshots SET state = 'creating', recreations = recreations + 1 WHERE key = ?", (key,)
                )
                return True
            return False

    def created(self, key: str, snap: Snapshot, seconds: float) -> None:
        self._exec(
            "UPDATE snapshots SET state = 'ok', snapshot_id = ?, size_bytes = ?, created_at = ?, create_seconds = ?, "
            "reason = NULL WHERE key = ?",
            snap.id,
            snap.size_bytes,
            snap.created_at,
            seconds,
            key,
        )

    def not_created(self, key: str, state: str, reason: str) -> None:
        """Creation did not happen: ``refused`` (open connection) or ``failed`` (CRIU dump failed)."""
        self._exec("UPDATE snapshots SET state = ?, reason = ? WHERE key = ?", state, reason, key)

    def restored(self, key: str, millis: float) -> None:
        self._exec(
            "UPDATE snapshots SET restores = restores + 1, last_restore_ms = ?, last_restore_at = ? WHERE key = ?",
            millis,
            time.time(),
            key,
        )

    def mark_broken(self, key: str, reason: str) -> None:
        """Never use this key's current snapshot again: delete its files, remember why."""
        record = self.get(key)
        if record is not None and record.snapshot_id:
            with contextlib.suppress(SnapshotError, OSError):
                self.store.delete(record.snapshot_id)
        self._exec(
            "UPDATE snapshots SET state = 'broken', snapshot_id = NULL, size_bytes = NULL, reason = ? WHERE key = ?",
            reason,
            key,
        )

    def remove(self, key_or_id: str) -> SnapshotRecord:
        """Delete a snapshot (by key, key prefix or snapshot id) and forget it, so the next boot makes a new one."""
        matches = [r for r in self.list() if r.key.startswith(key_or_id) or r.snapshot_id == key_or_id]
        if len(matches) != 1:
            raise SnapshotNotFoundError(
                f"{len(matches)} snapshots match; be more precise" if matches else "no snapshot with that key or id",
                snapshot_id=key_or_id,
            )
        record = matches[0]
        if record.snapshot_id:
            with contextlib.suppress(SnapshotError, OSError):
                self.store.delete(record.snapshot_id)
        self._exec("DELETE FROM snapshots WHERE key = ?", record.key)
        return record

    def retain_only(self, app_name: str, keep: set[str]) -> list[str]:
        """After a redeploy: delete the app's snapshots whose keys the new version no longer has."""
        dropped = [r.key for r in self.list() if r.app_name == app_name and r.key not in keep]
        for key in dropped:
            with contextlib.suppress(SnapshotError):
                self.remove(key)
        return dropped
