"""Durable state of the server: apps (deployed, ephemeral, stopped), named secrets and schedules (server/db.py:
SQLite by default, PostgreSQL when configured)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from warmboot.errors import NotFoundError
from warmboot.server.db import Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    app_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,            -- deployed | ephemeral | stopped
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,             -- JSON: the App's spec() plus resolved image digests
    code_dir TEXT NOT NULL,
    app_file TEXT NOT NULL,         -- file name inside code_dir
    created_at REAL NOT NULL,
    stopped_at REAL
);
CREATE INDEX IF NOT EXISTS apps_by_name ON apps(name, state);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    "values" TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (  -- one per scheduled function of a running app (server/scheduler.py)
    app_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    anchor REAL NOT NULL,           -- when the schedule began (the deploy): a Period counts from here
    next_tick REAL NOT NULL,        -- the next time it is due
    last_tick REAL,                 -- the last tick it ran
    last_call_id TEXT,
    PRIMARY KEY (app_id, tag)
);
"""


@dataclass(frozen=True)
class AppRecord:
    app_id: str
    name: str
    state: str
    version: int
    spec: dict[str, Any]
    code_dir: str
    app_file: str
    created_at: float


@dataclass(frozen=True)
class ScheduleRow:
    """A scheduled function's persisted state: its next tick survives a server restart."""

    app_id: str
    tag: str
    anchor: float
    next_tick: float
    last_tick: float | None = None
    last_call_id: str | None = None


class State:
    """The server's database (one connection, serialised by a lock; the server is one process)."""

    def __init__(self, db: Database):
        self._db = db
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @property
    def connection(self) -> Database:
        """The shared connection, for other tables of the server (use it under :attr:`lock`)."""
        return self._db

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def _rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _app(row: tuple[Any, ...]) -> AppRecord:
        app_id, name, state, version, spec, code_dir, app_file, created_at = row
        return AppRecord(app_id, name, state, version, json.loads(spec), code_dir, app_file, created_at)

    _APP_COLS = "app_id, name, state, version, spec, code_dir, app_file, created_at"

    def add_app(self, name: str, *, ephemeral: bool, spec: dict[str, Any], code_dir: str, app_file: str) -> AppRecord:
        """Record a new deployment (superseding the previous one of that name) or an ephemeral app."""
        app_id = "ap-" + uuid.uuid4().hex[:12]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                version = 1
                if not ephemeral:
                    row = self._db.execute(
                        "SELECT MAX(version) FROM apps WHERE name = ? AND state != 'ephemeral'", (name,)
                    ).fetchone()
                    version = (row[0] or 0) + 1
                    self._db.execute(
                        "UPDATE apps SET state = 'stopped', stopped_at = ? WHERE name = ? AND state = 'deployed'",
                        (time.time(), name),
                    )
                self._db.execute(
                    f"INSERT INTO apps ({self._APP_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        app_id,
                        name,
                        "ephemeral" if ephemeral else "deployed",
                        version,
                        json.dumps(spec),
                        code_dir,
                        app_file,
                        time.time(),
                    ),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get_app(app_id)

    def get_app(self, app_id: str) -> AppRecord:
        rows = self._rows(f"SELECT {self._APP_COLS} FROM apps WHERE app_id = ?", app_id)
        if not rows:
            raise NotFoundError(f"no app with id {app_id}")
        return self._app(rows[0])

    def deployed(self, name: str) -> AppRecord:
        """The current deployment named ``name``."""
        rows = self._rows(f"SELECT {self._APP_COLS} FROM apps WHERE name = ? AND state = 'deployed'", name)
        if not rows:
            raise NotFoundError(f"no deployed app named {name!r}; deploy it with `warmboot deploy FILE`")
        return self._app(rows[0])

    def latest_app(self, name: str) -> AppRecord:
        """The newest app of that name, running or stopped (the dashboard shows a stopped app's history too)."""
        rows = self._rows(f"SELECT {self._APP_COLS} FROM apps WHERE name = ? ORDER BY created_at DESC LIMIT 1", name)
        if not rows:
            raise NotFoundError(f"no app named {name!r} was ever deployed or run here")
        return self._app(rows[0])

    def running_apps(self) -> list[AppRecord]:
        return [
            self._app(r)
            for r in self._rows(
                f"SELECT {self._APP_COLS} FROM apps WHERE state IN ('deployed', 'ephemeral') ORDER BY created_at"
            )
        ]

    def recent_stopped_apps(self, limit: int) -> list[dict[str, Any]]:
        """Apps stopped most recently (the dashboard's history)."""
        rows = self._rows(
            "SELECT name, version, stopped_at FROM apps WHERE state = 'stopped' ORDER BY stopped_at DESC LIMIT ?",
            limit,
        )
        return [{"name": n, "version": v, "stopped_at": t} for n, v, t in rows]

    def stop_app(self, app_id: str) -> None:
        self._rows("UPDATE apps SET state = 'stopped', stopped_at = ? WHERE app_id = ?", time.time(), app_id)

    def stop_ephemeral(self) -> list[str]:
        """Ephemeral apps do not outlive the server that ran them; mark leftovers stopped at start."""
        ids = [r[0] for r in self._rows("SELECT app_id FROM apps WHERE state = 'ephemeral'")]
        for app_id in ids:
            self.stop_app(app_id)
        return ids

    # ----- schedules (server/scheduler.py) ----------------------------------------------------------

    def schedule_rows(self) -> list[ScheduleRow]:
        return [ScheduleRow(*r) for r in self._rows(f"SELECT {self._SCHEDULE_COLS} FROM schedules")]

    _SCHEDULE_COLS = "app_id, tag, anchor, next_tick, last_tick, last_call_id"

    def put_schedule(self, row: ScheduleRow) -> None:
        """Record a schedule's state (one transaction)."""
        self._rows(
            f"INSERT INTO schedules ({self._SCHEDULE_COLS}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (app_id, tag) "
            "DO UPDATE SET anchor = excluded.anchor, next_tick = excluded.next_tick, last_tick = excluded.last_tick, "
            "last_call_id = excluded.last_call_id",
            row.app_id,
            row.tag,
            row.anchor,
            row.next_tick,
            row.last_tick,
            row.last_call_id,
        )

    def delete_schedule(self, app_id: str, tag: str) -> None:
        self._rows("DELETE FROM schedules WHERE app_id = ? AND tag = ?", app_id, tag)

    # ----- secrets ---------------------------------------------------------------------------------

    def put_secret(self, name: str, values: dict[str, str]) -> None:
        now = time.time()
        self._rows(
            'INSERT INTO secrets (name, "values", created_at, updated_at) VALUES (?, ?, ?, ?) '
            'ON CONFLICT(name) DO UPDATE SET "values" = excluded."values", updated_at = excluded.updated_at',
            name,
            json.dumps(values),
            now,
            now,
        )

    def get_secret(self, name: str) -> dict[str, str]:
        rows = self._rows('SELECT "values" FROM secrets WHERE name = ?', name)
        if not rows:
            raise NotFoundError(f"no secret named {name!r}; create it with `warmboot secret create {name} KEY=VALUE`")
        return json.loads(rows[0][0])

    def list_secrets(self) -> list[dict[str, Any]]:
        return [
            {"name": n, "keys": sorted(json.loads(v)), "created_at": c, "updated_at": u}
            for n, v, c, u in self._rows('SELECT name, "values", created_at, updated_at FROM secrets ORDER BY name')
        ]
