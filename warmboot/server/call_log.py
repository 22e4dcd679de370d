"""Every finished call, for the dashboard: its function, how it ended, how long it took to its result, and how
the container that ran it had started (a cold boot, a snapshot restore, or warm: it had served an input before).

The ``calls`` table forgets a ``.remote()`` call once its caller has the outcome; this one keeps the most recent
``WARMBOOT_CALL_LOG_KEEP`` (10,000) calls of every kind, arguments and results left out.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from warmboot.server.db import Database

KEEP = int(os.environ.get("WARMBOOT_CALL_LOG_KEEP", "10000"))
#: How a call's container had started (``Call.start_kind``); "none": no container ran it (it failed to start).
START_KINDS = ("cold", "restore", "warm", "none")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS call_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    call_id TEXT NOT NULL,
    app_name TEXT NOT NULL,
    tag TEXT NOT NULL,              -- the function or class
    method TEXT,                    -- a class's method
    status TEXT NOT NULL,           -- ok | the error's class name (a remote exception's own)
    start_kind TEXT NOT NULL,       -- cold | restore | warm | none
    container_id TEXT,
    submitted_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    duration_ms REAL NOT NULL       -- submitted to result: queueing, the container's start, the work
);
CREATE INDEX IF NOT EXISTS call_log_by_function ON call_log(app_name, tag, id);
"""


@dataclass(frozen=True)
class LoggedCall:
    call_id: str
    app_name: str
    tag: str
    method: str | None
    status: str
    start_kind: str
    container_id: str | None
    submitted_at: float
    finished_at: float
    duration_ms: float


class CallLog:
    """The ``call_log`` table (SQLite or PostgreSQL, through :class:`Database`)."""

    def __init__(self, db: Database, lock: threading.Lock):
        self._db = db
        self._lock = lock
        self._written = 0
        with lock:
            if db.columns("call_log") and "tag" not in db.columns("call_log"):
                # The first version of this table (one "function" column): its rows are only history, start over.
                db.execute("DROP TABLE call_log")
            db.executescript(_SCHEMA)

    def record(self, entry: LoggedCall) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO call_log (call_id, app_name, tag, method, status, start_kind, container_id, "
                "submitted_at, finished_at, duration_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.call_id, entry.app_name, entry.tag, entry.method, entry.status, entry.start_kind,
                 entry.container_id, entry.submitted_at, entry.finished_at, entry.duration_ms),
            )  # fmt: skip
            self._written += 1
            if self._written % 500 == 0:  # trimmed now and then, not at every insert
                self._db.execute("DELETE FROM call_log WHERE id <= (SELECT MAX(id) FROM call_log) - ?", (KEEP,))

    def recent(self, app_name: str, tag: str, limit: int = 200) -> list[LoggedCall]:
        """The function's (or class's, all methods) most recent calls, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT call_id, app_name, tag, method, status, start_kind, container_id, submitted_at, finished_at, "
                "duration_ms FROM call_log WHERE app_name = ? AND tag = ? ORDER BY id DESC LIMIT ?",
                (app_name, tag, limit),
            ).fetchall()
        return [LoggedCall(*row) for row in rows]


def entry_for(call: Any, app_name: str) -> LoggedCall:
    """The log entry of a finished :class:`~warmboot.server.calls.Call`."""
    outcome = call.outcome
    # A platform error's class, or the remote exception's own ("ValueError: ..." in its message).
    status = "ok" if outcome.ok else outcome.error_type or (outcome.message or "exception").split(":")[0][:80]
    finished = time.time()
    return LoggedCall(
        call.call_id,
        app_name,
        call.tag,
        call.method,
        status,
        call.start_kind or "none",
        call.container_id,
        call.submitted_at,
        finished,
        (finished - call.submitted_at) * 1000,
    )
