"""The server's database for state tests: each runs on SQLite and on a real PostgreSQL (a private cluster)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from warmboot.devservices import postgres
from warmboot.server.db import Database


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[str]:
    with postgres.cluster() as prefix:
        yield prefix


@pytest.fixture(params=["sqlite", "postgres"])
def open_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Database]]:
    """Opens this test's database; called again, opens the same one (a server restart)."""
    opened: list[Database] = []
    if request.param == "sqlite":
        path = tmp_path / "state.db"

        def target() -> Database:
            return Database.sqlite(path)
    else:
        url = postgres.create_database(request.getfixturevalue("postgres_cluster"))

        def target() -> Database:
            return Database.postgres(url)

    def open_one() -> Database:
        opened.append(target())
        return opened[-1]

    yield open_one
    for db in opened:
        db.close()
