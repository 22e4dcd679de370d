"""The server's database: SQLite in its home by default, PostgreSQL when ``WARMBOOT_DATABASE_URL`` names one.

Every module that keeps state (apps and secrets, calls, snapshots, starts, proxy tokens) writes SQL once, in
SQLite's dialect with ``?`` parameters, against :class:`Database`. For PostgreSQL the few differences are
translated here: ``?`` becomes ``%s``; in table definitions ``REAL`` becomes ``DOUBLE PRECISION`` (PostgreSQL's
``REAL`` is 4 bytes: timestamps would lose their seconds), ``INTEGER`` ``BIGINT`` (sizes above 2 GiB), ``BLOB``
``BYTEA`` and ``INTEGER PRIMARY KEY AUTOINCREMENT`` ``BIGSERIAL PRIMARY KEY``; ``BEGIN IMMEDIATE`` is ``BEGIN``.
The SQL itself sticks to what both understand (``INSERT ... ON CONFLICT``, ``RETURNING``).

One connection, used under the caller's lock (the modules serialise their statements already), in autocommit
mode with explicit ``BEGIN``/``COMMIT`` where several statements must hold together.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from warmboot import config
from warmboot.errors import HostSetupError, InvalidOptionError

_DDL = re.compile(r"^\s*(CREATE|ALTER)\b", re.IGNORECASE)
_PG_TYPES = (
    (re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", re.IGNORECASE), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)


class Database:
    """A connection to SQLite or PostgreSQL that speaks SQLite's SQL (see the module docstring)."""

    def __init__(self, conn: Any, dialect: str):
        self._conn = conn
        self.dialect = dialect  #: "sqlite" or "postgres"

    # ----- opening ------------------------------------------------------------------------------------------

    @classmethod
    def sqlite(cls, path: str | Path) -> Database:
        """SQLite at ``path`` (":memory:" for a throwaway one), in WAL mode when on disk."""
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        if str(path) != ":memory:":
            os.chmod(path, 0o600)  # secrets live here
            conn.execute("PRAGMA journal_mode=WAL")
        return cls(conn, "sqlite")

    @classmethod
    def postgres(cls, url: str) -> Database:
        """PostgreSQL at ``url`` (``postgresql://user:password@host:port/dbname``, or a socket folder as host)."""
        import psycopg  # the server only, and only when configured

        try:
            conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            where = re.sub(r"//[^@/]*@", "//***@", url)  # never log a password
            raise HostSetupError(f"cannot connect to PostgreSQL at {where}: {str(exc).strip()}") from exc
        return cls(conn, "postgres")

    @classmethod
    def from_env(cls, home: Path) -> Database:
        """``WARMBOOT_DATABASE_URL`` (or the file ``WARMBOOT_DATABASE_URL_FILE`` names, to keep a password out
        of the environment) when set, else SQLite at ``home/state.db``."""
        url = config.value_or_file("WARMBOOT_DATABASE_URL")
        if not url:
            home.mkdir(parents=True, exist_ok=True)
            return cls.sqlite(home / "state.db")
        if not url.startswith(("postgresql://", "postgres://")):
            raise InvalidOptionError(
                "WARMBOOT_DATABASE_URL must be a postgresql:// URL (unset it to keep state in SQLite in WARMBOOT_HOME)"
            )
        return cls.postgres(url)

    # ----- statements ---------------------------------------------------------------------------------------

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        """Run one statement; returns a cursor (``fetchone``, ``fetchall``, ``rowcount``)."""
        if self.dialect == "sqlite":
            return self._conn.execute(sql, params)
        return _PgCursor(self._conn.execute(self._pg(sql), tuple(params)))

    def executescript(self, script: str) -> None:
        """Run several statements without parameters (table definitions)."""
        if self.dialect == "sqlite":
            self._conn.executescript(script)
            return
        for statement in _statements(script):
            self._conn.execute(self._pg(statement))

    def columns(self, table: str) -> set[str]:
        """The names of ``table``'s columns (to add those a newer version defines)."""
        if self.dialect == "sqlite":
            return {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
        rows = self._conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s AND table_schema = "
            "current_schema()",
            (table,),
        ).fetchall()
        return {row[0] for row in rows}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Database:
        """``with db:`` runs the block's statements as one transaction."""
        self._conn.execute("BEGIN")
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self.dialect == "sqlite" and not self._conn.in_transaction:
            return  # a script in the block committed already (sqlite3's executescript does)
        self._conn.execute("COMMIT" if kind is None else "ROLLBACK")

    @staticmethod
    def _pg(sql: str) -> str:
        if _DDL.match(sql):
            for pattern, replacement in _PG_TYPES:
                sql = pattern.sub(replacement, sql)
        if sql.strip().upper() == "BEGIN IMMEDIATE":
            return "BEGIN"
        return sql.replace("?", "%s")


class _PgCursor:
    """psycopg's cursor as sqlite3's behaves: fetching from a statement that returns no rows gives none."""

    def __init__(self, cursor: Any):
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def fetchone(self) -> Any:
        return self._cursor.fetchone() if self._cursor.description is not None else None

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall() if self._cursor.description is not None else []

    def __iter__(self) -> Any:
        return iter(self.fetchall())


def _statements(script: str) -> list[str]:
    """The statements of a schema script: split at semicolons, ``--`` comments dropped."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
