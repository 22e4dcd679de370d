"""How containers of snapshotting functions started, as data: each cold boot and each restore, with its phases.

Every start of a function with memory snapshots is a row of ``starts``: its kind (``cold`` or ``restore``), its
total time to READY, and its phases in milliseconds (a restore's checks, CRIU restore, cgroup join, START to
READY (network, reseed, ``@enter(snap=False)``), and its first input; a cold boot's boot to the snapshot point
and START to READY; the snapshot's own creation is not part of a cold boot's time). ``warmboot snapshot list``
shows each key's p50/p95 from here, the benchmark reads its breakdown from here, and :class:`StartChoice`
decides from here whether restoring still wins for a function.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from warmboot.server.db import Database

if TYPE_CHECKING:
    from warmboot.server.snapshots import SnapshotRegistry

#: Rows kept per snapshot key (older ones are dropped): enough for stable percentiles, bounded in size.
KEEP_PER_KEY = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS starts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,              -- the function's snapshot key
    kind TEXT NOT NULL,             -- cold | restore
    container_id TEXT NOT NULL,
    at REAL NOT NULL,
    total_ms REAL NOT NULL,         -- from the start's beginning to READY
    phases TEXT NOT NULL            -- JSON: phase name -> milliseconds
);
CREATE INDEX IF NOT EXISTS starts_by_key ON starts(key, kind, id);
"""


@dataclass(frozen=True)
class StartStats:
    """Percentiles of one kind of start of one key (``None`` without samples)."""

    n: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    phases_p50_ms: dict[str, float] = field(default_factory=dict)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stats_of(rows: list[tuple[float, dict[str, float]]]) -> StartStats:
    if not rows:
        return StartStats()
    totals = [total for total, _ in rows]
    names = {name for _, phases in rows for name in phases}
    phases = {name: round(statistics.median([p[name] for _, p in rows if name in p]), 1) for name in sorted(names)}
    return StartStats(len(rows), round(_percentile(totals, 0.5), 1), round(_percentile(totals, 0.95), 1), phases)


class StartLog:
    """The starts table (one connection and lock shared with the rest of the server's state)."""

    def __init__(self, db: Database, lock: threading.Lock):
        self._db = db
        self._lock = lock
        with self._lock:
            self._db.executescript(_SCHEMA)

    def record(self, key: str, kind: str, container_id: str, total_ms: float, phases: dict[str, float]) -> int:
        """One start; returns its row id (for :meth:`first_input`)."""
        with self._lock, self._db:
            row = self._db.execute(
                "INSERT INTO starts (key, kind, container_id, at, total_ms, phases) VALUES (?, ?, ?, ?, ?, ?) "
                "RETURNING id",
                (key, kind, container_id, time.time(), round(total_ms, 2), json.dumps(_rounded(phases))),
            ).fetchone()[0]
            self._db.execute(
                "DELETE FROM starts WHERE key = ? AND kind = ? AND id <= ?",
                (key, kind, int(row or 0) - KEEP_PER_KEY),
            )
        return int(row or 0)

    def first_input(self, row_id: int, millis: float) -> None:
        """Add the container's first input to its start's phases."""
        with self._lock, self._db:
            found = self._db.execute("SELECT phases FROM starts WHERE id = ?", (row_id,)).fetchone()
            if found is None:
                return
            phases = json.loads(found[0])
            phases["first_input_ms"] = round(millis, 2)
            self._db.execute("UPDATE starts SET phases = ? WHERE id = ?", (json.dumps(phases), row_id))

    def stats(self, key: str, kind: str, last: int = 50) -> StartStats:
        with self._lock:
            rows = self._db.execute(
                "SELECT total_ms, phases FROM starts WHERE key = ? AND kind = ? ORDER BY id DESC LIMIT ?",
                (key, kind, last),
            ).fetchall()
        return stats_of([(total, json.loads(phases)) for total, phases in rows])

    def rows(self, key: str | None = None) -> list[dict[str, Any]]:
        """Every start kept (of ``key``), oldest first: for the benchmark's breakdown and for tests."""
        sql = "SELECT key, kind, container_id, at, total_ms, phases FROM starts"
        args: tuple[Any, ...] = ()
        if key is not None:
            sql += " WHERE key = ?"
            args = (key,)
        with self._lock:
            found = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [
            {"key": k, "kind": kind, "container_id": c, "at": at, "total_ms": total, "phases": json.loads(p)}
            for k, kind, c, at, total, p in found
        ]


def _rounded(phases: dict[str, float]) -> dict[str, float]:
    return {name: round(float(ms), 2) for name, ms in phases.items()}


MIN_SAMPLES = 3  #: of each kind, before the times decide anything
MARGIN_RATIO, MARGIN_MS = 0.95, 5.0  #: "clearly faster": by 5% and 5 ms


def cold_is_faster(cold: StartStats, restore: StartStats) -> bool:
    """Whether the measured times say this function should boot cold: enough of each kind, and the median cold
    boot clearly faster than the median restore."""
    if cold.n < MIN_SAMPLES or restore.n < MIN_SAMPLES or cold.p50_ms is None or restore.p50_ms is None:
        return False
    return cold.p50_ms < restore.p50_ms * MARGIN_RATIO - MARGIN_MS


#: A restore at most half as long as a cold boot wins by far: the other kind is rechecked this rarely (seconds).
CLEAR_WIN_RECHECK_S = 3600.0


@dataclass
class StartChoice:
    """Whether a function's next start restores its snapshot or boots cold (one per pool, in memory).

    A restore is the default; the function boots cold while :func:`cold_is_faster` says so. The other kind is
    tried now and then, so that a change in either time is noticed (a model that grew, a disk that got faster):
    every ``recheck_every``-th start while the two are close, and at most once in ``clear_win_recheck_s`` when
    a restore takes under half a cold boot (a slow cold boot every tenth start would cost more than it tells).
    ``WARMBOOT_RESTORE_ALWAYS=1`` on the server turns all this off: restore whenever there is a snapshot.
    """

    recheck_every: int = 10
    clear_win_recheck_s: float = CLEAR_WIN_RECHECK_S
    always_restore: bool = False
    starts: int = 0
    cold_wins: bool = False
    last_recheck: float = field(default_factory=time.monotonic)

    def next_kind(self, cold: StartStats, restore: StartStats) -> tuple[str, str | None]:
        """``("restore" | "cold", why)``: ``why`` is a line for the app's log when the choice changes or probes."""
        if self.always_restore:
            return "restore", None
        self.starts += 1
        wins = cold_is_faster(cold, restore)
        why = None
        if wins != self.cold_wins:
            self.cold_wins = wins
            why = (
                f"booting cold: a cold boot (p50 {cold.p50_ms:.0f} ms) is faster than a restore "
                f"(p50 {restore.p50_ms:.0f} ms)"
                if wins
                else f"restoring again: a restore (p50 {restore.p50_ms:.0f} ms) is no slower than a cold boot "
                f"(p50 {cold.p50_ms:.0f} ms)"
            )
        if restore.n >= MIN_SAMPLES and self._recheck_due(cold, restore):
            self.last_recheck = time.monotonic()
            other = "restore" if wins else "cold"
            return other, f"one {'restore' if wins else 'cold boot'} now and then, to keep both times current"
        return ("cold" if wins else "restore"), why

    def _recheck_due(self, cold: StartStats, restore: StartStats) -> bool:
        far_apart = cold.p50_ms is not None and restore.p50_ms is not None and restore.p50_ms * 2 <= cold.p50_ms
        if far_apart:
            return time.monotonic() - self.last_recheck >= self.clear_win_recheck_s
        return self.starts % self.recheck_every == 0


def snapshot_rows(registry: SnapshotRegistry, starts: StartLog) -> list[dict[str, Any]]:
    """Every snapshot record with its measured restore and cold-boot times (`warmboot snapshot list`, the
    dashboard; an agent sends its own to the control plane)."""
    rows = []
    for record in registry.list():
        restore, cold = starts.stats(record.key, "restore"), starts.stats(record.key, "cold")
        rows.append(
            {
                **vars(record),
                "restore_p50_ms": restore.p50_ms,
                "restore_p95_ms": restore.p95_ms,
                "restore_phases_p50_ms": restore.phases_p50_ms,
                "cold_p50_ms": cold.p50_ms,
                "cold_starts": cold.n,
                "boots_cold": cold_is_faster(cold, restore),
            }
        )
    return rows
