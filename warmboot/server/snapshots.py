"""Which memory snapshots exist, what they are keyed by, and when one is made, used, or given up on.

A snapshot is keyed by everything that decides what the container holds at its snapshot point: the app's
name and code, warmboot's own code (an upgrade recaptures snapshots), the function's definition and
configuration (image, env, secrets' *names*, volume mount points, gpu/cpu/memory), and this worker's
fingerprint (CPU, kernel, CRIU). Volume *contents* and secret
*values* are not in the key: a restored container is given the current values when it starts.

Policy, per key (the rules are in ``server.snapshot_policy``):
- the first cold boot that reaches the snapshot point makes the snapshot (one at a time per key);
- a container holding an open network connection at that point is not snapshotted, and the key is marked
  ``refused`` (the log names the peer), so later boots don't try again until the app changes;
- a failed restore is classified: incompatible (kept), corrupt (deleted, made again at most once per key),
  missing (made again, a few times), transient (kept; a burst of them backs off);
- a failed creation leaves the key ``failed`` with its reason; an OS error (full disk) is retried after a
  back-off. No failure leaves a key ``creating``, and none fails the call that was booting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmboot.errors import SnapshotError, SnapshotNotFoundError
from warmboot.server import snapshot_policy as policy
from warmboot.server.db import Database
from warmboot.worker import cuda_checkpoint, gpus, host
from warmboot.worker.snapshot import Snapshot, SnapshotStore

log = logging.getLogger("warmboot.snapshots")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    key TEXT PRIMARY KEY,
    app_name TEXT NOT NULL,
    tag TEXT NOT NULL,
    state TEXT NOT NULL,            -- creating | ok | broken | missing | incompatible | refused | failed
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
#: Columns added after the first release, with their definitions (added to older databases at start).
_ADDED_COLUMNS = {
    "missing_recreations": "INTEGER NOT NULL DEFAULT 0",
    "transient_failures": "INTEGER NOT NULL DEFAULT 0",  # in a row, since the last good restore
    "backoffs": "INTEGER NOT NULL DEFAULT 0",
    "retry_at": "REAL",  # not before this time: restores of a backed-off snapshot, retries of a failed creation
}


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
        "concurrency": fspec.get("concurrency"),  # the runtime sizes its input threads before the snapshot point
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
    missing_recreations: int = 0
    transient_failures: int = 0
    backoffs: int = 0
    retry_at: float | None = None


class SnapshotRegistry:
    """The snapshots table plus the store holding the images, with the policy above."""

    def __init__(self, db: Database, lock: threading.Lock, store: SnapshotStore):
        self._db = db
        self._lock = lock
        self.store = store
        with self._lock:
            self._db.executescript(_SCHEMA)
            have = self._db.columns("snapshots")
            for column, definition in _ADDED_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE snapshots ADD COLUMN {column} {definition}")
            # A server that died while creating leaves 'creating' rows: nobody is creating them now, and the
            # next cold boot may try again.
            self._db.execute(
                "UPDATE snapshots SET state = 'failed', reason = 'interrupted by a server restart', retry_at = 0 "
                "WHERE state = 'creating'"
            )

    def _exec(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def get(self, key: str) -> SnapshotRecord | None:
        rows = self._exec("SELECT * FROM snapshots WHERE key = ?", key)
        return SnapshotRecord(*rows[0]) if rows else None

    def list(self) -> list[SnapshotRecord]:
        return [SnapshotRecord(*r) for r in self._exec("SELECT * FROM snapshots ORDER BY created_at")]

    # ----- the policy ------------------------------------------------------------------------------

    def usable(self, key: str, on_failure: Callable[[str, BaseException, str], None] | None = None) -> Snapshot | None:
        """The snapshot to restore for ``key``, if there is a good one (and it is not backed off).

        A snapshot the store no longer has (deleted by hand) or whose manifest is unreadable is a failed restore:
        the policy is applied, and ``on_failure(snapshot_id, exc, verdict)`` told, so the caller can log it.
        """
        record = self.get(key)
        if record is None or record.state != "ok" or not record.snapshot_id:
            return None
        if record.retry_at is not None and time.time() < record.retry_at:
            return None
        try:
            return self.store.get(record.snapshot_id)
        except SnapshotError as exc:
            verdict = self.restore_failed(key, record.snapshot_id, exc)
            if on_failure is not None:
                on_failure(record.snapshot_id, exc, verdict)
            return None

    def claim_creation(self, key: str, app_name: str, tag: str) -> bool:
        """Whether the caller should make the snapshot for ``key`` now (and, if so, it is now making it)."""
        with self._lock:
            row = self._db.execute(
                "SELECT state, recreations, missing_recreations, retry_at FROM snapshots WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO snapshots (key, app_name, tag, state) VALUES (?, ?, ?, 'creating')",
                    (key, app_name, tag),
                )
                return True
            state, recreations, missing, retry_at = row
            if policy.may_recreate(state, recreations, missing):
                column = "missing_recreations" if state == "missing" else "recreations"
                self._db.execute(
                    f"UPDATE snapshots SET state = 'creating', {column} = {column} + 1 WHERE key = ?", (key,)
                )
                return True
            if state == "failed" and retry_at is not None and time.time() >= retry_at:
                self._db.execute("UPDATE snapshots SET state = 'creating' WHERE key = ?", (key,))
                return True
            return False

    def created(self, key: str, snap: Snapshot, seconds: float) -> None:
        self._exec(
            "UPDATE snapshots SET state = 'ok', snapshot_id = ?, size_bytes = ?, created_at = ?, create_seconds = ?, "
            "reason = NULL, transient_failures = 0, backoffs = 0, retry_at = NULL WHERE key = ?",
            snap.id,
            snap.size_bytes,
            snap.created_at,
            seconds,
            key,
        )

    def fetched(self, key: str, app_name: str, tag: str, snap: Snapshot) -> None:
        """``snap``, made by another agent and fetched from object storage, now serves ``key`` here."""
        with self._lock:
            self._db.execute(
                "INSERT INTO snapshots (key, app_name, tag, state) VALUES (?, ?, ?, 'ok') ON CONFLICT(key) DO NOTHING",
                (key, app_name, tag),
            )
        self.created(key, snap, 0.0)

    def not_created(self, key: str, state: str, reason: str) -> None:
        """Creation will not happen for this version: ``refused`` (open connection) or ``failed``."""
        self._exec("UPDATE snapshots SET state = ?, reason = ?, retry_at = NULL WHERE key = ?", state, reason, key)

    def creation_failed(self, key: str, exc: BaseException) -> str:
        """Record a failed creation; returns what was decided, for the log. Never leaves the key 'creating'."""
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if policy.creation_is_transient(exc):
            if (trouble := policy.os_trouble(exc)) and trouble not in reason:
                reason = f"{trouble}: {reason}"  # CRIU's "No space left on device" is further down its message
            with self._lock:
                row = self._db.execute("SELECT backoffs FROM snapshots WHERE key = ?", (key,)).fetchone()
                backoffs = (row[0] if row else 0) + 1
                wait = policy.backoff_seconds(backoffs)
                self._db.execute(
                    "UPDATE snapshots SET state = 'failed', reason = ?, backoffs = ?, retry_at = ? WHERE key = ?",
                    (reason, backoffs, time.time() + wait, key),
                )
            return f"the host refused; a later cold boot retries in {wait:.0f} s"
        self.not_created(key, "failed", reason)
        return "not retried for this version"

    def restored(self, key: str, millis: float) -> None:
        self._exec(
            "UPDATE snapshots SET restores = restores + 1, last_restore_ms = ?, last_restore_at = ?, "
            "transient_failures = 0 WHERE key = ?",
            millis,
            time.time(),
            key,
        )

    def restore_failed(self, key: str, snapshot_id: str, exc: BaseException) -> str:
        """Apply the policy to a failed restore of ``snapshot_id``; returns what was decided, for the log."""
        failure = policy.classify_restore(exc)
        reason = f"{failure.value}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if failure is policy.Failure.TRANSIENT:
            with self._lock:
                row = self._db.execute(
                    "SELECT transient_failures, backoffs FROM snapshots WHERE key = ? AND snapshot_id = ?",
                    (key, snapshot_id),
                ).fetchone()
                if row is None:
                    return "transient; the snapshot was replaced meanwhile"
                in_a_row, backoffs = row[0] + 1, row[1]
                decision = policy.decide_restore(failure, in_a_row)
                retry_at = time.time() + decision.backoff_s if decision.backoff_s else None
                self._db.execute(
                    "UPDATE snapshots SET transient_failures = ?, backoffs = ?, retry_at = ?, reason = ? WHERE key = ?",
                    (in_a_row, backoffs + bool(decision.backoff_s), retry_at, reason, key),
                )
            if decision.backoff_s:
                log.warning(
                    "snapshot %s: %d transient restore failures in a row; not restoring it for %.0f s",
                    snapshot_id,
                    in_a_row,
                    decision.backoff_s,
                )
                return f"transient, {in_a_row} in a row: backing off for {decision.backoff_s:.0f} s"
            return "transient: the snapshot is kept"
        decision = policy.decide_restore(failure, 0)
        if decision.delete:
            with contextlib.suppress(SnapshotError, OSError):
                self.store.delete(snapshot_id)
        with self._lock:
            self._db.execute(
                "UPDATE snapshots SET state = ?, reason = ?, "
                + ("snapshot_id = NULL, size_bytes = NULL " if decision.delete else "snapshot_id = snapshot_id ")
                + "WHERE key = ? AND snapshot_id = ?",
                (decision.state, reason, key, snapshot_id),
            )
        log.warning("snapshot %s of key %s: %s", snapshot_id, key[:12], reason)
        if failure is policy.Failure.INCOMPATIBLE:
            return "incompatible with this host: kept for the hosts it fits"
        return f"{failure.value}: discarded, and made again by a later cold boot if allowed"

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
